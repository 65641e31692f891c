"""The executors: run a shell command and return its `CommandResult`.

`SSHExecutor` runs commands over one shared SSH connection from any number of
threads; `DupingSSHExecutor` feeds them to a fixed wrapper for command-restricted
keys; `ShellExecutor` (in `shell`) runs them locally. All three share
`Executor`'s contract.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import io
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Callable,
    ContextManager,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    TypeVar,
    Union,
    overload,
)

import paramiko

from .blocks import Reservation
from .channel import CommandSpec, Overdue, SessionChannel, close_soon, in_background
from .checks import check_int, check_timeout
from .command import OnOutput, RunOptions, StdinInput, check_command, outcome, stdin_bytes
from .connection import Connection, ConnectionState, GaveUp, Link
from .errors import (
    TRANSPORT_ERRORS,
    ConnectionLost,
    ExecutorFailure,
    NeverStarted,
    TransferTimeout,
    callers_own,
    for_executor,
    mapped,
    translate,
)
from .forwarded import ForwardedSocket
from .internals import key_exchange_running, private_key_object
from .options import DEFAULT, normalize_parameters, resolve_target
from .registry import connection_key, shared_connection
from .results import CommandResult, Output
from .retry import NEVER_STARTED_TRIES, Backoff, CommandRetry, ConnectRetry
from .slots import Claim
from .starts import FREE, Start
from .stats import ExecutorStatistics
from .transfer import (
    CLEANUP_GRACE,
    NEGOTIATION_TIMEOUT,
    Local,
    Progress,
    SFTPNotStarted,
    Source,
    check_mode,
    download,
    remove,
    upload,
)
from .tunnels import Forwarding, LocalTunnel, RemoteTunnel

__all__ = ["SAFE_WRAPPER", "DupingSSHExecutor", "Executor", "SSHExecutor",
           "check_transfer_arguments"]

if TYPE_CHECKING:
    from typing_extensions import TypeGuard  # typing's from Python 3.10; mypy knows it here

log = logging.getLogger("paramiko_executor.executors")

#: How long one clean-up of failed uploads' temporary files may take: longer
#: than SFTP's own start limit, so that a server that runs no SFTP says so.
LEFTOVER_TIMEOUT = NEGOTIATION_TIMEOUT + CLEANUP_GRACE

#: Clean-ups a temporary name gets before it is given up (a server that keeps
#: failing them must not slow every later transfer down for good).
LEFTOVER_TRIES = 3

#: How often a channel the live server refused is asked for again: at once
#: `QUICK_TRIES` times, then after a round trip and a backoff.
OPEN_TRIES = 20
QUICK_TRIES = 2
OPEN_BACKOFF = Backoff(0.005, 0.5)

#: The pause before trying again work the server turned away (`NeverStarted`).
NEVER_STARTED_BACKOFF = Backoff(0.01, 0.5)

T = TypeVar("T")

#: The longest command (or environment variable) one request carries, in UTF-8
#: bytes: sshd ends the whole connection on a packet over 256 KiB, and every
#: command sharing it would be cut, and this one retried to do it again.
MAX_REQUEST_TEXT = 255 * 1024

#: Dropbear's limit for any one string of a message (its MAX_STRING_LEN, in
#: 2022.83): it ends the whole connection on a longer one, as sshd does past 256 KiB.
DROPBEAR_MAX_TEXT = 9000

#: The executor's own type, for ``with SSHExecutor(...) as executor``.
ExecutorT = TypeVar("ExecutorT", bound="Executor")


def _turned_away(exc: ExecutorFailure) -> bool:
    """Whether the server turned the work away before it ran, so that it may be tried again
    on the same connection: `NeverStarted`, or a refused SFTP subsystem request (or one
    whose channel it closed before answering: ``SFTPNotStarted.refused``)."""
    return isinstance(exc, NeverStarted) or (isinstance(exc, SFTPNotStarted) and exc.refused)


def _begin(link: Link, deadline: Optional[float]) -> Optional[Start]:
    """This thread's session start on ``link`` (`Starts.begin`); None once ``deadline`` passed.

    A thread holding a slot of the link already (a call from a callback or a
    ``bounded_connection`` block) does not wait for other starts: the running
    start may be waiting for its slot.
    """
    starts = link.starts
    if not starts.serial:
        return FREE
    assert link.slots is not None
    return starts.begin(deadline, exempt=link.slots.held_by(threading.get_ident()) > 0)


class Executor(abc.ABC):
    """Runs shell commands; the common base of the three executors.

    Executors are context managers: leaving the ``with`` block calls `close`.
    """

    @overload
    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None,
        check: bool = True, env: Optional[Mapping[str, str]] = None, encoding: str = "utf-8",
        pty: bool = False, on_output: Optional[Callable[[str, str], object]] = None,
        keep_output: bool = True,
    ) -> CommandResult[str]: ...
    @overload
    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None,
        check: bool = True, env: Optional[Mapping[str, str]] = None, encoding: None,
        pty: bool = False, on_output: Optional[Callable[[str, bytes], object]] = None,
        keep_output: bool = True,
    ) -> CommandResult[bytes]: ...
    @abc.abstractmethod
    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None,
        check: bool = True, env: Optional[Mapping[str, str]] = None,
        encoding: Optional[str] = "utf-8", pty: bool = False,
        on_output: Optional[OnOutput] = None, keep_output: bool = True,
    ) -> CommandResult[Output]:
        """Run ``command``; return its result on exit 0, else raise `CommandExecutionFailure`.

        The result's output is str, or bytes with ``encoding=None``.
        """

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release whatever the executor holds; it stays usable."""

    def __enter__(self: ExecutorT) -> ExecutorT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_request_texts(command: bytes, options: RunOptions,
                         limit: int = MAX_REQUEST_TEXT) -> None:
    """ValueError unless the exec of ``command`` and each variable fit in one request."""
    for name, size in [("command", len(command)),
                       *((f"env[{key!r}]", len(key.encode()) + len(value.encode()))
                         for key, value in (options.env or {}).items())]:
        if size > limit:
            raise ValueError(f"{name} is {size} bytes: more than an SSH request to this "
                             f"server carries ({limit}; pass large data as stdin_input)")


def _is_file(value: Any) -> TypeGuard[Union[BinaryIO, IO[bytes]]]:
    return not isinstance(value, (str, bytes)) and not hasattr(value, "__fspath__")


def check_transfer_arguments(local: Any, remote: Any, *, put: bool, mode: Any = None,
                             timeout: Any = None, progress: Any = None) -> Optional[float]:
    """Check the arguments of ``put``/``get`` at the call; returns the timeout in seconds.

    ``local`` is a path, or a binary file object that can be read from
    (``put``) or written to (``get``).
    """
    if not isinstance(remote, str) or not remote:
        raise TypeError(f"remote must be a non-empty str, not {type(remote).__name__}")
    if "\0" in remote:  # sftp-server ends the session on one: the transfer failed obscurely
        raise ValueError("remote must not contain a NUL character")
    if _is_file(local):
        needed = ("read", "readinto") if put else ("write",)
        if not any(callable(getattr(local, name, None)) for name in needed):
            raise TypeError(f"local must be a path or a binary file object with "
                            f"{' or '.join(needed)}(), not {type(local).__name__}")
        if isinstance(local, io.TextIOBase):
            raise TypeError(f"local must be a binary file object, not a text one "
                            f"({type(local).__name__}): open it with 'rb' or 'wb'")
    elif isinstance(local, bytes) or not os.fspath(local):
        raise TypeError("local must be a non-empty path (str or os.PathLike) or a file object")
    check_mode(mode)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None, not {type(progress).__name__}")
    return check_timeout("timeout", timeout)


def _check_retries(value: Any) -> int:
    return int(value) if isinstance(value, bool) else check_int(
        "on_disconnect_retry", value, minimum=0)


@dataclass(frozen=True, repr=False)
class _KeyText:
    """A ``paramiko.PKey`` as OpenSSH private key text, encrypted when a passphrase was given.

    The keys themselves do not pickle; the text is never weaker than what the
    caller gave: with ``passphrase`` it is encrypted with it.
    """

    kind: Type[paramiko.PKey]
    text: str

    @classmethod
    def of(cls, key: paramiko.PKey, passphrase: Optional[str]) -> _KeyText:
        from cryptography.hazmat.primitives import serialization

        private = private_key_object(key)
        if private is None or not hasattr(private, "private_bytes"):
            raise TypeError(f"a {type(key).__name__} pkey cannot be pickled: "
                            "give key_filename instead")
        encryption = (serialization.BestAvailableEncryption(passphrase.encode())
                      if passphrase else serialization.NoEncryption())
        text = private.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.OpenSSH, encryption)
        return cls(type(key), text.decode())

    def load(self, passphrase: Optional[str]) -> paramiko.PKey:
        return self.kind.from_private_key(io.StringIO(self.text), password=passphrase)


class SSHExecutor(Executor):
    """Runs commands on one remote host over one shared, multiplexed SSH connection.

    Thread-safe: any number of threads may call `run_command` at once. Each
    command runs on its own session channel of the one ``paramiko.Transport``;
    at most MaxSessions channels are open at a time (probed on the first
    connect to a server and remembered for the process, unless
    ``max_sessions`` is given) and the commands past that wait for a
    slot, first come, first served. Nothing connects until the first command.
    ``max_sessions`` is each connection's cap, from every connect on; a
    server that allows fewer sessions proves it by refusing one while it
    frees none of ours, and that connection's cap comes down to the
    sessions the server holds: the extra commands wait instead of failing.

    A command whose connection breaks is retried on a new connection up to
    ``on_disconnect_retry`` times. **A retried command may already have run
    once on the server**: make commands that must not run twice idempotent,
    or pass ``on_disconnect_retry=0``. A command the server turned away
    before it ran (an unanswered open, an exec refused or closed before its
    reply) is tried again on the same connection, a bounded number of times.

    ``parameters`` are the keyword arguments of paramiko's
    ``SSHClient.connect`` (``hostname``, ``port``, ``username``, ``password``,
    ``pkey``, ``key_filename``, ...) or their asyncssh-style spellings
    ``host`` and ``client_keys``, plus ``known_hosts`` (a path, a list of
    paths, or None to switch host-key verification off). ``config`` names
    the ssh_config files to read (default ``~/.ssh/config``; ``()`` for none).

    Pickling carries the configuration, credentials included (a ``pkey``
    travels as key text, encrypted with ``passphrase`` when one is given),
    never the connection. Copies unpickled in one process with the same
    configuration share one connection, kept open after the copy that made
    it is gone, until `close` on any of them or 10 minutes without use.
    """

    def __init__(
        self,
        *,
        on_disconnect_retry: Union[int, bool] = 3,
        max_sessions: Optional[int] = None,
        mfa_config: Optional[Sequence[Mapping[str, str]]] = None,
        connect_retries: int = 9,
        connect_backoff: float = 1.0,
        keepalive_interval: Optional[float] = DEFAULT,
        keepalive_count_max: int = DEFAULT,
        config: Any = DEFAULT,
        max_forwarded: int = 64,
        **parameters: Any,
    ) -> None:
        self._arguments: Dict[str, Any] = dict(
            parameters,
            on_disconnect_retry=on_disconnect_retry,
            max_sessions=max_sessions,
            mfa_config=mfa_config,
            connect_retries=connect_retries,
            connect_backoff=connect_backoff,
            keepalive_interval=keepalive_interval,
            keepalive_count_max=keepalive_count_max,
            config=config,
            max_forwarded=max_forwarded,
        )
        self._retries = _check_retries(on_disconnect_retry)
        target = resolve_target(
            normalize_parameters(parameters),
            mfa_config=mfa_config,
            config=config,
            keepalive_interval=keepalive_interval,
            keepalive_count_max=keepalive_count_max if keepalive_count_max is DEFAULT
            else check_int("keepalive_count_max", keepalive_count_max, minimum=1),
        )
        self._connection = Connection(
            target,
            retry=ConnectRetry(retries=connect_retries, backoff=connect_backoff),
            max_sessions=check_int("max_sessions", max_sessions, minimum=1, optional=True),
        )
        #: Temporary files of failed uploads, to remove once a connection lets us,
        #: with the clean-ups that failed so far.
        self._leftovers: Dict[str, int] = {}
        self._forwarding = Forwarding(self, check_int("max_forwarded", max_forwarded, minimum=1))

    def __repr__(self) -> str:
        target = self._connection.target
        return (
            f"{type(self).__name__}(host={target.hostname!r}, port={target.port}, "
            f"username={target.credentials.username!r})"
        )

    # Pickling carries the configuration only; the copy connects on first use.
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self._arguments)
        if isinstance(state.get("pkey"), paramiko.PKey):
            state["pkey"] = _KeyText.of(state["pkey"], state.get("passphrase"))
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        arguments = dict(state)
        if isinstance(arguments.get("pkey"), _KeyText):
            arguments["pkey"] = arguments["pkey"].load(arguments.get("passphrase"))
        self.__init__(**{k: v for k, v in arguments.items() if v is not DEFAULT})  # type: ignore[misc]
        # Copies that resolve to the same connection here share it (see `registry`).
        fresh = self._connection
        self._connection = shared_connection(connection_key(fresh), lambda: fresh)

    @property
    def lock(self) -> threading.Lock:
        """The `threading.Lock` that guards the connection state."""
        return self._connection.lock

    @property
    def session_limit(self) -> Optional[int]:
        """The channel cap of the current connection (probed or configured), None if unconnected."""
        link = self._connection.link
        return None if link is None or link.slots is None else link.slots.limit

    @property
    def bounded_connection(self) -> ContextManager[paramiko.Transport]:
        """A context manager yielding the current ``paramiko.Transport`` with one slot reserved.

        The slot covers one session, opened through paramiko's API on the
        transport (``open_session``, ``open_sftp_client``, ...) by the block's
        thread or by a thread it started: close it before the block ends. A
        session channel still open as the block ends (the block raised before
        its ``close``, say) is closed then. The slot is free again once the
        server has closed every session channel opened in the block, as a
        command's is: OpenSSH keeps a closed session until its command ends,
        so commands queued meanwhile wait for it rather than be refused.
        ``direct-tcpip`` channels are not sessions, and are left as they are.
        """
        return self._bounded_connection()

    @contextlib.contextmanager
    def _bounded_connection(self) -> Iterator[paramiko.Transport]:
        link = self._get_link()
        assert link.slots is not None
        with link.taking() as taking, Reservation(link.slots, threading.get_ident()) as block:
            try:
                self._take_slot(link, None, block)
            except ExecutorFailure as exc:
                raise for_executor(exc, self) from None
            link.slots.hold_back(None)  # the caller opens a channel next
            taking.only(block)
            link.blocks.begin(block)
            yield link.transport

    @property
    def state(self) -> Optional[ConnectionState]:
        """The current `ConnectionState`, or None when not connected."""
        link = self._connection.link
        return None if link is None else link.state

    def statistics(self) -> ExecutorStatistics:
        """A consistent snapshot of what this executor did (see `ExecutorStatistics`)."""
        link = self._connection.link
        slots = None if link is None else link.slots
        live = slots is not None and not slots.closed
        return self._connection.counters.snapshot(
            # live: slots is not None (mypy does not narrow through it)
            open_channels=slots.limit - slots.available if live else 0,  # type: ignore[union-attr]
            waiting=slots.waiting if live else 0,  # type: ignore[union-attr]
            max_sessions=self._connection.limit,
        )

    def close(self) -> None:
        """Drop the connection and close every tunnel; commands running on it fail.

        A later command reconnects.
        """
        self._forwarding.close(then=self._connection.close)

    def _get_link(self, deadline: Optional[float] = None) -> Link:
        """The connection, connecting first; `GaveUp` once ``deadline`` passed while connecting.

        The connect itself goes on for the other callers waiting for it.
        """
        try:
            return self._connection.get(deadline)
        except ExecutorFailure as exc:
            raise for_executor(exc, self) from None

    # --- files --------------------------------------------------------------------

    def put(self, local: Source, remote: str, *, mode: Optional[int] = None,
            timeout: Optional[float] = None, progress: Optional[Progress] = None) -> int:
        """Copy ``local`` (a path or a binary file object) to ``remote`` over SFTP; the bytes sent.

        The transfer runs on a session channel of the executor's one
        connection and holds one slot of the same MaxSessions cap as the
        commands. It is atomic: the data goes to a temporary file next to
        ``remote`` (a new one for each attempt, created exclusively and
        readable by its owner only), which gets its final permission bits
        (``mode``; else those of the file replaced; else, as ``sftp`` leaves a
        new file, the local file's, 0o644 for a file object, less the server's
        umask or default ACL, learnt in the round trip that creates the
        temporary file) and is renamed over ``remote`` after the last byte (a
        failed transfer removes it). A transfer broken by a lost
        connection is retried from the start, up to ``on_disconnect_retry``
        times: a file object is read again from where it stood, and one that
        cannot seek (a pipe) makes that an `ExecutorFailure` once bytes were
        read. ``progress(done, total)`` is called from this thread.

        Raises `FileNotFoundError`/`PermissionError` naming ``remote``,
        `IsADirectoryError` naming it when it is a directory (or a link to
        one), `ValueError` when it names a device, FIFO or socket (left as
        it is), `TransferTimeout` past ``timeout``, and `ExecutorFailure` when the
        connection cannot be had or the server runs no SFTP. What ``local``,
        the local file system or ``progress`` raise reaches the caller as it
        was raised, from the first attempt; the connection and other threads'
        work are left alone.
        """
        timeout = check_transfer_arguments(local, remote, put=True, mode=mode, timeout=timeout,
                                           progress=progress)
        # One per attempt: the files it may have created (none before SFTP started).
        temps: List[List[str]] = []

        def attempt(chan: paramiko.Channel, deadline: Optional[float], source: Local) -> int:
            temps.append([])
            return upload(chan, source, remote, mode=mode, progress=progress, deadline=deadline,
                          temps=temps[-1])

        failed = interrupted = False
        started = time.monotonic()
        try:
            return self._transfer(local, attempt, timeout, sent=True)
        except BaseException as exc:
            # Whatever the error (the caller's file object or progress too): the upload's
            # own clean-up may have run out of time. An interrupt (Ctrl-C) may come before
            # it could run at all.
            failed = True
            interrupted = not isinstance(exc, Exception)
            raise
        finally:
            # An attempt broken with its connection left its file behind; a
            # failed or interrupted last one may have too (what its own clean-up
            # removed is no longer among its names). An interrupted caller waits
            # for no clean-up: its deadline is now.
            self._remove_leftover([name for names in (temps if failed else temps[:-1])
                                   for name in names],
                                  started if interrupted else
                                  None if timeout is None else started + timeout)

    def get(self, remote: str, local: Source, *, timeout: Optional[float] = None,
            progress: Optional[Progress] = None) -> int:
        """Copy ``remote`` to ``local`` (a path, written atomically, or a binary file object).

        Returns the bytes received; same slots, retries and errors as `put`.
        A new local file gets the remote file's permission bits less the
        umask; a replaced one keeps its own; the temporary file is readable
        by its owner only.
        """
        timeout = check_transfer_arguments(local, remote, put=False, timeout=timeout,
                                           progress=progress)

        def attempt(chan: paramiko.Channel, deadline: Optional[float], target: Local) -> int:
            return download(chan, remote, target, progress=progress, deadline=deadline)

        return self._transfer(local, attempt, timeout, sent=False)

    def _transfer(self, local: Source,
                  work: Callable[[paramiko.Channel, Optional[float], Local], int],
                  timeout: Optional[float], *, sent: bool) -> int:
        """``work(channel, deadline, local side)`` with the executor's slots and retries.

        What the caller's code or local I/O raised (a `CallerError` out of
        `work`) ends the call at once, raised as it was.
        """
        counters = self._connection.counters
        counters.add(commands_started=1)
        succeeded = False
        deadline = None if timeout is None else time.monotonic() + timeout

        def attempt(link: Link, side: Local) -> Optional[int]:
            if self._leftovers:
                self._remove_leftovers(link, deadline)
            with link.taking(), self._started_session(link, deadline) as session:
                if session is None:
                    return None
                try:
                    return work(session.hand_over(), deadline, side)
                except TimeoutError:
                    return None
                except (FileNotFoundError, PermissionError, IsADirectoryError):
                    raise  # the remote file's answer: not the connection's
                except TRANSPORT_ERRORS as exc:
                    raise mapped(exc, link.transport, True, "the transfer") from None
                finally:
                    # However the try ended, the channel is closed (a closed one gets nothing
                    # more): an interrupt (Ctrl-C) as it was handed over came before the
                    # transfer's own close, and its slot waits for the server's CLOSE.
                    close_soon(session.chan)
                    session.hold(None)

        def run() -> int:
            side = Local(local)
            done = self._with_retries(lambda link: attempt(link, side), deadline)
            if done is None:
                raise TransferTimeout(f"the transfer timed out after {timeout:g} s", self)
            return done

        try:
            done = callers_own(run)
            counters.add(**{"bytes_sent" if sent else "bytes_received": done})
            succeeded = True
            return done
        finally:
            counters.add(**{"commands_succeeded" if succeeded else "commands_failed": 1})

    def _remove_leftover(self, temps: List[str], deadline: Optional[float]) -> None:
        """Remove failed uploads' temporary files now if the connection lives, else later.

        Without a live connection the names are kept, and removed by the next
        transfer once it has one (`_remove_leftovers`). A clean-up may take
        `LEFTOVER_TIMEOUT` (a frozen server answers nothing), in the caller's
        thread until its ``deadline``; during a key exchange (which holds every
        channel's OPEN), or past the deadline, it runs in a thread of its own:
        the caller has its outcome.
        """
        if not temps:
            return
        with self._connection.lock:
            self._leftovers.update(dict.fromkeys(temps, 0))
        link = self._connection.link
        if link is not None and link.alive():
            if key_exchange_running(link.transport) or (
                    deadline is not None and time.monotonic() >= deadline):
                in_background(lambda: self._remove_leftovers(link))
            else:
                self._remove_leftovers(link, deadline)

    def _remove_leftovers(self, link: Link, until: Optional[float] = None) -> None:
        """Remove the pending temporary names in one SFTP session, within `LEFTOVER_TIMEOUT`.

        It ends by ``until`` too. Names it could not remove are kept for the
        next transfer's clean-up, up to `LEFTOVER_TRIES` clean-ups that reached
        the files; then given up, as every name is at once when the server runs
        something else than SFTP (nothing to remove them with). A clean-up that
        never reached them (its SFTP subsystem refused, its connection lost)
        does not count: Dropbear refuses bursts of them under load, and one
        retried transfer may meet several. Given-up names are logged at DEBUG.
        """
        pending: Dict[str, int] = {}
        settled = False
        reached = True  # whether this clean-up counts as one of the names' tries
        try:  # from the names' taking on: an interrupt keeps them
            with self._connection.lock:
                pending, self._leftovers = self._leftovers, {}
            if not pending:
                return
            bound = time.monotonic() + LEFTOVER_TIMEOUT
            bound = bound if until is None else min(bound, until)
            with link.taking(), self._started_session(link, bound) as session:
                if session is not None:
                    try:
                        with translate(link.transport, what="the clean-up"):
                            remove(session.hand_over(), *pending, deadline=bound)
                    finally:
                        session.hold(None)
                    settled = True
        except SFTPNotStarted as exc:
            # Only a server that ran something else gives every later session that answer
            # too; a refusal may pass (Dropbear refuses some under load) and never reached
            # the names.
            settled = exc.lasting
            reached = not exc.refused
            if settled:
                log.debug("gave up the temporary files of failed uploads %s: the server did "
                          "not start SFTP", sorted(pending), exc_info=True)
            else:
                log.debug("could not remove the temporary files of failed uploads",
                          exc_info=True)
        except (ExecutorFailure, OSError) as exc:
            reached = not isinstance(exc, ConnectionLost)
            log.debug("could not remove the temporary files of failed uploads", exc_info=True)
        finally:
            if not settled:
                self._keep_leftovers(pending, counted=reached)

    def _keep_leftovers(self, failed: Dict[str, int], counted: bool = True) -> None:
        """Keep the names of a failed clean-up for the next, those with tries left
        (a clean-up not ``counted`` spends none)."""
        spent = 1 if counted else 0
        kept = {name: tries + spent for name, tries in failed.items()
                if tries + spent < LEFTOVER_TRIES}
        if len(kept) < len(failed):
            log.debug("gave up the temporary files of failed uploads %s after %d clean-ups",
                      sorted(failed.keys() - kept.keys()), LEFTOVER_TRIES)
        with self._connection.lock:
            self._leftovers.update(kept)

    # --- running ----------------------------------------------------------------

    @overload
    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None,
        check: bool = True, env: Optional[Mapping[str, str]] = None, encoding: str = "utf-8",
        pty: bool = False, on_output: Optional[Callable[[str, str], object]] = None,
        keep_output: bool = True,
    ) -> CommandResult[str]: ...
    @overload
    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None,
        check: bool = True, env: Optional[Mapping[str, str]] = None, encoding: None,
        pty: bool = False, on_output: Optional[Callable[[str, bytes], object]] = None,
        keep_output: bool = True,
    ) -> CommandResult[bytes]: ...
    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None,
        check: bool = True, env: Optional[Mapping[str, str]] = None,
        encoding: Optional[str] = "utf-8", pty: bool = False,
        on_output: Optional[OnOutput] = None, keep_output: bool = True,
    ) -> CommandResult[Output]:
        """Run ``command`` remotely, feeding it ``stdin_input`` and then end-of-file.

        Returns the `CommandResult` on exit 0 (on any exit with
        ``check=False``); raises `CommandExecutionFailure` on a non-zero exit
        or a signal, `CommandTimeout` once ``timeout`` seconds passed (the
        remote command is sent TERM, then KILL; the connection stays usable),
        and `ExecutorFailure` when the connection cannot be had or broke more
        than ``on_disconnect_retry`` times. ``timeout`` covers everything:
        waiting for the connection (a connect and its retries, which go on
        for other callers), for a slot, opening the channel and the command;
        past it before the command was sent, it never ran. ``env``: variables sent as SSH ``env``
        requests (the server must accept them: OpenSSH's ``AcceptEnv``);
        ``encoding``: the output's codec, None for bytes; ``pty``: run on a
        pseudo-terminal (stderr then arrives merged into stdout).
        ``on_output(stream, line)`` is called from this thread with each
        complete line as it arrives; a retried command streams again from the
        start. ``keep_output=False`` keeps no output, with or without
        ``on_output``: it is dropped as it arrives, so memory stays flat, and
        ``stdout``/``stderr`` are empty (``""``, ``b""`` with ``encoding=None``)
        in the result and in a `CommandExecutionFailure` or `CommandTimeout`.
        """
        check_command(command)
        options = RunOptions.of(timeout=timeout, check=check, env=env, encoding=encoding,
                                pty=pty, on_output=on_output, keep_output=keep_output)
        return self._execute(self._spec(command, stdin_input, options), command, stdin_input)

    def _spec(self, command: str, stdin_input: StdinInput, options: RunOptions) -> CommandSpec:
        """What goes over the channel for ``command``: the command itself, and its stdin."""
        encoded = command.encode("utf-8")
        _check_request_texts(encoded, options)
        return CommandSpec(encoded, stdin_bytes(stdin_input), options)

    def _execute(self, spec: CommandSpec, shown_command: str,
                 shown_stdin: StdinInput) -> CommandResult[Output]:
        options = spec.options
        counters = self._connection.counters
        counters.add(commands_started=1)
        succeeded = False
        received = sent = -1  # none: the command never finished
        try:
            deadline = None if options.timeout is None else time.monotonic() + options.timeout
            found = callers_own(lambda: self._with_retries(
                lambda link: self._run_once(link, spec, deadline), deadline))
            if found is None:
                return outcome(shown_command, shown_stdin, options, None, "", "", timed_out=True)
            received, sent = found.received, found.sent
            result = outcome(shown_command, shown_stdin, options, found.exit_status, found.stdout,
                             found.stderr, timed_out=found.timed_out,
                             signal_name=found.exit_signal)
            succeeded = result.exit_code == 0
            return result
        finally:
            # One update for the command's end: its bytes (if it finished) and how it ended.
            ended = {"commands_succeeded" if succeeded else "commands_failed": 1}
            if received >= 0:
                ended.update(bytes_sent=sent, bytes_received=received)
            counters.add(**ended)

    def _with_retries(self, attempt: Callable[[Link], Optional[T]],
                      deadline: Optional[float]) -> Optional[T]:
        """Run ``attempt`` on the connection, trying again as `CommandRetry` allows.

        None when the deadline passed first (while connecting too), or when
        the call's own write outran it and was given up, breaking the
        connection (`ConnectionLost.timed_out`). A lost
        connection is dropped (only if still current) before the next try; work
        the server turned away (`_turned_away`: a command or a transfer) is tried
        again on it after a pause (`NEVER_STARTED_BACKOFF`). Once the tries are
        spent, an `ExecutorFailure` (an `SFTPNotStarted` for a transfer's refused
        subsystem) says how many were made. A
        `CallerError` ends the call at once, touching nothing: no handler here
        takes it for a connection's failure, and the public method unwraps it
        (`callers_own`).
        """
        retry = CommandRetry(lost=self._retries)
        tries = 0
        resend = False  # the try before may have reached the server: this one re-sends
        while True:
            tries += 1
            epoch = self._connection.epoch
            try:
                link = self._get_link(deadline)
            except GaveUp:
                return None  # the deadline passed while connecting: the call never started
            if resend:
                # Counted once there is a connection to re-send on, not before.
                self._connection.counters.add(commands_retried=1)
                resend = False
            try:
                return attempt(link)
            except ExecutorFailure as exc:
                if not isinstance(exc, ConnectionLost) and not _turned_away(exc):
                    raise for_executor(exc, self) from None
                if isinstance(exc, ConnectionLost):
                    self._connection.drop(link)
                    if epoch != self._connection.epoch:
                        raise ExecutorFailure("the executor was closed during the command",
                                              self) from None
                    if exc.timed_out:
                        return None  # its own write outran the deadline: no retry
                try:
                    retry = retry.increment(exc)
                except ExecutorFailure:
                    spent = f"{exc.description} ({tries} attempts)"
                    if isinstance(exc, SFTPNotStarted):  # public: a caller tells it apart
                        raise SFTPNotStarted(spent, self, refused=True) from None
                    raise ExecutorFailure(spent, self) from None
                if isinstance(exc, ConnectionLost) and exc.started:
                    resend = True
                    log.info("connection to %s lost during a command; retrying (%d of %d)",
                             self._connection.target, self._retries - retry.lost, self._retries)
                elif not isinstance(exc, ConnectionLost):
                    # A server that turns work away under load needs a moment (and
                    # Dropbear's closing of waiting channels, a session's end to pass).
                    turned_away = NEVER_STARTED_TRIES - retry.never_started - 1
                    pause = NEVER_STARTED_BACKOFF.delay(turned_away)
                    time.sleep(pause if deadline is None
                               else max(0.0, min(pause, deadline - time.monotonic())))
                log.debug("trying again after: %s", exc.description)
                if deadline is not None and time.monotonic() >= deadline:
                    return None

    def _run_once(self, link: Link, spec: CommandSpec,
                  deadline: Optional[float]) -> Optional[Any]:
        """One try on one connection; None when the deadline passed before the command started."""
        if link.transport.remote_version.startswith("SSH-2.0-dropbear"):
            # Known only once connected: this server's failure, not the caller's (a
            # HostGroup's other hosts run the command), and nothing sent.
            try:
                _check_request_texts(spec.command, spec.options, DROPBEAR_MAX_TEXT)
            except ValueError as exc:
                raise ExecutorFailure(f"{exc}: Dropbear would end the connection; "
                                      "the command did not run") from None
        assert link.spare is not None
        log.debug("running %r", spec.command)
        # An interrupt (Ctrl-C) between the open and run's own cover (or as the
        # spare is made after the exec): nothing else would close the session.
        with link.taking(), self._started_session(link, deadline) as session:
            if session is None:
                return None
            # A spare waits for its request all its life: none on a serial link (`Starts`).
            after_exec = None if link.starts.serial else functools.partial(
                link.spare.replenish, deadline)
            return session.run(spec, deadline, after_exec=after_exec)

    @contextlib.contextmanager
    def _started_session(self, link: Link, deadline: Optional[float]
                         ) -> Iterator[Optional[SessionChannel]]:
        """`_open_session` as this thread's start on ``link`` (`_begin`); None once
        ``deadline`` passed.

        The start lasts until the server answers the channel's request (a command's
        exec, a transfer's subsystem) or closes it, else to the block's end: Dropbear
        has a process for the channel only then, and the next start's channel, opened
        before, would be closed by this one's exit (an ``echo`` ends as its answer goes
        out), or by any session's end for a channel still waiting for its request.
        """
        # Not a ``with``: a Ctrl-C at its line would leave the start held (`START_HOLD`).
        start = _begin(link, deadline)
        try:
            if start is None:
                yield None
                return
            session = self._open_session(link, deadline)
            if session is not None and start is not FREE:
                session.on_request_answer = start.done
            yield session
        finally:
            if start is not None:
                start.done()

    def _take_slot(self, link: Link, deadline: Optional[float], claim: Claim) -> bool:
        """A slot of ``link`` for this thread by ``deadline``, into ``claim``; a spare gives
        its own back first.

        `ExecutorFailure` at once if this thread holds every slot (`Slots.take`).
        While the server leaves channel opens unanswered (their slots stay
        taken until it answers), the wait is bounded by the channel timeout
        too: past it, `NeverStarted`.
        """
        slots, spare = link.slots, link.spare
        assert slots is not None and spare is not None
        claim.taken = slots.acquire(blocking=False, holder=claim.holder)
        if claim.taken:
            return True
        started = time.monotonic()
        until = deadline
        if any(session.abandoned for session in list(link.sessions.values())):
            bound = started + link.transport.channel_timeout  # type: ignore[attr-defined, unused-ignore]
            until = bound if deadline is None else min(deadline, bound)
        try:
            # The spare is discarded once this thread is in line: a spare made
            # in between would hold a slot while we wait for one.
            claim.taken = slots.take(until, link.alive, queued=spare.discard)
            if claim.taken:
                return True
        finally:
            self._connection.counters.waited(time.monotonic() - started)
        if deadline is None or time.monotonic() < deadline:
            raise NeverStarted("no session slot came free within the channel timeout while "
                               "the server leaves channel opens unanswered")
        return False

    def _open_session(self, link: Link, deadline: Optional[float]) -> Optional[SessionChannel]:
        """An open session channel holding its slot for this thread; None once ``deadline`` passed.

        The caller passes the slot on (``session.hold(None)``) once its call is done with it.

        Takes the spare if there is one, else a slot and a new channel. A
        channel a live server refuses is asked for again (`OPEN_TRIES`); one
        it does not answer within the channel timeout is given up (closed
        once answered, its slot kept until then) and reported `NeverStarted`.
        """
        assert link.spare is not None
        # How many of the link's sessions had ended before the latest round
        # trip: unchanged at a refusal, none of ours explains it (`refused`).
        closes_before: Optional[int] = None
        holder = threading.get_ident()
        for tries in range(1, OPEN_TRIES + 1):
            if deadline is not None and time.monotonic() >= deadline:
                return None
            session = link.spare.take(deadline, holder)
            if session is not None:
                return session
            assert link.slots is not None
            with Claim(link.slots, holder) as claim:
                claim.taken = link.slots.acquire(blocking=False, holder=holder)
                if not claim.taken:
                    # A spare made since is ours to use, rather than to close
                    # while we wait for the slot it gives back.
                    session = link.spare.take(deadline, holder)
                    if session is not None:
                        return session
                    if not self._take_slot(link, deadline, claim):
                        return None
                link.slots.hold_back(deadline)
                try:
                    with translate(link.transport, started=False, what="opening a channel"):
                        session = SessionChannel(
                            link.transport, claim, link.sessions,
                            None if deadline is None else max(0.0, deadline - time.monotonic()),
                            deadline)
                except Overdue:
                    return None  # a key exchange held the open back: the command never ran
            try:
                opened = session.settle_open(deadline, holder)
                if opened:
                    return session
            except BaseException:  # an interrupt (Ctrl-C): nothing else would close it
                session.discard()
                raise
            if opened is None:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                raise NeverStarted(f"the server did not answer a channel open within "
                                   f"{link.transport.channel_timeout:g} s")  # type: ignore[attr-defined, unused-ignore]
            self._connection.refused(link, quiet=closes_before == link.sessions.closes)
            self._connection.counters.add(refused_opens=1)
            log.debug("channel refused, try %d of %d", tries, OPEN_TRIES)
            if tries <= QUICK_TRIES:
                continue
            remaining = 10.0 if deadline is None else max(0.0, deadline - time.monotonic())
            closes_before = link.sessions.closes
            if not link.pinger.round_trip(remaining):
                closes_before = None
            time.sleep(min(OPEN_BACKOFF.delay(tries - QUICK_TRIES - 1),
                           remaining if deadline is not None else OPEN_BACKOFF.maximum))
        raise ExecutorFailure(f"the server refused a session channel {OPEN_TRIES} times")

    # --- tunnels ----------------------------------------------------------------

    def forward_local(self, remote_port: int, remote_host: str = "localhost", *,
                      local_port: int = 0, local_host: str = "127.0.0.1") -> LocalTunnel:
        """Listen on ``local_host:local_port``; each client reaches ``remote_host:remote_port``.

        ``remote_host`` is resolved by the server (``localhost`` is the server
        itself). Listening starts now; ``tunnel.local_address`` is the
        ``(host, port)`` bound (``local_port=0`` picks a free port). Each client
        is a ``direct-tcpip`` channel on the executor's connection: no
        MaxSessions slot, at most ``max_forwarded`` open at once (more wait).
        A forward the server refuses closes that client's socket and logs a
        WARNING naming the target. The tunnel survives a lost connection: the
        clients of that moment are cut (reset), later ones go through the
        reconnected connection. Close it with ``tunnel.close()``, a ``with``
        block, or `close`. Raises `ExecutorFailure` if it cannot listen.
        """
        return self._forwarding.forward_local(remote_port, remote_host, local_port, local_host)

    def forward_remote(self, remote_port: int, local_port: int, *, local_host: str = "127.0.0.1",
                       remote_host: str = "localhost") -> RemoteTunnel:
        """Ask the server to listen on ``remote_host:remote_port``, forwarding to ``local_port``.

        Each connection to it reaches ``local_host:local_port`` from here.

        ``remote_port=0`` lets the server pick; ``tunnel.remote_address`` is
        the ``(host, port)`` it bound. Raises `ExecutorFailure` at once when
        the server refuses the port. While the tunnel is open the executor
        reconnects by itself after a lost connection and asks for the port
        again (the port the server picks may then differ, and
        ``remote_address`` follows); a refusal then is a WARNING, and the port
        is asked for again every few seconds, and after the next reconnect.
        """
        return self._forwarding.forward_remote(remote_port, local_port, local_host, remote_host)

    def open_connection(self, host: str, port: int, *,
                        timeout: Optional[float] = None) -> ForwardedSocket:
        """A socket-like connection to ``host:port`` as the server sees it (``direct-tcpip``).

        ``timeout`` bounds waiting for a place under ``max_forwarded``, for the
        connection (a reconnect included) and for the open, and is then the
        socket's timeout, as with ``socket.create_connection``. Raises
        `ForwardTimeout` (an `ExecutorFailure` and a ``TimeoutError``) past
        it, and `ExecutorFailure` when the server refuses (``AllowTcpForwarding
        no``, the target refused) or when the connection cannot be had.
        """
        return self._forwarding.open_connection(host, port, timeout)


#: A wrapper for `DupingSSHExecutor` on an ordinary key that runs the first line it
#: reads and nothing more: stdin the command leaves unread is never run as commands
#: (as it is with the default ``/bin/bash``).
SAFE_WRAPPER = "/bin/bash -c 'IFS= read -r line && exec /bin/bash -c \"$line\"'"


#: The longest line a terminal in its line mode passes to a reader (Linux: 4095
#: bytes and the newline); `DupingSSHExecutor` refuses longer command lines on a pty.
TERMINAL_LINE = 4095


class DupingSSHExecutor(SSHExecutor):
    """For keys that may run one fixed command only (``authorized_keys`` ``command=``).

    Every command runs ``wrapper`` on the server, fed ``f"{command}\\n{stdin_input}\\n"``
    (or ``f"{command}\\n"`` without stdin) on its standard input; the wrapper
    decides what to run. A wrapper that runs whatever it reads grants a full
    shell: restrict it to the commands you need. The wrapper must read its
    first line without reading ahead (bash does; dash, Debian's ``/bin/sh``,
    reads a pipe in blocks and leaves nothing for the command's own stdin).

    **With the default wrapper ``/bin/bash`` on an ordinary key, stdin that the
    command leaves unread runs as shell commands** (``cat > /missing/x`` fails,
    and bash then runs the data): the default stays for configurations written
    for the asyncio executor (and for command keys, where the server runs its
    own command and ``SSH_ORIGINAL_COMMAND`` is ``/bin/bash``); on an ordinary
    key pass ``wrapper=SAFE_WRAPPER``. A command of several lines is fed as
    it is, on the same input as ``stdin_input``: ``/bin/bash`` runs its lines
    one by one, and a line that reads stdin reads the lines after it first
    (``"cat\\necho done"`` prints ``echo done`` and the stdin); a wrapper
    that runs only its first line (``SAFE_WRAPPER``) leaves the others to
    that command's stdin. A command holding NUL is refused with
    `ValueError`, as `SSHExecutor` does.

    With ``pty=True`` the wrapper runs on the terminal too. A wrapper that is
    not interactive (``SAFE_WRAPPER``, a script reading a line) works as on
    `SSHExecutor`; an interactive shell (the default ``/bin/bash`` on a
    terminal) echoes and prompts, and its line editing turns the terminal's
    end-of-file sent ahead of it into a NUL, so such a call ends only at its
    ``timeout``: give one. A terminal passes at most `TERMINAL_LINE` bytes of
    a line: a longer command line is refused with `ValueError` there.
    """

    def __init__(self, *, wrapper: str = "/bin/bash", **arguments: Any) -> None:
        if not isinstance(wrapper, str) or not wrapper:
            raise TypeError("wrapper must be a non-empty string")
        self._wrapper = wrapper
        super().__init__(**arguments)
        self._arguments["wrapper"] = wrapper

    def _spec(self, command: str, stdin_input: StdinInput, options: RunOptions) -> CommandSpec:
        """The wrapper, fed the command as its first line and then ``stdin_input``."""
        if "\0" in command:
            raise ValueError("command must not hold NUL: no shell can run it")
        if options.pty and any(len(line.encode("utf-8")) > TERMINAL_LINE
                               for line in command.split("\n")):
            # The wrapper reads it from the terminal, whose line discipline passes
            # the start of a longer line only: a cut command would run.
            raise ValueError(f"with pty=True, command must not have a line over "
                             f"{TERMINAL_LINE} bytes: a terminal passes no more of a line")
        wrapper = self._wrapper.encode("utf-8")
        _check_request_texts(wrapper, options)  # the command itself goes as stdin
        payload = command.encode("utf-8") + b"\n"
        data = stdin_bytes(stdin_input)
        given = (len(payload), len(data))  # bytes_sent counts the caller's stdin only
        if data:
            payload += data + b"\n"
        return CommandSpec(wrapper, payload, options, given)
