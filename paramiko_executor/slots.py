"""Session slots: one per server session, handed out first come, first served.

A connection's `Slots` counts the sessions the executor may hold on the
server at once (its MaxSessions). The rule the executor keeps: every server
session it holds (a command's channel, a spare channel, a transfer,
``bounded_connection``'s reservation) is covered by exactly one slot, and a
slot is released only once the server has closed that session's channel, or
the connection is gone. A connection that is gone closes its `Slots` as a
whole: its waiters leave at once (to wait on the next connection's), and the
releases still to come for it are ignored. A slot is taken into a `Claim`,
which gives it back on every path out of its block (a Ctrl-C included)
unless the session it covers took it over.

A slot freed by the server's CLOSE is not free on the server yet: OpenSSH
frees a session only on the pass of its main loop after the one that read
our CLOSE in reply (``channel_garbage_collect`` runs from
``channel_prepare_poll``, after ``process_buffered_input_packets`` handled
every packet of the read), and an open read together with that CLOSE is
refused ("no more sessions"), costing the opener a round trip. So the slots
also keep the times of recent such releases, and `open_delay` tells an
opener how long to hold its open back: until, counting our other free
slots, the server has freed enough sessions to take it. The hold-back
(`pace`) is a small share of the connection's round trip, timed on the opens
it makes anyway (`open_answered`); none on a fast path, where a refusal
costs less than the wait would, and none before the server first refused an
open on this connection: a server or a path that never lets an open catch
up with our CLOSE costs nothing.

The slots also know which thread holds each slot that only that thread can
give back (a transfer's, a ``bounded_connection`` block's: taken with a
``holder``): a thread that asks for a slot while it holds every slot there
is, e.g. from a ``progress`` callback of a transfer on a one-session
connection, would wait for itself forever, and gets an `ExecutorFailure`
at once instead; so does a thread whose joining the line would leave the
threads in line holding every slot between them (two threads each in a
``progress`` callback of a transfer holding one of two sessions). A slot no
thread holds in that sense comes back by itself, and is never counted: a
running command's (the server closes its session once the command exits,
so a command started from ``on_output`` may wait for it), a spare
channel's, a closing channel's, a probe's.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Protocol, Sequence

from .errors import ConnectionLost, ExecutorFailure

__all__ = ["Claim", "Slots"]

#: How often a thread waiting for a slot checks that its connection still lives.
LIVENESS_POLL = 1.0

#: The hold-back after a release (`Slots.pace`): this share of the round trip,
#: at most `PACE_MAX`, and none below `PACE_MIN`. The wait must outlast the
#: server's turn from reading our CLOSE to polling again (tens of µs idle, a
#: few ms loaded) and the jitter between two of our packets on the path; a
#: refusal costs a whole round trip, so a twentieth of one, paid only by an
#: open that would otherwise be refused, is cheap insurance (2.5 ms on a
#: 50 ms path; measured there, refusals fell from 0.17 to 0.015 per command at
#: saturation). Below `PACE_MIN` (round trips under 20 ms; loopback's are a
#: fraction of a ms) a wait short enough to be worth it does not outlast a
#: busy server's turn (0.5 ms cut nothing), and nothing is held back.
PACE_SHARE = 1 / 20
PACE_MAX = 0.005
PACE_MIN = 0.001


def _own_every_slot(limit: int, alone: bool = True) -> ExecutorFailure:
    """The error for a thread asking for a slot that no thread could ever free for it.

    ``alone``: the thread holds all ``limit`` slots itself; else the threads
    waiting in line, it included, hold them between them.
    """
    if alone:
        who = (f"this thread already holds all {limit} session(s) of the connection (it runs "
               f"in a progress callback of a transfer, or a bounded_connection block, "
               f"holding them): the command or transfer it started would wait for "
               f"itself forever")
    else:
        who = (f"the threads waiting for a session of the connection, this one among them, "
               f"already hold all {limit} of its sessions (each runs in a progress "
               f"callback of a transfer, or a bounded_connection block, holding some): "
               f"the command or transfer this thread started would wait forever with them")
    return ExecutorFailure(
        f"{who}, so nothing was sent. Run it on another executor (its own connection), or "
        f"let the connection have more sessions (the server's MaxSessions, max_sessions)")


class _Held(Protocol):
    """A session holding a slot, which records the thread it holds it for (`Slots.pass_on`)."""

    _holder: Optional[int]


class _Waiter:
    """A thread in line for a slot, asleep on ``lock`` until a slot is handed to it."""

    __slots__ = ("lock", "holder", "patient", "stuck")

    def __init__(self, holder: Optional[int], patient: bool) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        #: The thread that will hold the slot handed on (see `Slots.acquire`), or None.
        self.holder = holder
        #: True when it waits without a deadline: with one, it leaves the line by itself.
        self.patient = patient
        #: Set (and the lock released) when a lower limit left ``holder`` holding every slot.
        self.stuck = False


class Claim:
    """One slot of ``slots`` for thread ``holder`` (see `Slots.acquire`), from its taking on.

    The code that takes a slot does so inside ``with Claim(...) as claim:``,
    storing the acquire's result in `taken` in the same statement: from
    there on, until a session takes the slot over (`SessionChannel`, once
    its OPEN is out, clears `taken`), leaving the block gives the slot back,
    on every path, an interrupt (Ctrl-C) included: no line of the owner's
    code lies between the slot's taking and the code that gives it back.
    """

    __slots__ = ("slots", "holder", "taken")

    def __init__(self, slots: Slots, holder: Optional[int]) -> None:
        self.slots = slots
        self.holder = holder
        #: True while the slot is taken and this claim, not a session, gives it back.
        self.taken = False

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.taken:
            # `release` clears `taken` with the slot's hand-on: an interrupt (Ctrl-C)
            # at its entry leaves the claim taken, for a second exit to give back.
            self.slots.release(holder=self.holder, claim=self)


def _counted_to(claim: Claim) -> Optional[int]:
    """The thread ``claim``'s slot is counted to: its holder while taken; once the claim
    took the slot over as its cover (a ``bounded_connection`` block past its end, see
    `channel.Cover`), the cover's holder; None when it holds no slot for a thread.

    The cover's stores come before the claim's ``taken`` is cleared: between them
    both name the same thread, counted once.
    """
    if claim.taken:
        return claim.holder
    holder: Optional[int] = getattr(claim, "_holder", None)
    return holder


class Slots(threading.BoundedSemaphore):
    """A `threading.BoundedSemaphore` that hands out slots in the order they were asked for.

    A released slot goes straight to the longest-waiting thread instead of
    back into the pool, so a thread arriving later cannot take it first: no
    caller starves while others keep the semaphore saturated. Each waiter
    sleeps on its own lock, so a release wakes exactly one thread.
    Non-blocking acquires fail while anyone waits.
    """

    # BoundedSemaphore's own state, which typeshed leaves out.
    _value: int
    _initial_value: int

    def __init__(self, value: int = 1) -> None:
        super().__init__(value)
        #: Guards the state, in place of the semaphore's condition: a plain lock's
        #: ``with`` is taken and let go in C, where no interrupt (Ctrl-C) lands, while
        #: a `threading.Condition`'s ``__enter__`` and ``__exit__`` are Python
        #: functions: one landing there left the lock held, and every later slot
        #: operation of the connection (the transport thread's releases too) stuck.
        self._mutex = threading.Lock()
        self._waiters: Deque[_Waiter] = collections.deque()
        #: How many slots each thread (by `threading.get_ident`) holds that only it gives back.
        self._holders: Dict[int, int] = {}
        #: The claims whose slots outlive the boundary they were taken in (`keep`).
        self._kept: List[Claim] = []
        self._closed = False
        #: Releases still to be kept back after `lower` took away slots that were held.
        self._kept_back = 0
        #: The shortest open's round trip seen, whether an open was refused yet,
        #: and the hold-back they give (see `PACE_SHARE`).
        self._round_trip: Optional[float] = None
        self._refused = False
        self._pace = 0.0
        #: When slots whose sessions the server may still be freeing were released, oldest first.
        self._closing: Deque[float] = collections.deque(maxlen=value)

    @property
    def limit(self) -> int:
        """How many slots there are in all."""
        return self._initial_value

    @property
    def available(self) -> int:
        """How many slots are free right now."""
        return self._value

    @property
    def waiting(self) -> int:
        """How many threads wait for a slot right now."""
        return len(self._waiters)

    def held_by(self, holder: int) -> int:
        """How many slots thread ``holder`` (`threading.get_ident`) holds, to give back itself."""
        return self._holders.get(holder, 0)

    def loose(self, holder: int) -> int:
        """How many slots thread ``holder`` holds that no kept claim (`keep`) holds: its
        calls' sessions and slots, the mark a call's boundary gives back down to
        (`release_beyond`)."""
        if not self._kept:
            return self._holders.get(holder, 0)  # the common case: no lock taken per call
        with self._mutex:
            return self._holders.get(holder, 0) - self._kept_by(holder)

    def keep(self, claim: Claim) -> None:
        """``claim``'s slot outlives the boundary it was taken in (a ``bounded_connection``
        block handed to its caller, which may end it in a later call of its thread, or in
        another thread): no call's boundary gives it back (`release_beyond`) while the
        claim, or the claim itself as its slot's cover (a block past its end), holds it
        for its thread. The claim gives it back, once."""
        with self._mutex:
            self._kept.append(claim)

    def _kept_by(self, holder: int) -> int:
        """How many of thread ``holder``'s slots kept claims hold (under ``_mutex``); the
        claims that hold none any more are forgotten."""
        self._kept = kept = [claim for claim in self._kept if _counted_to(claim) is not None]
        return sum(1 for claim in kept if _counted_to(claim) == holder)

    @property
    def pace(self) -> float:
        """The longest an open on a slot just freed is held back, in seconds (0: never)."""
        return self._pace

    def open_answered(self, seconds: float, *, refused: bool) -> None:
        """The server answered a channel open ``seconds`` after it was sent; ``refused``: no.

        `pace` follows the shortest such round trip seen (a longer one
        measured queueing, not the path), from the first refusal on.
        """
        with self._mutex:
            if self._round_trip is None or seconds < self._round_trip:
                self._round_trip = seconds
            elif not refused or self._refused:
                return
            self._refused = self._refused or refused
            pace = min(self._round_trip * PACE_SHARE, PACE_MAX)
            self._pace = pace if self._refused and pace >= PACE_MIN else 0.0

    def open_delay(self) -> float:
        """How long the holder of a slot just taken should wait before it opens its channel.

        Asked once per open. Zero unless the server may still be freeing
        more sessions (released within `pace`) than we have slots free: then
        this open is matched with the oldest of those sessions (the next open
        with the next one) and waits until that one is `pace` old. Sessions
        whose slots were taken but not opened yet are no server's sessions,
        so each open need only wait for one freed session. At most `pace`.
        """
        if not self._pace:
            return 0.0  # the common case (every fast path): no lock taken per command
        with self._mutex:
            if self._still_closing() <= self._value:
                return 0.0
            return max(0.0, self._closing.popleft() + self._pace - time.monotonic())

    def _still_closing(self) -> int:
        """How many released sessions the server may still be freeing (under ``_mutex``)."""
        closing = self._closing
        if closing:
            since = time.monotonic() - self._pace
            while closing and closing[0] <= since:
                closing.popleft()
        return len(closing)

    def hold_back(self, deadline: Optional[float]) -> None:
        """Wait out `open_delay` (at most `pace`, and not past ``deadline``) on a taken slot.

        Sent at once, an open that takes a slot freed by the server's CLOSE
        can reach the server together with our CLOSE in reply, before the
        server freed that session; refused, it would cost a round trip.
        Interrupted (e.g. KeyboardInterrupt), the slot's `Claim` gives it back.
        """
        delay = self.open_delay()
        if deadline is not None:
            delay = min(delay, deadline - time.monotonic())
        if delay > 0:
            time.sleep(delay)

    @property
    def closed(self) -> bool:
        """True once the connection these slots belong to is gone."""
        return self._closed

    def acquire(self, blocking: bool = True, timeout: Optional[float] = None, *,
                holder: Optional[int] = None) -> bool:
        """Take a slot; raises `ConnectionLost` (never started) once the slots are closed.

        ``holder``: the thread (its `threading.get_ident`) that alone can give
        the slot back, counted until it releases the slot or passes it on
        (`pass_on`); None for a slot that comes back without any thread's help.
        """
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        with self._mutex:
            if self._closed:
                raise ConnectionLost("the connection was lost", started=False)
            if self._value > 0 and not self._waiters:
                self._take_free(holder)
                return True
            if not blocking:
                return False
            waiter = _Waiter(holder, timeout is None)
            self._waiters.append(waiter)
        try:
            got = waiter.lock.acquire(True, -1 if timeout is None else timeout)
        except BaseException:  # e.g. KeyboardInterrupt: leave no dead waiter behind
            self._leave(waiter)
            raise
        if not got:
            got = not self._give_up(waiter)
        if got and self._closed:
            raise ConnectionLost("the connection was lost", started=False)
        if waiter.stuck:
            raise self._refusal(holder)
        return got

    __enter__ = acquire

    def take(self, deadline: Optional[float], alive: Callable[[], bool],
             queued: Optional[Callable[[], None]] = None) -> bool:
        """Take a slot for the calling thread by ``deadline`` (`time.monotonic`; None: no limit).

        The slot is held by this thread (see `acquire`). False once the
        deadline passed. Raises `ConnectionLost` (never started) as soon as
        ``alive()`` turns false or the slots are closed, checking every
        `LIVENESS_POLL` seconds without losing its place in line. Raises
        `ExecutorFailure` at once, before or while waiting, when this thread
        holds every slot there is, or it and the threads in line before it
        do between them: no thread could ever free one.
        ``queued`` is called once this thread is in line, when no
        non-blocking acquire can succeed any more (to give back a slot that
        is held without need, such as a spare channel's).
        """
        holder = threading.get_ident()
        with self._mutex:
            if self._closed:
                raise ConnectionLost("the connection was lost", started=False)
            if self._value > 0 and not self._waiters:
                self._take_free(holder)
                return True
            if self._line_holds_all(holder):
                raise self._refusal(holder)
            waiter = _Waiter(holder, deadline is None)
            self._waiters.append(waiter)
        try:
            if queued is not None:
                queued()
            while True:
                remaining = LIVENESS_POLL if deadline is None else min(
                    LIVENESS_POLL, deadline - time.monotonic())
                if waiter.lock.acquire(True, max(remaining, 0.0)):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    if self._give_up(waiter):
                        return False
                    break  # a release handed us the slot as we gave up
                if self._closed or not alive():
                    raise ConnectionLost("the connection was lost", started=False)
        except BaseException:
            self._leave(waiter)
            raise
        if self._closed:
            raise ConnectionLost("the connection was lost", started=False)
        if waiter.stuck:
            raise self._refusal(holder)
        return True

    def _take_free(self, holder: Optional[int]) -> None:
        """Take a free slot for ``holder`` (under ``_mutex``).

        The slot and its holder's count change together: no call lies between
        them, where an interrupt (Ctrl-C) could land and leave one without the
        other. One that lands after, as the slot is handed to the caller, leaves
        the slot counted: the caller's boundary gives it back (`release_beyond`).
        """
        if holder is None:
            self._value -= 1
            return
        count = self._holders.get(holder, 0) + 1
        self._value -= 1
        self._holders[holder] = count

    def _line_holds_all(self, holder: int, gone: Sequence[_Waiter] = ()) -> bool:
        """Whether ``holder`` and the threads in line (not ``gone``) hold all slots (under _mutex).

        A thread in line without a deadline gives back what it holds only
        once handed a slot, and only the slots held outside the line can be
        handed on: when such threads hold all the slots that a release would
        hand on, none ever comes (the one thread holding every slot itself is
        the simplest such line). A thread with a deadline leaves by itself.
        """
        in_line = {waiter.holder for waiter in self._waiters
                   if waiter.holder is not None and waiter.patient and waiter not in gone}
        in_line.add(holder)
        held = sum(self._holders.get(thread, 0) for thread in in_line)
        return held >= self._initial_value - self._value

    def _refusal(self, holder: Optional[int]) -> ExecutorFailure:
        """The error for ``holder``, refused a slot because the line holds all of them."""
        limit = self._initial_value
        return _own_every_slot(limit, alone=holder is not None
                               and self._holders.get(holder, 0) >= limit)

    def _leave(self, waiter: _Waiter) -> None:
        """Leave the line on an error; a slot handed to us meanwhile goes on to the next."""
        if not self._give_up(waiter):
            self.release(holder=waiter.holder)

    def _give_up(self, waiter: _Waiter) -> bool:
        """Leave the line; False if a release handed us the slot meanwhile (we hold it then)."""
        with self._mutex:
            try:
                self._waiters.remove(waiter)
                return True
            except ValueError:
                return waiter.stuck  # sent away by `lower`, with no slot

    def release(self, n: int = 1, *, holder: Optional[int] = None,
                claim: Optional[Claim] = None, owner: Optional[_Held] = None) -> None:
        """Give back ``n`` slots held by thread ``holder`` (see `acquire`); ignored once closed.

        ``claim``, whose one slot this is, is marked given back (`Claim.taken`)
        as the slot is handed on, with no call in between; so is ``owner``, the
        session or block that covered it (its holder cleared, as in `pass_on`).

        The server may still be freeing those sessions (it just closed them,
        and our CLOSE in reply is on its way): `open_delay` allows for that.
        A slot whose open the server refused is counted so too; that costs at
        most one `pace`, on a path where a refusal just cost a round trip.
        """
        if n < 1:
            raise ValueError("n must be one or more")
        with self._mutex:
            if self._closed:
                if claim is not None:
                    claim.taken = False
                if owner is not None:
                    owner._holder = None
                return
            now = time.monotonic() if self._pace else None
            for _ in range(n):
                self._release_one(holder, now, claim, owner)

    def _release_one(self, holder: Optional[int], now: Optional[float],
                     claim: Optional[Claim] = None, owner: Optional[_Held] = None) -> None:
        """Give back one slot of ``holder`` (``claim``'s or ``owner``'s, if given), released
        at ``now`` (under ``_mutex``).

        The counts are worked out first; the slot's hand-on (kept back, to the
        next waiter, or free) and its holders' counts are then stored with no
        call in between, where an interrupt (Ctrl-C) could land and leave a slot
        counted off and never freed, or freed and still counted (which a
        boundary would then release again, `release_beyond`).
        """
        kept = self._kept_back > 0
        left = -1 if holder is None else self._holders.get(holder, 0) - 1
        waiter = self._waiters[0] if self._waiters and not kept else None
        gained = 0 if waiter is None or waiter.holder is None else (
            self._holders.get(waiter.holder, 0) + 1)
        if not kept and waiter is None and self._value >= self._initial_value:
            raise ValueError("Semaphore released too many times")
        if kept:
            self._kept_back -= 1
        elif waiter is not None:
            del self._waiters[0]
            if waiter.holder is not None:
                self._holders[waiter.holder] = gained
        else:
            self._value += 1
        # Inline, as in `pass_on`: a helper's call would be a point where a Ctrl-C lands.
        if holder is not None:
            if left > 0:
                self._holders[holder] = left
            elif holder in self._holders:
                del self._holders[holder]
        if claim is not None:
            claim.taken = False
        if owner is not None:
            owner._holder = None
        if waiter is not None:
            waiter.lock.release()  # the hand-on is whole: the waiter runs
        if now is not None and not kept:
            self._closing.append(now)

    def release_beyond(self, holder: int, kept: int) -> None:
        """Give back the loose slots (`loose`) thread ``holder`` holds beyond ``kept``, after
        an interrupt.

        For the boundary of a call that took slots (a command's try, say),
        ``kept`` being the thread's loose slots as the call began: a Ctrl-C as
        a slot was handed on by a return value, or at the entry of the claim's
        ``__exit__``, leaves a slot counted to the thread that no claim or
        session gives back. Those of the thread's outer calls (the transfer
        whose ``progress`` callback runs this command) are kept, and so are
        kept claims' (`keep`): a ``bounded_connection`` block a callback of
        the call entered and left open, whose claim gives its slot back as it
        ends, even after the call's boundary. Counted and given back under one
        lock: a kept claim given back meanwhile (in another thread) is not
        counted loose.
        """
        with self._mutex:
            if self._closed:
                return
            extra = self._holders.get(holder, 0) - self._kept_by(holder) - kept
            now = time.monotonic() if self._pace and extra > 0 else None
            for _ in range(extra):
                self._release_one(holder, now)

    def pass_on(self, previous: Optional[int], holder: Optional[int],
                owner: Optional[_Held] = None) -> None:
        """A held slot that thread ``previous`` held (None: none) is ``holder``'s from now on.

        A spare channel's slot becomes the thread's that takes the spare; a
        thread done with its channel, which only the server's CLOSE frees now,
        passes its slot on to None. ``owner``, the session the slot covers,
        records its holder with the counts: an interrupt (Ctrl-C) leaves both
        as they were or both changed, never a thread counted for a slot its
        session says is another's (which a boundary would then release twice).
        """
        if previous == holder:
            return
        with self._mutex:
            if not self._closed:
                # Counted first; then stored with no call in between, where a Ctrl-C lands.
                left = -1 if previous is None else self._holders.get(previous, 0) - 1
                count = 0 if holder is None else self._holders.get(holder, 0) + 1
                if previous is not None:
                    if left > 0:
                        self._holders[previous] = left
                    elif previous in self._holders:
                        del self._holders[previous]
                if holder is not None:
                    self._holders[holder] = count
            if owner is not None:
                owner._holder = holder

    def lower(self, limit: int) -> None:
        """Make ``limit`` (1 or more, below the current limit) the number of slots in all.

        Free slots go first; for each held slot taken away, one later release
        is kept back instead of handed on. A waiting thread that holds
        ``limit`` slots or more now could only ever wait for itself: it
        leaves the line with `ExecutorFailure` (see `take`); so do the newest
        waiting threads holding slots, while the line holds every slot.
        """
        with self._mutex:
            if not 1 <= limit < self._initial_value:
                raise ValueError(f"limit must be from 1 to {self._initial_value - 1}, not {limit}")
            cut = self._initial_value - limit
            free = min(self._value, cut)
            self._value -= free
            self._kept_back += cut - free
            self._initial_value = limit
            stuck = [waiter for waiter in self._waiters if waiter.holder is not None
                     and self._holders.get(waiter.holder, 0) >= limit]
            # Then the newest holders in line, while the line holds every slot.
            for waiter in reversed(self._waiters):
                if waiter.holder is None or not waiter.patient or waiter in stuck:
                    continue
                if not self._line_holds_all(waiter.holder, stuck):
                    break
                if self._holders.get(waiter.holder, 0):
                    stuck.append(waiter)
            for waiter in stuck:
                self._waiters.remove(waiter)
                waiter.stuck = True
                waiter.lock.release()

    def close(self) -> None:
        """The connection is gone: waiters leave with `ConnectionLost`; releases are ignored."""
        with self._mutex:
            self._closed = True
            waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            waiter.lock.release()
