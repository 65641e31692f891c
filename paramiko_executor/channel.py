"""One command on one session channel: exec, stdin, stdout/stderr, exit status, timeout.

The calling thread does the I/O of its command itself (no helper thread per
command). paramiko's transport thread appends the output to the command's
lists as it arrives and opens the window again, so output never waits for
the command's thread; it wakes that thread through a single event only when
there is something to do: the send window opened while stdin is left, the end
of the output or the exit status arrived, or the channel closed. stdin is fed
only as far as the send window allows, so no size or interleaving of the
three streams can deadlock.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import paramiko
from paramiko.common import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_OPEN_FAILURE,
    MSG_CHANNEL_REQUEST,
    cMSG_CHANNEL_DATA,
    cMSG_CHANNEL_EOF,
    cMSG_CHANNEL_OPEN,
    cMSG_CHANNEL_REQUEST,
    cMSG_CHANNEL_WINDOW_ADJUST,
)
from paramiko.message import Message

from .keepalive import pinger_of
from .output import OutputBuffer
from .results import ExecutorFailure

__all__ = [
    "ChannelOutcome",
    "ConnectionLost",
    "PendingOpen",
    "install_channel_hooks",
    "is_lost",
    "open_command_channel",
    "run_on_channel",
]

log = logging.getLogger("paramiko_executor.channel")

#: How long a channel may take to confirm its close after the command ended or
#: was cancelled. Only a broken server exceeds it; the slot is released then anyway.
CLOSE_GRACE = 10.0

#: How often a channel the live server refused is asked for again, and how
#: long to back off between tries once a round trip alone did not help.
OPEN_TRIES = 20
QUICK_TRIES = 2
OPEN_BACKOFF = 0.005
OPEN_BACKOFF_MAX = 0.5

#: How often a wait for the server's answer to an open checks that the connection lives.
ANSWER_POLL = 0.1


class ConnectionLost(ExecutorFailure):
    """The connection broke under a command; the executor may retry it elsewhere.

    ``started`` is False when the command cannot have reached the server.
    """

    def __init__(self, description: str, executor: object = None, *, started: bool = True):
        super().__init__(description, executor)
        self.started = started


class _NetworkEvent(threading.Event):
    """Set by the transport thread, it fires when that thread next waits for the network.

    A command's end arrives as one burst (EOF, exit status, CLOSE). Woken at
    the first packet, the command's thread would only contend for the GIL
    with the transport thread still handling the rest, and sleep again;
    deferred, it wakes once, to a finished exchange. The transport's socket
    (see ``connection._TransportSocket.defer``) fires deferred events before
    each read that may block and when it is closed, which paramiko does last
    thing in the transport thread, so no deferred event is ever lost. Set from
    any other thread, or over a socket that cannot defer, it fires at once.
    """

    def __init__(self, transport: paramiko.Transport) -> None:
        super().__init__()
        self._transport = transport

    def set(self) -> None:
        transport = self._transport
        if threading.current_thread() is transport:
            defer = getattr(transport.sock, "defer", None)
            if defer is not None:
                defer(self.fire)
                return
        threading.Event.set(self)

    fire = threading.Event.set


class _Wakeup(_NetworkEvent):
    """A command's wake-up, which only its owner clears.

    paramiko's buffers clear the event they signal once they are read empty;
    with two buffers sharing one event that would lose the other's wake-up.
    """

    def clear(self) -> None:
        pass

    def reset(self) -> None:
        threading.Event.clear(self)


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

    def __init__(self, chan: paramiko.Channel, exchange: _Exchange) -> None:
        super().__init__(chan.lock)
        self._chan = chan
        self._exchange = exchange

    def notify_all(self) -> None:
        super().notify_all()
        ex = self._exchange
        if not ex.sending:
            return
        window = self._chan.out_window_size  # we hold the channel lock, as paramiko does here
        ex.window_peak = max(ex.window_peak, window)
        if window >= min(ex.unsent, ex.window_peak // 4) or self._chan.closed:
            ex.wakeup.set()


class _Exchange:
    """What the transport thread reports about one command's channel."""

    __slots__ = ("wakeup", "exit_status", "exit_signal", "remote_closed", "refused", "sending",
                 "unsent", "window_peak", "stdout", "stderr")

    def __init__(self, transport: paramiko.Transport) -> None:
        self.wakeup = _Wakeup(transport)
        #: Output as it arrives, appended by the transport thread.
        self.stdout = OutputBuffer()
        self.stderr = OutputBuffer()
        #: True while stdin is left to send: only then does the window matter.
        self.sending = True
        #: Bytes of stdin not sent yet, and the largest send window seen.
        self.unsent = 0
        self.window_peak = 0
        self.exit_status: Optional[int] = None
        self.exit_signal: Optional[str] = None
        self.remote_closed = False
        self.refused = False


class _RefusalsExpected(logging.Filter):
    """Demote paramiko's ERROR record of a refused channel open to DEBUG.

    A refusal at the server's MaxSessions is expected and handled (the open is
    retried), so it must not reach a user's console as an error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and "open FAILED" in str(record.msg):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_REFUSALS_EXPECTED = _RefusalsExpected()


def _exchange(chan: paramiko.Channel) -> Optional[_Exchange]:
    return chan.__dict__.get("_pe_exchange")


def _outside_key_exchange(transport: paramiko.Transport, handler: Callable[[], None]) -> None:
    """Run a transport-thread handler that sends, without stalling that thread in a key exchange.

    paramiko's handlers for a channel's CLOSE, a refused request or a request
    wanting a reply send from the transport thread and wait while a key
    exchange runs; but only the transport thread can finish the exchange, so
    it would wait for itself until paramiko gives up on the connection. Only
    this thread starts key exchanges, so the check cannot go stale while the
    handler runs; during one, the handler runs in a thread of its own.
    """
    if transport.clear_to_send.is_set():
        handler()
        return

    def deferred() -> None:
        try:
            handler()
        except (EOFError, OSError, paramiko.SSHException):
            pass  # the connection ended: the commands on it notice by themselves

    threading.Thread(target=deferred, name="paramiko_executor rekey", daemon=True).start()


def install_channel_hooks(transport: paramiko.Transport) -> None:
    """Let ``transport`` report exit status, exit signal, refusals and closes to commands.

    The hooks wrap paramiko's own handlers and run after them. The close hook
    runs after paramiko has sent its own CLOSE in reply, so a command that
    sees ``remote_closed`` knows the channel is closed on both sides and the
    server can reuse its session slot.
    """
    # A logger of our own below paramiko's, so that the filter touches only our transports.
    transport.set_log_channel(transport.get_log_channel() + ".paramiko_executor")
    transport.logger.addFilter(_REFUSALS_EXPECTED)
    table = dict(transport._channel_handler_table)
    on_data = table[MSG_CHANNEL_DATA]
    on_extended_data = table[MSG_CHANNEL_EXTENDED_DATA]
    on_close = table[MSG_CHANNEL_CLOSE]
    on_request = table[MSG_CHANNEL_REQUEST]
    on_failure = table[MSG_CHANNEL_FAILURE]

    def acknowledge(chan: paramiko.Channel, size: int) -> None:
        # What paramiko's recv() does once the reader took the data: open the
        # window again once a tenth of it was used.
        ack = chan._check_add_window(size)
        if ack:
            m = Message()
            m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
            m.add_int(chan.remote_chanid)
            m.add_int(ack)
            _outside_key_exchange(transport, lambda: transport._send_user_message(m))

    def handle_data(chan: paramiko.Channel, m: Message) -> None:
        # Output goes straight to the command's list: no buffer copies, and
        # no wake-up per packet for a thread that only needs the whole.
        ex = _exchange(chan)
        if ex is None:
            on_data(chan, m)
            return
        if chan.eof_received:
            return  # past EOF (a server's error): the command may be reading its output already
        data = m.get_binary()
        ex.stdout.append(data)
        acknowledge(chan, len(data))

    def handle_extended_data(chan: paramiko.Channel, m: Message) -> None:
        ex = _exchange(chan)
        if ex is None:
            on_extended_data(chan, m)
            return
        if m.get_int() == 1 and not chan.eof_received:  # SSH_EXTENDED_DATA_STDERR, the only kind
            data = m.get_binary()
            ex.stderr.append(data)
            acknowledge(chan, len(data))

    def finish_close(chan: paramiko.Channel, m: Message) -> None:
        on_close(chan, m)
        # Both CLOSEs are out, so nothing more can arrive for this channel:
        # forgetting it keeps paramiko's memory flat over millions of commands.
        transport.channels_seen.pop(chan.chanid, None)
        ex = _exchange(chan)
        if ex is not None:
            ex.remote_closed = True
            ex.wakeup.set()

    def handle_close(chan: paramiko.Channel, m: Message) -> None:
        _outside_key_exchange(transport, lambda: finish_close(chan, m))

    def handle_request(chan: paramiko.Channel, m: Message) -> None:
        start = m.packet.tell()
        kind = m.get_text()
        want_reply = m.get_boolean()
        ex = _exchange(chan)
        if ex is not None and kind == "exit-signal":
            ex.exit_signal = m.get_text()
        m.packet.seek(start)
        if want_reply:
            _outside_key_exchange(transport, lambda: on_request(chan, m))
            return
        on_request(chan, m)
        if ex is None:
            return
        if kind == "exit-status":
            ex.exit_status = chan.exit_status
        if chan.eof_received:  # else the EOF still to come wakes the command
            ex.wakeup.set()

    def handle_failure(chan: paramiko.Channel, m: Message) -> None:
        ex = _exchange(chan)
        if ex is not None:
            ex.refused = True
        _outside_key_exchange(transport, lambda: on_failure(chan, m))

    transport_table = dict(transport._handler_table)
    on_open_failure = transport_table[MSG_CHANNEL_OPEN_FAILURE]

    def handle_open_failure(*args: Any) -> None:  # (m), or (transport, m) on older paramiko
        m = args[-1]
        start = m.packet.tell()
        chanid = m.get_int()
        m.packet.seek(start)
        on_open_failure(*args)
        # paramiko forgets a refused channel everywhere but here.
        transport.channels_seen.pop(chanid, None)

    transport_table[MSG_CHANNEL_OPEN_FAILURE] = handle_open_failure
    transport._handler_table = transport_table
    table[MSG_CHANNEL_DATA] = handle_data
    table[MSG_CHANNEL_EXTENDED_DATA] = handle_extended_data
    table[MSG_CHANNEL_CLOSE] = handle_close
    table[MSG_CHANNEL_REQUEST] = handle_request
    table[MSG_CHANNEL_FAILURE] = handle_failure
    transport._channel_handler_table = table


@dataclass(frozen=True)
class ChannelOutcome:
    """What came back from one command: its decoded output and how it ended."""

    stdout: str
    stderr: str
    exit_status: Optional[int]  # None: timed out, or ended by a signal
    exit_signal: Optional[str]
    timed_out: bool


def _send_unless_closed(
    chan: paramiko.Channel, message: Message, *, window: int = 0, eof: bool = False
) -> bool:
    """Send ``message`` on ``chan`` unless it is closed; False when it was.

    The check and the send happen under the channel lock, so that nothing we
    send can follow paramiko's own CLOSE for this channel: sshd drops the
    whole connection on a packet for a channel it has already freed. The lock
    is never held while waiting out a key exchange (the transport thread may
    need it to finish one): the message goes out only while sending is clear,
    else the lock is released and the exchange awaited. ``window`` is taken
    from the send window, and ``eof`` marks EOF sent, only with the send.
    """
    transport = chan.transport
    while True:
        with chan.lock:
            if chan.closed:
                return False
            with transport.clear_to_send_lock:
                if transport.clear_to_send.is_set():
                    transport._send_message(message)
                    chan.out_window_size -= window
                    if eof:
                        chan.eof_sent = True
                    return True
        _await_key_exchange(transport)


def _await_key_exchange(transport: paramiko.Transport) -> None:
    """Wait until a key exchange in progress ends, or the transport with it."""
    deadline = time.monotonic() + transport.clear_to_send_timeout
    while not transport.clear_to_send.wait(1.0):
        if not transport.is_active():
            raise EOFError("the connection ended during a key exchange")
        if time.monotonic() > deadline:
            raise paramiko.SSHException("key exchange timed out")


def _send_request(chan: paramiko.Channel, kind: str, *fields: object, want_reply: bool) -> bool:
    m = Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string(kind)
    m.add_boolean(want_reply)
    for field in fields:
        if isinstance(field, bool):
            m.add_boolean(field)
        else:
            m.add_string(field)
    return _send_unless_closed(chan, m)


def _send_stdin(chan: paramiko.Channel, data: memoryview) -> int:
    """Send as much of ``data`` as the window allows now; -1 once the channel is closed.

    One packet per lock hold, so the transport thread can open the window meanwhile.
    """
    sent = 0
    while sent < len(data):
        with chan.lock:
            size = min(len(data) - sent, chan.out_window_size, chan.out_max_packet_size - 64)
        if size <= 0:
            break
        m = Message()
        m.add_byte(cMSG_CHANNEL_DATA)
        m.add_int(chan.remote_chanid)
        m.add_string(data[sent : sent + size].tobytes())
        if not _send_unless_closed(chan, m, window=size):
            return -1
        sent += size
    return sent


def _send_eof(chan: paramiko.Channel) -> None:
    if chan.eof_sent:
        return
    m = Message()
    m.add_byte(cMSG_CHANNEL_EOF)
    m.add_int(chan.remote_chanid)
    _send_unless_closed(chan, m, eof=True)


def attach(chan: paramiko.Channel) -> _Exchange:
    """Route every event of ``chan`` to one wake-up the command's thread waits on."""
    ex = _Exchange(chan.transport)
    chan._pe_exchange = ex
    chan.in_buffer.set_event(ex.wakeup)
    chan.in_stderr_buffer.set_event(ex.wakeup)
    chan.out_buffer_cv = _WakingCondition(chan, ex)
    return ex


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else deadline - time.monotonic()


def is_lost(exc: BaseException, transport: paramiko.Transport) -> bool:
    """Whether ``exc``, raised by paramiko while using ``transport``, means the connection broke.

    paramiko raises EOFError or OSError (ProxyCommandFailure for a dead proxy
    command) from a send on a broken connection, sometimes before the
    transport has marked itself inactive; anything else counts as lost only
    once it has.
    """
    return (isinstance(exc, (EOFError, OSError, paramiko.ProxyCommandFailure))
            or not transport.is_active())


class PendingOpen:
    """A session channel asked for, and the server's answer once it comes.

    paramiko's ``open_session`` waits for the answer itself and, when its
    time runs out, leaves the channel behind: confirmed later, it would hold
    one of the server's sessions for good. Asking without waiting lets the
    caller give up and still close the channel once it is answered.
    """

    def __init__(self, transport: paramiko.Transport) -> None:
        self._transport = transport
        self.channel, self._answered = _request_session(transport)

    def wait(self, timeout: float) -> bool:
        """True once the server answered, or the connection ended, within ``timeout``."""
        end = time.monotonic() + timeout
        # Sliced: a connection that ended just as the channel was asked for
        # may never wake the event.
        while not self._answered.wait(min(ANSWER_POLL, max(0.0, end - time.monotonic()))):
            if not self._transport.is_active():
                return True
            if time.monotonic() >= end:
                return False
        return True

    def result(self) -> Optional[paramiko.Channel]:
        """After `wait`: the open channel, or None when the server refused it."""
        chan = self.channel
        if chan.active and not chan.closed:
            return chan
        if not self._transport.is_active():
            raise ConnectionLost("the connection was lost opening a channel")
        return None

    def abandon(self) -> None:
        """Close the channel once the server answers, so that no server session is orphaned."""

        def reap() -> None:
            if self.wait(self._transport.channel_timeout) and self.channel.active:
                try:
                    self.channel.close()
                except (EOFError, OSError, paramiko.SSHException):
                    pass  # the connection ended, and the session with it

        threading.Thread(target=reap, name="paramiko_executor reap", daemon=True).start()


def _request_session(transport: paramiko.Transport) -> Tuple[paramiko.Channel, threading.Event]:
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
        transport.channel_events[chanid] = answered = _NetworkEvent(transport)
        transport.channels_seen[chanid] = True
        chan._set_transport(transport)
        chan._set_window(window, max_packet)
        # paramiko sets the open event on the server's answer, but not when
        # the transport is closed from our side; the channel's close wakes it then.
        chan.in_buffer.set_event(answered)
    transport._send_user_message(m)
    return chan, answered


def open_command_channel(
    transport: paramiko.Transport, deadline: Optional[float] = None
) -> Optional[paramiko.Channel]:
    """Open a session channel, asking again while a live server refuses it.

    Returns None once ``deadline`` (a `time.monotonic` value) has passed;
    raises `ConnectionLost` when the connection breaks.

    OpenSSH frees a session slot a little after the channel's close (at the
    end of the loop iteration that read the CLOSE, so an OPEN read together
    with it is refused), so a refusal at its MaxSessions is not a broken
    connection. The refusal itself is a round trip, after which the next OPEN
    arrives in a later read: ask again at once, `QUICK_TRIES` times, then wait
    for a round trip of our own and back off, `OPEN_TRIES` times at most.
    """
    for tries in range(1, OPEN_TRIES + 1):
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            return None
        try:
            pending = PendingOpen(transport)
        except (EOFError, OSError, paramiko.SSHException) as exc:
            raise ConnectionLost(f"the connection was lost opening a channel: {exc!r}") from None
        if not pending.wait(transport.channel_timeout if remaining is None else remaining):
            pending.abandon()
            return None
        chan = pending.result()
        if chan is not None:
            return chan
        log.debug("channel refused, try %d of %d", tries, OPEN_TRIES)
        if tries <= QUICK_TRIES:
            continue
        remaining = _remaining(deadline)
        pinger_of(transport).round_trip(CLOSE_GRACE if remaining is None else max(remaining, 0))
        time.sleep(min(OPEN_BACKOFF * 2 ** (tries - QUICK_TRIES - 1), OPEN_BACKOFF_MAX))
    raise ExecutorFailure(f"the server refused a session channel {OPEN_TRIES} times")


def _settle(chan: paramiko.Channel, ex: _Exchange, transport: paramiko.Transport) -> None:
    """Close our side and wait, bounded, until the server has closed its side too."""
    chan.close()
    deadline = time.monotonic() + CLOSE_GRACE
    while not ex.remote_closed and transport.is_active():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.warning("channel %s: no CLOSE from the server after %.0f s",
                        chan.get_id(), CLOSE_GRACE)
            return
        ex.wakeup.reset()
        if ex.remote_closed or not transport.is_active():
            return
        ex.wakeup.wait(min(remaining, 1.0))


def run_on_channel(
    chan: paramiko.Channel,
    command: bytes,
    stdin: bytes,
    deadline: Optional[float],
    after_exec: Optional[Callable[[], None]] = None,
) -> ChannelOutcome:
    """Run ``command`` on the freshly opened session ``chan`` and close it.

    Returns once the exit status and the end of both output streams have
    arrived and the channel is closed on both sides (or once ``deadline``,
    a `time.monotonic` value, passed: the server is asked to TERM the command
    and the channel is closed). ``after_exec`` is called once the command is
    on its way. Raises `ConnectionLost` when the connection breaks first, and
    `ExecutorFailure` when the server refuses to run the command.
    """
    transport = chan.get_transport()
    ex = attach(chan)
    pending = memoryview(stdin)
    eof_sent = False
    try:
        # exec, stdin and EOF are pipelined without waiting for the exec reply:
        # the server handles them in order, and a refused exec closes the channel.
        _send_request(chan, "exec", command, want_reply=True)
        if after_exec is not None:
            after_exec()
        while True:
            ex.wakeup.reset()
            if not eof_sent:
                sent = _send_stdin(chan, pending) if pending else 0
                if sent < 0:
                    eof_sent = True
                else:
                    pending = pending[sent:]
                    if not pending:
                        _send_eof(chan)
                        eof_sent = True
                ex.unsent = len(pending)
                ex.sending = not eof_sent
            if chan.closed or (ex.exit_status is not None and chan.eof_received):
                break
            if deadline is None:
                ex.wakeup.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining > 0:
                ex.wakeup.wait(remaining)
                continue
            _send_request(chan, "signal", "TERM", want_reply=False)
            _settle(chan, ex, transport)
            return ChannelOutcome(ex.stdout.text_so_far(), ex.stderr.text_so_far(), None, None,
                                  True)
        if ex.exit_status is None and ex.exit_signal is None:
            if ex.refused and transport.is_active():
                _settle(chan, ex, transport)  # the slot is free only once both sides closed
                raise ExecutorFailure(f"the server refused to run {command!r}")
            if not (ex.remote_closed and chan.eof_received and transport.is_active()):
                raise ConnectionLost("the connection was lost before the command finished")
        elif not (chan.eof_received or ex.remote_closed):
            raise ConnectionLost("the connection was lost before the output was complete")
        _settle(chan, ex, transport)
        # EOF is in, so nothing more arrives.
        return ChannelOutcome(ex.stdout.text(), ex.stderr.text(), ex.exit_status, ex.exit_signal,
                              False)
    finally:
        if not chan.closed:
            chan.close()
