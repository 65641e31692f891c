"""Port forwarding over an executor's one shared connection: tunnels and `open_connection`.

Every forwarded connection is a channel of the executor's connection, beside
its commands: ``direct-tcpip`` for a local forward and `open_connection`,
``forwarded-tcpip`` for a remote forward. None holds a MaxSessions slot
(OpenSSH counts sessions only); `ForwardLimit` caps how many are open at once,
and the ones past the cap wait.

Threads
-------
A forwarded connection is a `pipe.Pipe`: two threads of its own, one per
direction (flow control: see there); `open_connection`'s is a
`forwarded.ForwardedSocket` that its caller reads and writes.

A `LocalTunnel` has a listening thread and, per client, a thread that waits
for a place under the cap, opens the channel and becomes the pipe's first
thread. A ``direct-tcpip`` open is sent and waited for by its caller; one
the caller gives up (its tunnel closed, its timeout passed) is left to a
short-lived thread (`_reap`) that closes the channel if the server opens it.
A `RemoteTunnel` has a supervising thread that asks each new connection for
its port again and, per forwarded connection, a thread that connects to the
local target and becomes the pipe's first thread.
`Tunnel.close` stops all of them and waits for them (bounded);
`Forwarding.close` does so for every tunnel and socket of an executor.

Locks: each tunnel's ``_lock`` guards its pipes, clients and threads; the
`ForwardLimit`'s condition its count; `Forwarding._lock` its tunnels and
sockets; ``_RECEIVERS_LOCK`` which executors take a transport's forwarded
connections (and each `pipe.Pipe` and `forwarded.ForwardedSocket` has its
own for its ending). None is held while another is taken, nor during I/O,
but a tunnel's ``_lock`` while it sets ``_closed`` (a `waits.Signal`, whose
lock is taken last) and a `forwarded.ForwardedSocket`'s while paramiko makes
its channel's descriptor (the channel's lock). A `Place`'s ``_lock`` is
released before its limit's is taken.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Set, Tuple, Type, TypeVar

import paramiko
from paramiko.ssh_exception import SSHException

from .channel import refusal_of
from .checks import check_int, check_str, check_timeout
from .connection import GaveUp, Link
from .errors import TRANSPORT_ERRORS, ExecutorFailure, ForwardTimeout, for_executor, is_lost
from .forwarded import ForwardedSocket
from .internals import connection_error, new_session_channel, set_forward_handler
from .pipe import WRITE_POLL, Pipe, reset_on_close
from .text import printable
from .waits import Signal, wait_any, writable_within

if TYPE_CHECKING:
    from .executors import SSHExecutor

__all__ = ["ForwardLimit", "Forwarding", "LocalTunnel", "Place", "RemoteTunnel", "Tunnel"]

log = logging.getLogger("paramiko_executor.tunnels")

Address = Tuple[str, int]
TunnelT = TypeVar("TunnelT", bound="Tunnel")


#: How long a remote forward's supervisor sleeps between looks at its connection.
LIVENESS_POLL = 0.25

#: The pause before a remote forward's supervisor tries to connect again
#: after a whole connect cycle (with its own retries) failed, and between its
#: requests for a port that a live connection refused.
RECONNECT_PAUSE = 5.0

#: How long a local forward's listener pauses when no descriptor or memory is left for
#: a client: the client waits in the backlog, and the listener stays ready meanwhile.
ACCEPT_PAUSE = 0.2

#: What `accept` fails with while the process is out of descriptors or memory, for now.
_ACCEPT_LATER = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: How long `Tunnel.close` waits for the tunnel's threads.
JOIN_TIMEOUT = 10.0

#: How long connecting to a remote forward's local target may take.
LOCAL_CONNECT_TIMEOUT = 10.0

#: How long a local forward's client waits for its channel, once it has a place
#: under ``max_forwarded``: for a connect (with its retries; it goes on for
#: the others), then for the server's answer. Past it the client is reset.
OPEN_TIMEOUT = 60.0

#: The texts of the SSH channel-open failure codes (RFC 4254 5.1).
_REASONS = {1: "administratively prohibited", 2: "connect failed",
            3: "unknown channel type", 4: "resource shortage"}


class _Refused(ExecutorFailure):
    """A local tunnel's forward that the server refused (see `Forwarding.open_channel`)."""


#: How long a wait for a place under the limit sleeps at most between looks (a
#: notify cut short by an interrupt costs that much).
_PLACE_POLL = 0.5


class ForwardLimit:
    """A cap on the forwarded channels of one executor; those past it wait their turn.

    Each taken place is a `Place`, given back once all its holders let it go.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()  # ``with self._lock``: see `Inbox`
        self._cond = threading.Condition(self._lock)
        self._used = 0
        self._queue: List[object] = []

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def acquire(self, deadline: Optional[float], cancelled: Callable[[], bool]
                ) -> Optional[Place]:
        """Take one place by ``deadline``; None when time ran out or ``cancelled()`` became true.

        ``cancelled`` is checked whenever `wake` is called.
        """
        me = object()
        with self._lock:
            self._queue.append(me)
            try:
                while self._queue[0] is not me or self._used >= self.limit:
                    if cancelled():
                        return None
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return None
                    # Bounded: a notify an interrupt (Ctrl-C) cut short is made up for.
                    self._cond.wait(_PLACE_POLL if remaining is None
                                    else min(remaining, _PLACE_POLL))
                if cancelled():
                    return None
            finally:
                self._queue.remove(me)
                self._cond.notify_all()
            # Counted with no call between it and the return: an interrupt (Ctrl-C) is
            # taken as a Python call begins, and one after the count (in a Place made
            # after it, or in the clean-up above) left the place counted for good.
            place = Place(self)
            self._used += 1
            return place

    def wake(self) -> None:
        """Let the waiters look at their ``cancelled`` again."""
        with self._lock:
            self._cond.notify_all()


class Place:
    """One place under a `ForwardLimit`, free again once every holder has released it.

    Its taker is the first holder. An open its caller stopped waiting for
    holds it too, until that open's channel is closed: the cap counts every
    channel the server may have open, and the place is given back once.
    """

    def __init__(self, limit: ForwardLimit) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._holders = 1

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0:
                raise RuntimeError("a place given back cannot be held again")
            self._holders += 1

    def release(self) -> None:
        """Let go of the place; the last holder to do so gives it back to the limit.

        Every count changes after the last call that an interrupt (Ctrl-C) can
        cut short (one is taken as a Python call begins): the place is given
        back whole, or not at all and still held.
        """
        with self._lock:
            if self._holders == 0:
                raise RuntimeError("a place given back twice")
            if self._holders > 1:
                self._holders -= 1
                return
            limit = self._limit
            with limit._lock:
                limit._cond.notify_all()  # the waiters look once the lock is let go
                limit._used -= 1
                self._holders = 0


class Tunnel:
    """A port forward; a context manager. `close` stops it and ends the connections it carries.

    It works from its creation on (not from ``__enter__``). A lost
    connection does not end it: the forwarded connections of that moment
    end, later ones go through the reconnected connection.
    """

    def __init__(self, forwarding: Forwarding, name: str) -> None:
        self._forwarding = forwarding
        self.name = name
        self._lock = threading.Lock()
        #: Set by `close`; a forwarded open waiting for the connection stops at once.
        self._closed = Signal()
        #: Set once a close has done all of `_stop`: a close interrupted before
        #: (Ctrl-C) leaves the rest to the next one.
        self._stopped = False
        self._pipes: Set[Pipe] = set()
        self._threads: Set[threading.Thread] = set()

    @property
    def closed(self) -> bool:
        """True once the tunnel stopped forwarding: `close`, the executor's `close`, a fork."""
        return self._closed.is_set()

    def __enter__(self: TunnelT) -> TunnelT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}{' closed' if self.closed else ''}>"

    def close(self) -> None:
        """Stop forwarding, end the tunnel's forwarded connections, and wait for its threads."""
        self._stop()
        self._join(JOIN_TIMEOUT)

    def _stop(self) -> None:
        """Stop forwarding and end the forwarded connections, without waiting for the threads."""
        with self._lock:
            if self._stopped:
                return
            self._closed.set()
            pipes = list(self._pipes)
        # Marked closed first, so that nothing new starts: what this one started must
        # finish even when interrupted (Ctrl-C in the listener's join), and a later
        # close does what an interrupted one left undone (each step may run twice).
        try:
            self._forwarding.limit.wake()
            self._stop_listening()
        finally:
            for pipe in pipes:
                pipe.abort()
        # Only once done: a tunnel forgotten by an interrupted close would be skipped by
        # the executor's next close, its listening left running for good.
        self._forwarding.forget(self)
        with self._lock:
            self._stopped = True

    def _join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the tunnel's threads to end."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [t for t in self._threads if t is not threading.current_thread()]
            if not threads:
                return
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                return

    def _stop_listening(self) -> None:
        raise NotImplementedError

    def _forget_after_fork(self) -> None:
        """In a forked child: closed, and its copies of the parent's descriptors closed.

        The child must not wake, shut down or send on what the parent still
        uses; closing its copies lets the parent's own closes reach the clients.
        """
        self._lock = threading.Lock()
        self._closed = Signal()
        self._closed.set()
        self._stopped = True  # the listening is the parent's to stop
        pipes, self._pipes, self._threads = self._pipes, set(), set()
        for pipe in pipes:
            pipe.sock.close()

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> bool:
        """Start ``target(*args)`` in a thread of this tunnel (one `join` waits for).

        False, and nothing started, once the tunnel is closed; `RuntimeError`
        when no thread can be had.
        """
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name=f"paramiko_executor tunnel {name}",
                                  daemon=True)
        with self._lock:
            if self._closed.is_set():
                return False
            self._threads.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._threads.discard(thread)
            raise
        return True

    def _carry(self, sock: socket.socket, chan: paramiko.Channel, name: str) -> None:
        """Pump ``sock`` <-> ``chan`` in this thread until both directions end."""
        pipe = Pipe(sock, chan, name, done=self._pipe_done)
        with self._lock:
            closed = self._closed.is_set()
            if not closed:
                self._pipes.add(pipe)
        if closed:
            pipe.discard()
            return
        pipe.run()

    def _pipe_done(self, pipe: Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)

    @property
    def connections(self) -> int:
        """How many forwarded connections this tunnel carries right now."""
        with self._lock:
            return len(self._pipes)


class LocalTunnel(Tunnel):
    """``forward_local``: a listening socket whose clients reach ``remote`` through the server.

    ``local_address`` is the ``(host, port)`` it listens on.
    """

    def __init__(self, forwarding: Forwarding, remote: Address, local: Address) -> None:
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        # Everything the listening thread needs is had here, so that a shortage of
        # descriptors or threads is the caller's error, not a tunnel that never listens.
        self._held: List[Any] = []
        #: The clients accepted and not yet served (their `_serve` has not returned):
        #: a forked child closes its copies of these too, or the parent's reset of one
        #: whose channel is still being opened would wait for the child to end.
        self._clients: Set[socket.socket] = set()
        try:
            listener = self._hold(socket.socket(family, socket.SOCK_STREAM))
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(local)
            listener.listen(128)
            self._wake_reader, self._wake_writer = map(self._hold, socket.socketpair())
            self._selector = self._hold(selectors.DefaultSelector())
        except OSError as exc:
            self._release_held()
            raise ExecutorFailure(f"cannot listen on {local[0]}:{local[1]}: {exc}") from None
        self._listener = listener
        self.local_address: Address = listener.getsockname()[:2]
        self.remote = remote
        super().__init__(forwarding, f"{self.local_address[0]}:{self.local_address[1]} -> "
                                     f"{remote[0]}:{remote[1]}")
        self._accepting = threading.Thread(target=self._accept, daemon=True,
                                           name=f"paramiko_executor tunnel {self.name}")
        try:
            self._accepting.start()
        except RuntimeError as exc:
            self._release_held()
            raise ExecutorFailure(f"cannot listen on {self.name}: {exc}") from None

    def _hold(self, resource: Any) -> Any:
        self._held.append(resource)
        return resource

    def _release_held(self) -> None:
        """Close the listener, the wake-up pair and the selector (in a forked child: its copies)."""
        for resource in self._held:
            resource.close()

    def _accept(self) -> None:
        try:
            with self._selector as selector:
                selector.register(self._listener, selectors.EVENT_READ)
                selector.register(self._wake_reader, selectors.EVENT_READ)
                short = False  # out of descriptors: warned once until a client is accepted
                while not self._closed.is_set():
                    ready = [key.fileobj for key, _ in selector.select()]
                    if self._wake_reader in ready:
                        return
                    try:
                        client, origin = self._listener.accept()
                    except (BlockingIOError, ConnectionAbortedError):
                        continue  # the client gave up between select and accept
                    except OSError as exc:
                        if exc.errno not in _ACCEPT_LATER:
                            raise
                        # A passing shortage must not end the tunnel for good.
                        if not short:
                            log.warning("tunnel %s: cannot accept a client for now (%s); "
                                        "trying again", self.name, exc.strerror)
                        short = True
                        self._closed.wait(ACCEPT_PAUSE)
                        continue
                    short = False
                    with self._lock:
                        self._clients.add(client)
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        if not self._spawn(self._serve, client, origin[:2], name=self.name):
                            _refuse(client)  # closed meanwhile
                            self._served(client)
                    except RuntimeError:  # no thread to be had: refuse this client
                        _refuse(client)
                        self._served(client)
                        log.warning("tunnel %s: could not start a thread for a client", self.name)
        except OSError:
            if not self._closed.is_set():
                log.exception("tunnel %s: no longer listening", self.name)
        finally:
            self._listener.close()
            self._wake_reader.close()

    def _stop_listening(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass
        self._accepting.join(JOIN_TIMEOUT)
        self._wake_writer.close()

    def _forget_after_fork(self) -> None:
        super()._forget_after_fork()
        clients, self._clients = self._clients, set()
        for client in clients:
            client.close()
        self._release_held()

    def _served(self, client: socket.socket) -> None:
        """``client`` was closed, or handed to its pipe: called after, so a child forked
        before it closes its copy."""
        with self._lock:
            self._clients.discard(client)

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._accepting.join(timeout)
        super()._join(max(0.0, deadline - time.monotonic()))

    def _serve(self, client: socket.socket, origin: Address) -> None:
        try:
            self._forward(client, origin)
        finally:
            self._served(client)

    def _forward(self, client: socket.socket, origin: Address) -> None:
        """Open ``client``'s channel and carry it; ``client`` is closed (or its pipe's) on
        every path."""
        place = self._forwarding.limit.acquire(None, self._closed.is_set)
        if place is None:
            _refuse(client)
            return
        try:
            try:
                chan = self._forwarding.open_channel(
                    self.remote, origin, time.monotonic() + OPEN_TIMEOUT, place, self._closed,
                    refused=_Refused)
            except ExecutorFailure as exc:
                if not self._closed.is_set():
                    why = (f"no forward within {OPEN_TIMEOUT:g} s ({exc.description})"
                           if isinstance(exc, GaveUp) else exc.description)
                    log.warning("tunnel %s: %s; closing the client's connection", self.name, why)
                if isinstance(exc, _Refused):
                    # Closed as ``ssh -L`` closes it, an EOF (a reset if the kernel
                    # still holds bytes of the client's unread).
                    client.close()
                else:
                    # Never asked for (no connection, or it was lost): no answer at all.
                    _refuse(client)
                return
            self._carry(client, chan, self.name)
        finally:
            place.release()


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """``action``, run by the first call that completes it (from any thread).

    Marked done only once it returned: an interrupt (Ctrl-C) as it began
    (`Place.release` changes nothing before its last call) leaves it to the next call.
    """
    lock = threading.RLock()
    done: List[bool] = []

    def run() -> None:
        with lock:
            if not done:
                action()
                done.append(True)  # no call between the return and it
    return run


def _refuse(client: socket.socket) -> None:
    """Close a client that was never forwarded with a reset: an empty reply is no answer."""
    reset_on_close(client)
    client.close()


class RemoteTunnel(Tunnel):
    """``forward_remote``: the server listens, and each connection to it reaches ``local``.

    ``remote_address`` is the ``(host, port)`` the server bound; after a
    reconnect the forward is asked for again, and the port (when the server
    picked it) may differ: the attribute follows.
    """

    def __init__(self, forwarding: Forwarding, requested: Address, local: Address) -> None:
        self.requested = requested
        self.local = local
        super().__init__(forwarding, f"{requested[0]}:{requested[1]} <- "
                                     f"{local[0]}:{local[1]}")
        self.remote_address: Address = requested
        self._link: Optional[Link] = None
        #: The connection a request for the port is in flight on.
        self._asking: Optional[Link] = None

    def _start(self) -> None:
        """Ask for the port (`ExecutorFailure` when refused), then keep it asked for."""
        link = self._forwarding.get_link()
        if not self._ask(link):
            raise ExecutorFailure(f"the server refused to listen on "
                                  f"{self.requested[0]}:{self.requested[1]}")
        self.name = (f"{self.remote_address[0]}:{self.remote_address[1]} <- "
                     f"{self.local[0]}:{self.local[1]}")
        self._spawn(self._supervise, link, name=f"{self.name} supervisor")

    def _ask(self, link: Link) -> bool:
        """Ask ``link`` to listen on the requested port; False if refused. Raises if it broke."""
        address, port = self.requested
        self._forwarding.accept_forwards(link)
        self._asking = link
        try:
            reply = link.requests.send("tcpip-forward", (address, port))
            timeout = link.transport.channel_timeout  # type: ignore[attr-defined, unused-ignore]
            if not _wait_reply(reply.event, link, timeout):
                raise ExecutorFailure(f"no answer to a port forward request within {timeout:g} s")
            if reply.message is None:
                return False
            bound = reply.message.get_int() if port == 0 else port
            self.remote_address = (address, bound)
            self._link = link
            if self._closed.is_set():  # closed while asking: `close` saw no port to cancel
                self._stop_listening()
            return True
        finally:
            self._asking = None

    def _owns(self, transport: paramiko.Transport, server: Address) -> bool:
        """Whether a forwarded connection to ``server`` on ``transport`` belongs to this tunnel.

        A port we named is ours from our request on: the server forwards a
        client that came at once before this thread has seen the reply.
        """
        link, asking = self._link, self._asking
        if link is not None and link.transport is transport \
                and server[1] == self.remote_address[1]:
            return True
        return asking is not None and asking.transport is transport \
            and server[1] == self.requested[1] != 0

    def _supervise(self, link: Optional[Link]) -> None:
        """Keep the forward asked for on every new connection, until closed.

        A port refused on a live connection is asked for again every
        `RECONNECT_PAUSE` too: after a network blip the server's stale
        session may hold it until the server notices, long after our reconnect.
        """
        held = True  # `_start` was granted the port on ``link``
        warned = False  # one WARNING per connection for its refusals
        while not self._closed.is_set():
            if link is not None:
                ask_at = None if held else time.monotonic() + RECONNECT_PAUSE
                while link.alive() and not self._closed.wait(LIVENESS_POLL):
                    if ask_at is not None and time.monotonic() >= ask_at:
                        break
                if self._closed.is_set():
                    return
                if not link.alive():
                    log.info("remote forward %s: the connection was lost; reconnecting",
                             self.name)
                    link, warned = None, False
            if link is None:
                try:
                    link = self._forwarding.get_link()
                except ExecutorFailure as exc:
                    if not self._closed.is_set():
                        log.warning("remote forward %s: cannot reconnect (%s); trying again",
                                    self.name, exc.description)
                        self._closed.wait(RECONNECT_PAUSE)
                    continue
                if self._closed.is_set():
                    return
            held, failure = self._ask_again(link)
            if failure and not warned:
                warned = True
                log.warning("remote forward %s: %s; asking again every %g s and after the "
                            "next reconnect", self.name, failure, RECONNECT_PAUSE)

    def _ask_again(self, link: Link) -> Tuple[bool, Optional[str]]:
        """`_ask` on a new or live connection: whether the port is held, and why not."""
        try:
            if self._ask(link):
                self.name = (f"{self.remote_address[0]}:{self.remote_address[1]} <- "
                             f"{self.local[0]}:{self.local[1]}")
                log.info("remote forward %s: listening again", self.name)
                return True, None
            return False, (f"the server refused to listen on "
                           f"{self.requested[0]}:{self.requested[1]}")
        except _ASK_ERRORS as exc:
            # A lost connection is no failure to report: the loop reconnects, and asks again.
            return False, f"asking for the port failed ({exc})" if link.alive() else None

    def _received(self, chan: paramiko.Channel, origin: Address) -> None:
        """A forwarded connection arrived (in paramiko's transport thread): serve it elsewhere."""
        try:
            if self._spawn(self._serve, chan, origin, name=self.name):
                return
        except RuntimeError:
            log.warning("remote forward %s: could not start a thread for a connection", self.name)
        _close_elsewhere(chan)

    def _serve(self, chan: paramiko.Channel, origin: Address) -> None:
        place = self._forwarding.limit.acquire(None, self._closed.is_set)
        if place is None:
            chan.close()
            return
        try:
            try:
                sock = _connect_local(self.local, self._closed)
            except OSError as exc:
                log.warning("remote forward %s: cannot connect to %s:%d (%s); closing the "
                            "forwarded connection", self.name, *self.local, exc)
                chan.close()
                return
            if sock is None:  # the tunnel closed meanwhile
                chan.close()
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._carry(sock, chan, self.name)
        finally:
            place.release()

    def _forget_after_fork(self) -> None:
        super()._forget_after_fork()
        self._link = None

    def _stop_listening(self) -> None:
        link = self._link
        if link is not None and link.alive():
            try:
                # No wait for the answer: the connection may be going away.
                link.requests.send("cancel-tcpip-forward", self.remote_address)
            except TRANSPORT_ERRORS:
                pass


_ASK_ERRORS = (ExecutorFailure,) + TRANSPORT_ERRORS

#: What a non-blocking connect answers while it is under way.
_CONNECTING = frozenset({errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK})


def _connect_local(address: Address, closed: Signal) -> Optional[socket.socket]:
    """A blocking socket connected to ``address`` (each of its addresses in turn, as
    ``socket.create_connection``), within `LOCAL_CONNECT_TIMEOUT`; None once ``closed``.

    The connect is waited for in steps of `pipe.WRITE_POLL`: a target that
    never answers (a full backlog, a dropped SYN) holds `Tunnel.close` no longer.
    """
    deadline = time.monotonic() + LOCAL_CONNECT_TIMEOUT
    error: OSError = OSError(f"no address for {address[0]}")
    for family, kind, proto, _, where in socket.getaddrinfo(*address, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            code = sock.connect_ex(where)
            while code in _CONNECTING:
                if closed.is_set():
                    sock.close()
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("timed out")
                if writable_within(sock, min(WRITE_POLL, remaining)):
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            sock.setblocking(True)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _open_direct(transport: paramiko.Transport, target: Address, origin: Address,
                 deadline: Optional[float], place: Place, stop: Optional[Signal]
                 ) -> paramiko.Channel:
    """A ``direct-tcpip`` channel to ``target``, waited for until ``deadline`` or ``stop``
    (then `GaveUp`), and for the connection's channel timeout at most, as paramiko's open.

    The open is sent and its answer waited for in the calling thread. paramiko
    would forget a channel whose open it stopped waiting for, and a confirmation
    arriving later would leave that channel open on the server for the rest of
    the connection: an open given up is left to a short-lived thread (`_reap`)
    that closes the channel when the server answers, and holds ``place`` until then.
    """
    give_up_at = time.monotonic() + transport.channel_timeout  # type: ignore[attr-defined, unused-ignore]

    def overdue() -> Optional[Exception]:
        now = time.monotonic()
        if stop is not None and stop.is_set() or deadline is not None and now >= deadline:
            return GaveUp("no answer from the server to the open yet")
        return SSHException("Timeout opening channel.") if now >= give_up_at else None

    answered = Signal()
    chan: Optional[paramiko.Channel] = None
    try:
        while chan is None:
            if not transport.is_active():
                raise _ended(transport)
            # A key exchange holds the open back: looked at again every LIVENESS_POLL.
            # Its write has the open's deadline, not the poll's.
            ends = (target, origin)
            chan = new_session_channel(transport, answered, LIVENESS_POLL, ends, deadline=deadline)
            late = overdue() if chan is None else None
            if late is not None:
                raise late
        while not answered.is_set():
            late = overdue()
            if late is not None:
                raise late
            if not transport.is_active():
                raise _ended(transport)
            wait_any((answered, stop), LIVENESS_POLL)
    except BaseException:  # given up, an interrupt (Ctrl-C) included
        # From the moment the open is sent: an interrupt landing as it returns too, or
        # paramiko, which holds channels weakly, forgets it, and the server's
        # confirmation leaves it open for the rest of the connection.
        if chan is not None:
            _reap(transport, chan, answered, place)
        raise
    if chan.active:
        return chan
    # The server refused (its reason kept on the channel), or the connection ended.
    raise refusal_of(chan) or _ended(transport)


def _ended(transport: paramiko.Transport) -> BaseException:
    """What ended ``transport``, never a refusal of an earlier open that paramiko kept."""
    return connection_error(transport) or SSHException("SSH session not active")


def _reap(transport: paramiko.Transport, chan: paramiko.Channel, answered: Signal,
          place: Place) -> None:
    """Close ``chan``, whose open was given up, once the server answers; ``place`` held until
    then (the cap counts every channel the server may have open)."""

    def reap() -> None:
        try:
            while not answered.wait(LIVENESS_POLL):
                if not transport.is_active():
                    return
            if chan.active:
                chan.close()
        except TRANSPORT_ERRORS:
            pass  # the connection ended, and the channel with it
        finally:
            place.release()

    place.hold()
    try:
        threading.Thread(target=reap, daemon=True, name="paramiko_executor tunnel open").start()
    except RuntimeError:
        # No thread to be had: the channel, if the server opens it, stays open until
        # the connection ends; its place is not kept away for that long.
        place.release()


def _wait_reply(event: threading.Event, link: Link, timeout: float) -> bool:
    """Wait for a global request's reply; False if ``timeout`` passed. Raises if the link died."""
    deadline = time.monotonic() + timeout
    while not event.wait(min(LIVENESS_POLL, max(0.0, deadline - time.monotonic()))):
        if not link.alive():
            raise ExecutorFailure("the connection was lost while asking for a port forward")
        if time.monotonic() >= deadline:
            return False
    return True



#: The executors' forwardings that take each transport's forwarded-tcpip channels:
#: copies of an executor unpickled in one process share a connection, and each
#: has remote tunnels of its own.
_RECEIVERS: weakref.WeakKeyDictionary[paramiko.Transport, weakref.WeakSet[Forwarding]] = \
    weakref.WeakKeyDictionary()
_RECEIVERS_LOCK = threading.Lock()


def _dispatch(chan: paramiko.Channel, origin: Address, server: Address) -> None:
    # paramiko's transport thread: find the tunnel and hand over; never block here.
    with _RECEIVERS_LOCK:
        receivers = list(_RECEIVERS.get(chan.get_transport(), ()))
    if not any(forwarding.received(chan, origin, server) for forwarding in receivers):
        # The address is the server's text.
        log.info("a forwarded connection to %s:%d matches no open remote forward; closed",
                 printable(server[0]), server[1])
        _close_elsewhere(chan)


def _close_elsewhere(chan: paramiko.Channel) -> None:
    """Close ``chan`` from a thread of its own: the transport thread must not wait to send."""

    def close() -> None:
        try:
            chan.close()
        except TRANSPORT_ERRORS:
            pass  # the connection ended meanwhile, and the channel with it

    threading.Thread(target=close, daemon=True, name="paramiko_executor tunnel refuse").start()


def _check_port(name: str, value: Any, *, minimum: int) -> int:
    port = check_int(name, value, minimum=minimum)
    assert port is not None
    if port > 65535:
        raise ValueError(f"{name} must be 65535 or less, not {port}")
    return port


def _check_host(name: str, value: Any) -> str:
    host = check_str(name, value, optional=False)
    assert host is not None
    if not host or "\0" in host:
        raise ValueError(f"{name} must be a non-empty host name")
    # No name is longer (RFC 1035); sshd ends the whole connection on a request
    # over 256 KiB, and the open would be sent again on each new one.
    if len(host.encode("utf-8", "surrogatepass")) > 255:
        raise ValueError(f"{name} must be a host name of at most 255 bytes")
    return host


class Forwarding:
    """The tunnels and forwarded sockets of one executor, and the cap they share."""

    def __init__(self, executor: SSHExecutor, max_forwarded: int) -> None:
        self._executor = executor
        self.limit = ForwardLimit(max_forwarded)
        self._lock = threading.Lock()
        self._tunnels: Set[Tunnel] = set()
        #: Weakly: a socket dropped unclosed closes itself when collected.
        self._sockets: weakref.WeakSet[ForwardedSocket] = weakref.WeakSet()
        _FORWARDINGS.add(self)

    # --- the executor's connection -------------------------------------------------

    def get_link(self, deadline: Optional[float] = None, stop: Optional[Signal] = None) -> Link:
        """The executor's current connection, connecting (with its retries) first.

        Waits for the connect until ``deadline`` or ``stop`` at most (`GaveUp`).
        """
        try:
            return self._executor._connection.get(deadline, stop)
        except ExecutorFailure as exc:
            raise for_executor(exc, self._executor) from None

    def open_channel(self, target: Address, origin: Address, deadline: Optional[float],
                     place: Place, stop: Optional[Signal] = None, *,
                     refused: Type[ExecutorFailure] = ExecutorFailure) -> paramiko.Channel:
        """A ``direct-tcpip`` channel to ``target``; `ExecutorFailure` naming it when that fails,
        a ``refused`` when the server refused the open.

        ``place`` is the caller's under ``max_forwarded``. The caller waits
        for the connection and the server's answer until ``deadline`` (a
        `time.monotonic` value) or until ``stop`` is set, then `GaveUp`; an
        open it left is closed when the server answers, and holds ``place``
        until then. A connection found lost is dropped and the open tried on
        a new one, up to the executor's ``on_disconnect_retry`` times; one the
        executor's `close` ended is not.
        """
        where = f"{target[0]}:{target[1]}"
        connection = self._executor._connection
        epoch = connection.epoch
        lost = 0
        while True:
            link = self.get_link(deadline, stop)
            try:
                return _open_direct(link.transport, target, origin, deadline, place, stop)
            except paramiko.ChannelException as exc:
                reason = _REASONS.get(exc.code, f"code {exc.code}")
                text = printable(str(exc.text or ""))
                raise refused(f"the server refused to forward to {where} ({reason}"
                                      f"{': ' + text if text and text.lower() != reason else ''})",
                                      self._executor) from None
            except TRANSPORT_ERRORS as exc:
                # Decided from evidence, not the class: a write that failed in
                # paramiko's packetizer is a loss its thread may not have seen yet.
                if link.alive() and not is_lost(exc, link.transport):
                    raise ExecutorFailure(f"opening a forward to {where} failed: "
                                          f"{printable(repr(exc))}", self._executor) from None
                if connection.epoch != epoch:  # not lost: closed, and not to be reopened
                    raise ExecutorFailure(f"the executor was closed while opening a forward "
                                          f"to {where}", self._executor) from None
                connection.drop(link)
                lost += 1
                if lost > self._executor._retries:
                    raise ExecutorFailure(f"the connection was lost while opening a forward to "
                                          f"{where} ({lost} attempts)", self._executor) from None

    def accept_forwards(self, link: Link) -> None:
        """Let ``link``'s forwarded-tcpip channels reach this executor's remote tunnels."""
        with _RECEIVERS_LOCK:
            _RECEIVERS.setdefault(link.transport, weakref.WeakSet()).add(self)
        set_forward_handler(link.transport, _dispatch)

    def received(self, chan: paramiko.Channel, origin: Address, server: Address) -> bool:
        """Hand a forwarded connection to the remote tunnel it is for; False if none is."""
        transport = chan.get_transport()
        with self._lock:
            tunnels = [t for t in self._tunnels if isinstance(t, RemoteTunnel)]
        for tunnel in tunnels:
            if tunnel._owns(transport, server):
                tunnel._received(chan, origin)
                return True
        return False

    # --- the public calls --------------------------------------------------------------

    def forward_local(self, remote_port: Any, remote_host: Any, local_port: Any,
                      local_host: Any) -> LocalTunnel:
        remote = (_check_host("remote_host", remote_host),
                  _check_port("remote_port", remote_port, minimum=1))
        local = (_check_host("local_host", local_host),
                 _check_port("local_port", local_port, minimum=0))
        tunnel = LocalTunnel(self, remote, local)
        self._remember(tunnel)
        log.info("forwarding %s", tunnel.name)
        return tunnel

    def forward_remote(self, remote_port: Any, local_port: Any, local_host: Any,
                       remote_host: Any) -> RemoteTunnel:
        requested = (_check_host("remote_host", remote_host),
                     _check_port("remote_port", remote_port, minimum=0))
        local = (_check_host("local_host", local_host),
                 _check_port("local_port", local_port, minimum=1))
        tunnel = RemoteTunnel(self, requested, local)
        self._remember(tunnel)
        try:
            tunnel._start()
        except BaseException as exc:
            tunnel.close()
            raise for_executor(exc, self._executor) from None
        log.info("forwarding %s", tunnel.name)
        return tunnel

    def open_connection(self, host: Any, port: Any, timeout: Any) -> ForwardedSocket:
        target = (_check_host("host", host), _check_port("port", port, minimum=1))
        seconds = check_timeout("timeout", timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        where = f"{target[0]}:{target[1]}"
        connection = self._executor._connection
        epoch = connection.epoch
        place = self.limit.acquire(deadline, lambda: connection.epoch != epoch)
        if place is None:
            if connection.epoch != epoch:
                raise ExecutorFailure("the executor was closed while waiting for a place under "
                                      f"max_forwarded={self.limit.limit}", self._executor)
            raise ForwardTimeout(f"opening a forward to {where} timed out after {seconds:g} s "
                                 f"(no forwarded channel came free under "
                                 f"max_forwarded={self.limit.limit})", self._executor)
        chan: Optional[paramiko.Channel] = None
        release = place.release
        try:
            release = _once(place.release)
            chan = self.open_channel(target, ("127.0.0.1", 0), deadline, place)
            chan.settimeout(seconds)
            sock = ForwardedSocket(chan, release, where)
        except BaseException as exc:
            # Also an interrupt (Ctrl-C) after the open, before the socket's finalizer
            # owned the channel: else it stayed open on the server, its place taken for
            # good. That finalizer, if there was one, finds both done.
            try:
                if chan is not None:
                    chan.close()
            except TRANSPORT_ERRORS:
                pass  # the connection ended, and the channel with it
            finally:
                release()
            if isinstance(exc, GaveUp):
                raise ForwardTimeout(f"opening a forward to {where} timed out after "
                                     f"{seconds:g} s ({exc.description})",
                                     self._executor) from None
            raise
        with self._lock:
            self._sockets.add(sock)
        return sock

    # --- bookkeeping -----------------------------------------------------------------

    def _remember(self, tunnel: Tunnel) -> None:
        with self._lock:
            self._tunnels.add(tunnel)

    def forget(self, tunnel: Tunnel) -> None:
        with self._lock:
            self._tunnels.discard(tunnel)

    def close(self, then: Callable[[], None]) -> None:
        """Close every tunnel and forwarded socket; ``then()`` runs before awaiting their threads.

        ``then`` closes the connection, which cuts short a connect that a
        tunnel's thread may be waiting for.
        """
        with self._lock:
            tunnels = list(self._tunnels)
            sockets = list(self._sockets)
        for tunnel in tunnels:
            tunnel._stop()
        then()
        # After `then`: a waiting open_connection must see the close before a freed place.
        self.limit.wake()
        for sock in sockets:
            sock._close_now()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for tunnel in tunnels:
            tunnel._join(max(0.0, deadline - time.monotonic()))

    def _forget_after_fork(self) -> None:
        """In a forked child: forget every tunnel and socket, which are the parent's."""
        self._lock = threading.Lock()
        self.limit = ForwardLimit(self.limit.limit)
        tunnels, self._tunnels = self._tunnels, set()
        sockets, self._sockets = list(self._sockets), weakref.WeakSet()
        for tunnel in tunnels:
            tunnel._forget_after_fork()
        for sock in sockets:
            sock._forget_after_fork()


#: Every executor's forwarding, for a forked child to forget what is its parent's.
_FORWARDINGS: weakref.WeakSet[Forwarding] = weakref.WeakSet()


def _forget_after_fork() -> None:
    # A lock another thread held at fork stays held in the child: replace it.
    global _RECEIVERS_LOCK
    _RECEIVERS_LOCK = threading.Lock()
    _RECEIVERS.clear()
    for forwarding in list(_FORWARDINGS):
        forwarding._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
