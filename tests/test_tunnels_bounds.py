"""Tunnels: every wait bounded, and open_connection's object behaving as a socket.

Against a real sshd that is stopped (a server that is down: its port
refuses) while the executor must reconnect with retries and backoff, and
against the project's test server frozen mid-open (an open answered late).
"""

from __future__ import annotations

import http.client
import http.server
import logging
import math
import select
import socket
import threading
from typing import Any

import pytest
from backends import Backend
from helpers import call_in_thread, outcome_within, wait_for
from test_tunnels import read_all

from paramiko_executor import ExecutorFailure, ForwardTimeout, SSHExecutor, tunnels
from paramiko_executor.tunnels import JOIN_TIMEOUT


def echo_through(ex: SSHExecutor, backend: Backend, payload: bytes, timeout: float) -> bytes:
    with ex.open_connection("127.0.0.1", backend.port, timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        return read_all(sock)  # type: ignore[arg-type]


# --- open_connection's timeout ---------------------------------------------------------


def test_open_connections_timeout_bounds_waiting_for_a_reconnect(down: Any, make_backend: Any
                                                                 ) -> None:
    """As with socket.create_connection: the timeout bounds the open, reconnect included."""
    server, ex = down
    backend = make_backend("echo")
    outcome = outcome_within(10, lambda: ex.open_connection("127.0.0.1", backend.port,
                                                            timeout=0.5))
    error = outcome.get("error")
    # Both what the executor raises and what socket.create_connection does.
    assert isinstance(error, ForwardTimeout), outcome
    assert isinstance(error, ExecutorFailure) and isinstance(error, TimeoutError), outcome
    assert f"127.0.0.1:{backend.port}" in str(error) and "0.5 s" in str(error)
    assert "timed out" in str(error)
    # A command waiting without a bound and a later open with one share a connect
    # (the one given up, or one of the command's) and its outcome: one reconnect.
    command = call_in_thread(lambda: ex.run_command("echo back"))
    server.start()
    assert echo_through(ex, backend, b"through", timeout=60) == b"through"
    command["thread"].join(60)
    assert command.get("result") is not None and command["result"].stdout == "back\n", command
    assert ex.statistics().reconnects == 1


def test_a_connect_no_caller_waits_for_any_more_ends_before_its_next_retry(
        down: Any, make_backend: Any) -> None:
    """The thread connecting for a timed-out open does not retry for minutes for no one."""
    server, ex = down
    backend = make_backend("echo")
    threads_before = threading.active_count()
    for _ in range(3):
        outcome = outcome_within(10, lambda: ex.open_connection("127.0.0.1", backend.port,
                                                                timeout=0.2))
        assert isinstance(outcome.get("error"), ExecutorFailure), outcome
    wait_for(lambda: threading.active_count() <= threads_before, "the connecting thread to end",
             timeout=10)
    server.start()
    assert echo_through(ex, backend, b"again", timeout=60) == b"again"


# --- local forwards --------------------------------------------------------------------


def test_closing_a_tunnel_ends_a_client_waiting_for_a_reconnect_at_once(
        down: Any, make_backend: Any) -> None:
    """The client's thread used to wait for the whole connect: close() joined it in vain."""
    _, ex = down
    backend = make_backend("echo")
    tunnel = ex.forward_local(backend.port, "127.0.0.1")
    with socket.create_connection(tunnel.local_address, timeout=30) as client:
        wait_for(lambda: ex.statistics().connect_failures >= 1,
                 "the client's open to wait for a reconnect")
        outcome_within(JOIN_TIMEOUT / 2, tunnel.close)
        with pytest.raises(ConnectionResetError):
            read_all(client)
    assert tunnel.connections == 0


def test_a_tunnel_client_waits_for_a_reconnect_open_timeout_at_most(
        down: Any, make_backend: Any, monkeypatch: Any, caplog: Any) -> None:
    _, ex = down
    backend = make_backend("echo")
    monkeypatch.setattr(tunnels, "OPEN_TIMEOUT", 0.5)
    caplog.set_level(logging.WARNING, logger="paramiko_executor.tunnels")
    with ex.forward_local(backend.port, "127.0.0.1") as tunnel:
        with socket.create_connection(tunnel.local_address, timeout=20) as client:
            with pytest.raises(ConnectionResetError):  # not a timeout of ours
                read_all(client)
        wait_for(lambda: any("no forward within 0.5 s" in r.getMessage()
                             for r in caplog.records), "the WARNING")
    warning = next(r for r in caplog.records if "no forward within" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert f"127.0.0.1:{backend.port}" in warning.getMessage()


# --- an open its caller left ------------------------------------------------------------


def test_an_open_left_by_its_caller_holds_its_place_until_it_is_closed(
        make_test_server: Any, make_backend: Any) -> None:
    """The server may still open that channel: max_forwarded counts it until it is closed."""
    server = make_test_server()
    backend = make_backend("echo")
    with SSHExecutor(max_forwarded=1, **server.executor_parameters()) as ex:
        assert ex.run_command("echo ok").stdout == "ok\n"
        server.freeze()
        try:
            with pytest.raises(ForwardTimeout, match=f"127.0.0.1:{backend.port}"):
                ex.open_connection("127.0.0.1", backend.port, timeout=0.5)
            # Not sent (it used to be, and the server had two forwards open at once).
            with pytest.raises(TimeoutError, match="came free under max_forwarded=1"):
                ex.open_connection("127.0.0.1", backend.port, timeout=0.5)
        finally:
            server.thaw()
        wait_for(lambda: backend.accepted == 1, "the late open to reach the target")
        wait_for(lambda: backend.connected == 0, "the late channel to be closed", timeout=10)
        # Its place came back, once: the one place serves the next open.
        assert echo_through(ex, backend, b"next", timeout=10) == b"next"
        assert backend.accepted == 2
        assert ex._forwarding.limit.used == 0


# --- the socket-like object -------------------------------------------------------------


def test_a_forwarded_socket_keeps_a_sockets_timeout_rules(sshd: Any, make_backend: Any
                                                          ) -> None:
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        sock = ex.open_connection("127.0.0.1", backend.port, timeout=5)
        with sock:
            sock.settimeout(0)  # non-blocking: "not now", never a timeout
            assert sock.gettimeout() == 0.0
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            sock.setblocking(True)
            assert sock.gettimeout() is None
            sock.setblocking(False)
            assert sock.gettimeout() == 0.0
            with pytest.raises(BlockingIOError):
                sock.recv_into(bytearray(1))
            sock.settimeout(math.inf)
            assert sock.gettimeout() is None
            bad: Any
            for bad, error in ((-1, ValueError), (math.nan, ValueError), ("1", TypeError)):
                with pytest.raises(error, match="timeout"):
                    sock.settimeout(bad)
            assert sock.gettimeout() is None
            with pytest.raises(ValueError, match="nbytes"):
                sock.recv_into(bytearray(4), 8)

            # fileno: readable for select() once data waits.
            sock.settimeout(10)
            assert select.select([sock], [], [], 0) == ([], [], [])
            assert sock.send(b"ping") == 4
            assert select.select([sock], [], [], 10)[0] == [sock]
            buffer = bytearray(8)
            assert sock.recv_into(buffer, 4) == 4 and bytes(buffer[:4]) == b"ping"
        assert sock.fileno() == -1
        with pytest.raises(OSError):
            sock.settimeout(1)


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: two requests on one forwarded connection

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + 6))
        self.end_headers()
        self.wfile.write(b"hello " + body)

    def log_message(self, *args: Any) -> None:
        pass


def test_http_client_speaks_through_a_forwarded_socket(sshd: Any) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    serving = threading.Thread(target=httpd.serve_forever)
    serving.start()
    try:
        port = httpd.server_address[1]
        with SSHExecutor(**sshd.executor_parameters()) as ex:
            sock = ex.open_connection("127.0.0.1", port, timeout=10)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.sock = sock  # type: ignore[assignment]
            for name in (b"one", b"two"):
                conn.request("POST", "/", body=name)
                response = conn.getresponse()
                assert response.status == 200 and response.read() == b"hello " + name
            conn.close()
            assert sock.closed

            with ex.open_connection("127.0.0.1", port, timeout=10) as raw, \
                    raw.makefile("rwb") as stream:
                stream.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                             b"Connection: close\r\n\r\nthree")
                stream.flush()
                assert stream.readline() == b"HTTP/1.1 200 OK\r\n"
                assert stream.read().endswith(b"\r\n\r\nhello three")
    finally:
        httpd.shutdown()
        httpd.server_close()
        serving.join(10)
