"""An SFTP subsystem request the server turns away is asked again, like a refused exec.

Dropbear before 2024.86 closes (EOF, CLOSE, no answer) every session channel still
waiting for its request when any session of the connection ends (its issue 321): back
to back, the previous transfer's sftp-server ends as the next channel opens. ``put`` and
``get`` raised `SFTPNotStarted` for it (3 of 100 gets, 7-8 of 60 puts on one connection)
where a command is tried again. A subsystem request on a channel the server had closed
before it went out also ended Dropbear's whole connection ("Unknown channel"), after a
10 s wait for an answer that could not come.
"""

from __future__ import annotations

import io
import pathlib
import threading
import time
from typing import Any, List, Tuple

import paramiko
import pytest
from helpers import wait_for
from test_transfer import connect

from paramiko_executor import SSHExecutor, TransferTimeout, executors, transfer
from paramiko_executor.internals import known_channel
from paramiko_executor.retry import NEVER_STARTED_TRIES


def _answers(monkeypatch: Any, *answers: Tuple[bool, bool]) -> List[int]:
    """Make the server's answers to the next subsystem requests ``answers`` (answered,
    accepted), then its own; the list returned counts the requests."""
    real = transfer.reply_arrived
    asked: List[int] = []

    def answer(chan: paramiko.Channel, timeout: float) -> Tuple[bool, bool]:
        asked.append(chan.chanid)
        if len(asked) <= len(answers):
            return answers[len(asked) - 1]
        return real(chan, timeout)
    monkeypatch.setattr(transfer, "reply_arrived", answer)
    return asked


def test_back_to_back_transfers_on_dropbear_all_succeed(dropbear: Any) -> None:
    # Refused 8 to 30 of these 160 on the old code (6 runs); at least one in every run.
    target = f"/tmp/pe-fix13d-{time.monotonic_ns()}"
    with SSHExecutor(**dropbear.executor_parameters()) as ex:
        try:
            for _ in range(100):
                assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
            for number in range(60):
                assert ex.put(io.BytesIO(b"%d" % number), target, timeout=30) > 0
            copy = io.BytesIO()
            ex.get(target, copy, timeout=30)
            assert copy.getvalue() == b"59"
        finally:
            ex.run_command(f"rm -f {target}", timeout=30, check=False)


def test_transfers_on_dropbear_while_other_threads_commands_end(dropbear: Any) -> None:
    # Any session's end closes the waiting channels, not only the transfer's own previous
    # one: waiting for that (0 of 160 refused alone) left 18 to 46 of 160 refused here.
    stop = threading.Event()
    ran: List[int] = []
    with SSHExecutor(**dropbear.executor_parameters()) as ex:
        def commands() -> None:
            while not stop.is_set() and len(ran) < 10000:
                ex.run_command("true", timeout=30)
                ran.append(1)
        worker = threading.Thread(target=commands, daemon=True)
        worker.start()
        try:
            for _ in range(100):
                assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
        finally:
            stop.set()
            worker.join(60)
        assert not worker.is_alive()
        assert ran  # the commands did run meanwhile


@pytest.mark.parametrize("kind", ["get", "put"])
def test_a_refused_subsystem_is_asked_again_on_the_same_connection(
        sshd: Any, monkeypatch: Any, shared_dir: str, kind: str) -> None:
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        asked = _answers(monkeypatch, (True, False), (True, False), (True, False))
        if kind == "get":
            assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
        else:
            ex.put(io.BytesIO(b"data"), str(pathlib.Path(shared_dir) / "f"), timeout=30)
            assert (pathlib.Path(shared_dir) / "f").read_bytes() == b"data"
        assert len(asked) == 4 and len(set(asked)) == 4  # a new channel each time
        stats = ex.statistics()
        assert stats.reconnects == 0 and stats.commands_failed == 0
        # Each refused channel's slot came back with the server's CLOSE.
        wait_for(lambda: ex.statistics().open_channels == 0, "the refused sessions to close")


def test_a_subsystem_refused_every_time_is_sftp_not_started_after_bounded_tries(
        sshd: Any, monkeypatch: Any) -> None:
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        asked = _answers(monkeypatch, *[(True, False)] * 50)
        started = time.monotonic()
        with pytest.raises(transfer.SFTPNotStarted, match=r"refused.*\(9 attempts\)") as info:
            ex.get("/etc/hostname", io.BytesIO())
        took = time.monotonic() - started
        assert len(asked) == NEVER_STARTED_TRIES + 1
        assert info.value.refused and not info.value.lasting
        assert info.value.executor is ex
        assert took < 5.0, f"{took:.1f} s"  # the pauses: 1.6 s in all
        # Within the call's timeout: the pauses stop at it.
        before = len(asked)
        started = time.monotonic()
        with pytest.raises(TransferTimeout):
            ex.get("/etc/hostname", io.BytesIO(), timeout=0.3)
        assert time.monotonic() - started < 2.0
        assert len(asked) - before < NEVER_STARTED_TRIES + 1
        monkeypatch.undo()
        assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
        assert ex.statistics().reconnects == 0


def test_an_unanswered_subsystem_request_is_not_asked_again(sshd: Any, monkeypatch: Any) -> None:
    # No answer within NEGOTIATION_TIMEOUT (10 s) is no quick refusal: asked again, a
    # frozen server would cost every transfer 90 s.
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        asked = _answers(monkeypatch, (False, False))
        with pytest.raises(transfer.SFTPNotStarted, match="no answer") as info:
            ex.get("/etc/hostname", io.BytesIO())
        assert len(asked) == 1
        assert not info.value.refused and not info.value.lasting


def test_a_forced_command_is_not_asked_again(sshd: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(transfer, "NEGOTIATION_TIMEOUT", 1.0)
    starts: List[int] = []
    invoke = transfer._Session._invoke_subsystem

    def counted(session: Any, until: float) -> None:
        starts.append(1)
        invoke(session, until)
    monkeypatch.setattr(transfer._Session, "_invoke_subsystem", counted)
    with SSHExecutor(**sshd.executor_parameters(client_keys=[sshd.forced_key_path])) as ex:
        ex.run_command("true")
        started = time.monotonic()
        with pytest.raises(transfer.SFTPNotStarted) as info:
            ex.get("/etc/hostname", io.BytesIO())
        assert info.value.lasting and not info.value.refused
        assert len(starts) == 1
        assert time.monotonic() - started < 2 * transfer.NEGOTIATION_TIMEOUT


def test_no_subsystem_request_goes_out_on_a_channel_the_server_closed(
        sshd: Any, monkeypatch: Any) -> None:
    # It went out after paramiko's CLOSE: Dropbear ends the connection on it ("Unknown
    # channel"), and the event its close had set was cleared: a wait for NEGOTIATION_TIMEOUT.
    monkeypatch.setattr(transfer, "NEGOTIATION_TIMEOUT", 5.0)
    t = connect(sshd.host, sshd.port, sshd.username, sshd.client_key_path)
    try:
        chan = t.open_session()
        chan.close()
        wait_for(lambda: known_channel(t, chan.chanid) is None, "the server's CLOSE")
        started = time.monotonic()
        with pytest.raises(transfer.SFTPNotStarted, match="closed the channel") as info:
            transfer.download(chan, "/etc/hostname", io.BytesIO())
        assert time.monotonic() - started < 1.0
        assert info.value.refused
        # The connection took nothing amiss.
        assert transfer.download(t.open_session(), "/etc/hostname", io.BytesIO()) > 0
        assert t.is_active()
    finally:
        t.close()


def test_only_work_the_server_turned_away_at_once_is_tried_again() -> None:
    # One predicate serves commands and transfers.
    assert executors._turned_away(executors.NeverStarted("refused"))
    assert executors._turned_away(transfer.SFTPNotStarted("refused", refused=True))
    assert not executors._turned_away(transfer.SFTPNotStarted("forced", lasting=True))
    assert not executors._turned_away(transfer.SFTPNotStarted("no answer"))
