"""Lost, frozen and half-finished connections: real sshd and the project's test server."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from helpers import wait_for

from paramiko_executor import CommandTimeout, ExecutorFailure, SSHExecutor


def current_transport(ex):
    return ex.state.transport


def exchanges(ex):
    """The executor's session channels open on its current connection."""
    return list(ex._connection.link.sessions.values())


def test_result_waits_for_output_after_the_exit_status(sshd):
    # The shell exits first; a background child still writes and holds stdout.
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        result = ex.run_command("echo first; (sleep 1; echo late) & exit 0")
        assert result.stdout == "first\nlate\n"


def test_connection_lost_between_exit_status_and_eof_is_not_a_success(make_sshd):
    server = make_sshd(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        ex.run_command("true")
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(ex.run_command, "echo first; (sleep 20; echo late) & exit 0")
            wait_for(lambda: any(e.exit_status == 0 for e in exchanges(ex)),
                     "the exit status to arrive before the output ended")
            for pid in server.serving_pids():
                os.kill(pid, signal.SIGKILL)
            with pytest.raises(ExecutorFailure, match="lost"):
                future.result(timeout=30)


def test_keepalive_fails_over_from_a_frozen_sshd(make_sshd, shared_dir):
    server = make_sshd(max_sessions=10)
    marker = os.path.join(shared_dir, "started")
    frozen = []
    try:
        with SSHExecutor(**server.executor_parameters(keepalive_interval=0.5,
                                                      keepalive_count_max=3)) as ex:
            ex.run_command("true")
            first = current_transport(ex)
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(
                    ex.run_command,
                    f"test -e {marker} && echo second && exit 0; touch {marker}; sleep 3",
                )
                wait_for(lambda: os.path.exists(marker), "the command to start")
                frozen = server.serving_pids()
                for pid in frozen:
                    os.kill(pid, signal.SIGSTOP)
                assert future.result(timeout=30).stdout == "second\n"
            assert not first.is_active()
            assert current_transport(ex) is not first
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)


def test_keepalive_fails_over_from_a_frozen_test_server(make_test_server):
    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(keepalive_interval=0.3,
                                                  keepalive_count_max=3)) as ex:
        ex.run_command("true")
        first = current_transport(ex)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(ex.run_command, "sleep 1; echo done")
            wait_for(lambda: "sleep 1; echo done" in server.commands, "the command to start")
            server.freeze()
            try:
                wait_for(lambda: not first.is_active(), "the keepalive to give up")
            finally:
                server.thaw()
            assert future.result(timeout=30).stdout == "done\n"
        assert server.commands.count("sleep 1; echo done") == 2
        assert current_transport(ex) is not first


def test_without_keepalive_a_frozen_server_is_not_declared_dead(make_test_server):
    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        transport = current_transport(ex)
        assert ex._connection.link.keepalive is None
        server.freeze()
        try:
            with pytest.raises(CommandTimeout):
                ex.run_command("echo hi", timeout=1)
            assert transport.is_active()
        finally:
            server.thaw()


def test_drop_connections_mid_command_retries(make_test_server):
    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ex.run_command, f"sleep 0.5; echo {i}") for i in range(8)]
            # Counted by the commands the server started: a spare channel is open too.
            wait_for(lambda: sum(c.startswith("sleep 0.5") for c in server.commands) >= 8,
                     "eight commands running")
            server.drop_connections()
            assert [f.result(timeout=30).stdout for f in futures] == [f"{i}\n" for i in range(8)]
        assert server.connections_accepted == 2


def test_connect_attempt_shared_by_waiting_threads(make_test_server):
    server = make_test_server(max_sessions=10)
    ex = SSHExecutor(**server.executor_parameters())
    gate = threading.Barrier(100)

    def run(i):
        gate.wait(30)
        return ex.run_command(f"echo {i}").stdout

    with ThreadPoolExecutor(100) as pool:
        assert list(pool.map(run, range(100))) == [f"{i}\n" for i in range(100)]
    assert server.connections_accepted == 1
    ex.close()


def test_channel_refusals_are_retried_on_the_same_connection(make_test_server):
    # max_sessions above the server's limit: the surplus opens are refused
    # by a live server and must wait and retry, not reconnect.
    server = make_test_server(max_sessions=2)
    with SSHExecutor(**server.executor_parameters(max_sessions=4)) as ex:
        with ThreadPoolExecutor(16) as pool:
            outputs = list(pool.map(lambda i: ex.run_command(f"echo {i}").stdout, range(64)))
    assert outputs == [f"{i}\n" for i in range(64)]
    assert server.connections_accepted == 1
    assert server.peak_channels <= 2


def _race_free_mockssh_server() -> Any:
    """mock-ssh-server 0.9.1's `Server`, less one race of its own.

    Its accept loop checks for a channel's command queue and then creates
    one: an exec request handled in between (by paramiko's thread) puts the
    command in a queue that the loop then replaces, and the command never
    runs. Any client that sends the exec as soon as the open is confirmed
    meets it now and then under load. Only that line differs here.
    """
    from queue import Queue

    mockssh = pytest.importorskip("mockssh")

    handler_base: Any = mockssh.server.Handler
    server_base: Any = mockssh.Server

    class Handler(handler_base):
        def run(self) -> None:
            self.transport.start_server(server=self)
            for _ in range(100_000):
                channel = self.transport.accept()
                if channel is None:
                    break
                self.command_queues.setdefault(channel.chanid, Queue())
                threading.Thread(target=self.handle_client, args=(channel,), daemon=True).start()

    class Server(server_base):
        handler_cls = Handler

    return Server({})


def test_mock_ssh_server_compatibility(tmp_path):
    from paramiko_executor.testing import SSHTestServer

    key_path = str(tmp_path / "id")
    with SSHTestServer() as keys:  # borrow a generated (ECDSA) client key
        shutil.copy(keys.client_key_path, key_path)
    server = _race_free_mockssh_server()
    server.add_user("user", key_path, keytype="ecdsa-sha2-nistp256")
    with server:
        with SSHExecutor(host="127.0.0.1", port=server.port, username="user",
                         client_keys=[key_path], known_hosts=None, config=(),
                         max_sessions=4) as ex:
            assert ex.run_command("echo hello").stdout == "hello\n"
            with ThreadPoolExecutor(4) as pool:
                outputs = list(pool.map(lambda i: ex.run_command(f"echo {i}", timeout=30).stdout,
                                        range(8)))
            assert outputs == [f"{i}\n" for i in range(8)]


def test_key_exchanges_under_load_neither_stall_nor_drop(sshd):
    # paramiko re-keys after 512 MiB by default; 256 KiB makes it happen
    # hundreds of times while channels open, carry data both ways and close.
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        transport = current_transport(ex)
        transport.packetizer.REKEY_BYTES = 256 * 1024
        data = "x" * 100_000

        def run(i):
            return ex.run_command(f"head -c 50000 /dev/zero | wc -c; wc -c; echo {i}",
                                  data, timeout=60).stdout.split()

        with ThreadPoolExecutor(20) as pool:
            outputs = list(pool.map(run, range(300)))
        assert outputs == [["50000", "100000", str(i)] for i in range(300)]
        assert current_transport(ex) is transport


def test_no_retry_means_no_command_runs_twice(make_test_server):
    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        ex.run_command("true")
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(ex.run_command, f"sleep 5; echo {i}") for i in range(5)]
            wait_for(lambda: sum(c.startswith("sleep 5") for c in server.commands) >= 5,
                     "five commands running")
            server.drop_connections()
            errors = [f.exception(timeout=30) for f in futures]
    assert all(isinstance(e, ExecutorFailure) for e in errors), errors
    assert len([c for c in server.commands if c.startswith("sleep 5")]) == 5


def test_an_open_that_timed_out_leaves_no_channel_behind(make_test_server):
    server = make_test_server(max_sessions=2)
    with SSHExecutor(**server.executor_parameters(max_sessions=2)) as ex:
        with ex.bounded_connection as transport:
            pass  # connected, and no spare channel opened yet
        for _ in range(2):
            server.freeze()
            try:
                with pytest.raises(CommandTimeout):
                    ex.run_command("true", timeout=0.3)
            finally:
                server.thaw()
        # The late-confirmed channels are closed again as soon as they open.
        wait_for(lambda: server.open_channels == 0 and not transport._channels.values(),
                 "the abandoned channels to close")
        assert ex.run_command("echo hi", timeout=30).stdout == "hi\n"


def test_keepalive_fires_while_stdin_is_stuck_on_a_frozen_server(make_test_server):
    server = make_test_server(max_sessions=10)
    ex = SSHExecutor(**server.executor_parameters(keepalive_interval=0.3, keepalive_count_max=3,
                                                  on_disconnect_retry=0))
    ex.run_command("true")
    transport = current_transport(ex)
    data = b"x" * (64 << 20)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ex.run_command, "cat > /dev/null", data) for _ in range(4)]
        wait_for(lambda: server.open_channels >= 4, "four uploads running")
        server.freeze()
        try:
            wait_for(lambda: not transport.is_active(), "the keepalive to give up")
        finally:
            server.thaw()
        # An upload that had started fails (no retries); one whose channel was
        # not open yet never ran, so it is sent again on a new connection.
        outcomes = [f.exception(timeout=60) for f in futures]
    assert all(e is None or isinstance(e, ExecutorFailure) for e in outcomes), outcomes
    assert any(isinstance(e, ExecutorFailure) for e in outcomes)
    ex.close()


def test_close_releases_threads_waiting_for_a_connect_that_hangs(make_test_server):
    import paramiko

    server = make_test_server(max_sessions=10)

    class FreezesAfterLogin(paramiko.Transport):
        def is_authenticated(self):
            done = super().is_authenticated()
            if done:
                server.freeze()  # the server hangs while the executor probes it
            return done

    ex = SSHExecutor(**server.executor_parameters(transport_factory=FreezesAfterLogin))
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(ex.run_command, "true") for _ in range(3)]
            wait_for(lambda: server.frozen, "the login")
            ex.close()
            errors = [f.exception(timeout=10) for f in futures]
        assert all(isinstance(e, ExecutorFailure) and "closed" in str(e) for e in errors), errors
    finally:
        server.thaw()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_exiting_leaves_the_parents_proxy_command_alone(make_test_server, tmp_path):
    import atexit
    import sys

    server = make_test_server(max_sessions=10)
    relay = tmp_path / "relay.py"
    relay.write_text(
        "import os, socket, sys, threading\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
        "def up():\n"
        "    while True:\n"
        "        d = os.read(0, 65536)\n"
        "        if not d:\n"
        "            return s.shutdown(socket.SHUT_WR)\n"
        "        s.sendall(d)\n"
        "threading.Thread(target=up, daemon=True).start()\n"
        "while True:\n"
        "    d = s.recv(65536)\n"
        "    if not d:\n"
        "        break\n"
        "    os.write(1, d)\n"
    )
    config = tmp_path / "ssh_config"
    config.write_text(f"Host proxied\n  HostName 127.0.0.1\n  Port {server.port}\n"
                      f"  ProxyCommand {sys.executable} {relay} %h %p\n")
    params = server.executor_parameters(host="proxied", config=str(config), on_disconnect_retry=0)
    with SSHExecutor(**params) as ex:
        assert ex.run_command("echo before").stdout == "before\n"
        pid = os.fork()
        if pid == 0:  # a child that never uses the executor and exits normally
            try:
                atexit._run_exitfuncs()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert ex.run_command("echo after").stdout == "after\n"
        assert server.connections_accepted == 1
