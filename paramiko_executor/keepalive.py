"""Round trips to the server: global requests with their replies routed, keepalive, dead peers.

paramiko keeps a single reply slot per transport for global requests
(``completion_event`` and ``global_response``), so two requests in flight would
take each other's replies. `GlobalRequests` owns the replies of a transport:
every request that wants one, ours and the user's (``transport.global_request``,
``request_port_forward``, ... through ``bounded_connection``), is sent under one
lock and queued, and each reply, which the server sends in request order, goes
to the request at the head of the queue.

`Pinger` sends ``keepalive@openssh.com`` with want-reply and waits a bounded
time; any reply (OpenSSH answers with a failure) proves the server alive and,
since it handles requests in order, that it has processed everything sent
before. `Keepalive` closes the transport after ``count_max`` unanswered pings.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Deque, Iterable, List, Optional

import paramiko
from paramiko.common import MSG_REQUEST_FAILURE, MSG_REQUEST_SUCCESS, cMSG_GLOBAL_REQUEST
from paramiko.message import Message

from .errors import TRANSPORT_ERRORS
from .internals import Handler, send_when_clear, transport_reading, wrap_handlers

__all__ = ["GlobalRequests", "Keepalive", "Pinger"]

log = logging.getLogger("paramiko_executor.keepalive")

#: How often a wait for a reply checks that the connection still lives: nothing
#: sets a reply's event when the connection ends before the reply came.
LIVENESS_POLL = 0.1


class _Reply:
    """The reply to one global request: set by the transport thread."""

    __slots__ = ("event", "message")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.message: Optional[Message] = None

    def wait(self, transport: paramiko.Transport, timeout: Optional[float]) -> bool:
        """True once the reply arrived; False once ``timeout`` seconds (None: no limit) passed,
        or as soon as ``transport`` stopped reading (no reply can come then)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = LIVENESS_POLL if deadline is None else min(
                LIVENESS_POLL, deadline - time.monotonic())
            if self.event.wait(max(0.0, remaining)):
                return True
            if not transport_reading(transport):
                # The transport thread may have set it just before it stopped.
                return self.event.is_set()
            if deadline is not None and time.monotonic() >= deadline:
                return False


def _request(kind: str, data: Optional[Iterable[Any]], *, want_reply: bool) -> Message:
    m = Message()
    m.add_byte(cMSG_GLOBAL_REQUEST)
    m.add_string(kind)
    m.add_boolean(want_reply)
    if data is not None:
        m.add(*data)
    return m


class GlobalRequests:
    """The global requests of one transport that want a reply, and their replies, in order."""

    def __init__(self, transport: paramiko.Transport) -> None:
        self._transport = transport
        self._lock = threading.Lock()
        self._waiting: Deque[_Reply] = collections.deque()

        def route(success: bool) -> Any:
            def wrap(original: Handler) -> Handler:
                def handler(*args: Any) -> None:  # (m), or (transport, m) on paramiko < 4
                    with self._lock:
                        reply = self._waiting.popleft() if self._waiting else None
                    if reply is None:
                        original(*args)  # sent around us (a wait=False request answered anyway)
                        return
                    reply.message = args[-1] if success else None
                    reply.event.set()
                return handler
            return wrap

        wrap_handlers(transport, {}, {MSG_REQUEST_SUCCESS: route(True),
                                      MSG_REQUEST_FAILURE: route(False)})
        # paramiko's own callers (request_port_forward, ...) call it through the instance.
        transport.global_request = self.global_request  # type: ignore[method-assign]

    def send(self, kind: str, data: Optional[Iterable[Any]] = None) -> _Reply:
        """Send a request wanting a reply; its `_Reply` is set when the reply arrives."""
        m = _request(kind, data, want_reply=True)
        reply = _Reply()
        # Queued and sent under one lock: the queue's order is the wire's.
        with self._lock:
            self._waiting.append(reply)
            try:
                send_when_clear(self._transport, m)
            except BaseException:
                self._waiting.remove(reply)
                raise
        return reply

    def global_request(self, kind: str, data: Optional[Iterable[Any]] = None,
                       wait: bool = True) -> Optional[Message]:
        """``paramiko.Transport.global_request``, with the reply routed to this request."""
        if not wait:
            send_when_clear(self._transport, _request(kind, data, want_reply=False))
            return None
        reply = self.send(kind, data)
        return reply.message if reply.wait(self._transport, None) else None


class Pinger:
    """Bounded round trips over one transport."""

    def __init__(self, requests: GlobalRequests, transport: paramiko.Transport) -> None:
        self.transport = transport
        self._requests = requests

    def round_trip(self, timeout: float) -> bool:
        """Send a keepalive request; True once any reply arrives within ``timeout``.

        False within `LIVENESS_POLL` of the connection's end: a server that
        died with the request unanswered (Dropbear's failed assertions) costs
        no wait for the rest of ``timeout``.
        """
        if not self.transport.is_active():
            return False
        sent = threading.Event()
        box: List[_Reply] = []

        def send() -> None:
            try:
                box.append(self._requests.send("keepalive@openssh.com"))
            except TRANSPORT_ERRORS:
                pass  # the connection ended: no reply will come
            sent.set()

        # Sent from a thread of its own: against a peer that stopped reading, a
        # send can block until the transport is closed, and closing it is what
        # the caller's timing may have to decide.
        deadline = time.monotonic() + timeout
        threading.Thread(target=send, daemon=True, name="paramiko_executor ping").start()
        if not sent.wait(timeout) or not box:
            return False
        return box[0].wait(self.transport, deadline - time.monotonic())


class Keepalive:
    """One thread per connection that closes the transport once the server stops answering.

    Every ``interval`` seconds a request expecting a reply is sent; after
    ``count_max`` requests in a row went unanswered for ``interval`` seconds
    each, the transport is closed. Closing it wakes every command running on
    it, which then fails over like on any lost connection. The thread ends
    with the transport or on `stop`.
    """

    def __init__(self, pinger: Pinger, interval: float, count_max: int) -> None:
        self._pinger = pinger
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
