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
from typing import Optional, Tuple

import paramiko
from paramiko.common import cMSG_CHANNEL_OPEN
from paramiko.message import Message

__all__ = ["WarmChannel", "warm_channel_of"]


def _open_in_background(transport: paramiko.Transport) -> Tuple[paramiko.Channel, threading.Event]:
    """Ask for a session channel without waiting; the event is set on the server's answer.

    This is the first half of ``Transport.open_channel``, whose second half
    waits for the answer; paramiko offers no way to open without waiting.
    """
    with transport.lock:
        window = transport._sanitize_window_size(None)
        max_packet = transport._sanitize_packet_size(None)
        chanid = transport._next_channel()
        m = Message()
        m.add_byte(cMSG_CHANNEL_OPEN)
        m.add_string("session")
        m.add_int(chanid)
        m.add_int(window)
        m.add_int(max_packet)
        chan = paramiko.Channel(chanid)
        transport._channels.put(chanid, chan)
        transport.channel_events[chanid] = event = threading.Event()
        transport.channels_seen[chanid] = True
        chan._set_transport(transport)
        chan._set_window(window, max_packet)
        # paramiko sets the open event on the server's answer, but not when
        # the transport is closed from our side; the channel's close wakes it then.
        chan.in_buffer.set_event(event)
    transport._send_user_message(m)
    return chan, event


class WarmChannel:
    """At most one spare session channel of one transport, guarded by its own lock."""

    def __init__(self, transport: paramiko.Transport) -> None:
        self._transport = transport
        self._lock = threading.Lock()
        self._pending: Optional[Tuple[paramiko.Channel, threading.Event]] = None

    def take(self, timeout: Optional[float]) -> Optional[paramiko.Channel]:
        """The spare channel once the server opened it; None if there is none to have.

        Waits at most ``timeout`` seconds for the server's answer (or the
        connection's end); on time-out the spare stays for a later command, so
        no channel is ever orphaned.
        """
        pending = self._pending
        if pending is None:
            return None
        chan, answered = pending
        if not answered.wait(self._transport.channel_timeout if timeout is None else timeout):
            return None
        with self._lock:
            if self._pending is not pending:
                return None  # another command took it
            self._pending = None
        return chan if chan.active and not chan.closed else None

    def replenish(self, bound: threading.BoundedSemaphore) -> None:
        """Ask for a new spare if there is none and ``bound`` has a slot free."""
        if self._pending is not None or bound._value <= 0:
            return
        with self._lock:
            if self._pending is not None:
                return
            try:
                self._pending = _open_in_background(self._transport)
            except (EOFError, OSError, paramiko.SSHException):
                pass  # a dying transport: the command's own path reports it


def warm_channel_of(transport: paramiko.Transport) -> WarmChannel:
    """The one `WarmChannel` of ``transport``."""
    warm = transport.__dict__.get("_pe_warm")
    if warm is None:
        warm = transport.__dict__.setdefault("_pe_warm", WarmChannel(transport))
    return warm
