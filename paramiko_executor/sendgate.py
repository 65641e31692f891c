"""`SendGate`: a forwarded channel's CLOSE never goes out before data sent on it.

paramiko sends a data message after letting go of the channel's lock (it
must: the transport thread needs that lock to add window while the sender
waits on TCP), so another thread's CLOSE for the channel can overtake it.
OpenSSH then gets data for a channel it freed, and drops the whole
connection. Every forwarded channel therefore has a gate: a sender passes it
for each data message (`enter`, `leave`), and every CLOSE of the channel,
ours and paramiko's reply to the server's, goes through `close`. A close
never waits for a send: with one in flight it is left to the last sender out,
which runs it as it leaves. From the first close on, no new send starts.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, List

import paramiko

from .errors import TRANSPORT_ERRORS

__all__ = ["SendGate"]


class SendGate:
    """The data messages in flight on one channel, and the closes waiting for them."""

    def __init__(self, chan: paramiko.Channel) -> None:
        self._chan = chan
        self._lock = threading.Lock()
        #: Data messages in flight, per sending thread: `leave` by a thread
        #: that holds none (its `enter` refused, or interrupted before the
        #: caller could know it was counted) changes nothing.
        self._sending: Dict[int, int] = {}
        self._closing = False
        self._deferred: List[Callable[[], None]] = []

    def enter(self) -> bool:
        """Count one data message in flight; False (nothing counted) once the channel closes."""
        with self._lock:
            if self._closing:
                return False
            me = threading.get_ident()
            self._sending[me] = self._sending.get(me, 0) + 1
            return True

    def leave(self) -> None:
        """The data message of this thread's `enter` went out (or failed); the last one out
        runs the closes. Without a message of this thread in flight, nothing happens, so
        a sender calls it in a ``finally`` that also covers its `enter`.
        """
        me = threading.get_ident()
        with self._lock:
            held = self._sending.get(me, 0)
            if not held:
                return
            if held == 1:
                del self._sending[me]
            else:
                self._sending[me] = held - 1
            if self._sending or not self._deferred:
                return
            deferred, self._deferred = self._deferred, []
        _run_all(deferred)

    def close(self, action: Callable[[], None]) -> None:
        """Stop new sends; run ``action`` (it sends the CLOSE) now, or as the last send leaves."""
        with self._lock:
            self._closing = True
            if self._sending:
                self._deferred.append(action)
                return
        action()

    def close_channel(self) -> None:
        """Close the channel through the gate; a connection lost meanwhile is no error."""
        self.close(lambda: _quietly(self._chan.close))


def _run_all(actions: List[Callable[[], None]]) -> None:
    """Run every one of ``actions``, even past one that raises, whose error then propagates."""
    if not actions:
        return
    try:
        _quietly(actions[0])
    finally:
        _run_all(actions[1:])


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except TRANSPORT_ERRORS:
        pass  # the connection ended, and the channel with it
