"""Round trips to the server: keepalive requests that expect a reply, and dead-peer detection.

paramiko's ``Transport.set_keepalive`` sends requests that expect no reply, so
it cannot notice a peer that stopped answering, and ``global_request`` waits
for its reply without a time limit. `Pinger` sends ``keepalive@openssh.com``
with want-reply and waits a bounded time; any reply (OpenSSH answers with a
failure) proves the server alive and, since it handles requests in order, that
it has processed everything sent before.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import paramiko
from paramiko.common import cMSG_GLOBAL_REQUEST
from paramiko.message import Message

__all__ = ["Keepalive", "Pinger", "pinger_of"]

log = logging.getLogger("paramiko_executor.keepalive")


class Pinger:
    """Bounded round trips over one transport, one at a time.

    paramiko keeps a single reply slot per transport for global requests, so
    concurrent requests would steal each other's replies: one lock orders them.
    """

    def __init__(self, transport: paramiko.Transport) -> None:
        self.transport = transport
        self._lock = threading.Lock()
        self._sender: Optional[threading.Thread] = None

    def round_trip(self, timeout: float) -> bool:
        """Send a keepalive request; True once any reply arrives within ``timeout``."""
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            if not self.transport.is_active():
                return False
            replied = threading.Event()
            self.transport.completion_event = replied
            # The request is sent from a thread of its own: against a peer that
            # stopped reading, a send can block until the transport is closed,
            # and closing it is what the caller's timing may have to decide.
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(target=self._send, daemon=True,
                                                name="paramiko_executor ping")
                self._sender.start()
            return replied.wait(max(0.0, deadline - time.monotonic()))
        finally:
            self._lock.release()

    def _send(self) -> None:
        m = Message()
        m.add_byte(cMSG_GLOBAL_REQUEST)
        m.add_string("keepalive@openssh.com")
        m.add_boolean(True)
        try:
            self.transport._send_user_message(m)
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the connection ended: no reply will come


def pinger_of(transport: paramiko.Transport) -> Pinger:
    """The one `Pinger` of ``transport``."""
    pinger = transport.__dict__.get("_pe_pinger")
    if pinger is None:
        pinger = transport.__dict__.setdefault("_pe_pinger", Pinger(transport))
    return pinger


class Keepalive:
    """One thread per connection that closes the transport once the server stops answering.

    Every ``interval`` seconds a request expecting a reply is sent; after
    ``count_max`` requests in a row went unanswered for ``interval`` seconds
    each, the transport is closed. Closing it wakes every command running on
    it, which then fails over like on any lost connection. The thread ends
    with the transport or on `stop`.
    """

    def __init__(self, transport: paramiko.Transport, interval: float, count_max: int) -> None:
        self._pinger = pinger_of(transport)
        self._interval = interval
        self._count_max = count_max
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paramiko_executor keepalive",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        transport = self._pinger.transport
        unanswered = 0
        while not self._stopped.is_set() and transport.is_active():
            started = time.monotonic()
            if self._pinger.round_trip(self._interval):
                unanswered = 0
                self._stopped.wait(max(0.0, self._interval - (time.monotonic() - started)))
                continue
            if self._stopped.is_set() or not transport.is_active():
                return
            unanswered += 1
            log.debug("keepalive %d/%d unanswered", unanswered, self._count_max)
            if unanswered >= self._count_max:
                log.warning("no keepalive reply for %.1f s: closing the connection",
                            unanswered * self._interval)
                transport.close()
                return


def keepalive_for(transport: paramiko.Transport, interval: Optional[float],
                  count_max: int) -> Optional[Keepalive]:
    """Start a `Keepalive` for ``transport`` when ``interval`` is set."""
    return Keepalive(transport, interval, count_max) if interval else None
