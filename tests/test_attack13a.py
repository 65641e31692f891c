"""Attacks on the bounded packet writes (`internals.DeadlineWrites`) against a real sshd:
counters and slots after an abandon, the executor closed during a blocked write, and
a server that is slow but alive (SIGSTOP/SIGCONT duty cycles)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import threading
import time
from typing import Any, Dict, List, Optional

import pytest
from helpers import call_in_thread, thread_stacks, wait_for
from test_attack11b import frozen_with_writes_blocked
from test_review11 import _thaw
from test_ssh_config_sshd import host_block, known_hosts

from paramiko_executor import CommandTimeout, ExecutorFailure, SSHExecutor


def _all_end(calls: List[Dict[str, Any]], by: float) -> None:
    threads = [call["thread"] for call in calls]
    for thread in threads:
        thread.join(max(0.0, by - time.monotonic()))
    stuck = [thread for thread in threads if thread.is_alive()]
    assert not stuck, f"{len(stuck)} call(s) still ran:\n{thread_stacks(stuck)}"


@pytest.mark.hang_timeout(240)
def test_the_counters_and_slots_after_an_abandoned_write_add_up(
        make_sshd: Any, monkeypatch: Any, shared_dir: str) -> None:
    """Nine writers time out on a frozen server (one write abandoned, the connection
    lost), one command without timeout fails over: after the thaw, every call is counted
    once as started and once as ended, one re-send, one reconnect, no slot held."""
    server = make_sshd(max_sessions=12)
    marker = os.path.join(shared_dir, "started")
    frozen: List[int] = []
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true", timeout=30)
            other = call_in_thread(lambda: ex.run_command(
                f"test -e {marker} && echo second && exit 0; touch {marker}; sleep 120"))
            wait_for(lambda: os.path.exists(marker), "the other command to start")
            writers = frozen_with_writes_blocked(ex, server, monkeypatch, 9, 4.0, frozen)
            _all_end(writers + [other], time.monotonic() + 40)
            _thaw(frozen)
            assert all(isinstance(w.get("error"), CommandTimeout) for w in writers), writers
            assert other["result"].stdout == "second\n"
            # The spare session (warm) is the one slot still held.
            wait_for(lambda: ex.statistics().open_channels <= 1, "the slots back", timeout=30,
                     explain=lambda: repr(ex.statistics()))
            stats = ex.statistics()
            assert stats.commands_started == 11, stats
            assert stats.commands_succeeded == 2 and stats.commands_failed == 9, stats
            assert stats.commands_retried == 1 and stats.reconnects == 1, stats
            # Each writer's stdin counts as far as it went out: about a window (2 MiB)
            # on the frozen server, not its 64 MiB.
            assert stats.bytes_sent < 9 * (4 << 20), stats
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
    finally:
        _thaw(frozen)


@pytest.mark.hang_timeout(240)
def test_close_during_writes_without_deadline_on_a_frozen_server_ends_them(
        make_sshd: Any, monkeypatch: Any) -> None:
    """Writes without a deadline block on a frozen server (paramiko's, unbounded):
    ``close()`` of the executor still returns promptly and every call ends."""
    server = make_sshd(max_sessions=10)
    frozen: List[int] = []
    try:
        ex = SSHExecutor(**server.executor_parameters())
        try:
            ex.run_command("true", timeout=30)
            writers = frozen_with_writes_blocked(ex, server, monkeypatch, 3, None, frozen)
            time.sleep(1.0)  # the writes are blocked by now (the socket is full)
            started = time.monotonic()
            closing = call_in_thread(ex.close)
            _all_end([closing], started + 15)
            assert time.monotonic() - started < 15
            _all_end(writers, started + 15)
            assert all(isinstance(w.get("error"), ExecutorFailure) for w in writers), writers
        finally:
            _thaw(frozen)
            ex.close()
    finally:
        _thaw(frozen)


@pytest.mark.hang_timeout(300)
def test_a_server_stopped_1_5_s_of_every_1_6_s_loses_no_connection(make_sshd: Any) -> None:
    """sshd stopped 1.5 s, running 0.1 s, over and over: uploads of stdin without timeout
    and with a generous one all succeed on the first connection (none of their writes
    is abandoned), and the commands without stdin too."""
    server = make_sshd(max_sessions=10)
    stop = threading.Event()
    stopped: List[int] = []
    cycles: List[int] = []

    def duty() -> None:
        for _ in range(200):  # bounded: 320 s at most
            if stop.is_set():
                return
            pids = server.serving_pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
                except ProcessLookupError:
                    pass
            cycles.append(len(pids))
            stop.wait(1.5)
            _thaw(stopped)
            time.sleep(0.1)

    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true", timeout=30)
            cycler = threading.Thread(target=duty, daemon=True)
            cycler.start()
            timeouts: List[Optional[float]] = [None, None, 200.0, 200.0]
            calls = [call_in_thread(functools.partial(
                ex.run_command, "wc -c", stdin_input=bytes(64 << 20), timeout=t))
                for t in timeouts]
            calls += [call_in_thread(lambda: ex.run_command("sleep 3; echo done", timeout=120))]
            _all_end(calls, time.monotonic() + 240)
            stop.set()
            cycler.join(10)
            _thaw(stopped)
            errors = [c.get("error") for c in calls if c.get("error") is not None]
            assert not errors, errors
            assert [c["result"].stdout.strip() for c in calls[:4]] == [str(64 << 20)] * 4
            stats = ex.statistics()
            assert len(cycles) >= 3 and min(cycles) >= 1, cycles
            assert stats.reconnects == 0 and stats.commands_retried == 0, stats
    finally:
        stop.set()
        _thaw(stopped)


@pytest.mark.hang_timeout(240)
@pytest.mark.parametrize("frozen_side", ["target", "jump"])
def test_writes_through_a_jump_host_end_near_their_timeout_when_a_side_is_frozen(
        make_sshd: Any, monkeypatch: Any, tmp_path: Any, frozen_side: str) -> None:
    """ProxyJump: the inner transport's writes go to a channel of the jump host's
    connection, which has no socket to poll. Frozen target or frozen jump host: the
    commands whose stdin blocks still end near their timeout, and after the thaw
    the executor runs commands again."""
    jump = make_sshd(max_sessions=10)
    target = make_sshd(max_sessions=10)
    known = known_hosts(tmp_path, jump, target)
    config = tmp_path / "config"
    config.write_text(host_block("target", target, known, "    ProxyJump jump\n")
                      + host_block("jump", jump, known))
    frozen: List[int] = []
    timeout = 4.0
    try:
        with SSHExecutor(host="target", config=str(config)) as ex:
            ex.run_command("true", timeout=30)
            writers = frozen_with_writes_blocked(
                ex, target if frozen_side == "target" else jump, monkeypatch, 3, timeout,
                frozen)
            _all_end(writers, time.monotonic() + timeout + 15)
            errors = [w.get("error") for w in writers]
            _thaw(frozen)
            assert all(isinstance(e, CommandTimeout) for e in errors), errors
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
    finally:
        _thaw(frozen)


@pytest.mark.hang_timeout(120)
def test_a_timed_out_command_counts_only_the_stdin_that_went_out(sshd: Any) -> None:
    """``sleep`` reads no stdin: sshd takes one window (2 MiB) of the 64 MiB and the
    command times out; the statistics said all 64 MiB were sent (and the same after a
    write abandoned on a frozen server: 9 x 64 MiB)."""
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        with pytest.raises(CommandTimeout):
            ex.run_command("sleep 5", stdin_input=bytes(64 << 20), timeout=2)
        assert ex.statistics().bytes_sent < 16 << 20, ex.statistics()


class _PartialThenInterrupt:
    """A transport's socket whose next armed send takes half of the bytes, and the
    send after it raises KeyboardInterrupt: a Ctrl-C landing just after a partial send
    (as on a nearly full socket), in the thread of ``owner`` only."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.owner: Optional[threading.Thread] = None
        self.fired: List[str] = []

    def send(self, data: bytes) -> int:
        if self.owner is threading.current_thread() and len(self.fired) < 2:
            if not self.fired:
                self.fired.append("partial")
                return int(self._sock.send(data[:len(data) // 2]))
            self.fired.append("interrupt")
            raise KeyboardInterrupt
        return int(self._sock.send(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.hang_timeout(180)
def test_a_ctrl_c_after_part_of_a_packet_went_out_costs_no_other_command(
        make_sshd: Any, shared_dir: str) -> None:
    """A Ctrl-C lands in `DeadlineWrites` just after a partial send of a command's
    stdin: half a packet is out. Another thread's command (no timeout) on the same
    connection must neither be lost nor re-run: a caller's exception costs no other
    thread's command."""
    server = make_sshd(max_sessions=10)
    marker = os.path.join(shared_dir, "started")
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true", timeout=30)
        link = ex._connection.link
        assert link is not None
        writes: Any = link.transport.packetizer.write_all
        proxy = _PartialThenInterrupt(writes._sock)
        writes._sock = proxy
        other = call_in_thread(lambda: ex.run_command(
            f"test -e {marker} && echo again && exit 0; touch {marker}; sleep 4; echo once"))
        wait_for(lambda: os.path.exists(marker), "the other command to start")

        def interrupted() -> Any:
            proxy.owner = threading.current_thread()
            return ex.run_command("cat >/dev/null", stdin_input=bytes(1 << 20), timeout=60)

        call = call_in_thread(interrupted)
        _all_end([call, other], time.monotonic() + 60)
        assert proxy.fired == ["partial", "interrupt"], proxy.fired
        assert isinstance(call.get("error"), KeyboardInterrupt), call
        assert other.get("result") is not None, other
        assert other["result"].stdout == "once\n", other["result"]
        assert ex.statistics().commands_retried == 0, ex.statistics()


class _InterruptFirst:
    """A socket whose first send raises KeyboardInterrupt before taking any byte."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.calls = 0

    def send(self, data: bytes) -> int:
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt
        return int(self._sock.send(data))


def test_a_ctrl_c_before_a_packets_first_byte_still_sends_the_whole_packet() -> None:
    """paramiko counts the packet (sequence number, cipher) before its write: a Ctrl-C
    at the write's start leaves the stream whole only if the packet still goes out."""
    from paramiko.packet import Packetizer

    from paramiko_executor.internals import DeadlineWrites
    ours, theirs = socket.socketpair()
    try:
        ours.settimeout(0.1)
        fake = _InterruptFirst(ours)
        writes = DeadlineWrites(Packetizer(ours), fake)
        writes.end = time.monotonic() + 5
        with pytest.raises(KeyboardInterrupt):
            writes(b"x" * 1000)
        theirs.settimeout(5)
        got = b""
        while len(got) < 1000:
            got += theirs.recv(4096)
        assert got == b"x" * 1000
    finally:
        ours.close()
        theirs.close()


def test_a_ctrl_c_whose_packet_cannot_be_finished_closes_the_connection(
        monkeypatch: Any) -> None:
    """The peer takes nothing more: the rest of the interrupted packet is given up as
    the write itself would be, and the connection closed, so nothing follows half a
    packet; the Ctrl-C still reaches the caller."""
    from paramiko.packet import Packetizer

    from paramiko_executor import internals
    from paramiko_executor.internals import DeadlineWrites
    monkeypatch.setattr(internals, "WRITE_GRACE", 0.3)
    ours, theirs = socket.socketpair()
    try:
        ours.settimeout(0.1)
        packetizer = Packetizer(ours)
        writes = DeadlineWrites(packetizer, _InterruptFirst(ours))
        writes.end = time.monotonic()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            writes(bytes(64 << 20))  # more than the socket pair's buffers take; unread
        assert time.monotonic() - started < 5
        assert packetizer.closed
    finally:
        ours.close()
        theirs.close()


@pytest.mark.hang_timeout(180)
def test_the_background_kill_of_a_timed_out_command_costs_no_other_command(
        make_sshd: Any, monkeypatch: Any, shared_dir: str) -> None:
    """A timed-out command ignores TERM; its caller returned long ago when the KILL goes
    out from the background, KILL_GRACE later. The server stalls then (frozen 2.5 s;
    the socket was left full by earlier writes): the KILL's write, bounded by the
    command's long-past deadline, is given up, and the connection with it: another
    thread's command without timeout is re-run on a new connection."""
    from paramiko_executor import channel as channel_module
    from paramiko_executor.waits import writable_within
    monkeypatch.setattr(channel_module, "KILL_GRACE", 3.0)
    server = make_sshd(max_sessions=10)
    marker = os.path.join(shared_dir, "started")
    frozen: List[int] = []
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true", timeout=30)
            link = ex._connection.link
            assert link is not None
            transport = link.transport
            sock: Any = transport.sock
            other = call_in_thread(lambda: ex.run_command(
                f"test -e {marker} && echo again && exit 0; touch {marker}; sleep 10; "
                "echo once"))
            wait_for(lambda: os.path.exists(marker), "the other command to start")
            termed_at = time.monotonic()
            with pytest.raises(CommandTimeout):
                ex.run_command("trap '' TERM; sleep 30", timeout=1)
            frozen.extend(server.serving_pids())
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            # Leave the socket without room (each IGNORE goes out whole: no writer waits).
            # (The kernel grows the send buffer for a while: room is judged over 1 s.)
            for _ in range(4000):
                if not writable_within(sock, 1.0):
                    break
                transport.send_ignore(32 << 10)
            assert not writable_within(sock, 1.0)
            # The KILL goes out KILL_GRACE after the TERM; the server stalls past the grace.
            time.sleep(max(0.0, termed_at + 1 + 3.0 + 2.5 - time.monotonic()))
            _thaw(frozen)
            _all_end([other], time.monotonic() + 60)
            assert other.get("result") is not None, other
            assert other["result"].stdout == "once\n", other["result"]
            assert ex.statistics().commands_retried == 0, ex.statistics()
    finally:
        _thaw(frozen)


@pytest.mark.hang_timeout(180)
def test_a_forwarded_sockets_sendall_with_a_timeout_ends_on_a_frozen_server(
        make_sshd: Any) -> None:
    """``open_connection`` to a listener that reads nothing, sshd then frozen: a
    ``sendall`` of 64 MiB with ``settimeout(2)`` ends with a ``TimeoutError`` near its
    timeout (its own writes are bounded by it), and the executor works after the thaw."""
    server = make_sshd(max_sessions=10)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    frozen: List[int] = []
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true", timeout=30)
            forwarded = ex.open_connection("127.0.0.1", listener.getsockname()[1], timeout=10)
            accepted, _ = listener.accept()
            try:
                frozen.extend(server.serving_pids())
                for pid in frozen:
                    os.kill(pid, signal.SIGSTOP)
                forwarded.settimeout(2)
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    forwarded.sendall(bytes(64 << 20))
                took = time.monotonic() - started
                assert took < 2 + 2 + 3, took
            finally:
                accepted.close()
                forwarded.close()
            _thaw(frozen)
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
    finally:
        _thaw(frozen)
        listener.close()
