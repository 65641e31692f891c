"""One command on one session channel: exec, stdin, stdout/stderr, exit status, timeout.

The calling thread does all the I/O of its command itself (no helper thread per
command): paramiko's transport thread wakes it through a single event whenever
output arrives, the send window opens, an exit status or signal is reported, or
the channel closes. stdin is fed only as far as the send window allows, and
output is drained on every wake-up, so no size or interleaving of the three
streams can deadlock.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import paramiko
from paramiko.common import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_OPEN_FAILURE,
    MSG_CHANNEL_REQUEST,
    cMSG_CHANNEL_DATA,
    cMSG_CHANNEL_EOF,
    cMSG_CHANNEL_REQUEST,
)
from paramiko.message import Message

from .keepalive import pinger_of
from .results import ExecutorFailure

__all__ = [
    "ChannelOutcome",
    "ConnectionLost",
    "install_channel_hooks",
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
OPEN_BACKOFF = 0.005
OPEN_BACKOFF_MAX = 0.5

_RECV_ALL = 1 << 30


class ConnectionLost(ExecutorFailure):
    """The connection broke under a command; the executor may retry it elsewhere."""


class _Wakeup(threading.Event):
    """An event that only its owner clears.

    paramiko's buffers clear the event they signal once they are read empty;
    with two buffers sharing one event that would lose the other's wake-up.
    """

    def clear(self) -> None:
        pass

    def reset(self) -> None:
        threading.Event.clear(self)


class _WakingCondition(threading.Condition):
    """The channel's send-window condition, also waking the command's thread."""

    def __init__(self, lock: threading.Lock, wakeup: _Wakeup) -> None:
        super().__init__(lock)
        self._wakeup = wakeup

    def notify_all(self) -> None:
        super().notify_all()
        self._wakeup.set()


class _Exchange:
    """What the transport thread reports about one command's channel."""

    __slots__ = ("wakeup", "exit_status", "exit_signal", "remote_closed", "refused")

    def __init__(self) -> None:
        self.wakeup = _Wakeup()
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


def install_channel_hooks(transport: paramiko.Transport) -> None:
    """Let ``transport`` report exit status, exit signal, refusals and closes to commands.

    The hooks wrap paramiko's own handlers and run after them, in the transport
    thread. The close hook runs after paramiko has sent its own CLOSE in reply,
    so a command that sees ``remote_closed`` knows the channel is closed on both
    sides and the server can reuse its session slot.
    """
    # A logger of our own below paramiko's, so that the filter touches only our transports.
    transport.set_log_channel(transport.get_log_channel() + ".paramiko_executor")
    transport.logger.addFilter(_REFUSALS_EXPECTED)
    table = dict(transport._channel_handler_table)
    on_close = table[MSG_CHANNEL_CLOSE]
    on_request = table[MSG_CHANNEL_REQUEST]
    on_failure = table[MSG_CHANNEL_FAILURE]

    def handle_close(chan: paramiko.Channel, m: Message) -> None:
        on_close(chan, m)
        # Both CLOSEs are out, so nothing more can arrive for this channel:
        # forgetting it keeps paramiko's memory flat over millions of commands.
        transport.channels_seen.pop(chan.chanid, None)
        ex = _exchange(chan)
        if ex is not None:
            ex.remote_closed = True
            ex.wakeup.set()

    def handle_request(chan: paramiko.Channel, m: Message) -> None:
        ex = _exchange(chan)
        if ex is None:
            on_request(chan, m)
            return
        start = m.packet.tell()
        kind = m.get_text()
        if kind == "exit-signal":
            m.get_boolean()
            ex.exit_signal = m.get_text()
        m.packet.seek(start)
        on_request(chan, m)
        if kind == "exit-status":
            ex.exit_status = chan.exit_status
        ex.wakeup.set()

    def handle_failure(chan: paramiko.Channel, m: Message) -> None:
        ex = _exchange(chan)
        if ex is not None:
            ex.refused = True
        on_failure(chan, m)

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
    table[MSG_CHANNEL_CLOSE] = handle_close
    table[MSG_CHANNEL_REQUEST] = handle_request
    table[MSG_CHANNEL_FAILURE] = handle_failure
    transport._channel_handler_table = table


@dataclass(frozen=True)
class ChannelOutcome:
    """What came back from one command: raw output and how it ended."""

    stdout: bytes
    stderr: bytes
    exit_status: Optional[int]  # None: timed out, or ended by a signal
    exit_signal: Optional[str]
    timed_out: bool


def _send_locked(chan: paramiko.Channel, message: Message) -> bool:
    """Send ``message`` unless the channel is closed; False when it was.

    Held under the channel lock so that nothing we send can follow paramiko's
    own CLOSE for this channel: sshd drops the whole connection on a packet
    for a channel it has already freed.
    """
    with chan.lock:
        if chan.closed:
            return False
        chan.transport._send_user_message(message)
        return True


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
    return _send_locked(chan, m)


def _send_stdin(chan: paramiko.Channel, data: memoryview) -> int:
    """Send as much of ``data`` as the window allows now; -1 once the channel is closed."""
    sent = 0
    with chan.lock:
        while sent < len(data):
            if chan.closed:
                return -1
            size = min(len(data) - sent, chan.out_window_size, chan.out_max_packet_size - 64)
            if size <= 0:
                break
            chan.out_window_size -= size
            m = Message()
            m.add_byte(cMSG_CHANNEL_DATA)
            m.add_int(chan.remote_chanid)
            m.add_string(data[sent : sent + size].tobytes())
            chan.transport._send_user_message(m)
            sent += size
    return sent


def _send_eof(chan: paramiko.Channel) -> None:
    with chan.lock:
        if chan.closed or chan.eof_sent:
            return
        chan.eof_sent = True
        m = Message()
        m.add_byte(cMSG_CHANNEL_EOF)
        m.add_int(chan.remote_chanid)
        chan.transport._send_user_message(m)


def _drain(chan: paramiko.Channel, stdout: List[bytes], stderr: List[bytes]) -> None:
    if chan.recv_ready():
        stdout.append(chan.recv(_RECV_ALL))
    if chan.recv_stderr_ready():
        stderr.append(chan.recv_stderr(_RECV_ALL))


def attach(chan: paramiko.Channel) -> _Exchange:
    """Route every event of ``chan`` to one wake-up the command's thread waits on."""
    ex = _Exchange()
    chan._pe_exchange = ex
    chan.in_buffer.set_event(ex.wakeup)
    chan.in_stderr_buffer.set_event(ex.wakeup)
    chan.out_buffer_cv = _WakingCondition(chan.lock, ex.wakeup)
    return ex


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else deadline - time.monotonic()


def open_command_channel(
    transport: paramiko.Transport, deadline: Optional[float] = None
) -> Optional[paramiko.Channel]:
    """Open a session channel, asking again while a live server refuses it.

    Returns None once ``deadline`` (a `time.monotonic` value) has passed.

    OpenSSH frees a session slot a little after the channel's close, so a
    refusal at its MaxSessions is not a broken connection: wait for a round
    trip (after which the server has processed every earlier CLOSE), back off
    when that was not enough, and try again, `OPEN_TRIES` times at most.
    paramiko keeps one open error per transport, which another thread may
    pick up, so the transport's state, not the exception, tells a refusal
    from a lost connection.
    """
    for tries in range(1, OPEN_TRIES + 1):
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            return None
        try:
            return transport.open_session(timeout=remaining)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if isinstance(exc, (EOFError, OSError)) or not transport.is_active():
                raise ConnectionLost(f"the connection was lost opening a channel: {exc!r}") \
                    from None
            error = exc
        log.debug("channel refused (%s), try %d of %d", error, tries, OPEN_TRIES)
        remaining = _remaining(deadline)
        pinger_of(transport).round_trip(CLOSE_GRACE if remaining is None else max(remaining, 0))
        if tries > 2:
            time.sleep(min(OPEN_BACKOFF * 2 ** (tries - 3), OPEN_BACKOFF_MAX))
    raise ExecutorFailure(f"the server refused a session channel {OPEN_TRIES} times: {error}")


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
    stdout: List[bytes] = []
    stderr: List[bytes] = []
    pending = memoryview(stdin)
    # exec, stdin and EOF are pipelined without waiting for the exec reply:
    # the server handles them in order, and a refused exec closes the channel.
    _send_request(chan, "exec", command, want_reply=True)
    if after_exec is not None:
        after_exec()
    eof_sent = False
    try:
        while True:
            ex.wakeup.reset()
            _drain(chan, stdout, stderr)
            if not eof_sent:
                sent = _send_stdin(chan, pending) if pending else 0
                if sent < 0:
                    eof_sent = True
                else:
                    pending = pending[sent:]
                    if not pending:
                        _send_eof(chan)
                        eof_sent = True
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
            _drain(chan, stdout, stderr)
            return ChannelOutcome(b"".join(stdout), b"".join(stderr), None, None, True)
        _drain(chan, stdout, stderr)
        if ex.exit_status is None and ex.exit_signal is None:
            if ex.refused and transport.is_active():
                raise ExecutorFailure(f"the server refused to run {command!r}")
            if not (ex.remote_closed and chan.eof_received and transport.is_active()):
                raise ConnectionLost("the connection was lost before the command finished")
        elif not (chan.eof_received or ex.remote_closed):
            raise ConnectionLost("the connection was lost before the output was complete")
        _settle(chan, ex, transport)
        return ChannelOutcome(
            b"".join(stdout), b"".join(stderr), ex.exit_status, ex.exit_signal, False
        )
    finally:
        if not chan.closed:
            chan.close()
