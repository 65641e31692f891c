"""paramiko's handshake time limit, kept without its timer thread."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator, List

import paramiko
import pytest

from paramiko_executor import SSHExecutor
from paramiko_executor.internals import thread_free_handshake_timer


@pytest.fixture
def silent_after_banner() -> Iterator[int]:
    """A port whose server sends an SSH banner, then reads and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)
    stop = threading.Event()
    accepted: List[socket.socket] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        accepted.append(conn)
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        stop.wait(20)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(20)
    for conn in accepted:
        conn.close()


def test_a_connect_starts_no_handshake_timer_thread(sshd: Any, monkeypatch: Any) -> None:
    started: List[str] = []
    timer = threading.Timer

    class Counting(timer):  # type: ignore[misc, valid-type]
        def __init__(self, interval: float, function: Any, *args: Any, **kwargs: Any) -> None:
            started.append(getattr(function, "__name__", ""))
            super().__init__(interval, function, *args, **kwargs)

    monkeypatch.setattr(threading, "Timer", Counting)
    with SSHExecutor(**sshd.executor_parameters(), max_sessions=10) as executor:
        assert executor.run_command("echo ok").stdout == "ok\n"
    assert "read_timer" not in started


def test_the_handshake_limit_still_ends_a_server_silent_after_its_banner(
        silent_after_banner: int) -> None:
    sock = socket.create_connection(("127.0.0.1", silent_after_banner), timeout=10)
    transport = paramiko.Transport(sock)
    try:
        transport.handshake_timeout = 0.5
        thread_free_handshake_timer(transport)
        started = time.monotonic()
        with pytest.raises((paramiko.SSHException, EOFError)):
            transport.start_client(timeout=30)
        # Ended by the 0.5 s limit, not by start_client's 30 s.
        assert time.monotonic() - started < 10
        transport.join(10)
        assert not transport.is_alive()
    finally:
        transport.close()


def test_a_handshake_that_finished_in_time_never_times_out_later(sshd: Any) -> None:
    sock = socket.create_connection((sshd.host, sshd.port), timeout=10)
    transport = paramiko.Transport(sock)
    try:
        transport.handshake_timeout = 0.5
        thread_free_handshake_timer(transport)
        transport.start_client(timeout=10)
        time.sleep(0.7)  # past the limit: the cancelled deadline must not end the connection
        assert not transport.packetizer.handshake_timed_out()
        transport.send_ignore()
        assert transport.is_active()
    finally:
        transport.close()
