"""One session channel per connection opened ahead of time, to take a round trip off a command.

Opening a channel costs a round trip to the server before a command can be
sent. While one command runs, the next one's channel is asked for in the
background, and the next command finds it open. The spare is a server session
like any other, so it holds a slot of its own, taken only when one is free and
nobody waits (`Slots.acquire` without blocking fails while anyone waits). It
is a luxury, never waited for: none is made while a key exchange runs, and
whenever a thread has to wait for a slot, the spare is closed, and its slot
comes back on the server's CLOSE.
"""

from __future__ import annotations

import threading
from typing import Dict, Optional

import paramiko

from .channel import Overdue, SessionChannel
from .errors import TRANSPORT_ERRORS, ConnectionLost
from .slots import Claim, Slots

__all__ = ["Spare"]


class Spare:
    """At most one spare session channel of one connection, guarded by its own lock."""

    def __init__(self, transport: paramiko.Transport, slots: Slots,
                 sessions: Dict[int, SessionChannel]) -> None:
        self._transport = transport
        self._slots = slots
        self._sessions = sessions
        self._lock = threading.Lock()
        self._pending: Optional[SessionChannel] = None
        #: The thread making a spare (under ``_lock``), if any.
        self._maker: Optional[int] = None

    @property
    def held(self) -> bool:
        """Whether a spare channel holding a slot is kept right now (a refused one, whose
        slot the refusal freed, holds none)."""
        pending = self._pending
        return pending is not None and pending.holds_slot

    def _pop(self) -> Optional[SessionChannel]:
        """Take the spare out, the calling thread's (its `SessionChannel.taker`) from here on."""
        taker = threading.get_ident()
        if self._maker == taker:
            # A signal handler's call, as its own thread makes the spare under the lock:
            # waiting for that lock would be for good. No spare for it, as when none is made.
            return None
        with self._lock:
            pending = self._pending
            if pending is not None:
                # Marked as it leaves, with no call in between: a Ctrl-C as it is
                # returned leaves it the thread's to give up (`SessionChannel.left_by`).
                pending.taker = taker
                self._pending = None
        return pending

    def take(self, deadline: Optional[float], holder: int) -> Optional[SessionChannel]:
        """The spare, open and with its slot held by thread ``holder``, for a command; None
        if there is none to have.

        Waits for a spare being made (its open held back, a few ms at most),
        then for the server's answer (`SessionChannel.settle_open`: the
        channel timeout at most, and not past ``deadline``); a spare that is
        refused or not answered in time is given up like any other open, and
        so is one whose wait is interrupted (Ctrl-C).
        """
        # One being made (`replenish` holds the lock meanwhile) is worth the
        # wait: its slot is taken, and a slot waited for would close it.
        if self._pending is None and not self._lock.locked():
            return None
        spare = self._pop()
        if spare is None:
            return None
        try:
            return spare if spare.settle_open(deadline, holder) else None
        except ConnectionLost:
            spare.discard()
            return None  # the command's own path reports it
        except BaseException:  # an interrupt (Ctrl-C): popped, the spare is no one's to close
            spare.discard()
            raise

    def replenish(self, deadline: Optional[float] = None) -> None:
        """Ask for a new spare if there is none and a slot is free with nobody waiting.

        Called by a command's thread after its exec: the OPEN's write is bounded by
        that command's ``deadline`` (None: not at all, as paramiko's).
        """
        if self._pending is not None or self._maker == threading.get_ident():
            return  # one made already, or by this thread below a signal handler's call
        with self._lock:
            if self._pending is not None:
                return
            # Taken for this thread until the spare is stored: a Ctrl-C as the channel
            # is returned leaves it the thread's to give up (`SessionChannel.left_by`).
            taker = threading.get_ident()
            self._maker = taker
            try:
                self._make(taker, deadline)
            finally:
                self._maker = None

    def _make(self, taker: int, deadline: Optional[float]) -> None:
        """`replenish`'s work, under the lock."""
        with Claim(self._slots, taker) as claim:
            try:
                claim.taken = self._slots.acquire(blocking=False, holder=taker)
            except ConnectionLost:
                return  # the connection is gone
            if not claim.taken:
                return
            # Called after a command's exec: the wait passes while the command runs.
            self._slots.hold_back(None)
            try:
                # Never waits for a key exchange: the command's thread made the call.
                spare = SessionChannel(self._transport, claim, self._sessions,
                                       open_within=0.0, write_deadline=deadline)
            except Overdue:
                return  # its slot is back; the next command opens its own channel
            except TRANSPORT_ERRORS:
                return  # a dying transport: the command's own path reports it
        spare.taker = taker  # while its slot passes on to no thread
        spare.hold(None)
        self._pending = spare
        spare.taker = None  # the spare's (no call since the store above)

    def adopt(self, channel: SessionChannel) -> None:
        """Make ``channel`` (open or opening, with its slot) the spare; closed if there is one."""
        with self._lock:
            if self._pending is None:
                self._pending = channel
                return
        channel.discard()

    def discard(self) -> None:
        """Close the spare, if any: someone needs its slot."""
        spare = self._pop()
        if spare is not None:
            spare.discard()
