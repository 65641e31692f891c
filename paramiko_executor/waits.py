"""`Signal` and `wait_any`: one thread waits for the first of several events, with a bound;
`writable_within`: for a socket's room, with a bound.

A forwarded connection's open waits for a connect that other threads share
and then for the server's answer, and must also stop at once when its
tunnel closes; `threading.Event` can only be waited for alone.
"""

from __future__ import annotations

import select
import socket
import threading
from typing import Optional, Sequence, Set

__all__ = ["Signal", "wait_any", "writable_within"]

#: ``select.select`` fails on descriptors past FD_SETSIZE; poll is used where there is one.
_POLL = hasattr(select, "poll")


class Signal(threading.Event):
    """A `threading.Event` that also sets, when set, the events that `watch` it.

    ``_watch_lock`` (taken before the event's own lock, never around a wait)
    makes a `set` and a `watch` exclude each other, so no watcher misses it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watch_lock = threading.Lock()
        self._watchers: Set[threading.Event] = set()

    def set(self) -> None:
        with self._watch_lock:
            super().set()
            watchers, self._watchers = self._watchers, set()
        for event in watchers:
            event.set()

    def watch(self, event: threading.Event) -> None:
        """Set ``event`` when this is set (at once if it is already)."""
        with self._watch_lock:
            if not self.is_set():
                self._watchers.add(event)
                return
        event.set()

    def unwatch(self, event: threading.Event) -> None:
        with self._watch_lock:
            self._watchers.discard(event)


def wait_any(signals: Sequence[Optional[Signal]], timeout: Optional[float]) -> bool:
    """Wait until one of ``signals`` (None entries ignored) is set, ``timeout`` seconds at most.

    True if one is set, False if the time ran out first (a negative ``timeout`` has).
    """
    present = [signal for signal in signals if signal is not None]
    if any(signal.is_set() for signal in present):
        return True
    woken = threading.Event()
    for signal in present:
        signal.watch(woken)
    try:
        # Not negative: a lock's wait reads -1 as "no limit".
        return woken.wait(None if timeout is None else max(0.0, timeout))
    finally:
        for signal in present:
            signal.unwatch(woken)


def writable_within(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` takes data (or has an error or a connect's outcome to tell) within
    ``timeout`` seconds."""
    if _POLL:
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        return bool(poller.poll(timeout * 1000))
    _, writable, failed = select.select([], [sock], [sock], timeout)
    return bool(writable or failed)
