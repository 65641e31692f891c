"""attack10f: closes and opens interrupted (Ctrl-C) at every line (real sshd).

A close interrupted anywhere must leave to the next close what it left
undone: the listening, and the forwarded connections it had begun to end. An
open interrupted anywhere must give its slot (MaxSessions) or its place
(max_forwarded) back. A Ctrl-C is tried at each line with a call (`_body_lines`).
"""

from __future__ import annotations

import dis
import inspect
import linecache
import socket
from typing import Any, Callable, List

import pytest
from helpers import at_line, make_spare, wait_for

from paramiko_executor import ExecutorFailure, SSHExecutor, pipe, tunnels
from paramiko_executor.channel import SessionChannel
from paramiko_executor.forwarded import ForwardedSocket
from paramiko_executor.warm import Spare

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


def _body_lines(function: Callable[..., Any]) -> List[int]:
    """The numbers of ``function``'s lines where a Ctrl-C can land: those with a call or a
    loop's jump back, where CPython runs signal handlers (a trace could raise anywhere,
    at a ``try:`` before its block say, where no signal is ever handled)."""
    first = function.__code__.co_firstlineno
    return sorted({instruction.positions.lineno for instruction in dis.get_instructions(function)
                   if instruction.positions is not None and instruction.positions.lineno
                   and instruction.positions.lineno > first
                   and instruction.opname.startswith(("CALL", "PRECALL", "JUMP_BACKWARD"))})


def _command() -> Callable[[SSHExecutor], Any]:
    return lambda ex: ex.run_command("true", timeout=30)


def _bounded() -> Callable[[SSHExecutor], Any]:
    def use(ex: SSHExecutor) -> None:
        with ex.bounded_connection:
            pass
    return use


@pytest.mark.hang_timeout(300)
@pytest.mark.parametrize("function, use", [
    pytest.param(SSHExecutor._open_session, _command(), id="_open_session"),
    pytest.param(SessionChannel.__init__, _command(), id="SessionChannel.__init__"),
    pytest.param(SessionChannel._adopt, _command(), id="_adopt"),
    pytest.param(SessionChannel.settle_open, _command(), id="settle_open"),
    pytest.param(SessionChannel.run, _command(), id="run"),
    pytest.param(SSHExecutor._bounded_connection.__wrapped__, _bounded(),  # type: ignore[attr-defined]
                 id="_bounded_connection"),
])
def test_a_call_interrupted_at_any_line_of_its_open_gives_the_session_back(
        make_sshd: Any, function: Any, use: Callable[[SSHExecutor], Any]) -> None:
    """MaxSessions 1: after a Ctrl-C at any line of the session's open, the thread's
    next commands run (its slot came back) on the same connection."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        for line in _body_lines(function):
            interrupted = at_line(function.__code__, line, _interrupt, lambda: use(ex))
            try:
                interrupted()
            except KeyboardInterrupt:
                pass
            where = f"after a Ctrl-C at {linecache.getline(function.__code__.co_filename, line)!r}"
            try:
                ok = ex.run_command("echo ok", timeout=10).stdout == "ok\n"
            except ExecutorFailure as exc:
                raise AssertionError(f"{where}: {exc}") from None
            assert ok, where
        assert ex.statistics().reconnects == 0


@pytest.mark.hang_timeout(300)
def test_a_command_interrupted_at_any_line_of_its_take_of_the_spare_gives_it_back(
        make_sshd: Any) -> None:
    """MaxSessions 2: a Ctrl-C as a command took the spare channel (waiting for its
    open's answer, say) left it no one's: its session open on the server and its
    slot taken for the connection's life."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        link = ex._connection.link
        assert link is not None and link.slots is not None and link.spare is not None
        slots, spare = link.slots, link.spare
        # The probe's closing channels may have kept the first command from making one.
        wait_for(lambda: slots.available + spare.held == 2, "the probe's slots", timeout=10)
        ex.run_command("true", timeout=30)  # each command leaves a spare, a slot being free
        lines = _body_lines(Spare.take)
        assert lines
        for line in lines:
            make_spare(ex)  # one holding its slot: a refused one frees it at the refusal
            interrupted = at_line(Spare.take.__code__, line, _interrupt,
                                  lambda: ex.run_command("true", timeout=30))
            try:
                interrupted()
            except KeyboardInterrupt:
                pass
            where = ("after a Ctrl-C at "
                     f"{linecache.getline(Spare.take.__code__.co_filename, line)!r}")
            wait_for(lambda: slots.available + spare.held == 2,
                     f"every slot back or the spare's {where}", timeout=10)
            assert ex.run_command("echo ok", timeout=10).stdout == "ok\n", where
        assert ex.statistics().reconnects == 0


@pytest.mark.hang_timeout(300)
@pytest.mark.parametrize("function", [tunnels._open_direct, tunnels.Forwarding.open_connection,
                                      tunnels.Forwarding.open_channel, ForwardedSocket.__init__],
                         ids=["_open_direct", "open_connection", "open_channel",
                              "ForwardedSocket.__init__"])
def test_a_forward_interrupted_at_any_line_of_its_open_gives_its_place_back(
        sshd: Any, make_backend: Any, function: Any) -> None:
    """max_forwarded 1: after a Ctrl-C at any line of a forward's open, the next forward
    gets the place (once the server answered the open given up) and carries data."""
    echo = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters(), max_forwarded=1) as ex:
        ex.run_command("true", timeout=30)
        for line in _body_lines(function):
            interrupted = at_line(function.__code__, line, _interrupt,
                                  lambda: ex.open_connection("127.0.0.1", echo.port, timeout=30))
            try:
                interrupted().close()
            except KeyboardInterrupt:
                pass
            where = f"after a Ctrl-C at {linecache.getline(function.__code__.co_filename, line)!r}"
            try:
                with ex.open_connection("127.0.0.1", echo.port, timeout=10) as sock:
                    sock.sendall(b"x")
                    assert sock.recv(1) == b"x", where
            except ExecutorFailure as exc:
                raise AssertionError(f"{where}: {exc}") from None
        assert ex.statistics().reconnects == 0
