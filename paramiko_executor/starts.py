"""One session start at a time on a server that closes sessions waiting for their request.

Dropbear before 2024.86 (its issue 321, fixed by its commit 71521d1b) closes
every session channel that has no process yet whenever any process of the
connection ends: the SIGCHLD makes it check every channel for closing, and a
channel without a process passes that check. A command whose channel was
opened but whose exec had not arrived yet is turned away (the executor asks
again); one whose exec crossed that CLOSE starts anyway, and its first output
ends the whole connection on Dropbear's failed assertion (``!channel->sent_close``),
so every command on it fails over. The chance grows with the number of
channels waiting for their request at once and with how long each waits.
Measured on Dropbear 2022.83, 50 threads x 40 ``echo`` on one connection:
10-35 % of the commands failed after their retries, with 60-180 reconnects;
with one start at a time, none failed and the run took a third of the time.

`Starts` lets one thread at a time go from its channel's open to the server's
answer to its request on such a server, and every thread at once on any other.
Not just until the request went out: the next channel's OPEN would reach the
server with that request, and the command's exit (at once, for an ``echo``)
would close it; over 50 ms, 37-45 % of 100 commands from 10 threads failed so.
Nor is a spare channel made there (`Spare`): it waits for its request all its
life. It is an
optimisation, never a wait without bound: a start held longer than
`START_HOLD` (a slow server, or an interrupt that left it held) no longer
keeps the next one waiting.
"""

from __future__ import annotations

import re
import threading
import time
from types import TracebackType
from typing import Optional, Type

__all__ = ["FREE", "START_HOLD", "Start", "Starts", "closes_waiting_sessions"]

#: How long one start may keep the next one waiting, in seconds.
START_HOLD = 2.0

_DROPBEAR = re.compile(r"SSH-2\.0-dropbear_(\d+)\.(\d+)")
#: The first Dropbear release that keeps a channel waiting for its request open.
_FIXED = (2024, 86)


def closes_waiting_sessions(remote_version: str) -> bool:
    """Whether the server's version string names a Dropbear before 2024.86."""
    match = _DROPBEAR.match(remote_version)
    return match is not None and (int(match[1]), int(match[2])) < _FIXED


class Start:
    """One thread's start: entered by ``with``, over at `done` or at the block's end."""

    __slots__ = ("_starts",)

    def __init__(self, starts: Optional[Starts]) -> None:
        self._starts = starts

    def done(self) -> None:
        """The server answered the request (or closed the channel): the next start may
        begin (idempotent; safe from paramiko's thread)."""
        starts, self._starts = self._starts, None
        if starts is not None:
            starts.leave(self)

    def __enter__(self) -> Start:
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.done()


#: The start of every thread on a server that keeps waiting sessions: nothing to wait for.
FREE = Start(None)


class Starts:
    """The session starts of one connection; serial when ``serial``, else free."""

    def __init__(self, serial: bool) -> None:
        self.serial = serial
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._current: Optional[Start] = None
        self._since = 0.0
        self._closed = False

    def begin(self, deadline: Optional[float], exempt: bool = False) -> Optional[Start]:
        """This thread's `Start`, once no other start runs (or the last ran `START_HOLD`);
        None if ``deadline`` passed first.

        Free (no wait) on a server that keeps waiting sessions, and when
        ``exempt``: a thread already holding a session of the connection (a
        call from a callback, a ``bounded_connection`` block) may be what the
        running start waits for. Free too after `close`: the open that follows fails.
        """
        if not self.serial or exempt or self._closed:
            return FREE
        start = Start(self)
        with self._lock:
            try:
                while self._current is not None and not self._closed:
                    now = time.monotonic()
                    left = self._since + START_HOLD - now
                    if left <= 0:
                        break  # held too long: this one need not wait for it any more
                    if deadline is not None:
                        if now >= deadline:
                            return None
                        left = min(left, deadline - now)
                    self._cond.wait(left)
            except BaseException:
                # An interrupt (Ctrl-C) as this thread was woken: the wake was maybe
                # its, and the next waiter would sleep out `START_HOLD` without it.
                self._cond.notify()
                raise
            self._current, self._since = start, time.monotonic()
        return start

    def close(self) -> None:
        """The connection is gone: the waiting threads go on (to fail over), none waits again."""
        with self._lock:
            self._closed = True
            self._cond.notify_all()

    def leave(self, start: Start) -> None:
        with self._lock:
            if self._current is start:
                self._current = None
                self._cond.notify()
