"""Tunnels: forward_local, forward_remote and open_connection on the executor's one connection.

Against a real sshd (``AllowTcpForwarding yes``, and ``no`` for the refusals)
with a real TCP server on 127.0.0.1 behind it, and against the project's test
server where a fault must be injected (a forward refused after a reconnect).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import socket
import threading
from typing import Any, Iterator, List, Optional, Tuple

import pytest
from backends import BLOCK
from helpers import carried_pipe, flood_stopped, run_threads, wait_for

from paramiko_executor import ExecutorFailure, SSHExecutor

#: The stream that crosses the tunnel in both directions in the big round trip.
BIG_STREAM = 1024 * 1024 * 1024


def blocks(count: int) -> Iterator[bytes]:
    """``count`` blocks of 1 MiB, never two alike in a row, so a lost or repeated block shows."""
    pool = [os.urandom(BLOCK) for _ in range(7)]
    for i in range(count):
        yield pool[i % 7]


def echo_once(address: Tuple[str, int], payload: bytes, timeout: float = 30.0) -> bytes:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks: List[bytes] = []
    while True:
        data = sock.recv(BLOCK)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- bytes both ways ---------------------------------------------------------------------


@pytest.mark.hang_timeout(300)
def test_a_large_stream_round_trips_exactly_in_both_directions(sshd: Any, make_backend: Any
                                                               ) -> None:
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(backend.port, "127.0.0.1") as tunnel:
        sent, received = hashlib.sha256(), hashlib.sha256()
        count = BIG_STREAM // BLOCK
        with socket.create_connection(tunnel.local_address, timeout=120) as sock:
            got = [0]

            def read() -> None:
                while True:
                    data = sock.recv(BLOCK)
                    if not data:
                        return
                    received.update(data)
                    got[0] += len(data)

            reader = threading.Thread(target=read)
            reader.start()
            for block in blocks(count):
                sock.sendall(block)
                sent.update(block)
            sock.shutdown(socket.SHUT_WR)
            reader.join(240)
            assert not reader.is_alive()
        assert got[0] == BIG_STREAM
        assert received.hexdigest() == sent.hexdigest()


def test_the_clients_eof_reaches_the_target_while_its_reply_still_flows_back(
        sshd: Any, make_backend: Any) -> None:
    backend = make_backend("digest")
    payload = b"".join(blocks(8))
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(backend.port, "127.0.0.1") as tunnel:
        reply = echo_once(tunnel.local_address, payload)
    assert reply == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()


def test_fifty_clients_at_once_through_one_tunnel(sshd: Any, make_backend: Any) -> None:
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(backend.port, "127.0.0.1") as tunnel:
        def client(i: int) -> bool:
            payload = os.urandom(256 * 1024) + str(i).encode()
            return echo_once(tunnel.local_address, payload) == payload

        results, errors = run_threads(client, 50, timeout=120)
        assert not errors
        assert all(results[i] for i in range(50))
        assert backend.accepted == 50


# --- beside the commands ---------------------------------------------------------------


@pytest.mark.hang_timeout(300)
def test_commands_never_wait_on_tunnel_traffic(sshd: Any, make_backend: Any) -> None:
    """A client that never reads a flood, and busy echo streams, leave 100 commands untouched.

    The flood fills its channel's window; were its data pumped in paramiko's
    transport thread, or the window given back before the client read it,
    the transport would stall and so would every command on the connection.
    """
    flood, echo = make_backend("flood"), make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(flood.port, "127.0.0.1") as stalled, \
            ex.forward_local(echo.port, "127.0.0.1") as busy:
        sleeper = socket.create_connection(stalled.local_address)  # never reads
        stop = threading.Event()
        rounds = [0]

        def stream() -> None:
            payload = os.urandom(BLOCK)
            while not stop.is_set():
                assert echo_once(busy.local_address, payload) == payload
                rounds[0] += 1

        streams = [threading.Thread(target=stream) for _ in range(2)]
        for thread in streams:
            thread.start()
        try:
            wait_for(lambda: flood.accepted == 1 and stalled.connections == 1,
                     "the flood to start")
            results, errors = run_threads(
                lambda i: ex.run_command(f"echo {i}").stdout, 100, timeout=120)
            assert not errors
            assert [results[i] for i in range(100)] == [f"{i}\n" for i in range(100)]
            # The stalled client's connection is still open and still unread.
            assert stalled.connections == 1
            assert ex.session_limit == 10
        finally:
            stop.set()
            for thread in streams:
                thread.join(60)
            sleeper.close()
        assert rounds[0] >= 1


def test_forwarded_channels_hold_no_session_slot(make_sshd: Any, make_backend: Any) -> None:
    server = make_sshd(max_sessions=2)
    backend = make_backend("echo")
    with SSHExecutor(**server.executor_parameters()) as ex, \
            ex.forward_local(backend.port, "127.0.0.1") as tunnel:
        clients = [socket.create_connection(tunnel.local_address, timeout=30) for _ in range(5)]
        try:
            for sock in clients:
                sock.sendall(b"ping")
                assert sock.recv(4) == b"ping"
            results, errors = run_threads(
                lambda i: ex.run_command("sleep 0.2; echo ok").stdout, 4, timeout=60)
            assert not errors and all(r == "ok\n" for r in results.values())
            # A command's slot comes back with the server's CLOSE, which may follow its result.
            wait_for(lambda: ex.statistics().open_channels == 0, "the command slots to return")
        finally:
            for sock in clients:
                sock.close()


def test_max_forwarded_caps_open_forwards_and_the_rest_wait(sshd: Any, make_backend: Any
                                                             ) -> None:
    backend = make_backend("echo")
    with SSHExecutor(max_forwarded=2, **sshd.executor_parameters()) as ex:
        first = ex.open_connection("127.0.0.1", backend.port, timeout=10)
        second = ex.open_connection("127.0.0.1", backend.port, timeout=10)
        with pytest.raises(ExecutorFailure, match="max_forwarded=2"):
            ex.open_connection("127.0.0.1", backend.port, timeout=0.3)
        waiting: List[Any] = []
        waiter = threading.Thread(
            target=lambda: waiting.append(ex.open_connection("127.0.0.1", backend.port)))
        waiter.start()
        first.close()
        waiter.join(30)
        assert len(waiting) == 1
        for sock in (second, waiting[0]):
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            sock.close()


# --- open_connection -------------------------------------------------------------------


def test_open_connection_is_socket_like(sshd: Any, make_backend: Any) -> None:
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        with ex.open_connection("127.0.0.1", backend.port, timeout=5) as sock:
            assert sock.gettimeout() == 5
            sock.sendall(b"line one\n")
            with sock.makefile("rb") as reader:
                assert reader.readline() == b"line one\n"
            sock.settimeout(0.2)
            with pytest.raises(socket.timeout):
                sock.recv(1)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            assert sock.recv(1) == b""
        assert sock.closed


def test_bad_arguments_name_the_parameter(sshd: Any) -> None:
    with pytest.raises(ValueError, match="max_forwarded"):
        SSHExecutor(max_forwarded=0, **sshd.executor_parameters())
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        with pytest.raises(TypeError, match="remote_port"):
            ex.forward_local("5432")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="local_port"):
            ex.forward_local(5432, local_port=70000)
        with pytest.raises(TypeError, match="remote_host"):
            ex.forward_remote(0, 5432, remote_host=None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            ex.open_connection("127.0.0.1", 22, timeout=-1)


# --- refusals --------------------------------------------------------------------------


def test_allow_tcp_forwarding_no_is_reported_clearly(make_sshd: Any, make_backend: Any,
                                                     caplog: Any) -> None:
    server = make_sshd(extra_config=["AllowTcpForwarding no"])
    backend = make_backend("echo")
    caplog.set_level(logging.WARNING, logger="paramiko_executor.tunnels")
    with SSHExecutor(**server.executor_parameters()) as ex:
        with pytest.raises(ExecutorFailure, match=f"127.0.0.1:{backend.port}.*prohibited"):
            ex.open_connection("127.0.0.1", backend.port, timeout=10)
        with pytest.raises(ExecutorFailure, match="refused to listen"):
            ex.forward_remote(0, backend.port)
        with ex.forward_local(backend.port, "127.0.0.1") as tunnel:
            # As ``ssh -L``: an end-of-file for a client that sent nothing; a reset
            # (as the data goes, or after) for one whose bytes went unread, or the
            # end-of-file when the close came first.
            with socket.create_connection(tunnel.local_address, timeout=30) as sock:
                assert read_all(sock) == b""
            with socket.create_connection(tunnel.local_address, timeout=30) as sock:
                try:
                    sock.sendall(b"hello")
                    assert read_all(sock) == b""
                except (ConnectionResetError, BrokenPipeError):
                    pass
            wait_for(lambda: any(f"127.0.0.1:{backend.port}" in r.getMessage()
                                 for r in caplog.records), "the WARNING")
        assert ex.run_command("echo still here").stdout == "still here\n"
    warning = next(r for r in caplog.records if f"127.0.0.1:{backend.port}" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "administratively prohibited" in warning.getMessage()


def test_a_target_that_refuses_is_reported_clearly(sshd: Any, caplog: Any) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    caplog.set_level(logging.WARNING, logger="paramiko_executor.tunnels")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        with pytest.raises(ExecutorFailure, match=f"127.0.0.1:{port}.*connect failed"):
            ex.open_connection("127.0.0.1", port, timeout=10)
        with ex.forward_local(port, "127.0.0.1") as tunnel:
            # Closed as ``ssh -L`` closes it: an end-of-file for a client that sent nothing.
            with socket.create_connection(tunnel.local_address, timeout=30) as sock:
                assert read_all(sock) == b""
            wait_for(lambda: any(f"127.0.0.1:{port}" in r.getMessage() and
                                 r.levelno == logging.WARNING for r in caplog.records),
                     "the WARNING")


# --- a lost connection -----------------------------------------------------------------


def kill_connections(server: Any) -> None:
    pids = server.serving_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.hang_timeout(300)
def test_a_tunnel_survives_a_connection_killed_under_load(make_sshd: Any, make_backend: Any
                                                          ) -> None:
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    threads_before, fds_before = threading.active_count(), open_fds()
    ex = SSHExecutor(connect_backoff=0.1, **server.executor_parameters())
    tunnel = ex.forward_local(backend.port, "127.0.0.1")
    outcomes: List[Optional[BaseException]] = []
    started = threading.Barrier(9)

    def stream() -> None:
        payload = os.urandom(BLOCK)
        try:
            with socket.create_connection(tunnel.local_address, timeout=60) as sock:
                sock.sendall(payload)
                assert sock.recv(1)
                started.wait(30)
                for _ in range(10_000):  # far more than can pass before the kill
                    sock.sendall(payload)
                    sock.recv(BLOCK)
            outcomes.append(None)
        except OSError as exc:
            outcomes.append(exc)

    streams = [threading.Thread(target=stream) for _ in range(8)]
    for thread in streams:
        thread.start()
    started.wait(60)
    kill_connections(server)
    for thread in streams:
        thread.join(60)
    assert not any(thread.is_alive() for thread in streams)
    # Every stream of that moment was cut, and saw it as an error, not as an end.
    assert len(outcomes) == 8 and all(isinstance(o, OSError) for o in outcomes)
    # The listener stayed; new clients go through the reconnected connection.
    payload = os.urandom(BLOCK)
    assert echo_once(tunnel.local_address, payload) == payload
    assert ex.statistics().reconnects == 1
    ex.close()
    assert tunnel.closed
    with pytest.raises(OSError):
        socket.create_connection(tunnel.local_address, timeout=5)
    wait_for(lambda: threading.active_count() <= threads_before, "the threads to end")
    wait_for(lambda: open_fds() <= fds_before, "the sockets to close")


def test_close_during_traffic_leaves_nothing_behind(sshd: Any, make_backend: Any) -> None:
    backend, flood = make_backend("echo"), make_backend("flood")
    threads_before, fds_before = threading.active_count(), open_fds()
    ex = SSHExecutor(**sshd.executor_parameters())
    tunnel = ex.forward_local(backend.port, "127.0.0.1")
    stalled = ex.forward_local(flood.port, "127.0.0.1")
    remote = ex.forward_remote(0, backend.port)
    opened = ex.open_connection("127.0.0.1", backend.port, timeout=10)
    clients = [socket.create_connection(tunnel.local_address, timeout=30) for _ in range(4)]
    clients.append(socket.create_connection(("127.0.0.1", remote.remote_address[1]), timeout=30))
    clients.append(socket.create_connection(stalled.local_address, timeout=30))
    for sock in clients[:5]:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    wait_for(lambda: stalled.connections == 1, "the flood to start")
    ex.close()
    assert tunnel.closed and stalled.closed and remote.closed and opened.closed
    for i, sock in enumerate(clients):
        if i == 4:  # the remote forward's: sshd ends it as it likes (with an EOF)
            try:
                read_all(sock)
            except OSError:
                pass
        else:
            with pytest.raises(OSError):
                read_all(sock)
        sock.close()
    wait_for(lambda: threading.active_count() <= threads_before, "the threads to end")
    wait_for(lambda: open_fds() <= fds_before, "the sockets to close")


# --- remote forwards -------------------------------------------------------------------


def answers(address: Tuple[str, int]) -> bool:
    """Whether a connection to ``address`` is carried to the echo server behind it."""
    try:
        return echo_once(("127.0.0.1", address[1]), b"are you there", timeout=5) == \
            b"are you there"
    except OSError:
        return False


@pytest.mark.hang_timeout(300)
def test_forward_remote_is_asked_for_again_after_a_reconnect(make_sshd: Any, make_backend: Any
                                                             ) -> None:
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    with SSHExecutor(connect_backoff=0.1, **server.executor_parameters()) as ex:
        with ex.forward_remote(0, backend.port) as tunnel:
            host, port = tunnel.remote_address
            assert host == "localhost" and port > 0
            payload = b"".join(blocks(4))
            assert echo_once(("127.0.0.1", port), payload) == payload
            kill_connections(server)
            # No command: the executor reconnects by itself and asks again.
            wait_for(lambda: ex.statistics().reconnects == 1, "the reconnect")
            wait_for(lambda: answers(tunnel.remote_address), "the forward to return")
            assert echo_once(("127.0.0.1", tunnel.remote_address[1]), payload) == payload
        wait_for(lambda: not answers(tunnel.remote_address), "the forward to be cancelled")


def test_a_remote_forward_refused_after_a_reconnect_is_asked_again_later(
        make_test_server: Any, make_backend: Any, caplog: Any) -> None:
    server = make_test_server()
    backend = make_backend("echo")
    caplog.set_level(logging.INFO, logger="paramiko_executor.tunnels")
    with SSHExecutor(connect_backoff=0.1, **server.executor_parameters()) as ex, \
            ex.forward_remote(0, backend.port) as tunnel:
        assert answers(tunnel.remote_address)
        server.allow_forwarding = False
        server.drop_connections()
        wait_for(lambda: any(r.levelno == logging.WARNING and "refused" in r.getMessage()
                             for r in caplog.records), "the WARNING")
        assert not answers(tunnel.remote_address)
        server.allow_forwarding = True
        server.drop_connections()
        wait_for(lambda: answers(tunnel.remote_address), "the forward to return")


def test_the_test_server_serves_and_refuses_forwards(make_test_server: Any, make_backend: Any
                                                    ) -> None:
    server = make_test_server(allow_forwarding=False)
    backend = make_backend("echo")
    # max_sessions given: no probe, whose kept channel would be a session open.
    with SSHExecutor(**server.executor_parameters(), max_sessions=10) as ex:
        with pytest.raises(ExecutorFailure, match="prohibited"):
            ex.open_connection("127.0.0.1", backend.port, timeout=10)
        server.allow_forwarding = True
        sessions = server.open_channels  # the connection's own (a channel kept from the probe)
        with ex.open_connection("127.0.0.1", backend.port, timeout=10) as sock:
            sock.sendall(b"abc")
            assert sock.recv(3) == b"abc"
            assert server.open_channels == sessions  # no session slot taken
    with pytest.raises(TypeError, match="allow_forwarding"):
        make_test_server(allow_forwarding="no")


def test_a_slow_reader_is_given_window_only_as_it_reads(sshd: Any, make_backend: Any) -> None:
    """An endless flood fills the window we granted and stops there until the reader reads."""
    flood = make_backend("flood")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        sock = ex.open_connection("127.0.0.1", flood.port, timeout=10)
        chan = sock.channel
        window = chan.get_transport().default_window_size
        wait_for(lambda: len(chan.in_buffer) >= window, "the flood to fill the window")
        # The connection still serves commands, and nothing past the window arrived.
        assert ex.run_command("echo ok").stdout == "ok\n"
        assert len(chan.in_buffer) == window
        total = 0
        sock.settimeout(10)
        while total < 4 * window:  # reading gives the window back: the flood goes on
            total += len(sock.recv(BLOCK))
        sock.close()


def test_a_tunnel_client_that_never_reads_holds_one_window_only(sshd: Any, make_backend: Any
                                                               ) -> None:
    """The tunnel takes from its channel only what the client's socket accepts."""
    flood = make_backend("flood")
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(flood.port, "127.0.0.1") as tunnel:
        client = socket.create_connection(tunnel.local_address, timeout=30)
        try:
            pipe, window = carried_pipe(tunnel)

            def full() -> bool:
                # One reading, judged once: a pipe thread the scheduler runs late
                # may still write a little more after this, until the server fills
                # the window again; a second reading could see that.
                held = pipe.held
                assert held <= window
                return held >= window - window // 10 and flood_stopped(ex, flood)

            # The flood stops for good once the kernel's buffers and the window
            # are full: the pipe holds the window, but for what it wrote and has
            # not given back yet (at most a tenth, paramiko's threshold).
            wait_for(full, "the flood to stop")
            total = 0
            while total < 4 * window:  # the client reads: the flood goes on
                total += len(client.recv(BLOCK))
        finally:
            client.close()


# --- the command line ------------------------------------------------------------------


def test_the_forward_command_carries_l_and_r_until_terminated(sshd: Any, make_backend: Any
                                                              ) -> None:
    import subprocess
    import sys

    import paramiko_executor

    backend = make_backend("echo")
    root = os.path.dirname(os.path.dirname(os.path.abspath(paramiko_executor.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "paramiko_executor", "forward", "--host", "127.0.0.1",
         "--port", str(sshd.port), "--user", sshd.username, "--key", sshd.client_key_path,
         "--known-hosts", str(sshd.known_hosts_path), "--ssh-config", "none",
         "-L", f"0:127.0.0.1:{backend.port}", "-R", f"0:127.0.0.1:{backend.port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        local = proc.stdout.readline().decode().split()
        remote = proc.stdout.readline().decode().split()
        assert local[0] == "-L" and local[3] == f"127.0.0.1:{backend.port}"
        assert remote[0] == "-R" and remote[1].startswith("localhost:")
        payload = os.urandom(BLOCK)
        for where in (local[1], remote[1]):
            port = int(where.rsplit(":", 1)[1])
            assert echo_once(("127.0.0.1", port), payload) == payload
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_forward_command_fails_at_once_on_refused_credentials(sshd: Any, tmp_path: Any
                                                                   ) -> None:
    """As ``ssh -N``: the login comes first, so a refused key is the command's exit status."""
    import subprocess
    import sys

    import paramiko_executor

    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True, stdin=subprocess.DEVNULL)
    root = os.path.dirname(os.path.dirname(os.path.abspath(paramiko_executor.__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "paramiko_executor", "forward", "--host", "127.0.0.1",
         "--port", str(sshd.port), "--user", sshd.username, "--key", str(stranger),
         "--known-hosts", str(sshd.known_hosts_path), "--ssh-config", "none",
         "-L", "0:127.0.0.1:9"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 255, proc.stderr
    assert b"-L" not in proc.stdout  # no forward was announced


def test_the_forward_command_reads_specs_as_ssh_does() -> None:
    from paramiko_executor.cli import _forward_spec, main

    assert _forward_spec("5432:db.internal:5432") == (None, 5432, "db.internal", 5432)
    assert _forward_spec("0.0.0.0:0:localhost:80") == ("0.0.0.0", 0, "localhost", 80)
    assert _forward_spec("[::1]:8080:[fe80::1]:80") == ("::1", 8080, "fe80::1", 80)
    for bad in ("5432:db", "x:5432:db:5432:1", "70000:db:1", "1:db:0"):
        with pytest.raises(argparse.ArgumentTypeError):
            _forward_spec(bad)
    with pytest.raises(SystemExit) as exit_info:
        main(["forward", "--host", "h", "-L", "5432:db"])
    assert exit_info.value.code == 2


def test_close_while_a_remote_forward_waits_for_its_server(make_sshd: Any, make_backend: Any
                                                          ) -> None:
    """The supervisor reconnecting to a server that is down ends with close(), promptly."""
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    threads_before = threading.active_count()
    ex = SSHExecutor(connect_backoff=0.2, **server.executor_parameters())
    tunnel = ex.forward_remote(0, backend.port)
    server.stop()
    wait_for(lambda: ex.statistics().connect_failures >= 2, "the reconnect attempts")
    ex.close()
    assert tunnel.closed
    wait_for(lambda: threading.active_count() <= threads_before, "the threads to end",
             timeout=10)


def test_a_closed_tunnel_leaves_the_executor_and_other_tunnels_working(
        sshd: Any, make_backend: Any) -> None:
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        first = ex.forward_local(backend.port, "127.0.0.1")
        second = ex.forward_local(backend.port, "127.0.0.1")
        client = socket.create_connection(first.local_address, timeout=30)
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        first.close()
        with pytest.raises(OSError):
            read_all(client)
        client.close()
        with pytest.raises(OSError):
            socket.create_connection(first.local_address, timeout=5)
        assert echo_once(second.local_address, b"still") == b"still"
        assert ex.run_command("echo ok").stdout == "ok\n"
        with pytest.raises(ExecutorFailure, match="cannot listen"):
            ex.forward_local(backend.port, local_port=second.local_address[1])
        second.close()


def test_a_file_from_makefile_outlives_close_of_its_socket(sshd: Any) -> None:
    """As with a socket (http.client relies on it): the body still arrives after close()."""
    listener = socket.create_server(("127.0.0.1", 0))
    go_on = threading.Event()

    def serve() -> None:
        peer, _ = listener.accept()
        with peer:
            peer.sendall(b"header\n")
            go_on.wait(30)
            peer.sendall(b"body\n")

    server = threading.Thread(target=serve)
    server.start()
    try:
        with SSHExecutor(**sshd.executor_parameters()) as ex:
            sock = ex.open_connection("127.0.0.1", listener.getsockname()[1], timeout=30)
            reader = sock.makefile("rb")
            assert reader.readline() == b"header\n"
            sock.close()
            assert not sock.closed  # the file still holds it
            go_on.set()
            assert reader.read() == b"body\n"
            reader.close()
            assert sock.closed
    finally:
        go_on.set()
        server.join(30)
        listener.close()


def test_an_open_answered_after_its_timeout_is_closed(make_test_server: Any, make_backend: Any
                                                       ) -> None:
    """A late confirmation must not leave the forward open on the server for good."""
    server = make_test_server()
    backend = make_backend("echo")
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("echo ok").stdout == "ok\n"
        server.freeze()
        try:
            with pytest.raises(ExecutorFailure, match=f"127.0.0.1:{backend.port}"):
                ex.open_connection("127.0.0.1", backend.port, timeout=0.5)
        finally:
            server.thaw()
        wait_for(lambda: backend.accepted == 1, "the late open to reach the target")
        wait_for(lambda: backend.connected == 0, "the late channel to be closed", timeout=10)
        with ex.open_connection("127.0.0.1", backend.port, timeout=10) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
