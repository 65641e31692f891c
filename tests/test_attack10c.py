"""attack10c: a key exchange the server stalls, against a command's and a transfer's deadline.

One regression test per defect found, against the project's test server (its
``freeze`` stalls a key exchange the client starts) and a real OpenSSH sshd
(its serving process stopped with SIGSTOP mid-exchange).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Dict, List

import pytest
from helpers import connected_transport
from paramiko.common import MSG_CHANNEL_CLOSE, MSG_CHANNEL_EOF
from test_attack9b import _stall_a_key_exchange

from paramiko_executor import SSHExecutor, TransferTimeout
from paramiko_executor.internals import key_exchange_running, wrap_handlers
from paramiko_executor.transfer import CLEANUP_GRACE


@pytest.mark.hang_timeout(120)
def test_a_key_exchange_that_never_finishes_ends_the_connection_and_the_command_is_retried(
        make_test_server):
    """A stalled key exchange kept the connection forever; every command failed after 30 s.

    paramiko gives a held send ``clear_to_send_timeout`` (30 s) and then raises,
    but never ends the connection: a command without a timeout failed with
    ``ExecutorFailure("... key exchange timed out")``, was not retried, and the
    next one waited 30 s again on the same dead exchange, for as long as the
    process lived (without keepalive). Past that bound the exchange is given
    up: the connection is lost, and the command (whose OPEN never went out)
    is retried on a new one.
    """
    server = make_test_server(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as executor:
        transport = connected_transport(executor, clear_to_send_timeout=2.0)
        ended: Dict[str, Any] = {}

        def run() -> None:
            try:
                ended["result"] = executor.run_command("echo again")
            except BaseException as exc:  # noqa: B036 (recorded, judged below)
                ended["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        try:
            _stall_a_key_exchange(server, executor)
            thread.start()
            # Bounded: the exchange is given up 2 s in; on the old code the
            # command failed instead, the connection still up.
            end = time.monotonic() + 15
            while transport.is_active() and thread.is_alive() and time.monotonic() < end:
                time.sleep(0.05)
        finally:
            server.thaw()
        thread.join(60)
        assert not thread.is_alive()
        assert "error" not in ended, repr(ended.get("error"))
        assert ended["result"].stdout == "again\n"
        assert not transport.is_active()
        assert server.connections_accepted == 2


def _stall_sshd_key_exchange(server: Any, transport: Any) -> List[int]:
    """Stop the sshd serving the connection and start a key exchange it never answers."""
    pids = server.serving_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    transport._send_kex_init()
    return pids


@pytest.mark.hang_timeout(240)
@pytest.mark.parametrize("direction", ["put", "get"])
def test_a_transfer_during_a_stalled_key_exchange_times_out_at_its_deadline(
        make_sshd, shared_dir, direction):
    server = make_sshd(max_sessions=4)
    source = os.path.join(shared_dir, "source")
    with open(source, "wb") as f:
        f.write(os.urandom(200_000))
    os.chmod(source, 0o644)
    remote = os.path.join(shared_dir, "remote")
    with SSHExecutor(**server.executor_parameters()) as executor:
        executor.put(source, remote, timeout=30)
        # After a command's exec a spare channel is opened: the transfer takes it,
        # open before the exchange began, and sends on it.
        executor.run_command("true", timeout=30)
        with executor.bounded_connection as transport:
            pass
        transport.clear_to_send_timeout = 10.0  # paramiko's 30 s, shortened for the test
        pids = _stall_sshd_key_exchange(server, transport)
        try:
            begun = time.monotonic()
            with pytest.raises(Exception) as raised:
                if direction == "put":
                    executor.put(source, remote, timeout=2)
                else:
                    executor.get(remote, os.path.join(shared_dir, "back"), timeout=2)
            took = time.monotonic() - begun
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert isinstance(raised.value, TransferTimeout), repr(raised.value)
        assert took < 8, took
        assert executor.run_command("echo after", timeout=30).stdout == "after\n"


@pytest.mark.hang_timeout(240)
@pytest.mark.parametrize("direction,mib", [("put", 48), ("get", 48), ("get", 12)])
def test_a_transfer_whose_data_a_stalled_key_exchange_holds_times_out_at_its_deadline(
        make_sshd, shared_dir, direction, mib):
    """Mid-transfer, a stalled exchange held each data packet (a put's), READ
    request or window adjust (a get's) for ``clear_to_send_timeout``, past the deadline.

    The exchange starts from the first progress call, with the subsystem
    started and the server's window open. A get of 12 MiB asked for all of it
    at the start (`IN_FLIGHT`), so what it sends next is a window adjust. A
    put's clean-up of its temporary file has `CLEANUP_GRACE` more.
    """
    server = make_sshd(max_sessions=4)
    source = os.path.join(shared_dir, "source")
    with open(source, "wb") as f:
        f.write(os.urandom(mib << 20))
    os.chmod(source, 0o644)
    remote = os.path.join(shared_dir, "remote")
    with SSHExecutor(**server.executor_parameters()) as executor:
        executor.put(source, remote, timeout=60)
        with executor.bounded_connection as transport:
            pass
        transport.clear_to_send_timeout = 20.0  # paramiko's 30 s, shortened for the test
        pids: List[int] = []

        def stall(done: int, total: int) -> None:
            if not pids and 0 < done < total:
                pids.extend(_stall_sshd_key_exchange(server, transport))

        timeout = 2.0
        try:
            begun = time.monotonic()
            with pytest.raises(Exception) as raised:
                if direction == "put":
                    executor.put(source, remote, timeout=timeout, progress=stall)
                else:
                    executor.get(remote, os.path.join(shared_dir, "back"), timeout=timeout,
                                 progress=stall)
            took = time.monotonic() - begun
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert pids, "the transfer ended before its first progress call"
        assert isinstance(raised.value, TransferTimeout), repr(raised.value)
        assert took < timeout + (CLEANUP_GRACE if direction == "put" else 0) + 3, took
        assert executor.run_command("echo after", timeout=30).stdout == "after\n"


@pytest.mark.hang_timeout(120)
def test_a_complete_command_without_timeout_returns_while_a_stalled_exchange_holds_its_close(
        make_test_server):
    """A command's result waited for its CLOSE to get past a stalled key exchange (up to 30 s).

    The outcome is fixed once the exit status and EOF are in; our CLOSE after
    it is clean-up. With a timeout it went out from the background, without
    one the caller waited for the exchange, up to paramiko's 30 s, to learn a
    result it already had. Here the server stalls an exchange as the EOF
    arrives, and its own CLOSE comes only after the exchange.
    """
    server = make_test_server(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as executor:
        executor.run_command("true", timeout=20)
        with executor.bounded_connection as transport:
            pass
        thawed = threading.Event()

        def on_eof(original: Any) -> Any:
            def handle(*args: Any) -> None:
                if not thawed.is_set() and not server.frozen:
                    server.freeze()
                    transport._send_kex_init()  # in the transport thread, as a rekey starts
                return original(*args)
            return handle

        def after_thaw(original: Any) -> Any:
            def handle(*args: Any) -> None:
                thawed.wait(60)  # the server's CLOSE, as if sent after the exchange
                return original(*args)
            return handle

        wrap_handlers(transport, {MSG_CHANNEL_EOF: on_eof, MSG_CHANNEL_CLOSE: after_thaw}, {})
        ended: Dict[str, Any] = {}

        def run() -> None:
            try:
                ended["result"] = executor.run_command("echo done")
            except BaseException as exc:  # noqa: B036 (recorded, judged below)
                ended["error"] = exc
            ended["exchange running"] = key_exchange_running(transport)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            thread.join(20)  # the old code returned only after the thaw below
        finally:
            thawed.set()
            server.thaw()
        thread.join(60)
        assert not thread.is_alive()
        assert "error" not in ended, repr(ended.get("error"))
        assert ended["result"].stdout == "done\n"
        assert ended["exchange running"], "the result waited for the exchange to finish"
        assert executor.run_command("echo after", timeout=30).stdout == "after\n"
