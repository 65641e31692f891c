"""Session slots: a BoundedSemaphore that serves waiters first come, first served."""

from __future__ import annotations

import collections
import threading
from typing import Deque, Optional

__all__ = ["FairBoundedSemaphore"]


class FairBoundedSemaphore(threading.BoundedSemaphore):
    """A `threading.BoundedSemaphore` that hands out slots in the order they were asked for.

    A released slot goes straight to the longest-waiting thread instead of
    back into the pool, so a thread arriving later cannot take it first: no
    caller starves while others keep the semaphore saturated. Each waiter
    sleeps on its own lock, so a release wakes exactly one thread.
    """

    def __init__(self, value: int = 1) -> None:
        super().__init__(value)
        self._waiters: Deque[threading.Lock] = collections.deque()

    def acquire(self, blocking: bool = True, timeout: Optional[float] = None) -> bool:
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        with self._cond:
            if self._value > 0 and not self._waiters:
                self._value -= 1
                return True
            if not blocking:
                return False
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        try:
            if waiter.acquire(True, -1 if timeout is None else timeout):
                return True
        except BaseException:  # e.g. KeyboardInterrupt: leave no dead waiter behind
            with self._cond:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    self._release_one()  # the slot was ours already: pass it on
            raise
        with self._cond:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                return True  # a release handed us the slot as we gave up
            return False

    __enter__ = acquire

    def release(self, n: int = 1) -> None:
        if n < 1:
            raise ValueError("n must be one or more")
        with self._cond:
            for _ in range(n):
                self._release_one()

    def _release_one(self) -> None:
        # Caller holds self._cond.
        if self._waiters:
            self._waiters.popleft().release()
        elif self._value >= self._initial_value:
            raise ValueError("Semaphore released too many times")
        else:
            self._value += 1
