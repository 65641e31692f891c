"""The session channel opened ahead of time for the next command."""

from __future__ import annotations

import pytest

from paramiko_executor import SSHExecutor


def spare_of(ex):
    return ex._connection.link.spare


def test_next_command_runs_on_the_channel_opened_ahead(test_server):
    # max_sessions given: no probe (whose kept channel the first command would run on).
    with SSHExecutor(**test_server.executor_parameters(max_sessions=10)) as ex:
        ex.run_command("true")
        warm = spare_of(ex)
        pending = warm._pending
        assert pending.wait_open(10) and pending.opened and pending.holds_slot
        spare = pending.chan
        assert ex.run_command("echo warm").stdout == "warm\n"
        assert spare.closed and warm._pending is not None and warm._pending.chan is not spare
        # The first command's own, the spare it asked for and the next used, the next spare.
        assert test_server.channels_opened == 3


def test_no_spare_when_every_slot_is_taken(test_server):
    with SSHExecutor(**test_server.executor_parameters(max_sessions=1)) as ex:
        for i in range(5):
            assert ex.run_command(f"echo {i}").stdout == f"{i}\n"
        assert spare_of(ex)._pending is None
        assert test_server.peak_channels == 1


@pytest.mark.parametrize("limit", [1, 3])
def test_refused_spares_cost_nothing(make_test_server, limit):
    # max_sessions equal to the server's limit: a spare asked for while a
    # burst fills every slot is refused and dropped, and no command fails.
    server = make_test_server(max_sessions=limit)
    from concurrent.futures import ThreadPoolExecutor

    with SSHExecutor(**server.executor_parameters(max_sessions=limit)) as ex:
        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(lambda i: ex.run_command(f"echo {i}").stdout, range(200)))
    assert outputs == [f"{i}\n" for i in range(200)]
    assert server.connections_accepted == 1
