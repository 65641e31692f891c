"""Host-key verification against OpenSSH ``known_hosts`` files.

:class:`HostKeyPolicy` orders the host-key algorithms before the key exchange (so that a server
with several host keys presents the one we know) and checks the server's key after it, raising
:class:`~paramiko_executor.results.HostKeyFailure` for an unknown, changed or revoked key.
Files are read on every check, so edits to ``known_hosts`` take effect on the next connection.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import paramiko
from paramiko.hostkeys import HostKeyEntry, HostKeys
from paramiko.ssh_exception import SSHException

from .results import HostKeyFailure

try:
    import fcntl
except ImportError:  # Windows: the in-process lock below still serialises our own threads
    fcntl = None  # type: ignore[assignment]

__all__ = ["HostKeyPolicy", "fingerprint", "known_hosts_name"]

log = logging.getLogger("paramiko_executor.hostkeys")

# Serialises accept-new appends between threads of this process; flock does it between processes.
_append_lock = threading.Lock()

# known_hosts names an RSA key "ssh-rsa"; the transport negotiates it as one of these.
_RSA_ALGORITHMS = ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")


def fingerprint(key: paramiko.PKey) -> str:
    """The OpenSSH-style ``SHA256:...`` fingerprint of a (public) key."""
    return key.fingerprint


def known_hosts_name(hostname: str, port: int) -> str:
    """The name a host is filed under in known_hosts: ``host`` for port 22, else ``[host]:port``."""
    hostname = hostname.lower()  # OpenSSH compares host names case-insensitively
    return hostname if port == 22 else f"[{hostname}]:{port}"


@dataclass(frozen=True)
class _Entry:
    marker: Optional[str]  # None, "@revoked" or "@cert-authority"
    names: Tuple[str, ...]
    key: paramiko.PKey
    where: str  # "path:line"


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):  # hashed entry (HashKnownHosts yes)
        return HostKeys.hash_host(name, pattern) == pattern
    # OpenSSH patterns know only "*" and "?"; "[" is literal ("[host]:port"), unlike fnmatch.
    regex = re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, name) is not None


def _names_match(patterns: Sequence[str], name: str) -> bool:
    """OpenSSH pattern-list rules: a matching negated pattern ("!pat") vetoes the whole line."""
    matched = False
    for pattern in patterns:
        if pattern.startswith("!"):
            if _name_matches(pattern[1:], name):
                return False
        elif _name_matches(pattern, name):
            matched = True
    return matched


def _read_entries(path: str) -> List[_Entry]:
    """Parse one known_hosts file. A missing file has no entries; unparsable lines are skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise HostKeyFailure(f"cannot read known_hosts file {path}: {e.strerror}") from None
    entries = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        marker = None
        if line.startswith("@"):
            marker, _, line = line.partition(" ")
            line = line.strip()
        try:
            entry = HostKeyEntry.from_line(line, lineno)
        except (SSHException, ValueError):
            entry = None
        if entry is None:  # bad line or key type paramiko does not know: not ours to judge
            continue
        entries.append(_Entry(marker, tuple(entry.hostnames), entry.key, f"{path}:{lineno}"))
    return entries


class HostKeyPolicy:
    """Checks server host keys against known_hosts files, the way OpenSSH does.

    ``known_hosts``: the files to trust (``~`` expanded; a single path may be a string), or
    None to turn verification off (the explicit opt-out; nothing is checked or recorded).
    Missing files hold no keys. A host is looked up as ``hostname`` on port 22 and as
    ``[hostname]:port`` otherwise; hashed entries, patterns and the ``@revoked`` marker are
    understood (``@cert-authority`` lines are ignored: paramiko has no host certificates).

    ``accept_new=True`` (OpenSSH's ``StrictHostKeyChecking accept-new``) records the key of a
    host that has no known key in the first file (created with its directory, owner-only
    permissions) and accepts it; a changed key is still refused. With an empty list of files
    there is nowhere to record: a new key is accepted each time (like a ``/dev/null`` file).
    """

    def __init__(
        self, known_hosts: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], None],
        accept_new: bool = False,
    ) -> None:
        if known_hosts is None:
            self.files: Optional[Tuple[str, ...]] = None
        else:
            paths = [known_hosts] if isinstance(known_hosts, (str, os.PathLike)) else known_hosts
            if isinstance(paths, bytes) or not isinstance(paths, Sequence):
                raise TypeError(
                    "known_hosts must be a path, a list of paths or None, "
                    f"not {type(known_hosts).__name__}"
                )
            files = []
            for path in paths:
                if not isinstance(path, (str, os.PathLike)):
                    raise TypeError(f"known_hosts entries must be paths, not {type(path).__name__}")
                if not os.fspath(path):
                    raise ValueError("known_hosts paths must not be empty")
                files.append(os.path.expanduser(os.fspath(path)))
            self.files = tuple(files)
        if not isinstance(accept_new, bool):
            raise TypeError(f"accept_new must be a bool, not {type(accept_new).__name__}")
        self.accept_new = accept_new

    def __repr__(self) -> str:
        return f"HostKeyPolicy(known_hosts={self.files!r}, accept_new={self.accept_new!r})"

    def _entries(self) -> List[_Entry]:
        return [entry for path in self.files or () for entry in _read_entries(path)]

    @staticmethod
    def _for_host(entries: Sequence[_Entry], name: str) -> Tuple[List[_Entry], List[_Entry]]:
        """The (trusted, revoked) entries that apply to ``name``."""
        trusted, revoked = [], []
        for entry in entries:
            if not _names_match(entry.names, name):
                continue
            if entry.marker is None:
                trusted.append(entry)
            elif entry.marker == "@revoked":
                revoked.append(entry)
        return trusted, revoked

    def prepare(self, transport: paramiko.Transport, hostname: str, port: int) -> None:
        """Before ``start_client``: prefer the host-key algorithms known for this host.

        Like ``SSHClient.connect``, so that a server with several host keys presents a known
        one; the transport's own order is kept otherwise. Does nothing when verification is off.
        """
        if self.files is None:
            return
        trusted, _revoked = self._for_host(self._entries(), known_hosts_name(hostname, port))
        known = set()
        for entry in trusted:
            name = entry.key.get_name()
            known.update(_RSA_ALGORITHMS if name == "ssh-rsa" else (name,))
        if not known:
            return
        options = transport.get_security_options()
        current = list(options.key_types)
        first = [algorithm for algorithm in current if algorithm in known]
        options.key_types = first + [algorithm for algorithm in current if algorithm not in known]

    def verify(self, transport: paramiko.Transport, hostname: str, port: int) -> None:
        """After ``start_client``: accept the server's key or raise ``HostKeyFailure``.

        The error names the host (as filed in known_hosts), the server key's type and SHA256
        fingerprint and, for a changed key, where the expected key is; never private material.
        """
        if self.files is None:
            return
        key = transport.get_remote_server_key()
        name = known_hosts_name(hostname, port)
        trusted, revoked = self._for_host(self._entries(), name)
        if self._check(key, name, trusted, revoked):
            return
        if not self.accept_new:
            raise HostKeyFailure(
                f"Host key for {name} is unknown ({key.get_name()} {fingerprint(key)}); "
                f"not in {', '.join(self.files) or 'any known_hosts file'}"
            )
        self._record(key, name)

    @staticmethod
    def _check(
        key: paramiko.PKey, name: str, trusted: Sequence[_Entry], revoked: Sequence[_Entry]
    ) -> bool:
        """True if ``key`` is known for ``name``; False if the host has no known key at all."""
        offered = f"{key.get_name()} {fingerprint(key)}"
        blob = key.asbytes()
        for entry in revoked:
            if entry.key.asbytes() == blob:
                raise HostKeyFailure(f"Host key for {name} is revoked ({offered}; {entry.where})")
        if any(entry.key.asbytes() == blob for entry in trusted):
            log.debug("host key for %s is known (%s)", name, offered)
            return True
        if not trusted:
            return False
        expected = "; ".join(
            f"{e.key.get_name()} {fingerprint(e.key)} at {e.where}" for e in trusted
        )
        # A known host presenting a key of another type is refused too (as paramiko does):
        # prepare() asked for the known type first, so a genuine server would have used it.
        raise HostKeyFailure(
            f"Host key for {name} does not match (server sent {offered}; expected {expected})"
        )

    def _record(self, key: paramiko.PKey, name: str) -> None:
        """accept-new: append ``name key`` to the first file, unless a racer recorded one first."""
        if not self.files:
            log.warning("Accepted new host key for %s (%s %s); no known_hosts file to record it",
                        name, key.get_name(), fingerprint(key))
            return
        path = self.files[0]
        try:
            written = self._append(path, key, name)
        except OSError as e:
            raise HostKeyFailure(
                f"Host key for {name} is unknown ({key.get_name()} {fingerprint(key)}) and "
                f"cannot be recorded in {path}: {e.strerror or e}"
            ) from None
        if written:
            log.warning(
                "Permanently added %s (%s %s) to %s", name, key.get_name(), fingerprint(key), path
            )

    def _append(self, path: str, key: paramiko.PKey, name: str) -> bool:
        """Append the entry under an exclusive lock; False if a racer recorded this key first."""
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        line = HostKeyEntry([name], key).to_line()
        with _append_lock:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "r+b") as f:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
                # Another thread or process may have recorded this host since we looked.
                trusted, revoked = self._for_host(_read_entries(path), name)
                if self._check(key, name, trusted, revoked):
                    return False
                content = f.read()
                prefix = "\n" if content and not content.endswith(b"\n") else ""
                f.write((prefix + line).encode())
        return True
