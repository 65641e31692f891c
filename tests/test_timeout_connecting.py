"""A call's ``timeout`` bounds the wait for the connection too: a host that is down, or a
server that never answers, costs the caller its timeout, not the connect's retry cycle.

Against a real sshd (stopped, then started again) and the project's test server
(frozen: it accepts TCP but sends nothing, not even its banner).
"""

from __future__ import annotations

import io
import socket
from typing import Any, Iterator

import pytest
from helpers import SLOW_RETRIES, call_in_thread, outcome_within, wait_for

from paramiko_executor import (
    CommandTimeout,
    HostGroup,
    SSHExecutor,
    TransferTimeout,
)


@pytest.mark.hang_timeout(120)
def test_a_commands_timeout_bounds_waiting_for_a_reconnect(down: Any) -> None:
    server, ex = down
    outcome = outcome_within(10, lambda: ex.run_command("echo never", timeout=0.5))
    error = outcome.get("error")
    # Before: the caller waited for every retry of the connect (minutes).
    assert isinstance(error, CommandTimeout), outcome
    assert error.exit_code is None and error.stdout == "" and error.stderr == ""
    assert "0.5 s" in str(error)
    stats = ex.statistics()
    # (It may have been sent once on the old connection before its loss was seen.)
    assert stats.commands_started == 2 and stats.commands_failed == 1
    # The executor is not broken by it: once the server is back, commands run.
    server.start()
    assert ex.run_command("echo back", timeout=60).stdout == "back\n"


@pytest.mark.hang_timeout(120)
def test_a_caller_without_a_timeout_still_gets_the_connects_outcome(down: Any) -> None:
    """One caller gives up; another, waiting for the same connect without a bound, gets it."""
    server, ex = down
    patient = call_in_thread(lambda: ex.run_command("echo patient"))
    wait_for(lambda: ex.statistics().connect_failures >= 1, "the connect to be retrying")
    outcome = outcome_within(10, lambda: ex.run_command("echo hasty", timeout=0.3))
    assert isinstance(outcome.get("error"), CommandTimeout), outcome
    server.start()
    patient["thread"].join(60)
    assert not patient["thread"].is_alive()
    assert patient.get("result") is not None, patient
    assert patient["result"].stdout == "patient\n"
    assert ex.statistics().connects == 2  # the first, and the one they shared


@pytest.mark.hang_timeout(120)
def test_a_transfers_timeout_bounds_waiting_for_a_reconnect(down: Any, tmp_path: Any) -> None:
    _server, ex = down
    outcome = outcome_within(10, lambda: ex.put(io.BytesIO(b"data"), str(tmp_path / "never"),
                                                timeout=0.5))
    error = outcome.get("error")
    assert isinstance(error, TransferTimeout) and isinstance(error, TimeoutError), outcome
    assert not (tmp_path / "never").exists()


@pytest.mark.hang_timeout(120)
def test_a_server_that_never_sends_its_banner_costs_the_timeout(make_test_server: Any) -> None:
    server = make_test_server()
    server.freeze()
    try:
        # paramiko's banner_timeout alone is 15 s, and the connect retries it.
        with SSHExecutor(**SLOW_RETRIES, **server.executor_parameters()) as ex:
            outcome = outcome_within(10, lambda: ex.run_command("echo never", timeout=0.5))
            assert isinstance(outcome.get("error"), CommandTimeout), outcome
    finally:
        server.thaw()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.hang_timeout(120)
def test_a_groups_down_host_holds_its_entry_for_its_timeout_only(sshd: Any, closed_port: int
                                                                  ) -> None:
    up = sshd.executor_parameters()
    with HostGroup([{"name": "up", **up}, {"name": "down", **up, "port": closed_port}],
                   **SLOW_RETRIES) as group:
        outcome = outcome_within(30, lambda: group.run_command("echo hi", timeout=2))
    result = outcome.get("result")
    assert result is not None, outcome
    assert result["up"].stdout == "hi\n"
    # Before: the down host's entry waited for its whole retry cycle (minutes).
    assert isinstance(result["down"], CommandTimeout), result["down"]
