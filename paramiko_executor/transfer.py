"""File transfer: SFTP over one session channel of the shared connection, and its local twin.

`upload` and `download` speak SFTP version 3 (what OpenSSH serves) themselves
on a session channel the caller opened on its transport: they start the
``sftp`` subsystem on it, move the file with many requests in flight, and
close the channel on every path. `local_put` and `local_get` keep the same
contract on the local file system (``ShellExecutor``).

Atomicity: an upload writes a temporary file next to its target and renames
it over the target (``posix-rename@openssh.com``) after the last byte; a
download to a path writes a temporary file in the target's directory and
``os.replace``-s it. A reader never sees a partial file under the final
name, and a failed transfer removes its temporary file (remotely: if the
SFTP session still works).

Speed: paramiko's ``SFTPClient`` pays a round trip or a thread wake-up per
32 KiB. Here one thread keeps up to `IN_FLIGHT` bytes of requests of the
server's largest block size (``limits@openssh.com``; 255 KiB on OpenSSH)
outstanding, and paramiko's transport thread wakes it only when a whole SFTP
reply has arrived, not per 32 KiB channel packet. What remains is paramiko's
own cost per SSH packet (sshd takes at most 32 KiB of session data per
packet): an upload costs about what ``Channel.sendall`` of the same bytes does.

Permissions, as OpenSSH's ``sftp`` leaves them: a new file gets ``mode`` if
given (exactly), else the source's permission bits (the local file's, 0o644
for a file object; a download: the remote file's) less what the receiving
side's umask (or a directory's default ACL) takes off a new file: sftp
creates it with those bits (an upload learns what the server takes off from
an empty probe file, see `_Session.stat_and_create`); a file that is
replaced keeps its own bits unless ``mode`` is given (another
user's file, or a symbolic link, only those a new file would get too; not
set-user-ID when not written by root: see `_rewritten`); the user's own
file keeps its group too when the user may give it. The
temporary file is created exclusively (``O_EXCL``, a fresh name each time)
with owner-only bits and gets its final bits just before the rename: at no
moment can more people read the data than can read the final file.

Errors: a missing remote file or directory raises `FileNotFoundError`, a
refused one `PermissionError`, a directory where a file belongs
`IsADirectoryError` (all naming the remote path), other SFTP
failures `ExecutorFailure`; a server's own text in them went through
`text.printable`. Anything malformed the server sends (short or overlong
packets, lengths past their packet, replies to requests never sent) is an
`ExecutorFailure` saying "SFTP protocol error". A server that does not start
SFTP (subsystem refused, or a command-restricted key whose forced command
runs instead) raises `SFTPNotStarted` (an `ExecutorFailure`) within
`NEGOTIATION_TIMEOUT`. Past
``deadline`` (a `time.monotonic` value) `TimeoutError` is raised. A broken
connection surfaces as paramiko raised it (`EOFError`, `OSError`,
`paramiko.SSHException`), or as `EOFError` when the channel was closed by the
connection's end; a session the server ended on a live connection is an
`ExecutorFailure`.

The caller's code and local I/O (opening, reading or writing a local file or
file object, ``progress``) run inside `errors.callers_code`: what they raise
comes out as a `CallerError` carrying it, which no handler of connection
failures can take for one; `callers_own` gives the caller its own
exception back. A file object serves every attempt from the position it had
at the start (`Local`); one that cannot seek (a pipe) serves one attempt once
bytes went through it, and a later attempt is an `ExecutorFailure`.

paramiko's internals, all through `internals` (which lists and checks them):
the subsystem is asked for and awaited with a time limit
(``Channel.invoke_subsystem`` waits without one); the channel's receive
buffers are replaced by `_Inbox` es before the subsystem starts (paramiko's
``BufferedPipe`` wakes the reader per packet and offers no way to wait for
"this many bytes", nor one wait for stdout *or* stderr; paramiko calls
``feed``, ``read``, ``read_ready``, ``set_event``, ``close``, ``empty`` and
``len()`` on them, and `_Inbox` gives each BufferedPipe's meaning, so
``Channel.recv`` keeps its window accounting); the send-window condition is
replaced by a `_WindowCondition` on the same ``Channel.lock`` that wakes the
sender once a useful window is open, not at every adjustment; and the
transport's saved exception tells a lost connection from a session the server
ended (paramiko closes the channels of a broken connection before it marks
the transport inactive).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
import secrets
import socket
import struct
import threading
import time
from collections import deque
from contextlib import contextmanager, suppress
from stat import S_IFMT, S_ISDIR, S_ISGID, S_ISREG, S_ISUID, S_IXGRP
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    NamedTuple,
    NoReturn,
    Optional,
    Set,
    Tuple,
    TypeVar,
    Union,
)

import paramiko
from paramiko.buffered_pipe import PipeTimeout
from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.message import Message

from .channel import close_soon
from .errors import ExecutorFailure, callers_code, callers_own
from .internals import (
    WriteAbandoned,
    connection_error,
    replace_receive_buffers,
    replace_send_condition,
    reply_arrived,
    return_window,
    send_awaiting_reply,
    window_unreturned,
)
from .pipe import send_all
from .sendgate import SendGate
from .text import printable

if TYPE_CHECKING:
    from typing_extensions import TypeGuard  # typing's from Python 3.10; mypy knows it here

log = logging.getLogger("paramiko_executor.transfer")

__all__ = [
    "upload",
    "download",
    "local_put",
    "local_get",
    "remove",
    "temp_path_for",
    "Local",
    "ProtocolError",
    "SFTPNotStarted",
    "NotARegularFile",
    "callers_own",
    "check_mode",
    "check_replaceable",
    "NEGOTIATION_TIMEOUT",
    "IN_FLIGHT",
]

#: Seconds the server has to start SFTP and answer its version, whatever the deadline.
NEGOTIATION_TIMEOUT = 10.0

#: Seconds the clean-up after a failure (close the handle, remove the temporary
#: file) may take, past the deadline if that is what ran out.
CLEANUP_GRACE = 5.0

#: Bytes of read or write requests kept outstanding at once.
IN_FLIGHT = 16 * 1024 * 1024

#: Most requests outstanding at once, whatever their size.
MAX_REQUESTS = 256

#: Block size when the server does not say (every SFTP server takes 32 KiB).
DEFAULT_BLOCK = 32 * 1024

#: Largest block asked for even if the server allows more.
MAX_BLOCK = 1024 * 1024

#: Block size of local copies.
LOCAL_BLOCK = 1024 * 1024

#: Seconds a server that sent no SFTP version in `NEGOTIATION_TIMEOUT` has to answer a
#: request on the channel, to show that the silence is what the session runs (lasting:
#: see `SFTPNotStarted`) rather than a slow or stalled server.
_ANSWER_WAIT = 5.0

#: Longest SFTP packet accepted while negotiating; a longer "length" means the
#: channel carries something else (a forced command's output).
_MAX_VERSION_PACKET = 256 * 1024

#: Seconds a send blocked on the server's window waits before it checks our own window.
_SEND_POLL = 1.0

#: Bytes of the server's stderr kept for error messages.
_STDERR_KEPT = 300

Progress = Callable[[int, int], object]
Source = Union[str, "os.PathLike[str]", BinaryIO, IO[bytes]]

# SFTP version 3 (draft-ietf-secsh-filexfer-02) packet types and constants.
_FXP_INIT = 1
_FXP_VERSION = 2
_FXP_OPEN = 3
_FXP_CLOSE = 4
_FXP_READ = 5
_FXP_WRITE = 6
_FXP_LSTAT = 7
_FXP_FSTAT = 8
_FXP_FSETSTAT = 10
_FXP_REMOVE = 13
_FXP_STAT = 17
_FXP_RENAME = 18
_FXP_STATUS = 101
_FXP_HANDLE = 102
_FXP_DATA = 103
_FXP_ATTRS = 105
_FXP_EXTENDED = 200
_FXP_EXTENDED_REPLY = 201

_FX_OK = 0
_FX_EOF = 1
_FX_NO_SUCH_FILE = 2
_FX_PERMISSION_DENIED = 3

_FXF_READ = 0x01
_FXF_WRITE = 0x02
_FXF_CREAT = 0x08
_FXF_TRUNC = 0x10
_FXF_EXCL = 0x20

_ATTR_SIZE = 0x01
_ATTR_UIDGID = 0x02
_ATTR_PERMISSIONS = 0x04

_POSIX_RENAME = "posix-rename@openssh.com"
_LIMITS = "limits@openssh.com"

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HEAD = struct.Struct(">IBI")  # length, type, request id
_LIMITS_REPLY = struct.Struct(">QQQ")  # max packet, read and write lengths


class _ReceiveWindow:
    """The receive window of one SFTP channel, kept by its `_Inbox` es.

    paramiko does not refuse data past the window it granted, so a server
    could grow the buffers without bound. What the inboxes hold, plus what
    was read from them and not given back yet, is what the server used of
    the window: data past it is dropped and ends every inbox, and the reader
    raises a protocol error (`_Session._check_window`).
    """

    def __init__(self, chan: paramiko.Channel) -> None:
        self._chan = chan
        self.inboxes: List[_Inbox] = []
        #: What the server overran the window with (set once, by the transport thread).
        self.violation: Optional[str] = None

    def admit(self, size: int) -> bool:
        """Whether ``size`` more bytes fit the window. Called with the inboxes' condition held."""
        if self.violation is None:
            used = sum(len(inbox) for inbox in self.inboxes) + window_unreturned(self._chan)
            left = self._chan.in_window_size - used
            if size <= left:
                return True
            self.violation = f"{size} bytes of data with {max(0, left)} bytes of window left"
        for inbox in self.inboxes:
            inbox.end()
        return False


class _Inbox:
    """Stand-in for paramiko's ``BufferedPipe`` under one stream of an SFTP channel.

    paramiko's transport thread calls `feed` per channel packet. The reader
    says how many bytes it needs (`wait_for`), and is woken only once that
    many are here, the stream ended, or (shared condition) the other stream
    of the channel got data: one wake-up per SFTP reply, not per packet.
    The inboxes of one channel share ``cond`` and ``window``: data past the
    window ends them (see `_ReceiveWindow`).
    """

    def __init__(self, lock: Any, cond: threading.Condition, want: int,
                 window: _ReceiveWindow) -> None:
        # Taken by ``with self._lock`` (``cond``'s lock), as `inbox.Inbox` does: an
        # interrupt cannot land between a C ``__enter__`` taking it and the block.
        self._lock = lock
        self._cond = cond
        self._window = window
        window.inboxes.append(self)
        self._chunks: Deque[bytes] = deque()
        self._size = 0
        self._closed = False
        self._event: Optional[threading.Event] = None
        self._idle_want = want
        self._want = want

    # --- paramiko's side (the BufferedPipe interface) -------------------

    def feed(self, data: bytes) -> None:
        with self._lock:
            if not self._window.admit(len(data)):
                return
            self._chunks.append(data)
            self._size += len(data)
            if self._event is not None:
                self._event.set()
            if self._size >= self._want:
                self._cond.notify_all()

    def close(self) -> None:
        with self._lock:
            self.end()

    def end(self) -> None:
        """`close`, with the condition held."""
        self._closed = True
        if self._event is not None:
            self._event.set()
        self._cond.notify_all()

    def set_event(self, event: threading.Event) -> None:
        with self._lock:
            self._event = event
            if self._size or self._closed:
                event.set()
            else:
                event.clear()

    def read_ready(self) -> bool:
        with self._lock:
            return self._size > 0

    def empty(self) -> bytes:
        with self._lock:
            out = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            return out

    def __len__(self) -> int:
        return self._size

    def read(self, nbytes: int, timeout: Optional[float] = None) -> bytes:
        """Up to ``nbytes`` bytes, waiting up to ``timeout`` for the first; b"" at the end."""
        with self._lock:
            if not self._size and not self._closed:
                if timeout == 0.0:
                    raise PipeTimeout()
                until = None if timeout is None else time.monotonic() + timeout
                while not self._size and not self._closed:
                    left = None if until is None else until - time.monotonic()
                    if left is not None and left <= 0:
                        raise PipeTimeout()
                    self._want = 1
                    try:
                        self._cond.wait(left)
                    finally:
                        self._want = self._idle_want
            return self._take(nbytes)

    # --- the SFTP reader's side -------------------------------------------

    def _take(self, nbytes: int) -> bytes:
        # Called with the condition held.
        if nbytes >= self._size:
            out = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
            self._chunks.clear()
            self._size = 0
            return out
        parts = []
        need = nbytes
        while need:
            chunk = self._chunks[0]
            if len(chunk) <= need:
                parts.append(self._chunks.popleft())
                need -= len(chunk)
            else:
                parts.append(chunk[:need])
                self._chunks[0] = chunk[need:]
                need = 0
        self._size -= nbytes
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def peek(self, nbytes: int) -> Optional[bytes]:
        """The first ``nbytes`` bytes without taking them, or None if fewer are here."""
        with self._lock:
            if self._size < nbytes:
                return None
            first = self._chunks[0]
            if len(first) >= nbytes:
                return first[:nbytes]
            return b"".join(self._chunks)[:nbytes]

    def wait_for(self, nbytes: int, until: Optional[float], other: Optional[_Inbox]) -> str:
        """Wait until ``nbytes`` are here; return why the wait ended.

        ``"ready"``: they are; ``"closed"``: the stream ended short of them;
        ``"other"``: ``other`` (the channel's other stream) has data;
        ``"timeout"``: ``until`` (a monotonic time) passed.
        """
        with self._lock:
            self._want = nbytes
            try:
                while True:
                    if self._size >= nbytes:
                        return "ready"
                    if other is not None and other._size:
                        return "other"
                    if self._closed:
                        return "closed"
                    left = None if until is None else until - time.monotonic()
                    if left is not None and left <= 0:
                        return "timeout"
                    self._cond.wait(left)
            finally:
                self._want = self._idle_want


class _WindowCondition(threading.Condition):
    """The channel's send-window condition, waking the sender only for a window worth it.

    paramiko notifies it at every window adjustment; sshd returns window
    every few packets it consumed, so a sender blocked on a full window
    would wake (a thread switch each) to send one packet at a time. This one
    wakes it once a quarter of the largest window seen is open, or at the
    channel's end: the server still holds three quarters to work on, and its
    window always comes back whole in the end, so the wake-up never fails to come.
    """

    def __init__(self, chan: paramiko.Channel) -> None:
        super().__init__(chan.lock)
        self._chan = chan
        self._peak = chan.out_window_size

    def notify_all(self) -> None:
        # paramiko holds the channel lock here, as for any Condition use.
        chan = self._chan
        window = chan.out_window_size
        self._peak = max(self._peak, window)
        if window >= self._peak // 4 or chan.closed or chan.eof_sent:
            super().notify_all()


class _StatusError(Exception):
    """An SFTP request failed with a STATUS reply; `_raise_for` maps it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


def _raise_for(exc: _StatusError, action: str, path: str) -> NoReturn:
    """Raise the public exception for SFTP status ``exc`` of ``action`` on remote ``path``."""
    # The server's text, escaped: it reaches terminals and logs.
    if exc.code == _FX_NO_SUCH_FILE:
        message = printable(exc.message or "No such file")
        raise FileNotFoundError(errno.ENOENT, f"{action}: {message} (remote)", path)
    if exc.code == _FX_PERMISSION_DENIED:
        message = printable(exc.message or "Permission denied")
        raise PermissionError(errno.EACCES, f"{action}: {message} (remote)", path)
    message = printable(exc.message or "no message")
    raise ExecutorFailure(f"{action}: {path!r}: {message} (SFTP status {exc.code})")


def _request(kind: int, request_id: Optional[int], fields: Tuple[bytes, ...]) -> bytes:
    """The SFTP packet of request ``kind`` (``request_id`` None: INIT, which has none)."""
    body = b"".join(fields)
    if request_id is None:
        return _U32.pack(1 + len(body)) + bytes((kind,)) + body
    return _HEAD.pack(5 + len(body), kind, request_id) + body


def _string(value: Union[str, bytes]) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _U32.pack(len(data)) + data


class ProtocolError(ExecutorFailure):
    """The SFTP server sent something malformed: the session cannot be trusted any further."""


class SFTPNotStarted(ExecutorFailure):
    """The server did not start SFTP on the channel: refused, or ran something else.

    Nothing was sent to an SFTP server, so nothing was created. ``lasting``: the
    server ran something else (a command-restricted key's forced command), which
    another session on the same login gets too: it answered something that is not
    SFTP, ended the session without a version, or stayed silent while the
    connection answered a request on the channel at once (`_ANSWER_WAIT`). A
    refusal, or silence on a connection that did not answer either (a slow or
    stalled server), may pass. ``refused``: the server answered the subsystem
    request at once with a refusal, or closed the channel before answering it; the
    executor asks again on the same connection, as for a refused exec (Dropbear before
    2024.86 closes every session channel still waiting for its request when
    any session of the connection ends: see `_Session._invoke_subsystem`).
    """

    def __init__(self, description: str, executor: Optional[Any] = None, *,
                 lasting: bool = False, refused: bool = False) -> None:
        super().__init__(description, executor)
        self.lasting = lasting
        self.refused = refused

    def _picklable_state(self) -> Optional[Dict[str, Any]]:
        return {"lasting": self.lasting, "refused": self.refused}


def _malformed(what: str) -> ProtocolError:
    return ProtocolError(f"SFTP protocol error: the server sent {what}")


def _unpack(layout: struct.Struct, body: Union[bytes, memoryview], at: int,
            what: str) -> Tuple[int, ...]:
    """The fields of ``layout`` at ``body[at:]``; `ExecutorFailure` if the packet ends first."""
    if at + layout.size > len(body):
        raise _malformed(f"{what} cut short ({len(body)} bytes)")
    return layout.unpack_from(body, at)


def _get_string(body: Union[bytes, memoryview], at: int, what: str = "a packet") -> Tuple[
        Union[bytes, memoryview], int]:
    """The SFTP string at ``body[at:]`` and the offset past it, its length checked."""
    (size,) = _unpack(_U32, body, at, what)
    at += 4
    if at + size > len(body):
        raise _malformed(f"{what} with a string of {size} bytes in {len(body) - at}")
    return body[at : at + size], at + size


def _attrs(mode: Optional[int] = None, ids: Optional[Tuple[int, int]] = None) -> bytes:
    """ATTRS of permission bits ``mode`` and (uid, gid) ``ids``, each left out if None."""
    fields = b""
    if ids is not None:
        fields += _U32.pack(ids[0]) + _U32.pack(ids[1])
    if mode is not None:
        fields += _U32.pack(mode & 0o7777)
    flags = _U32.pack((_ATTR_UIDGID if ids is not None else 0)
                      | (_ATTR_PERMISSIONS if mode is not None else 0))
    return flags + fields


def _attribute_fields(body: memoryview, at: int
                      ) -> Tuple[Optional[int], Optional[Tuple[int, int]], Optional[int]]:
    """(size, (uid, gid), permissions with the file type) of the ATTRS at ``body[at:]``."""
    (flags,) = _unpack(_U32, body, at, "ATTRS")
    at += 4
    size = ids = perms = None
    if flags & _ATTR_SIZE:
        (size,) = _unpack(_U64, body, at, "ATTRS")
        at += 8
    if flags & _ATTR_UIDGID:
        (uid,) = _unpack(_U32, body, at, "ATTRS")
        (gid,) = _unpack(_U32, body, at + 4, "ATTRS")
        ids = uid, gid
        at += 8
    if flags & _ATTR_PERMISSIONS:
        (perms,) = _unpack(_U32, body, at, "ATTRS")
    return size, ids, perms


def _check_regular(perms: Optional[int], path: str, action: str) -> None:
    """Refuse remote ``path`` unless ``perms`` (with the file type) say a regular file.

    A directory (or a link to one) is an `IsADirectoryError` naming ``path``, as the
    local file system's; a device, FIFO or socket a `ValueError`. No type (None, or
    a server that leaves the type bits out) passes: the transfer's own requests say.
    """
    if perms is None or not S_IFMT(perms) or S_ISREG(perms):
        return
    if S_ISDIR(perms):
        raise IsADirectoryError(errno.EISDIR, f"{action}: {os.strerror(errno.EISDIR)} (remote)",
                                path)
    raise NotARegularFile(f"remote must name a regular file: {path!r} is not a regular file")


def _remaining(until: Optional[float]) -> Optional[float]:
    return None if until is None else until - time.monotonic()


class _Created(NamedTuple):
    """What `_Session.stat_and_create` found and made."""

    #: The final permission bits, unless ``mode`` is given.
    bits: int
    #: (uid, gid) to give the file (the replaced file's), or None.
    owner: Optional[Tuple[int, int]]
    #: The temporary file's handle.
    handle: bytes
    #: The id of the probe's REMOVE (see `_Session.later`), None without a probe of its own.
    #: Refused (``sftp-server -P remove``): the upload is renamed over the probe on its
    #: way, which leaves nothing behind.
    removal: Optional[int] = None


def _probed(new_bits: int, created: bool, looked: Tuple[int, memoryview]) -> int:
    """The bits of a new file as sftp leaves it, from the reply to the probe's LSTAT (or FSTAT)
    and whether its OPEN ``created`` it.

    The probe was created asking for ``new_bits``, as sftp creates a file: what the
    server took off (its umask, a default ACL) comes off the upload too. Only bits of
    ``new_bits``: a probe swapped for a wider file widens nothing. Without an answer,
    ``new_bits`` for the owner only: narrower than sftp's, never wider.
    """
    if not created:
        return new_bits & 0o700
    try:
        _expect(*looked, _FXP_ATTRS, "LSTAT")
    except _StatusError:
        return new_bits & 0o700
    _size, _ids, perms = _attribute_fields(looked[1], 5)
    if perms is None or (S_IFMT(perms) and not S_ISREG(perms)):
        return new_bits & 0o700
    return new_bits & perms


class _Session:
    """One SFTP session on one channel, used by one thread."""

    def __init__(self, chan: paramiko.Channel, deadline: Optional[float]) -> None:
        self.chan = chan
        self.deadline = deadline
        self._next_id = 1
        self._unanswered: Set[int] = set()  # ids of requests sent and not answered yet
        self.extensions: Dict[str, bytes] = {}
        self.block = DEFAULT_BLOCK
        # Whether the request stream is intact: a send cut off mid-packet
        # leaves it unusable, and only then may clean-up not use it.
        self.in_sync = True
        # What a deadline cut off of the last request (a copy): clean-up sends
        # it first, which brings the stream back in step.
        self._unsent: Optional[bytes] = None
        self._stderr = b""  # the start of what the server wrote on stderr
        # Requests that go out ahead of the next one sent (`later`), and their replies by
        # id, None until each came (whichever wait took it in).
        self._queued: List[bytes] = []
        self._kept: Dict[int, Optional[Tuple[int, memoryview]]] = {}
        # `later`'s REMOVEs of the upload's names (id: name), and those names
        # (`stat_and_create`'s ``temps``): what may still be the upload's own.
        self._removing: Dict[int, str] = {}
        self._temps: Optional[List[str]] = None
        lock = threading.Lock()
        cond = threading.Condition(lock)
        self._window = _ReceiveWindow(chan)
        self._out = _Inbox(lock, cond, want=1 << 62, window=self._window)
        self._err = _Inbox(lock, cond, want=1, window=self._window)
        # Replaced before the subsystem starts: nothing can have arrived yet.
        replace_receive_buffers(chan, self._out, self._err)
        replace_send_condition(chan, _WindowCondition(chan))
        # Only this thread sends on the channel: the gate `pipe.send_all` wants never closes.
        self._gate = SendGate(chan)

    # --- lifetime ---------------------------------------------------------

    def start(self) -> None:
        """Start the ``sftp`` subsystem, agree on version 3, learn the server's limits."""
        until = time.monotonic() + NEGOTIATION_TIMEOUT
        if self.deadline is not None:
            until = min(until, self.deadline)
        self._invoke_subsystem(until)
        try:
            self.send(_FXP_INIT, _U32.pack(3), request_id=None)
        except OSError:
            # A forced command that has already run and ended closed the
            # channel: what it printed, read below, says why.
            if not self.chan.closed:
                raise
        body = self._negotiate(until)
        at = 5  # past type and version
        while at < len(body):
            name, at = _get_string(body, at, "a VERSION reply")
            data, at = _get_string(body, at, "a VERSION reply")
            self.extensions[bytes(name).decode("utf-8", "replace")] = bytes(data)
        if _LIMITS in self.extensions:
            try:
                reply, limits = self.call(_FXP_EXTENDED, _string(_LIMITS), until=until)
            except TimeoutError:
                # Still negotiating: bounded by NEGOTIATION_TIMEOUT, not only the deadline.
                # An SFTP server answered the version: a slow one, not something else.
                self._negotiation_timed_out(until, f"no answer to {_LIMITS}", lasting=False)
            if reply == _FXP_EXTENDED_REPLY:
                _packet, read_max, write_max = _unpack(_LIMITS_REPLY, limits, 5, "limits")
                # 0 means "no limit" in OpenSSH's extension.
                limit = min(x for x in (read_max, write_max, MAX_BLOCK) if x)
                self.block = max(DEFAULT_BLOCK, limit)

    def _invoke_subsystem(self, until: float) -> None:
        chan = self.chan
        m = Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(chan.remote_chanid)
        m.add_string("subsystem")
        m.add_boolean(True)
        m.add_string("sftp")
        closed_before = chan.closed  # then nothing goes out: `send_awaiting_reply`
        if not send_awaiting_reply(chan, m, _remaining(self.deadline)):
            assert self.deadline is not None  # without one, the send waits or raises
            self._negotiation_timed_out(self.deadline, "a key exchange held back the request")
        answered, accepted = reply_arrived(chan, max(0.0, until - time.monotonic()))
        if not answered:
            self._negotiation_timed_out(until, "no answer to the SFTP subsystem request",
                                        lasting=False)
        if not accepted:
            self._check_transport()
            # Dropbear before 2024.86 (its issue 321, fixed by its commit 71521d1b) closes,
            # EOF then CLOSE and no answer, every session channel still waiting for its
            # request when any session of the connection ends: a SIGCHLD makes it check
            # every channel for closing, and one that has no process yet passes that check.
            # Back to back, the previous transfer's sftp-server ends as this channel opens
            # (3 of 100 gets on one connection); with other threads' commands any of them
            # does, so waiting for one's own previous session would not do. Nothing ran:
            # the executor asks again (`refused`).
            # Its EOF says the server closed it; not whether paramiko still knows the
            # channel: paramiko closes a refused request's channel itself, and the server's
            # CLOSE in reply may come before this check or after it.
            raise SFTPNotStarted(
                "the server closed the channel before answering the SFTP subsystem request"
                if closed_before or chan.eof_received
                else "the server refused to start the SFTP subsystem", refused=True)

    def _negotiate(self, until: float) -> memoryview:
        """The server's VERSION reply (from its type byte on), checked to be one."""
        reason = self._await(4, until)
        if reason == "ready":
            (size,) = _U32.unpack(self._out.peek(4) or b"")
            if not 5 <= size <= _MAX_VERSION_PACKET:
                raise self._not_started("it answered something that is not SFTP")
            reason = self._await(4 + size, until)
        if reason == "closed":
            self._check_window()
            self._check_transport()
            raise self._not_started("it ended the session without answering")
        if reason == "timeout":
            # Silence alone may be a slow or stalled server as much as a forced command
            # waiting for input: only a connection that answers at once tells the latter.
            self._negotiation_timed_out(until, "no SFTP version came",
                                        lasting=self._answers_at_once(until))
        body = memoryview(self._recv(_U32.unpack(self._recv(4))[0]))
        if body[0] != _FXP_VERSION:
            raise self._not_started("it answered something that is not SFTP")
        # The server answers with the version both use, at most the client's: every packet
        # of a later version (their ATTRS first) reads differently.
        (version,) = _U32.unpack_from(body, 1)
        if version > 3:
            raise _malformed(f"version {version} in answer to version 3")
        return body

    def _answers_at_once(self, until: float) -> bool:
        """Whether the server answers a request on the channel within `_ANSWER_WAIT` (and
        the deadline): its SSH side and the session serve, so that the silence of what
        the session runs is its own. After `NEGOTIATION_TIMEOUT` without a VERSION (past
        ``until``).

        The request (``keepalive@openssh.com``, as OpenSSH's own) is one no server knows:
        its refusal closes the channel (paramiko's way), which ends the session anyway.
        """
        if self.deadline is not None and until >= self.deadline:
            return False  # not asked: `_negotiation_timed_out` raises TimeoutError
        end = time.monotonic() + _ANSWER_WAIT
        if self.deadline is not None:
            end = min(end, self.deadline)
        m = Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(self.chan.remote_chanid)
        m.add_string("keepalive@openssh.com")
        m.add_boolean(True)
        if not send_awaiting_reply(self.chan, m, max(0.0, end - time.monotonic())):
            return False  # a key exchange held it back
        answered, _accepted = reply_arrived(self.chan, max(0.0, end - time.monotonic()))
        self._check_transport()  # a channel closed with its connection answered nothing
        return answered

    def _negotiation_timed_out(self, until: float, why: str, *, lasting: bool = True
                               ) -> NoReturn:
        if self.deadline is not None and until >= self.deadline:
            raise TimeoutError(f"the deadline passed while starting SFTP ({why})")
        raise self._not_started(f"{why} within {NEGOTIATION_TIMEOUT:g} s", lasting=lasting)

    def _not_started(self, why: str, *, lasting: bool = True) -> SFTPNotStarted:
        """What the server started instead of SFTP (``lasting``: see `SFTPNotStarted`)."""
        said = self._stderr.decode("utf-8", "replace").strip()
        if said:
            why += f" (it wrote on stderr: \"{printable(said)}\")"
        return SFTPNotStarted(
            f"the server did not start SFTP: {why}. On a command-restricted key "
            "(authorized_keys command=...) the server runs the forced command "
            "instead of the SFTP subsystem.", lasting=lasting
        )

    def close(self) -> None:
        """Close the channel; a connection that already broke is not an error here.

        What holds the CLOSE back (a key exchange, a server that stopped
        reading) is waited out in the background (`close_soon`), which an
        interrupt (Ctrl-C) cannot cut between marking the channel closed and
        sending its CLOSE, as it can paramiko's ``Channel.close``.
        """
        close_soon(self.chan)

    def _check_transport(self) -> None:
        """Raise `EOFError` if the channel ended because the connection did."""
        transport = self.chan.get_transport()
        # paramiko closes the channels of a broken connection before it marks
        # the transport inactive; the reason, saved first, tells meanwhile.
        # (Authentication leaves its own kind there on live transports.)
        error = connection_error(transport)
        if isinstance(error, paramiko.AuthenticationException):
            error = None
        if transport is None or not transport.is_active() or error is not None:
            raise EOFError(f"the connection was lost during the SFTP session: {error!r}")

    def _check_window(self) -> None:
        """Raise `ProtocolError` if the server sent more than the window allowed."""
        if self._window.violation is not None:
            raise _malformed(f"more data than its window allowed ({self._window.violation})")

    def _channel_ended(self) -> None:
        self._check_window()
        self._check_transport()
        raise ExecutorFailure("the server closed the SFTP session unexpectedly")

    # --- packets ----------------------------------------------------------

    def send(self, kind: int, *fields: bytes, request_id: Optional[int] = -1) -> int:
        """Send one request; return its id (a new one unless given; None: INIT, no id)."""
        if request_id == -1:
            request_id = self.new_id()
        self._send_requests(memoryview(_request(kind, request_id, fields)))
        return request_id if request_id is not None else 0

    def _send_requests(self, data: memoryview) -> None:
        """Send whole requests ``data``, behind those `later` queued, in one send."""
        queued: List[bytes] = []
        sending = False
        try:  # from the queue's taking on: an interrupt (Ctrl-C) before the send keeps it
            queued, self._queued = self._queued, []
            if queued:
                data = memoryview(b"".join([*queued, data]))
            sending = True
            self.send_bytes(data)
        except BaseException as exc:
            if not sending or (isinstance(exc, TimeoutError) and self._unsent is None):
                self._queued[:0] = queued  # none of it went out: the queued go with the next
            raise

    def later(self, kind: int, *fields: bytes, removes: Optional[str] = None) -> int:
        """Queue a request to go out ahead of the next one sent: no round trip of its own.

        Returns its id; its reply is kept for `kept`, whichever wait takes it in.
        ``removes``: the request is a REMOVE of that name of the upload's (see
        `stat_and_create`'s ``temps``), which its answer takes off them as it comes
        unless it refused.
        """
        request_id = self.new_id()
        self._queued.append(_request(kind, request_id, fields))
        self._kept[request_id] = None
        if removes is not None:
            self._removing[request_id] = removes
        return request_id

    def kept(self, *request_ids: int, keep: bool = False) -> List[Tuple[int, memoryview]]:
        """The replies to `later`'s requests ``request_ids``, in order: sent now if still
        queued, and waited for (replies to requests sent before them are dropped). Each
        stays kept until all came: a wait cut short by the deadline takes none. With
        ``keep``, they stay kept after too, until the caller takes them off `_kept`."""
        if self._queued:
            self._send_requests(memoryview(b""))
        while any(self._kept[request_id] is None for request_id in request_ids):
            # One reply at a time: the one awaited may be the last to come, with no
            # other reply to return after it.
            self.receive(kept_too=True)
        replies = []
        for request_id in request_ids:
            reply = self._kept[request_id] if keep else self._kept.pop(request_id)
            assert reply is not None
            replies.append(reply)
        return replies

    def settle(self) -> None:
        """Send what `later` queued and wait for the replies to all it sent."""
        self.kept(*self._kept)

    def send_bytes(self, data: memoryview) -> None:
        """Send ``data`` whole, bounded by the deadline."""
        chan = self.chan
        sent = 0
        while sent < len(data):
            left = _remaining(self.deadline)
            try:
                if left is not None and left <= 0:
                    raise socket.timeout()
                # In slices: a server that holds back our window while it
                # overruns its own must not hold the send until the deadline.
                chan.settimeout(_SEND_POLL if left is None else min(left, _SEND_POLL))
                # paramiko sends one channel packet's worth per call; a
                # memoryview slice spares a copy of the rest each time.
                n = self._send_packet(data[sent:])
            except WriteAbandoned:
                self.in_sync = False
                raise  # a TimeoutError: the connection is gone, nothing is left to send
            except socket.timeout:
                self._check_window()
                if left is None or left > _SEND_POLL:
                    continue
                if sent:
                    self._unsent = data[sent:].tobytes()
                raise TimeoutError("the deadline passed while sending SFTP requests") from None
            except BaseException:
                self.in_sync = False
                raise
            if n <= 0:
                self.in_sync = False
                self._channel_ended()
            sent += n

    def _send_packet(self, data: memoryview) -> int:
        """What one channel packet takes of ``data``, sent as ``Channel.send`` does.

        With a deadline, a key exchange is waited out no longer than the
        channel's timeout, as the window is (`pipe.send_all`): paramiko's send
        waits ``clear_to_send_timeout``.
        """
        chan = self.chan
        if self.deadline is None or chan.closed:  # closed: paramiko's error
            return chan.send(data)  # type: ignore[arg-type]  # it takes any buffer
        try:
            # The write has the transfer's deadline, not the slice's: a server that
            # pauses a moment must not cost the transfer its connection.
            return send_all(chan, self._gate, data, whole=False, deadline=self.deadline)
        except (socket.timeout, WriteAbandoned):
            raise
        except OSError:
            return 0  # the channel closed while waiting for window: Channel.send's 0

    def _recv(self, nbytes: int, inbox: Optional[_Inbox] = None) -> bytes:
        """``chan.recv`` (``inbox``: stdout unless given), its window given back by the deadline.

        Called once the bytes are here. paramiko's ``recv`` waits out a key
        exchange for the window adjust up to ``clear_to_send_timeout``.
        """
        if self.deadline is None:
            return self.chan.recv_stderr(nbytes) if inbox is self._err else self.chan.recv(nbytes)
        data = (inbox or self._out).read(nbytes)
        if not return_window(self.chan, len(data), _remaining(self.deadline)):
            raise TimeoutError("the deadline passed while giving back the SFTP window")
        return data

    def new_id(self) -> int:
        """A new request id, awaited by `receive` from now on."""
        request_id = self._next_id
        self._next_id = (request_id + 1) & 0xFFFFFFFF
        self._unanswered.add(request_id)
        return request_id

    def receive(
        self, until: Optional[float] = None, *, block: bool = True, kept_too: bool = False
    ) -> Tuple[int, memoryview]:
        """The next reply: (its type, its body from the type byte on).

        Without ``block``, (0, empty) when no whole reply is here yet; with it,
        waits until ``until`` (default: the deadline), raising `TimeoutError` past it.
        A reply must answer a request sent and not answered yet: anything
        else is a protocol error. Replies to `later`'s requests are kept for
        `kept`, not returned; with ``kept_too``, (0, empty) once one is kept.
        """
        if until is None:
            until = self.deadline
        while True:
            head = self._out.peek(4)
            if head is None:
                if not block:
                    return 0, memoryview(b"")
                self._wait(4, until)
                head = self._out.peek(4) or b""
            (size,) = _U32.unpack(head)
            if not 5 <= size <= _MAX_REPLY:
                raise _malformed(f"a packet of length {size}")
            if len(self._out) < 4 + size:
                if not block:
                    return 0, memoryview(b"")
                self._wait(4 + size, until)
            body = memoryview(self._recv(4 + size))[4:]
            (request_id,) = _U32.unpack_from(body, 1)
            try:
                self._unanswered.remove(request_id)
            except KeyError:
                raise _malformed(f"a reply to request {request_id}, which awaits none") from None
            if request_id not in self._kept:
                return body[0], body
            self._kept[request_id] = body[0], body
            name = self._removing.pop(request_id, None)
            if name is not None and _gone(body[0], body):
                self._disown(name)  # at once: a wait cut short before its turn keeps it
            if kept_too:
                return 0, memoryview(b"")

    def _await(self, nbytes: int, until: Optional[float]) -> str:
        """Wait for ``nbytes`` of SFTP data: "ready", "closed" or "timeout" (see `_Inbox.wait_for`).

        What the server writes on stderr meanwhile (an sftp-server logging
        there, a forced command complaining) is taken, since it counts against
        the channel's window too, logged, and its start kept for error messages.
        """
        while True:
            reason = self._out.wait_for(nbytes, until, self._err)
            if reason != "other":
                return reason
            text = self._recv(1 << 20, self._err)
            log.debug("SFTP server stderr: %r", text[:1000])
            self._stderr += text[: max(0, _STDERR_KEPT - len(self._stderr))]

    def _wait(self, nbytes: int, until: Optional[float]) -> None:
        reason = self._await(nbytes, until)
        if reason == "closed":
            self._channel_ended()
        if reason == "timeout":
            raise TimeoutError("the deadline passed while waiting for the SFTP server")

    def call(
        self, kind: int, *fields: bytes, until: Optional[float] = None
    ) -> Tuple[int, memoryview]:
        """Send a request and return its reply; see `calls`."""
        return self.calls((kind, fields), until=until)[0]

    def calls(
        self, *requests: Tuple[int, Tuple[bytes, ...]], until: Optional[float] = None
    ) -> List[Tuple[int, memoryview]]:
        """Send ``(kind, fields)`` requests at once; their replies, in order, in one round trip.

        Replies to earlier requests are dropped: that lets clean-up run while
        a failed transfer's requests are still being answered. Waits until
        ``until`` (default: the deadline).
        """
        ids = [self.new_id() for _ in requests]
        # In one send: one SSH packet, and a deadline cuts the requests at one place only.
        self._send_requests(memoryview(b"".join(
            _request(kind, request_id, fields)
            for (kind, fields), request_id in zip(requests, ids))))
        replies: Dict[int, Tuple[int, memoryview]] = {}
        while len(replies) < len(ids):
            reply, body = self.receive(until)
            request_id = _U32.unpack_from(body, 1)[0]
            if request_id in ids:
                replies[request_id] = reply, body
        return [replies[request_id] for request_id in ids]

    def checked(self, kind: int, *fields: bytes) -> None:
        """Send a request answered by a STATUS; raise `_StatusError` unless it is OK."""
        _check_status(*self.call(kind, *fields))

    def stat_and_create(self, path: str, temp: str, new_bits: int, probe: Optional[str],
                        temps: Optional[List[str]] = None) -> _Created:
        """The final bits and owner of a file written over ``path``; a handle of new file ``temp``.

        One round trip, two when ``path`` exists: ``temp`` is created
        exclusively, readable by its owner only. `IsADirectoryError` if ``path``
        is a directory, a `ValueError` if it is a device, FIFO or socket, or a
        link to one, whether or not ``temp`` could be created; else `_StatusError`
        if it could not be; on these and `TimeoutError` what this call created
        is removed first (`discard_upload`; past the deadline, what the OPENs' answers,
        awaited within its grace, say was created). The bits: those a new
        file gets as sftp creates it (see `_probed`: ``new_bits`` less the server's umask, learnt
        from the new file ``probe``; ``new_bits`` as they are without one); a
        regular file of the user's (the owner of ``temp``) keeps its
        own (see `_rewritten`); anything else (another user's file, a symbolic link) may have
        been planted (a root login in a shared sticky directory replaces
        anything) and gets only the bits it and a new file both have. The
        owner: (uid, gid) of the user's own file if its group is not ``temp``'s
        (a file shared with a group stays so), else None.

        ``temp`` and ``probe`` are appended to ``temps`` just before the requests
        that create them go out, and taken off again once their exclusive OPEN
        was refused (what is there is not this upload's), once the clean-up removed
        them, and when it gave them up (see `discard_upload`); interrupted (Ctrl-C),
        also when their OPEN never went out.
        """
        flags = _FXF_WRITE | _FXF_CREAT | _FXF_TRUNC | _FXF_EXCL
        requests = [(_FXP_STAT, (_string(path),)),
                    (_FXP_OPEN, (_string(temp), _U32.pack(flags), _attrs(0o600)))]
        names = [temp]
        if probe is not None:
            # Created as sftp creates a new file (its OPEN asks for the source's bits and
            # the server takes its umask off) and looked at in the same round trip as the
            # temporary file's OPEN: no round trip of its own, and the data never has
            # wider bits than the final file (the probe has no data).
            requests += [(_FXP_OPEN, (_string(probe), _U32.pack(flags), _attrs(new_bits))),
                         (_FXP_LSTAT, (_string(probe),))]
            names.append(probe)
        self._temps = temps
        asked = tuple(names)
        creating: Dict[str, int] = {}  # each name: its exclusive OPEN, once queued
        ids: List[int] = []
        replies: List[Tuple[int, memoryview]] = []
        try:
            if temps is not None:
                temps.extend(names)
            # Through `later` and `kept`, in one send as `calls` sends them: an OPEN's
            # answer that came before the deadline passed stays known to the clean-up.
            ids = [self.later(kind, *fields) for kind, fields in requests]
            creating.update(zip(names, ids[1:3]))
            # Kept until the refused names are off the upload's: an interrupt meanwhile
            # still finds the answers (`_disown_refused`).
            replies = self.kept(*ids, keep=True)
            target, created, *probed = replies
            for name, (reply, _body) in zip(asked, (created, *probed)):
                if reply == _FXP_STATUS:
                    names.remove(name)
                    self._disown(name)
            for request_id in ids:
                del self._kept[request_id]
        except TimeoutError as exc:
            # A slow server may create them after any later session looked: removed in
            # this one once their OPENs' answers say which were created by this upload.
            self.discard_upload(None, [], exc, creating=creating)
            raise
        except BaseException:
            # An interrupt (Ctrl-C) leaves the names to the caller's clean-up: not those
            # whose OPEN never went out or was refused (another client's file).
            self._disown_refused(asked, creating, dict(zip(ids, replies)))
            raise
        try:
            return self._created(path, temp, new_bits, probe, target, created, probed)
        except (_StatusError, TimeoutError, IsADirectoryError, ValueError) as exc:
            self.discard_upload(None, [temp] if temp in names else [], exc)
            raise

    def _created(self, path: str, temp: str, new_bits: int, probe: Optional[str],
                 target: Tuple[int, memoryview], created: Tuple[int, memoryview],
                 probed: List[Tuple[int, memoryview]]) -> _Created:
        """`stat_and_create`'s answer from the replies of its first round trip."""
        removal = None
        if probe is not None:
            opened, looked = probed
            if opened[0] == _FXP_HANDLE:
                probe_handle = _string(self.handle(*opened))
                # Removed with the next requests, once it is known to be this upload's own:
                # a REMOVE in the OPEN's round trip removed a file already there too.
                removal = self.later(_FXP_REMOVE, _string(probe), removes=probe)
                if looked[0] != _FXP_ATTRS:
                    # LSTAT refused (sftp-server -P lstat, a server without it): the probe's
                    # handle tells the same, at one more round trip.
                    looked = self.call(_FXP_FSTAT, probe_handle)
                self.later(_FXP_CLOSE, probe_handle)
            new_bits = _probed(new_bits, opened[0] == _FXP_HANDLE, looked)
        exists = True
        try:
            _expect(*target, _FXP_ATTRS, "STAT")
        except _StatusError:  # missing, or hidden from us: a new file to the user
            exists = False
        kind = _attribute_fields(target[1], 5)[2] if exists else None
        # Before the temporary file's answer: put(local, "/tmp") cannot create one in
        # "/", and the directory is what is wrong. Renamed over, a root login's
        # /dev/null would become a regular file for every program of the server.
        _check_regular(kind, path, "upload failed")
        handle = self.handle(*created)
        if not exists:
            return _Created(new_bits, None, handle, removal)
        bits = None if kind is None else kind & 0o7777
        # A second round trip only when a file is replaced: whose is it?
        found, ours = self.calls((_FXP_LSTAT, (_string(path),)), (_FXP_LSTAT, (_string(temp),)))
        with suppress(_StatusError):
            _expect(*found, _FXP_ATTRS, "LSTAT")
            _expect(*ours, _FXP_ATTRS, "LSTAT")
            _size, ids, perms = _attribute_fields(found[1], 5)
            _size, temp_ids, _perms = _attribute_fields(ours[1], 5)
            if (perms is not None and S_ISREG(perms) and ids is not None
                    and temp_ids is not None and ids[0] == temp_ids[0]):
                return _Created(_rewritten(perms & 0o7777, root=ids[0] == 0),
                                None if ids == temp_ids else ids, handle, removal)
        return _Created(new_bits if bits is None else bits & new_bits, None, handle, removal)

    def open(self, path: str, flags: int, mode: Optional[int] = None) -> bytes:
        """Open remote ``path``; its handle."""
        return self.handle(*self.call(_FXP_OPEN, _string(path), _U32.pack(flags), _attrs(mode)))

    @staticmethod
    def handle(reply: int, body: memoryview) -> bytes:
        """The handle an OPEN's reply gives; `_StatusError` if refused."""
        _expect(reply, body, _FXP_HANDLE, "OPEN")
        handle = bytes(_get_string(body, 5, "a HANDLE reply")[0])
        if len(handle) > _MAX_HANDLE:  # each WRITE and READ would carry it
            raise _malformed(f"a handle of {len(handle)} bytes")
        return handle

    def fstat(self, handle: bytes) -> Tuple[Optional[int], Optional[int]]:
        """(size, permissions with the file type) of the open file, each None if the server
        does not say."""
        reply, body = self.call(_FXP_FSTAT, _string(handle))
        _expect(reply, body, _FXP_ATTRS, "FSTAT")
        size, _ids, perms = _attribute_fields(body, 5)
        return size, perms

    def rename(self, old: str, new: str) -> None:
        """Rename ``old`` over ``new``: atomically where the server offers posix-rename."""
        if _POSIX_RENAME in self.extensions:
            self.checked(_FXP_EXTENDED, _string(_POSIX_RENAME), _string(old), _string(new))
            return
        # Plain SFTP RENAME refuses an existing target: remove it first. Not
        # atomic, but only servers without the extension (not OpenSSH) get here.
        self.remove(new)
        self.checked(_FXP_RENAME, _string(old), _string(new))

    def remove(self, path: str) -> bool:
        """Remove remote file ``path``; False if there was none."""
        try:
            self.checked(_FXP_REMOVE, _string(path))
        except _StatusError as exc:
            if exc.code == _FX_NO_SUCH_FILE:
                return False
            raise
        return True

    # --- transfers ----------------------------------------------------------

    def _limit(self) -> int:
        """How many block-sized requests may be outstanding."""
        return max(1, min(MAX_REQUESTS, IN_FLIGHT // self.block))

    def write_file(
        self, handle: bytes, readinto: _ReadInto, total: int, progress: Optional[Progress]
    ) -> int:
        """Write everything ``readinto`` gives to ``handle``; the byte count."""
        handle_field = _string(handle)
        # One buffer for every WRITE: header, handle, offset, length, data.
        head_size = 9 + len(handle_field) + 12
        buffer = bytearray(head_size + self.block)
        buffer[9 : 9 + len(handle_field)] = handle_field
        view = memoryview(buffer)
        data = view[head_size:]
        limit = self._limit()
        outstanding: Dict[int, int] = {}
        offset = done = 0
        at_end = False
        while True:
            while not at_end and len(outstanding) < limit:
                size = _fill(readinto, data, self.deadline)
                if not size:
                    at_end = True
                    break
                request_id = self.new_id()
                _HEAD.pack_into(buffer, 0, head_size - 4 + size, _FXP_WRITE, request_id)
                struct.pack_into(">QI", buffer, head_size - 12, offset, size)
                self._send_requests(view[: head_size + size])
                outstanding[request_id] = size
                offset += size
                # Take the statuses that are here already, without waiting.
                done = self._acknowledge(outstanding, done, total, progress, block=False)
            if not outstanding:
                break
            done = self._acknowledge(outstanding, done, total, progress, block=True)
        if not offset and progress is not None:
            progress(0, total)
        return done

    def _acknowledge(
        self,
        outstanding: Dict[int, int],
        done: int,
        total: int,
        progress: Optional[Progress],
        *,
        block: bool,
    ) -> int:
        """Take the WRITE statuses that have arrived (at least one if ``block``); bytes done."""
        while outstanding:
            reply, body = self.receive(block=block)
            if not reply:
                break
            # `receive` let only awaited replies through: all of them are WRITEs here.
            size = outstanding.pop(_U32.unpack_from(body, 1)[0])
            _check_status(reply, body)
            done += size
            if progress is not None:
                progress(done, total)
            block = False
        return done

    def read_file(
        self, handle: bytes, size: Optional[int], write: _Write, progress: Optional[Progress]
    ) -> int:
        """Read ``handle`` to its end into ``write``, in order; the byte count.

        ``size`` (from FSTAT) only decides how far to ask ahead: the file may
        grow or shrink meanwhile, and its end is where the server says EOF.
        Reads are asked at most `IN_FLIGHT` bytes past what was written: data
        that came ahead of a missing reply waits in memory, and a server that
        withholds one reply must not make the client hold the whole file.
        """
        handle_field = _string(handle)
        block = self.block
        limit = self._limit()
        ahead = limit * block
        total = -1 if size is None else size
        known = size  # None once the file turned out longer than FSTAT said
        outstanding: Dict[int, Tuple[int, int]] = {}
        parked: Dict[int, bytes] = {}  # data that came before the data ahead of it
        ask_at = done = 0
        end: Optional[int] = None

        def ask(offset: int, length: int) -> None:
            request_id = self.send(_FXP_READ, handle_field, _U64.pack(offset), _U32.pack(length))
            outstanding[request_id] = (offset, length)

        while True:
            # Ask up to and including one read at the expected end, whose EOF
            # ends the transfer without a round trip of its own.
            while (end is None and len(outstanding) < limit and ask_at - done < ahead
                   and (known is None or ask_at <= known)):
                ask(ask_at, block)
                ask_at += block
            if not outstanding:
                break
            reply, body = self.receive()
            # `receive` let only awaited replies through: all of them are READs here.
            offset, length = outstanding.pop(_U32.unpack_from(body, 1)[0])
            if reply == _FXP_STATUS and _unpack(_U32, body, 5, "a STATUS reply")[0] == _FX_EOF:
                end = offset if end is None else min(end, offset)
                continue
            _expect(reply, body, _FXP_DATA, "READ")
            (got,) = _unpack(_U32, body, 5, "a DATA reply")
            if not 0 < got <= length or 9 + got > len(body):
                raise _malformed(f"a DATA reply of {got} bytes in {len(body) - 9}, "
                                 f"for a READ of {length}")
            if got < length:  # a short read: ask for the rest
                ask(offset + got, length - got)
            if known is not None and offset + got > known:
                known = None
            if offset != done:
                if len(parked) >= 4 * limit:  # pieces of a byte each, say
                    raise _malformed(f"{len(parked)} replies out of order")
                # A copy: a view would keep the whole reply, however long, alive.
                parked[offset] = bytes(body[9 : 9 + got])
                continue
            write(body[9 : 9 + got])
            done += got
            while done in parked:
                piece = parked.pop(done)
                write(memoryview(piece))
                done += len(piece)
            if progress is not None:
                progress(done, total)
        if parked or end is None or done != end:
            raise _malformed("the file with gaps")
        if not done and progress is not None:
            progress(0, total)
        return done

    def discard_upload(self, handle_field: Optional[bytes], names: List[str],
                       error: BaseException, *, creating: Optional[Dict[str, int]] = None
                       ) -> None:
        """After an upload failed with ``error``: close the handle, remove the files ``names``
        and send what `later` queued (the probe's REMOVE), in one round trip. A name
        removed, or found gone, is taken off the upload's names (`stat_and_create`'s
        ``temps``); the others stay there for the caller's later clean-up.

        ``creating``: names whose exclusive OPEN (name: its request id) had no answer
        yet when ``error`` came. Each is removed only once that answer says the OPEN
        created it; refused, what is there is not the upload's, and the name is taken
        off. One whose answer does not come (within the grace, or the session ended
        first) is given up, taken off too and logged at DEBUG: it may be the upload's
        own empty file or another's file, and another's must not be removed on a guess.

        Only while the session still works (not after a protocol error).
        Bounded by `CLEANUP_GRACE`; gives up quietly (the caller raises the
        original error). ``handle_field``: the handle as an SFTP string.
        """
        # ``creating`` itself loses each name as its answer decides it: an interrupt (Ctrl-C)
        # anywhere in the clean-up gives up only the names still undecided.
        try:
            self._discard(handle_field, names, error, {} if creating is None else creating)
        finally:
            if creating:
                log.debug("gave up the temporary names %s of a failed upload: no answer to "
                          "the requests that would have created them", sorted(creating))
                for name in creating:
                    self._disown(name)

    def _discard(self, handle_field: Optional[bytes], names: List[str],
                 error: BaseException, undecided: Dict[str, int]) -> None:
        """`discard_upload`'s work; a name of ``undecided`` comes off it once decided."""
        if isinstance(error, ProtocolError) or not self.in_sync or self.chan.closed:
            return
        self.deadline = time.monotonic() + CLEANUP_GRACE
        try:
            if self._unsent is not None:
                self.send_bytes(memoryview(self._unsent))
                self._unsent = None
            self._unqueue(undecided)
            if handle_field is not None:
                self.later(_FXP_CLOSE, handle_field)
            removing = list(names)
            for name, request_id in list(undecided.items()):
                (opened,) = self.kept(request_id)
                if opened[0] != _FXP_HANDLE:
                    self._disown(name)  # refused: not this upload's
                    del undecided[name]
                    continue
                # Off the undecided first: interrupted before its REMOVE went out, it
                # stays among the upload's names for the caller's clean-up.
                del undecided[name]
                removing.append(name)
                self.later(_FXP_CLOSE, _string(self.handle(*opened)))
            for name in removing:
                self.later(_FXP_REMOVE, _string(name), removes=name)
            self.settle()
        except (_StatusError, ExecutorFailure, TimeoutError, EOFError, OSError,
                paramiko.SSHException):
            pass

    def _unqueue(self, opens: Dict[str, int]) -> None:
        """Take the requests of ``opens`` (name: request id) that never went out (still
        queued, see `later`) off the queue, and their names off ``opens`` and the upload's:
        nothing created them."""
        for name, request_id in list(opens.items()):
            for packet in self._queued:
                if _HEAD.unpack_from(packet)[2] == request_id:
                    self._queued.remove(packet)
                    del self._kept[request_id]
                    self._unanswered.discard(request_id)
                    del opens[name]
                    self._disown(name)
                    break

    def _disown_refused(self, names: Tuple[str, ...], opens: Dict[str, int],
                        replies: Dict[int, Tuple[int, memoryview]]) -> None:
        """After an interrupt in `stat_and_create`: take those of ``names`` off the upload's
        that nothing created, their OPEN not queued (not in ``opens``, name: its request
        id) or still queued (see `_unqueue`: a session interrupted sends nothing more),
        and those whose OPEN's answer, among ``replies`` (request id: reply) or still
        kept, refused it."""
        self._unqueue(opens)
        for name in names:
            request_id = opens.get(name)
            answer = None if request_id is None else (
                replies.get(request_id) or self._kept.get(request_id))
            if request_id is None or answer is not None and answer[0] == _FXP_STATUS:
                self._disown(name)

    def _disown(self, name: str) -> None:
        """Take ``name`` off the upload's names: gone, or not the upload's."""
        if self._temps is not None and name in self._temps:
            self._temps.remove(name)


_MAX_REPLY = MAX_BLOCK + 1024

#: Longest handle the protocol allows (draft-ietf-secsh-filexfer-02, 7).
_MAX_HANDLE = 256

_ReadInto = Callable[[memoryview], Optional[int]]
_Write = Callable[[memoryview], None]
R = TypeVar("R")


def _check_status(reply: int, body: memoryview) -> None:
    """Raise `_StatusError` unless ``body`` is a STATUS saying OK."""
    if reply != _FXP_STATUS:
        raise _malformed(f"reply type {reply} where a status belongs")
    (code,) = _unpack(_U32, body, 5, "a STATUS reply")
    if code != _FX_OK:
        message = b""
        if len(body) > 9:  # the message is optional in version 3
            message = bytes(_get_string(body, 9, "a STATUS reply")[0])
        raise _StatusError(code, message.decode("utf-8", "replace"))


def _gone(reply: int, body: memoryview) -> bool:
    """Whether a REMOVE's reply says the file is gone: removed, or not there."""
    if reply != _FXP_STATUS or len(body) < 9:
        return False  # malformed: the reply's reader says so
    return _U32.unpack_from(body, 5)[0] in (_FX_OK, _FX_NO_SUCH_FILE)


def _expect(reply: int, body: memoryview, wanted: int, request: str) -> None:
    """Raise unless ``reply`` is of type ``wanted``: `_StatusError` for an error status."""
    if reply != wanted:
        _check_status(reply, body)
        raise _malformed(f"an OK status as the answer to {request}")


def _fill(readinto: _ReadInto, view: memoryview, deadline: Optional[float] = None) -> int:
    """Fill ``view`` from ``readinto`` until it is full, the source ends or ``deadline``
    passed (a slow source, a pipe, gives a few bytes at a time); bytes read.

    A non-blocking file with no data yet answers None: not its end, and no
    data to send either, so a `BlockingIOError` (the caller's) rather than a
    file cut short.
    """
    got = 0
    while got < len(view):
        n = readinto(view[got:])
        if n is None:
            with callers_code():
                raise BlockingIOError(errno.EAGAIN, "the file object is in non-blocking mode "
                                      "and had no data to read: its end is unknown")
        if not n:
            break
        _check_count("readinto", n, len(view) - got)
        got += n
        if deadline is not None and time.monotonic() >= deadline:
            break
    return got


def _write_all(write: Callable[[memoryview], Optional[int]], *, raw: bool = False) -> _Write:
    """``write`` made to take everything (raw files may take part of a buffer).

    A file object that does not count (answers None) took everything; but a
    ``raw`` one (an `io.RawIOBase`) answers None when, non-blocking, it took
    nothing, and that is a `BlockingIOError` rather than data dropped. So is
    a write that took nothing at all, which would never end.
    """

    def write_all(data: memoryview) -> None:
        while data:
            n = write(data)
            if n is None and not raw:
                return
            if not n:
                raise BlockingIOError(errno.EAGAIN, "the file object took none of the data "
                                      "(non-blocking, and full)")
            _check_count("write", n, len(data))
            data = data[n:]

    return write_all


def _check_count(method: str, n: Any, most: int) -> None:
    """Refuse a count the caller's file object made up, as ``io``'s buffered files do.

    An upload frames its SFTP packets by the count: one past the bytes really read would
    send the next packet's bytes as file data, and a negative one never ends a copy.
    """
    if not isinstance(n, int) or not 0 <= n <= most:
        with callers_code():
            raise OSError(f"the file object's {method}() returned {n!r}, not a count of "
                          f"bytes between 0 and {most}")


def _callers(function: Callable[..., R]) -> Callable[..., R]:
    """``function`` (the caller's code, or local I/O) run inside `callers_code` at every call."""

    def call(*args: Any) -> R:
        with callers_code():
            return function(*args)

    return call


def _is_path(value: object) -> TypeGuard[Union[str, os.PathLike[str]]]:
    return isinstance(value, (str, os.PathLike))


def _position(file: Any) -> Optional[int]:
    """Where ``file`` stands, if it can seek back there later; None if it cannot seek."""
    seekable = getattr(file, "seekable", None)
    try:
        if (seekable is not None and not seekable()) or not hasattr(file, "seek"):
            return None
        return int(file.tell())
    except (AttributeError, OSError, ValueError):
        return None


def _size_of(file: Any) -> int:
    """Bytes left to read in seekable ``file``, or -1 if it cannot tell."""
    try:
        here = file.tell()
        end = file.seek(0, os.SEEK_END)
        file.seek(here)
        return max(0, int(end) - int(here))
    except (AttributeError, OSError, ValueError):
        return -1


def _created_bits(directory: str, name: str, bits: int) -> int:
    """The bits a new file asking for ``bits`` gets in local ``directory``, as cp's and sftp's do.

    Less the umask, or as the directory's default ACL says (which then stands
    in for the umask): learnt from an empty probe file (named after ``name``),
    created and removed at once. Without one (the directory refuses it, as it
    will the temporary file), ``bits`` for the owner only: narrower, never wider.
    """
    probe = os.path.join(directory, _temp_name(name))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, bits)
    except OSError:
        return bits & 0o700
    try:
        os.unlink(probe)
        return bits & os.fstat(fd).st_mode
    finally:
        os.close(fd)


def _open_regular(path: str) -> Tuple[Any, os.stat_result]:
    """``path`` opened for reading, and its status; only a regular file is read.

    Opened without blocking first, so that a FIFO with no writer cannot hang
    the transfer (and hold its slot): a path names a file to copy, as for
    OpenSSH's ``sftp``; a pipe can be passed as a file object instead.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        status = os.fstat(fd)
        if S_ISDIR(status.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not S_ISREG(status.st_mode):
            raise ValueError(f"local must name a regular file, or be a file object: {path!r} "
                             "is not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0, closefd=True), status  # noqa: SIM115 (the caller's)
    except BaseException:
        os.close(fd)
        raise


class Local:
    """The local side of one transfer over all its attempts: a path, or a binary file object.

    A path is opened anew by each attempt. A file object is read (written)
    from the position it had when this was made: an attempt after one that
    moved bytes seeks back there first (a download also cuts off what the
    earlier one wrote). A file object that cannot seek (a pipe, a socket)
    cannot go back: an attempt after one that moved bytes raises
    `ExecutorFailure` instead of sending, or leaving, wrong data. Whatever
    touches the caller's object or the local file system runs inside
    `callers_code`.
    """

    def __init__(self, value: Source) -> None:
        self.path: Optional[str] = os.fspath(value) if _is_path(value) else None
        self._file: Any = value
        self._start: Optional[int] = None
        self._moved = False  # an attempt moved bytes through the file object
        if self.path is None:
            with callers_code():
                self._start = _position(value)

    @classmethod
    def of(cls, value: Union[Source, Local]) -> Local:
        return value if isinstance(value, Local) else cls(value)

    def _begin(self, *, truncate: bool) -> None:
        """Before an attempt with a file object: back to the start if an earlier one moved bytes."""
        if not self._moved:
            return
        if self._start is None:
            # Only a lost connection brings a second attempt with bytes moved.
            raise ExecutorFailure(
                "the connection was lost during the transfer, and the transfer cannot be tried "
                "again: its file object cannot seek back to where it started, and the "
                "broken attempt already moved bytes through it")
        with callers_code():
            self._file.seek(self._start)
            if truncate:
                self._file.truncate()
        self._moved = False

    def _moving(self, function: Callable[[memoryview], R]) -> Callable[[memoryview], R]:
        """``function`` of the file object, run as the caller's code, noting that bytes moved."""

        def call(view: memoryview) -> R:
            with callers_code():
                result = function(view)
            self._moved = True
            return result

        return call

    @contextmanager
    def reading(self) -> Iterator[Tuple[_ReadInto, int, int]]:
        """For one attempt: ``(readinto, bytes to read or -1, permission bits for a copy)``.

        A path's bits are its own (without set-id and sticky bits); a file
        object counts as 0o644.
        """
        if self.path is not None:
            with callers_code():
                file, status = _open_regular(self.path)
            try:
                yield _callers(file.readinto), status.st_size, status.st_mode & 0o777
            finally:
                file.close()
            return
        self._begin(truncate=False)
        file = self._file
        readinto = getattr(file, "readinto", None)
        if readinto is None:
            read = file.read

            def readinto(view: memoryview) -> Optional[int]:
                data = read(len(view))
                if data is None:  # non-blocking, nothing there yet (see `_fill`)
                    return None
                view[: len(data)] = data
                return len(data)

        with callers_code():
            total = -1 if self._start is None else _size_of(file)
        yield self._moving(readinto), total, 0o644

    @contextmanager
    def writing(self, new_bits: int, mode: Optional[int] = None) -> Iterator[_Write]:
        """For one attempt: a function writing everything it is given.

        A file object is written at its position, and flushed at the end (a
        buffered file's full disk is the transfer's error, not its
        ``close()``'s). A path gets a new
        temporary file in its directory, created exclusively and readable by
        its owner only, which gets its final bits and is ``os.replace``-d over
        the path when the block ends without error, and is removed when it
        does not. The final bits: ``mode`` if given; else those of the file
        replaced (if it is not this user's own regular file, only those
        that ``new_bits`` has too: see `_own_bits`); else ``new_bits`` less
        what this machine takes off a new file there (the umask, or the
        directory's default ACL: see `_created_bits`). A path that is a
        directory is an `IsADirectoryError`, a device, FIFO or socket a
        `ValueError`, before anything is written.
        """
        if self.path is None:
            self._begin(truncate=True)
            yield self._moving(_write_all(self._file.write,
                                          raw=isinstance(self._file, io.RawIOBase)))
            flush = getattr(self._file, "flush", None)
            if flush is not None:
                with callers_code():
                    flush()
            return
        path = self.path
        head, name = os.path.split(path)
        temp = os.path.join(head, _temp_name(name))
        with callers_code():
            check_replaceable(path)
            if mode is None:
                new_bits = _created_bits(head, name, new_bits)
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise type(exc)(exc.errno, exc.strerror, path) from None
        file = open(fd, "wb", buffering=0)  # noqa: SIM115 (closed below)
        try:
            yield _callers(_write_all(file.write))
            with callers_code():
                own = _own_file(path)
                if own is not None:
                    # The group first: a chown clears set-group-ID, which the chmod then
                    # sets. A group this user is not in: the user's, narrower.
                    with suppress(PermissionError):
                        os.fchown(fd, -1, own.st_gid)
                if mode is None:
                    mode = _own_bits(path, new_bits)
                os.fchmod(fd, mode)
                file.close()
                os.replace(temp, path)
        except BaseException:
            with suppress(OSError):
                file.close()
            with suppress(OSError):
                os.unlink(temp)
            raise


class NotARegularFile(ValueError):
    """A path names a device, FIFO or socket: a local one a download must not replace,
    a remote one a transfer must not read or replace.

    A `ValueError` like any refused argument; its own type so that `HostGroup.get`
    can tell one host's file (its entry) from a bad argument of the call.
    """


def check_replaceable(path: str) -> None:
    """Refuse a ``path`` that names something a new regular file must not replace.

    A directory is an `IsADirectoryError`; a device, FIFO or socket (``/dev/null``, or a
    link to it) a `NotARegularFile`: renamed over, root's ``/dev/null`` would become a
    regular file for every program of the machine. A file object can write to them.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return
    except OSError:
        return  # a link loop, a parent not searchable: the rename says so, or replaces it
    if S_ISDIR(status.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not S_ISREG(status.st_mode):
        raise NotARegularFile(f"local must name a regular file, or be a file object: {path!r} "
                              "is not a regular file")


def _own_bits(path: str, new_bits: int) -> int:
    """The final bits of a file written over ``path``, whose new file would get ``new_bits``.

    This user's own regular file keeps its bits (see `_rewritten`). Anything else
    (another user's file, a symbolic link: its target's bits) may have been planted by
    someone else, in a shared sticky directory where root may replace anything, to make
    the new file writable by them: it gets no bit that either it or a new file would not
    have.
    """
    own = _own_file(path)
    if own is not None:
        return _rewritten(own.st_mode & 0o7777, root=own.st_uid == 0)
    try:
        return os.stat(path).st_mode & new_bits
    except FileNotFoundError:
        return new_bits


def _own_file(path: str) -> Optional[os.stat_result]:
    """``path``'s status if it is this user's own regular file (not a link to one), else None."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    return status if S_ISREG(status.st_mode) and status.st_uid == os.geteuid() else None


def _rewritten(bits: int, *, root: bool) -> int:
    """The bits of a file of ``bits`` once someone (``root`` or not) wrote new content into it.

    As the kernel leaves them after a write (cp's, sftp's): one by anyone but root clears
    set-user-ID, and set-group-ID of a group-executable file, so that new content never
    runs with the privileges given to the old.
    """
    if root:
        return bits
    if bits & S_IXGRP:
        bits &= ~S_ISGID
    return bits & ~S_ISUID


def check_mode(mode: Any) -> None:
    """Refuse a ``mode`` that is not None or permission bits (TypeError, ValueError)."""
    if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int)):
        raise TypeError(f"mode must be an int or None, not {type(mode).__name__}")
    if mode is not None and not 0 <= mode <= 0o7777:
        raise ValueError(f"mode must be permission bits (0 to 0o7777), not {mode:#o}")


def temp_path_for(remote: str) -> str:
    """A new temporary name next to ``remote``: ``.<name>.<16 hex digits>.tmp`` in its directory.

    A long ``name`` is cut so that the temporary name is a valid file name too.
    """
    head, name = posixpath.split(remote)
    if not name:
        raise ValueError(f"remote must name a file, not a directory: {remote!r}")
    return posixpath.join(head, _temp_name(name))


#: Bytes of the final name a temporary name keeps: with its 22 more it stays within the
#: 255 bytes a file name may have (NAME_MAX), so a long final name can be written too.
_TEMP_NAME_KEEPS = 255 - 22


def _temp_name(name: str) -> str:
    """``.<name>.<16 random hex digits>.tmp``, ``name`` cut to fit a file name's 255 bytes."""
    kept = name.encode("utf-8", "surrogateescape")[:_TEMP_NAME_KEEPS].decode("utf-8", "ignore")
    return f".{kept}.{secrets.token_hex(8)}.tmp"


@contextmanager
def _session(chan: paramiko.Channel, deadline: Optional[float]) -> Iterator[_Session]:
    """A started SFTP session on ``chan``; the channel is closed when the block ends."""
    session = _Session(chan, deadline)
    try:
        session.start()
        yield session
    finally:
        session.close()


def upload(
    chan: paramiko.Channel,
    source: Union[Source, Local],
    remote: str,
    *,
    mode: Optional[int] = None,
    progress: Optional[Progress] = None,
    deadline: Optional[float] = None,
    temp_name: Optional[str] = None,
    temps: Optional[List[str]] = None,
) -> int:
    """Write ``source`` to ``remote`` over SFTP on ``chan``, atomically; the bytes sent.

    ``chan`` is a new, unused session channel; it is closed on return, also
    on error. ``source`` is a path, a binary file object (read from its
    current position to its end) or a `Local` (the same over several
    attempts). The data goes to a temporary file next to ``remote``
    (``temp_name``: a name in ``remote``'s directory or a path; default: a
    new random one, see `temp_path_for`), created exclusively and readable by
    its owner only; it gets its final bits (see the module's Permissions)
    and is renamed over ``remote`` after the last byte. On failure it is
    removed if the SFTP session still works. Without ``mode``, an empty probe
    file (a new random name next to it) is created and removed on the way (see
    `_Session.stat_and_create`). The paths of both are appended to
    ``temps`` once SFTP started, just before the requests that create them
    go out, and taken off again once the server refused to create one (what
    is there is not this upload's): a caller that removes a broken attempt's
    files later has exactly the names that may be its own (none when SFTP
    never started).

    ``progress(done, total)`` is called in this thread as the server confirms
    blocks; ``total`` is -1 when the source cannot tell its size.

    Raises `FileNotFoundError` (``remote``'s directory is missing) or
    `PermissionError` (refused), naming ``remote``; `IsADirectoryError` naming
    it if it is a directory, `ValueError` if it names a device, FIFO or socket
    (left as they are); `ExecutorFailure` for other
    SFTP errors (an existing ``temp_name`` too) and a server that does not
    start SFTP; `TimeoutError` past ``deadline``; connection errors as
    paramiko raised them. An error of ``source`` or of ``progress`` comes out
    as a `CallerError` carrying it.
    """
    check_mode(mode)
    if temp_name is None:
        temp = temp_path_for(remote)
    else:
        temp = temp_name
        if "/" not in temp:
            temp = posixpath.join(posixpath.dirname(remote), temp)
    if progress is not None:
        progress = _callers(progress)
    with _session(chan, deadline) as session, \
            Local.of(source).reading() as (readinto, total, bits):
        # The bits of a new file matter only without ``mode``: a probe learns them.
        probe = temp_path_for(remote) if mode is None else None
        try:
            created = session.stat_and_create(remote, temp, bits, probe, temps)
        except _StatusError as exc:
            _raise_for(exc, "cannot create a temporary file for the upload", remote)
        handle_field = _string(created.handle)
        still_open: Optional[bytes] = handle_field  # for the clean-up
        try:
            done = session.write_file(created.handle, readinto, total, progress)
            final = mode if mode is not None else created.bits
            # The group first: a chown clears set-group-ID, which the chmod then sets.
            regroup = [] if created.owner is None else [
                (_FXP_FSETSTAT, (handle_field, _attrs(None, created.owner)))]
            *regrouped, chmod, close = session.calls(
                *regroup, (_FXP_FSETSTAT, (handle_field, _attrs(final))),
                (_FXP_CLOSE, (handle_field,)))
            still_open = None
            for status in regrouped:  # a group the login is not in: the login's, narrower
                with suppress(_StatusError):
                    _check_status(*status)
            try:
                _check_status(*chmod)
            except _StatusError:
                if mode is not None:
                    raise
                # A server that refuses to set modes leaves the file owner-only:
                # narrower than asked, never wider.
                log.debug("the SFTP server did not set %s's mode", remote, exc_info=True)
            _check_status(*close)
            if created.removal is not None and probe is not None \
                    and _POSIX_RENAME in session.extensions:
                try:  # answered before the requests above were
                    _check_status(*session.kept(created.removal)[0])
                except _StatusError:  # refused (sftp-server -P remove)
                    # Over the probe first: the data under its name has the final bits already.
                    session.rename(temp, probe)
                    temp = probe
            session.rename(temp, remote)
        except BaseException as exc:
            session.discard_upload(still_open, [temp], exc)
            if isinstance(exc, _StatusError):
                _raise_for(exc, "upload failed", remote)
            raise
        return done


def download(
    chan: paramiko.Channel,
    remote: str,
    target: Union[Source, Local],
    *,
    progress: Optional[Progress] = None,
    deadline: Optional[float] = None,
) -> int:
    """Read ``remote`` over SFTP on ``chan`` into ``target``; the bytes received.

    ``chan`` is a new, unused session channel; it is closed on return, also
    on error. ``target`` is a path (written to a temporary file in its
    directory and renamed over it at the end; removed on failure), a binary
    file object (written at its current position; on failure it holds
    part of the file) or a `Local`. ``progress(done, total)`` is called in
    this thread as data arrives; ``total`` is the size the server reported
    at the start (-1 if none), the transfer runs to the file's actual end.

    Raises `FileNotFoundError` or `PermissionError` naming ``remote``;
    `IsADirectoryError` naming it if it is a directory, `ValueError` if it is a
    device or socket (from the FSTAT that gives the size: before any READ and
    before ``target`` is touched; a FIFO's OPEN waits on the server for a
    writer, until ``deadline``); `ExecutorFailure` for other SFTP errors and a
    server that does not start SFTP; `TimeoutError` past ``deadline``;
    connection errors as paramiko raised them. An error of ``target``, of a
    local file or of ``progress`` comes out as a `CallerError` carrying it.
    """
    if progress is not None:
        progress = _callers(progress)
    with _session(chan, deadline) as session:
        local = Local.of(target)
        try:
            handle = session.open(remote, _FXF_READ)
            size, perms = session.fstat(handle)
            # sftp-server opens a directory (or a device) for reading: only its READ would
            # fail (a directory: a bare FAILURE). The FSTAT the size needs tells first.
            _check_regular(perms, remote, "download failed")
            new_bits = 0o666 if perms is None else perms & 0o777
            with local.writing(new_bits) as write:
                done = session.read_file(handle, size, write, progress)
            session.checked(_FXP_CLOSE, _string(handle))
        except _StatusError as exc:
            _raise_for(exc, "download failed", remote)
        # The server closes a handle left open with the channel: no clean-up
        # on failure.
        return done


def remove(chan: paramiko.Channel, remote: str, *more: str,
           deadline: Optional[float] = None) -> bool:
    """Remove remote files ``remote`` and ``more`` over SFTP on ``chan`` (closed on return).

    False if none of them was there. For cleaning up the files of uploads
    broken with their connection (see `upload`'s ``temps``), in one SFTP
    session. Errors as for `upload`; a file the server refuses to remove
    does not keep the others: its error is raised once all were tried.
    """
    found = False
    refused: Optional[_StatusError] = None
    refused_path = remote
    with _session(chan, deadline) as session:
        for path in (remote, *more):
            try:
                found = session.remove(path) or found
            except _StatusError as exc:
                if refused is None:
                    refused, refused_path = exc, path
    if refused is not None:
        _raise_for(refused, "cannot remove", refused_path)
    return found


def _local_copy(source: Source, target: Source, mode: Optional[int],
                progress: Optional[Progress], *, deadline: Optional[float]) -> int:
    check_mode(mode)
    done = 0
    buffer = memoryview(bytearray(LOCAL_BLOCK))
    if progress is not None:
        progress = _callers(progress)
    with Local(source).reading() as (readinto, total, bits):
        with Local(target).writing(bits, mode) as write:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("the deadline passed during the copy")
                size = _fill(readinto, buffer, deadline)
                if not size:
                    break
                write(buffer[:size])
                done += size
                if progress is not None:
                    progress(done, total)
            if not done and progress is not None:
                progress(0, total)
    return done


def local_put(
    source: Source, dest: str, *, mode: Optional[int] = None, progress: Optional[Progress] = None,
    deadline: Optional[float] = None,
) -> int:
    """`upload`'s contract on the local file system: copy ``source`` to path ``dest`` atomically.

    ``source`` is a path or a binary file object. ``dest`` appears whole or
    not at all, with the bits `upload` gives (what comes off a new file's is
    this process's umask, or the directory's default ACL). Local errors, and those of ``source`` and
    ``progress``, come out as a `CallerError` carrying them.
    Past ``deadline`` (a `time.monotonic` value; checked between reads of the
    source) `TimeoutError`, and ``dest`` is left as it was.
    """
    return _local_copy(source, dest, mode, progress, deadline=deadline)


def local_get(source: str, target: Source, *, progress: Optional[Progress] = None,
              deadline: Optional[float] = None) -> int:
    """`download`'s contract on the local file system: copy path ``source`` to ``target``.

    ``target`` is a path (written atomically, with the bits `download`
    gives) or a binary file object. Errors and ``deadline`` as for `local_put`.
    """
    return _local_copy(source, target, None, progress, deadline=deadline)
