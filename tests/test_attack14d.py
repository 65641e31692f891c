"""attack14d: defects found attacking the Dropbear start gate (d2e2e1b, 0f3c7be) and the
per-thread boundaries (037ad75, 6b7a90c, 929ec28); see the report of branch attack14d."""

from __future__ import annotations

import io
from typing import Any, List

import pytest

from paramiko_executor import SSHExecutor, transfer


@pytest.mark.parametrize("leftovers", [False, True])
def test_a_transfer_holds_its_start_until_the_subsystem_answers(dropbear: Any, monkeypatch: Any,
                                                                leftovers: bool) -> None:
    """A transfer's start ended at its channel's open: the next start's command, run
    while the SFTP subsystem request was on its way, closed the transfer's channel as
    it ended (Dropbear closes every channel with no process yet), and the request
    crossing that CLOSE ended the connection. 10 threads x 10 (half puts) 50 ms away:
    10-11 reconnects and 19-26 retries; now 6 and 8-9 (a session's end at any other
    moment is beyond any gate). The clean-up of failed uploads' files passed no gate."""
    with SSHExecutor(**dropbear.executor_parameters()) as ex:
        ex.run_command("true", timeout=30)
        link = ex._connection.link
        assert link is not None and link.starts.serial
        held: List[bool] = []
        invoke = transfer._Session._invoke_subsystem

        def spy(self: Any, until: float) -> None:
            held.append(link.starts._current is not None)
            invoke(self, until)

        monkeypatch.setattr(transfer._Session, "_invoke_subsystem", spy)
        if leftovers:
            ex._leftovers["/tmp/attack14d-never-made"] = 0
        ex.put(io.BytesIO(b"x"), "/tmp/attack14d-put", timeout=30)
        assert held == [True] * (2 if leftovers else 1)
        assert link.starts._current is None
        assert not ex._leftovers
