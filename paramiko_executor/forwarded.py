"""`ForwardedSocket`: what `SSHExecutor.open_connection` returns, a socket-like channel."""

from __future__ import annotations

import errno
import io
import threading
import warnings
import weakref
from typing import Any, Callable, Optional

import paramiko

from .errors import TRANSPORT_ERRORS
from .pipe import send_all

__all__ = ["ForwardedSocket"]


class ForwardedSocket:
    """What `open_connection` returns: a socket-like object over a ``direct-tcpip`` channel.

    ``sendall``, ``send``, ``recv``, ``recv_into``, ``makefile``,
    ``settimeout``, ``gettimeout``, ``shutdown``, ``close``, and a context
    manager. ``recv`` returns ``b""`` at the far end's EOF; a connection lost
    meanwhile raises `ConnectionResetError` instead, so a cut stream never
    looks complete, and reading or writing after `close` (or the executor's
    close) raises `OSError` (``EBADF``), as with a socket. As with a
    socket, `close` leaves the connection open while a file from `makefile`
    is still open (``http.client`` reads a response through its file after
    closing the socket); closing the last of them closes the channel and
    frees its place under ``max_forwarded``. One dropped unclosed is closed
    when garbage-collected (with a `ResourceWarning`), as a socket is.
    """

    def __init__(self, chan: paramiko.Channel, release: Callable[[], None], name: str) -> None:
        self._chan = chan
        self._release: Optional[Callable[[], None]] = release
        # Dropped unclosed, it is closed when collected, as a socket is: else its place
        # under max_forwarded would be gone for the executor's life.
        self._finalizer = weakref.finalize(self, _abandoned, chan, release, name)
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

    def _check_cut(self) -> None:
        transport = self._chan.get_transport()
        if not self._chan.eof_received and (transport is None or not transport.is_active()
                                            or self._chan.closed):
            raise ConnectionResetError(f"the forwarded connection to {self.name} was cut")

    def recv(self, size: int) -> bytes:
        self._check_open()
        data: bytes = self._chan.recv(size)
        if not data:
            self._check_open()  # closed meanwhile (`close`, the executor's close)
            self._check_cut()
        return data

    def recv_into(self, buffer: Any, size: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = self.recv(size or len(view))
        view[:len(data)] = data
        return len(data)

    def send(self, data: bytes) -> int:
        self._check_open()
        sent: int = self._chan.send(data)
        return sent

    def sendall(self, data: bytes) -> None:
        self._check_open()
        send_all(self._chan, data)

    def makefile(self, mode: str = "r", buffering: Optional[int] = None, *,
                 encoding: Optional[str] = None, errors: Optional[str] = None,
                 newline: Optional[str] = None) -> Any:
        """A file over this connection, as ``socket.makefile`` makes one."""
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
        buffer: Any
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, size)
        elif reading:
            buffer = io.BufferedReader(raw, size)
        else:
            buffer = io.BufferedWriter(raw, size)
        if "b" in mode:
            return buffer
        return io.TextIOWrapper(buffer, encoding, errors, newline)

    def _file_closed(self) -> None:
        with self._lock:
            self._files -= 1
            last = self._closing and self._files == 0
        if last:
            self._close_now()

    def settimeout(self, timeout: Optional[float]) -> None:
        self._chan.settimeout(timeout)

    def gettimeout(self) -> Optional[float]:
        timeout: Optional[float] = self._chan.gettimeout()
        return timeout

    def setblocking(self, flag: bool) -> None:
        self._chan.setblocking(flag)

    def shutdown(self, how: int) -> None:
        self._check_open()
        self._chan.shutdown(how)

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
        self._finalizer.detach()
        _end(self._chan, release)

    def _forget_after_fork(self) -> None:
        """In a forked child: closed, without touching the parent's channel."""
        self._lock = threading.Lock()
        self._release = None
        self._finalizer.detach()

    def __enter__(self) -> ForwardedSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _end(chan: paramiko.Channel, release: Callable[[], None]) -> None:
    """Close ``chan`` and give its place back."""
    try:
        chan.close()
    except TRANSPORT_ERRORS:
        pass
    finally:
        release()


def _abandoned(chan: paramiko.Channel, release: Callable[[], None], name: str) -> None:
    warnings.warn(f"unclosed forwarded connection to {name}", ResourceWarning, stacklevel=2)
    _end(chan, release)


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

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._sock.sendall(bytes(view))
        return len(view)

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._sock._file_closed()
