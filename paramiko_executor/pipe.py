"""One forwarded connection: a local socket and an SSH channel, pumped both ways.

The tunnels (`tunnels`) and the test server's forwarding (``testing.server``)
carry each forwarded connection with a `Pipe`. It has two threads, one per
direction, so each direction is its own stream: a client's EOF becomes the
channel's EOF while replies keep flowing back. paramiko's transport thread
only appends a channel's data to that channel's buffer, which the window we
granted bounds; the window is given back only as the pipe's thread writes
the data to the local socket. A local reader that stops reading therefore
stops its own channel, never the transport thread, the other channels or
the commands.

What arrives on the channel waits in an `_Inbox`, not in paramiko's own
buffer, which copies each byte three times on its way through and grows
without bound when a server ignores the window. The inbox keeps each packet
as it came, hands the pipe everything at once, and the pipe writes it to
the socket with one ``sendmsg``. A forwarded connection therefore holds at
most its receive window of incoming data (8 MiB on the executor's
connections), plus `UP_BUFFER` and a packet on the way out; a server that
sends past the window ends it (the local socket is reset) with a WARNING.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections import deque
from itertools import islice
from typing import Any, Callable, Deque, List, Optional, Union

import paramiko
from paramiko.common import MSG_CHANNEL_DATA, cMSG_CHANNEL_WINDOW_ADJUST
from paramiko.message import Message

from .errors import TRANSPORT_ERRORS
from .internals import (
    replace_receive_buffers,
    send_when_clear,
    take_send_window,
    window_to_return,
    window_unreturned,
)
from .text import printable

__all__ = ["Pipe", "reset_on_close", "send_all"]

log = logging.getLogger("paramiko_executor.pipe")

#: The buffer each forwarded connection reads its local socket into.
UP_BUFFER = 256 * 1024

#: How often a pipe's thread blocked on its local socket looks whether it was aborted:
#: only a write to a peer that stopped reading stays blocked that long.
SOCKET_POLL = 0.5

#: Packets shorter than this are copied into a shared buffer of up to `SMALL_TOGETHER`
#: bytes: a server sending one byte per packet must not cost an object per byte.
SMALL_PACKET = 4096
SMALL_TOGETHER = 64 * 1024

#: The most buffers one ``sendmsg`` passes: well below IOV_MAX (1024 on Linux,
#: macOS and the BSDs), and a whole 8 MiB window of 32 KiB packets.
SEND_BUFFERS = 256

_SENDMSG = hasattr(socket.socket, "sendmsg")

Chunk = Union[bytes, bytearray]

#: A data message's head: its type, the recipient channel and the data's length.
_DATA = struct.Struct(">BII")


def send_all(chan: paramiko.Channel, data: Union[bytes, memoryview]) -> None:
    """``chan.sendall``, with the Python work per packet cut down.

    Each data message is built in one piece, with one copy of its slice of
    ``data``: ``Channel.send`` builds it field by field and copies the data
    twice before paramiko's packetizer starts, and this way the sending
    thread spends about a sixth less CPU per byte. Waits for window (and
    times out) as ``Channel.send`` does.
    """
    view = memoryview(data)
    transport = chan.get_transport()
    while view:
        size = take_send_window(chan, len(view))
        if size == 0:
            raise OSError("the channel was closed")
        send_when_clear(transport, Message(_DATA.pack(MSG_CHANNEL_DATA, chan.remote_chanid, size)
                                           + view[:size]))
        view = view[size:]


def reset_on_close(sock: socket.socket) -> None:
    """Make the next close send a reset: the client must not take a cut stream for a whole one."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class _Poke:
    """The event paramiko's own buffer of a channel sets when data reaches it: wakes the inbox."""

    def __init__(self, inbox: _Inbox) -> None:
        self._inbox = inbox

    def set(self) -> None:
        self._inbox.poke()

    def clear(self) -> None:
        pass


class _Discard:
    """Stand-in for paramiko's buffer of a forwarded channel's extended data: drops it.

    A byte stream has no stderr; OpenSSH drops such data too. Kept, it would
    grow without bound, as nothing reads it and paramiko ignores the window.
    """

    def feed(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return 0


class _Inbox:
    """Stand-in for paramiko's ``BufferedPipe`` under a forwarded channel's incoming data.

    paramiko's transport thread calls `feed` per packet and `close` at the
    end; the pipe's thread takes everything that arrived with `take`, writes
    it, and gives the window back with `written`. What the inbox holds, plus
    what was taken and not written, plus what was written and not given back,
    is what the server used of the window we granted: a packet past it ends
    the inbox (`violation` says why) and is dropped. A waiting pipe is woken
    once paramiko's thread has handled what it read and next waits for the
    network (``connection._TransportSocket.defer``, as for the commands), so
    a burst of packets costs one wake-up, not one each.

    `install` replaces paramiko's own buffer of a channel that may already
    be receiving: what reached that buffer (before, or while paramiko's thread
    was still handing it a packet) comes first. paramiko's thread uses one
    buffer at a time, so once it fed or closed the inbox, the old buffer gets
    nothing more.
    """

    def __init__(self, chan: paramiko.Channel) -> None:
        self._chan = chan
        self._cond = threading.Condition(threading.Lock())
        self._chunks: Deque[Chunk] = deque()
        self._size = 0
        self._taken = 0  # handed to the pipe and not yet given back as window
        self._closed = False
        self._poked = False  # paramiko's own buffer got something
        self._reached = False  # paramiko's thread fed or closed the inbox: it moved on
        self._before: Any = None  # paramiko's own buffer, until it is known to get nothing more
        self._waiting = False  # the pipe's thread waits in `take`
        self._wake_due = False  # a wake-up is deferred to the transport thread's next read
        sock = chan.get_transport().sock
        self._defer: Optional[Callable[[Callable[[], None]], None]] = getattr(sock, "defer", None)
        #: Why the inbox ended early (the server overran the window), or None.
        self.violation: Optional[str] = None

    def install(self) -> None:
        """Take the channel's incoming data from now on, and what its own buffer holds."""
        chan = self._chan
        with chan.lock:  # paramiko closes the buffer at the EOF and close with it held
            before = chan.in_buffer
            replace_receive_buffers(chan, self, _Discard())
            ended = chan.eof_received or chan.closed
        self._before = before
        self._before.set_event(_Poke(self))  # sets it at once if it holds data or was closed
        if ended:
            self.close()

    # --- paramiko's side (the BufferedPipe interface) -------------------

    def feed(self, data: bytes) -> None:
        size = len(data)
        with self._cond:
            self._reached = True
            if self._closed:
                return
            left = (self._chan.in_window_size - self._size - self._taken
                    - window_unreturned(self._chan))
            if size > left:
                self.violation = f"{size} bytes of data with {max(0, left)} bytes of window left"
                self._end()
                return
            if not size:
                return
            if size < SMALL_PACKET:
                tail = self._chunks[-1] if self._chunks else None
                if isinstance(tail, bytearray) and len(tail) < SMALL_TOGETHER:
                    tail += data
                else:
                    self._chunks.append(bytearray(data))
            else:
                self._chunks.append(data)
            self._size += size
            if self._waiting and not self._wake_due:
                if self._defer is not None:
                    self._wake_due = True
                    self._defer(self._wake)
                else:
                    self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._wake_due = False
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._reached = True
            self._end()

    def _end(self) -> None:
        self._closed = True
        self._cond.notify()

    def read_ready(self) -> bool:
        with self._cond:
            return self._size > 0

    def __len__(self) -> int:
        return self._size

    @property
    def held(self) -> int:
        """Bytes received and not yet given back as window: held here, or taken by the pipe."""
        with self._cond:
            return self._size + self._taken

    def poke(self) -> None:
        with self._cond:
            self._poked = True
            self._cond.notify()

    # --- the pipe's side --------------------------------------------------

    def take(self) -> List[Chunk]:
        """Everything that arrived, in order, waiting for something; [] at the end or a violation.

        Waits until data arrives or the channel is closed (at its EOF or
        close, by `Pipe.abort`, or when the connection ends).
        """
        while True:
            if self._before is not None:
                with self._cond:
                    reached = self._reached
                early = self._before.empty()  # never with our lock: it pokes us with its own
                if reached:
                    self._before = None
            else:
                early = b""
            with self._cond:
                if self.violation is not None:
                    return []  # what is left is part of a stream cut short
                if early:
                    self._chunks.appendleft(early)
                    self._size += len(early)
                if self._chunks:
                    chunks = list(self._chunks)
                    self._chunks.clear()
                    self._taken += self._size
                    self._size = 0
                    return chunks
                if self._closed and self._before is None:
                    return []
                if not self._poked and not self._closed:
                    self._waiting = True
                    try:
                        self._cond.wait()
                    finally:
                        self._waiting = False
                self._poked = False

    def written(self) -> None:
        """Give back the window of what was taken, as paramiko's ``recv`` does, once due."""
        with self._cond:
            size, self._taken = self._taken, 0
        chan = self._chan
        ack = window_to_return(chan, size)
        if ack:
            m = Message()
            m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
            m.add_int(chan.remote_chanid)
            m.add_int(ack)
            send_when_clear(chan.get_transport(), m)


class Pipe:
    """One forwarded connection: a local socket and its channel, each direction its own stream.

    `run` pumps socket to channel in the calling thread and channel to
    socket in a thread of its own. An EOF read on one side is passed on as
    an EOF (the channel's, or a ``shutdown(SHUT_WR)`` of the socket) while
    the other direction goes on. When the connection under the channel is
    lost, or `abort` is called, both directions end at once and the local
    socket is closed with a reset, so its peer never mistakes a cut stream
    for a complete one. ``done(pipe)`` is called once both directions have
    ended and both ends are closed.
    """

    def __init__(self, sock: socket.socket, chan: paramiko.Channel, name: str,
                 done: Callable[[Pipe], None] = lambda pipe: None) -> None:
        self.sock = sock
        self.chan = chan
        self.name = name
        self._done = done
        self._lock = threading.Lock()
        self._running = 2
        self._aborted = False
        self._inbox = _Inbox(chan)
        self._inbox.install()
        self.thread: Optional[threading.Thread] = None

    def run(self) -> None:
        """Pump both directions until both have ended; returns when they have."""
        self.sock.settimeout(SOCKET_POLL)
        self.thread = threading.Thread(target=self._channel_to_socket, daemon=True,
                                       name=f"paramiko_executor tunnel {self.name} in")
        try:
            self.thread.start()
        except BaseException:
            self.discard()
            raise
        self._socket_to_channel()
        self.thread.join()

    @property
    def held(self) -> int:
        """Bytes of the channel's data this pipe holds: received, not yet written to the socket."""
        return self._inbox.held

    def discard(self) -> None:
        """End a pipe that never ran: both ends closed (the local one with a reset)."""
        self.abort()
        with self._lock:
            self._running = 1
        self._end()

    def _socket_to_channel(self) -> None:
        # One buffer for the pipe's life: a fresh bytes object per read costs
        # an mmap, page faults and a munmap.
        buffer = memoryview(bytearray(UP_BUFFER))
        try:
            while True:
                try:
                    size = self.sock.recv_into(buffer)
                except socket.timeout:
                    # A channel the server closed ends the client's connection too.
                    if self._aborted or self.chan.closed:
                        break
                    continue
                except OSError:
                    # A client that reset reads nothing more either: end both directions
                    # now, as a target with nothing to say would never end the other one.
                    self.abort()
                    return
                if not size:
                    break
                send_all(self.chan, buffer[:size])
            if not self._aborted and not self.chan.closed:
                self.chan.shutdown_write()
        except TRANSPORT_ERRORS:
            # A server that closed the channel after its own EOF only stops
            # this direction; the replies already on their way still arrive.
            if self._lost():
                self.abort()
        finally:
            self._end()

    def _channel_to_socket(self) -> None:
        inbox = self._inbox
        try:
            while True:
                chunks = inbox.take()
                if not chunks:
                    break
                self._write(chunks)
                inbox.written()
            if inbox.violation is None and self.chan.eof_received and not self._lost():
                self.sock.shutdown(socket.SHUT_WR)
            else:
                self.abort()  # closed without an EOF: the stream was cut
        except TRANSPORT_ERRORS:
            self.abort()
        finally:
            if inbox.violation is not None:
                log.warning("forwarded connection %s: the server broke the protocol (%s); "
                            "reset", printable(self.name), inbox.violation)
            self._end()

    def _write(self, chunks: List[Chunk]) -> None:
        views: Deque[Union[Chunk, memoryview]] = deque(chunks)
        while views:
            try:
                if _SENDMSG:
                    sent = self.sock.sendmsg(islice(views, SEND_BUFFERS))
                else:
                    sent = self.sock.send(views[0])
            except socket.timeout:
                if self._aborted or self._inbox.violation is not None:
                    raise ConnectionAbortedError("the forwarded connection was aborted") from None
                continue
            while sent:
                first = views[0]
                if sent < len(first):
                    views[0] = memoryview(first)[sent:]
                    break
                views.popleft()
                sent -= len(first)

    def _lost(self) -> bool:
        transport = self.chan.get_transport()
        return self._aborted or transport is None or not transport.is_active()

    def abort(self) -> None:
        """End both directions now (from any thread); the local peer sees a reset."""
        with self._lock:
            if self._aborted or self._running == 0:
                return
            self._aborted = True
        reset_on_close(self.sock)
        try:
            # Wakes a recv; unlike SHUT_WR it sends nothing, so the peer never
            # sees an EOF before the reset. A blocked write notices within SOCKET_POLL.
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        try:
            self.chan.close()  # wakes a recv or send blocked on the channel
        except TRANSPORT_ERRORS:
            pass

    def _end(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if not last:
            return
        try:
            self.chan.close()
        except TRANSPORT_ERRORS:
            pass
        self.sock.close()
        self._done(self)
