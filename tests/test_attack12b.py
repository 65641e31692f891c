"""Attack on cc484e1 (an explicit ``max_sessions`` lowered at a quiet refusal) and d5d04a5."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any, Callable, Dict

import pytest
from helpers import call_in_thread, run_threads, wait_for

from paramiko_executor import ExecutorFailure, SSHExecutor

LOWERED = "this connection's limit is now"


def test_a_bounded_connection_session_counts_where_the_cap_comes_down(
        make_sshd: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    """A quiet refusal lowers the cap to the sessions the server holds for us, the one of
    a ``bounded_connection`` block among them. Before, that one was left out: the cap
    came down to 1 on a server allowing 2, a command queued behind the block waited until
    the block ended (a block waiting for it hung), and a command from inside the block
    failed at once, its thread "holding all 1 session(s)"."""
    server = make_sshd(max_sessions=2)
    caplog.set_level(logging.INFO, logger="paramiko_executor.connection")
    with SSHExecutor(**server.executor_parameters(), max_sessions=4) as ex:
        inside = threading.Event()
        third_done = threading.Event()
        out: Dict[str, Any] = {}

        def block() -> None:
            with ex.bounded_connection as transport:
                chan = transport.open_session()  # no other session yet: never refused
                try:
                    chan.exec_command("sleep 60")
                    inside.set()
                    # The third command needs no slot of this block's.
                    if not third_done.wait(60):
                        out["inner"] = "the third command never ran"
                        return
                    try:
                        out["inner"] = ex.run_command("echo inner", timeout=30).stdout
                    except Exception as exc:  # the failure under test, reported below
                        out["inner"] = exc
                finally:
                    chan.close()

        holder = threading.Thread(target=block)
        holder.start()
        assert inside.wait(30)
        started = threading.Event()
        long = call_in_thread(lambda: ex.run_command(
            "echo started; sleep 2", on_output=lambda name, text: started.set()))
        try:
            assert started.wait(30)
            # The server holds the block's session and the long command's: refused, quietly.
            third = call_in_thread(lambda: ex.run_command("echo third"))
            wait_for(lambda: any(LOWERED in r.getMessage() for r in caplog.records),
                     "the cap to come down")
            third["thread"].join(30)
            assert third.get("result") is not None, third
            assert third["result"].stdout == "third\n"
            third_done.set()
        finally:
            third_done.set()
            holder.join(60)
            long["thread"].join(30)
        assert out["inner"] == "inner\n"
        assert ex.statistics().max_sessions == 2
        lowered = [r.getMessage() for r in caplog.records if LOWERED in r.getMessage()]
        assert len(lowered) == 1 and "limit is now 2, not the 4" in lowered[0], lowered


def _outcome(sock: socket.socket) -> str:
    """What a client reads to the end: "eof" or "reset"."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def test_a_client_whose_forward_no_connection_could_ask_for_is_reset(
        make_sshd: Callable[..., Any]) -> None:
    """tunnels.rst: only a forward the server refuses is an end-of-file, as with ``ssh -L``;
    "a client whose forward could not even be asked for (no connection to the server)
    gets a reset". Before, only a wait cut by the open's time limit was a reset; a
    connect that failed at once (server down, retries spent) gave the client an EOF,
    which reads as an empty answer from the service."""
    server = make_sshd(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(), connect_retries=0) as ex:
        with ex.forward_local(22, "127.0.0.1") as tunnel:
            server.stop()
            with socket.create_connection(tunnel.local_address, timeout=30) as sock:
                assert _outcome(sock) == "reset"


def test_refusals_at_once_each_keep_their_own_reason(make_sshd: Callable[..., Any]) -> None:
    """paramiko keeps one refusal per transport (``saved_exception``) and hands it to the
    first thread that asks: with several forwards refused at once, the others read
    nothing ("Unable to open channel.", taken for a failure, not a refusal: their
    clients were then treated as never asked for) or a reason that was not theirs."""
    server = make_sshd(extra_config=["AllowTcpForwarding no"])
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")

        def refused(i: int) -> str:
            with pytest.raises(ExecutorFailure) as info:
                ex.open_connection("127.0.0.1", 9, timeout=30)
            return info.value.description

        results, errors = run_threads(refused, 40, timeout=60)
    assert errors == []
    wrong = [text for text in results.values()
             if "refused to forward to 127.0.0.1:9 (administratively prohibited" not in text]
    assert wrong == []


def test_a_connection_lost_under_an_open_is_no_refusal(
        make_sshd: Callable[..., Any], make_backend: Callable[..., Any]) -> None:
    """A guard for the refusal kept on its channel (it passes on main too): paramiko's
    ``saved_exception`` then still holds an earlier refusal (nothing takes it any
    more) when the connection ends under an open. Read as this open's answer, the
    loss would be reported as that refusal ("the server refused to forward ...
    connect failed") and the open not tried on a new connection."""
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    with SSHExecutor(**server.executor_parameters()) as ex:
        with pytest.raises(ExecutorFailure, match="connect failed"):
            ex.open_connection("127.0.0.1", 9, timeout=30)  # leaves a refusal behind
        state = ex.state
        assert state is not None
        transport = state.transport
        before = len(transport._channels.values())  # type: ignore[attr-defined]
        (pid,) = server.serving_pids()
        os.kill(pid, signal.SIGSTOP)
        try:
            opening = call_in_thread(lambda: ex.open_connection("127.0.0.1", backend.port,
                                                               timeout=30))
            wait_for(lambda: len(transport._channels.values()) > before,  # type: ignore[attr-defined]
                     "the open to be sent")
            transport.close()
        finally:
            os.kill(pid, signal.SIGCONT)
        opening["thread"].join(40)
        assert "error" not in opening, opening
        with opening["result"] as sock:
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"


def test_a_right_cap_stays_after_a_block_closes_a_running_command(
        make_sshd: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    """A block's slot is given back once the server closed the session the block closed,
    not as the block ends: sshd keeps a session whose command still runs, so the opens
    that followed were refused with no session ending, and lowered a right cap (2 to 1)
    for the connection's life."""
    server = make_sshd(max_sessions=2)
    caplog.set_level(logging.INFO, logger="paramiko_executor.connection")
    with SSHExecutor(**server.executor_parameters(), max_sessions=2) as ex:
        started = threading.Event()
        long = call_in_thread(lambda: ex.run_command(
            "echo started; sleep 8", on_output=lambda name, text: started.set()))
        assert started.wait(30)
        with ex.bounded_connection as transport:
            chan = transport.open_session()
            chan.exec_command("sleep 6")  # ample: the next open comes within ms
            chan.close()  # closed as the contract asks; sshd keeps it until sleep ends
        assert ex.run_command("echo after", timeout=30).stdout == "after\n"
        long["thread"].join(30)
        assert [r.getMessage() for r in caplog.records if LOWERED in r.getMessage()] == []
        assert ex.statistics().max_sessions == 2
