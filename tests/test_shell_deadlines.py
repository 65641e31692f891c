"""ShellExecutor keeps SSHExecutor's timeout contract in every state of a command.

Each case runs on both executors (a real sshd for SSHExecutor): a command
that closed its output but still runs, a pty fed more stdin than a terminal
holds while the command reads nothing, and a pty command that reads all of a
large stdin. The calls run in a thread joined with a bound, so a regression
fails the test instead of hanging it.
"""

from __future__ import annotations

import pytest
from helpers import outcome_within

from paramiko_executor import CommandTimeout, ShellExecutor, SSHExecutor

#: Far more than a terminal's input queue (4 KiB) and a pipe (64 KiB): lines of 100 bytes.
BIG_STDIN = ("x" * 99 + "\n") * 1000

#: A call that should end at its 1 s timeout must be back well within this.
JOIN_BOUND = 20.0


@pytest.fixture(scope="module")
def remote(sshd3):
    with SSHExecutor(**sshd3.executor_parameters()) as ex:
        yield ex


@pytest.fixture(params=["ssh", "shell"])
def executor(request, remote):
    return remote if request.param == "ssh" else ShellExecutor()


def test_a_command_that_closed_its_output_still_times_out(executor):
    outcome = outcome_within(JOIN_BOUND, lambda: executor.run_command(
        "exec >/dev/null 2>&1; sleep 6", timeout=1))
    assert isinstance(outcome.get("error"), CommandTimeout), outcome


def test_pty_stdin_larger_than_the_terminal_holds_times_out(executor):
    outcome = outcome_within(JOIN_BOUND, lambda: executor.run_command(
        "sleep 30", BIG_STDIN, timeout=1, pty=True))
    assert isinstance(outcome.get("error"), CommandTimeout), outcome


def test_pty_command_reads_all_of_a_large_stdin(executor):
    outcome = outcome_within(JOIN_BOUND, lambda: executor.run_command(
        "head -n 1000 | wc -l", BIG_STDIN, timeout=JOIN_BOUND / 2, pty=True))
    assert "result" in outcome, outcome
    # The terminal echoes the input ahead of the count.
    assert outcome["result"].stdout.rstrip().endswith("1000")
