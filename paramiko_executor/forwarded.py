"""`ForwardedSocket`: what `SSHExecutor.open_connection` returns, a socket-like channel."""

from __future__ import annotations

import contextlib
import errno
import io
import math
import socket
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator, Literal, Optional, Union, cast, overload

import paramiko

from .checks import check_int, check_number
from .inbox import Inbox
from .pipe import send_all
from .sendgate import SendGate

__all__ = ["ForwardedSocket"]



#: ``makefile`` modes, as ``socket.makefile`` takes them: text, and binary.
_TextMode = Literal["r", "w", "rw", "wr"]
_BinaryMode = Literal["b", "rb", "br", "wb", "bw", "rwb", "rbw", "wrb", "wbr", "brw", "bwr"]


class ForwardedSocket:
    """What `open_connection` returns: a socket-like object over a ``direct-tcpip`` channel.

    ``sendall``, ``send``, ``recv``, ``recv_into``, ``makefile``,
    ``settimeout``, ``gettimeout``, ``setblocking``, ``fileno``,
    ``shutdown``, ``close``, and a context manager. Timeouts are a socket's:
    ``None`` blocks, a number of seconds raises `TimeoutError` past it, and
    ``0`` never blocks (`BlockingIOError` when nothing can be read or sent
    now). ``recv`` returns ``b""`` at the far end's EOF; a connection lost
    meanwhile raises `ConnectionResetError` instead, so a cut stream never
    looks complete, and reading or writing after `close` (or the executor's
    close) raises `OSError` (``EBADF``), as with a socket. What arrives waits
    in an `inbox.Inbox`, within the window granted to the server: a server
    that sends past it resets the connection (with a WARNING), and every
    read and write from then on raises `ConnectionResetError`. A write raises
    `ConnectionResetError` when the connection is lost, `BrokenPipeError`
    after ``shutdown(SHUT_WR)`` or once the far end closed; after
    ``shutdown(SHUT_RD)`` a read returns what is buffered, then ``b""``. As with a
    socket, `close` leaves the connection open while a file from `makefile`
    is still open (``http.client`` reads a response through its file after
    closing the socket); closing the last of them closes the channel and
    frees its place under ``max_forwarded``. One dropped unclosed is closed
    when garbage-collected (with a `ResourceWarning`), as a socket is.
    ``ssl`` cannot wrap it (it needs a real socket): TLS goes through
    ``forward_local``, whose port gives one.
    """

    def __init__(self, chan: paramiko.Channel, release: Callable[[], None], name: str) -> None:
        self._chan = chan
        self._inbox = Inbox(chan, name)
        self._inbox.install()
        self._release: Optional[Callable[[], None]] = release
        # Dropped unclosed, it is closed when collected, as a socket is: else its place
        # under max_forwarded would be gone for the executor's life.
        self._finalizer = weakref.finalize(self, _abandoned, self._inbox.gate, release, name)
        self._finalizer.atexit = False
        self._lock = threading.Lock()
        self._files = 0
        self._closing = False
        self.name = name

    def __repr__(self) -> str:
        return f"<ForwardedSocket {self.name}{' closed' if self.closed else ''}>"

    @property
    def closed(self) -> bool:
        """Whether the channel is closed (`close` was called and no file is open)."""
        return self._release is None

    @property
    def channel(self) -> paramiko.Channel:
        """The underlying paramiko channel."""
        return self._chan

    def _check_open(self) -> None:
        # As a closed socket does: an error, never an empty read that looks like the end,
        # nor a write (in a forked child) into the parent's connection.
        if self.closed:
            raise OSError(errno.EBADF, f"the forwarded connection to {self.name} is closed")

    def _check_reset(self) -> None:
        violation = self._inbox.violation
        if violation is not None:
            raise ConnectionResetError(errno.ECONNRESET, f"the forwarded connection to "
                                                         f"{self.name} was reset: the server "
                                                         f"sent {violation}")

    def _check_cut(self) -> None:
        transport = self._chan.get_transport()
        if not self._chan.eof_received and (transport is None or not transport.is_active()
                                            or self._chan.closed):
            raise ConnectionResetError(f"the forwarded connection to {self.name} was cut")

    @contextlib.contextmanager
    def _blocking_as_socket(self) -> Iterator[None]:
        # paramiko times out at once without a timeout; a socket says it would block.
        try:
            yield
        except socket.timeout:
            if self._chan.gettimeout() == 0.0:
                raise BlockingIOError(errno.EAGAIN, f"the forwarded connection to {self.name} "
                                                    "is not ready") from None
            raise

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes; ``b""`` at the far end's EOF (``flags`` must be 0)."""
        check_int("bufsize", bufsize, minimum=0)
        _check_flags(flags)
        self._check_open()
        if bufsize == 0:
            return b""
        self._check_reset()
        with self._blocking_as_socket():
            data = self._inbox.receive(bufsize, self._chan.gettimeout())
        if not data:
            self._check_open()  # closed meanwhile (`close`, the executor's close)
            self._check_reset()
            self._check_cut()
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """As `recv`, into ``buffer`` (``nbytes`` of it, 0: all of it); the count read."""
        view = memoryview(buffer).cast("B")
        if view.readonly:  # before reading: what was read would be lost
            raise TypeError("buffer must be a writable bytes-like object")
        check_int("nbytes", nbytes, minimum=0)
        if nbytes > len(view):
            raise ValueError(f"nbytes must be at most the buffer's size ({len(view)}), "
                             f"not {nbytes}")
        data = self.recv(nbytes or len(view), flags)
        view[:len(data)] = data
        return len(data)

    def send(self, data: Union[bytes, bytearray, memoryview], flags: int = 0) -> int:
        """Send what fits in the channel's window now (waiting as the timeout allows); the count."""
        _check_flags(flags)
        view = memoryview(data).cast("B")
        self._check_writable()
        with self._sending():
            return send_all(self._chan, self._inbox.gate, view, whole=False)

    def sendall(self, data: Union[bytes, bytearray, memoryview], flags: int = 0) -> None:
        """Send all of ``data``, as the window opens; past the timeout, `TimeoutError`.

        ``BrokenPipeError`` after ``shutdown(SHUT_WR)``; ``ConnectionResetError``
        when the connection is lost during the write.
        """
        _check_flags(flags)
        view = memoryview(data).cast("B")
        self._check_writable()
        with self._sending():
            send_all(self._chan, self._inbox.gate, view)

    def _check_writable(self) -> None:
        self._check_open()
        self._check_reset()
        if self._chan.eof_sent:
            raise BrokenPipeError(errno.EPIPE, f"the forwarded connection to {self.name} "
                                               "is shut down for writing")

    @contextlib.contextmanager
    def _sending(self) -> Iterator[None]:
        # paramiko raises EOFError (no OSError) when the connection dies under a send,
        # and a bare OSError on a closed channel: a socket's errors instead.
        try:
            with self._blocking_as_socket():
                yield
        except (EOFError, paramiko.SSHException):
            raise ConnectionResetError(errno.ECONNRESET, f"the forwarded connection to "
                                                         f"{self.name} was cut") from None
        except OSError as exc:
            if type(exc) is not OSError:  # a timeout, "not ready": the caller's to handle
                raise
            self._check_writable()  # closed by us, or shut down for writing
            self._check_cut()
            raise BrokenPipeError(errno.EPIPE, f"the forwarded connection to {self.name} "
                                               "was closed by the far end") from None

    @overload
    def makefile(self, mode: _TextMode = "r", buffering: Optional[int] = None, *,
                 encoding: Optional[str] = None, errors: Optional[str] = None,
                 newline: Optional[str] = None) -> io.TextIOWrapper: ...

    @overload  # a buffering only known as an int may be 0 too: the next one, then
    def makefile(self, mode: _BinaryMode, buffering: Literal[0], *,  # type: ignore[overload-overlap]
                 encoding: None = None, errors: None = None,
                 newline: None = None) -> io.RawIOBase: ...

    @overload
    def makefile(self, mode: _BinaryMode, buffering: Optional[int] = None, *,
                 encoding: None = None, errors: None = None,
                 newline: None = None) -> io.BufferedIOBase: ...

    @overload
    def makefile(self, mode: str, buffering: Optional[int] = None, *,
                 encoding: Optional[str] = None, errors: Optional[str] = None,
                 newline: Optional[str] = None) -> io.IOBase: ...

    def makefile(self, mode: str = "r", buffering: Optional[int] = None, *,
                 encoding: Optional[str] = None, errors: Optional[str] = None,
                 newline: Optional[str] = None) -> io.IOBase:
        """A file over this connection, as ``socket.makefile`` makes one.

        A text file (`io.TextIOWrapper`) for modes without ``"b"``; a buffered
        binary file (`io.BufferedIOBase`) for ``"rb"``/``"wb"``/``"rwb"``, raw
        (`io.RawIOBase`) with ``buffering=0``.
        """
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing = "w" in mode
        reading = "r" in mode or not writing
        with self._lock:
            if self._release is None:
                raise OSError("the forwarded connection is closed")
            self._files += 1
        raw = _ChannelIO(self, reading, writing)
        size = io.DEFAULT_BUFFER_SIZE if buffering is None or buffering < 0 else buffering
        if size == 0:
            if "b" not in mode:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: io.BufferedIOBase
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, size)
        elif reading:
            buffer = io.BufferedReader(raw, size)
        else:
            buffer = io.BufferedWriter(raw, size)
        if "b" in mode:
            return buffer
        # typeshed's TextIOWrapper wants a buffer with ``name``, which a BufferedRWPair lacks.
        return io.TextIOWrapper(cast(Any, buffer), encoding, errors, newline)

    def _file_closed(self) -> None:
        with self._lock:
            self._files -= 1
            last = self._closing and self._files == 0
        if last:
            self._close_now()

    def settimeout(self, timeout: Optional[float]) -> None:
        """As ``socket.settimeout``: None blocks, 0 never blocks, else that many seconds."""
        seconds = check_number("timeout", timeout, allow_zero=True)
        self._check_open()
        self._chan.settimeout(None if seconds is None or math.isinf(seconds) else seconds)

    def gettimeout(self) -> Optional[float]:
        """The timeout `settimeout` set: None (blocking), 0.0 (non-blocking) or seconds."""
        timeout: Optional[float] = self._chan.gettimeout()
        return timeout

    def setblocking(self, flag: bool) -> None:
        """As a socket's: True is ``settimeout(None)``, False ``settimeout(0)``."""
        self.settimeout(None if flag else 0.0)

    def fileno(self) -> int:
        """A descriptor for ``select``, ``poll``, ``selectors``: readable when `recv` won't block.

        That is: data is waiting, or the far end's EOF, the connection's
        end or a reset has come. It is paramiko's stand-in for the channel (there is no
        socket): never reported writable, and never to be read or written.
        -1 once closed, as a socket's.
        """
        with self._lock:
            if self._release is None:
                return -1
            # Under the lock: after a close it would make the channel a new pipe.
            fileno: int = self._chan.fileno()
            return fileno

    def shutdown(self, how: int) -> None:
        """As a socket's: ``SHUT_WR`` sends EOF, ``SHUT_RD`` ends reading after what is buffered.

        ``how`` is ``socket.SHUT_RD``, ``SHUT_WR`` or ``SHUT_RDWR`` (else
        ``ValueError``). After ``SHUT_RD`` `recv` returns the buffered data,
        then ``b""``; after ``SHUT_WR`` `send` raises ``BrokenPipeError``.
        """
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise ValueError(f"how must be SHUT_RD, SHUT_WR or SHUT_RDWR, not {how!r}")
        self._check_open()
        with self._sending():
            self._chan.shutdown(how)
        if how != socket.SHUT_WR:
            # paramiko only stops granting window: a read would wait for data, where
            # a socket's returns what is buffered and then b"" at once.
            self._inbox.close()

    def close(self) -> None:
        """Close the connection once no file of `makefile` is open; again: nothing."""
        with self._lock:
            self._closing = True
            now = self._files == 0
        if now:
            self._close_now()

    def _close_now(self) -> None:
        """Close the channel and free its place, open files or not."""
        with self._lock:
            release, self._release = self._release, None
        if release is None:
            return
        try:
            _end(self._inbox.gate, release)
        except BaseException:
            # An interrupt (Ctrl-C) before the place was given back (``release`` runs
            # once, whole): the next close gives it back, or the finalizer.
            with self._lock:
                self._release = release
            raise
        self._finalizer.detach()

    def _forget_after_fork(self) -> None:
        """In a forked child: closed, without touching the parent's channel."""
        self._lock = threading.Lock()
        self._release = None
        self._finalizer.detach()

    def __enter__(self) -> ForwardedSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_flags(flags: int) -> None:
    if flags != 0:
        raise ValueError(f"flags must be 0 on a forwarded connection, not {flags!r}")


def _end(gate: SendGate, release: Callable[[], None]) -> None:
    """Close the channel of ``gate`` (after the data message in flight) and give its place back."""
    try:
        gate.close_channel()
    finally:
        release()


def _abandoned(gate: SendGate, release: Callable[[], None], name: str) -> None:
    try:
        warnings.warn(f"unclosed forwarded connection to {name}", ResourceWarning, stacklevel=2)
    finally:  # also when warnings are errors (``-W error``), as a socket's close
        _end(gate, release)


class _ChannelIO(io.RawIOBase):
    """The raw file under `ForwardedSocket.makefile`; closing it gives up its hold on the socket."""

    def __init__(self, sock: ForwardedSocket, reading: bool, writing: bool) -> None:
        super().__init__()
        self._sock = sock
        self._reading = reading
        self._writing = writing

    def readable(self) -> bool:
        return self._reading

    def writable(self) -> bool:
        return self._writing

    # As ``socket.SocketIO``: None, not an error, when a non-blocking socket is not ready.
    def readinto(self, buffer: Any) -> Optional[int]:
        try:
            return self._sock.recv_into(buffer)
        except BlockingIOError:
            return None

    def write(self, data: Any) -> Optional[int]:
        try:
            # A view: the rest is not copied for each packet sent.
            return self._sock.send(memoryview(data))
        except BlockingIOError:
            return None

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._sock._file_closed()
