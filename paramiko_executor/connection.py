"""Connection state: the one shared paramiko Transport of an executor and what hangs off it.

`Connection` owns the state of one executor's connection, guarded by one
`threading.Lock`: the current `Link` (a Transport published together with its
slots, its channels, its spare channel and its keepalive, so a reconnect never
pairs a new transport with an old bound) and the connect attempt in flight,
which every thread that needs a connection meanwhile waits for and shares the
outcome of.

Threads and locks
-----------------
Threads: the callers' (each does its own command's I/O); paramiko's transport
thread, one per connection (it only feeds events to `channel.SessionChannel`);
per connection while configured, one keepalive thread; short-lived ones: a
ping sender per round trip, a reaper per abandoned channel open, an escalator
per timed-out command (TERM, KILL, CLOSE), a closer per dropped connection, a
rekey helper when a handler must send during a key exchange, and a connecting
thread when a caller that may give up (`Connection.get` with a deadline) starts
a connect.

Locks, and what each guards (taken in this order when nested; no other nesting):

1. ``Connection.lock``: the current `Link`, the attempt in flight, the epoch.
2. ``Spare._lock``: the spare channel of one link.
3. ``Slots._cond``: the slot count and the queue of waiters.
4. ``Channel.lock`` (paramiko's), then ``Transport.clear_to_send_lock``: a
   message is sent only while its channel is open and no key exchange runs
   (`SessionChannel._send`); never held while waiting.
5. ``channel._RELEASE_LOCK``: that each channel's slot is released once.
   ``blocks.Blocks._lock`` (the blocks of a connection), then
   ``blocks.Reservation._lock`` (one block's opens and sessions), take no other.
6. ``GlobalRequests._lock``: the order of global requests and their replies.
7. ``Counters._lock``: the statistics.
8. ``_TransportSocket._deferred_lock``: deferred wake-ups against the socket's close.
9. ``waits.Signal._watch_lock``: who waits for a connect attempt's end, or its cancel.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import paramiko

from .auth import authenticate
from .blocks import Blocks
from .channel import SessionChannel, Sessions, install_channel_hooks
from .errors import (
    TRANSPORT_ERRORS,
    AuthenticationFailure,
    AuthenticationInterrupted,
    ConnectionLost,
    ExecutorFailure,
    HostKeyFailure,
    TemporaryFailure,
)
from .internals import (
    bound_packet_writes,
    drop_handshake_timer,
    forget_parent_transports,
    guard_user_sends,
    thread_free_handshake_timer,
)
from .keepalive import GlobalRequests, Keepalive, Pinger
from .options import Target
from .retry import ConnectRetry
from .slots import Claim, Slots, _Held
from .starts import Starts, closes_waiting_sessions
from .stats import Counters
from .text import printable
from .totp import LoginAbandoned
from .waits import Signal, wait_any
from .warm import Spare

__all__ = ["Connection", "ConnectionState", "GaveUp", "Link", "open_transport",
           "probe_max_session"]

log = logging.getLogger("paramiko_executor.connection")

#: Flow control for bulk output: a larger window and packets than paramiko's
#: 2 MiB / 32 KiB cut the per-packet Python overhead that bounds throughput.
WINDOW_SIZE = 8 * 1024 * 1024
MAX_PACKET_SIZE = 64 * 1024

#: AEAD ciphers first: with them paramiko skips its pure-Python MAC comparison,
#: which costs more client CPU per packet than the whole rest of a short command.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")

#: The key exchange's time limit when ``timeout`` is None: paramiko would wait
#: forever on a server that stopped answering after its banner, and with it
#: every thread waiting for this connect.
HANDSHAKE_TIMEOUT = 60.0

#: How long the probe waits for the server to answer its channel opens.
PROBE_TIMEOUT = 30.0

#: How many opens the probe sends at first: OpenSSH's default MaxSessions (10)
#: and most configurations answer within this one round trip; only a server
#: that confirms them all is asked for the rest of the limit, in a second one.
PROBE_WAVE = 16


#: A server as `ServerLimits` knows it: host, port, user and host key.
ServerKey = Tuple[str, int, str, bytes]


class ConnectionState(NamedTuple):
    """A connected transport and the semaphore that caps its open channels."""

    transport: paramiko.Transport
    bound: threading.BoundedSemaphore


def probe_max_session(transport: paramiko.Transport, *, limit: int = 64) -> int:
    """How many session channels the server lets ``transport`` open at once.

    Sends opens of bare session channels without waiting for each answer (no
    shell, no exec: on a command-restricted key a shell would run the forced
    command): `PROBE_WAVE` at first and, only if the server confirms them
    all, the rest up to ``limit``. The server answers in order, so this costs
    about one round trip (two above `PROBE_WAVE` sessions). Counts the
    channels confirmed before the first refusal, closes them all and returns
    that count. Raises `ExecutorFailure` (a
    `ConnectionLost`) when the connection breaks meanwhile, or when the server
    leaves an open unanswered for `PROBE_TIMEOUT` seconds.
    """
    return _probe(transport, limit, {}).limit


class _ProbeSlots(Slots):
    """The slots of a probe's channels, which can be handed on to the connection's own.

    A probe channel's session lasts until the server answers its CLOSE; a
    command opened on the new connection before that could be refused. After
    `hand_over` each slot still held here holds one of the connection's slots
    too, given back when its channel's CLOSE is answered, so the connection
    starts without waiting for those answers and no open goes out early.
    The kept channel (the first spare) moves to the connection's slots
    outright: the thread that takes it holds one of those (`Slots.pass_on`).
    ``_handoff_lock`` (taken before ``Slots._cond``) makes a release and the
    hand-over exclude each other.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._handoff_lock = threading.Lock()
        self._owed = 0
        self._target: Optional[Slots] = None

    def release(self, n: int = 1, *, holder: Optional[int] = None,
                claim: Optional[Claim] = None, owner: Optional[_Held] = None) -> None:
        with self._handoff_lock:
            owed = min(n, self._owed)
            self._owed -= owed
            super().release(n, holder=holder, claim=claim, owner=owner)
            target = self._target
        if owed and target is not None:
            target.release(owed)

    def hand_over(self, target: Slots, kept: Optional[SessionChannel] = None) -> None:
        """Make ``target`` hold one slot per probe channel not yet closed by the server.

        ``kept``'s slot is ``target``'s own from now on, not one owed.
        """
        with self._handoff_lock:
            if kept is not None and target.acquire(blocking=False):
                if kept.rebind(target) is self:
                    Slots.release(self)  # its session is covered by target's slot now
                else:
                    target.release()  # the server closed it already
            for _ in range(self.limit - self.available):
                if not target.acquire(blocking=False):
                    break  # more channels than the count (confirmed after a refusal)
                self._owed += 1
            self._target = target


class _Probe(NamedTuple):
    """What a probe found: the limit, the slots its closing channels still hold, a kept one."""

    limit: int
    slots: _ProbeSlots
    kept: Optional[SessionChannel]


def _probe(transport: paramiko.Transport, limit: int,
           sessions: Dict[int, SessionChannel], *, keep: bool = False) -> _Probe:
    """`probe_max_session`, keeping the first open channel when ``keep`` (as a spare).

    ``sessions`` is the transport's registry of channels (`install_channel_hooks`):
    through it the server's CLOSE of each channel gives its slot back.
    """
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an integer, not {type(limit).__name__}")
    if limit < 1:
        raise ValueError(f"limit must be 1 or more, not {limit}")
    slots = _ProbeSlots(limit)
    channels: List[SessionChannel] = []
    kept: Optional[SessionChannel] = None
    try:
        deadline = time.monotonic() + PROBE_TIMEOUT
        count = 0
        refused = False
        while not refused and len(channels) < limit:
            wave: List[SessionChannel] = []
            size = min(PROBE_WAVE, limit) if not channels else limit - len(channels)
            try:
                for _ in range(size):
                    with Claim(slots, None) as claim:
                        claim.taken = slots.acquire()
                        wave.append(SessionChannel(transport, claim, sessions))
            except TRANSPORT_ERRORS as exc:
                raise ConnectionLost(f"connection lost while probing: {exc!r}") from None
            finally:
                channels += wave
            for chan in wave:
                if not chan.wait_open(max(0.0, deadline - time.monotonic())):
                    raise ConnectionLost(f"no answer to a channel open in {PROBE_TIMEOUT:g} s")
                if chan.opened:
                    count += 0 if refused else 1
                else:
                    refused = True
        if keep and count:
            kept = channels.pop(0)
        return _Probe(count, slots, kept)
    finally:
        for chan in channels:
            chan.discard()


def _classify(exc: BaseException, target: Target) -> BaseException:
    """Map a failed connect attempt to what the caller sees, or to `TemporaryFailure`."""
    if isinstance(exc, (AuthenticationFailure, HostKeyFailure, TemporaryFailure)):
        return exc
    if isinstance(exc, socket.gaierror) and exc.errno != socket.EAI_AGAIN:
        return ExecutorFailure(f"cannot resolve {target.hostname!r}: {exc.strerror}")
    if isinstance(exc, ConnectionLost):
        return TemporaryFailure(exc.description)
    # paramiko's texts may quote the server (its banner): escaped before they are shown.
    if isinstance(exc, TRANSPORT_ERRORS):
        return TemporaryFailure(printable(f"{type(exc).__name__}: {exc}".rstrip(": ")))
    if isinstance(exc, ExecutorFailure):
        return exc
    return ExecutorFailure(f"cannot connect to {target}: {type(exc).__name__}: "
                           f"{printable(str(exc))}")


#: How much one read of the connection's socket may take in ahead of what paramiko asked for.
READ_AHEAD = 256 * 1024

#: The read-ahead of an idle connection, or one that only exchanges small packets.
SMALL_READ = 4096

#: How long the transport thread's socket reads may block once logged in.
#: paramiko reads with a 0.1 s timeout only to notice a close, ten wake-ups a
#: second per idle connection; `_TransportSocket.close` wakes the read instead.
#: What else a timed-out read does waits this long when idle: paramiko's own
#: keepalive (the executor's runs in a thread of its own) and starting a rekey.
IDLE_READ_TIMEOUT = 5.0

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _TransportSocket(socket.socket):
    """The TCP socket under a transport: reads ahead, and acknowledges every read at once.

    paramiko reads each packet with two ``recv`` calls (its first cipher
    block, then the rest); a command's end (EOF, exit status, CLOSE) arrives
    as three packets in one TCP segment. Reading ahead serves such a burst,
    or several bulk packets, from one system call. Only the transport thread
    reads, so the read-ahead needs no lock.

    The large buffer is held only while data flows: reads start in a small
    one, a read that fills it brings the large one in, and a read that times
    out (after `IDLE_READ_TIMEOUT` once logged in) gives it back. A command's
    end (a few hundred bytes) never needs it, and an idle connection costs 4
    KiB, not 256.

    Linux ``TCP_QUICKACK``: sshd leaves Nagle on for sessions without a pty:
    a small packet it sends right after another (a channel's open
    confirmation after its host-keys notice, say) waits for our ACK, which
    Linux delays by up to 40 ms unless told otherwise, and the kernel forgets
    the setting after a while.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One large buffer while data flows: a fresh 256 KiB bytes per read
        # would cost an mmap, page faults and a munmap.
        self._small = memoryview(bytearray(SMALL_READ))
        self._large: Optional[memoryview] = None
        self._data = self._small  # the buffer that holds what was read
        self._at = self._end = 0
        # Deferred wake-ups: added by the transport thread, fired by it or by
        # whichever thread closes the socket; the lock makes a close and a
        # deferral exclude each other, so none is lost.
        self._deferred_lock = threading.Lock()
        self._deferred: Optional[List[Callable[[], None]]] = []  # None once closed
        self._write_lock = threading.Lock()  # a write-first send's descriptor against close
        self._pid = os.getpid()  # the process whose threads may hold the lock

    def defer(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` before the next read that may block, or at close; at once if closed.

        For the transport thread only (see ``channel._NetworkEvent``).
        """
        with self._deferred_lock:
            if self._deferred is not None:
                self._deferred.append(wake)
                return
        wake()

    def _wake(self, *, closing: bool = False) -> None:
        with self._deferred_lock:
            deferred = self._deferred
            self._deferred = None if closing else []
        for wake in deferred or ():
            wake()

    def recv(self, bufsize: int) -> bytes:  # type: ignore[override]  # paramiko passes no flags
        at = self._at
        if at == self._end:
            if self._deferred:
                self._wake()
            # Emptied first: a read that times out (every 0.1 s while idle) must
            # leave the buffer empty, not replay it.
            at = self._at = self._end = 0
            buffer = self._data = self._large or self._small
            try:
                self._end = self.recv_into(buffer)
            except socket.timeout:
                self._large = None  # idle: give the memory back
                raise
            if self._end == len(buffer) and self._large is None:
                self._large = memoryview(bytearray(READ_AHEAD))  # data flows: read ahead
            if _QUICKACK is not None:
                self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        end = self._at = min(at + bufsize, self._end)
        return bytes(self._data[at:end])

    if os.name == "posix":  # where a socket's descriptor is a file descriptor

        def send(self, data: Any, flags: int = 0) -> int:
            # A socket with a timeout polls before every send; a packet nearly
            # always fits the socket's buffer, so write first: one system call
            # per packet, not two (about 6 % of a warm fan-out round's CPU).
            if not flags:
                try:
                    # Locked against close: between reading the number and writing,
                    # a close in another thread would free the number for a file or
                    # connection opened meanwhile, which would get the packet (send
                    # reads its descriptor in the system call's own C code).
                    with self._write_lock:
                        return os.write(self.fileno(), data)
                except BlockingIOError:
                    pass  # the buffer is full: wait for room as send does
            return super().send(data, flags)

    def close(self) -> None:
        # A read blocked in another thread (the transport's) does not notice a
        # close; a shutdown wakes it at once with end-of-file.
        try:
            self.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # never connected, or the peer is gone already
        # After the shutdown, which fails a write blocked in another thread at once.
        if os.getpid() == self._pid:
            with self._write_lock:
                super().close()
        else:  # a forked child: the lock may be a copy held by no thread here
            super().close()
        self._wake(closing=True)


def _sock_is_spent(sock: Any) -> bool:
    """Whether a caller-given socket was closed (by an earlier connection over it)."""
    fileno = getattr(sock, "fileno", None)
    if fileno is not None:
        try:
            return fileno() < 0  # type: ignore[no-any-return]
        except OSError:
            return True
    return bool(getattr(sock, "closed", False) or getattr(sock, "_closed", False))


def _connect(target: Target,
             connecting: Optional[Callable[[socket.socket], None]]) -> socket.socket:
    """A TCP connection to the target, each socket handed to ``connecting`` before it connects.

    As ``socket.create_connection``, but another thread can cut a connect
    short (a host that drops SYNs would hold it for minutes): a shutdown of
    the socket ends it at once.
    """
    error: Optional[OSError] = None
    for family, kind, proto, _name, address in socket.getaddrinfo(
            target.hostname, target.port, 0, socket.SOCK_STREAM):
        sock = _TransportSocket(family, kind, proto)
        try:
            if connecting is not None:
                connecting(sock)
            sock.settimeout(target.timeout)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        # paramiko leaves Nagle on: with delayed ACKs each command would cost ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error if error is not None else OSError(f"no address for {target.hostname!r}")


# Any: what paramiko.Transport runs over (a socket, a jump host's channel, a ProxyCommand).
def _open_socket(target: Target,
                 connecting: Optional[Callable[[socket.socket], None]] = None) -> Any:
    if target.sock is not None:
        if _sock_is_spent(target.sock):
            raise ExecutorFailure(
                "the socket given as sock= is closed: a given socket carries one "
                "connection, and that one has ended (give a new socket, or none)")
        return target.sock
    if target.jump is not None:
        upstream = open_transport(target.jump)
        try:
            return upstream.open_channel(
                "direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0),
                timeout=target.timeout,
            )
        except BaseException:
            close_transport(upstream)
            raise
    if target.proxy_command:
        return paramiko.ProxyCommand(target.proxy_command)
    return _connect(target, connecting)


def _prefer_ciphers(transport: paramiko.Transport) -> None:
    options = transport.get_security_options()
    first = [c for c in PREFERRED_CIPHERS if c in options.ciphers]
    options.ciphers = tuple(first + [c for c in options.ciphers if c not in first])


def close_transport(transport: paramiko.Transport) -> None:
    """Close ``transport`` and the jump-host transports it was tunnelled through."""
    transport.close()
    sock = transport.sock
    if isinstance(sock, paramiko.Channel):
        close_transport(sock.get_transport())


class _Taking:
    """The boundary of a call that takes sessions and slots of ``link`` (see `Link.taking`)."""

    __slots__ = ("link", "slots", "thread", "held", "spared", "claim", "running", "__weakref__")

    def __init__(self, link: Link) -> None:
        assert link.slots is not None
        self.link = link
        self.slots = link.slots
        self.thread = threading.get_ident()
        # Sessions an earlier call of the thread left (Ctrl-C as its boundary gave them
        # back) are given back here, unless a call of the thread is still in its boundary:
        # code the thread runs amid a call (a signal handler, a finalizer) may call
        # again while that call's session is not running yet, its open being answered.
        # Its callbacks come later (the session runs its command, or is paramiko's).
        outer = link.boundaries.get(self.thread)
        if outer is not None:
            outer[:] = [ref for ref in outer if _running(ref)]
        #: The sessions the thread's outer calls hold, which this boundary's clean-up
        #: leaves alone (`give_back`): none unless such a call runs.
        self.spared: Sequence[SessionChannel] = ()
        if outer:
            self.spared = link.sessions.left_by(self.thread)
        else:
            link.discard_left(self.thread)
        #: The loose slots the thread held as the call began (an outer call's: kept), its
        #: kept blocks' left out (`Slots.loose`): one may end inside the call.
        self.held = link.slots.loose(self.thread)
        #: Set by `only`: the one claim the call holds from then on.
        self.claim: Optional[Claim] = None
        #: Cleared as the boundary is left; a boundary whose exit a Ctrl-C skipped is gone
        #: with its frame (a weak reference), so it holds back no later start's discard.
        self.running = True
        link.boundaries.setdefault(self.thread, []).append(weakref.ref(self))

    def __enter__(self) -> _Taking:
        return self

    def only(self, claim: Claim) -> None:
        """From here on the call holds ``claim``'s slot and takes nothing more: a
        ``bounded_connection`` block handed to its caller, which may end it out of order
        (a generator closed in a later call of the thread, or in another thread). An
        error then gives back that claim alone, if its exit did not: not the slots and
        sessions the thread took since, in calls of its own. Nor does the boundary of an
        outer call of the thread (the command whose ``on_output`` callback entered the
        block): the claim is kept (`Slots.keep`)."""
        self.claim = claim
        # After the store: a Ctrl-C between them ends the block, and its claim gives back.
        self.slots.keep(claim)

    def __exit__(self, kind: Optional[type], *rest: object) -> None:
        self.running = False
        if kind is None:
            return
        if self.claim is not None:
            self.claim.__exit__()  # again: a Ctrl-C at the first's entry skipped it
        else:
            self.link.give_back(self.thread, self.held, self.spared)


def _running(ref: weakref.ref[_Taking]) -> bool:
    """Whether the boundary ``ref`` refers to lives, was not left yet, and may hold a
    session: a ``bounded_connection`` block's, narrowed to its claim (`_Taking.only`),
    holds none, and a block may stay open for the whole of the thread's work."""
    boundary = ref()
    return boundary is not None and boundary.running and boundary.claim is None


class Link:
    """One live connection: its transport and everything that belongs to it alone.

    Created once the login succeeded; replaced as a whole on reconnect, so no
    part of it is ever paired with another connection's.
    """

    def __init__(self, transport: paramiko.Transport, sessions: Sessions,
                 requests: GlobalRequests, target: Target) -> None:
        self.transport = transport
        #: The executor's channels on this transport, by channel id (see `install_channel_hooks`).
        self.sessions = sessions
        self.requests = requests
        self.pinger = Pinger(requests, transport)
        self.slots: Optional[Slots] = None
        self.spare: Optional[Spare] = None
        self.keepalive: Optional[Keepalive] = None
        #: The server whose limit `LIMITS` remembers (None when ``max_sessions`` was given).
        self.server: Optional[ServerKey] = None
        #: True while the limit is one remembered from an earlier connection, not
        #: probed on this one: the server may allow fewer sessions now.
        self.remembered = False
        #: ``bounded_connection`` blocks: each holds a slot for sessions of the caller's
        #: own, opened through paramiko's API (`Connection.refused` counts them).
        self.blocks = Blocks(transport, sessions)
        #: One session start at a time on a server that closes sessions waiting for their request.
        self.starts = Starts(closes_waiting_sessions(transport.remote_version))
        #: Each thread's boundaries (`taking`) begun here, weakly held; a thread's are
        #: pruned by its next one, which is the only one to change its list.
        self.boundaries: Dict[int, List[weakref.ref[_Taking]]] = {}
        self._target = target

    @property
    def unproven(self) -> bool:
        """True when the limit was not probed on this connection: remembered, or ``max_sessions``.

        The server may allow fewer sessions than such a limit (`Connection.refused`).
        """
        return self.remembered or self.server is None

    def start(self, limit: int) -> None:
        """Publishable from here on: ``limit`` slots, the spare, and the keepalive if configured."""
        self.slots = Slots(limit)
        self.spare = Spare(self.transport, self.slots, self.sessions)
        interval = self._target.keepalive_interval
        if interval:
            self.keepalive = Keepalive(self.pinger, interval,
                                       self._target.keepalive_count_max or 3)

    @property
    def state(self) -> ConnectionState:
        assert self.slots is not None
        return ConnectionState(self.transport, self.slots)

    def alive(self) -> bool:
        return self.transport.is_active()

    def taking(self) -> _Taking:
        """The boundary of a call of this thread that takes sessions or slots here (a
        command's try, a transfer's, a ``bounded_connection`` block): ``with link.taking():``.

        An error out of the block, an interrupt (Ctrl-C) above all, gives back
        what the thread took in it and did not hand on (`give_back`), and the
        boundary's start what an earlier one left (`discard_left`): each hand-off
        by return value in the block (a slot's, a channel's, the spare's) is a point
        where a Ctrl-C can land, after the callee let go and before the caller held on.
        """
        return _Taking(self)

    def give_back(self, thread: int, held: int, spared: Sequence[SessionChannel] = ()) -> None:
        """Discard the sessions ``thread`` took and did not hand on (`discard_left`), but
        ``spared`` (an outer call's), then release the loose slots it holds beyond ``held``
        (`Slots.release_beyond`), which no claim or session gives back."""
        try:
            self.discard_left(thread, spared)
        finally:
            # Again: a second interrupt (Ctrl-C) at a discard's entry left that session
            # (and its slot) the thread's, until the thread's next call (`taking`).
            self.discard_left(thread, spared)
            if self.slots is not None:
                self.slots.release_beyond(thread, held)

    def discard_left(self, thread: int, spared: Sequence[SessionChannel] = ()) -> None:
        """Discard the sessions ``thread`` took and did not hand on (`Sessions.left_by`),
        but ``spared``: a slot of each comes back on the server's CLOSE."""
        for session in self.sessions.left_by(thread):
            if session not in spared:
                session.discard()

    def server_sessions(self) -> int:
        """How many of our sessions the server confirmed and has not closed yet."""
        return sum(1 for session in list(self.sessions.values())
                   if session.chan.active and session.holds_slot)

    def end(self) -> None:
        """The connection is gone (or going): waiters leave, keepalive stops, the socket closes."""
        if self.keepalive is not None:
            self.keepalive.stop()
        if self.slots is not None:
            self.slots.close()
        self.starts.close()
        close_transport(self.transport)


def open_transport(
    target: Target, started: Optional[Callable[[paramiko.Transport], None]] = None
) -> paramiko.Transport:
    """Connect, verify the host key and authenticate: one attempt, no retry.

    ``started`` is handed the transport before its handshake, so that another
    thread can close it meanwhile. Raises `AuthenticationFailure`/`HostKeyFailure`
    (never worth retrying), `TemporaryFailure` when the key exchange did not
    finish in time, and otherwise whatever the socket or paramiko raised.
    """
    return _open(target, started)[0]


def _open(
    target: Target, started: Optional[Callable[[paramiko.Transport], None]] = None,
    connecting: Optional[Callable[[socket.socket], None]] = None,
    abandoned: Optional[Callable[[], bool]] = None,
) -> Tuple[paramiko.Transport, Sessions, GlobalRequests]:
    """`open_transport`, also returning the channel hooks' tables.

    ``connecting`` is handed each socket before its TCP connect. A login
    waiting for a TOTP time step ends once ``abandoned()`` is true (see
    `authenticate`): it would spend the step, a code no other login of this
    user may send then, for no one.
    """
    sock = _open_socket(target, connecting)
    factory = target.transport_factory or paramiko.Transport
    try:
        transport = factory(sock, disabled_algorithms=target.disabled_algorithms)
    except BaseException:
        sock.close()
        if isinstance(sock, paramiko.Channel):
            close_transport(sock.get_transport())  # the jump hosts' connections too
        raise
    try:
        if started is not None:
            started(transport)
        transport.default_window_size = WINDOW_SIZE
        transport.default_max_packet_size = MAX_PACKET_SIZE
        transport.use_compression(target.compress)
        _prefer_ciphers(transport)
        thread_free_handshake_timer(transport)
        guard_user_sends(transport)
        bound_packet_writes(transport)
        if target.banner_timeout is not None:
            transport.banner_timeout = target.banner_timeout
        if target.auth_timeout is not None:
            transport.auth_timeout = target.auth_timeout
        if target.channel_timeout is not None:
            transport.channel_timeout = target.channel_timeout  # type: ignore[union-attr, unused-ignore]
        sessions = Sessions()
        install_channel_hooks(transport, sessions)
        requests = GlobalRequests(transport)
        target.host_keys.prepare(transport, target.hostname, target.port)
        limit = HANDSHAKE_TIMEOUT if target.timeout is None else target.timeout
        transport.start_client(timeout=limit)
        # start_client returns without a word when its time ran out mid-exchange.
        if transport.session_id is None:
            raise TemporaryFailure(f"the key exchange did not finish within {limit:g} s")
        target.host_keys.verify(transport, target.hostname, target.port)
        authenticate(transport, target.credentials, host=f"{target.hostname}:{target.port}",
                     abandoned=abandoned)
        drop_handshake_timer(transport)
        if isinstance(sock, _TransportSocket):
            # Set after the handshake and login, whose time limits paramiko
            # checks between reads.
            sock.settimeout(IDLE_READ_TIMEOUT)
        return transport, sessions, requests
    except BaseException:
        close_transport(transport)
        raise


#: How many sessions a probe asks for at most.
PROBE_LIMIT = 64


class ServerLimits:
    """The probed MaxSessions of each server, for the life of the process.

    A server is its host, port and user, and the host key it showed: a
    reconnect, a copy of an executor or another executor to the same server
    starts with the remembered limit instead of probing again, while another
    server later on the same address (a new host key) is probed anew. One
    lock guards the table.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limits: Dict[ServerKey, int] = {}
        # The servers being probed now, each with the wake-ups of the connects
        # that wait for that probe's result instead of probing too.
        self._probing: Dict[ServerKey, List[threading.Event]] = {}

    @staticmethod
    def key(target: Target, transport: paramiko.Transport) -> ServerKey:
        """The server behind ``transport`` (connected, host key known)."""
        return (target.hostname, target.port, target.credentials.username,
                transport.get_remote_server_key().asbytes())

    def get(self, server: ServerKey) -> Optional[int]:
        """The limit remembered for ``server``, or None."""
        with self._lock:
            return self._limits.get(server)

    def remember(self, server: ServerKey, limit: int) -> None:
        with self._lock:
            self._limits[server] = limit

    def get_or_claim(self, server: ServerKey, wake: threading.Event,
                     cancelled: threading.Event) -> Tuple[Optional[int], bool]:
        """The limit of ``server``, or the duty to probe it: ``(limit, False)`` or ``(None, True)``.

        While another connect probes the same server, waits for its result
        (`PROBE_TIMEOUT` at most; ``wake`` is set when it ends, and by whoever
        sets ``cancelled``): the many hosts of a `HostGroup` behind one server
        probe once, not once each. A claim must end with `release`. Returns
        ``(None, False)`` when ``cancelled`` is set or the probe in flight
        outlived the wait: probe without a claim, or give up.
        """
        deadline = time.monotonic() + PROBE_TIMEOUT
        claimed = False
        while True:
            try:
                with self._lock:
                    limit = self._limits.get(server)
                    if limit is not None:
                        return limit, False
                    waiting = self._probing.get(server)
                    if waiting is None:
                        self._probing[server] = []
                        claimed = True
                        return None, True
                    wake.clear()
                    waiting.append(wake)
            except BaseException:
                # A Ctrl-C as the lock is let go: the claim never reached the caller.
                if claimed:
                    self.release(server)
                raise
            remaining = deadline - time.monotonic()
            if cancelled.is_set() or remaining <= 0 or not wake.wait(remaining):
                return None, False
            if cancelled.is_set():
                return None, False

    def release(self, server: ServerKey) -> None:
        """End the claim of `get_or_claim`: its waiters look again (and one may probe)."""
        with self._lock:
            waiting = self._probing.pop(server, [])
        for wake in waiting:
            wake.set()

    def forget(self, server: ServerKey) -> None:
        """Let the next connect to ``server`` probe again."""
        with self._lock:
            self._limits.pop(server, None)

    def reset_after_fork(self) -> None:
        # Another thread may have held the lock at fork; the limits stay true.
        # The parent's probes in flight are not the child's.
        self._lock = threading.Lock()
        self._probing = {}


#: The process-wide table of probed limits.
LIMITS = ServerLimits()


class GaveUp(ExecutorFailure):
    """`Connection.get` stopped waiting for a connect: its deadline passed, or its stop was set."""


class _Unwanted(ExecutorFailure):
    """A connect ended before a retry because no caller waits for it any more."""

    def __init__(self, target: Target) -> None:
        super().__init__(f"no caller waits for the connect to {target} any more")


class _Attempt:
    """One connect in flight: its outcome, shared by every thread waiting for it."""

    def __init__(self, epoch: int, deadline: Optional[float]) -> None:
        self.epoch = epoch
        self.done = Signal()
        self.cancelled = Signal()
        #: How many callers wait for the outcome (under `Connection.lock`). When the
        #: last has left without it (gave up, interrupted), `unwanted` is set: no
        #: retry is started for no one.
        self.waiters = 0
        self.unwanted = Signal()
        #: Of those, how many have no deadline, and the latest deadline of the others:
        #: once it passed, only the first can still want the outcome, even if an
        #: interrupt kept a caller from counting itself out.
        self.patient = 0
        self.until = -math.inf
        self.join(deadline)
        #: Whether a thread runs it, or it was given up before any did (under the lock).
        self.claimed = False
        #: Set by `cancel`, and when a probe this attempt waits for ends.
        self.wake = threading.Event()
        self.link: Optional[Link] = None
        self.error: Optional[ExecutorFailure] = None
        #: The transport being set up, for `Connection.close` to cut short.
        self.transport: Optional[paramiko.Transport] = None
        #: The socket connecting before there is a transport, likewise.
        self.sock: Optional[socket.socket] = None

    def join(self, deadline: Optional[float]) -> None:
        """One more caller waits, until ``deadline`` (None: for the outcome). Under the lock."""
        if deadline is None:
            self.patient += 1
        else:
            self.until = max(self.until, deadline)
        self.waiters += 1

    def cancel(self) -> None:
        self.cancelled.set()
        self.wake.set()

    def started(self, transport: paramiko.Transport) -> None:
        self.transport = transport
        if self.cancelled.is_set():  # close() came first and could not see it
            transport.close()

    def connecting(self, sock: socket.socket) -> None:
        self.sock = sock
        if self.cancelled.is_set():
            self.cut_connect()

    def cut_connect(self) -> None:
        """End a TCP connect in progress (a shutdown; the connecting thread closes the socket)."""
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected yet and already failed, or closed


_connections: weakref.WeakSet[Connection] = weakref.WeakSet()


def _forget_after_fork() -> None:
    # paramiko's exit hook would stop the parent's transports from the child
    # (closing their sockets, killing a ProxyCommand): they are not the child's.
    forget_parent_transports()
    LIMITS.reset_after_fork()
    for connection in list(_connections):
        connection._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class Connection:
    """The shared connection of one executor; `lock` guards all of its state.

    `get` returns the current `Link`, connecting first when there is none:
    one thread connects (with `ConnectRetry`), every other thread waits for
    that same attempt and shares its outcome. `drop` ends a link only if it
    is still the current one, so a thread never tears down a newer
    connection; `close` drops the current link and cancels an attempt in
    flight, whose waiters (and only they) hear that the executor was closed.
    """

    def __init__(self, target: Target, *, retry: ConnectRetry, max_sessions: Optional[int]) -> None:
        self.target = target
        self.retry = retry
        self.max_sessions = max_sessions
        self.lock = threading.Lock()
        #: Bumped by `close`: commands started before it are not retried.
        self.epoch = 0
        self.counters = Counters()
        self._link: Optional[Link] = None
        self._attempt: Optional[_Attempt] = None
        #: The limit of the latest connection, for statistics after it is gone.
        self.limit: Optional[int] = None
        self._connected_before = False
        _connections.add(self)

    @property
    def link(self) -> Optional[Link]:
        """The current link, or None when not connected."""
        return self._link

    def get(self, deadline: Optional[float] = None, stop: Optional[Signal] = None) -> Link:
        """The current link, connecting (or waiting for a connect) first.

        A caller with a ``deadline`` (a `time.monotonic` value) or a ``stop``
        waits for the connect until then, or until ``stop`` is set, and then
        raises `GaveUp`. Its connect is the connection's, not its own: it
        runs in a thread of its own (if this caller would start it) and goes
        on for the other waiters, and a link it makes stays for later callers.
        Once no caller waits for it, it ends before its next retry (a try in
        progress is finished, not cut: a login may be half done); `close`
        cancels it as any other.
        """
        with self.lock:
            link = self._link
            if link is not None and link.alive():
                return link
            if link is not None:
                self._discard_locked(link)
            attempt = self._attempt
            # A caller after close() never joins an attempt that close() cancelled.
            leader = attempt is None or attempt.epoch != self.epoch
            # Each registration is the block's last statement: from there on, the
            # finally below undoes it whatever interrupts this caller.
            if leader:
                attempt = self._attempt = _Attempt(self.epoch, deadline)
            else:
                assert attempt is not None
                attempt.join(deadline)
        try:
            if deadline is None and stop is None:
                if leader:
                    # Returns at once if a thread started for others took it first.
                    self._lead(attempt, caller=True)
                attempt.done.wait()
            else:
                if leader:
                    self._lead_elsewhere(attempt)
                wait_any((attempt.done, stop),
                         None if deadline is None else deadline - time.monotonic())
        finally:
            # Also when interrupted (KeyboardInterrupt) anywhere since the registration.
            self._leave(attempt, deadline is None)
        # An attempt that ended for want of callers ended past every deadline.
        if not attempt.done.is_set() or isinstance(attempt.error, _Unwanted):
            raise GaveUp(f"still connecting to {self.target}")
        if attempt.error is not None:
            err = attempt.error
            raise type(err)(err.description)
        assert attempt.link is not None
        return attempt.link

    def _leave(self, attempt: _Attempt, patient: bool) -> None:
        """This caller waits for ``attempt`` no more: it has its outcome, gave up, or was cut off.

        A caller leaving without the outcome is counted out (the last one out
        makes the attempt unwanted). An attempt no thread has claimed yet (its
        leader left first) is run for the callers still waiting, or ended if
        none is, so that no later caller joins an attempt nobody runs.
        """
        with self.lock:
            if attempt.done.is_set():
                return
            attempt.waiters -= 1
            attempt.patient -= int(patient)
            if attempt.waiters == 0:
                attempt.unwanted.set()
            orphan = not attempt.claimed
            ended = orphan and attempt.waiters == 0
            if ended:
                attempt.claimed = True  # a thread started for it returns at once
                if self._attempt is attempt:
                    self._attempt = None
        if ended:
            attempt.error = _Unwanted(self.target)
            self._finish(attempt, None)
        elif orphan:
            self._lead_elsewhere(attempt)  # one of the two threads claims it

    def _lead_elsewhere(self, attempt: _Attempt) -> None:
        """`_lead` ``attempt`` in a thread of its own; if none can be had, end it failed."""
        try:
            threading.Thread(target=self._lead, args=(attempt,), daemon=True,
                             name=f"paramiko_executor connect {self.target}").start()
        except RuntimeError as exc:
            attempt.error = ExecutorFailure(f"cannot connect to {self.target}: {exc}")
            self._finish(attempt, None)

    def _lead(self, attempt: _Attempt, *, caller: bool = False) -> None:
        """Run ``attempt`` and publish its outcome (``caller``: in a waiting caller's thread)."""
        link: Optional[Link] = None
        claimed = False
        try:
            with self.lock:
                if attempt.claimed:
                    return  # given up by its leader before this thread started
                attempt.claimed = claimed = True
            link = self._establish(attempt)
        except ExecutorFailure as exc:
            attempt.error = exc
        except BaseException as exc:
            if caller and link is None:
                # Interrupted (Ctrl-C) in the caller's own thread: given back unclaimed,
                # so that the caller's `_leave` runs it afresh for the others still
                # waiting (or ends it), instead of failing them long before their time.
                with self.lock:
                    attempt.claimed = claimed = False
            else:
                attempt.error = ExecutorFailure(f"cannot connect to {self.target}: {exc!r}")
            raise
        finally:
            if claimed:
                self._finish(attempt, link)

    def _finish(self, attempt: _Attempt, link: Optional[Link]) -> None:
        """Publish ``attempt``'s outcome (``link``, or its error) and wake its waiters."""
        try:
            with self.lock:
                if self._attempt is attempt:
                    self._attempt = None
                if attempt.error is None and attempt.epoch != self.epoch:
                    attempt.error = ExecutorFailure("the executor was closed while connecting")
                if attempt.error is None:
                    self._link = attempt.link = link
                    self.counters.add(connects=1, reconnects=int(self._connected_before))
                    self._connected_before = True
            if attempt.link is None and link is not None:
                link.end()
        finally:
            attempt.done.set()

    def _establish(self, attempt: _Attempt) -> Link:
        delays = self.retry.delays()
        tries = 0
        while True:
            tries += 1
            try:
                return self._connect_once(attempt)
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    raise  # Ctrl-C in the caller leading it: its own, not a failed connect
                failure = _classify(exc, self.target)
                # A login we stopped ourselves (closed, or no caller waits) did not fail;
                # one the server broke did, waited for or not.
                if not ((isinstance(exc, AuthenticationInterrupted) and attempt.cancelled.is_set())
                        or (isinstance(exc, LoginAbandoned) and self._unwanted(attempt))):
                    self.counters.add(connect_failures=1)
                if not isinstance(failure, TemporaryFailure):
                    log.info("connecting to %s failed: %s", self.target, failure)
                    raise failure from None
                delay = next(delays, None)
                if attempt.cancelled.is_set():
                    raise ExecutorFailure("the executor was closed while connecting") from None
                # Before the last-try error: a caller run late past its deadline hears of
                # its timeout, and no retry is logged that will not come.
                if self._unwanted(attempt):
                    log.info("connecting to %s failed (%s); no caller waits for it any more",
                             self.target, failure)
                    raise _Unwanted(self.target) from None
                if delay is None:
                    raise ExecutorFailure(
                        f"cannot connect to {self.target} after {tries} attempts: {failure}"
                    ) from None
                log.info("connecting to %s failed (%s); retrying in %.1f s",
                         self.target, failure, delay)
                self._back_off(attempt, delay)

    def _back_off(self, attempt: _Attempt, delay: float) -> None:
        """Wait ``delay`` seconds before a retry; `ExecutorFailure` if closed or wanted no more."""
        end = time.monotonic() + delay
        while True:
            if self._unwanted(attempt):
                raise _Unwanted(self.target)
            now = time.monotonic()
            if now >= end:
                return
            # Read unlocked: only when to look again, `_unwanted` decides under the lock.
            wake = end if attempt.patient else min(end, max(attempt.until, now))
            if wait_any((attempt.cancelled, attempt.unwanted), wake - now):
                if attempt.cancelled.is_set():
                    raise ExecutorFailure("the executor was closed while connecting")

    def _unwanted(self, attempt: _Attempt) -> bool:
        """Whether no caller waits for ``attempt``; if so, later callers start one of their own."""
        with self.lock:
            if attempt.waiters > 0 and (attempt.patient > 0
                                        or time.monotonic() < attempt.until):
                attempt.unwanted.clear()  # one came meanwhile
                return False
            if self._attempt is attempt:
                self._attempt = None
            return True

    def _connect_once(self, attempt: _Attempt) -> Link:
        transport, sessions, requests = _open(self.target, attempt.started, attempt.connecting,
                                              lambda: self._unwanted(attempt))
        # From here on a Ctrl-C (in the caller leading the connect) anywhere leaves
        # nothing behind: not the transport, its keepalive, nor a probe claimed.
        link: Optional[Link] = None
        probe: Optional[_Probe] = None
        try:
            link = Link(transport, sessions, requests, self.target)
            limit = self.max_sessions
            if limit is None:
                server = link.server = LIMITS.key(self.target, transport)
                claimed = False
                try:
                    limit, claimed = LIMITS.get_or_claim(server, attempt.wake, attempt.cancelled)
                    link.remembered = limit is not None
                    if attempt.cancelled.is_set():
                        raise ExecutorFailure("the executor was closed while connecting")
                    if limit is None:
                        # The first open channel stays, as the first command's: the
                        # others' sessions last until the server answers their CLOSE.
                        probe = _probe(transport, PROBE_LIMIT, sessions, keep=True)
                        limit = probe.limit
                        log.info("%s allows %d sessions per connection", self.target, limit)
                        if limit == 0:
                            raise ExecutorFailure(f"{self.target} refuses every session channel")
                        LIMITS.remember(server, limit)
                finally:
                    if claimed:
                        LIMITS.release(server)
            link.start(limit)
            if probe is not None:
                assert link.slots is not None and link.spare is not None
                probe.slots.hand_over(link.slots, probe.kept)
                if probe.kept is not None:
                    link.spare.adopt(probe.kept)
        except BaseException:
            if link is None:
                close_transport(transport)
            else:
                link.end()
            raise
        self.limit = limit
        log.info("connected to %s", self.target)
        return link

    def refused(self, link: Link, *, quiet: bool = False) -> None:
        """The server refused a session on ``link``: forget its limit if fewer were held.

        A refusal while this executor held fewer sessions than the limit
        means the limit may be too high for the server now (also a race with
        the server freeing sessions at saturation): the next connect probes again.
        ``quiet``: no session of the link ended between a completed round trip
        and this refusal, so the server had freed every session we had
        closed, and the sessions it still confirmed for us (a
        ``bounded_connection`` block's among them) are all it allows.
        A link whose limit was not probed on it (`Link.unproven`: remembered,
        or the ``max_sessions`` given) is lowered to them then (at least 1),
        for the rest of its life: the callers past them wait for a slot
        instead of being refused until their tries run out, as they would be
        by a server restarted with a lower MaxSessions than the one
        remembered, or one allowing fewer than ``max_sessions``. A reconnect
        probes anew (the remembered limit was forgotten above), or starts
        again from ``max_sessions``: the server may allow more by then.
        """
        slots = link.slots
        if slots is None:
            return
        # The refused open's slot is already back: the others held, plus it.
        if link.server is not None and slots.limit - slots.available + 1 < slots.limit:
            LIMITS.forget(link.server)
        if not (quiet and link.unproven):
            return
        with self.lock:
            # A bounded_connection block's session is the server's too: left out, the
            # cap would leave that block's thread holding every slot.
            held = link.server_sessions() + link.blocks.reserved()
            if not 1 <= held < slots.limit:
                return
            before = slots.limit
            slots.lower(held)
            if self._link is link:
                self.limit = held
        log.info("%s refused a session with %d open: this connection's limit is now %d, "
                 "not the %d %s", self.target, held, held, before,
                 "remembered" if link.remembered else "of max_sessions")

    def _discard_locked(self, link: Link) -> None:
        # Caller holds the lock; closing waits for paramiko's thread, so it
        # runs in the background rather than under the lock.
        self._link = None
        if link.slots is not None:
            link.slots.close()
        link.starts.close()
        threading.Thread(target=link.end, daemon=True, name="paramiko_executor close").start()

    def drop(self, link: Link) -> None:
        """End ``link`` if it is still the current connection; otherwise do nothing."""
        with self.lock:
            if self._link is link:
                log.info("dropping the connection to %s", self.target)
                self._discard_locked(link)

    def drop_unused(self, unused: Callable[[Link], bool]) -> bool:
        """End the current link if ``unused(link)`` holds, judged under the lock; True if ended.

        A command counts itself started before it asks for the link, so one
        starting meanwhile is seen by ``unused`` or waits and connects anew.
        """
        with self.lock:
            link = self._link
            if link is None or not unused(link):
                return False
            self._discard_locked(link)
            return True

    def close(self) -> None:
        """Drop the connection and cancel a connect in flight; a later `get` connects anew."""
        with self.lock:
            self.epoch += 1
            attempt = self._attempt
            if attempt is not None:
                attempt.cancel()
            link, self._link = self._link, None
        if attempt is not None and attempt.transport is not None:
            # Cuts a handshake, login or probe short: its waiters hear at once.
            attempt.transport.close()
        elif attempt is not None:
            attempt.cut_connect()
        if link is not None:
            link.end()

    def _reset_after_fork(self) -> None:
        # The child must never touch the parent's socket: forget it without
        # closing it, and replace a lock another thread may have held at fork.
        self.lock = threading.Lock()
        self._link = None
        self._attempt = None
        self.counters.reset_after_fork()
