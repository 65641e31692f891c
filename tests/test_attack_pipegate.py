"""Attacks on `pipe.Pipe`'s socket gate: an abort cuts (reset) and closes the local socket at
once, or as the last call in flight on it returns.

Against a real sshd and real TCP targets on 127.0.0.1. The promises under attack: no call on
a forwarded connection's local socket runs on a closed (or reused) descriptor, and none is
closed while a call is inside; a client whose stream was cut sees a reset, never a clean
end; a complete stream is never reported as cut; nothing (thread, descriptor) is left.
"""

from __future__ import annotations

import os
import pickle
import random
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from backends import Backend
from helpers import wait_for

from paramiko_executor import SSHExecutor, pipe, tunnels
from paramiko_executor.errors import ExecutorFailure, ForwardTimeout

Result = Tuple[str, int]  # how the client's stream ended, and how many bytes it read


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class CheckedSocket(socket.socket):
    """A pipe's local socket that notes every call made on it while it was closed, and
    every close made while another thread was inside a call on it."""

    violations: List[str] = []
    closes: List[int] = []
    _guard = threading.Lock()

    def __init__(self, sock: socket.socket) -> None:
        family, kind, proto = sock.family, sock.type, sock.proto
        super().__init__(family, kind, proto, fileno=sock.detach())
        self._inside: Dict[int, int] = {}

    def _call(self, name: str, call: Callable[..., Any], *args: Any) -> Any:
        me = threading.get_ident()
        with self._guard:
            if self.fileno() == -1:
                self.violations.append(f"{name} on a closed socket")
            self._inside[me] = self._inside.get(me, 0) + 1
        try:
            return call(*args)
        finally:
            with self._guard:
                self._inside[me] -= 1

    def recv_into(self, *args: Any) -> Any:  # type: ignore[override]
        return self._call("recv_into", super().recv_into, *args)

    def sendmsg(self, *args: Any) -> Any:  # type: ignore[override]
        return self._call("sendmsg", super().sendmsg, *args)

    def send(self, *args: Any) -> Any:  # type: ignore[override]
        return self._call("send", super().send, *args)

    def shutdown(self, *args: Any) -> Any:  # type: ignore[override]
        return self._call("shutdown", super().shutdown, *args)

    def setsockopt(self, *args: Any) -> Any:  # type: ignore[override]
        return self._call("setsockopt", super().setsockopt, *args)

    def close(self) -> None:
        me = threading.get_ident()
        with self._guard:
            others = [n for t, n in self._inside.items() if t != me and n]
            if others:
                self.violations.append("a close while another thread was inside a call")
            number = self.fileno()
            if number != -1:
                self.closes.append(number)
            super().close()


@pytest.fixture
def checked_pipes(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[str]]:
    """Every pipe of a tunnel gets a `CheckedSocket`; yields the violations seen."""
    CheckedSocket.violations = []
    CheckedSocket.closes = []

    class CheckedPipe(pipe.Pipe):
        def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
            super().__init__(CheckedSocket(sock), *args, **kwargs)

    monkeypatch.setattr(tunnels, "Pipe", CheckedPipe)
    yield CheckedSocket.violations


def echo_client(address: Tuple[str, int], request: bytes, half_close: bool,
                timeout: float = 30) -> Result:
    """Send ``request`` (then an EOF if ``half_close``), read the echo: how it ended.

    ("eof", n): a clean end after n bytes; ("reset", n): a reset after n bytes;
    ("refused", 0): no connection; ("timeout", n): nothing for ``timeout`` s.
    """
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except ConnectionRefusedError:
        return "refused", 0
    with sock:
        got = 0
        try:
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    return "eof", got
                got += len(data)
                if got >= len(request) and not half_close:
                    return "eof", got  # all of it, and no EOF asked for
        except socket.timeout:
            return "timeout", got
        except (ConnectionResetError, BrokenPipeError):
            return "reset", got


def churn(stop: threading.Event) -> None:
    """Open and close files and sockets as fast as it can: any number a pipe closes while
    a call of its is inside would soon name one of these."""
    for _ in range(1_000_000):
        if stop.is_set():
            return
        fd = os.open("/dev/null", os.O_RDONLY)
        pair = socket.socketpair()
        for end in pair:
            end.close()
        os.close(fd)


@pytest.mark.hang_timeout(300)
def test_tunnels_closing_under_their_clients_never_touch_a_closed_descriptor(
        make_sshd: Callable[..., Any], make_backend: Callable[..., Backend],
        checked_pipes: List[str]) -> None:
    """Rounds of 12 clients each, the tunnel closed at a random moment of their transfers,
    while other threads open and close descriptors: no call on a closed socket, no close
    under a call, every cut client reset, every whole echo whole, nothing left."""
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    rng = random.Random(5)
    outcomes: List[Result] = []
    stop = threading.Event()
    churners = [threading.Thread(target=churn, args=(stop,)) for _ in range(2)]
    threads_before, fds_before = threading.active_count(), open_fds()
    with SSHExecutor(**server.executor_parameters()) as ex:
        for thread in churners:
            thread.start()
        try:
            for _ in range(12):
                tunnel = ex.forward_local(backend.port, "127.0.0.1")
                size = rng.choice([1, 1000, 200_000, 3_000_000])
                request = os.urandom(size)
                results: List[Result] = []

                def client(half_close: bool) -> None:
                    results.append(echo_client(tunnel.local_address, request, half_close))

                clients = [threading.Thread(target=client, args=(i % 2 == 0,))
                           for i in range(12)]
                for thread in clients:
                    thread.start()
                time.sleep(rng.uniform(0, 0.3))  # the moment of the close, at random
                tunnel.close()
                for thread in clients:
                    thread.join(40)
                assert not any(thread.is_alive() for thread in clients)
                for how, got in results:
                    assert how != "timeout", "a client was never cut"
                    assert how != "eof" or got == size, f"a clean end after {got} of {size}"
                outcomes += results
        finally:
            stop.set()
            for thread in churners:
                thread.join(30)
    assert checked_pipes == []
    assert len(CheckedSocket.closes) > 50  # pipes ran, and closed their sockets
    assert {how for how, _ in outcomes} >= {"eof", "reset"}, outcomes
    wait_for(lambda: threading.active_count() <= threads_before, "the threads to end")
    wait_for(lambda: open_fds() <= fds_before, "the descriptors to close")
