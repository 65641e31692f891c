"""Host-key verification against OpenSSH ``known_hosts`` files.

:class:`HostKeyPolicy` orders the host-key algorithms before the key exchange (so that a server
with several host keys presents the one we know) and checks the server's key after it, raising
:class:`~paramiko_executor.results.HostKeyFailure` for an unknown, changed or revoked key.
Files are read on every check, so edits to ``known_hosts`` take effect on the next connection.

It trusts no more than OpenSSH would: the user's files and the system-wide ones
(``GlobalKnownHostsFile``) are both consulted, for trust and for ``@revoked`` lines, and a
``RevokedHostKeys`` file revokes keys for every host. Lines are split on any whitespace, as
OpenSSH splits them; a malformed line is skipped (logged at DEBUG with its file and line).
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import paramiko
from paramiko.hostkeys import HostKeys

from .hostnames import match_pattern_list
from .results import HostKeyFailure
from .totp import lock_within, make_private_directories

try:
    import fcntl
except ImportError:  # Windows: the in-process lock below still serialises our own threads
    fcntl = None  # type: ignore[assignment]

__all__ = ["DEFAULT_GLOBAL_KNOWN_HOSTS", "HostKeyPolicy", "fingerprint", "known_hosts_name"]

log = logging.getLogger("paramiko_executor.hostkeys")

# Serialises accept-new appends between threads of this process; flock does it between processes.
_append_lock = threading.Lock()

#: Seconds an accept-new append waits for another process's lock on the file; one held
#: longer belongs to a stopped or hung process, and the connect fails instead of hanging
#: (and every fork of this process with it: a fork waits for an append in progress).
APPEND_LOCK_TIMEOUT = 10.0
_APPEND_LOCK_POLL = 0.01

if hasattr(os, "register_at_fork"):
    # A fork waits for an append in progress: a child would inherit its descriptor, and
    # with it the flock, and hold up every other process's append while it lives.
    os.register_at_fork(before=_append_lock.acquire, after_in_parent=_append_lock.release,
                        after_in_child=_append_lock.release)

# known_hosts names an RSA key "ssh-rsa"; the transport negotiates it as one of these.
_RSA_ALGORITHMS = ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")

#: OpenSSH's default ``GlobalKnownHostsFile``: the system-wide known hosts an administrator keeps.
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")

#: The markers OpenSSH knows; a line with any other is malformed.
_MARKERS = ("@revoked", "@cert-authority")

#: The first bytes of an OpenSSH key revocation list (binary ``RevokedHostKeys`` format).
_KRL_MAGIC = b"SSHKRL\n\0"


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
    names: str  # the names field: a pattern list, or one hashed name
    key: paramiko.PKey
    where: str  # "path:line"


def _hashed_name_matches(hashed: str, name: str) -> bool:
    """``|1|salt|hmac`` (HashKnownHosts yes): the HMAC-SHA1 of ``name`` keyed by the salt."""
    parts = hashed.split("|")
    if len(parts) != 4:
        return False
    try:
        salt = base64.b64decode(parts[2], validate=True)
        expected = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return False  # a damaged hash matches nothing, as in OpenSSH
    digest = hmac.new(salt, name.encode("utf-8"), hashlib.sha1).digest()
    return hmac.compare_digest(digest, expected)


def _names_match(names: str, name: str) -> bool:
    """Whether the names field of a line covers ``name`` (already lower-cased).

    As in OpenSSH: a field starting with ``|`` is one hashed name as a whole (so
    ``|1|salt|hash,other`` matches nothing, its hash does not decode); any other is a
    pattern list, compared case-insensitively, where a matching ``!pattern`` vetoes it.
    """
    if names.startswith("|"):
        return names.startswith("|1|") and _hashed_name_matches(names, name)
    return match_pattern_list(name, names, lower=True) == 1


def _read(path: str) -> Optional[bytes]:
    """A known_hosts file's bytes; None if it does not exist. Unreadable: ``HostKeyFailure``."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HostKeyFailure(f"cannot read known_hosts file {path}: {e.strerror}") from None


def _split_lines(data: bytes) -> List[str]:
    r"""A file's lines, decoded as UTF-8 (errors replaced).

    Split at ``\n`` alone, as OpenSSH reads them (one ``\r`` before it dropped): Python's
    other line breaks (``\r``, ``\x0b``, ``\x1c``, ``\x85``, ``\u2028``...) inside a comment
    would turn the comment's text into a line of its own, trusting a key for a host that
    ``ssh-keygen -F`` does not find.
    """
    lines = data.decode("utf-8", "replace").split("\n")
    if not lines[-1]:
        lines.pop()  # what follows the last line break is no line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _public_key(key_type: str, data: str) -> paramiko.PKey:
    """A public key from its known_hosts fields; raises for anything malformed or unknown."""
    # OpenSSH's base64 decoder skips the C locale's white space inside the key.
    data = data.translate(_BASE64_SPACE)
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(data, validate=True))


_BASE64_SPACE = str.maketrans("", "", " \t\n\v\f\r")


_FIELD_SEPARATOR = re.compile(r"[ \t]+")
_MARKER = re.compile(r"[ \t]*@[^ \t\0]*[ \t]+")
_NAMES_END = re.compile(r"[ \t\0]")


def _as_c_string(raw: str) -> str:
    """``raw`` as OpenSSH's C code reads it: a NUL ends the line, but for one that ends the
    names field, which is stepped over as a separator is.

    Read as Python does, ``name,\0x ssh-ed25519 KEY`` trusted the key for ``name``; ssh
    reads the names ``name,`` and a key of type ``x``.
    """
    if "\0" not in raw:
        return raw
    marker = _MARKER.match(raw)
    start = marker.end() if marker else len(raw) - len(raw.lstrip(" \t"))
    end = start + len(_NAMES_END.split(raw[start:], maxsplit=1)[0])
    if end == start or (marker is None and raw.startswith("@", start)):
        return ""  # no names before the NUL: the line matches no host
    if raw[end:end + 1] != "\0":
        return raw.split("\0", 1)[0]
    return raw[:end] + " " + raw[end + 1:].split("\0", 1)[0]


def _parse_line(raw: str, where: str) -> Optional[_Entry]:
    """One known_hosts line as an entry; None for a blank, comment or malformed line.

    Fields and the marker are separated by any run of spaces or tabs, as in OpenSSH (a tab
    after ``@revoked`` must not turn a revocation into nothing), and by nothing else.
    """
    fields = _FIELD_SEPARATOR.split(_as_c_string(raw).strip(" \t"))
    if not fields[0] or fields[0].startswith("#"):
        return None
    marker = None
    if fields[0].startswith("@"):
        marker, fields = fields[0], fields[1:]
        if marker not in _MARKERS:
            log.debug("%s: unknown marker %s; line skipped", where, marker)
            return None
    if len(fields) < 3:
        log.debug("%s: not a known_hosts line (too few fields); skipped", where)
        return None
    try:
        key = _public_key(fields[1], fields[2])
    except Exception as e:  # noqa: BLE001 - paramiko's key parsers raise many types
        # OpenSSH skips a line it cannot parse; one bad line must not refuse every host.
        log.debug("%s: unusable %s key (%s); line skipped", where, fields[1], type(e).__name__)
        return None
    return _Entry(marker, fields[0], key, where)


# A file's version: the SHA-256 of its bytes. A stat stamp (inode, size, mtime, ctime) is no
# version: a rewrite within the file system's time granularity (whole seconds on some) or
# through a shared map keeps it, and a stale file would go on trusting a removed key.
_Version = bytes
# Parsed known_hosts files by path, each with the version it was parsed from: every connect
# reads the files twice (prepare, verify), and a HostGroup's hosts mostly share one file.
_parsed: Dict[str, Tuple[_Version, Tuple[_Entry, ...]]] = {}
_PARSED_MAX = 64
# What _Lookup found for one host name in files of given versions (a missing file: None):
# verify() asks what prepare() asked on the same connect, and every line of every file
# is matched against the name (an HMAC per hashed line) to answer.
_Files = Tuple[Tuple[str, Optional[_Version]], ...]
_looked_up: Dict[Tuple[_Files, str], _Lookup] = {}
_LOOKED_UP_MAX = 4096
# Guards _parsed and _looked_up.
_parsed_lock = threading.Lock()


def _new_parsed_lock() -> None:
    # A thread of the parent may have held it at the fork (taking it before the fork
    # instead could deadlock against an append, which reads under _append_lock).
    global _parsed_lock
    _parsed_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_parsed_lock)


def _read_entries(path: str) -> Tuple[_Entry, ...]:
    """Parse one known_hosts file (see `_parsed_file`)."""
    return _parsed_file(path)[1]


def _parsed_file(path: str) -> Tuple[Optional[_Version], Tuple[_Entry, ...]]:
    """Parse one known_hosts file: its version (None: missing) and entries.

    A missing file has no entries; malformed lines are skipped. A file whose bytes are
    those of the last parse is not parsed again: its entries are shared (immutable).
    """
    data = _read(path)
    if data is None:
        return None, ()
    version = hashlib.sha256(data).digest()
    with _parsed_lock:
        cached = _parsed.get(path)
    if cached is not None and cached[0] == version:
        return cached
    entries = []
    for lineno, raw in enumerate(_split_lines(data), 1):
        entry = _parse_line(raw, f"{path}:{lineno}")
        if entry is not None:
            entries.append(entry)
    parsed = (version, tuple(entries))
    with _parsed_lock:
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()
        _parsed[path] = parsed
    return parsed


@dataclass(frozen=True)
class _Lookup:
    """The entries of a policy's files that trust or revoke keys of one name."""

    trusted: Tuple[_Entry, ...]
    revoked: Tuple[_Entry, ...]


class _Reader:
    """Reads the SSH wire encoding (RFC 4251) of a KRL; ``ValueError`` when it is truncated."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, count: int) -> bytes:
        if count > len(self.data) - self.at:
            raise ValueError("truncated")
        self.at += count
        return self.data[self.at - count:self.at]

    def uint32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.uint32())

    def done(self) -> bool:
        return self.at == len(self.data)


def _krl_revokes(data: bytes, blob: bytes) -> bool:
    """Whether an OpenSSH key revocation list (PROTOCOL.krl) revokes the plain key ``blob``.

    Explicit keys and SHA1/SHA256 fingerprints are checked; certificate sections do not apply
    to plain keys and signatures are not verified (nor does OpenSSH verify them here). A
    malformed list, another format version or an unknown (or critical extension) section is a
    ``ValueError``: OpenSSH refuses to connect then too.
    """
    krl = _Reader(data)
    krl.take(len(_KRL_MAGIC))
    if krl.uint32() != 1:
        raise ValueError("unsupported KRL format version")
    krl.take(8 * 3)  # krl_version, generated_date, flags
    krl.string()  # reserved
    krl.string()  # comment
    sha1, sha256 = hashlib.sha1(blob).digest(), hashlib.sha256(blob).digest()
    revoked = False
    while not krl.done():
        section, body = krl.take(1)[0], _Reader(krl.string())
        if section in (2, 3, 5):  # explicit keys, SHA1 and SHA256 fingerprints
            wanted = {2: blob, 3: sha1, 5: sha256}[section]
            while not body.done():
                revoked = body.string() == wanted or revoked
        elif section == 255:  # extension: name, critical flag, data
            name, critical = body.string(), body.take(1)[0]
            if critical:
                raise ValueError(f"critical KRL extension {name!r}")
        elif section not in (1, 4):  # certificates, signature
            raise ValueError(f"unknown KRL section {section}")
    return revoked


def _revoked(name: str, key: paramiko.PKey, where: str) -> HostKeyFailure:
    """The failure for a revoked ``key`` of host ``name``, revoked at ``where``."""
    return HostKeyFailure(
        f"Host key for {name} is revoked ({key.get_name()} {fingerprint(key)}; {where})"
    )


def _revoked_by_file(path: str, key: paramiko.PKey) -> Optional[str]:
    """Where a ``RevokedHostKeys`` file revokes ``key`` (``path:line`` or ``path``), else None.

    The file is a binary KRL (``ssh-keygen -k``) or lists public keys one per line
    (``type base64 [comment]``; malformed lines skipped). Like OpenSSH, a file that cannot be
    read (or is missing) or a malformed KRL refuses every key: a revocation list that silently
    counted as empty would let a revoked key through.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise HostKeyFailure(f"cannot read RevokedHostKeys file {path}: {e.strerror}") from None
    blob = key.asbytes()
    if data.startswith(_KRL_MAGIC):
        try:
            return path if _krl_revokes(data, blob) else None
        except ValueError as e:
            raise HostKeyFailure(f"RevokedHostKeys file {path} is not a valid KRL ({e})") \
                from None
    for lineno, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            listed = _public_key(fields[0], fields[1] if len(fields) > 1 else "")
        except Exception as e:  # noqa: BLE001 - as in _parse_line
            log.debug("%s: unusable key (%s); line skipped", where, type(e).__name__)
            continue
        if listed.asbytes() == blob:
            return where
    return None


Paths = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]


def _check_paths(name: str, value: Paths) -> Tuple[str, ...]:
    """One path or a sequence of paths, each ``~``-expanded; ``TypeError`` naming ``name``."""
    paths = [value] if isinstance(value, (str, os.PathLike)) else value
    if isinstance(paths, bytes) or not isinstance(paths, Sequence):
        raise TypeError(
            f"{name} must be a path, a list of paths or None, not {type(value).__name__}"
        )
    files = []
    for path in paths:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{name} entries must be paths, not {type(path).__name__}")
        if not os.fspath(path):
            raise ValueError(f"{name} paths must not be empty")
        files.append(os.path.expanduser(os.fspath(path)))
    return tuple(files)


class HostKeyPolicy:
    """Checks server host keys against known_hosts files, the way OpenSSH does.

    ``known_hosts``: the user's files to trust (``~`` expanded; a single path may be a string),
    or None to turn verification off (the explicit opt-out; nothing is checked or recorded).
    ``global_known_hosts``: the system-wide files (OpenSSH's ``GlobalKnownHostsFile``), read
    the same way but never written. Missing files hold no keys. A host is looked up as
    ``hostname`` on port 22 and as ``[hostname]:port`` otherwise, or as ``host_key_alias``
    (OpenSSH's ``HostKeyAlias``) when given; both lower-cased, as OpenSSH does. Hashed
    entries, patterns (``*``, ``?``, ``!negation``) and the ``@revoked`` marker are
    understood in every file (a revoked key is refused even if another line trusts it);
    ``@cert-authority`` lines are ignored (paramiko has no host certificates).
    ``revoked_host_keys`` (OpenSSH's ``RevokedHostKeys``) names a file of public keys, or a
    binary KRL, refused for every host; if it cannot be read, every key is refused.

    ``accept_new=True`` (OpenSSH's ``StrictHostKeyChecking accept-new``) records the key of a
    host that has no known key in any file (user or global) in the first user file (created
    with its directory, owner-only permissions; the name hashed when ``hash_known_hosts``) and
    accepts it; a changed key is still refused. With an empty list of user files there is
    nowhere to record: a new key is accepted each time (like a ``/dev/null`` file).

    ``strict=False`` (OpenSSH's ``StrictHostKeyChecking no``) accepts unknown and changed keys
    (a changed one with a warning in the log; an unknown one is recorded as by
    ``accept_new``, or only logged if it cannot be), but still refuses revoked keys.
    ssh refuses a key of ``RevokedHostKeys`` whatever ``StrictHostKeyChecking`` says, but
    connects to one marked ``@revoked`` under ``no`` (with password authentication
    disabled); the library refuses both: a revoked key is a stolen one.
    """

    def __init__(
        self,
        known_hosts: Optional[Paths],
        accept_new: bool = False,
        *,
        global_known_hosts: Paths = (),
        revoked_host_keys: Union[str, os.PathLike[str], None] = None,
        hash_known_hosts: bool = False,
        host_key_alias: Optional[str] = None,
        strict: bool = True,
    ) -> None:
        self.files: Optional[Tuple[str, ...]] = (
            None if known_hosts is None else _check_paths("known_hosts", known_hosts)
        )
        self.global_files = _check_paths("global_known_hosts", global_known_hosts)
        if revoked_host_keys is not None:
            (revoked_host_keys,) = _check_paths("revoked_host_keys", [revoked_host_keys])
        self.revoked_file: Optional[str] = revoked_host_keys
        for name, value in (("accept_new", accept_new), ("hash_known_hosts", hash_known_hosts),
                            ("strict", strict)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
        if accept_new and not strict:
            raise ValueError("accept_new=True and strict=False exclude each other")
        if host_key_alias is not None and (not isinstance(host_key_alias, str)
                                           or not host_key_alias):
            raise TypeError("host_key_alias must be a non-empty str or None")
        self.accept_new = accept_new
        self.strict = strict
        self.hash_known_hosts = hash_known_hosts
        # OpenSSH lower-cases the alias as it lower-cases host names: known_hosts is matched
        # case-insensitively, and an alias kept as written would never find its own line.
        self.host_key_alias = None if host_key_alias is None else host_key_alias.lower()

    def __repr__(self) -> str:
        extra = "" if self.strict else ", strict=False"
        if self.global_files:
            extra += f", global_known_hosts={self.global_files!r}"
        if self.revoked_file is not None:
            extra += f", revoked_host_keys={self.revoked_file!r}"
        if self.hash_known_hosts:
            extra += ", hash_known_hosts=True"
        if self.host_key_alias is not None:
            extra += f", host_key_alias={self.host_key_alias!r}"
        return f"HostKeyPolicy(known_hosts={self.files!r}, accept_new={self.accept_new!r}{extra})"

    def name_for(self, hostname: str, port: int) -> str:
        """The name the host is filed under: ``host_key_alias`` if set (no port), lower-cased."""
        if self.host_key_alias is not None:
            return self.host_key_alias
        return known_hosts_name(hostname, port)

    def _lookup(self, name: str) -> _Lookup:
        """The entries of all files for ``name``; the same files' last answer for it.

        The files are read each time (a read and a hash cost little beside the
        matching), and the answer is kept under the versions it was found in.
        """
        paths = (self.files or ()) + self.global_files
        read = [_parsed_file(path) for path in paths]
        files = tuple((path, version) for path, (version, _) in zip(paths, read))
        with _parsed_lock:
            found = _looked_up.get((files, name))
        if found is not None:
            return found
        trusted, revoked = self._for_host([e for _, entries in read for e in entries], name)
        found = _Lookup(tuple(trusted), tuple(revoked))
        with _parsed_lock:
            if len(_looked_up) >= _LOOKED_UP_MAX:
                _looked_up.clear()
            _looked_up[(files, name)] = found
        return found

    def _all_files(self) -> str:
        return ", ".join((self.files or ()) + self.global_files) or "any known_hosts file"

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
        known: Set[str] = set()
        for entry in self._lookup(self.name_for(hostname, port)).trusted:
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
        name = self.name_for(hostname, port)
        found = self._lookup(name)
        trusted, revoked = found.trusted, found.revoked
        if self.revoked_file is not None:
            where = _revoked_by_file(self.revoked_file, key)
            if where is not None:
                raise _revoked(name, key, f"RevokedHostKeys {where}")
        self._refuse_revoked(key, name, revoked)
        if self._known_without_port(key, hostname, port, trusted):
            return
        if not self.strict:
            try:
                known = self._check(key, name, trusted, ())
            except HostKeyFailure as changed:
                log.warning("%s; accepted anyway (StrictHostKeyChecking no)", changed)
                return
            if not known:
                # ssh records a new key under "no" too; one it cannot record it just uses.
                try:
                    self._record(key, name)
                except HostKeyFailure as failure:
                    log.warning("%s; accepted anyway (StrictHostKeyChecking no)", failure)
            return
        if self._check(key, name, trusted, revoked):
            return
        if not self.accept_new:
            raise HostKeyFailure(
                f"Host key for {name} is unknown ({key.get_name()} {fingerprint(key)}); "
                f"not in {self._all_files()}"
            )
        self._record(key, name)

    def _known_without_port(
        self, key: paramiko.PKey, hostname: str, port: int, trusted: Sequence[_Entry],
    ) -> bool:
        """ssh's second look for a host with no key of this type as ``[host]:port``.

        A key filed for the bare name ``host`` (and not revoked there) vouches for every
        port of it, as in ssh, unless ``host_key_alias`` names the host or ``trusted`` (the
        entries for ``[host]:port``) has a key of the same type. Nothing is recorded.
        """
        if self.host_key_alias is not None or port == 22:
            return False
        if any(entry.key.get_name() == key.get_name() for entry in trusted):
            return False
        bare = known_hosts_name(hostname, 22)
        bare_found = self._lookup(bare)
        trusted, revoked = bare_found.trusted, bare_found.revoked
        blob = key.asbytes()
        if any(entry.key.asbytes() == blob for entry in revoked):
            return False
        found = [entry.where for entry in trusted if entry.key.asbytes() == blob]
        if found:
            log.debug("host key for %s is known as %s's (%s)", self.name_for(hostname, port),
                      bare, found[0])
        return bool(found)

    @staticmethod
    def _refuse_revoked(key: paramiko.PKey, name: str, revoked: Sequence[_Entry]) -> None:
        """Raise ``HostKeyFailure`` if one of the ``revoked`` entries is ``key``."""
        blob = key.asbytes()
        for entry in revoked:
            if entry.key.asbytes() == blob:
                raise _revoked(name, key, entry.where)

    @classmethod
    def _check(
        cls, key: paramiko.PKey, name: str, trusted: Sequence[_Entry], revoked: Sequence[_Entry]
    ) -> bool:
        """True if ``key`` is known for ``name``; False if the host has no known key at all."""
        cls._refuse_revoked(key, name, revoked)
        offered = f"{key.get_name()} {fingerprint(key)}"
        blob = key.asbytes()
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
            # Each missing parent owner-only too: under umask 0, os.makedirs left them
            # writable by everyone, who could swap in a known_hosts of their own.
            make_private_directories(directory)
        # Hashed like ssh-keygen -H: the file then does not list the hosts one can reach.
        filed = HostKeys.hash_host(name) if self.hash_known_hosts else name
        line = f"{filed} {key.get_name()} {key.get_base64()}\n"
        with _append_lock:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "r+b") as f:
                if fcntl is not None:
                    _lock_file(f.fileno())  # released when the file is closed
                # Another thread or process may have recorded this host since we looked.
                trusted, revoked = self._for_host(_read_entries(path), name)
                if self._check(key, name, trusted, revoked):
                    return False
                content = f.read()
                prefix = "\n" if content and not content.endswith(b"\n") else ""
                f.write((prefix + line).encode())
        return True


def _lock_file(fd: int) -> None:
    """An exclusive ``flock`` on ``fd``, waiting at most `APPEND_LOCK_TIMEOUT`; else OSError."""
    if not lock_within(fd, APPEND_LOCK_TIMEOUT, _APPEND_LOCK_POLL):
        raise OSError(errno.EWOULDBLOCK, f"another process held its lock for "
                      f"{APPEND_LOCK_TIMEOUT:g} s")
