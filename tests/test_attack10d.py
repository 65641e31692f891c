"""attack10d: tunnels' opens interrupted at chosen moments, against a real sshd on 127.0.0.1.

An interrupt (Ctrl-C) that lands in `tunnels._open_direct` once the OPEN is sent
but before its answer is waited for must still leave the channel to the reaper:
else the server confirms it, and the channel (and the server's connection to
the target) stays open for the rest of the executor's connection.
"""

from __future__ import annotations

import inspect
import socket
import threading
from typing import Any, Callable, List

import pytest
from helpers import at_line, wait_for

from paramiko_executor import SSHExecutor, tunnels
from paramiko_executor.channel import SessionChannel


def _line_after(function: Callable[..., Any], text: str, after: int = 1) -> int:
    """The number of the line ``after`` lines past ``function``'s one line starting with
    ``text``."""
    lines, first = inspect.getsourcelines(function)
    (index,) = [i for i, line in enumerate(lines) if line.strip().startswith(text)]
    return first + index + after


def _interrupt() -> None:
    raise KeyboardInterrupt


class Target:
    """A TCP server on 127.0.0.1 that accepts one connection and tells when it ends."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(30)
        self.port: int = self._listener.getsockname()[1]
        self.ended: List[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        # Bounded: a connection still open after this is one the client leaked.
        sock.settimeout(10)
        with sock:
            try:
                self.ended.append(sock.recv(1))
            except OSError as exc:
                self.ended.append(repr(exc).encode())

    def join(self) -> None:
        self._thread.join(40)
        self._listener.close()


@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("where", [
    pytest.param((tunnels._open_direct, "chan = new_session_channel("), id="as-the-open-returns"),
])
def test_an_open_interrupted_right_after_its_send_is_closed_once_confirmed(
        sshd: Any, where: Any) -> None:
    function, text = where
    target = Target()
    with SSHExecutor(**sshd.executor_parameters(), max_forwarded=1) as ex:
        ex.run_command("true", timeout=30)  # connected: the open is the next thing sent
        opening = at_line(function.__code__, _line_after(function, text), _interrupt,
                          lambda: ex.open_connection("127.0.0.1", target.port, timeout=30))
        with pytest.raises(KeyboardInterrupt):
            opening()
        target.join()
        # The server's connection to the target ended (the channel was closed), not at
        # the target's own timeout.
        assert target.ended == [b""], target.ended
        # And its place under max_forwarded came back.
        wait_for(lambda: ex._forwarding.limit.used == 0, "the open's place to come back")


@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("where", [
    pytest.param((SessionChannel.__init__, "chan = new_session_channel("),
                 id="as-the-open-returns"),
    pytest.param((SSHExecutor._open_session, "opened = session.settle_open("),
                 id="before-waiting-for-the-answer"),
    pytest.param((SessionChannel.wait_open, "while not self.answered.wait("),
                 id="waiting-for-the-answer"),
])
def test_a_command_interrupted_while_opening_its_session_gives_the_session_back(
        make_sshd: Any, where: Any) -> None:
    """With MaxSessions 1: the slot (and the server's session) of a command interrupted
    while its channel opens come back: the next command runs. On main the slot stayed
    the thread's: each later command of the thread failed at once ("this thread already
    holds all 1 session(s)")."""
    function, text = where
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        interrupted = at_line(function.__code__, _line_after(function, text, 0), _interrupt,
                              lambda: ex.run_command("true", timeout=30), after=True)
        with pytest.raises(KeyboardInterrupt):
            interrupted()
        for _ in range(3):
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
        assert ex.statistics().reconnects == 0
