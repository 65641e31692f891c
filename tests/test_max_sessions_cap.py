"""An explicit ``max_sessions`` against a real sshd's ``MaxSessions``.

An integer skips the probe and is the connection's cap; a server that allows
fewer proves it with a refusal that no session the server was still freeing
explains (`Connection.refused`'s ``quiet``): the connection's cap comes down to
the sessions the server holds for it, and the commands past it wait for a slot
instead of being refused until their tries run out. A refusal in the race at
saturation (an open read with our CLOSE, before sshd freed that session)
lowers nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import pytest
from helpers import run_threads

from paramiko_executor import SSHExecutor

LOWERED = "this connection's limit is now"


def test_a_cap_above_the_servers_comes_down_and_no_command_fails(
        make_sshd: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    # Before: the callers past the server's 3 sessions were refused until their
    # 20 tries ran out (12 of 30 `sleep 1` commands failed), and the cap stayed 10.
    server = make_sshd(max_sessions=3)
    caplog.set_level(logging.INFO, logger="paramiko_executor.connection")
    with SSHExecutor(**server.executor_parameters(), max_sessions=10) as ex:
        results, errors = run_threads(lambda i: ex.run_command(f"sleep 0.5; echo {i}").stdout,
                                      30, timeout=100)
        stats = ex.statistics()
        assert errors == []
        assert results == {i: f"{i}\n" for i in range(30)}
        assert stats.max_sessions == 3
        lowered = [r.getMessage() for r in caplog.records if LOWERED in r.getMessage()]
        assert len(lowered) == 1 and "not the 10 of max_sessions" in lowered[0], lowered
        # A new connection starts from the cap given again: the server may allow
        # more sessions by then.
        ex.close()
        assert ex.run_command("echo again").stdout == "again\n"
        assert ex.statistics().max_sessions == 10


def test_refusals_at_saturation_leave_a_right_cap_alone(make_sshd: Callable[..., Any]) -> None:
    server = make_sshd(max_sessions=3)
    with SSHExecutor(**server.executor_parameters(), max_sessions=3) as ex:

        def work(i: int) -> None:
            for _ in range(10):
                ex.run_command("true")

        _, errors = run_threads(work, 30, timeout=100)
        stats = ex.statistics()
    assert errors == []
    # The race happened (each refusal an open read together with our CLOSE)...
    assert stats.refused_opens > 0
    # ...and proved nothing: the server does allow 3.
    assert stats.max_sessions == 3
