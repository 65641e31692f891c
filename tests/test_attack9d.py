"""attack9d: attacks on attack9b's fixes that broke something, against real servers.

One regression test per defect (or a strict xfail naming what is left).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any, List

import pytest

from paramiko_executor import (
    SAFE_WRAPPER,
    CommandTimeout,
    DupingSSHExecutor,
    ExecutorFailure,
    SSHExecutor,
)


def _pids(pattern: str) -> List[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def _gone(pattern: str, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not _pids(pattern):
            return True
        time.sleep(0.1)
    return not _pids(pattern)


@pytest.mark.hang_timeout(120)
def test_a_timed_out_command_is_ended_even_when_the_executor_closes_right_after(sshd):
    """The TERM after a timeout went out from a thread of its own, after the caller returned.

    A caller that closed the executor next (leaving a ``with`` block) closed the
    connection first, most times: sshd leaves a command without a terminal running
    when its connection ends, and ``sleep`` ran on for good (7 runs out of 8).
    """
    survivors = []
    for attempt in range(4):
        # A unique argument names the remote process for pgrep.
        pattern = f"sleep 1000.{os.getpid()}{attempt}"
        with SSHExecutor(**sshd.executor_parameters()) as executor:
            executor.run_command("true", timeout=20)
            with pytest.raises(CommandTimeout):
                executor.run_command(f"exec {pattern}", timeout=0.5)
        if not _gone(pattern, within=5):
            survivors.append(pattern)
            for pid in _pids(pattern):
                os.kill(pid, signal.SIGKILL)
    assert not survivors, f"still running after the executor closed: {survivors}"


@pytest.mark.hang_timeout(120)
def test_a_variable_too_long_for_a_request_is_refused_by_the_duping_executor_too(sshd):
    """`DupingSSHExecutor` skipped `SSHExecutor`'s check of the variables' sizes.

    Its env requests go out as `SSHExecutor`'s do: a 300 kB value ended sshd's whole
    connection (a packet over 256 KiB), 9 times over ("the connection was lost").
    """
    with DupingSSHExecutor(wrapper=SAFE_WRAPPER, **sshd.executor_parameters()) as executor:
        with pytest.raises(ValueError, match="env"):
            executor.run_command("echo hi", env={"LC_X": "y" * 300_000}, timeout=20)
        with SSHExecutor(**sshd.executor_parameters()) as plain:
            with pytest.raises(ValueError, match="env"):
                plain.run_command("echo hi", env={"LC_X": "y" * 300_000}, timeout=20)


@pytest.mark.hang_timeout(120)
def test_a_long_command_on_dropbear_is_refused_and_spares_the_connection(dropbear: Any) -> None:
    """Dropbear ends the whole connection on a string over 9000 bytes ("String too long").

    MAX_REQUEST_TEXT (255 KiB) is sshd's limit: a 9001-byte command went out, and was
    re-sent on each new connection, cutting the commands beside it each time
    (`ExecutorFailure` after 4 attempts, 4 connections ended). Now it is this host's
    `ExecutorFailure` before anything is sent (not a `ValueError`: the limit is the
    server's, and a `HostGroup`'s other hosts run the command).
    """
    with SSHExecutor(**dropbear.executor_parameters()) as executor:
        executor.run_command("true", timeout=20)
        assert executor.run_command("echo " + "x" * 8995, timeout=30).stdout == "x" * 8995 + "\n"
        with pytest.raises(ExecutorFailure, match="command is 9005 bytes.*did not run"):
            executor.run_command("true " + "x" * 9000, timeout=30, check=False)
        assert executor.run_command("echo ok", timeout=30).stdout == "ok\n"
        assert executor.statistics().reconnects == 0
    ended = dropbear.read_log().count("String too long")
    assert ended == 0, f"Dropbear ended {ended} connections on the command"


@pytest.mark.hang_timeout(90)
def test_an_exit_status_while_a_terminal_is_asked_for_is_not_the_commands(monkeypatch):
    """An exit status before the exec, sent while the client waits on its pty-req, ran nothing.

    Before the pty-req it gave the channel up as `NeverStarted` and the command ran on
    another; during it, the same violation was an `ExecutorFailure` saying "the command
    may have run", and the command was not run at all.
    """
    import test_origin
    from test_origin import HostileServer, finish

    forged = []

    def pty_request(self: Any, channel: Any, *args: Any) -> bool:
        if not forged:  # the first channel only: the command's next channel is honest
            forged.append(channel.get_id())
            channel.send_exit_status(0)
        return True

    monkeypatch.setattr(test_origin._Interface, "check_channel_pty_request", pty_request,
                        raising=False)

    def real(chan: Any) -> None:
        chan.sendall(b"real\n")
        finish(chan, 0)

    server = HostileServer({b"real": real, b"sync": finish})
    try:
        with SSHExecutor(**server.parameters()) as executor:
            assert executor.run_command("real", pty=True, timeout=30).stdout == "real\n"
            assert forged
    finally:
        server.stop()
