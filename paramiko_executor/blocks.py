"""``bounded_connection`` blocks: the slot each holds, until the server closed its sessions.

A block yields the connection's paramiko ``Transport`` with one slot
reserved, and the caller opens session channels on it through paramiko's own
API. The slot covers those sessions as it covers a command's: it is free
again only once the server closed every session channel opened in the block.
The block's end is not that moment: OpenSSH keeps a session whose command
still runs after our CLOSE (until the command ends), so an open sent on a
slot freed at the block's end would be refused, and a refusal with no
session ending lowers an unprobed cap for the connection's life
(`connection.Connection.refused`). A channel the caller left open is closed
as the block ends, as the block's other resources are: a paramiko channel
holds a session on the server for as long as it is open, and a slot that
waited for the channel's user to close it could wait for good.

Which opens are a block's: the session channels opened through the
transport's ``open_channel`` (``open_session``, ``open_sftp_client``, ...)
while the block runs; the executor opens its own channels without it
(`internals.new_session_channel`), so no command of another thread is
counted to a block. An open from a thread inside blocks of the connection
counts to its innermost block; one from any other thread (a worker a
block's thread started) to every block running then, as the one it belongs
to cannot be told: each keeps its slot until the server closed it, and the
last of them to end closes it (counted to one, the other blocks' slots came
back at their ends while it stayed on the server). Channels of other
kinds (``direct-tcpip``) are no sessions: the server's MaxSessions does not
count them, nor does a block.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import paramiko

from .channel import LIVENESS_POLL, Cover, Sessions, close_soon, in_background
from .internals import given_up_open, known_channel
from .slots import Claim, Slots

__all__ = ["Blocks", "Reservation"]


class Reservation(Claim, Cover):
    """One ``bounded_connection`` block's slot for thread ``holder``, and the sessions
    opened in the block.

    A `Claim` for the block's duration: leaving ``with`` gives the slot back
    on every path, unless the block's sessions are not all closed by the
    server yet; then the reservation takes the slot over (`Cover`), no
    thread's from then on, and gives it back as the server's CLOSE of the
    last one arrives (in paramiko's thread). Its exit may run twice (the
    block's boundary runs it again after an interrupt, `Link.taking`): the
    second finishes what the first left.
    """

    def __init__(self, slots: Slots, holder: int) -> None:
        super().__init__(slots, holder)
        #: Guards the counts below and `ended` against paramiko's thread and the openers'.
        self._lock = threading.Lock()
        #: Opens counted to the block (`open_channel`) and not stored yet.
        self._opens: List[_Open] = []
        #: The block's sessions the server has not closed yet, by channel id.
        #: Held here: paramiko holds channels weakly, and a channel collected
        #: before the server's CLOSE would keep its slot for good.
        self._unclosed: Dict[int, paramiko.Channel] = {}
        #: The blocks each session of `_unclosed` counts to (one opened outside every block
        #: counts to all that ran then), by channel id.
        self._sharers: Dict[int, List[Reservation]] = {}
        #: Set as the block ends: no open counts to it from then on.
        self.ended = False

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        me = threading.get_ident()
        for entry in [entry for entry in self._opens if entry.thread == me]:
            # Left by an interrupt (Ctrl-C) between its count and its storing: this
            # thread is no longer in that open, so what it got is stored here.
            self._finish(entry)
        with self._lock:
            self.ended = True
            if (self._opens or self._unclosed) and self.taken:
                # Plain stores, no call: the slot is the claim's or the reservation's.
                self._slots, self._holder = self.slots, self.holder
                self.taken = False
        self.hold(None)  # its thread is done: the server's CLOSE frees the slot
        for chanid, chan in list(self._unclosed.items()):
            if not any(not block.ended for block in self._sharers.get(chanid, ())):
                close_soon(chan)  # nothing to send for one the caller closed
        Claim.__exit__(self)
        self._settle()  # an interrupted open's failure may have been the last thing waited for

    def open_channel(self, open_channel: Callable[..., paramiko.Channel], sessions: Sessions,
                     sharers: List[Reservation], *args: Any, **kwargs: Any) -> paramiko.Channel:
        """``open_channel(*args, **kwargs)`` (paramiko's), its session counted to this block
        unless the block ended; watched for the server's CLOSE from its return on.

        The count and the watch are each stored under the lock with no call in
        between, inside the ``try`` that takes the count back: an interrupt
        (Ctrl-C) leaves neither a count no answer takes back (the slot would
        be kept for good) nor a session unwatched. A session whose CLOSE came
        before its watch (paramiko forgot it already) is settled here; one
        answered after the block ended is closed at once. An open given up
        with its OPEN out (its timeout, a Ctrl-C in its wait) stays counted:
        the server confirms it later, a session like any other, closed once
        confirmed (`_reap`). An open that failed settles the block: it may
        have been the last thing its slot waited for. ``sharers``: the blocks
        the open counts to, this one among them (each counts it, and keeps its
        slot until the server closed it; the last of them to end closes it).
        """
        entry = _Open(threading.get_ident(), sessions, sharers)
        try:
            with self._lock:
                if not self.ended:
                    self._opens.append(entry)
            try:
                entry.chan = open_channel(*args, **kwargs)
            except BaseException as exc:
                entry.given_up = given_up_open(exc)
                raise
        finally:
            ended = self._finish(entry)
        chan = entry.chan
        assert chan is not None  # paramiko returned it: its errors went past
        if ended:
            if not any(not block.ended for block in sharers):
                close_soon(chan)
            self._settle()
        return chan

    def _finish(self, entry: _Open) -> bool:
        """Store what the open of ``entry`` got, if it was counted and is not stored yet:
        its channel counted and watched, one given up reaped, the block settled for a
        failed one. Whether the block had ended by then (the channel is to be closed)."""
        with self._lock:
            if entry not in self._opens:
                return False
            kept = entry.chan if entry.given_up is None else entry.given_up[0]
            if kept is not None:
                chanid = kept.chanid
                self._unclosed[chanid] = kept
                self._sharers[chanid] = entry.sharers
                # Each sharer's close settles it: another's watch stored first is kept.
                other = entry.sessions.watched.get(chanid)
                entry.sessions.watched[chanid] = functools.partial(
                    self._server_closed, chanid, other)
            ended = self.ended
            # Last: interrupted before it, the entry is stored again (`__exit__`).
            self._opens.remove(entry)
        if entry.given_up is not None:
            self._reap(entry.given_up[0], entry.given_up[1], entry.sessions)
        elif entry.chan is None:
            self._settle()
            return False
        else:
            # The watch set, then paramiko asked: a CLOSE handled before it was set is
            # seen here, one after by the close hook; whichever pops the watch settles it.
            self._unless_known(entry.chan, entry.sessions)
        return ended

    def _unless_known(self, chan: paramiko.Channel, sessions: Sessions) -> None:
        """Settle ``chan`` once here if paramiko forgot it (its CLOSE came before the watch)."""
        chanid = chan.chanid
        transport = chan.get_transport()
        if transport is None or known_channel(transport, chanid) is not chan:
            watch = sessions.watched.pop(chanid, None)
            if watch is not None:
                watch()

    def _reap(self, chan: paramiko.Channel, answered: threading.Event,
              sessions: Sessions) -> None:
        """Close ``chan``, an open given up with its OPEN out, once the server answers it
        (in a thread of its own); a refusal (paramiko forgot it) settles it at once."""

        def reap() -> None:
            transport = chan.get_transport()
            while not answered.wait(LIVENESS_POLL):
                if transport is None or not transport.is_active():
                    return  # the connection is gone, and its slots with it
            if chan.active:
                close_soon(chan)  # its CLOSE in reply settles it (the close hook)
            self._unless_known(chan, sessions)

        in_background(reap)

    def _server_closed(self, chanid: int, other: Optional[Callable[[], None]] = None) -> None:
        """The server closed channel ``chanid`` too (paramiko's thread, or `_unless_known`); then
        ``other`` (another sharer's watch) is called."""
        with self._lock:
            self._unclosed.pop(chanid, None)
            self._sharers.pop(chanid, None)
        self._settle()
        if other is not None:
            other()

    def _settle(self) -> None:
        """Give the slot back once the block ended and the server closed all its sessions."""
        with self._lock:
            done = self.ended and not self._opens and not self._unclosed
        if done:
            self._release()  # once: nothing if the claim gave it back

    @property
    def counted(self) -> bool:
        """Whether the block holds its slot (running, or waiting for the server's CLOSE)."""
        return not self.ended or self.taken or self.holds_slot


class _Open:
    """One open counted to a block by thread ``thread``: what paramiko gave it, each stored
    in one line (a Ctrl-C lands between lines), for `Reservation._finish` to store."""

    __slots__ = ("thread", "sessions", "sharers", "chan", "given_up")

    def __init__(self, thread: int, sessions: Sessions, sharers: List[Reservation]) -> None:
        self.thread = thread
        self.sessions = sessions
        self.sharers = sharers
        self.chan: Optional[paramiko.Channel] = None
        self.given_up: Optional[Tuple[paramiko.Channel, threading.Event]] = None


class Blocks:
    """The ``bounded_connection`` blocks of one connection, and the opens counted to them.

    Installs itself as the transport's ``open_channel`` (an instance
    attribute in front of paramiko's, which ``open_session`` and the like
    call): paramiko's, with the session opened counted to a block.
    """

    def __init__(self, transport: paramiko.Transport, sessions: Sessions) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()
        #: Begun, and running or still holding their slot, oldest first.
        self._blocks: List[Reservation] = []
        self._open = transport.open_channel
        transport.open_channel = self._open_channel  # type: ignore[method-assign]

    def begin(self, block: Reservation) -> None:
        """``block`` runs: sessions opened from here on count to it."""
        with self._lock:
            self._prune()
            self._blocks.append(block)

    def reserved(self) -> int:
        """How many blocks hold a slot: running, or their sessions not all closed yet."""
        with self._lock:
            self._prune()
            return len(self._blocks)

    def _prune(self) -> None:
        """Forget the blocks whose slot is back (under ``_lock``)."""
        self._blocks = [block for block in self._blocks if block.counted]

    def _blocks_of(self, thread: int) -> List[Reservation]:
        """The running blocks an open from ``thread`` counts to: its innermost, else every
        one running (none when none runs)."""
        with self._lock:
            running = [block for block in self._blocks if not block.ended]
        own = [block for block in running if block.holder == thread]
        return own[-1:] if own else running

    def _open_channel(self, kind: str, *args: Any, **kwargs: Any) -> paramiko.Channel:
        blocks = self._blocks_of(threading.get_ident()) if kind == "session" else []
        open_channel: Callable[..., paramiko.Channel] = self._open
        for block in blocks:
            open_channel = functools.partial(block.open_channel, open_channel, self._sessions,
                                             blocks)
        return open_channel(kind, *args, **kwargs)
