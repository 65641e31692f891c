"""TOTP codes, and the ledger that keeps any code from being sent twice.

Servers with reuse protection (google-authenticator's ``DISALLOW_REUSE``) accept a code
once per time step and count a second use as a failed login. :class:`TOTPLedger` records,
for each secret, the last time step whose code was sent, and makes a login that would repeat
it wait for the next step. The process-wide :data:`TOTP_LEDGER` keeps that record in a small
file shared by every process of the user on this machine (see :func:`default_ledger_path`),
so worker processes that log in at once with one secret take turns instead of being refused.

The file holds no secret: each secret is known by its HMAC-SHA256 under a random per-user
key kept beside the file (mode 0600), and the only other datum is the step number.
"""

from __future__ import annotations

import binascii
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import pyotp

from .errors import AuthenticationInterrupted
from .results import AuthenticationFailure
from .text import printable

__all__ = [
    "LEDGER_ENV",
    "LoginAbandoned",
    "TOTPLedger",
    "TOTP_LEDGER",
    "checked_secret",
    "default_ledger_path",
    "make_totp",
    "normalise_secret",
]

log = logging.getLogger("paramiko_executor.auth")

#: Environment variable naming the ledger file, overriding :func:`default_ledger_path`.
LEDGER_ENV = "PARAMIKO_EXECUTOR_TOTP_LEDGER"
_LEDGER_NAME = "totp-ledger"
_KEY_SUFFIX = ".key"
_KEY_BYTES = 32
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

#: A step recorded further than this ahead of the clock is implausible, and ignored.
PLAUSIBLE_AHEAD = 2

#: How often a login waiting for a fresh code checks whether it was abandoned (seconds).
_ABANDON_POLL = 0.1


class LoginAbandoned(AuthenticationInterrupted):
    """A login stopped while it waited for a code, because ``abandoned()`` said so.

    The executor's own doing (no caller waits for the login), not the server's:
    a connection the server broke is a plain `AuthenticationInterrupted`.
    """


class _TOTP(pyotp.TOTP):
    # The secret is the one the server issued: accept google-authenticator's classic 80-bit
    # secrets, which recent pyotp releases refuse by default (they want 112 bits, fit for new
    # secrets).
    min_secret_length_bits = 8


def normalise_secret(secret: str) -> str:
    """``secret`` without whitespace, upper-case: the form every other function expects."""
    return "".join(secret.split()).upper()


def make_totp(secret: str) -> pyotp.TOTP:
    """A ``pyotp.TOTP`` for a normalised base32 ``secret`` (short legacy secrets accepted)."""
    return _TOTP(secret)


def checked_secret(name: str, secret: Any) -> str:
    """``secret`` normalised (see :func:`normalise_secret`), once it is a valid base32 secret.

    Raises ``TypeError`` or ``ValueError`` naming ``name`` and quoting nothing of the secret.
    """
    if not isinstance(secret, str):
        raise TypeError(f"{name} must be a str, not {type(secret).__name__}")
    text = normalise_secret(secret)
    if not text:
        raise ValueError(f"{name} must not be empty")
    try:
        make_totp(text).now()
        valid = True
    except (ValueError, TypeError, binascii.Error):
        valid = False
    if not valid:
        # Raised outside the ``except``: the codec's error (a non-ASCII secret) holds the
        # whole secret, and would stay our error's ``__context__`` even ``from None``.
        raise ValueError(f"{name} is not a valid base32 TOTP secret")
    return text


def default_ledger_path() -> str:
    """Where the process-wide ledger lives: the first of

    1. the file named by the environment variable ``PARAMIKO_EXECUTOR_TOTP_LEDGER``;
    2. ``$XDG_RUNTIME_DIR/paramiko_executor/totp-ledger`` when ``XDG_RUNTIME_DIR`` is an
       absolute path to a directory owned by this user (a tmpfs on systemd machines: never on
       a network file system, where file locks may not work);
    3. ``${XDG_CACHE_HOME:-~/.cache}/paramiko_executor/totp-ledger``.

    Processes only share a ledger when they agree on it: give processes started outside a
    login session (cron, systemd services) the same ``XDG_RUNTIME_DIR``, or set the variable.
    """
    explicit = os.environ.get(LEDGER_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        try:
            if os.stat(runtime).st_uid == os.getuid() and os.path.isdir(runtime):
                return os.path.join(runtime, "paramiko_executor", _LEDGER_NAME)
        except OSError:
            pass
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "paramiko_executor", _LEDGER_NAME)


class _LedgerUnusable(Exception):
    """The ledger file cannot be used for this login: it is not to be trusted, or failed."""


#: Held while a claim has the ledger file open. A fork waits for it, so that no child
#: inherits a descriptor of the file, and with it the lock: a child holding one would keep
#: the ledger locked for every process of the user for as long as it lives.
_FILE_OPEN = threading.Lock()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_FILE_OPEN.acquire, after_in_parent=_FILE_OPEN.release,
                        after_in_child=_FILE_OPEN.release)


class _LedgerFile:
    """The shared record: ``<hex HMAC of the secret> <last step sent>`` lines, under ``flock``.

    Every access opens the file, takes an exclusive ``flock``, reads or rewrites it and closes
    it again, and a fork waits for an access in progress (`_FILE_OPEN`), so no descriptor
    (nor lock) is ever shared with a forked child; the lock is held for microseconds, never
    while waiting for a time step.

    Trusted only as far as it deserves: the directory, the ledger and its key must each
    belong to this user and be writable by nobody else, and are opened without following
    symbolic links (``O_NOFOLLOW``, the directory opened first and the files relative to
    it, each checked with ``fstat`` once open), so no other local user can plant a link
    whose target this process would rewrite, nor feed it records. Anything else raises
    `_LedgerUnusable` for that access alone.
    """

    # A lock held longer than this belongs to a stopped or hung process: give up, loudly.
    LOCK_TIMEOUT = 10.0
    _LOCK_POLL = 0.005

    def __init__(self, path: str) -> None:
        self.path = path

    def _open_directory(self) -> int:
        directory = os.path.dirname(self.path)
        make_private_directories(directory)
        fd = os.open(directory, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_DIRECTORY", 0)
                     | _CLOEXEC)
        try:
            _check_owned(fd, directory, stat.S_ISDIR)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_file(self, directory_fd: int, name: str) -> int:
        """``name`` in the ledger's directory, created owner-only if missing, once checked."""
        fd = os.open(name, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600,
                     dir_fd=directory_fd)
        try:
            _check_owned(fd, os.path.join(os.path.dirname(self.path), name), stat.S_ISREG)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lock(self, fd: int, until: Optional[float],
              abandoned: Optional[Callable[[], bool]]) -> None:
        if not lock_within(fd, self.LOCK_TIMEOUT, self._LOCK_POLL,
                           lambda: _check_login_waits(until, abandoned)):
            raise _LedgerUnusable(f"it stayed locked for {self.LOCK_TIMEOUT:g} s "
                                  "(a stopped process holds it?)")

    @staticmethod
    def _hmac_key(fd: int) -> bytes:
        """The per-user key from the open key file ``fd``, created on first use.

        Called with the ledger lock held. Read every time, not cached: a key file removed
        and made anew by another process must not leave this one hashing with the old key.
        """
        with os.fdopen(os.dup(fd), "r+b") as file:
            key = file.read()
            if len(key) != _KEY_BYTES:  # new (or damaged): the ledger lock makes this race-free
                key = secrets.token_bytes(_KEY_BYTES)
                file.seek(0)
                file.truncate()
                file.write(key)
        return key

    def claim(self, secret: str, step: int, until: Optional[float] = None,
              abandoned: Optional[Callable[[], bool]] = None) -> Optional[int]:
        """The step recorded for ``secret`` if it is ``step`` or later, else None.

        When the step is free, it is recorded in the same locked read-modify-write, so two
        processes can never both claim one step. A record more than `PLAUSIBLE_AHEAD`
        steps ahead of ``step`` is implausible (a clock that ran fast, or a forged line):
        it is ignored with a WARNING and overwritten. Records older than the step being
        written are dropped: they can no longer make anybody wait, and the file stays a few
        lines long. Raises `_LedgerUnusable` or `OSError` when the file cannot be used.

        The wait for the lock (another process's, or another thread's claim) ends after
        `LOCK_TIMEOUT` (`_LedgerUnusable`), at ``until`` (a `time.monotonic` value) or once
        ``abandoned()`` is true (then `AuthenticationInterrupted`, as for the login's wait).
        """
        wait = self.LOCK_TIMEOUT
        if until is not None:
            wait = max(0.0, min(wait, until - time.monotonic()))
        if not _FILE_OPEN.acquire(timeout=wait):
            _check_login_waits(until, abandoned)
            raise _LedgerUnusable("another thread's claim held it too long")
        try:
            taken, ignored = self._claim(secret, step, until, abandoned)
        finally:
            _FILE_OPEN.release()
        if ignored is not None:
            # Logged with no lock held: a handler that blocks (a full stderr pipe) must
            # not hold up every process's logins.
            log.warning("TOTP ledger %s records a time step %d steps ahead of the clock: "
                        "ignored", printable(self.path), ignored - step)
        return taken

    def _claim(self, secret: str, step: int, until: Optional[float],
               abandoned: Optional[Callable[[], bool]]) -> Tuple[Optional[int], Optional[int]]:
        directory = self._open_directory()
        try:
            fd = self._open_file(directory, os.path.basename(self.path))
            try:
                self._lock(fd, until, abandoned)
                key_fd = self._open_file(directory, os.path.basename(self.path) + _KEY_SUFFIX)
                try:
                    key = self._hmac_key(key_fd)
                finally:
                    os.close(key_fd)
                name = hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()
                return self._claim_locked(fd, name, step)
            finally:
                os.close(fd)  # also releases the lock
        finally:
            os.close(directory)

    def _claim_locked(self, fd: int, name: str, step: int) -> Tuple[Optional[int], Optional[int]]:
        """`claim`'s answer, and the implausible step it ignored (None if none)."""
        with os.fdopen(os.dup(fd), "r+", encoding="ascii", errors="replace") as file:
            records: Dict[str, int] = {}
            for line in file.read().splitlines():
                fields = line.split()
                # A line damaged by a crash mid-write is ignored, not fatal.
                if len(fields) == 2 and fields[1].isdigit() and len(fields[1]) < 20:
                    records[fields[0]] = int(fields[1])
            recorded = records.get(name)
            ignored = None
            if recorded is not None and recorded > step + PLAUSIBLE_AHEAD:
                ignored, recorded = recorded, None
            if recorded is not None and recorded >= step:
                return recorded, None
            records[name] = step
            kept = {k: v for k, v in records.items() if step - 2 <= v <= step + PLAUSIBLE_AHEAD}
            file.seek(0)
            file.truncate()
            file.write("".join(f"{k} {v}\n" for k, v in kept.items()))
            return None, ignored


def _check_login_waits(until: Optional[float], abandoned: Optional[Callable[[], bool]]) -> None:
    """Raise `AuthenticationInterrupted` once a login's time ran out or it was abandoned."""
    if abandoned is not None and abandoned():
        raise LoginAbandoned(
            "the login was abandoned while it waited for the TOTP ledger's lock")
    if until is not None and time.monotonic() >= until:
        raise AuthenticationInterrupted(
            "the login's time ran out while it waited for the TOTP ledger's lock")


def lock_within(fd: int, seconds: float, poll: float,
                between: Optional[Callable[[], None]] = None) -> bool:
    """An exclusive ``flock`` on ``fd``, tried every ``poll`` s for ``seconds``; False if not had.

    ``between`` runs after each refused try (it raises to end the wait early).
    """
    give_up = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if between is not None:
            between()
        if time.monotonic() >= give_up:
            return False
        time.sleep(poll)


def make_private_directories(directory: str) -> None:
    """Make ``directory`` and each missing parent owner-only (0700), whatever the umask.

    ``os.makedirs`` gives the parents 0777 less the umask: a fresh ``~/.cache`` writable by
    every local user under umask 0. The XDG base directory specification asks for 0700.
    """
    parent = os.path.dirname(directory)
    if parent and parent != directory and not os.path.isdir(parent):
        make_private_directories(parent)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass


def _check_owned(fd: int, path: str, kind: Callable[[int], bool]) -> None:
    """Raise `_LedgerUnusable` unless ``fd`` is of ``kind``, this user's, writable by no other."""
    info = os.fstat(fd)
    if not kind(info.st_mode):
        raise _LedgerUnusable(f"{path} is not a {'directory' if kind is stat.S_ISDIR else 'file'}")
    if info.st_uid != os.getuid():
        raise _LedgerUnusable(f"{path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _LedgerUnusable(f"{path} is writable by other users")
    if kind is stat.S_ISREG and info.st_nlink != 1:
        raise _LedgerUnusable(f"{path} has other names (hard links)")


class TOTPLedger:
    """The last TOTP time step sent for each secret, so that no code is sent twice.

    Before a code is handed to the server, :meth:`issue` looks up the last step whose code
    was sent (or reserved, see :meth:`wait_until_fresh`) for that secret (in this process, and
    in the ledger file when ``path`` is given) and, if it is the current step (or later),
    waits until the step after it begins. Thread-
    safe (a Condition wait, releasing the lock, so other secrets are not held up). A child
    process after ``os.fork`` keeps the record (it shares the parent's secrets and clock) with
    a fresh lock. Secrets are keyed by their SHA-256 in memory, by a keyed HMAC in the file.

    ``path``: the ledger file shared with other processes; None keeps the record in this
    process only. When the file cannot be used for a login (it is not to be trusted, see
    `_LedgerFile`, or reading or writing it fails), a WARNING names the path and that login
    relies on this process's record alone; the next login tries the file again.

    A login waits at most one time step for a fresh code, and less when the caller's
    ``deadline`` comes first or its ``abandoned()`` turns true (the connection was closed):
    then `AuthenticationInterrupted` (temporary: a new connect attempt takes its turn
    again). A recorded step more than `PLAUSIBLE_AHEAD` steps ahead of the clock is ignored.

    ``clock`` (seconds since the epoch) and ``wait`` (called with a timeout, instead of the
    Condition wait) exist for tests with a fake clock.
    """

    # A clock that does not reach a new step after this many waits is standing still.
    _MAX_WAITS = 3
    # Wake just after the step boundary, not just before it.
    _BOUNDARY_MARGIN = 0.05

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        wait: Optional[Callable[[float], Any]] = None,
        *,
        path: Optional[str] = None,
    ) -> None:
        self._clock = clock
        self._wait_hook = wait
        self._lock = threading.RLock()  # ``with self._lock``: see `inbox.Inbox`
        self._cond = threading.Condition(self._lock)
        self._last: Dict[bytes, int] = {}
        # Steps wait_until_fresh claimed for logins of this process, oldest first, each for
        # one later issue() (the keyboard-interactive handler runs in paramiko's thread, so a
        # reservation cannot be tied to the thread that made it).
        self._reserved: Dict[bytes, List[int]] = {}
        self._file = None if path is None else _LedgerFile(path)
        ref = weakref.ref(self)

        def reset_lock_in_child() -> None:
            ledger = ref()
            if ledger is not None:
                # Another thread may have held the lock at fork time; it does not exist here.
                ledger._lock = threading.RLock()
                ledger._cond = threading.Condition(ledger._lock)

        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=reset_lock_in_child)

    @property
    def path(self) -> Optional[str]:
        """The shared ledger file, or None when the record is kept in this process only."""
        return None if self._file is None else self._file.path

    @staticmethod
    def _key(secret: str) -> bytes:
        return hashlib.sha256(secret.encode()).digest()

    def _take_turn(self, secret: str, deadline: Optional[float] = None,
                   abandoned: Optional[Callable[[], bool]] = None) -> Tuple[int, str]:
        """Wait until the current step's code for ``secret`` was never sent; claim it.

        The step is recorded as taken (here and in the file) in the same locked step as the
        check. Waits at most one time step (by the clock and by `time.monotonic`, so a clock
        standing still cannot hold a login either), until ``deadline`` (a `time.monotonic`
        value) or until ``abandoned()``. Returns the step and its code. Hold ``_cond``.
        """
        key = self._key(secret)
        totp = make_totp(secret)
        interval = totp.interval
        latest = self._clock() + interval + self._BOUNDARY_MARGIN
        limit = time.monotonic() + interval + self._BOUNDARY_MARGIN
        if deadline is not None:
            limit = min(limit, deadline)
        stalls = 0
        while True:
            now = self._clock()
            step = int(now // interval)
            last = self._last.get(key)
            if last is not None and last > step + PLAUSIBLE_AHEAD:
                last = None  # this process's own record, from before the clock went back
            taken = (last if last is not None and last >= step
                     else self._claim(secret, step, limit, abandoned))
            if taken is None:
                self._last[key] = step
                return step, totp.at(now)
            wake = (taken + 1) * interval + self._BOUNDARY_MARGIN
            if wake > latest or time.monotonic() >= limit:
                raise AuthenticationInterrupted(
                    "no fresh TOTP code within one time step: other logins with this secret "
                    "took the steps (a later attempt takes its turn)")
            log.info("TOTP code for this secret was already sent; waiting %.1f s for the next "
                     "time step", wake - now)
            self._pause(min(wake - now, limit - time.monotonic()), abandoned)
            if int(self._clock() // interval) <= step:
                stalls += 1
                if stalls > self._MAX_WAITS:
                    raise AuthenticationFailure(
                        "no fresh TOTP code became available (is the system clock standing still?)"
                    )

    def _pause(self, delay: float, abandoned: Optional[Callable[[], bool]]) -> None:
        """Wait ``delay`` seconds (other secrets go on meanwhile); raise once ``abandoned()``."""
        if self._wait_hook is not None:
            self._wait_hook(delay)
            return
        end = time.monotonic() + delay
        while True:
            if abandoned is not None and abandoned():
                raise LoginAbandoned(
                    "the login was abandoned while it waited for a fresh TOTP code")
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(min(remaining, _ABANDON_POLL) if abandoned else remaining)

    def _claim(self, secret: str, step: int, until: Optional[float] = None,
               abandoned: Optional[Callable[[], bool]] = None) -> Optional[int]:
        """`_LedgerFile.claim` on the shared file; None (free) when it cannot be used now.

        A failure concerns this claim alone: the next one tries the file again.
        """
        if self._file is None:
            return None
        try:
            return self._file.claim(secret, step, until, abandoned)
        except (_LedgerUnusable, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.warning("TOTP ledger %s not used for this login (%s): codes are tracked in "
                        "this process only", printable(self._file.path), printable(str(why)))
            return None

    def wait_until_fresh(self, secret: str, *, deadline: Optional[float] = None,
                         abandoned: Optional[Callable[[], bool]] = None) -> None:
        """Block until a step whose code for ``secret`` was never sent begins; reserve it.

        Call this before a login starts the exchange that will ask for the code: the next
        :meth:`issue` in this process, during that step, gets the reserved code without
        waiting. Others (threads, processes) wait for a later step before they start theirs,
        so logins with one secret never overlap at the server (google-authenticator's PAM
        module refuses a login whose secret file another login rewrote meanwhile).

        Waits at most one time step, and not past ``deadline`` (a `time.monotonic` value)
        nor once ``abandoned()`` is true (checked every 0.1 s): then raises
        `AuthenticationInterrupted`. A ``secret`` that is not valid base32 raises
        ``ValueError`` (``TypeError`` if not a str) naming it, and quoting none of it.
        """
        secret = checked_secret("secret", secret)
        with self._lock:
            step, _code = self._take_turn(secret, deadline, abandoned)
            self._reserved.setdefault(self._key(secret), []).append(step)

    def issue(self, secret: str) -> str:
        """Return a code for ``secret`` that was never sent, recording it as sent.

        Call this at the moment the code is handed to the server. A step this process
        reserved with :meth:`wait_until_fresh` is used if it is the current one; reservations
        of steps gone by are dropped. Waits at most one time step. ``secret`` is checked as
        by :meth:`wait_until_fresh`.
        """
        secret = checked_secret("secret", secret)
        key = self._key(secret)
        with self._lock:
            now = self._clock()
            totp = make_totp(secret)
            step = int(now // totp.interval)
            reserved = [s for s in self._reserved.pop(key, ()) if s >= step]
            if reserved and reserved[0] == step:
                if reserved[1:]:
                    self._reserved[key] = reserved[1:]
                return totp.at(now)
            if reserved:
                self._reserved[key] = reserved
            return self._take_turn(secret)[1]

#: The process-wide ledger authentication uses, shared through :func:`default_ledger_path`.
TOTP_LEDGER = TOTPLedger(path=default_ledger_path())
