"""Every use of paramiko's private API, in one place.

paramiko offers no public way to open a channel without waiting for the
answer, to see a channel's messages as they arrive, or to send a message
without waiting out a key exchange; the executor needs all three. Each private
name it touches is listed here, with why; `tests/test_internals.py` fails
loudly when one disappears. Checked on paramiko 3.4.1, 3.5.1, 4.0.0 and 5.1.0.

``Transport._channel_handler_table``, ``Transport._handler_table``
    The message handlers, wrapped per transport (`wrap_handlers`) so that exit
    status, output, closes, refusals and global replies reach the executor as
    they arrive, from the transport thread. paramiko < 4 keeps
    ``_handler_table`` on the class with unbound functions (called with the
    transport first); newer versions bind it per instance.
``Transport._send_user_message``
    Sends a message, waiting out a key exchange: `send_when_clear`. Replaced
    per transport (`guard_user_sends`): paramiko takes ``clear_to_send_lock``
    there before the ``try`` that gives it back, so an interrupt (Ctrl-C) as
    that acquire returns kept it taken for good.
``Transport._send_message``, ``Transport.clear_to_send``, ``Transport.clear_to_send_lock``,
``Transport.clear_to_send_timeout``
    Send now or not at all while no key exchange runs (`send_if_clear`), so
    that the channel lock is never held while a key exchange is awaited, and
    wait for one with a time limit of the caller's (`send_within`): a
    command's deadline, a forwarded socket's timeout.
``Transport._next_channel``, ``Transport._channels``, ``Transport.channel_events``,
``Transport.channels_seen``, ``Transport._sanitize_window_size``,
``Transport._sanitize_packet_size``
    Register a new session channel and send its OPEN without waiting
    (`new_session_channel`): the first half of ``Transport.open_channel``;
    forgotten again (``_channels.delete``) when a key exchange held the OPEN
    back past its time.
    ``channels_seen`` is also pruned of fully closed channels (`forget_channel`),
    which paramiko never does, so that memory stays flat over millions of commands.
``Channel._set_transport``, ``Channel._set_window``
    Set up that channel as ``open_channel`` does.
``Channel._close_internal``
    Mark a channel closed and build its EOF and CLOSE as ``Channel.close`` does,
    without sending them (`close_messages`): a command's CLOSE waits for no
    other thread's send past a moment, nor for a key exchange.
``Channel._check_add_window``
    How much receive window to give back once output was consumed (`window_to_return`).
``Channel.out_buffer_cv``
    The channel's send-window condition, replaced to wake a sender with stdin left.
``Channel._wait_for_send_window``
    Take send window as ``Channel.send`` does (`take_send_window`), for a
    sender that builds its data messages itself (``pipe.send_all``).
``Channel._event_pending``, ``Channel.event``, ``Channel.event_ready``
    Send a channel request and wait for its answer with a time limit
    (`send_awaiting_reply`): ``Channel.invoke_subsystem`` waits without one.
``Channel.in_buffer``, ``Channel.in_stderr_buffer``
    Replaced (`replace_receive_buffers`) for SFTP by buffers that wake the
    reader once per whole reply, not per packet, and for forwarded channels
    by an `inbox.Inbox` that enforces the window and keeps packets uncopied;
    read back (`receive_buffer`) to find a forwarded channel's send gate.
``AuthHandler._request_auth``, ``AuthHandler._parse_service_accept``,
``AuthHandler._parse_userauth_failure``
    `UserAuth`: paramiko asks for the ``ssh-userauth`` service again with
    every ``auth_*`` call and waits for its acceptance each time, which costs
    a round trip each time and makes asyncssh servers (>= 2.14.1) disconnect
    ("Unexpected service in service request", paramiko issue 2405). The
    service is asked for once, together with the first request; a refusal's
    list of the methods that can continue, which paramiko drops, is kept.
``Channel.in_window_sofar``
    What was read from those buffers and not yet given back as window: with
    what they hold, what the server used of its window (`window_unreturned`),
    since paramiko does not refuse data past it.
``Transport.saved_exception``
    Read to tell a channel closed by the connection's end from one the server
    closed (`connection_error`).
``Transport._parse_disconnect``
    Wrapped during authentication to keep the server's reason for a disconnect.
``Ed25519Key._signing_key``
    paramiko keeps an Ed25519 key as a PyNaCl signing key (whose bytes are its
    seed) and cannot write it out: read to pickle an executor's ``pkey``
    (`private_key_object`).
``Transport._unlink_channel``, ``Transport._queue_incoming_channel``
    Overridden by the test server's transport (``testing.server``): it learns
    when a channel is fully closed, and keeps opened channels itself instead of
    queueing them for ``accept``.
``Transport._tcp_handler``
    Set before a ``tcpip-forward`` request is sent (`set_forward_handler`):
    ``request_port_forward`` sets it only after the reply, so a connection
    forwarded right after the reply would be refused.
``Packetizer.__timer`` (``_Packetizer__timer``)
    The handshake's time limit: paramiko cancels it again after every message
    it handles, an ``Event.set`` per packet for the connection's life; dropped
    once logged in (`drop_handshake_timer`).
``Packetizer.start_handshake``, ``Packetizer.handshake_timed_out``
    Replaced per transport (`thread_free_handshake_timer`): paramiko starts a
    ``threading.Timer`` thread per connection for that limit, which only sets
    a flag its reads test, and is cancelled at the server's first message.
``Packetizer.__write_lock`` (``_Packetizer__write_lock``), ``Packetizer.__sequence_number_out``
    Taken by `send_if_clear` around paramiko's send (reentrant, so paramiko's
    send takes it again): with ``within``, its wait ends then (another
    thread's write may wait on a peer that stopped reading). Every level the
    thread holds is given back (``RLock._release_save``): paramiko takes it
    again before its own ``try``, where an interrupt (Ctrl-C) would leave it
    taken for good. Under it, the sequence number tells whether the packet's
    write began: whether the server will answer an interrupted OPEN.
``Packetizer.write_all``
    Replaced per transport (`bound_packet_writes`) by `DeadlineWrites`: a
    packet written under `send_if_clear` with a deadline gives up past it
    (`WriteAbandoned`), where paramiko's retries on the socket's timeout for
    as long as the peer lives. Every other write is paramiko's own.
``paramiko.transport._active_threads``
    Emptied in a forked child, whose exit hook would otherwise stop the
    parent's transports (`forget_parent_transports`). A transport leaves it
    when its thread leaves the read loop, before it unlinks its channels and
    marks itself inactive: read to tell that the connection is ending
    (`transport_reading`).
``Transport.open_channel``'s locals ``chan``, ``event``, ``start_ts`` (`OPEN_CHANNEL_LOCALS`)
    Read from the frame of an open it gave up after its OPEN went out (its
    timeout, an interrupt in its wait), in the traceback (`given_up_open`):
    paramiko drops that channel, whose late confirmation is a session on the
    server that a ``bounded_connection`` block must still cover and close.
    ``start_ts`` is set only once the OPEN is written. Frame locals are no
    attributes: the canary looks them up in the function's code.

paramiko's type stubs leave these names out: each use carries a ``type:
ignore`` naming the error, so a name that the stubs gain, or a new use, shows.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

if sys.platform != "win32":
    import fcntl
    import termios

import paramiko
import paramiko.transport
from paramiko.auth_handler import AuthHandler
from paramiko.common import cMSG_CHANNEL_OPEN, cMSG_CHANNEL_WINDOW_ADJUST
from paramiko.message import Message
from paramiko.packet import Packetizer
from paramiko.ssh_exception import ProxyCommandFailure, SSHException

from .waits import writable_within

__all__ = [
    "BUSY_SEND_WAIT",
    "WITHIN",
    "WRITE_GRACE",
    "WriteAbandoned",
    "WriteDeadline",
    "bound_packet_writes",
    "PRIVATE_NAMES",
    "missing_private_names",
    "OPEN_CHANNEL_LOCALS",
    "given_up_open",
    "close_messages",
    "forget_channel",
    "open_confirmed",
    "forget_parent_transports",
    "new_session_channel",
    "connection_error",
    "SPENT_TIMER",
    "drop_handshake_timer",
    "guard_user_sends",
    "thread_free_handshake_timer",
    "receive_buffer",
    "replace_receive_buffers",
    "return_window",
    "reply_arrived",
    "send_awaiting_reply",
    "send_if_clear",
    "send_when_clear",
    "send_within",
    "set_forward_handler",
    "take_send_window",
    "transport_reading",
    "UserAuth",
    "window_to_return",
    "window_unreturned",
    "wrap_disconnect",
    "wrap_handlers",
]

#: (owner, name) of every private attribute used; the canary test checks each.
PRIVATE_NAMES: Tuple[Tuple[str, str], ...] = (
    ("Transport", "_channel_handler_table"),
    ("Transport", "_handler_table"),
    ("Transport", "_send_user_message"),
    ("Transport", "_send_message"),
    ("Transport", "_next_channel"),
    ("Transport", "_channels"),
    ("Transport", "_sanitize_window_size"),
    ("Transport", "_sanitize_packet_size"),
    ("Transport", "_parse_disconnect"),
    ("Transport", "channel_events"),
    ("Transport", "channels_seen"),
    ("Transport", "clear_to_send"),
    ("Transport", "clear_to_send_lock"),
    ("Transport", "clear_to_send_timeout"),
    ("Channel", "_close_internal"),
    ("Channel", "_set_transport"),
    ("Channel", "_set_window"),
    ("Channel", "_check_add_window"),
    ("Channel", "out_buffer_cv"),
    ("Channel", "_wait_for_send_window"),
    ("Channel", "_event_pending"),
    ("Channel", "event"),
    ("Channel", "event_ready"),
    ("Channel", "in_buffer"),
    ("Channel", "in_stderr_buffer"),
    ("AuthHandler", "_request_auth"),
    ("AuthHandler", "_parse_service_accept"),
    ("AuthHandler", "_parse_userauth_failure"),
    ("Channel", "in_window_sofar"),
    ("Transport", "saved_exception"),
    ("Ed25519Key", "_signing_key"),
    ("Transport", "_unlink_channel"),
    ("Transport", "_queue_incoming_channel"),
    ("Transport", "_tcp_handler"),
    ("transport module", "_active_threads"),
    ("Packetizer", "_Packetizer__timer"),
    ("Packetizer", "start_handshake"),
    ("Packetizer", "handshake_timed_out"),
    ("Packetizer", "_Packetizer__write_lock"),
    ("Packetizer", "_Packetizer__sequence_number_out"),
    ("Packetizer", "_Packetizer__received_bytes"),
    ("Packetizer", "write_all"),
)

#: The locals of paramiko's ``Transport.open_channel`` that `given_up_open` reads: the
#: channel, its answer event, and the time set once the OPEN is written.
OPEN_CHANNEL_LOCALS: Tuple[str, str, str] = ("chan", "event", "start_ts")

#: The code of paramiko's ``Transport.open_channel``, whose frame `given_up_open` looks
#: for (taken from the class: `blocks.Blocks` puts its own in front per transport).
_OPEN_CHANNEL_CODE = paramiko.Transport.open_channel.__code__

Handler = Callable[..., None]


def wrap_handlers(
    transport: paramiko.Transport,
    channel: Dict[int, Callable[[Handler], Handler]],
    connection: Dict[int, Callable[[Handler], Handler]],
) -> None:
    """Replace ``transport``'s handlers of the given message types by wrapped ones.

    Each wrapper factory is given paramiko's own handler and returns the new
    one. Channel handlers are called ``(chan, m)``; connection handlers
    ``(m)`` or, on paramiko < 4, ``(transport, m)``.
    """
    table = dict(transport._channel_handler_table)  # type: ignore[attr-defined]
    for kind, wrap in channel.items():
        table[kind] = wrap(table[kind])
    transport._channel_handler_table = table  # type: ignore[attr-defined]
    table = dict(transport._handler_table)  # type: ignore[attr-defined]
    for kind, wrap in connection.items():
        table[kind] = wrap(table[kind])
    transport._handler_table = table  # type: ignore[attr-defined]


def send_when_clear(transport: paramiko.Transport, message: Message) -> None:
    """Send ``message``, waiting first while a key exchange runs.

    paramiko waits ``clear_to_send_timeout`` and raises `SSHException`; if the
    server sent nothing meanwhile, the exchange is given up, the connection
    closed (`_give_up_key_exchange`). While its bytes still arrive (a slow
    link delivering what it queued before its answer) the send waits again.
    """
    while True:
        heard = _received(transport)
        try:
            transport._send_user_message(message)  # type: ignore[attr-defined]
            return
        except SSHException:
            if not key_exchange_running(transport):
                raise
            if _received(transport) == heard:
                _give_up_key_exchange(transport)
                raise


def _received(transport: paramiko.Transport) -> int:
    """Bytes received since the keys last changed: a key exchange that still hears
    from the server is slow, not stalled."""
    return transport.packetizer._Packetizer__received_bytes  # type: ignore[attr-defined, no-any-return]


def _give_up_key_exchange(transport: paramiko.Transport) -> None:
    """Close ``transport``: a key exchange held a send ``clear_to_send_timeout`` seconds.

    paramiko raises to the sender but keeps the connection, on which every
    later send waits as long again for an exchange the server stalls for
    good; closed, the connection is lost (evidence for `errors.is_lost`) and
    its commands are retried on a new one.
    """
    transport.close()


#: How long a send with a time limit waits at least for another thread's send
#: to let it out: a packet's write takes microseconds (a wait of none would fail
#: on a moment's contention), one to a peer that stopped reading never ends.
BUSY_SEND_WAIT = 0.25


def _take(lock: Any, timeout: float, taken: List[bool]) -> None:
    """``lock.acquire(timeout=timeout)``, its outcome appended to ``taken`` before any
    interrupt (Ctrl-C) can land.

    CPython runs a pending signal's handler as a call made from Python code
    returns, before the value is stored: ``held = lock.acquire()`` can raise
    with the lock taken and ``held`` unset. Here the acquire is called, and
    its outcome stored, by C code (``map``, ``list.extend``), where no
    handler runs; a handler that runs during the wait raises before the
    lock is got. The caller releases the lock if ``taken`` says so.
    """
    taken.extend(map(lock.acquire, (True,), (timeout,)))


class _Within:
    """`send_if_clear`'s default ``deadline``: the end of its ``within``."""


#: The default ``deadline`` of the sends: their ``within``'s end bounds the write too.
WITHIN = _Within()

#: A packet write's time limit: a `time.monotonic` value, None (none), or `WITHIN`.
WriteDeadline = Union[float, None, _Within]


def send_if_clear(transport: paramiko.Transport, message: Message, *,
                  within: Optional[float] = None, written: Optional[List[bool]] = None,
                  deadline: WriteDeadline = WITHIN) -> bool:
    """Send ``message`` now if no key exchange runs; False (nothing sent) if one does.

    With ``within``, also False when another thread's send holds the connection
    that many seconds (both locks together): its write may wait on a peer that
    stopped reading, for as long as the peer lives.

    The packet's own write is bounded by ``deadline`` (a `time.monotonic`
    value; by default the end of ``within``; None: no bound, as paramiko's):
    once it passed and the peer then took no byte for `WRITE_GRACE` seconds,
    the write is given up, the connection's packetizer closed (the stream is
    broken: the cipher moved on, part of the packet may be out), and
    `WriteAbandoned` raised. The transport's thread then ends as on any lost
    connection. Only on transports that `bound_packet_writes` prepared.

    ``written`` (a list of one item) has its item set True once the packet's
    write began, however the call ends: an interrupt (Ctrl-C) inside paramiko's
    send, after the write and before the return, cannot tell the caller
    otherwise whether the server will see the message. After `WriteAbandoned`
    it is True too, though the server never gets the whole packet: it gets
    the connection's end instead, and answers nothing more.
    """
    end = None if within is None else time.monotonic() + within
    until = end if isinstance(deadline, _Within) else deadline
    # Each lock is taken inside the try that gives it back (`_take`): an interrupt
    # (Ctrl-C) just as it is got would otherwise leave every later send waiting.
    held: List[bool] = []
    try:
        _take(transport.clear_to_send_lock, -1.0 if within is None else within, held)
        if not held[0] or not transport.clear_to_send.is_set():
            return False
        # paramiko's packet write lock is reentrant: _send_message takes it again.
        packetizer = transport.packetizer
        write_lock = packetizer._Packetizer__write_lock  # type: ignore[attr-defined]
        writing: List[bool] = []
        before: Optional[int] = None
        writes: Any = None
        try:
            _take(write_lock, -1.0 if end is None else max(0.0, end - time.monotonic()),
                  writing)
            if not writing[0]:
                return False
            # Under the write lock only this thread's packet moves the sequence
            # number, which paramiko counts just before it writes the packet.
            before = packetizer._Packetizer__sequence_number_out  # type: ignore[attr-defined]
            if until is not None:
                writes = packetizer.write_all
                if type(writes) is DeadlineWrites:
                    writes.end = until  # read by the write under this lock only
            try:
                transport._send_message(message)  # type: ignore[attr-defined]
            except WriteAbandoned:
                packetizer.close()
                raise
        finally:
            if writing and writing[0]:
                if type(writes) is DeadlineWrites:
                    writes.end = None
                if written is not None and before is not None:
                    # A plain store, no call: no interrupt lands between it and the release.
                    written[0] = written[0] or (
                        packetizer._Packetizer__sequence_number_out != before)  # type: ignore[attr-defined]
                # Every level this thread holds, not just ours: paramiko takes the
                # lock again just before its own try, and an interrupt as that take
                # returns would leave it taken, every other thread's send waiting.
                write_lock._release_save()
        return True
    finally:
        if held and held[0]:
            transport.clear_to_send_lock.release()


#: Seconds a packet write goes on past its deadline while the peer takes nothing: a
#: live peer drains its socket buffer within moments (a slow link keeps taking bytes,
#: and the write goes on), one that took nothing that long stopped reading.
WRITE_GRACE = 2.0

#: How often a write waiting for room in the socket looks whether the connection closed
#: (paramiko's own write looks at every socket timeout, 0.1 s) and the peer took bytes.
_WRITE_POLL = 0.1

#: The ioctl that tells how much of a socket's send queue the peer has not taken
#: (``SIOCOUTQ``, the same number as ``TIOCOUTQ`` on Linux); None elsewhere.
_OUTQ: Optional[int] = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None


class WriteAbandoned(TimeoutError):
    """A packet's write outran its deadline (`send_if_clear`) on a peer that took nothing
    for `WRITE_GRACE` seconds: given up, the connection closed under it."""


class DeadlineWrites:
    """A transport's packetizer's ``write_all``: paramiko's own, unless the writing
    thread's `send_if_clear` gave the write a deadline (`end`).

    paramiko's write retries on the socket's timeout until the packetizer is
    closed: for as long as a peer that stopped reading lives. This one gives
    up (`WriteAbandoned`) once ``end`` passed and then no byte went out for
    `WRITE_GRACE` seconds; a peer that still drains its buffer, however
    slowly, gets the whole packet. An interrupt (Ctrl-C) during such a write
    reaches the caller once the packet is all out (paramiko counted it before
    the write: half a packet, or none, breaks the stream, and the server then
    drops the connection, every other thread's calls with it); a packet that
    cannot be finished so closes the connection first.
    """

    __slots__ = ("_packetizer", "_sock", "_paramikos", "end")

    def __init__(self, packetizer: Packetizer, sock: Any) -> None:
        self._packetizer = packetizer
        self._sock = sock
        self._paramikos: Callable[[bytes], None] = packetizer.write_all
        #: The deadline of the write under way; set and cleared under the write lock.
        self.end: Optional[float] = None

    def __call__(self, out: bytes) -> None:
        end = self.end
        if end is None:
            self._paramikos(out)
            return
        left = [out]  # what is still to go out, kept up to date by `_write`
        try:
            self._write(left, end)
        except Exception:
            raise
        except BaseException:
            # An interrupt (Ctrl-C) mid-write: paramiko already counted the packet
            # (sequence number, cipher), so the stream stays whole only with all of
            # it out. Finished first (bounded as the write itself); failing that,
            # the connection is closed: nothing may follow a broken packet, or the
            # server drops the connection on it, and every other thread's calls.
            try:
                self._write(left, end)
            except BaseException:
                self._packetizer.close()
            raise

    def _write(self, left: List[bytes], end: float) -> None:
        """Write ``left[0]``, storing what remains in it as bytes go out."""
        sock = self._sock
        # Only a socket can be polled for room; anything else (a jump host's
        # channel, a proxy command) blocks in its send for its own timeout.
        polled = isinstance(sock, socket.socket)
        moved = time.monotonic()  # when the peer last took bytes (or the write began)
        queued: Optional[int] = None
        zeros = 0
        while left[0]:
            if self._packetizer.closed:
                raise EOFError()
            remaining = max(end, moved) + WRITE_GRACE - time.monotonic()
            if remaining <= 0:
                raise WriteAbandoned(f"the peer took nothing for {WRITE_GRACE:g} s past "
                                     "the write's deadline")
            try:
                # A socket's own send waits for room up to its timeout (seconds
                # after login): polled first, the wait ends with the grace.
                if polled and not writable_within(sock, min(remaining, _WRITE_POLL)):
                    # The socket reports room only once a good part of its buffer
                    # is free: a slow peer takes bytes long before that.
                    now_queued = _queued(sock)
                    if now_queued is not None and queued is not None and now_queued < queued:
                        moved = time.monotonic()
                    queued = now_queued
                    continue
                before = len(left[0])
                # Stored with no call between: an interrupt lands before or after it.
                left[0] = left[0][sock.send(left[0]):]
            except (socket.timeout, BlockingIOError):
                continue
            except ProxyCommandFailure:
                raise  # as paramiko's
            except Exception:
                raise EOFError() from None  # paramiko's for any other failure (a broken pipe)
            if len(left[0]) < before:
                moved = time.monotonic()
                continue
            # As paramiko's: a sender that keeps taking nothing without an error is gone.
            zeros += 1
            if zeros > 10:
                raise EOFError()


def _queued(sock: socket.socket) -> Optional[int]:
    """Bytes in ``sock``'s send queue that the peer has not taken yet (Linux ``SIOCOUTQ``);
    None where that cannot be told."""
    if _OUTQ is None:
        return None
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return None


def bound_packet_writes(transport: paramiko.Transport) -> None:
    """Let `send_if_clear` bound the packet writes on ``transport`` by their deadlines
    (`DeadlineWrites`); writes without one stay paramiko's own."""
    packetizer = transport.packetizer
    packetizer.write_all = DeadlineWrites(  # type: ignore[method-assign, assignment]
        packetizer, transport.sock)


def guard_user_sends(transport: paramiko.Transport) -> None:
    """Make paramiko's own sends on ``transport`` (``Channel.send``, ``recv``'s window
    adjust, ``close``, requests: those of transfers without a time limit and of
    forwarded sockets, in the caller's thread) take their locks as `send_if_clear` does.

    paramiko takes ``clear_to_send_lock`` (not reentrant), and then its packet
    write lock, each before the ``try`` that gives it back: a Ctrl-C as either
    acquire returned kept it taken for good, and every later send of every
    thread waited forever (the interrupted transfer's own CLOSE too). Otherwise
    as paramiko's: the wait for a key exchange raises `SSHException` after
    ``clear_to_send_timeout``, and a message for a connection that ended is
    dropped.
    """
    def _send_user_message(message: Message) -> None:
        start = time.monotonic()
        while True:
            transport.clear_to_send.wait(0.1)
            if not transport.is_active():
                return
            if send_if_clear(transport, message):
                return
            if time.monotonic() > start + transport.clear_to_send_timeout:
                raise SSHException("Key-exchange timed out waiting for key negotiation")

    transport._send_user_message = _send_user_message  # type: ignore[attr-defined]


def send_within(transport: paramiko.Transport, message: Message, timeout: Optional[float],
                attempt: Optional[Callable[[Message], bool]] = None,
                written: Optional[List[bool]] = None, deadline: WriteDeadline = WITHIN) -> bool:
    """Send ``message`` once no key exchange runs; False (nothing sent) after ``timeout`` s.

    ``timeout`` None waits up to paramiko's ``clear_to_send_timeout`` (again
    while the server's bytes still arrive, as `send_when_clear`) and then
    raises `SSHException`, as paramiko's own send does, the connection closed
    (`_give_up_key_exchange`); 0 tries once. Each try
    is ``attempt(message)`` (default `send_if_clear`): True once it is done
    with the message, False while a key exchange holds it back. Raises
    `EOFError` when the connection ends during the wait. ``written`` and
    ``deadline`` (the packet write's): as for `send_if_clear` (the default
    attempt only); `WriteAbandoned` past it.
    """
    end = time.monotonic() + (transport.clear_to_send_timeout if timeout is None else timeout)
    if attempt is None:
        if timeout is None and written is None and isinstance(deadline, _Within):
            send_when_clear(transport, message)
            return True

        def attempt(m: Message) -> bool:
            # Another thread's send may hold the connection (a peer that stopped
            # reading): that wait ends at the deadline too.
            return send_if_clear(transport, m, written=written, within=None if timeout is None
                                 else max(BUSY_SEND_WAIT, end - time.monotonic()),
                                 deadline=deadline)
    heard = _received(transport)
    while not attempt(message):
        remaining = end - time.monotonic()
        if remaining <= 0:
            if timeout is None:
                if _received(transport) != heard:
                    heard = _received(transport)
                    end = time.monotonic() + transport.clear_to_send_timeout
                    continue
                _give_up_key_exchange(transport)
                raise SSHException("key exchange timed out")
            return False
        if not transport.clear_to_send.wait(min(remaining, 1.0)) and not transport.is_active():
            raise EOFError("the connection ended during a key exchange")
    return True


def key_exchange_running(transport: paramiko.Transport) -> bool:
    """Whether a key exchange holds back sending right now."""
    return not transport.clear_to_send.is_set()


def new_session_channel(transport: paramiko.Transport, answered: Any,
                        within: Optional[float] = None,
                        direct: Optional[Tuple[Tuple[str, int], Tuple[str, int]]] = None,
                        sent: Optional[List[paramiko.Channel]] = None,
                        deadline: WriteDeadline = WITHIN) -> Optional[paramiko.Channel]:
    """Register a session channel and send its OPEN without waiting for the answer.

    ``answered`` (an Event) is set on the server's answer, and also when the
    channel is closed from our side, which paramiko does not signal otherwise.
    The OPEN waits for a key exchange as `send_within` with ``within`` does;
    None when it was not sent in time, the channel forgotten again. Its
    write is bounded by ``deadline`` as `send_if_clear`'s. With
    ``direct`` (the target and the origin), a ``direct-tcpip`` channel instead.

    ``sent`` gets the channel appended once its OPEN was written, however the
    call ends: interrupted (Ctrl-C) after the write, the caller still learns
    of a channel the server will answer. One interrupted before the write is
    forgotten again.
    """
    with transport.lock:
        window = transport._sanitize_window_size(None)  # type: ignore[attr-defined]
        max_packet = transport._sanitize_packet_size(None)  # type: ignore[attr-defined]
        chanid = transport._next_channel()  # type: ignore[attr-defined]
        m = Message()
        m.add_byte(cMSG_CHANNEL_OPEN)
        m.add_string("session" if direct is None else "direct-tcpip")
        m.add_int(chanid)
        m.add_int(window)
        m.add_int(max_packet)
        for host, port in direct or ():
            m.add_string(host)
            m.add_int(port)
        chan = paramiko.Channel(chanid)
        transport._channels.put(chanid, chan)  # type: ignore[attr-defined]
        transport.channel_events[chanid] = answered
        transport.channels_seen[chanid] = True
        chan._set_transport(transport)  # type: ignore[attr-defined]
        chan._set_window(window, max_packet)  # type: ignore[attr-defined]
        chan.in_buffer.set_event(answered)
    written = [False]
    try:
        out = send_within(transport, m, within, written=written, deadline=deadline)
    except BaseException:
        if written[0]:
            if sent is not None:
                sent.append(chan)
        else:
            _forget_unsent(transport, chanid)
        raise
    if out:
        if sent is not None:
            sent.append(chan)
        return chan
    _forget_unsent(transport, chanid)
    return None


def _forget_unsent(transport: paramiko.Transport, chanid: int) -> None:
    """Forget channel ``chanid``, registered but never announced to the server."""
    with transport.lock:
        transport._channels.delete(chanid)  # type: ignore[attr-defined]
        transport.channel_events.pop(chanid, None)
        transport.channels_seen.pop(chanid, None)


class _SpentTimer:
    """A handshake timer that has nothing left to cancel (see `drop_handshake_timer`)."""

    def cancel(self) -> None:
        pass


#: Stands in for paramiko's handshake timer once the login is done.
SPENT_TIMER = _SpentTimer()


def drop_handshake_timer(transport: paramiko.Transport) -> None:
    """After the handshake and login: stop paramiko cancelling the handshake's timer per packet.

    paramiko cancels its (long finished) handshake timer again after every
    message it handles, an ``Event.set`` each time. The timer is replaced by
    one whose ``cancel`` does nothing, never by None: paramiko's thread tests
    the timer and then cancels it, and a None stored between the two would
    end the connection with an AttributeError. paramiko starts the timer
    only once per connection (a re-key starts none), so no limit is lost.
    """
    packetizer = transport.packetizer
    timer = packetizer._Packetizer__timer  # type: ignore[attr-defined]
    if timer is not None and timer is not SPENT_TIMER:
        timer.cancel()
        packetizer._Packetizer__timer = SPENT_TIMER  # type: ignore[attr-defined]


class _DeadlineTimer:
    """paramiko's handshake timer without a thread: expired once its time ran out uncancelled."""

    def __init__(self) -> None:
        self._deadline: Optional[float] = None
        self._cancelled = False

    def start(self, timeout: float) -> None:
        self._deadline = time.monotonic() + float(timeout)

    def cancel(self) -> None:
        self._cancelled = True

    def expired(self) -> bool:
        return (not self._cancelled and self._deadline is not None
                and time.monotonic() >= self._deadline)


def thread_free_handshake_timer(transport: paramiko.Transport) -> None:
    """Before ``start_client``: keep paramiko's handshake time limit, without its timer thread.

    paramiko starts a ``threading.Timer`` when it starts the key exchange
    (``handshake_timeout`` seconds), whose only effect is a flag that its
    reads test between socket timeouts, and cancels it at the server's first
    message: a thread start, and a thread switch, on every connect. Here the
    reads compare the clock with the same deadline instead, and paramiko's
    cancel stops it as before.
    """
    packetizer = transport.packetizer
    timer = _DeadlineTimer()  # unstarted, it has not expired
    # Set now, so that paramiko starts no timer of its own, and cancels this one.
    packetizer._Packetizer__timer = timer  # type: ignore[attr-defined]
    packetizer.start_handshake = timer.start  # type: ignore[method-assign]
    packetizer.handshake_timed_out = timer.expired  # type: ignore[method-assign]


def set_forward_handler(transport: paramiko.Transport, handler: Handler) -> None:
    """Let ``handler(chan, origin, server)`` take ``transport``'s forwarded-tcpip channels."""
    transport._tcp_handler = handler  # type: ignore[attr-defined]


def known_channel(transport: paramiko.Transport, chanid: int) -> Optional[paramiko.Channel]:
    """``transport``'s channel ``chanid``, None if paramiko does not know it (any more)."""
    chan: Optional[paramiko.Channel] = transport._channels.get(chanid)  # type: ignore[attr-defined]
    return chan


def open_confirmed(transport: paramiko.Transport, chanid: int) -> bool:
    """Whether the server already confirmed the open of channel ``chanid``, one paramiko knows."""
    chan = known_channel(transport, chanid)
    return chan is not None and bool(chan.active)


def close_messages(chan: paramiko.Channel) -> List[Message]:
    """Mark ``chan`` closed as ``Channel.close`` does; return its EOF (unless sent) and
    CLOSE, for the caller to send when it can (paramiko's close sends them at once,
    waiting for whatever holds the connection); none if it was closed already."""
    with chan.lock:
        if not chan.active or chan.closed:
            return []
        return [m for m in chan._close_internal() if m is not None]  # type: ignore[attr-defined]


def forget_channel(transport: paramiko.Transport, chanid: int) -> None:
    """Drop a channel that can receive nothing more from paramiko's ``channels_seen``."""
    transport.channels_seen.pop(chanid, None)


def window_to_return(chan: paramiko.Channel, consumed: int) -> int:
    """How much window to give back after ``consumed`` bytes were taken (0: not yet)."""
    return chan._check_add_window(consumed)  # type: ignore[attr-defined, no-any-return]


def window_unreturned(chan: paramiko.Channel) -> int:
    """Bytes read from ``chan``'s receive buffers and not yet given back as window."""
    return int(chan.in_window_sofar)


def return_window(chan: paramiko.Channel, consumed: int, within: Optional[float] = None) -> bool:
    """Give back the receive window of ``consumed`` bytes taken, once due, as ``Channel.recv`` does.

    A key exchange is waited out as `send_within` with ``within`` does: False
    (nothing sent) when it held the window adjust back that long.
    """
    ack = window_to_return(chan, consumed)
    if not ack:
        return True
    m = Message()
    m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
    m.add_int(chan.remote_chanid)
    m.add_int(ack)
    return send_within(chan.transport, m, within)  # type: ignore[arg-type]


def take_send_window(chan: paramiko.Channel, size: int) -> int:
    """Up to ``size`` bytes of ``chan``'s send window, waiting as ``Channel.send`` does.

    0 once the channel is closed or its EOF sent; `socket.timeout` after the
    channel's timeout.
    """
    with chan.lock:
        return chan._wait_for_send_window(size)  # type: ignore[attr-defined, no-any-return]


def replace_send_condition(chan: paramiko.Channel, condition: Any) -> None:
    """Use ``condition`` (built on ``chan.lock``) as the channel's send-window condition."""
    chan.out_buffer_cv = condition


def send_awaiting_reply(chan: paramiko.Channel, message: Message,
                        within: Optional[float] = None) -> bool:
    """Send a channel request that wants a reply; `reply_arrived` then waits for it.

    A channel already closed gets nothing: `reply_arrived` then answers at once,
    not accepted. A key exchange is waited out as `send_within` with ``within``
    does: False (nothing sent) when it held the request back that long.
    """
    transport: paramiko.Transport = chan.transport  # type: ignore[assignment]
    end = None if within is None else time.monotonic() + within

    def attempt(m: Message) -> bool:
        # The check and the send under the channel's lock, as `SessionChannel._send`:
        # nothing may follow paramiko's CLOSE (sent as the server's arrived), or the
        # server ends the whole connection on a packet for a channel it freed
        # (Dropbear: "Unknown channel"); and the event its close set stays set.
        with chan.lock:
            chan._event_pending()  # type: ignore[attr-defined]
            if chan.closed:
                chan.event.set()  # answered, not accepted (the open's answer is no reply)
                return True
            return send_if_clear(transport, m, within=None if end is None
                                 else max(BUSY_SEND_WAIT, end - time.monotonic()))

    return send_within(transport, message, within, attempt)


def reply_arrived(chan: paramiko.Channel, timeout: float) -> Tuple[bool, bool]:
    """(answered within ``timeout``, accepted) for the request of `send_awaiting_reply`."""
    if not chan.event.wait(timeout):
        return False, False
    return True, bool(chan.event_ready)


def receive_buffer(chan: paramiko.Channel) -> Any:
    """What takes the channel's incoming data: paramiko's buffer, or what replaced it."""
    return chan.in_buffer


def replace_receive_buffers(chan: paramiko.Channel, stdout: Any, stderr: Any) -> None:
    """Let ``stdout``/``stderr`` (BufferedPipe look-alikes) take the channel's incoming data."""
    chan.in_buffer = stdout
    chan.in_stderr_buffer = stderr


def connection_error(transport: Optional[paramiko.Transport]) -> Optional[BaseException]:
    """The exception that ended ``transport``'s thread, if any (paramiko saves it first)."""
    error = getattr(transport, "saved_exception", None)
    # paramiko saves a refused channel open's there too, on a live transport
    # (only its own open_channel, which we do not use, takes it back out).
    return None if isinstance(error, paramiko.ChannelException) else error


def wrap_disconnect(transport: paramiko.Transport,
                    wrapper: Callable[[Handler], Handler]) -> Callable[[], None]:
    """Wrap the transport's disconnect handler; returns a function that undoes it."""
    transport._parse_disconnect = wrapper(transport._parse_disconnect)  # type: ignore[attr-defined]

    def undo() -> None:
        transport.__dict__.pop("_parse_disconnect", None)

    return undo


def _service_accept(service: str) -> Message:
    m = Message()
    m.add_string(service)
    m.rewind()
    return m


class UserAuth:
    """The userauth requests of one transport: the service asked for once, refusals kept.

    The ``ssh-userauth`` service request and the first authentication request
    go out together (an RSA key's waits for the accept while the server's
    signature algorithms are unknown); later requests go out alone. Used from one thread (the
    one authenticating); the transport thread only records refusals.
    """

    def __init__(self, transport: paramiko.Transport) -> None:
        self._transport = transport
        self._asked = False
        #: The methods that can continue, from the latest refusal (None: none seen yet).
        self.methods: Optional[List[str]] = None

    def request(self, method: str, username: str, *args: Any) -> List[str]:
        """``Transport.auth_<method>(username, *args)`` without a repeated service request.

        ``method`` is ``none``, ``publickey`` (args: key), ``password`` (args:
        password, never falling back to keyboard-interactive) or
        ``interactive`` (args: handler). Returns and raises as paramiko's.
        """
        transport = self._transport
        if not transport.is_active() or not transport.initial_kex_done:
            raise SSHException("No existing session")
        # Any: paramiko's type stubs leave out the private methods replaced here.
        handler: Any = AuthHandler(transport)
        on_failure = handler._parse_userauth_failure

        def failure(m: Message) -> None:
            position = m.packet.tell()
            self.methods = [str(name) for name in m.get_list()]
            m.packet.seek(position)
            on_failure(m)

        handler._parse_userauth_failure = failure
        send_request = handler._parse_service_accept  # builds and sends the USERAUTH_REQUEST
        ask_service = handler._request_auth
        asked, self._asked = self._asked, True
        # An RSA signature's algorithm comes from the server's EXT_INFO
        # (server-sig-algs), which may still be unread when the key exchange
        # returns; it precedes the service accept, so wait for that then.
        await_accept = (not asked and method == "publickey" and "rsa" in args[0].get_name()
                        and not getattr(transport, "server_extensions", None))

        def request_auth() -> None:
            # The first request follows the service request at once: the server
            # handles them in order, so waiting for its accept would only cost a
            # round trip (the accept, when it comes, needs nothing done).
            if not asked:
                ask_service()
            if not await_accept:
                send_request(_service_accept("ssh-userauth"))

        handler._request_auth = request_auth
        if not await_accept:
            handler._parse_service_accept = lambda m: None
        event = threading.Event()
        transport.auth_handler = handler
        getattr(handler, f"auth_{method}")(username, *args, event=event)
        result: List[str] = handler.wait_for_response(event)
        return result


def forget_parent_transports() -> None:
    """In a forked child: let paramiko's exit hook leave the parent's transports alone."""
    del paramiko.transport._active_threads[:]  # type: ignore[attr-defined]


def transport_reading(transport: paramiko.Transport) -> bool:
    """Whether ``transport`` is active and its thread still reads from the server.

    False from the moment the thread leaves its read loop (the server's
    DISCONNECT, end of stream, a socket error): paramiko unlinks the channels
    before it marks the transport inactive.
    """
    return bool(transport.is_active()) and transport in paramiko.transport._active_threads  # type: ignore[attr-defined]


def private_key_object(key: paramiko.PKey) -> Any:
    """The ``cryptography`` private key behind ``key`` (None if it has none)."""
    if isinstance(key, paramiko.Ed25519Key):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(bytes(key._signing_key)[:32])  # type: ignore[attr-defined]
    # RSA and DSS keys hold it as ``key``, ECDSA keys as ``signing_key``.
    return getattr(key, "key", None) or getattr(key, "signing_key", None)


def given_up_open(exc: BaseException) -> Optional[Tuple[paramiko.Channel, threading.Event]]:
    """The channel and answer event of paramiko's ``open_channel`` that raised ``exc`` after
    sending the OPEN (timed out, interrupted in its wait); None when it sent none.

    Read from the raising frame (its locals in the traceback, `OPEN_CHANNEL_LOCALS`):
    paramiko does not give the channel up, and forgets it once collected, so
    its late confirmation (a session on the server) would be covered by no
    slot and closed by no one.
    """
    chan_name, event_name, written_name = OPEN_CHANNEL_LOCALS
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is _OPEN_CHANNEL_CODE:
            local = frame.f_locals
            chan, event = local.get(chan_name), local.get(event_name)
            if (written_name in local and isinstance(chan, paramiko.Channel)
                    and isinstance(event, threading.Event)):
                return chan, event
            return None
        tb = tb.tb_next
    return None


def missing_private_names() -> List[str]:
    """The names of `PRIVATE_NAMES` and `OPEN_CHANNEL_LOCALS` that the installed paramiko
    lacks; empty when all are there.

    Looked up on live objects (an unstarted transport over a socket pair, a
    channel, an Ed25519 key), since several are set per instance; the locals
    in the code of ``Transport.open_channel`` (``Transport.open_channel.<local>``).
    """
    code = _OPEN_CHANNEL_CODE
    locals_missing = [f"Transport.open_channel.{name}" for name in OPEN_CHANNEL_LOCALS
                      if name not in code.co_varnames + code.co_cellvars]
    import io
    import socket

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    text = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()).decode()
    ours, theirs = socket.socketpair()
    try:
        transport = paramiko.Transport(ours)
        owners = {
            "Transport": transport,
            "Channel": paramiko.Channel(0),
            "Ed25519Key": paramiko.Ed25519Key.from_private_key(io.StringIO(text)),
            "AuthHandler": AuthHandler(transport),
            "transport module": paramiko.transport,
            "Packetizer": transport.packetizer,
        }
        return [f"{owner}.{name}" for owner, name in PRIVATE_NAMES
                if not hasattr(owners[owner], name)] + locals_missing
    finally:
        ours.close()
        theirs.close()
