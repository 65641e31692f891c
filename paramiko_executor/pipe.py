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

What arrives on the channel waits in an `inbox.Inbox`, not in paramiko's
own buffer. The pipe takes everything that arrived at once and writes it to
the socket with one ``sendmsg``. A forwarded connection therefore holds at
most its receive window of incoming data (8 MiB on the executor's
connections), plus `UP_BUFFER` and a packet on the way out; a server that
sends past the window ends it (the local socket is reset) with a WARNING.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque
from itertools import islice
from typing import Any, Callable, Deque, List, Optional, TypeVar, Union

import paramiko
from paramiko.common import MSG_CHANNEL_DATA
from paramiko.message import Message

from .errors import TRANSPORT_ERRORS
from .inbox import Chunk, Inbox
from .internals import WITHIN, WriteDeadline, send_within, take_send_window
from .sendgate import SendGate
from .waits import writable_within

__all__ = ["Pipe", "reset_on_close", "send_all"]

#: The buffer each forwarded connection reads its local socket into.
UP_BUFFER = 256 * 1024

#: How often a pipe's thread blocked reading its local socket looks whether the channel
#: closed (an `Pipe.abort` wakes it at once).
SOCKET_POLL = 0.5

#: How often a thread waiting to write to a local socket (a peer that stopped reading)
#: or to connect one looks whether it was stopped: no wake-up reaches a blocked write,
#: so this bounds how long `Tunnel.close` waits for it. Each look is a wake-up of
#: that thread: shorter costs CPU for every client that stopped reading.
WRITE_POLL = 0.25

#: The most buffers one ``sendmsg`` passes: well below IOV_MAX (1024 on Linux,
#: macOS and the BSDs), and a whole 8 MiB window of 32 KiB packets.
SEND_BUFFERS = 256

_SENDMSG = hasattr(socket.socket, "sendmsg")
#: A data message's head: its type, the recipient channel and the data's length.
_DATA = struct.Struct(">BII")

_T = TypeVar("_T")


def send_all(chan: paramiko.Channel, gate: SendGate, data: Union[bytes, memoryview], *,
             whole: bool = True, deadline: WriteDeadline = WITHIN) -> int:
    """``chan.sendall`` (or, ``whole`` false, ``chan.send``), with the work per packet cut down.

    Each data message is built in one piece, with one copy of its slice of
    ``data``: ``Channel.send`` builds it field by field and copies the data
    twice before paramiko's packetizer starts, and this way the sending
    thread spends about a sixth less CPU per byte. Waits for window (and
    times out) as ``Channel.send`` does, and for a key exchange no longer
    than the channel's timeout either. Each message passes ``gate`` (the
    channel's), so no CLOSE of the channel overtakes it. Returns the count
    sent: all of ``data``, or with ``whole`` false what one message took.
    A packet's write is bounded by ``deadline`` (by default the channel's
    timeout) as `internals.send_if_clear`'s, raising `WriteAbandoned` (a
    `TimeoutError`) past it.
    """
    view = memoryview(data)
    transport = chan.get_transport()
    sent = 0
    while view:
        size = take_send_window(chan, len(view))
        try:  # the finally covers the enter too: an interrupt may land as it returns
            if size == 0 or not gate.enter():
                raise OSError("the channel was closed")
            message = Message(_DATA.pack(MSG_CHANNEL_DATA, chan.remote_chanid, size)
                              + view[:size])
            # A key exchange the server stalls holds the send: no longer than the
            # channel's timeout, as a full window does.
            if not send_within(transport, message, chan.gettimeout(), deadline=deadline):
                with chan.lock:
                    chan.out_window_size += size  # taken above, never used
                raise socket.timeout("a key exchange held the send past the timeout")
        finally:
            gate.leave()
        view = view[size:]
        sent += size
        if not whole:
            break
    return sent


def reset_on_close(sock: socket.socket) -> None:
    """Make the next close send a reset: the client must not take a cut stream for a whole one."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class Pipe:
    """One forwarded connection: a local socket and its channel, each direction its own stream.

    `run` pumps socket to channel in the calling thread and channel to
    socket in a thread of its own. An EOF read on one side is passed on as
    an EOF (the channel's, or a ``shutdown(SHUT_WR)`` of the socket) while
    the other direction goes on. When the connection under the channel is
    lost, or `abort` is called, both directions end at once and the local
    socket is closed with a reset, so its peer never mistakes a cut stream
    for a complete one. That close waits for no channel: a thread stuck
    sending on the channel (a server that stopped reading) does not hold the
    local peer's connection open. ``done(pipe)`` is called once both
    directions have ended and both ends are closed (the socket, with an
    `abort` in flight on another thread, as that returns).

    Every call on the local socket passes ``_sock_gate``, and the socket is
    closed only once no call is in flight (by whoever is last out). Closing a
    descriptor another thread is inside a call on is unsafe: the call is not
    woken, and it may land on whatever socket or file takes the number next.
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
        self._abort_done = False
        # Here, while no other thread knows the pipe: an `abort` may close the socket
        # as soon as it is known, and a call on it after that fails.
        sock.settimeout(SOCKET_POLL)
        #: The calls in flight on the local socket, and its close (the channel's gate's
        #: rule: the close waits for no call, it is left to the last call out).
        self._sock_gate = SendGate(chan)
        self._inbox = Inbox(chan, name)
        self._inbox.install()
        self.thread: Optional[threading.Thread] = None

    def run(self) -> None:
        """Pump both directions until both have ended; returns when they have."""
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
                    size = self._on_socket(self.sock.recv_into, buffer)
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
                send_all(self.chan, self._inbox.gate, buffer[:size])
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
            # The server's EOF came after all its data, and all of it was written:
            # complete, even if the connection was lost since (paramiko never sets
            # eof_received for a loss, and the inbox hands out all it holds first).
            if inbox.violation is None and self.chan.eof_received and not self._aborted:
                self._on_socket(self.sock.shutdown, socket.SHUT_WR)
            else:
                self.abort()  # closed without an EOF: the stream was cut
        except TRANSPORT_ERRORS:
            self.abort()
        finally:
            self._end()

    def _write(self, chunks: List[Chunk]) -> None:
        views: Deque[Union[Chunk, memoryview]] = deque(chunks)
        while views:
            # A write blocked on a full socket would notice an abort only at the
            # socket's timeout: it waits here instead, looking every WRITE_POLL.
            if not self._on_socket(writable_within, self.sock, WRITE_POLL):
                self._check_going()
                continue
            try:
                if _SENDMSG:
                    sent = self._on_socket(self.sock.sendmsg, islice(views, SEND_BUFFERS))
                else:
                    sent = self._on_socket(self.sock.send, views[0])
            except socket.timeout:
                self._check_going()
                continue
            while sent:
                first = views[0]
                if sent < len(first):
                    views[0] = memoryview(first)[sent:]
                    break
                views.popleft()
                sent -= len(first)

    def _check_going(self) -> None:
        if self._aborted or self._inbox.violation is not None:
            raise ConnectionAbortedError("the forwarded connection was aborted")

    def _on_socket(self, call: Callable[..., _T], *args: Any) -> _T:
        """``call(*args)``, a call on the local socket, which stays open until it returns.

        `ConnectionAbortedError` once the socket is closed (the pipe was aborted).
        """
        gate = self._sock_gate
        try:  # the finally covers the enter too: an interrupt may land as it returns
            if not gate.enter():
                raise ConnectionAbortedError("the forwarded connection was aborted")
            return call(*args)
        finally:
            gate.leave()

    def _cut(self) -> None:
        reset_on_close(self.sock)
        try:
            # Wakes a recv. Not SHUT_RDWR: SHUT_WR sends a FIN, and the peer would read
            # an EOF, a complete stream, before the reset. A write notices within WRITE_POLL.
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _lost(self) -> bool:
        transport = self.chan.get_transport()
        return self._aborted or transport is None or not transport.is_active()

    def abort(self) -> None:
        """End both directions now (from any thread); the local peer sees a reset."""
        with self._lock:
            # Its steps may run twice: an abort interrupted (Ctrl-C in `Tunnel.close`)
            # is finished by the next, not taken as done.
            if self._abort_done or self._running == 0:
                return
            self._aborted = True
        try:
            self._on_socket(self._cut)
        except ConnectionAbortedError:
            pass  # closed already
        # Now, not at `_end`: that waits for both threads, and one may be stuck
        # sending on the channel (on TCP, to a server that stopped reading) while
        # the local peer waits for its connection to end.
        self._sock_gate.close(self.sock.close)
        # Wakes a recv or send blocked on the channel; after the data message in flight.
        self._inbox.gate.close_channel()
        with self._lock:
            self._abort_done = True

    def _end(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if not last:
            return
        self._inbox.gate.close_channel()
        self._sock_gate.close(self.sock.close)
        self._done(self)
