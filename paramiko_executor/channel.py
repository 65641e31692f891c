"""A session channel's life, from the slot it holds to the outcome it reports.

Two invariants are kept here (``docs/design/channel.rst`` draws them):

1. **A slot is a server session.** A `SessionChannel` is created holding one
   slot of its connection's `Slots`, and gives it back exactly once: when the
   server refused the open (`release_refused`), or when the server's CLOSE
   for the channel arrived (the transport thread's close hook), or never if
   the connection goes first (its `Slots` are then closed as a whole). Not a
   timeout, not our own CLOSE: a command that outlives its timeout keeps its
   slot until the server lets go of the session.
2. **The outcome is decided once**, when the deciding message arrives and
   before any cleanup I/O (`_decide`): complete (exit status or signal, and
   both EOFs or the CLOSE), never started (`NeverStarted`: exec refused, or
   closed before its reply), lost (`ConnectionLost`), closed without status
   (`ExecutorFailure`), or timed out. An error while closing a complete
   channel changes nothing.

The caller's ``on_output`` runs inside `callers_code()`: what it raises ends
the command as a timeout does (TERM, KILL, our CLOSE; the slot kept until the
server's CLOSE) and reaches the executor as a `CallerError`, never as a
connection failure. What the server sends on a command's channel is parsed
strictly here: a malformed message, or more data than the window granted,
ends that channel with an `ExecutorFailure` naming the protocol error
(paramiko pads short fields with zeros, and does not enforce the window).

The calling thread does its command's I/O itself. paramiko's transport thread
only feeds events (confirm, refusal, data, EOF, exit status, CLOSE) through the
hooks of `install_channel_hooks`, appending output to the command's buffers and
waking the command's thread through a single event, and only when there is
something to do.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import paramiko
from paramiko.common import (
    CONNECTION_FAILED_CODE,
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_OPEN,
    MSG_CHANNEL_OPEN_FAILURE,
    MSG_CHANNEL_OPEN_SUCCESS,
    MSG_CHANNEL_REQUEST,
    MSG_CHANNEL_SUCCESS,
    MSG_GLOBAL_REQUEST,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    cMSG_CHANNEL_CLOSE,
    cMSG_CHANNEL_DATA,
    cMSG_CHANNEL_EOF,
    cMSG_CHANNEL_OPEN_FAILURE,
    cMSG_CHANNEL_REQUEST,
    cMSG_CHANNEL_WINDOW_ADJUST,
    cMSG_REQUEST_FAILURE,
)
from paramiko.message import Message

from .command import RunOptions, with_terminal_eof
from .errors import (
    TRANSPORT_ERRORS,
    ConnectionLost,
    ExecutorFailure,
    NeverStarted,
    callers_code,
    translate,
)
from .inbox import gate_of
from .internals import (
    BUSY_SEND_WAIT,
    Handler,
    WriteAbandoned,
    _take,
    close_messages,
    forget_channel,
    key_exchange_running,
    known_channel,
    new_session_channel,
    open_confirmed,
    replace_send_condition,
    send_if_clear,
    send_when_clear,
    send_within,
    transport_reading,
    window_to_return,
    wrap_handlers,
)
from .output import LineSplitter, LiveStream, OutputBuffer, line_splitters
from .results import Output
from .slots import Claim, Slots
from .text import EscapingFilter, printable

__all__ = [
    "ChannelOutcome",
    "CommandSpec",
    "Cover",
    "Overdue",
    "SessionChannel",
    "close_soon",
    "in_background",
    "install_channel_hooks",
    "refusal_of",
    "Sessions",
]

log = logging.getLogger("paramiko_executor.channel")

#: After a timeout (or a raising callback) the command is sent TERM; if the
#: server has not closed the channel this many seconds later, KILL; as long
#: again after that, our CLOSE. The slot stays taken until the server's CLOSE.
KILL_GRACE = 5.0

#: How often a thread waiting on a channel checks that the connection lives:
#: a channel we closed ourselves is not woken by the transport's end.
LIVENESS_POLL = 1.0

#: How many channels closed on both sides a connection still recognises (see
#: `install_channel_hooks`): a message for one of them is ignored.
REMEMBERED_CLOSED = 256


class _NetworkEvent:
    """Set by the transport thread, it fires when that thread next waits for the network.

    A command's end arrives as one burst (EOF, exit status, CLOSE). Woken at
    the first packet, the command's thread would only contend for the GIL
    with the transport thread still handling the rest, and sleep again;
    deferred, it wakes once, to a finished exchange. The transport's socket
    (see ``connection._TransportSocket.defer``) fires deferred events before
    each read that may block and when it is closed, which paramiko does last
    thing in the transport thread, so no deferred event is ever lost. Set from
    any other thread, or over a socket that cannot defer, it fires at once.

    A burst sets one event up to six times (paramiko closes both buffers at
    EOF and again at CLOSE): an event already set, or already deferred, is
    left alone, so each burst costs one deferral and one wake-up.

    ``set``, ``clear``, ``is_set`` and ``wait`` behave as `threading.Event`'s
    (paramiko's buffers and open answers call the first two), but the event is
    one lock, held while the event is clear: one is made per command, and a
    `threading.Event` costs a `threading.Condition` to make and a lock
    allocated per wait.
    """

    def __init__(self, transport: Optional[paramiko.Transport]) -> None:
        self._transport = transport
        self._clear = threading.Lock()
        self._clear.acquire()
        #: A fire is pending: set by the transport thread, cleared by the fire.
        self._deferred = False

    def is_set(self) -> bool:
        return not self._clear.locked()

    def set(self) -> None:
        if not self._clear.locked():
            return
        transport = self._transport
        if transport is not None and threading.current_thread() is transport:
            if self._deferred:
                return
            defer = getattr(transport.sock, "defer", None)
            if defer is not None:
                self._deferred = True
                defer(self.fire)
                return
        self._open()

    def fire(self) -> None:
        # Cleared first: a set() that still sees it pending is covered by this fire.
        self._deferred = False
        self._open()

    def _open(self) -> None:
        try:
            self._clear.release()
        except RuntimeError:
            pass  # set already: by another thread between the check and here

    def clear(self) -> None:
        self._clear.acquire(False)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once the event is set (at once if it is), False after ``timeout`` seconds."""
        got: List[bool] = []
        try:
            # Taken in C (`_take`): an interrupt (Ctrl-C) as the acquire returns would
            # otherwise leave the event cleared, an open's answer lost for good.
            _take(self._clear, -1 if timeout is None else max(0.0, timeout), got)
        finally:
            if got and got[0]:
                # Still set: waiting does not clear it. Released here, not in a call
                # (`_open`), at whose entry an interrupt could land first.
                try:
                    self._clear.release()
                except RuntimeError:
                    pass  # set already: by another thread since the acquire
        return got[0]


class _Wakeup(_NetworkEvent):
    """A command's wake-up, which only its owner clears.

    paramiko's buffers clear the event they signal once they are read empty;
    with two buffers sharing one event that would lose the other's wake-up.
    """

    def clear(self) -> None:
        pass

    def reset(self) -> None:
        _NetworkEvent.clear(self)


class _WakingCondition(threading.Condition):
    """The channel's send-window condition, also waking a command that has stdin to send.

    sshd opens the window of every session it starts; a command with nothing
    left to send need not wake for that. One with stdin left wakes once a
    quarter of the largest window seen is open (or all it has left fits, or
    the channel closed): sshd returns window every 96 KiB, and a thread
    switch per three packets would cost more than the packets. The server
    still holds three quarters of its window to work on meanwhile, and a
    window that stops growing is the server's whole window, so it always wakes.
    """

    def __init__(self, chan: paramiko.Channel, session: SessionChannel) -> None:
        super().__init__(chan.lock)
        self._chan = chan
        self._session = session

    def notify_all(self) -> None:
        super().notify_all()
        s = self._session
        if not s.sending:
            return
        window = self._chan.out_window_size  # we hold the channel lock, as paramiko does here
        s.window_peak = max(s.window_peak, window)
        if window >= min(s.unsent, s.window_peak // 4) or self._chan.closed:
            s.wakeup.set()


class _RefusalsExpected(logging.Filter):
    """Demote paramiko's ERROR record of a refused channel open to DEBUG, its text escaped.

    A refusal at the server's MaxSessions is expected and handled (the open is
    retried), so it must not reach a user's console as an error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and "open FAILED" in str(record.msg):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            # The record carries the server's reason for refusing.
            record.msg, record.args = printable(record.getMessage()), None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_REFUSALS_EXPECTED = _RefusalsExpected()
_SERVER_TEXT_ESCAPED = EscapingFilter()


@dataclass(frozen=True)
class ChannelOutcome:
    """How one command ended: its output (decoded, or bytes) and its exit."""

    stdout: Output
    stderr: Output
    exit_status: Optional[int]  # None: timed out, or ended by a signal
    exit_signal: Optional[str]
    timed_out: bool
    #: Bytes of stdout and stderr the command sent, kept or not (statistics' payload).
    received: int
    #: Bytes of the caller's stdin (``CommandSpec.given``) that went out (statistics'
    #: payload): all of it, or less when the command ended or timed out first.
    sent: int


@dataclass(frozen=True)
class CommandSpec:
    """What to run on a channel (the bytes of the command and of its stdin), and how."""

    command: bytes
    stdin: bytes = b""
    options: RunOptions = RunOptions()
    #: Where the caller's own stdin lies in ``stdin`` (offset, length): the part
    #: `ChannelOutcome.sent` counts. None: all of ``stdin``. `DupingSSHExecutor`
    #: sends the command line (and a newline after the stdin) on stdin too.
    given: Optional[Tuple[int, int]] = None

    @property
    def sent_input(self) -> bytes:
        """The bytes to send before EOF: on a pty, stdin and then the terminal's end-of-file."""
        return with_terminal_eof(self.stdin) if self.options.pty else self.stdin


def _outside_key_exchange(transport: paramiko.Transport, handler: Callable[[], None]) -> None:
    """Run a handler that sends, never stalling the transport thread in a key exchange.

    paramiko's handlers for a channel's CLOSE, a refused request or a request
    wanting a reply send and wait while a key exchange runs; but only the
    transport thread can finish the exchange, so on that thread it would wait
    for itself until paramiko gives up on the connection. Only that thread
    starts key exchanges, so there the check cannot go stale while the handler
    runs; during one, the handler runs in a thread of its own. On any other
    thread (a forwarded channel's CLOSE left to its last sender out) the
    handler runs at once: its wait ends when the transport thread finishes.
    """
    if threading.current_thread() is not transport or not key_exchange_running(transport):
        handler()
        return
    in_background(handler)


def in_background(handler: Callable[[], None]) -> None:
    """Run a handler that sends in a thread of its own, where it may wait out a key exchange."""

    def deferred() -> None:
        try:
            handler()
        except TRANSPORT_ERRORS:
            pass  # the connection ended: the commands on it notice by themselves

    threading.Thread(target=deferred, name="paramiko_executor rekey", daemon=True).start()


def close_soon(chan: paramiko.Channel) -> None:
    """Send ``chan``'s EOF (unless sent) and CLOSE, never holding the caller up.

    A key exchange running, or another thread's send holding the connection
    `BUSY_SEND_WAIT` seconds (a peer that stopped reading), leaves the rest to
    a thread of its own, which waits for the connection as `send_when_clear`
    does and ends with it. So does an interrupt (Ctrl-C) here, which is then
    raised. A connection that broke is no error here.
    """
    messages: List[Message] = []
    try:
        messages = close_messages(chan)
        # No deadline on the writes: the call is done with the channel (its result
        # may be complete), and a server that stalls must not cost the connection.
        while messages and send_if_clear(chan.transport, messages[0],  # type: ignore[arg-type]
                                         within=BUSY_SEND_WAIT, deadline=None):
            del messages[0]
    except TRANSPORT_ERRORS:
        return
    except BaseException:
        # Lost, they would leave the server's session (and its slot) for as long as
        # its command runs: one that waits for stdin, for good.
        in_background(lambda: _send_in_order(chan, messages))
        raise
    if messages:
        in_background(lambda: _send_in_order(chan, messages))


def _send_in_order(chan: paramiko.Channel, messages: List[Message]) -> None:
    """Send ``messages`` (none: those `close_messages` still gives, after an
    interrupt that came before it) as `send_when_clear` does."""
    for message in messages or close_messages(chan):
        send_when_clear(chan.transport, message)  # type: ignore[arg-type]


class Overdue(Exception):
    """A key exchange held a send back past the command's deadline: nothing was sent."""


class _Malformed(Exception):
    """A message from the server that does not parse; the text names what is wrong."""


def _uint32(packet: io.BytesIO) -> int:
    field = packet.read(4)
    if len(field) != 4:
        raise _Malformed(f"a 4-byte integer holds {len(field)} bytes")
    return int.from_bytes(field, "big")


def _boolean(packet: io.BytesIO) -> bool:
    field = packet.read(1)
    if not field:
        raise _Malformed("a boolean is missing")
    return field != b"\x00"


def _string(packet: io.BytesIO) -> bytes:
    size = _uint32(packet)
    field = packet.read(size)
    if len(field) != size:
        raise _Malformed(f"a string of {size} bytes holds {len(field)}")
    return field


def _name(packet: io.BytesIO) -> str:
    """A request or signal name: printable US-ASCII, as RFC 4250 requires of names."""
    field = _string(packet)
    if not field or len(field) > 64 or not all(0x21 <= c <= 0x7E for c in field):
        raise _Malformed(f"a name is not printable US-ASCII ({len(field)} bytes)")
    return field.decode("ascii")


def _end(packet: io.BytesIO) -> None:
    if packet.read(1):
        raise _Malformed("bytes follow the end of the message")


class Sessions(Dict[int, "SessionChannel"]):
    """The executor's session channels of one transport, by id, and how many the server closed.

    ``watched`` holds the sessions opened through paramiko's own API that the
    executor still counts (a ``bounded_connection`` block's, see `blocks`):
    by channel id, what to call once the server closed the channel too.
    ``closes`` counts the server's closes of both kinds, by the transport
    thread only: a reader that sees it unchanged knows that no session ended
    in between.
    """

    closes = 0

    def __init__(self) -> None:
        super().__init__()
        self.watched: Dict[int, Callable[[], None]] = {}

    def left_by(self, thread: int) -> List[SessionChannel]:
        """The sessions ``thread`` took and has not handed on (see `SessionChannel.left_by`)."""
        return [session for session in list(self.values()) if session.left_by(thread)]


#: The attribute of a paramiko channel holding the server's refusal of its open.
_REFUSAL = "_paramiko_executor_refusal"


def _keep_refusal(transport: paramiko.Transport, m: Message) -> None:
    """Keep an OPEN_FAILURE's refusal on its channel, for `refusal_of`.

    paramiko keeps one per transport (``saved_exception``) and gives it to
    whichever thread asks first: opens refused together would read another's
    reason, or none. Called before paramiko wakes the opener.
    """
    start = m.packet.tell()
    try:
        chanid, code = _uint32(m.packet), _uint32(m.packet)
    except _Malformed:
        return
    finally:
        m.packet.seek(start)
    chan = known_channel(transport, chanid)
    if chan is not None:
        # As paramiko words it (its own ChannelException for the refusal).
        setattr(chan, _REFUSAL, paramiko.ChannelException(
            code, CONNECTION_FAILED_CODE.get(code, "(unknown code)")))


def refusal_of(chan: paramiko.Channel) -> Optional[paramiko.ChannelException]:
    """The server's refusal of ``chan``'s open (a ``ChannelException``); None if none came."""
    refusal: Optional[paramiko.ChannelException] = getattr(chan, _REFUSAL, None)
    return refusal


def _readable_refusal(m: Message) -> Message:
    """An OPEN_FAILURE as paramiko can read it: its texts made UTF-8 if they are not.

    paramiko decodes them strictly, in its thread: a reason in Latin-1, say,
    would end the whole connection.
    """
    start = m.packet.tell()
    try:
        chanid, code, reason, language = (_uint32(m.packet), _uint32(m.packet),
                                          _string(m.packet), _string(m.packet))
        reason.decode("utf-8")
        language.decode("utf-8")
        return m
    except _Malformed:
        return m  # paramiko pads what is missing with zeros
    except UnicodeError:
        clean = Message()
        clean.add_int(chanid)
        clean.add_int(code)
        clean.add_string(reason.decode("utf-8", "replace"))
        clean.add_string(language.decode("utf-8", "replace"))
        return Message(clean.asbytes())
    finally:
        m.packet.seek(start)


def install_channel_hooks(transport: paramiko.Transport, sessions: Sessions) -> None:
    """Let ``transport`` report each session channel's events to its `SessionChannel`.

    ``sessions`` maps channel ids to the executor's channels of this
    transport. The hooks wrap paramiko's own handlers and run after them. The
    close hook runs after paramiko has sent its own CLOSE in reply, so the
    channel is closed on both sides and the server can reuse its session slot:
    that is where the slot is released.
    """
    # A logger of our own below paramiko's, so that the filter touches only our transports.
    transport.set_log_channel(transport.get_log_channel() + ".paramiko_executor")
    transport.logger.addFilter(_REFUSALS_EXPECTED)
    transport.logger.addFilter(_SERVER_TEXT_ESCAPED)

    def data(on_data: Handler) -> Handler:
        def handle(chan: paramiko.Channel, m: Message) -> None:
            s = sessions.get(chan.chanid)
            if s is None or s.raw:
                on_data(chan, m)
                return
            try:
                payload = _string(m.packet)
                _end(m.packet)
            except _Malformed as exc:
                s.violated(f"malformed data: {exc}")
                return
            s.received("stdout", payload)
        return handle

    def extended_data(on_extended_data: Handler) -> Handler:
        def handle(chan: paramiko.Channel, m: Message) -> None:
            s = sessions.get(chan.chanid)
            if s is None or s.raw:
                on_extended_data(chan, m)
                return
            try:
                code = _uint32(m.packet)
                payload = _string(m.packet)
                _end(m.packet)
            except _Malformed as exc:
                s.violated(f"malformed extended data: {exc}")
                return
            # Only SSH_EXTENDED_DATA_STDERR is output; any other code is dropped,
            # its window given back.
            s.received("stderr" if code == 1 else None, payload)
        return handle

    def eof(on_eof: Handler) -> Handler:
        def handle(chan: paramiko.Channel, m: Message) -> None:
            s = sessions.get(chan.chanid)
            if s is not None and not s.raw and not s.exec_asked:
                # Taken, it would end the output of the command still to be sent here.
                s.violated("end of output before the command was sent")
                return
            on_eof(chan, m)
        return handle

    # The latest channels closed on both sides, oldest first: still known to
    # paramiko, which ignores a message for a channel it has seen but ends the
    # whole connection on one for a channel it never knew. A server may send
    # one late (paramiko's own server: a window adjust raced by its CLOSE).
    # Older ones are forgotten: paramiko's memory stays flat over millions of
    # commands.
    closed: Deque[int] = collections.deque()

    def close(on_close: Handler) -> Handler:
        def finish(chan: paramiko.Channel, m: Message) -> None:
            try:
                on_close(chan, m)
            except paramiko.SSHException:
                # paramiko's reply (our CLOSE) was held past clear_to_send_timeout by
                # a key exchange, and dropped: the server would keep the session, its
                # slot taken here, for the connection's life. Sent again as every
                # send is: while the server still sends, waited for; else the
                # connection ends, which frees them all.
                reply = Message()
                reply.add_byte(cMSG_CHANNEL_CLOSE)
                reply.add_int(chan.remote_chanid)
                try:
                    send_when_clear(transport, reply)
                except paramiko.SSHException:
                    pass  # given up: the connection ended
            closed.append(chan.chanid)
            while len(closed) > REMEMBERED_CLOSED:
                try:
                    forget_channel(transport, closed.popleft())
                except IndexError:  # another thread (see _outside_key_exchange) took it
                    break
            s = sessions.pop(chan.chanid, None)
            watcher = sessions.watched.pop(chan.chanid, None)
            if s is not None or watcher is not None:
                sessions.closes += 1
            if s is not None:
                s.server_closed()
            if watcher is not None:
                watcher()

        def handle(chan: paramiko.Channel, m: Message) -> None:
            def reply() -> None:
                _outside_key_exchange(transport, lambda: finish(chan, m))

            gate = gate_of(chan)
            if gate is None:
                reply()
            else:  # a forwarded channel: our CLOSE must follow its data in flight
                gate.close(reply)
        return handle

    def request(on_request: Handler) -> Handler:
        def paramikos(chan: paramiko.Channel, m: Message, s: Optional[SessionChannel]) -> None:
            try:
                on_request(chan, m)
            except UnicodeError as exc:
                # paramiko decodes a request's texts strictly: raised on its thread, this
                # would end the whole connection, under every command on it.
                if s is not None:
                    s.violated(f"a malformed channel request: {exc}")

        def handle(chan: paramiko.Channel, m: Message) -> None:
            s = sessions.get(chan.chanid)
            if s is None or s.raw:
                paramikos(chan, m, s)  # paramiko's own handling only
                return
            start = m.packet.tell()
            try:
                kind = _name(m.packet)
                want_reply = _boolean(m.packet)
                if kind in ("exit-status", "exit-signal") and not s.exec_asked:
                    raise _Malformed(f"{kind} before the command was sent")
                if kind == "exit-status":
                    status = _uint32(m.packet)
                    _end(m.packet)
                    s.exit_status = status
                elif kind == "exit-signal":
                    s.exit_signal = _name(m.packet)
            except _Malformed as exc:
                s.violated(f"a malformed channel request: {exc}")
                return
            if want_reply:
                m.packet.seek(start)
                _outside_key_exchange(transport, lambda: paramikos(chan, m, s))
            elif kind not in ("exit-status", "exit-signal"):
                # The command's end is recorded above; paramiko would only parse it again.
                m.packet.seek(start)
                paramikos(chan, m, s)
            if chan.eof_received or chan.closed:
                s.wakeup.set()  # else the EOF still to come wakes the command
        return handle

    def reply(success: bool) -> Callable[[Handler], Handler]:
        def wrap(on_reply: Handler) -> Handler:
            def handle(chan: paramiko.Channel, m: Message) -> None:
                s = sessions.get(chan.chanid)
                if s is not None and s.raw:
                    # A handed-over channel's one request wanting a reply (a transfer's
                    # subsystem) was answered: the server has a process for it or none.
                    s.request_answered()
                elif s is not None and not s.replied(success):
                    return  # paramiko would close the channel at a failure answering nothing
                if success:
                    on_reply(chan, m)
                else:  # paramiko closes the channel, which sends: not during a key exchange
                    _outside_key_exchange(transport, lambda: on_reply(chan, m))
            return handle
        return wrap

    def open_answer(refused: bool) -> Callable[[Handler], Handler]:
        def wrap(on_answer: Handler) -> Handler:
            def handle(*args: Any) -> None:  # (m), or (transport, m) on paramiko < 4
                m = args[-1]
                start = m.packet.tell()
                chanid = m.get_int()
                m.packet.seek(start)
                s = sessions.get(chanid)
                if open_confirmed(transport, chanid):
                    # A second answer: paramiko would take a refusal's word and forget
                    # the open channel, its command and slot left waiting for good.
                    if s is not None and not s.raw:
                        s.violated("an answer to an open already confirmed")
                    return
                if s is not None:
                    s.open_answered(refused)
                    if refused:
                        # Freed here, before paramiko wakes the opener, where no Ctrl-C
                        # lands: in the opener's thread one could land between the slot's
                        # record cleared and its release (`settle_open` finds it done).
                        s.release_refused()
                if refused:
                    args = (*args[:-1], _readable_refusal(m))
                    _keep_refusal(transport, m)
                on_answer(*args)
                if refused:
                    # paramiko forgets a refused channel everywhere but here.
                    forget_channel(transport, chanid)
                    sessions.pop(chanid, None)
            return handle
        return wrap

    def refused_unless_utf8(refusal: Callable[[io.BytesIO], Optional[Message]]
                            ) -> Callable[[Handler], Handler]:
        # paramiko decodes the texts of a server's global request or channel open
        # strictly: raised in its thread, the error would end the whole connection,
        # under every command on it. Such a message is refused instead.
        def wrap(on_message: Handler) -> Handler:
            def handle(*args: Any) -> None:  # (m), or (transport, m) on paramiko < 4
                m = args[-1]
                start = m.packet.tell()
                try:
                    on_message(*args)
                except UnicodeError:
                    m.packet.seek(start)
                    try:
                        answer = refusal(m.packet)
                    except _Malformed:
                        return
                    if answer is not None:
                        _outside_key_exchange(transport,
                                              lambda: send_when_clear(transport, answer))
            return handle
        return wrap

    def global_refusal(packet: io.BytesIO) -> Optional[Message]:
        _string(packet)
        if not _boolean(packet):
            return None
        m = Message()
        m.add_byte(cMSG_REQUEST_FAILURE)
        return m

    def open_refusal(packet: io.BytesIO) -> Optional[Message]:
        _string(packet)
        m = Message()
        m.add_byte(cMSG_CHANNEL_OPEN_FAILURE)
        m.add_int(_uint32(packet))
        m.add_int(OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED)
        m.add_string("")
        m.add_string("")
        return m

    wrap_handlers(
        transport,
        {
            MSG_CHANNEL_DATA: data,
            MSG_CHANNEL_EXTENDED_DATA: extended_data,
            MSG_CHANNEL_EOF: eof,
            MSG_CHANNEL_CLOSE: close,
            MSG_CHANNEL_REQUEST: request,
            MSG_CHANNEL_SUCCESS: reply(True),
            MSG_CHANNEL_FAILURE: reply(False),
        },
        {MSG_CHANNEL_OPEN_SUCCESS: open_answer(refused=False),
         MSG_CHANNEL_OPEN_FAILURE: open_answer(refused=True),
         MSG_GLOBAL_REQUEST: refused_unless_utf8(global_refusal),
         MSG_CHANNEL_OPEN: refused_unless_utf8(open_refusal)},
    )


#: Makes each channel's slot release happen once (rare contention: one lock serves all).
_RELEASE_LOCK = threading.Lock()


def _renew_release_lock() -> None:
    # A thread of the parent may have held it at the fork; the child's is free.
    global _RELEASE_LOCK
    _RELEASE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_release_lock)


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else deadline - time.monotonic()


class Cover:
    """What holds a slot of its own, taken over from a `Claim`, and gives it back once:
    a `SessionChannel`, a ``bounded_connection`` block past its end (`blocks.Reservation`).

    A subclass takes the slot over with plain stores (``_slots``, ``_holder``,
    then the claim's ``taken`` cleared), no call in between.
    """

    #: The slot covering the session, once taken over from the claim; None once released.
    _slots: Optional[Slots] = None
    #: The thread the slot was taken for, while only it can give it back (`Slots.acquire`).
    _holder: Optional[int] = None

    def _release(self) -> None:
        with _RELEASE_LOCK:
            slots, self._slots = self._slots, None
            holder = self._holder
        if slots is not None:
            # `_holder` is cleared with the holder's count (`Slots.release`'s ``owner``): a
            # boundary counting the slots between them would take a kept block's slot,
            # still counted to its thread, for a leaked one (`Slots.release_beyond`).
            slots.release(holder=holder, owner=self)

    def hold(self, holder: Optional[int]) -> None:
        """The slot is thread ``holder``'s from now on (None: the server's CLOSE frees it)."""
        if holder == self._holder:
            return  # already so (a released slot has no holder): no lock taken
        with _RELEASE_LOCK:
            if self._slots is not None and holder != self._holder:
                self._slots.pass_on(self._holder, holder, self)  # stores _holder with the count

    @property
    def holds_slot(self) -> bool:
        return self._slots is not None


class SessionChannel(Cover):
    """One session channel of the executor, and the slot that covers it.

    Created with the caller's ``claim`` on a slot (`Claim`); sends the OPEN
    at once, waiting for a key exchange ``open_within`` seconds at most
    (None: paramiko's ``clear_to_send_timeout``), else `Overdue`; the OPEN's
    write is bounded by ``write_deadline`` (see `internals.send_if_clear`). The slot
    becomes the session's once the OPEN is out; until then, and on
    `Overdue`, the claim gives it back. Its states move forward only:
    opening, open, exec sent, running, decided (complete, timed out, ...),
    closed by the server. Output is appended by the transport thread;
    everything else is done by the thread that owns the channel (or, after a
    timeout, by its reaper).
    """

    #: The thread that took this session without its slot (out of the spare, or
    #: made for it), until it hands the session on (see `left_by`).
    taker: Optional[int] = None

    def __init__(self, transport: paramiko.Transport, claim: Claim,
                 sessions: Dict[int, SessionChannel],
                 open_within: Optional[float] = None,
                 write_deadline: Optional[float] = None) -> None:
        self.transport = transport
        self._slots = None  # taken over from the claim by `_adopt`
        self._holder = None
        self.wakeup = _Wakeup(transport)
        #: Set on the server's answer to the open. The same event as `wakeup`:
        #: nothing else sets it before the answer, and it is only reset after.
        self.answered = self.wakeup
        #: Output: buffers filled by the transport thread (or live streams).
        self.stdout: Union[OutputBuffer, LiveStream] = OutputBuffer()
        self.stderr: Union[OutputBuffer, LiveStream] = OutputBuffer()
        #: After the outcome is fixed, output is only acknowledged, not kept.
        self.discarding = False
        #: False for ``keep_output=False`` without ``on_output``: output is dropped as it
        #: arrives, as after the outcome, but counted.
        self.keeping = True
        #: Bytes of stdout and stderr data the command sent (`ChannelOutcome.received`).
        self.output_bytes = 0
        #: Set first thing in `run`, which closes the channel on every path from there.
        self.running = False
        #: True while stdin is left to send: only then does the window matter.
        self.sending = False
        self.unsent = 0
        #: Bytes of stdin data whose packets went out (`ChannelOutcome.sent`): counted
        #: per packet, so a send cut off by a closed channel, a deadline or an
        #: abandoned write counts what went before it.
        self.stdin_sent = 0
        self.window_peak = 0
        self.exit_status: Optional[int] = None
        self.exit_signal: Optional[str] = None
        self.remote_closed = False
        #: Requests sent with want-reply, oldest first, and the replies not yet looked at.
        self._awaiting: Deque[str] = collections.deque()
        self.replies: Deque[Tuple[str, bool]] = collections.deque()
        #: True while the owner waits for replies; an accepted exec wakes nobody.
        self._reply_wakes = False
        #: Set just before the exec goes out: a command's output or end before
        #: it is not the command's (a server's, on a spare channel, say).
        self.exec_asked = False
        self.exec_sent = False
        self.exec_accepted: Optional[bool] = None
        #: Called once (from paramiko's thread) when the server answered the exec (a
        #: handed-over channel's subsystem request) or closed the channel: the server has
        #: no channel waiting for its request then.
        self.on_request_answer: Optional[Callable[[], None]] = None
        #: Handed over for paramiko's own use (`hand_over`): only the CLOSE is ours.
        self.raw = False
        #: True from a given-up open (`abandon_open`) until the server answers it.
        self.abandoned = False
        #: The protocol error that ended this channel (set once, by the transport thread).
        self.violation: Optional[str] = None
        #: When the OPEN went out: its answer times a round trip (`open_answered`).
        self._asked = time.monotonic()
        chan: Optional[paramiko.Channel] = None
        sent: List[paramiko.Channel] = []
        try:
            chan = new_session_channel(transport, self.answered, open_within, sent=sent,
                                       deadline=write_deadline)
            if chan is not None:
                self._adopt(chan, sessions, claim)
        except BaseException:
            if sent:
                # An interrupt (Ctrl-C) once the OPEN was out, even inside paramiko's
                # send: paramiko holds channels weakly and would forget this one, and
                # the server's confirmation would keep a session open, its slot freed
                # here, for the connection's life.
                self._adopt(sent[0], sessions, claim)
                self.abandon_open()
                # paramiko counts a packet just before its write: interrupted in
                # between or amid the write, the stream is broken and no answer
                # comes. A packet after it settles which: the server answers the
                # OPEN, or ends the connection (and the slots with it).
                in_background(transport.send_ignore)
            raise
        if chan is None:  # the server never heard of the channel: the claim frees the slot
            raise Overdue("a key exchange held back the channel's open")

    def _adopt(self, chan: paramiko.Channel, sessions: Dict[int, SessionChannel],
               claim: Claim) -> None:
        """Make ``chan``, whose OPEN was sent, this session's channel, and the claimed slot its."""
        if claim.taken:  # plain stores, no call: nothing can interrupt the handover
            self._slots, self._holder = claim.slots, claim.holder
            claim.taken = False
        self.chan = chan
        #: The receive window the server may still fill, under the channel's lock.
        self._window: int = chan.in_window_size
        self._sessions = sessions
        sessions[chan.chanid] = self

    # --- events from the transport thread --------------------------------------

    def received(self, stream: Optional[str], data: bytes) -> None:
        """Output for ``stream`` ("stdout", "stderr", None to drop) arrived.

        More than the window granted is a protocol error: paramiko does not
        refuse it, and would let a server grow the buffers without bound.
        Output before the exec, past EOF (a server's error) or after the
        outcome is dropped; so is all of it for ``keep_output=False``
        without ``on_output``, once counted in `output_bytes`.
        """
        if self.violation is not None:
            return
        chan = self.chan
        with chan.lock:
            window = self._window
            if len(data) <= window:
                self._window = window - len(data)
        if len(data) > window:
            self.violated(f"{len(data)} bytes of data with {window} bytes of window left")
            return
        if self.discarding or stream is None or chan.eof_received or not self.exec_asked:
            self._acknowledge(len(data))
            return
        self.output_bytes += len(data)
        if not self.keeping:
            self._acknowledge(len(data))
            return
        buffer = self.stdout if stream == "stdout" else self.stderr
        buffer.append(data)
        if isinstance(buffer, LiveStream):
            self.wakeup.set()  # the owner acknowledges as it hands the lines on
        else:
            self._acknowledge(len(data))

    def replied(self, success: bool) -> bool:
        """A reply to the oldest request still awaiting one arrived; False if none awaits one.

        A reply to no request is dropped, as OpenSSH's client drops it: kept,
        a server could grow the record without bound.
        """
        if not self._awaiting:
            return False
        kind = self._awaiting.popleft()
        if kind == "exec":
            self.exec_accepted = success
            self.request_answered()
        self.replies.append((kind, success))
        if self._reply_wakes or not success:
            self.wakeup.set()
        return True

    def violated(self, reason: str) -> None:
        """The server broke the protocol on this channel: the owner ends it with `ExecutorFailure`.

        Everything that arrives on the channel from here on is dropped.
        """
        if self.violation is None:
            self.violation = reason
        self.wakeup.set()

    def _check_violation(self) -> None:
        if self.violation is None:
            return
        if not self.exec_asked:
            # The server ended a channel no command ran on yet: another one may do.
            raise NeverStarted(f"protocol error from the server before the command was sent: "
                               f"{self.violation}")
        raise ExecutorFailure(f"protocol error from the server on the command's channel: "
                              f"{self.violation}; the command may have run")

    def open_answered(self, refused: bool) -> None:
        """The server answered the open: a round trip, timed for the slots' `Slots.pace`."""
        slots = self._slots
        if slots is not None:
            slots.open_answered(time.monotonic() - self._asked, refused=refused)

    def request_answered(self) -> None:
        """Call `on_request_answer`, once (paramiko's thread)."""
        call, self.on_request_answer = self.on_request_answer, None
        if call is not None:
            call()

    def server_closed(self) -> None:
        self.remote_closed = True
        self.request_answered()
        self.wakeup.set()
        self._release()

    # --- the slot ---------------------------------------------------------------

    def rebind(self, slots: Slots) -> Optional[Slots]:
        """Let ``slots`` (a slot taken there for it) cover this session; the slots that did.

        None when the server closed the channel already (its slot is back).
        """
        with _RELEASE_LOCK:
            previous = self._slots
            if previous is not None:
                self._slots = slots
        return previous

    def release_refused(self) -> None:
        """The server refused the open: it holds no session for us, so the slot is free."""
        self._sessions.pop(self.chan.chanid, None)
        self._release()

    def left_by(self, thread: int) -> bool:
        """Whether ``thread`` took this session (its slot held by it, or as its `taker`)
        and has not handed it on: to a command (`running`), to paramiko's API
        (`hand_over`), or to the spare. Such a session is no one else's: an
        interrupt (Ctrl-C) as it was handed on by a return value leaves it so.
        """
        return (self._holder == thread or self.taker == thread) and not (
            self.running or self.raw)

    # --- opening ------------------------------------------------------------------

    def wait_open(self, timeout: Optional[float]) -> bool:
        """True once the server answered the open (or the connection ended) within ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        # Sliced: a connection that ended just as the channel was asked for may never wake it.
        while not self.answered.wait(LIVENESS_POLL if end is None
                                     else min(LIVENESS_POLL, max(0.0, end - time.monotonic()))):
            if not self.transport.is_active():
                return True
            if end is not None and time.monotonic() >= end:
                return False
        return True

    @property
    def opened(self) -> bool:
        """After `wait_open`: whether the server confirmed the open.

        Raises `ConnectionLost` (never started) if the connection ended.
        """
        chan = self.chan
        if chan.active and not chan.closed:
            return True
        if not self.transport.is_active():
            raise ConnectionLost("the connection was lost opening a channel", started=False)
        return False

    def settle_open(self, deadline: Optional[float], holder: Optional[int]) -> Optional[bool]:
        """Wait for the server's answer to the open: True once it is open, its slot thread
        ``holder``'s; False when refused (the slot is free again); None when unanswered
        within the channel timeout or by ``deadline`` (given up: `abandon_open`).

        Raises `ConnectionLost` (never started) if the connection ended. On
        any error, an interrupt (Ctrl-C) included, the caller gives the
        channel up (`discard`): the caller's try covers the call itself.
        """
        # paramiko 3.4's stubs lack channel_timeout (paramiko has it)
        timeout: float = self.transport.channel_timeout  # type: ignore[attr-defined, unused-ignore]
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        if not self.wait_open(timeout):
            self.abandon_open()
            return None
        if self.opened:
            self.hold(holder)
            return True
        self.release_refused()
        return False

    def abandon_open(self) -> None:
        """Give up waiting for the open's answer; close the channel once it comes.

        The slot stays taken until then: a late confirmation is a server
        session like any other, freed on the server's CLOSE.
        """

        def reap() -> None:
            while not self.answered.wait(LIVENESS_POLL):
                if not self.transport.is_active():
                    return
            self.abandoned = False
            self._close_answered()

        self.abandoned = True
        self.hold(None)  # its thread leaves: the server's answer frees the slot
        threading.Thread(target=reap, name="paramiko_executor reap", daemon=True).start()
        self.taker = None  # the reaper's now (see `left_by`)

    def discard(self) -> None:
        """Close an unused channel (a spare); its slot frees on the server's CLOSE.

        A second discard (after an interrupt) closes nothing more and frees no slot.
        """
        self.hold(None)  # no thread's any more: the next command of the thread must not wait
        if self.answered.is_set():
            self._close_answered()
            self.taker = None  # closed: the server's CLOSE frees the slot (see `left_by`)
        else:
            self.abandon_open()

    def _close_answered(self) -> None:
        """Close a channel whose open was answered: an open one on the server's side too.

        Its CLOSE never holds the caller (`close_soon`): a command's thread
        discards the spare as it queues for a slot.
        """
        try:
            # Confirmed, not whether still open: a second discard (an interrupted
            # thread's boundary, see `left_by`) finds the channel closed by the
            # first, and its slot still the session's, freed on the server's CLOSE.
            if self.chan.active:
                close_soon(self.chan)  # nothing to send once closed
            else:
                self.release_refused()
        except TRANSPORT_ERRORS:
            pass  # the connection ended, and the session with it

    def hand_over(self) -> paramiko.Channel:
        """The open channel, for use through paramiko's own API (an SFTP client, say).

        Its data and requests go to paramiko's handlers from here on; the slot
        is still released on the server's CLOSE, and only then.
        """
        self.raw = True
        return self.chan

    # --- sending --------------------------------------------------------------------

    def _send(self, message: Message, *, window: int = 0, eof: bool = False,
              wait: bool = True, deadline: Optional[float] = None) -> bool:
        """Send ``message`` unless the channel is closed; False when it was.

        The check and the send happen under the channel lock, so that nothing
        we send can follow paramiko's own CLOSE for this channel: sshd drops the
        whole connection on a packet for a channel it has already freed. The
        lock is never held while waiting out a key exchange (the transport
        thread may need it to finish one). ``window`` is taken from the send
        window, and ``eof`` marks EOF sent, only with the send. A key exchange
        is waited out until ``deadline`` (`Overdue` past it, nothing sent), or
        paramiko's ``clear_to_send_timeout`` without one; the packet's write is
        bounded by ``deadline`` too (`send_if_clear`; None: unbounded, as
        paramiko's, for the sends nobody waits for). With ``wait`` false,
        a key exchange running, or another thread's send holding the
        connection `BUSY_SEND_WAIT` seconds, is a False too (nothing sent).
        """
        chan = self.chan
        sent = False

        def attempt(m: Message) -> bool:
            nonlocal sent
            with chan.lock:
                if chan.closed:
                    return True
                # Another thread's send may hold the connection (a peer that stopped
                # reading): with a deadline, that wait ends there too.
                if not wait:
                    within: Optional[float] = BUSY_SEND_WAIT
                else:
                    within = None if deadline is None else max(BUSY_SEND_WAIT,
                                                               deadline - time.monotonic())
                # The write itself is bounded by the command's deadline, never by
                # the busy-wait slice: past a slice, a server that stalls a while
                # would lose the connection, and every other command on it.
                if not send_if_clear(self.transport, m, within=within, deadline=deadline):
                    return False
                chan.out_window_size -= window
                if eof:
                    chan.eof_sent = True
            sent = True
            return True

        # Tried once first: with no key exchange running, that is every send.
        if attempt(message):
            return sent
        if not wait:
            return False
        if send_within(self.transport, message, None if deadline is None
                       else max(0.0, deadline - time.monotonic()), attempt):
            return sent
        raise Overdue("a key exchange held back a send past the command's deadline")

    def _request(self, kind: str, *fields: Any, want_reply: bool, wait: bool = True,
                 deadline: Optional[float] = None) -> bool:
        m = Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(self.chan.remote_chanid)
        m.add_string(kind)
        m.add_boolean(want_reply)
        for field in fields:
            if isinstance(field, bool):
                m.add_boolean(field)
            elif isinstance(field, int):
                m.add_int(field)
            else:
                m.add_string(field)
        if want_reply:
            # Queued before the send: the reply may come before the send returns.
            self._awaiting.append(kind)
        sent = False
        try:
            sent = self._send(m, wait=wait, deadline=deadline)
        finally:
            if not sent and want_reply:
                self._awaiting.pop()
        return sent

    def _send_stdin(self, data: memoryview, deadline: Optional[float]) -> int:
        """Send as much of ``data`` as the window allows now; -1 once the channel is closed.

        One packet per lock hold, so the transport thread can open the window meanwhile.
        """
        chan = self.chan
        sent = 0
        while sent < len(data):
            with chan.lock:
                size = min(len(data) - sent, chan.out_window_size, chan.out_max_packet_size - 64)
            if size <= 0:
                break
            m = Message()
            m.add_byte(cMSG_CHANNEL_DATA)
            m.add_int(chan.remote_chanid)
            m.add_string(data[sent:sent + size].tobytes())
            if not self._send(m, window=size, deadline=deadline):
                return -1
            sent += size
            self.stdin_sent += size
        return sent

    def _send_eof(self, deadline: Optional[float]) -> None:
        if self.chan.eof_sent:
            return
        m = Message()
        m.add_byte(cMSG_CHANNEL_EOF)
        m.add_int(self.chan.remote_chanid)
        self._send(m, eof=True, deadline=deadline)

    def _acknowledge(self, size: int, deadline: Optional[float] = None) -> None:
        """Open the receive window again once a tenth of it was used, as paramiko's recv() does.

        Not sent when a key exchange holds it back past ``deadline``: the
        command is then timed out, or its output is all in.
        """
        ack = window_to_return(self.chan, size)
        if ack:
            # Counted before it is sent: the server may use it at once.
            with self.chan.lock:
                self._window += ack
            m = Message()
            m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
            m.add_int(self.chan.remote_chanid)
            m.add_int(ack)
            if threading.current_thread() is self.transport:
                _outside_key_exchange(self.transport, lambda: send_when_clear(self.transport, m))
                return
            try:
                self._send(m, deadline=deadline)
            except Overdue:
                pass

    # --- waiting --------------------------------------------------------------------

    def _wait(self, deadline: Optional[float]) -> None:
        """Sleep until woken, the deadline, or the next liveness check."""
        remaining = _remaining(deadline)
        self.wakeup.wait(LIVENESS_POLL if remaining is None
                         else max(0.0, min(remaining, LIVENESS_POLL)))

    def _lost(self) -> ConnectionLost:
        return ConnectionLost("the connection was lost before the command finished",
                              started=self.exec_sent and self.exec_accepted is not False)

    def _await_replies(self, deadline: Optional[float]) -> Optional[bool]:
        """Wait for the replies to every request sent so far; None if the deadline passed first.

        Returns True when all succeeded. A refusal is left in `replies`.
        """
        self._reply_wakes = True
        try:
            while self._awaiting:
                self._check_violation()
                if self.remote_closed or not all(success for _, success in self.replies):
                    return False
                if not transport_reading(self.transport):
                    raise ConnectionLost("the connection was lost", started=False)
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    return None
                self.wakeup.reset()
                if self._awaiting and not self.remote_closed:
                    self._wait(deadline)
            return all(success for _, success in self.replies)
        finally:
            self._reply_wakes = False

    # --- running a command ---------------------------------------------------------

    def run(self, spec: CommandSpec, deadline: Optional[float],
            after_exec: Optional[Callable[[], None]] = None) -> Optional[ChannelOutcome]:
        """Run ``spec`` on this freshly opened channel.

        Returns the outcome once the command is complete or timed out (None
        when the deadline passed before the exec was sent: it never ran). A
        key exchange the server stalls holds no send past ``deadline``.
        Raises `NeverStarted` (the server turned the exec away: try again),
        `ConnectionLost`, `ExecutorFailure` (a refused variable or terminal,
        or a channel closed with no exit status after the exec was accepted),
        a `CallerError` carrying what ``spec.options.on_output`` raised (the
        command is then ended as on a timeout), or `ExecutorFailure` naming a
        protocol error of the server (the channel is then closed).
        The channel is closed on every path, an interrupt (Ctrl-C) included.
        """
        try:
            self.running = True
            # A command's session ends without its thread (the server closes it once the
            # command exits): a command the thread starts from ``on_output`` may wait for it.
            self.hold(None)
            if spec.options.on_output is not None:
                self.stdout = LiveStream()
                self.stderr = LiveStream()
            else:
                self.keeping = spec.options.keep_output
            if spec.sent_input:  # only a sender of stdin waits for window
                replace_send_condition(self.chan, _WakingCondition(self.chan, self))
            # The buffers' own events: a channel closed under us (the connection
            # ending) wakes the command too. stdout's has been `answered` (the
            # same event) since the open.
            self.chan.in_stderr_buffer.set_event(self.wakeup)  # type: ignore[arg-type]  # an Event look-alike
            with translate(self.transport, started=lambda: self.exec_sent,
                           what="the command's channel"):
                try:
                    return self._start(spec, deadline, after_exec)
                except (Overdue, WriteAbandoned):
                    # WriteAbandoned: a send of its own outran the deadline, and the
                    # connection went with it: timed out, never tried again.
                    if not self.exec_sent:
                        return None  # it never ran; the CLOSE below waits in the background
                    if not self.discarding:  # not asked to end already (`_hand_on`'s)
                        self._end_remote_command(deadline)
                    return self._timed_out(spec)
        finally:
            if not self.discarding:
                self._close_quietly()

    def _start(self, spec: CommandSpec, deadline: Optional[float],
               after_exec: Optional[Callable[[], None]]) -> Optional[ChannelOutcome]:
        if spec.options.pty or spec.options.env:
            if not self._prepare(spec, deadline):
                return None
        # After the terminal's and variables' replies: a violation then came before the exec.
        self._check_violation()
        # exec, stdin and EOF are pipelined without waiting for the exec
        # reply: the server handles them in order, and a refused exec
        # closes the channel before the rest is read.
        self.sending = True
        self.exec_asked = True
        if not self._request("exec", spec.command, want_reply=True, deadline=deadline):
            raise NeverStarted("the server closed the channel before the command was sent")
        self.exec_sent = True
        return self._converse(spec, deadline, after_exec)

    def _prepare(self, spec: CommandSpec, deadline: Optional[float]) -> bool:
        """Ask for a terminal and the variables, and wait for every answer before the exec.

        Waiting costs a round trip, but a refused variable must fail before
        the command runs, not after. False when the deadline passed first.
        """
        if spec.options.pty:
            self._request("pty-req", "xterm", 80, 24, 0, 0, b"\x00", want_reply=True,
                          deadline=deadline)
        for name, value in (spec.options.env or {}).items():
            self._request("env", name, value, want_reply=True, deadline=deadline)
        answered = self._await_replies(deadline)
        if answered is None:
            return False
        if answered:
            return True
        refused = [kind for kind, success in self.replies if not success]
        if not refused and self.remote_closed:
            raise NeverStarted("the server closed the channel before the command was sent")
        if refused and refused[0] == "pty-req":
            raise ExecutorFailure("the server refused a pseudo-terminal (pty=True)")
        # Replies come in request order: the first refused env request names the variable.
        names = list((spec.options.env or {}).keys())
        env_replies = [success for kind, success in self.replies if kind == "env"]
        name = names[env_replies.index(False)] if False in env_replies else "?"
        raise ExecutorFailure(
            f"the server refused the environment variable {name!r} (OpenSSH accepts only "
            "the names its AcceptEnv allows); the command did not run")

    def _converse(self, spec: CommandSpec, deadline: Optional[float],
                  after_exec: Optional[Callable[[], None]]) -> ChannelOutcome:
        try:
            return self._converse_until_decided(spec, deadline, after_exec)
        except BaseException as exc:
            # An interrupt (Ctrl-C) as the caller waits: the command is ended as on a
            # timeout. Without a terminal sshd would run it on, its session (and slot)
            # taken, after our CLOSE.
            if not isinstance(exc, Exception) and not self.discarding:
                self._end_remote_command(deadline)
            raise

    def _converse_until_decided(self, spec: CommandSpec, deadline: Optional[float],
                                after_exec: Optional[Callable[[], None]]) -> ChannelOutcome:
        pending = memoryview(spec.sent_input)
        eof_sent = False
        splitters = line_splitters(spec.options.on_output, spec.options.encoding)
        while True:
            self.wakeup.reset()
            if not eof_sent:
                try:
                    sent = self._send_stdin(pending, deadline) if pending else 0
                    if sent < 0:
                        eof_sent = True
                    else:
                        pending = pending[sent:]
                        if not pending:
                            self._send_eof(deadline)
                            eof_sent = True
                except TRANSPORT_ERRORS:
                    # The connection ended (a key exchange given up) while stdin was
                    # still going out: a command that already ended has its outcome.
                    if not self._complete():
                        raise
                    eof_sent = True
                self.unsent = len(pending)
                self.sending = not eof_sent
            if after_exec is not None:
                # After the first stdin (or the EOF) went out right behind the exec.
                after_exec()
                after_exec = None
            if splitters is not None:
                try:
                    self._hand_on(splitters, spec.options.keep_output, deadline, final=False)
                except BaseException:  # a CallerError, or KeyboardInterrupt and the like
                    self._end_remote_command(deadline)
                    raise
            outcome = self._decide(spec, splitters, deadline)
            if outcome is not None:
                return outcome
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                self._end_remote_command(deadline)
                return self._timed_out(spec)
            self._wait(deadline)

    def _complete(self) -> bool:
        """Whether the command's end and its EOF (or CLOSE) are in: nothing more arrives."""
        exited = self.exit_status is not None or self.exit_signal is not None
        return exited and bool(self.chan.eof_received or self.remote_closed)

    def _decide(self, spec: CommandSpec, splitters: Optional[Dict[str, LineSplitter]],
                deadline: Optional[float]) -> Optional[ChannelOutcome]:
        """The outcome, once the messages that decide it are in; None while it is open."""
        self._check_violation()
        if self._complete():
            if splitters is not None:
                self._hand_on(splitters, spec.options.keep_output, deadline, final=True)
            return ChannelOutcome(self._whole(self.stdout, spec), self._whole(self.stderr, spec),
                                  self.exit_status, self.exit_signal, False, self.output_bytes,
                                  self._stdin_out(spec))
        if self.remote_closed:
            if self.exec_accepted is not True:
                raise NeverStarted("the server closed the channel before running the command")
            raise ExecutorFailure("the server closed the channel without an exit status; "
                                  "the command may have run")
        if self.exec_accepted is False:
            # Refused: paramiko sent our CLOSE; the slot stays until the server's.
            raise NeverStarted("the server refused to run the command")
        # Not only is_active(): paramiko closes the channels before it marks
        # the transport inactive, and the woken command must not wait a poll.
        if not transport_reading(self.transport):
            raise self._lost()
        return None

    def _timed_out(self, spec: CommandSpec) -> ChannelOutcome:
        """The outcome of a command past its deadline: the output so far, no exit."""
        return ChannelOutcome(self._so_far(self.stdout, spec), self._so_far(self.stderr, spec),
                              None, None, True, self.output_bytes, self._stdin_out(spec))

    def _stdin_out(self, spec: CommandSpec) -> int:
        """Bytes of the caller's stdin (``spec.given``) that went out; what goes around it
        (a terminal's end-of-file, `DupingSSHExecutor`'s command line) is not counted."""
        offset, length = (0, len(spec.stdin)) if spec.given is None else spec.given
        return max(0, min(self.stdin_sent - offset, length))

    # --- output ----------------------------------------------------------------------

    def _whole(self, buffer: Union[OutputBuffer, LiveStream], spec: CommandSpec) -> Output:
        if isinstance(buffer, LiveStream):
            return buffer.kept(spec.options.encoding)
        return buffer.decode(spec.options.encoding)

    def _so_far(self, buffer: Union[OutputBuffer, LiveStream], spec: CommandSpec) -> Output:
        if isinstance(buffer, LiveStream):
            return buffer.kept(spec.options.encoding)
        return buffer.decode_so_far(spec.options.encoding)

    def _hand_on(self, splitters: Dict[str, LineSplitter], keep: bool,
                 deadline: Optional[float], *, final: bool) -> None:
        """Give the output that arrived to the caller's callback, line by line, from this thread.

        What the callback raises comes out as a `CallerError` (`callers_code`).
        """
        for name, stream in (("stdout", self.stdout), ("stderr", self.stderr)):
            assert isinstance(stream, LiveStream)
            chunk = stream.drain(keep)
            if chunk:
                self._acknowledge(len(chunk), deadline)
                with callers_code():
                    splitters[name].feed(chunk)
            if final:
                with callers_code():
                    splitters[name].finish()

    # --- ending ------------------------------------------------------------------------

    def _close_quietly(self) -> None:
        """Our CLOSE, after the outcome is fixed: an error here changes nothing.

        The caller has its outcome, with or without a timeout: what holds the
        CLOSE back is waited out in the background (`close_soon`).
        """
        self.hold(None)  # the thread leaves, even if a Ctrl-C kept run's first line from it
        self.sending = False
        close_soon(self.chan)

    def _end_remote_command(self, deadline: Optional[float]) -> None:
        """Ask the server to end the command, in the background; keep the slot until CLOSE.

        TERM at once, its write bounded by the command's ``deadline``; KILL if
        the server has not closed the channel `KILL_GRACE` seconds later; our
        CLOSE as long again after that, their writes unbounded (nobody waits
        for them). The caller returns at once. sshd refuses signals to a
        forced-command session, and keeps a session whose command ignores them
        until it ends: the slot stays taken that long, and commands queued
        meanwhile wait for it.
        """
        self.discarding = True
        self.sending = False
        # TERM leaves before the caller returns, as long as no key exchange or other
        # thread's send holds it:
        # the caller may close the connection next, and sshd leaves a command with
        # no terminal running when its connection ends.
        termed = self._signal("TERM", wait=False, deadline=deadline)

        def escalate() -> None:
            # Nobody waits on this thread: its sends pass no deadline, unbounded as
            # paramiko's. The command's long-past deadline would cost the connection,
            # and every other command on it, to a server that stalls 2 s.
            if not termed:
                # Sent from here, not the caller's thread: a key exchange the server
                # stalls holds every send up to paramiko's clear_to_send_timeout.
                self._signal("TERM")
            for step in ("KILL", "CLOSE"):
                end = time.monotonic() + KILL_GRACE
                while not self.remote_closed and self.transport.is_active():
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        break
                    self.wakeup.reset()
                    if not self.remote_closed:
                        self.wakeup.wait(min(remaining, LIVENESS_POLL))
                if self.remote_closed or not self.transport.is_active():
                    return
                if step == "KILL":
                    self._signal("KILL")
                else:
                    log.debug("channel %s: no CLOSE after TERM and KILL; closing our side",
                              self.chan.get_id())
                    self._close_quietly()

        threading.Thread(target=escalate, name="paramiko_executor escalate", daemon=True).start()

    def _signal(self, name: str, wait: bool = True, deadline: Optional[float] = None) -> bool:
        """Ask the server to send signal ``name`` to the command; False if it was not sent.

        ``deadline`` bounds the write (`_send`); None: unbounded, as paramiko's.
        """
        try:
            return self._request("signal", name, want_reply=False, wait=wait, deadline=deadline)
        except TRANSPORT_ERRORS:
            return False  # the connection ended: so did the command's session
