"""review11: defects found reviewing 0b145da..main (real sshd).

Each test fails on main at the time of the review; see the report of branch review11.
"""

from __future__ import annotations

import linecache
from typing import Any, Callable

import pytest
from helpers import at_line, wait_for
from test_attack10f import _body_lines, _interrupt

from paramiko_executor import CommandTimeout, ExecutorFailure, SSHExecutor
from paramiko_executor.channel import SessionChannel
from paramiko_executor.warm import Spare


def _where(function: Callable[..., Any], line: int) -> str:
    return f"after a Ctrl-C at {linecache.getline(function.__code__.co_filename, line)!r}"


@pytest.mark.hang_timeout(300)
@pytest.mark.parametrize("function", [SSHExecutor._run_once, SessionChannel.run],
                         ids=["_run_once", "SessionChannel.run"])
def test_a_command_interrupted_between_its_open_and_its_run_gives_the_session_back(
        make_sshd: Any, function: Any) -> None:
    """MaxSessions 1: an open session handed to the command (``_open_session``
    returned) is closed by nobody if a Ctrl-C lands before ``run``'s ``try``
    (``log.debug``, ``session.hold(None)``, ``run``'s LiveStream / window setup):
    the server keeps the session, the slot stays taken (and the thread's, before
    ``hold(None)``), and every later command of the thread fails or times out."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        for line in _body_lines(function):
            interrupted = at_line(function.__code__, line, _interrupt,
                                  lambda: ex.run_command("cat", b"x" * 10, timeout=30,
                                                         on_output=lambda *a: None))
            try:
                interrupted()
            except KeyboardInterrupt:
                pass
            where = _where(function, line)
            try:
                result = ex.run_command("echo ok", timeout=5, check=False)
            except (ExecutorFailure, CommandTimeout) as exc:
                raise AssertionError(f"{where}: {exc}") from None
            assert result.stdout == "ok\n", f"{where}: {result!r}"


@pytest.mark.hang_timeout(300)
def test_a_command_interrupted_taking_the_spare_gives_the_spare_session_back(
        make_sshd: Any) -> None:
    """MaxSessions 2: a Ctrl-C in `Spare.take` after it popped the spare (before or
    during its ``wait_open``) leaves that open session nobody's: never closed, its slot
    taken for the connection's life. Seen as a command from a ``bounded_connection``
    block (one slot the thread's) that can no longer get the second slot."""
    server = make_sshd(max_sessions=2)
    function = Spare.take
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        link = ex._connection.link
        for line in _body_lines(function):
            ex.run_command("true", timeout=30)  # its exec makes the spare
            wait_for(lambda: link.spare.held, "a spare channel")
            interrupted = at_line(function.__code__, line, _interrupt,
                                  lambda: ex.run_command("true", timeout=30))
            try:
                interrupted()
            except KeyboardInterrupt:
                pass
            where = _where(function, line)
            try:
                with ex.bounded_connection:
                    result = ex.run_command("echo ok", timeout=5, check=False)
            except CommandTimeout as exc:
                raise AssertionError(f"{where}: {exc}") from None
            assert result.stdout == "ok\n", f"{where}: {result!r}"
            assert ex._connection.link is link
