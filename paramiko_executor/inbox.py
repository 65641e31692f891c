"""`Inbox`: a forwarded channel's incoming data, held within the window we granted.

paramiko keeps what arrives on a channel in its own buffer, which copies
each byte three times on its way through and grows without bound when a
server sends past the window (paramiko never checks). Every forwarded
channel, a `pipe.Pipe`'s and a `forwarded.ForwardedSocket`'s, reads through
an `Inbox` instead: it keeps each packet as it came, holds at most the window
we granted, and gives the window back only as its reader consumes the data.
A packet past the window ends the inbox: what it held is dropped, its reader
sees the end with `Inbox.violation` saying why, and a WARNING on the
``paramiko_executor.tunnels`` logger names the connection. Extended data
(``stderr``) on a forwarded channel is dropped, as OpenSSH does: a byte
stream has none, and nothing would read it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Union

import paramiko
from paramiko.buffered_pipe import PipeTimeout
from paramiko.common import cMSG_CHANNEL_WINDOW_ADJUST
from paramiko.message import Message

from .errors import TRANSPORT_ERRORS
from .internals import (
    receive_buffer,
    replace_receive_buffers,
    send_when_clear,
    window_to_return,
    window_unreturned,
)
from .sendgate import SendGate
from .text import printable

__all__ = ["Chunk", "Inbox", "gate_of"]

log = logging.getLogger("paramiko_executor.tunnels")

#: Packets shorter than this are copied into a shared buffer of up to `SMALL_TOGETHER`
#: bytes: a server sending one byte per packet must not cost an object per byte.
SMALL_PACKET = 4096
SMALL_TOGETHER = 64 * 1024

#: A piece of received data: a packet, small packets together, or the rest of one
#: that a reader took part of.
Chunk = Union[bytes, bytearray, memoryview]


class _Poke:
    """The event paramiko's own buffer of a channel sets when data reaches it: wakes the inbox."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    def set(self) -> None:
        self._inbox.poke()

    def clear(self) -> None:
        pass


class _Discard:
    """Stand-in for paramiko's buffer of a forwarded channel's extended data: drops it.

    Kept, it would grow without bound, as nothing reads it and paramiko
    ignores the window.
    """

    def feed(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def set_event(self, event: Any) -> None:
        pass  # never readable: ``Channel.fileno`` then follows the inbox alone

    def __len__(self) -> int:
        return 0


class Inbox:
    """Stand-in for paramiko's ``BufferedPipe`` under a forwarded channel's incoming data.

    paramiko's transport thread calls `feed` per packet and `close` at the
    end (the channel's EOF or close, the connection's end). A reader takes
    what arrived with `take` and gives the window back with `written` once
    it consumed it, or does both with `receive`. What the inbox holds, plus
    what was taken and not given back, plus what paramiko counts as read and
    not given back, is what the server used of the window we granted: a
    packet past it ends the inbox (see the module). A waiting reader is
    woken once paramiko's thread has handled what it read and next waits for
    the network (``connection._TransportSocket.defer``, as for the
    commands), so a burst of packets costs one wake-up, not one each. The
    event of ``Channel.fileno`` is set while a `take` would not wait.

    `install` replaces paramiko's own buffer of a channel that may already
    be receiving: what reached that buffer (before, or while paramiko's thread
    was still handing it a packet) comes first. paramiko's thread uses one
    buffer at a time, so once it fed or closed the inbox, the old buffer gets
    nothing more.

    Locks: the condition's lock (``_lock``) guards everything above and is taken last (under
    the channel's lock by ``Channel.fileno`` and at the channel's EOF and
    close); the old buffer's lock, which pokes the inbox, is never taken
    while it is held.
    """

    def __init__(self, chan: paramiko.Channel, name: str) -> None:
        self._chan = chan
        self._name = name
        # Taken by ``with self._lock``: the lock's own __enter__ is C, where an
        # interrupt (Ctrl-C) cannot land between taking it and the block's start.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._chunks: Deque[Chunk] = deque()
        self._size = 0
        self._taken = 0  # handed to a reader and not yet given back as window
        self._closed = False
        self._poked = False  # paramiko's own buffer got something since it was last emptied
        self._reached = False  # the channel fed or closed the inbox: it moved on
        self._before: Any = None  # paramiko's own buffer, until it is known to get nothing more
        self._early = 0  # chunks at the front that came from it: the ones fed to us follow them
        self._gathering = threading.Lock()  # one reader at a time moves the old buffer's data
        self._waiting = 0  # readers waiting in `take`
        self._wake_due = False  # a wake-up is deferred to the transport thread's next read
        self._event: Any = None  # ``Channel.fileno``'s, once it was asked for
        sock = chan.get_transport().sock
        self._defer: Optional[Callable[[Callable[[], None]], None]] = getattr(sock, "defer", None)
        #: Why the inbox ended early (the server overran the window), or None.
        self.violation: Optional[str] = None
        #: The channel's `sendgate.SendGate`: found here (`gate_of`) by the hook
        #: that answers the server's CLOSE.
        self.gate = SendGate(chan)

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
        # Now, not at the first read: what it holds counts against the window at once.
        self._gather()

    # --- paramiko's side (the BufferedPipe interface) -------------------

    def feed(self, data: bytes) -> None:
        size = len(data)
        with self._lock:
            self._reached = True
            if self._closed:
                return
            left = (self._chan.in_window_size - self._size - self._taken
                    - window_unreturned(self._chan))
            if size <= left:
                if size:
                    self._append(data)
                return
            self.violation = f"{size} bytes of data with {max(0, left)} bytes of window left"
            self._chunks.clear()  # part of a stream cut short: no reader gets it
            self._size = 0
            self._end()
        log.warning("forwarded connection %s: the server broke the protocol (%s); reset",
                        printable(self._name), self.violation)

    def _append(self, data: bytes) -> None:
        size = len(data)
        if size < SMALL_PACKET:
            tail = self._chunks[-1] if self._chunks else None
            if isinstance(tail, bytearray) and len(tail) < SMALL_TOGETHER:
                tail += data
            else:
                self._chunks.append(bytearray(data))
        else:
            self._chunks.append(data)
        self._size += size
        if self._event is not None:
            self._event.set()
        if self._waiting and not self._wake_due:
            if self._defer is not None:
                self._wake_due = True
                self._defer(self._wake)
            else:
                self._cond.notify_all()

    def _wake(self) -> None:
        with self._lock:
            self._wake_due = False
            self._cond.notify_all()

    def close(self) -> None:
        with self._lock:
            self._reached = True
            self._end()

    def _end(self) -> None:
        self._closed = True
        if self._event is not None:
            self._event.set()
        self._cond.notify_all()

    def read(self, nbytes: int, timeout: Optional[float] = None) -> bytes:
        """For a caller of the channel's own ``recv``, which gives the window back itself.

        Until it has, what it read counts nowhere: the server may overrun
        the window by up to ``nbytes`` unnoticed. The inbox's readers use
        `receive`, which is exact.
        """
        try:
            return _joined(self.take(nbytes, timeout, counted=False))
        except socket.timeout:
            raise PipeTimeout() from None

    def read_ready(self) -> bool:
        with self._lock:
            return self._size > 0

    def set_event(self, event: Any) -> None:
        """Set ``event`` while a `take` would not wait, clear it otherwise (``Channel.fileno``)."""
        with self._lock:
            self._event = event
            if self._ready():
                event.set()
            else:
                event.clear()

    def __len__(self) -> int:
        return self._size

    @property
    def held(self) -> int:
        """Bytes received and not yet given back as window: held here, or taken by a reader."""
        with self._lock:
            return self._size + self._taken

    def poke(self) -> None:
        with self._lock:
            self._poked = True
            if self._event is not None:
                self._event.set()
            self._cond.notify_all()

    # --- the reader's side ------------------------------------------------

    def _ready(self) -> bool:
        # Under the lock. Data may wait in the old buffer while it is poked.
        return bool(self._size or self._closed or (self._before is not None and self._poked))

    def _gather(self) -> bool:
        """Move what paramiko's own buffer holds to the front; drop it once the channel moved on.

        True when the old buffer was emptied after the channel moved on (or
        was already dropped): no data fed to the inbox can precede what it held.
        """
        with self._gathering:
            before = self._before
            if before is None:
                return True
            with self._lock:
                reached = self._reached
                self._poked = False  # a poke from now on means more data
            early = before.empty()  # never with our lock: it pokes us with its own
            with self._lock:
                if reached:
                    self._before = None
                if early:
                    # After what earlier gathers moved, before anything fed to the inbox.
                    self._chunks.insert(self._early, early)
                    self._early += 1
                    self._size += len(early)
            return reached

    def take(self, limit: Optional[int] = None, timeout: Optional[float] = None, *,
             counted: bool = True) -> List[Chunk]:
        """What arrived, in order (``limit`` bytes at most); [] at the end or after a violation.

        Waits until data arrives or the channel is closed (at its EOF or
        close, or when the connection ends), ``timeout`` seconds at most
        (None: no limit), then raises `socket.timeout`. What it returns
        counts as taken (see `written`) unless ``counted`` is false.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            gathered = self._gather()
            with self._lock:
                if self.violation is not None:
                    return []
                if not gathered and self._reached:
                    # Fed while the old buffer was emptied: paramiko's thread may have put
                    # a packet there before that, which comes first. Gather again.
                    continue
                if self._chunks:
                    chunks = self._pop(limit, counted)
                    if self._event is not None and not self._ready():
                        self._event.clear()
                    return chunks
                if self._closed and self._before is None:
                    return []
                if not self._ready():
                    if deadline is None:
                        remaining = None
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise socket.timeout("timed out")
                    self._waiting += 1
                    try:
                        self._cond.wait(remaining)
                    finally:
                        self._waiting -= 1

    def _pop(self, limit: Optional[int], counted: bool) -> List[Chunk]:
        chunks = self._chunks
        if limit is None or limit >= self._size:
            out = list(chunks)
            chunks.clear()
            self._early = 0
        else:
            out = []
            need = limit
            while need:
                first = chunks[0]
                if len(first) > need:
                    # A view of the rest: no copy of it per small read.
                    view = memoryview(first)
                    out.append(view[:need])
                    chunks[0] = view[need:]
                    break
                out.append(chunks.popleft())
                self._early = max(0, self._early - 1)
                need -= len(first)
        size = sum(len(chunk) for chunk in out)
        self._size -= size
        if counted:
            self._taken += size
        return out

    def written(self) -> None:
        """Give back the window of what was taken, as paramiko's ``recv`` does, once due."""
        with self._lock:
            size, self._taken = self._taken, 0
        chan = self._chan
        ack = window_to_return(chan, size)
        if ack:
            m = Message()
            m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
            m.add_int(chan.remote_chanid)
            m.add_int(ack)
            send_when_clear(chan.get_transport(), m)

    def receive(self, nbytes: int, timeout: Optional[float]) -> bytes:
        """Up to ``nbytes`` bytes (b"" as `take` returns []), their window given back as due."""
        data = _joined(self.take(nbytes, timeout))
        try:
            self.written()
        except TRANSPORT_ERRORS:
            pass  # the connection's end: the next read tells
        return data


def gate_of(chan: paramiko.Channel) -> Optional[SendGate]:
    """The send gate of a channel that reads through an `Inbox`; None for any other channel."""
    inbox = receive_buffer(chan)
    return inbox.gate if isinstance(inbox, Inbox) else None


def _joined(chunks: List[Chunk]) -> bytes:
    if len(chunks) == 1:
        first = chunks[0]
        if type(first) is bytes:  # a whole packet: no copy
            return first
    return b"".join(chunks)
