"""A command's ``timeout`` against a key exchange the server stalls (the project's test server).

paramiko holds every send while a key exchange runs, up to its
``clear_to_send_timeout`` (30 s). A command's own sends (the channel's OPEN,
the exec, stdin, EOF, window adjusts, the CLOSE) wait for the exchange only
until the command's deadline: past it, `CommandTimeout` (never run when the
exec had not gone out, "may have run" after it), its slot given back, and the
connection kept for the exchange to finish. Without a timeout a command
waits for the exchange as before.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Dict, List

import pytest
from helpers import at_line, connected_transport, thread_stacks, wait_for
from paramiko.common import MSG_CHANNEL_CLOSE, MSG_CHANNEL_EOF
from test_attack9b import _stall_a_key_exchange, _times_out_in_a_stall
from test_attack10f import _line

import paramiko_executor.channel as channel_module
from paramiko_executor import CommandTimeout, SSHExecutor
from paramiko_executor.channel import SessionChannel
from paramiko_executor.internals import key_exchange_running, wrap_handlers

#: Where a thread waits for a key exchange to let its send out (this code, and paramiko's).
_HELD_SEND = {"send_within", "_send_user_message", "await_key_exchange"}


def _waits_in_a_send(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name in _HELD_SEND:
            return True
        frame = frame.f_back
    return False


def _assert_connection_kept(server: Any, executor: SSHExecutor) -> None:
    """The slot came back and the one connection carries on once the exchange finished."""
    # One slot (max_sessions=1): a slot the timed-out command kept would time this out.
    assert executor.run_command("echo after", timeout=30).stdout == "after\n"
    assert server.connections_accepted == 1
    assert server.logins == 1


@pytest.mark.hang_timeout(120)
def test_an_open_held_by_a_stalled_key_exchange_times_out_and_gives_its_slot_back(
        make_test_server):
    """The OPEN's send waited paramiko's 30 s, then raised ``ExecutorFailure``.

    One slot, so no channel is opened ahead: the command's own OPEN meets the
    stalled exchange. The command never ran, and the slot it took is free at once.
    """
    server = make_test_server(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as executor:
        executor.run_command("true", timeout=20)
        _times_out_in_a_stall(server, executor, "echo never")
        _assert_connection_kept(server, executor)
        assert "echo never" not in server.commands


@pytest.mark.hang_timeout(120)
def test_a_command_without_timeout_completes_once_the_stalled_exchange_finishes(
        make_test_server):
    """Without a timeout a held send waits for the exchange (paramiko's bound), as before.

    A guard for the deadline's path: the OPEN held by the stalled exchange goes
    out once the server carries on, and the command completes normally.
    """
    server = make_test_server(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as executor:
        executor.run_command("true", timeout=20)
        ended: Dict[str, Any] = {}

        def run() -> None:
            try:
                ended["result"] = executor.run_command("echo held")
            except BaseException as exc:  # noqa: B036 (recorded, judged below)
                ended["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        try:
            _stall_a_key_exchange(server, executor)
            thread.start()
            wait_for(lambda: _waits_in_a_send(thread), "the command's send to be held")
        finally:
            server.thaw()
        thread.join(60)
        assert not thread.is_alive()
        assert "error" not in ended, repr(ended.get("error"))
        assert ended["result"].stdout == "held\n"
        _assert_connection_kept(server, executor)


@pytest.mark.hang_timeout(120)
def test_a_send_after_the_exec_held_by_a_stalled_exchange_times_out_the_command(
        make_test_server, monkeypatch):
    """The EOF after the exec waited paramiko's 30 s, then raised ``ExecutorFailure``.

    The exchange starts right after the exec went out (stdin and EOF still to
    send): the command may have run, so it is a `CommandTimeout` like any
    other, its TERM sent from the background once the exchange finishes; the
    slot comes back on the server's CLOSE.
    """
    server = make_test_server(max_sessions=1)
    stalled = threading.Event()
    original = channel_module.send_if_clear

    def send_if_clear(transport: Any, message: Any, **options: Any) -> bool:
        sent = original(transport, message, **options)
        if sent and not stalled.is_set() and b"exec" in message.asbytes():
            stalled.set()
            server.freeze()
            transport._send_kex_init()
        return sent

    with SSHExecutor(**server.executor_parameters()) as executor:
        executor.run_command("true", timeout=20)
        monkeypatch.setattr(channel_module, "send_if_clear", send_if_clear)
        try:
            begun = time.monotonic()
            with pytest.raises(Exception) as raised:
                executor.run_command("cat", "stdin", timeout=2)
            took = time.monotonic() - begun
        finally:
            server.thaw()
        monkeypatch.undo()
        assert stalled.is_set()
        assert isinstance(raised.value, CommandTimeout), repr(raised.value)
        assert raised.value.exit_code is None
        assert took < 15, took
        _assert_connection_kept(server, executor)


def _rekey_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "paramiko_executor rekey"]


@pytest.mark.hang_timeout(120)
def test_a_close_held_by_an_exchange_the_connection_dies_in_leaves_no_thread(
        make_test_server):
    """A CLOSE held back by a key exchange started a thread that started the next, forever.

    The background CLOSE checked the exchange again and, still running, handed
    itself to a new thread: a thread a moment for as long as the exchange ran,
    and for the life of the process once the connection ended mid-exchange
    (paramiko never marks a dead connection clear to send). It now waits in
    its one thread, which ends with the connection.
    """
    server = make_test_server(max_sessions=1)
    executor = SSHExecutor(**server.executor_parameters())
    try:
        transport = connected_transport(executor)

        def on_eof(original: Any) -> Any:
            def handle(*args: Any) -> None:
                if not server.frozen:
                    server.freeze()
                    transport._send_kex_init()  # in the transport thread, as a rekey starts
                return original(*args)
            return handle

        wrap_handlers(transport, {MSG_CHANNEL_EOF: on_eof}, {})
        before = set(_rekey_threads())
        assert executor.run_command("echo done").stdout == "done\n"
        assert key_exchange_running(transport)
        assert set(_rekey_threads()) - before, "the CLOSE waits in a thread of its own"
        executor.close()  # the connection ends mid-exchange
        wait_for(lambda: not set(_rekey_threads()) - before, "the CLOSE's thread to end",
                 timeout=10, explain=lambda: thread_stacks(set(_rekey_threads()) - before))
    finally:
        executor.close()
        server.thaw()


@pytest.mark.hang_timeout(120)
def test_a_complete_command_whose_eof_an_exchange_given_up_held_is_not_run_again(
        make_test_server: Any) -> None:
    """A command whose exit status and EOF were in while its thread still had its EOF
    to send, held by a key exchange the server then stalled for good: the exchange
    given up (the connection closed), the send's error made the command "lost" and
    it ran again on a new connection. It is complete: its outcome stands.
    """
    server = make_test_server(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as executor:
        transport = connected_transport(executor, clear_to_send_timeout=2.0)
        stalled: List[bool] = []

        def stall_at_eof(on_eof: Any) -> Any:
            def handle(*args: Any) -> None:
                if not stalled:
                    stalled.append(True)
                    server.freeze()
                    transport._send_kex_init()  # type: ignore[attr-defined]  # as a rekey starts
                return on_eof(*args)
            return handle

        def close_late(on_close: Any) -> Any:
            def handle(*args: Any) -> None:
                # The server's CLOSE, as if it came after the exchange was given up.
                wait_for(lambda: not transport.is_active(), "the exchange given up")
                return on_close(*args)
            return handle

        wrap_handlers(transport, {MSG_CHANNEL_EOF: stall_at_eof,
                                  MSG_CHANNEL_CLOSE: close_late}, {})
        # The command's thread reaches its EOF only once the server's EOF is in.
        command = at_line(SessionChannel._converse_until_decided.__code__,
                          _line(SessionChannel._converse_until_decided, "self._send_eof(deadline)"),
                          lambda: wait_for(lambda: bool(stalled), "the server's EOF"),
                          lambda: executor.run_command("echo done", "input"))
        try:
            result = command()
        finally:
            server.thaw()
        assert result.stdout == "done\n"
        assert not transport.is_active()  # the exchange was given up
        assert executor.statistics().commands_retried == 0
