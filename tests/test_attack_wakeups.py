"""Attacks on the coalesced wake-ups: a command's end, the dropped handshake timer, group calls.

Against a real OpenSSH sshd: commands ending at every moment relative to
each other, timeouts, signals, live output, rekeys mid-command, and group
calls over many hosts, each bounded in time so a lost wake-up fails rather
than hangs.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

import paramiko
import pytest
from helpers import wait_for

from paramiko_executor import (
    CommandExecutionFailure,
    CommandResult,
    CommandTimeout,
    ExecutorError,
    ExecutorFailure,
    GroupResult,
    HostGroup,
    SSHExecutor,
    channel,
)
from paramiko_executor.internals import drop_handshake_timer


class _TimerCheckedAcrossTheDrop:
    """paramiko's handshake timer, holding the transport thread inside ``complete_handshake``.

    ``complete_handshake`` reads the timer twice (``if self.__timer:`` then
    ``self.__timer.cancel()``); this one lets another thread run between the
    two reads, as a thread switch there would.
    """

    def __init__(self) -> None:
        self.checking = threading.Event()
        self.dropped = threading.Event()
        self._raced = False

    def __bool__(self) -> bool:
        if not self._raced and sys._getframe(1).f_code.co_name == "complete_handshake":
            self._raced = True
            self.checking.set()
            self.dropped.wait(5)
        return True

    def cancel(self) -> None:
        pass


def _logged_in_transport(server: Any) -> paramiko.Transport:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=10)
    key = paramiko.PKey.from_path(server.client_key_path)
    transport.auth_publickey(server.username, key)
    return transport


def test_dropping_the_handshake_timer_between_paramikos_two_reads_keeps_the_transport(
        sshd: Any) -> None:
    # The drop runs on the caller's thread right after login, while the
    # transport thread handles the server's messages (OpenSSH sends its host
    # keys then): a None between paramiko's check and its cancel() was an
    # AttributeError in the transport thread, which ended the connection.
    transport = _logged_in_transport(sshd)
    try:
        timer = _TimerCheckedAcrossTheDrop()
        transport.packetizer._Packetizer__timer = timer  # type: ignore[attr-defined]
        # Any message the server sends makes the transport thread check the timer.
        transport.global_request("keepalive@openssh.com", wait=False)
        assert timer.checking.wait(10)
        drop_handshake_timer(transport)
        timer.dropped.set()
        channel = transport.open_session(timeout=10)
        channel.exec_command("echo alive")
        channel.settimeout(10)
        assert channel.makefile("rb").read() == b"alive\n"
        assert transport.is_active()
    finally:
        transport.close()


#: (command, stdin, keyword arguments, exit code, stdout, exit signal): ends at
#: every moment relative to each other (EOF before or after the exit status,
#: output before and after, stdin read or not, a signal, a terminal).
_BIG = 300_000
_FED = b"y" * 70_000
_FLOOD = b"z" * 3_000_000
_CASES: List[Any] = [
    ("true", None, {}, 0, "", None),
    ("echo out; exit 3", None, {"check": False}, 3, "out\n", None),
    # Output closed, then the exit status arrives after the EOF.
    ("exec >&- 2>&-; sleep 0.01; exit 5", None, {"check": False}, 5, "", None),
    ("printf tail; exec >&-; exit 0", None, {}, 0, "tail", None),
    (f"head -c {_BIG} /dev/zero | tr '\\0' x", None, {}, 0, "x" * _BIG, None),
    ("cat", _FED, {}, 0, _FED.decode(), None),
    ("exec <&-; echo closed-stdin", _FED, {}, 0, "closed-stdin\n", None),
    ("kill -TERM $$", None, {"check": False}, None, "", "TERM"),
    ("echo a; kill -KILL $$", None, {"check": False}, None, "a\n", "KILL"),
    ("echo pty", None, {"pty": True}, 0, "pty\r\n", None),
    ("echo t; kill -TERM $$", None, {"check": False, "pty": True}, None, "t\r\n", "TERM"),
    # More stdin than sshd's window: the sender waits for window as the command ends.
    ("true", _FLOOD, {}, 0, "", None),
    ("head -c 10 >/dev/null; echo got", _FLOOD, {}, 0, "got\n", None),
]


def _run_case(executor: SSHExecutor, index: int) -> Optional[str]:
    """One case on ``executor``; what went wrong, or None."""
    command, stdin, kwargs, code, stdout, signal_name = _CASES[index % len(_CASES)]
    lines: List[str] = []
    if index % 3 == 0 and not kwargs.get("pty"):
        kwargs = dict(kwargs, on_output=lambda stream, line: lines.append(line))
    result = executor.run_command(command, stdin, timeout=20, **kwargs)
    got = (result.exit_code if signal_name is None else None, result.stdout,
           result.exit_signal)
    if got != (code, stdout, signal_name):
        return f"{command!r}: {got[0]!r} {len(got[1])} chars {got[2]!r}"
    if "on_output" in kwargs and "".join(lines) != stdout:
        return f"{command!r}: on_output saw {len(''.join(lines))} chars"
    return None


def _hammer(executor: SSHExecutor, threads: int, rounds: int) -> List[str]:
    """Every case from ``threads`` threads, ``rounds`` times each: what went wrong.

    On one connection throughout: none lost, none retried, the counters agree.
    """
    futures = _submitted(threads, [lambda i=i: _run_case(executor, i)
                                   for i in range(threads * rounds)])
    errors = [problem for problem in futures if problem is not None]
    stats = executor.statistics()
    if (stats.connects, stats.reconnects, stats.commands_retried) != (1, 0, 0):
        errors.append(f"connection not kept: {stats}")
    ended = stats.commands_succeeded + stats.commands_failed
    if stats.commands_started != threads * rounds or stats.commands_started != ended:
        errors.append(f"counters: {stats}")
    return errors


def test_many_threads_get_every_commands_exact_end(make_sshd: Any) -> None:
    server = make_sshd(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as executor:
        assert _hammer(executor, threads=100, rounds=3) == []


def test_rekeys_mid_command_under_load_lose_no_end(
        make_sshd: Any, caplog: pytest.LogCaptureFixture) -> None:
    # sshd starts a key exchange every 32 KiB: many land inside a command's end.
    server = make_sshd(max_sessions=10, extra_config=["RekeyLimit 32K"])
    caplog.set_level(logging.DEBUG, logger="paramiko")
    with SSHExecutor(**server.executor_parameters()) as executor:
        assert _hammer(executor, threads=40, rounds=2) == []
        assert executor.run_command("echo after").stdout == "after\n"
    # Two switches (in and out) per exchange; the login's is one.
    switches = sum("Switch to new keys" in r.getMessage() for r in caplog.records)
    assert switches >= 8, switches


def test_client_started_rekeys_mid_command_under_load_lose_no_end(
        make_sshd: Any, caplog: pytest.LogCaptureFixture) -> None:
    # paramiko starts the key exchange itself every 32 KiB either way: its
    # own KEXINIT goes out from whichever thread crossed the limit.
    server = make_sshd(max_sessions=10)
    caplog.set_level(logging.DEBUG, logger="paramiko")
    with SSHExecutor(**server.executor_parameters()) as executor:
        with executor.bounded_connection as transport:
            packetizer = transport.packetizer
            packetizer.REKEY_BYTES = 32 * 1024
        assert _hammer(executor, threads=40, rounds=2) == []
        assert executor.run_command("echo after").stdout == "after\n"
    switches = sum("Switch to new keys" in r.getMessage() for r in caplog.records)
    assert switches >= 8, switches


def _bounded_calls(executor: SSHExecutor, calls: List[Any], threads: int,
                   during: Optional[Any] = None) -> List[Any]:
    """Each ``(command, kwargs)`` from a pool; its result or exception, every one within 60 s.

    ``during()`` runs on this thread while they do.
    """
    def one(call: Any) -> Any:
        command, kwargs = call
        try:
            return executor.run_command(command, **kwargs)
        except ExecutorError as exc:
            return exc

    return _submitted(threads, [lambda call=call: one(call) for call in calls], during)


def _submitted(threads: int, bodies: List[Any], during: Optional[Any] = None) -> List[Any]:
    """Each body's result, run on ``threads`` threads; a call still running 60 s on fails.

    On a failure the pool is not waited for: the test fails, not hangs.
    """
    pool = ThreadPoolExecutor(threads)
    try:
        futures = [pool.submit(body) for body in bodies]
        if during is not None:
            during()
        results = [future.result(timeout=60) for future in futures]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def test_timeouts_firing_as_commands_end_return_one_or_the_other(make_sshd: Any) -> None:
    # The deadline and the command's end land within a millisecond or two of
    # each other, on either side: each call is the result or the timeout.
    server = make_sshd(max_sessions=10)
    # A command's round trip here is a few to some tens of milliseconds: the
    # deadlines, 1 ms apart, straddle it.
    calls = [("echo done", {"timeout": 0.001 * i}) for i in range(1, 121)]
    with SSHExecutor(**server.executor_parameters()) as executor:
        outcomes = _bounded_calls(executor, calls, threads=20)
        for outcome in outcomes:
            if isinstance(outcome, CommandTimeout):
                assert outcome.exit_code is None and outcome.stdout in ("", "done\n")
            else:
                assert isinstance(outcome, CommandResult), outcome
                assert (outcome.exit_code, outcome.stdout) == (0, "done\n")
        timed_out = sum(isinstance(outcome, CommandTimeout) for outcome in outcomes)
        assert 0 < timed_out < len(calls)  # both sides of the race were met
        assert executor.run_command("echo after", timeout=30).stdout == "after\n"
        stats = executor.statistics()
    assert stats.commands_started == 121
    assert stats.commands_started == stats.commands_succeeded + stats.commands_failed
    assert (stats.reconnects, stats.commands_retried) == (0, 0)


@pytest.mark.parametrize("delay", [0.0, 0.003, 0.02, 0.1])
def test_close_while_commands_end_returns_every_call(make_sshd: Any, delay: float) -> None:
    server = make_sshd(max_sessions=10)
    calls = [(command, {"check": False}) for command in
             ("true", "echo x", "exec >&-; sleep 0.01", "sleep 0.05; echo y",
              "head -c 100000 /dev/zero")] * 12
    executor = SSHExecutor(**server.executor_parameters())
    executor.run_command("true")  # connected: the close meets commands, not the login
    closed = threading.Event()

    def close() -> None:
        closed.wait(delay)
        executor.close()

    outcomes = _bounded_calls(executor, calls, threads=60, during=close)
    for outcome in outcomes:
        assert isinstance(outcome, (CommandResult, ExecutorFailure)), outcome
    stats = executor.statistics()
    assert stats.commands_started == stats.commands_succeeded + stats.commands_failed


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.03])
def test_the_connection_dropped_while_commands_end_returns_every_call(
        make_sshd: Any, delay: float) -> None:
    server = make_sshd(max_sessions=10)
    calls = [(command, {"check": False, "timeout": 30}) for command in
             ("true", "echo x", "exec >&-; sleep 0.01", "sleep 0.05; echo y",
              "head -c 100000 /dev/zero")] * 12
    with SSHExecutor(**server.executor_parameters(), on_disconnect_retry=1) as executor:
        executor.run_command("true")
        pids = server.serving_pids()
        assert len(pids) == 1
        waited = threading.Event()

        def drop() -> None:
            waited.wait(delay)
            os.kill(pids[0], signal.SIGKILL)

        outcomes = _bounded_calls(executor, calls, threads=60, during=drop)
        for outcome in outcomes:
            assert isinstance(outcome, (CommandResult, ExecutorFailure)), outcome
        assert executor.run_command("echo after", timeout=30).stdout == "after\n"
        stats = executor.statistics()
    assert stats.commands_started == 62
    assert stats.commands_started == stats.commands_succeeded + stats.commands_failed


# --- HostGroup -----------------------------------------------------------------------

_GROUP_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
WAIT = 60.0  # seconds a group call may take before it counts as a hang


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _in_thread(body: Any) -> Any:
    """``body()`` on another thread, its result or exception; a hang fails the test."""
    box: List[Any] = []

    def run() -> None:
        try:
            box.append(body())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "the group call hung"
    return box[0]


def test_a_group_of_150_hosts_some_failing_some_timing_out_answers_each_exactly(
        make_sshd: Any) -> None:
    server = make_sshd(max_sessions=10, listen_addresses=_GROUP_ADDRESSES,
                       extra_config=["MaxStartups 300"])
    dead_port = _free_port()  # nothing listens: the connection is refused
    parameters = server.executor_parameters(connect_retries=0)
    del parameters["host"]
    hosts: List[Any] = [{"host": _GROUP_ADDRESSES[i % 4], "name": f"h{i}"} for i in range(150)]
    hosts += [{"host": "127.0.0.1", "port": dead_port, "name": f"dead{i}"} for i in range(10)]
    # Each address its own ending: at once, after output, by timeout, non-zero.
    command = ('case "$SSH_CONNECTION" in *" 127.0.0.2 "*) true;; *" 127.0.0.3 "*) sleep 20;;'
               ' *" 127.0.0.4 "*) echo four; exit 7;; *) echo five;; esac')
    with HostGroup(hosts, max_workers=64, **parameters) as group:
        for _ in range(2):
            result = _in_thread(lambda: group.run_command(command, timeout=3))
            assert isinstance(result, GroupResult), result
            assert list(result) == [h["name"] for h in hosts]
            for i in range(150):
                outcome = result[f"h{i}"]
                kind = i % 4
                if kind == 0:
                    assert isinstance(outcome, CommandResult) and outcome.stdout == ""
                elif kind == 1:
                    assert isinstance(outcome, CommandTimeout), outcome
                elif kind == 2:
                    assert isinstance(outcome, CommandExecutionFailure), outcome
                    assert (outcome.exit_code, outcome.stdout) == (7, "four\n")
                else:
                    assert isinstance(outcome, CommandResult) and outcome.stdout == "five\n"
            for i in range(10):
                assert isinstance(result[f"dead{i}"], ExecutorFailure)
        for name, stats in group.statistics().items():
            assert stats.commands_started == stats.commands_succeeded + stats.commands_failed, name


class _GatedExecutor(SSHExecutor):
    """An executor whose commands wait for the test's gate; ``raise`` raises RuntimeError."""

    gates: Dict[str, threading.Event] = {}
    started: queue.SimpleQueue[str] = queue.SimpleQueue()

    def __init__(self, *, gate: str, **parameters: Any) -> None:
        super().__init__(**parameters)
        self._gate = gate

    def run_command(self, command: str, *args: Any, **kwargs: Any) -> Any:
        self.started.put(self._gate)
        if self._gate == "raise":
            raise RuntimeError("not a host's failure")
        assert self.gates[self._gate].wait(WAIT)
        return super().run_command(command, *args, **kwargs)


def _gated_group(server: Any, names: List[str], **kwargs: Any) -> HostGroup:
    parameters = server.executor_parameters()
    del parameters["host"]
    _GatedExecutor.gates = {name: threading.Event() for name in names}
    _GatedExecutor.started = queue.SimpleQueue()
    hosts = [{"host": "127.0.0.1", "name": name, "gate": name} for name in names]
    return HostGroup(hosts, executor_class=_GatedExecutor, **kwargs, **parameters)


def test_a_host_raising_ends_the_group_call_while_the_others_still_run(sshd: Any) -> None:
    names = [f"slow{i}" for i in range(40)] + ["raise"]
    with _gated_group(sshd, names, max_workers=64) as group:
        raised = _in_thread(lambda: group.run_command("echo hi"))
        assert isinstance(raised, RuntimeError), raised
        assert not any(_GatedExecutor.gates[f"slow{i}"].is_set() for i in range(40))
        for gate in _GatedExecutor.gates.values():
            gate.set()


def test_close_leaves_no_connection_opened_by_a_host_it_interrupted(make_sshd: Any) -> None:
    """Hosts between their start and their connect when close() ran leave nothing open."""
    server = make_sshd(max_sessions=10)
    names = [f"late{i}" for i in range(8)] + ["raise"]
    group = _gated_group(server, names, max_workers=16)
    raised = _in_thread(lambda: group.run_command("echo hi"))
    assert isinstance(raised, RuntimeError), raised
    started = {_GatedExecutor.started.get(timeout=WAIT) for _ in names}
    assert started == set(names)  # every host is in its call, none connected
    executors: List[Any] = list(group._executors.values())
    epochs = [executor._connection.epoch for executor in executors]
    closing = threading.Thread(target=group.close, daemon=True)
    closing.start()
    # Only once close() has closed every executor (it then waits for the
    # hosts' calls) do the hosts go on, and connect.
    wait_for(lambda: all(e._connection.epoch != epoch for e, epoch in zip(executors, epochs)),
             "close() to close the executors")
    for gate in _GatedExecutor.gates.values():
        gate.set()
    closing.join(WAIT)
    assert not closing.is_alive()
    # One close(), as a `with` block gives: nothing of the group is left open.
    wait_for(lambda: server.serving_pids() == [], "the hosts' connections to end", timeout=10)


def test_as_completed_yields_each_host_as_it_finishes_and_close_ends_the_rest(
        sshd: Any) -> None:
    names = [f"g{i}" for i in range(6)]
    with _gated_group(sshd, names, max_workers=8) as group:
        pairs = group.run_command_as_completed("echo hi", timeout=30)
        seen: List[str] = []
        for name in names[:3]:  # one at a time: each comes out before the next is let go
            _GatedExecutor.gates[name].set()
            got, outcome = _in_thread(lambda: next(pairs))
            assert (got, outcome.stdout) == (name, "hi\n")
            seen.append(got)
        started = {_GatedExecutor.started.get(timeout=WAIT) for _ in names}
        assert started == set(names)  # the rest are waiting at their gates
        # close() waits for the hosts still at their gates; the loop does not.
        closing = threading.Thread(target=group.close, daemon=True)
        closing.start()
        rest = _in_thread(lambda: list(pairs))
        for gate in _GatedExecutor.gates.values():
            gate.set()
        closing.join(WAIT)
        assert not closing.is_alive()
        assert sorted(name for name, _ in rest) == names[3:]
        assert all(isinstance(outcome, ExecutorFailure) for _, outcome in rest)


def test_an_abandoned_as_completed_leaves_the_group_usable(sshd: Any) -> None:
    names = [f"a{i}" for i in range(30)]
    with _gated_group(sshd, names, max_workers=4) as group:
        for gate in _GatedExecutor.gates.values():
            gate.set()
        pairs = group.run_command_as_completed("echo one")
        first = _in_thread(lambda: next(pairs))
        assert first[1].stdout == "one\n"
        pairs.close()  # type: ignore[attr-defined]  # a generator: left early
        again = _in_thread(lambda: group.run_command("echo two"))
        assert [again[name].stdout for name in names] == ["two\n"] * 30


def test_close_ends_a_group_run_command_waiting_for_its_hosts(sshd: Any) -> None:
    names = [f"c{i}" for i in range(50)]
    with _gated_group(sshd, names, max_workers=64) as group:
        for name in names[:10]:
            _GatedExecutor.gates[name].set()
        box: List[Any] = []
        calling = threading.Thread(target=lambda: box.append(group.run_command("echo hi")),
                                   daemon=True)
        calling.start()
        started = {_GatedExecutor.started.get(timeout=WAIT) for _ in names}
        assert started == set(names)
        closing = threading.Thread(target=group.close, daemon=True)
        closing.start()
        calling.join(WAIT)  # returns before the gated hosts are let go
        assert not calling.is_alive()
        for gate in _GatedExecutor.gates.values():
            gate.set()
        closing.join(WAIT)
        assert not closing.is_alive()
    result, = box
    assert all(isinstance(result[name], ExecutorFailure) for name in names[10:])
    finished = [name for name in names[:10] if isinstance(result[name], CommandResult)]
    assert all(result[name].stdout == "hi\n" for name in finished)


def test_no_command_needs_the_liveness_poll_to_see_its_end(
        make_sshd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The poll (once a second) would hide a lost wake-up as a slow command:
    # without it, a lost one is a command timed out, 60 s on.
    monkeypatch.setattr(channel, "LIVENESS_POLL", 600.0)
    server = make_sshd(max_sessions=10, extra_config=["RekeyLimit 64K"])
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # thread switches at many more points of each burst
    try:
        with SSHExecutor(**server.executor_parameters()) as executor:
            assert _hammer(executor, threads=30, rounds=10) == []
    finally:
        sys.setswitchinterval(interval)
