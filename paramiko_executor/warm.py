"""One session channel per connection opened ahead of time, to take a round trip off a command.

Opening a channel costs a round trip to the server before a command can be
sent. While one command runs, the next one's channel is asked for in the
background; the next command finds it open. The spare channel holds no slot
of the connection's semaphore: it is asked for only while a slot is free, and
the command that takes it holds its own slot. Should the server refuse it (a
burst filled every slot meanwhile), it is simply dropped.
"""

from __future__ import annotations

import threading
from typing import Optional

import paramiko

from .channel import ConnectionLost, PendingOpen

__all__ = ["WarmChannel", "warm_channel_of"]


class WarmChannel:
    """At most one spare session channel of one transport, guarded by its own lock."""

    def __init__(self, transport: paramiko.Transport) -> None:
        self._transport = transport
        self._lock = threading.Lock()
        self._pending: Optional[PendingOpen] = None

    def take(self, timeout: Optional[float]) -> Optional[paramiko.Channel]:
        """The spare channel once the server opened it; None if there is none to have.

        Waits at most ``timeout`` seconds for the server's answer (or the
        connection's end); on time-out the spare stays for a later command, so
        no channel is ever orphaned.
        """
        pending = self._pending
        if pending is None:
            return None
        if not pending.wait(self._transport.channel_timeout if timeout is None else timeout):
            return None
        with self._lock:
            if self._pending is not pending:
                return None  # another command took it
            self._pending = None
        try:
            return pending.result()
        except ConnectionLost:
            return None  # the command's own open reports it

    def replenish(self, bound: threading.BoundedSemaphore) -> None:
        """Ask for a new spare if there is none and ``bound`` has a slot free."""
        # Read without the semaphore's lock: a stale answer costs at most one
        # refused spare, which the server answers and we drop.
        if self._pending is not None or bound._value <= 0:
            return
        with self._lock:
            if self._pending is not None:
                return
            try:
                self._pending = PendingOpen(self._transport)
            except (EOFError, OSError, paramiko.SSHException):
                pass  # a dying transport: the command's own path reports it


def warm_channel_of(transport: paramiko.Transport) -> WarmChannel:
    """The one `WarmChannel` of ``transport``."""
    warm = transport.__dict__.get("_pe_warm")
    if warm is None:
        warm = transport.__dict__.setdefault("_pe_warm", WarmChannel(transport))
    return warm
