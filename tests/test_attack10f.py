"""attack10f: `Tunnel.close` interrupted (Ctrl-C) at chosen lines, against a real sshd.

A close interrupted anywhere must leave to the next close what it left
undone: the listening, and the forwarded connections it had begun to end.
"""

from __future__ import annotations

import inspect
import socket
from typing import Any, Callable, List

import pytest
from helpers import at_line, wait_for

from paramiko_executor import SSHExecutor, pipe, tunnels

#: What a close may wait for the tunnel's threads here (the default is 10 s).
JOIN = 3.0


def _line(function: Callable[..., Any], text: str) -> int:
    """The number of ``function``'s one line starting with ``text``."""
    lines, first = inspect.getsourcelines(function)
    (index,) = [i for i, line in enumerate(lines) if line.strip().startswith(text)]
    return first + index


def _interrupt() -> None:
    raise KeyboardInterrupt


def _ended(client: socket.socket) -> bool:
    """Whether the tunnel ended ``client``'s forwarded connection (EOF or reset)."""
    try:
        return client.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("function, text", [
    (tunnels.Tunnel._stop, text) for text in
    ["pipe.abort()", "self._forwarding.forget(self)", "self._stop_listening()",
     "self._stopped = True"]] + [
    (pipe.Pipe.abort, text) for text in
    ["self._on_socket(self._cut)", "self._sock_gate.close(self.sock.close)",
     "self._inbox.gate.close_channel()"]])
def test_a_close_interrupted_anywhere_is_finished_by_the_next(
        sshd: Any, make_backend: Any, monkeypatch: Any, function: Any, text: str) -> None:
    """An interrupt as the close ended the forwarded connections (after it stopped
    the listening) left them carried for good: the next close returned at once."""
    monkeypatch.setattr(tunnels, "JOIN_TIMEOUT", JOIN)
    echo = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        tunnel = ex.forward_local(echo.port, "127.0.0.1")
        clients: List[socket.socket] = []
        try:
            for _ in range(2):
                client = socket.create_connection(tunnel.local_address, timeout=30)
                clients.append(client)
                client.sendall(b"x")
                assert client.recv(1) == b"x"  # carried
            wait_for(lambda: tunnel.connections == 2, "both forwarded connections")
            closing = at_line(function.__code__, _line(function, text), _interrupt,
                              tunnel.close)
            with pytest.raises(KeyboardInterrupt):
                closing()
            tunnel.close()
            assert tunnel.closed
            for client in clients:
                client.settimeout(JOIN)
                assert _ended(client), "a forwarded connection outlived the close"
            wait_for(lambda: tunnel.connections == 0, "the pipes to end", timeout=JOIN)
            with pytest.raises(OSError):  # nothing listens any more
                socket.create_connection(tunnel.local_address, timeout=5).close()
            assert tunnel not in ex._forwarding._tunnels
        finally:
            for client in clients:
                client.close()
