"""Attacks on fix13d: refused SFTP subsystem requests tried again on the same connection."""

from __future__ import annotations

import collections
import io
import pathlib
import threading
from typing import Any, Counter, List

import pytest
from test_sftp_refused import _answers

from paramiko_executor import CommandTimeout, ExecutorFailure, SSHExecutor, executors


@pytest.fixture
def workdir(shared_dir: str) -> pathlib.Path:
    return pathlib.Path(shared_dir)


def test_a_burst_of_refusals_within_one_retried_get_keeps_the_leftover_names(
        sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    # Each try of a retried transfer runs the leftover clean-up first, and each refused
    # clean-up is one of its LEFTOVER_TRIES: one get refused twice (a burst Dropbear's
    # issue 321 makes, 1.6 s of pauses) gives up a broken put's temporary file for good,
    # though the get itself then succeeds. Before the retries, it took 3 calls.
    planted = workdir / ".planted.0000000000000000.tmp"
    planted.write_bytes(b"x")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        ex._leftovers[str(planted)] = 0
        # Clean-up, get, clean-up, get, clean-up: refused; then the server's own answers.
        asked: List[int] = _answers(monkeypatch, *[(True, False)] * 5)
        assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
        assert len(asked) == 6
        monkeypatch.undo()
        for _ in range(executors.LEFTOVER_TRIES):
            assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
        assert ex.statistics().commands_failed == 0
    assert not planted.exists(), "the temporary file was given up and left behind"



def test_puts_on_dropbear_under_50_threads_leave_no_temporary_files(
        dropbear: Any, workdir: pathlib.Path) -> None:
    failures: Counter[str] = collections.Counter()
    done: List[int] = []
    with SSHExecutor(**dropbear.executor_parameters()) as ex:
        def work(number: int) -> None:
            for turn in range(9):
                try:
                    kind = (number + turn) % 3
                    if kind == 0:
                        ex.run_command(f"echo {number}", timeout=60)
                    elif kind == 1:
                        ex.put(io.BytesIO(b"%d" % number * 1000), str(workdir / f"f{number}"),
                               timeout=60)
                    else:
                        assert ex.get("/etc/hostname", io.BytesIO(), timeout=60) > 0
                    done.append(1)
                except (ExecutorFailure, CommandTimeout) as exc:
                    # A share spend their retries on Dropbear's failed assertions: documented.
                    failures[type(exc).__name__] += 1
        threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not any(thread.is_alive() for thread in threads)
        # The names still pending are removed by the next transfers.
        for _ in range(executors.LEFTOVER_TRIES + 1):
            try:
                ex.get("/etc/hostname", io.BytesIO(), timeout=60)
            except ExecutorFailure:
                pass
        pending = dict(ex._leftovers)
    crashes = dropbear.read_log().count("Failed assertion")
    temps = sorted(p.name for p in workdir.iterdir() if p.name.endswith(".tmp"))
    assert not temps, (f"{len(temps)} left ({len(pending)} still pending); "
                       f"{len(done)} calls done, failed {dict(failures)}; "
                       f"Dropbear's failed assertions: {crashes}")
