"""A packet write bounded by its caller's deadline (`internals.DeadlineWrites`).

A thread whose own packet write blocks on a peer that stopped reading gives the
write up `WRITE_GRACE` seconds past its deadline, if no byte went out meanwhile:
the connection is then lost (the stream is broken), the thread's call times out,
and the other calls on the connection fail over. A peer that keeps draining,
however slowly, keeps its connection. Real sshd, frozen with SIGSTOP; and a
socket pair for the write itself.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import signal
import socket
import threading
import time
from typing import Any, Dict, List

import pytest
from helpers import call_in_thread, thread_stacks, wait_for
from paramiko.packet import Packetizer
from test_attack11b import frozen_with_writes_blocked
from test_review11 import _thaw

from paramiko_executor import (
    CommandTimeout,
    ExecutorFailure,
    SSHExecutor,
    TransferTimeout,
    internals,
)
from paramiko_executor.internals import WRITE_GRACE, DeadlineWrites, WriteAbandoned
from paramiko_executor.transfer import CLEANUP_GRACE


def _writes(sock: socket.socket) -> DeadlineWrites:
    sock.settimeout(0.1)  # as a transport sets its socket's
    return DeadlineWrites(Packetizer(sock), sock)


def test_a_write_past_its_deadline_on_a_peer_that_takes_nothing_is_given_up(
        monkeypatch: Any) -> None:
    monkeypatch.setattr(internals, "WRITE_GRACE", 0.5)
    ours, theirs = socket.socketpair()
    try:
        writes = _writes(ours)
        writes.end = time.monotonic() + 0.3
        started = time.monotonic()
        with pytest.raises(WriteAbandoned):
            writes(bytes(16 << 20))  # more than the socket pair's buffers take; unread
        took = time.monotonic() - started
        assert 0.8 <= took < 3.0, took
    finally:
        ours.close()
        theirs.close()


def test_a_write_past_its_deadline_goes_on_while_the_peer_drains_slowly(
        monkeypatch: Any) -> None:
    """The peer takes 64 KiB every 0.2 s (more often than the grace): the whole packet
    goes out, long past the deadline, and nothing is raised."""
    monkeypatch.setattr(internals, "WRITE_GRACE", 0.5)
    ours, theirs = socket.socketpair()
    size = 2 << 20
    got: List[int] = []
    done = threading.Event()

    def drain() -> None:
        theirs.settimeout(0.2)
        total = 0
        for _ in range(2000):  # bounded: 400 s at most
            if done.is_set() and total >= size:
                break
            try:
                chunk = theirs.recv(64 << 10)
            except socket.timeout:
                continue
            total += len(chunk)
            time.sleep(0.2)
        got.append(total)

    reader = threading.Thread(target=drain, daemon=True)
    try:
        writes = _writes(ours)
        writes.end = time.monotonic()  # already passed
        reader.start()
        started = time.monotonic()
        writes(bytes(size))
        took = time.monotonic() - started
        done.set()
        reader.join(60)
        assert got == [size]
        assert took > 1.0, took  # far past the deadline and the grace: it went on
    finally:
        done.set()
        ours.close()
        theirs.close()


def test_a_write_without_a_deadline_is_paramikos(monkeypatch: Any) -> None:
    ours, theirs = socket.socketpair()
    try:
        writes = _writes(ours)
        called: List[bytes] = []
        writes._paramikos = called.append  # type: ignore[assignment]
        writes(b"abc")
        assert called == [b"abc"]
    finally:
        ours.close()
        theirs.close()


def _send_signal(pids: List[int], number: int) -> None:
    """``number`` to each of ``pids`` still there (the executor's close ends them)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)


def _all_end(calls: List[Dict[str, Any]], by: float) -> None:
    """Wait for the threads of ``calls`` (`call_in_thread`) until ``by`` (monotonic); fail,
    showing where, for those still running then."""
    threads = [call["thread"] for call in calls]
    for thread in threads:
        thread.join(max(0.0, by - time.monotonic()))
    stuck = [thread for thread in threads if thread.is_alive()]
    assert not stuck, f"{len(stuck)} call(s) still ran:\n{thread_stacks(stuck)}"


def _transport(ex: SSHExecutor) -> Any:
    link = ex._connection.link
    assert link is not None
    return link.transport


@pytest.mark.hang_timeout(240)
def test_a_write_that_outran_its_deadline_drops_the_frozen_connection_and_the_others_fail_over(
        make_sshd: Any, monkeypatch: Any, shared_dir: str) -> None:
    """Frozen server, socket full: the commands whose stdin blocks time out (one of them
    gives its write up `WRITE_GRACE` past its deadline, which loses the connection), and
    a command without stdin running on that connection (no timeout) is retried on a new
    connection while the old one's server side is still frozen; the executor works on
    after the thaw. Before the bounded write, all of them waited for the thaw."""
    server = make_sshd(max_sessions=12)
    marker = os.path.join(shared_dir, "started")
    frozen: List[int] = []
    timeout = 4.0
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true", timeout=30)
            first = _transport(ex)
            other = call_in_thread(lambda: ex.run_command(
                f"test -e {marker} && echo second && exit 0; touch {marker}; sleep 120"))
            wait_for(lambda: os.path.exists(marker), "the other command to start")
            writers = frozen_with_writes_blocked(ex, server, monkeypatch, 9, timeout, frozen)
            frozen_at = time.monotonic()
            _all_end(writers + [other], frozen_at + timeout + WRITE_GRACE + 20)
            errors = [call.get("error") for call in writers]
            assert all(isinstance(error, CommandTimeout) for error in errors), errors
            assert other.get("result") is not None, other
            assert other["result"].stdout == "second\n"
            assert not first.is_active()
            assert _transport(ex) is not first
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"  # still frozen there
            _thaw(frozen)
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
            assert _transport(ex).packetizer.write_all.end is None  # every send left none set
    finally:
        _thaw(frozen)


@pytest.mark.hang_timeout(240)
def test_every_put_whose_writes_block_on_a_frozen_server_ends_near_its_timeout(
        make_sshd: Any, shared_dir: str) -> None:
    """Nine uploads freeze the server (SIGSTOP) once each has sent data: their SFTP
    windows hold more than the socket buffers take, so one upload's own packet write
    blocks. Each raises `TransferTimeout` near its ``timeout`` (its write given up
    `WRITE_GRACE` past it, its clean-up bounded by `CLEANUP_GRACE`); the stuck one
    waited for the thaw before."""
    server = make_sshd(max_sessions=12)
    count = 9
    frozen: List[int] = []

    def freeze() -> None:
        frozen.extend(server.serving_pids())
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)

    sending = threading.Barrier(count, action=freeze, timeout=30)
    timeout = 5.0

    def put(index: int) -> Any:
        waited: List[bool] = []

        def progress(done: int, total: int) -> None:
            if done > 0 and not waited:
                waited.append(True)
                sending.wait()  # the last of them freezes the server

        return ex.put(io.BytesIO(bytes(256 << 20)), os.path.join(shared_dir, f"up{index}"),
                      timeout=timeout, progress=progress)

    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true", timeout=30)
            begun = time.monotonic()
            puts = [call_in_thread(functools.partial(put, index)) for index in range(count)]
            _all_end(puts, begun + timeout + WRITE_GRACE + CLEANUP_GRACE + 10)
            assert frozen, "the server was never frozen"
            errors = [call.get("error") for call in puts]
            assert all(isinstance(error, TransferTimeout) for error in errors), errors
            _thaw(frozen)
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
    finally:
        _thaw(frozen)


@pytest.mark.hang_timeout(240)
def test_a_server_that_drains_slowly_keeps_its_connection_past_a_writes_deadline(
        make_sshd: Any, monkeypatch: Any, shared_dir: str) -> None:
    """The server runs for moments between freezes shorter than `WRITE_GRACE` (SIGSTOP,
    SIGCONT): the writes of commands whose stdin outruns their ``timeout`` block past it,
    yet bytes keep going out, so the connection stays, and a command running on it
    beside them ends normally, run once."""
    server = make_sshd(max_sessions=12)
    marker = os.path.join(shared_dir, "started")
    frozen: List[int] = []
    stop = threading.Event()
    timeout = 3.0
    toggler = None
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true", timeout=30)
            first = _transport(ex)
            other = call_in_thread(lambda: ex.run_command(
                f"test -e {marker} && echo second && exit 0; touch {marker}; sleep 8; "
                "echo first", timeout=60))
            wait_for(lambda: os.path.exists(marker), "the other command to start")
            writers = frozen_with_writes_blocked(ex, server, monkeypatch, 9, timeout, frozen)
            pids = list(frozen)

            def toggle() -> None:
                # Stopped 1 s, running 0.1 s: no pause reaches the grace.
                for _ in range(200):  # bounded: about 4 minutes
                    if stop.wait(1.0):
                        break
                    _send_signal(pids, signal.SIGCONT)
                    time.sleep(0.1)
                    if stop.is_set():
                        break
                    _send_signal(pids, signal.SIGSTOP)
                _send_signal(pids, signal.SIGCONT)

            toggler = threading.Thread(target=toggle, daemon=True)
            toggler.start()
            _all_end(writers + [other], time.monotonic() + 120)
            errors = [call.get("error") for call in writers]
            assert all(isinstance(error, CommandTimeout) for error in errors), errors
            assert other.get("result") is not None, other
            assert other["result"].stdout == "first\n"
            assert first.is_active()
            assert _transport(ex) is first
    finally:
        stop.set()
        if toggler is not None:
            toggler.join(10)
        _thaw(frozen)


@pytest.mark.hang_timeout(240)
def test_the_keepalive_finds_a_frozen_sshd_dead_while_its_own_send_would_block(
        make_sshd: Any, monkeypatch: Any) -> None:
    """Commands without a timeout fill the socket of a frozen server: their writes are
    paramiko's (no deadline), and the keepalive's request cannot go out either. The
    keepalive still counts its requests unanswered and closes the connection after
    ``keepalive_count_max`` of them; the commands fail (no retries), and the executor
    connects anew."""
    server = make_sshd(max_sessions=12)
    frozen: List[int] = []
    try:
        with SSHExecutor(**server.executor_parameters(
                keepalive_interval=0.5, keepalive_count_max=3, on_disconnect_retry=0)) as ex:
            ex.run_command("true", timeout=30)
            first = _transport(ex)
            writers = frozen_with_writes_blocked(ex, server, monkeypatch, 9, None, frozen)
            frozen_at = time.monotonic()
            wait_for(lambda: not first.is_active(), "the keepalive to give up", 20)
            assert time.monotonic() - frozen_at >= 1.0  # three unanswered, not at once
            _all_end(writers, frozen_at + 30)
            errors = [call.get("error") for call in writers]
            assert all(isinstance(error, ExecutorFailure) for error in errors), errors
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
            assert _transport(ex) is not first
    finally:
        _thaw(frozen)


def test_only_a_calls_own_deadline_bounds_its_writes(sshd: Any, monkeypatch: Any) -> None:
    """The busy-wait slices of a send (`BUSY_SEND_WAIT`: a command's CLOSE, its TERM, the
    spare channel's OPEN after an exec) are no deadline: a write bounded by one would
    lose the connection, and re-run every other command on it, to a server that
    stalls a few seconds. Every write a call's thread makes is bounded by that call's
    deadline, or by nothing without one."""
    seen: List[Any] = []
    original = DeadlineWrites.__call__

    def recording(self: DeadlineWrites, out: bytes) -> None:
        if threading.current_thread() is threading.main_thread():
            seen.append(self.end)
        original(self, out)
    monkeypatch.setattr(DeadlineWrites, "__call__", recording)

    def fails(stream: str, line: str) -> None:
        raise ValueError("the caller's")

    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")  # connected, the spare made
        seen.clear()
        for _ in range(3):
            ex.run_command("cat", stdin_input="x")
        with pytest.raises(ValueError):  # ended with a TERM and a CLOSE
            ex.run_command("echo a; sleep 30", on_output=fails)
        ex.put(io.BytesIO(b"data"), "/tmp/pe-write-deadline-none")
        assert seen and all(end is None for end in seen), seen
        seen.clear()
        started = time.monotonic()
        for _ in range(3):
            ex.run_command("cat", stdin_input="x", timeout=60)
        with pytest.raises(ValueError):
            ex.run_command("echo a; sleep 30", on_output=fails, timeout=60)
        bounded = [end for end in seen if end is not None]
        # Each bounded by its call's end (60 s on), never by a slice's (a moment on).
        assert bounded and all(end > started + 50 for end in bounded), seen
        ex.run_command("rm -f /tmp/pe-write-deadline-none")
