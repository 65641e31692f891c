"""Attacks on fix13d: refused SFTP subsystem requests tried again on the same connection."""

from __future__ import annotations

import collections
import io
import pathlib
import threading
import time
from typing import Any, Counter, List, Tuple

import pytest
from helpers import call_in_thread, wait_for
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


def test_a_round_trip_ends_with_its_connection_not_at_its_timeout(
        make_test_server: Any) -> None:
    # The request is sent, never answered (frozen), then the connection ends: no
    # reply can come, and the wait for one must not last out its timeout.
    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true", timeout=30)
        link: Any = ex._connection.link
        server.freeze()
        try:
            def ping() -> Tuple[bool, float]:
                started = time.monotonic()
                return link.pinger.round_trip(30), time.monotonic() - started

            call = call_in_thread(ping)
            wait_for(lambda: bool(link.requests._waiting), "the keepalive to be sent")
            server.drop_connections()
        finally:
            server.thaw()
        call["thread"].join(40)
        assert not call["thread"].is_alive()
        answered, took = call["result"]
        assert not answered
        assert took < 5, f"the round trip waited {took:.1f} s for a reply on a closed connection"


def test_a_command_whose_connection_dies_during_a_refusals_round_trip_runs_again_at_once(
        make_test_server: Any, monkeypatch: Any) -> None:
    # What Dropbear under 50 threads did: opens refused (its issue 321), the round
    # trip after them sent, then the connection's process died of a failed assertion
    # before answering. The command waited out its whole timeout on the dead connection.
    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true", timeout=30)
        link: Any = ex._connection.link
        link.spare.discard()
        real = link.pinger
        pings: List[float] = []

        class Dying:
            """The real round trip, on a server that stops answering and then dies."""

            transport = real.transport

            def round_trip(self, timeout: float) -> bool:
                pings.append(timeout)
                server.freeze()

                def die() -> None:
                    try:
                        wait_for(lambda: bool(link.requests._waiting), "the keepalive to be sent")
                        server.max_sessions = 10  # the next connection's opens go through
                        server.drop_connections()
                    finally:
                        server.thaw()
                threading.Thread(target=die, daemon=True).start()
                return real.round_trip(timeout)

        monkeypatch.setattr(link, "pinger", Dying())
        server.max_sessions = 0
        started = time.monotonic()
        call = call_in_thread(lambda: ex.run_command("echo 36", timeout=30))
        call["thread"].join(40)
        took = time.monotonic() - started
        assert not call["thread"].is_alive()
        assert pings, "no round trip after the refusals"
        assert "error" not in call, (call["error"], took)
        assert call["result"].stdout == "36\n"
        assert took < 10, f"the command took {took:.1f} s"
