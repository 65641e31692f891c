"""Attacks on a call's ``timeout`` bounding the wait for the connection (`Connection.get`
with a deadline: the connect runs in a thread of its own and goes on for the other waiters).

Against a real sshd (stopped, then started again) and the project's test server (frozen,
TOTP). Each test states the contract it holds the code to; a strict xfail marks a bug
reproduced here, with its reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from helpers import (
    SLOW_RETRIES,
    at_line,
    call_in_thread,
    outcome_within,
    reap,
    run_threads,
    wait_for,
)

from paramiko_executor import (
    CommandTimeout,
    ForwardTimeout,
    SSHExecutor,
    TransferTimeout,
)

#: Short pauses between retries, so a restarted server is found again quickly.
QUICK_RETRIES: Dict[str, Any] = {"connect_retries": 20, "connect_backoff": 0.2}

#: The name of the thread a bounded caller's connect runs in (`Connection._lead_elsewhere`).
CONNECT_THREAD = "paramiko_executor connect"

TIMEOUTS = (0.001, 0.01, 0.05, 0.2, 0.5, 1.0, 2.0)


def connect_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(CONNECT_THREAD)]


def threads_back_to(baseline: int, timeout: float = 15.0) -> None:
    wait_for(lambda: threading.active_count() <= baseline,
             f"the threads to go back to {baseline} (now {threading.active_count()}: "
             f"{sorted(t.name for t in threading.enumerate())})", timeout=timeout)


def reserve_all(ex: SSHExecutor, limit: int) -> None:
    """Hold ``limit`` slots at once through ``bounded_connection`` (fails if one leaked)."""
    def hold() -> None:
        with contextlib.ExitStack() as stack:
            for _ in range(limit):
                assert stack.enter_context(ex.bounded_connection).is_active()
    outcome = outcome_within(30, hold)
    assert "error" not in outcome, outcome


# --- hundreds of callers while the server is down, then back ----------------------------


@pytest.mark.hang_timeout(240)
def test_a_storm_of_bounded_and_unbounded_callers_shares_one_connect(
        make_sshd: Any, shared_dir: str) -> None:
    """300 threads: commands, transfers, reservations and forwards, with tiny timeouts and
    none, while sshd is down; it comes back. Every unbounded caller gets the one connect's
    outcome, every bounded one its result or its timeout; nothing leaks."""
    server = make_sshd(max_sessions=10)
    baseline = threading.active_count()
    ex = SSHExecutor(**QUICK_RETRIES, max_forwarded=8, **server.executor_parameters())
    source = os.path.join(shared_dir, "source")
    try:
        assert ex.run_command(f"echo data > {source}").stdout == ""
        state = ex.state
        assert state is not None
        server.stop()
        wait_for(lambda: not state.transport.is_active(), "the connection to end")

        count = 300
        barrier = threading.Barrier(count + 1)
        outcomes: Dict[int, Tuple[str, Any]] = {}

        def call(i: int) -> Any:
            kind, timeout = i % 8, TIMEOUTS[i % len(TIMEOUTS)]
            if kind == 0:
                return ex.run_command(f"echo {i}", timeout=timeout)
            if kind == 1:
                return ex.run_command(f"echo {i}")
            if kind == 2:
                return ex.put(io.BytesIO(b"%d" % i), os.path.join(shared_dir, f"t{i}"),
                              timeout=timeout)
            if kind == 3:
                return ex.put(io.BytesIO(b"%d" % i), os.path.join(shared_dir, f"u{i}"))
            if kind == 4:
                sink = io.BytesIO()
                ex.get(source, sink)
                return sink.getvalue()
            if kind == 5:
                with ex.bounded_connection as transport:
                    return transport.is_active()
            with ex.open_connection("127.0.0.1", server.port,
                                    timeout=timeout if kind == 6 else None) as sock:
                return sock.recv(8)

        def worker(i: int) -> None:
            try:
                barrier.wait(30)
                outcomes[i] = ("result", call(i))
            except BaseException as exc:  # handed to the test
                outcomes[i] = ("error", exc)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(count)]
        for thread in threads:
            thread.start()
        barrier.wait(30)
        # Every bounded caller has given up (the largest timeout is 2 s) before sshd is back.
        time.sleep(2.5)
        server.start()
        end = time.monotonic() + 120
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))
        assert not any(thread.is_alive() for thread in threads), "callers still waiting"

        timed_out = 0
        for i in range(count):
            kind = i % 8
            what, value = outcomes[i]
            if kind in (0, 2, 6):  # bounded: its result, or its own timeout
                if what == "error":
                    assert isinstance(value, (CommandTimeout, TransferTimeout, ForwardTimeout)), \
                        (i, value)
                    timed_out += kind != 6
                    continue
            assert what == "result", (i, kind, value)
            expected = {0: f"{i}\n", 1: f"{i}\n", 2: len(str(i)), 3: len(str(i)),
                        4: b"data\n", 5: True, 6: b"SSH-2.0-", 7: b"SSH-2.0-"}
            got = value.stdout if kind in (0, 1) else value
            assert got == expected[kind], (i, kind, value)
        assert timed_out > 0  # the storm did hit the down server

        stats = ex.statistics()
        # The first connect, and exactly one more that every waiter shared.
        assert stats.connects == 2 and stats.reconnects == 1, stats
        calls = sum(1 for i in range(count) if i % 8 in (0, 1, 2, 3, 4))
        assert stats.commands_started == calls + 1, stats
        assert stats.commands_started == stats.commands_succeeded + stats.commands_failed, stats
        assert stats.commands_failed == timed_out, stats
        assert stats.waiting == 0, stats
        reserve_all(ex, 10)
        # No place under max_forwarded leaked either: all 8 at once.
        with contextlib.ExitStack() as stack:
            for _ in range(8):
                sock = stack.enter_context(ex.open_connection("127.0.0.1", server.port,
                                                              timeout=10))
                assert sock.recv(8) == b"SSH-2.0-"
    finally:
        ex.close()
    assert not connect_threads()
    threads_back_to(baseline)


# --- an interrupt (KeyboardInterrupt-like) in the waiting caller, at every line ----------


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt (a BaseException a caller's thread may get at any line)."""


def _get_lines() -> List[Tuple[int, str, str]]:
    """The lines of `Connection.get` a first caller runs, ``(number, text, mode)``: mode
    "bounded" (a timeout) or "unbounded", numbered as the tracer sees them (the sweep
    follows the code)."""
    import inspect

    from paramiko_executor.connection import Connection

    source, first = inspect.getsourcelines(Connection.get)
    start = next(n for n, text in enumerate(source) if text.strip().startswith("with self.lock"))
    # Not run by a first caller (nothing connected, no connect in flight).
    never = ("return link", "self._discard_locked(link)", "attempt.join(deadline)",
             "attempt.done.wait()", "err = attempt.error", "raise type(err)",
             "assert attempt.link", "return attempt.link", "if attempt.error")
    # Run only by a caller with a deadline, or after the outcome (which one without waits for).
    bounded_only = ("if not attempt.done.is_set()", "raise GaveUp", "self._leave(")
    swept: List[Tuple[int, str, str]] = []
    branch = ""  # which caller runs the lines of the branch on deadline and stop
    branch_indent = 0
    for n in range(start, len(source)):
        raw = source[n]
        text, indent = raw.strip(), len(raw) - len(raw.lstrip())
        if not text or text.startswith("#"):
            continue
        if branch and indent <= branch_indent and not text.startswith("else:"):
            branch = ""
        if text.startswith("if deadline is None and stop is None"):
            branch, branch_indent = "unbounded", indent
            swept.append((first + n, text, "bounded"))
            swept.append((first + n, text, "unbounded"))
            continue
        if branch and text.startswith("else:") and indent == branch_indent:
            branch = "bounded"
            continue
        if text.startswith(("else:", "try:", "finally:", "None if")) or text.startswith(never):
            continue
        if text == "assert attempt is not None" and "attempt.join(" in source[n + 1]:
            continue
        for mode in ("bounded", "unbounded"):
            if branch in ("", mode) and (mode == "bounded" or not text.startswith(bounded_only)):
                swept.append((first + n, text, mode))
    return swept


def interrupted_at(line: int, call: Callable[[], Any]) -> Callable[[], Any]:
    """``call``, with `Interrupt` raised in `Connection.get` the first time ``line`` runs."""
    from paramiko_executor.connection import Connection

    def interrupt() -> None:
        raise Interrupt(f"line {line}")

    return at_line(Connection.get.__code__, line, interrupt, call)


GET_LINES = _get_lines()


@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize(("line", "mode"), [
    pytest.param(n, mode, id=f"{mode}-{n}-{text[:28]}") for n, text, mode in GET_LINES])
def test_an_interrupted_caller_leaves_no_connect_behind(make_sshd: Any, line: int,
                                                        mode: str) -> None:
    server = make_sshd(max_sessions=10)
    baseline = threading.active_count()
    server.stop()
    with SSHExecutor(**SLOW_RETRIES, **server.executor_parameters()) as ex:
        timeout = 1.0 if mode == "bounded" else None
        outcome = outcome_within(40, interrupted_at(
            line, lambda: ex.run_command("echo never", timeout=timeout)))
        error = outcome.get("error")
        assert error is not None, outcome
        # Nobody waits any more: the connect ends before its next retry (1 s from now).
        wait_for(lambda: not connect_threads(), "the connect no caller waits for to end", 5)
        server.start()
        # The executor is not wedged by it: a later caller gets a connection.
        later = outcome_within(10, lambda: ex.run_command("echo later"))
        assert later.get("result") is not None, later
        assert later["result"].stdout == "later\n"
    threads_back_to(baseline)


# --- TOTP: a login whose caller timed out ------------------------------------------------


@pytest.fixture
def totp_pair(make_test_server: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[Tuple[Any, SSHExecutor, SSHExecutor]]:
    """A TOTP server and two executors with its secret; the first logged in this time step,
    with at least 8 s of the step left. A private ledger: no other test's logins count."""
    import pyotp

    from paramiko_executor import auth
    from paramiko_executor.totp import TOTPLedger

    monkeypatch.setattr(auth, "TOTP_LEDGER", TOTPLedger(path=str(tmp_path / "ledger")))
    server = make_test_server(totp_secret=pyotp.random_base32())
    parameters = dict(server.executor_parameters(), mfa_config=server.mfa_config(),
                      **SLOW_RETRIES)
    left = 30 - time.time() % 30
    if left < 8:
        time.sleep(left + 0.1)  # into the next step (at most 8 s)
    first, second = SSHExecutor(**parameters), SSHExecutor(**parameters)
    try:
        assert first.run_command("echo first").stdout == "first\n"
        assert server.totp_accepted == 1
        yield server, first, second
    finally:
        second.close()
        first.close()


@pytest.mark.hang_timeout(90)
def test_a_timed_out_totp_login_stops_waiting_for_a_time_step(
        totp_pair: Tuple[Any, SSHExecutor, SSHExecutor]) -> None:
    server, _first, second = totp_pair
    outcome = outcome_within(10, lambda: second.run_command("echo second", timeout=0.5))
    assert isinstance(outcome.get("error"), CommandTimeout), outcome
    # Nobody waits for its connect, which has sent no code yet: it ends now.
    wait_for(lambda: not connect_threads(), "the unwanted TOTP login to end", timeout=3)
    assert server.totp_accepted == 1 and second.statistics().connects == 0
    # Stopped by the executor, not failed by the server.
    assert second.statistics().connect_failures == 0


@pytest.mark.hang_timeout(90)
def test_a_timed_out_totp_login_logs_no_secret(
        totp_pair: Tuple[Any, SSHExecutor, SSHExecutor], caplog: pytest.LogCaptureFixture
        ) -> None:
    import logging

    server, first, second = totp_pair
    secret = server.mfa_config()[0]["totp"]
    with caplog.at_level(logging.DEBUG):
        outcome = outcome_within(10, lambda: second.run_command("echo second", timeout=0.5))
        error = outcome.get("error")
        assert isinstance(error, CommandTimeout), outcome
        # The login left behind waited for the next step (logged) until its caller left.
        wait_for(lambda: any("waiting" in r.getMessage() and "TOTP" in r.getMessage()
                             for r in caplog.records), "the TOTP wait to be logged", 5)
        second.close()
        wait_for(lambda: not connect_threads(), "the TOTP login to end", timeout=5)
        assert first.run_command("echo again").stdout == "again\n"
    texts = [r.getMessage() for r in caplog.records] + [str(error), repr(error),
                                                        repr(second), repr(first)]
    for text in texts:
        assert secret not in text and secret.lower() not in text, text


# --- a HostGroup with half of its hosts down ----------------------------------------------


@pytest.mark.hang_timeout(120)
def test_a_group_with_half_its_hosts_down_is_bounded_by_the_timeout(make_sshd: Any) -> None:
    from paramiko_executor import HostGroup

    server = make_sshd(max_sessions=10)
    up = server.executor_parameters()
    baseline = threading.active_count()
    with contextlib.ExitStack() as stack:
        closed = []
        for _ in range(25):  # bound, never listening: refused at once
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            closed.append(sock.getsockname()[1])
        hosts = []
        for i in range(25):
            hosts.append({"name": f"up{i}", **up})
            hosts.append({"name": f"down{i}", **up, "port": closed[i]})
        workers = 10
        peak: List[int] = []
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.01):
                peak.append(sum(1 for t in threading.enumerate()
                                if t.name.startswith("HostGroup")))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with HostGroup(hosts, max_workers=workers, **SLOW_RETRIES) as group:
            started = time.monotonic()
            outcome = outcome_within(60, lambda: group.run_command("echo hi", timeout=1))
            took = time.monotonic() - started
            done.set()
            watcher.join(5)
            result = outcome.get("result")
            assert result is not None, outcome
            for i in range(25):
                assert result[f"up{i}"].stdout == "hi\n", result[f"up{i}"]
                assert isinstance(result[f"down{i}"], CommandTimeout), result[f"down{i}"]
            # 25 down hosts, 10 workers, 1 s each: three rounds, not minutes of retries.
            assert took < 30, took
            assert 0 < max(peak) <= workers, max(peak)
            # The connects nobody waits for end before their next retry (1 s after a refusal).
            wait_for(lambda: not connect_threads(), "the down hosts' connects to end", 10)
            stats = group.statistics()
            assert all(stats[f"up{i}"].connects == 1 for i in range(25))
            assert all(stats[f"down{i}"].connects == 0 and stats[f"down{i}"].commands_failed == 1
                       for i in range(25))
    threads_back_to(baseline)


# --- deadlines that end as the connect does ------------------------------------------------


@pytest.mark.hang_timeout(240)
def test_deadlines_straddling_the_connects_end_leak_nothing_and_never_lie(
        make_test_server: Any) -> None:
    """Two callers, 1 ms apart, whose timeouts end around the moment the shared connect
    completes: either may run or time out, but a command the server ran is a result (or
    a timeout with what it had), one it never saw is a CommandTimeout with nothing, and
    each round costs one connection, gone after close()."""
    server = make_test_server(max_sessions=10)
    parameters = server.executor_parameters()
    baseline = threading.active_count()
    took = []
    for _ in range(3):  # the first also probes MaxSessions; later connects reuse it
        with SSHExecutor(**parameters) as ex:
            started = time.monotonic()
            ex.run_command("true")
            took.append(time.monotonic() - started)
    connect = sorted(took[1:])[0]
    ran_late = timed_out = succeeded = 0
    for round_ in range(40):
        base = max(0.001, connect + (round_ - 20) * 0.001)
        accepted = server.connections_accepted
        with SSHExecutor(**parameters) as ex:
            barrier = threading.Barrier(2)

            def call(k: int, ex: SSHExecutor = ex, base: float = base, round_: int = round_,
                     barrier: threading.Barrier = barrier) -> Any:
                barrier.wait(10)
                return ex.run_command(f"echo r{round_}c{k}", timeout=base + k * 0.001)

            calls = [call_in_thread(lambda k=k: call(k)) for k in (0, 1)]  # type: ignore[misc]
            for k, outcome in enumerate(calls):
                outcome["thread"].join(30)
                assert not outcome["thread"].is_alive()
                command = f"echo r{round_}c{k}"
                seen = command in server.commands
                if "result" in outcome:
                    assert seen and outcome["result"].stdout == f"r{round_}c{k}\n"
                    succeeded += 1
                    continue
                error = outcome.get("error")
                assert isinstance(error, CommandTimeout), (round_, k, error)
                timed_out += 1
                if seen:
                    ran_late += 1  # sent before its deadline; its end came after it
                else:
                    assert error.exit_code is None and error.stdout == "", error
            stats = ex.statistics()
            assert stats.connects <= 1, stats
            assert stats.commands_started == stats.commands_succeeded + stats.commands_failed
        # One connect shared by both callers, and nothing of it left after close().
        assert server.connections_accepted - accepted <= 1
        wait_for(lambda: server.active_connections == 0, "the connection to end", 10)
        wait_for(lambda: not connect_threads(), "the connect thread to end", 10)
    assert succeeded and timed_out, (succeeded, timed_out, ran_late)
    threads_back_to(baseline)


# --- close() and fork() while a timed-out caller's connect runs on ------------------------


@pytest.mark.hang_timeout(240)
def test_close_at_any_moment_of_an_abandoned_connect_leaks_nothing(
        make_test_server: Any) -> None:
    server = make_test_server(max_sessions=10)
    parameters = server.executor_parameters()
    baseline = threading.active_count()
    with SSHExecutor(**parameters) as ex:  # probes once: later connects skip it
        started = time.monotonic()
        ex.run_command("true")
        connect = time.monotonic() - started
    closed_early = 0
    for step in range(30):
        delay = connect * step / 20  # from at once to past the connect's end
        ex = SSHExecutor(**parameters)
        try:
            outcome = outcome_within(10, lambda ex=ex: ex.run_command(  # type: ignore[misc]
                "echo never", timeout=0.001))
            assert isinstance(outcome.get("error"), CommandTimeout), outcome
            time.sleep(delay)
            ex.close()
            closed_early += ex.statistics().connects == 0
            wait_for(lambda: not connect_threads(), "the connect to end", 10)
            # Whatever it made is gone: closed by close(), or never published after it.
            assert ex.state is None
            wait_for(lambda: server.active_connections == 0, "the connection to end", 10)
            assert ex.statistics().connects <= 1
            # A connect cancelled by close() is never joined: the next caller connects anew.
            assert ex.run_command("echo again", timeout=20).stdout == "again\n"
        finally:
            ex.close()
        wait_for(lambda: server.active_connections == 0, "the connection to end", 10)
    assert closed_early > 0  # some close() did come while the connect was running
    assert "echo never" not in server.commands
    threads_back_to(baseline)


def _child_runs(ex: SSHExecutor, write_end: int) -> None:
    """In a forked child: run a command on ``ex``, report it through the pipe, and exit."""
    status = 1
    try:
        ok = ex.state is None
        result = ex.run_command("echo child", timeout=20)
        ok = ok and result.stdout == "child\n" and ex.statistics().connects == 1
        os.write(write_end, b"ok" if ok else b"bad")
        status = 0 if ok else 1
    except BaseException as exc:  # reported to the parent
        os.write(write_end, repr(exc).encode()[:500])
    finally:
        os._exit(status)


@pytest.mark.hang_timeout(120)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("where", ["backing-off", "mid-handshake"])
def test_a_child_forked_during_an_abandoned_connect_opens_its_own(
        make_sshd: Any, make_test_server: Any, where: str) -> None:
    if where == "backing-off":
        server = make_sshd(max_sessions=10)
        server.stop()
        resume: Callable[[], Any] = server.start
    else:
        server = make_test_server(max_sessions=10)
        server.freeze()  # accepts, then sends nothing: the handshake waits
        resume = server.thaw
    ex = SSHExecutor(**SLOW_RETRIES, **server.executor_parameters())
    try:
        hasty = call_in_thread(lambda: ex.run_command("echo never", timeout=1.5))
        wait_for(lambda: bool(connect_threads()), "the bounded caller's connect to start", 10)
        # A caller without a timeout joins it, and keeps it going once the hasty one is gone.
        patient = call_in_thread(lambda: ex.run_command("echo patient"))
        hasty["thread"].join(10)
        assert isinstance(hasty.get("error"), CommandTimeout), hasty
        assert connect_threads()  # retrying, or in its handshake
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child_runs(ex, write_end)
        os.close(write_end)
        resume()
        status = reap(pid, 60)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        assert report == b"ok" and status == 0, report
        patient["thread"].join(30)
        assert patient.get("result") is not None, patient
        assert patient["result"].stdout == "patient\n"
        assert ex.statistics().connects == 1  # the parent's one connect; the child had its own
        if where == "mid-handshake":
            assert server.connections_accepted == 2
        assert ex.run_command("echo parent", timeout=20).stdout == "parent\n"
    finally:
        ex.close()


# --- a command whose connection is lost, and whose reconnect outlasts its timeout ---------


@pytest.fixture
def running_then_down(make_sshd: Any) -> Iterator[Tuple[Any, SSHExecutor, Dict[str, Any]]]:
    """A command running on sshd (timeout 4 s, one retry allowed), and sshd then stopped."""
    server = make_sshd(max_sessions=10)
    ex = SSHExecutor(**SLOW_RETRIES, on_disconnect_retry=1, **server.executor_parameters())
    try:
        assert ex.run_command("true").exit_code == 0
        outcome = call_in_thread(lambda: ex.run_command("sleep 30", timeout=4))
        wait_for(lambda: ex.statistics().open_channels >= 1, "the command to start")
        time.sleep(0.3)  # the exec request answered: the command runs on the server
        server.stop()
        outcome["thread"].join(15)
        assert not outcome["thread"].is_alive(), "the command outlived its timeout"
        yield server, ex, outcome
    finally:
        ex.close()


@pytest.mark.hang_timeout(90)
def test_a_lost_commands_retry_waits_for_the_reconnect_within_its_timeout(
        running_then_down: Tuple[Any, SSHExecutor, Dict[str, Any]]) -> None:
    _server, ex, outcome = running_then_down
    # Its retry waits for a connect to a server that is down: the timeout ends it.
    error = outcome.get("error")
    assert isinstance(error, CommandTimeout), outcome
    stats = ex.statistics()
    assert stats.commands_started == 2 and stats.commands_failed == 1, stats


@pytest.mark.hang_timeout(90)
def test_a_retry_that_never_reconnected_is_not_counted_as_a_re_send(
        running_then_down: Tuple[Any, SSHExecutor, Dict[str, Any]]) -> None:
    _server, ex, outcome = running_then_down
    assert isinstance(outcome.get("error"), CommandTimeout), outcome
    assert ex.statistics().commands_retried == 0, ex.statistics()


@pytest.mark.hang_timeout(120)
def test_close_during_a_shared_connect_ends_every_waiter(make_sshd: Any) -> None:
    """Bounded and unbounded callers wait for one connect to a down server; close() ends
    them all at once (the unbounded ones hear it was closed), and the executor connects
    again afterwards."""
    from paramiko_executor import ExecutorFailure

    server = make_sshd(max_sessions=10)
    server.stop()
    baseline = threading.active_count()
    ex = SSHExecutor(**SLOW_RETRIES, **server.executor_parameters())
    try:
        callers = [call_in_thread(lambda i=i: ex.run_command(  # type: ignore[misc]
            "echo never", timeout=None if i % 2 else 30.0)) for i in range(60)]
        wait_for(lambda: ex.statistics().connect_failures >= 1, "the connect to be retrying")
        time.sleep(0.2)  # every caller is waiting by now
        ex.close()
        for caller in callers:
            caller["thread"].join(10)
            assert not caller["thread"].is_alive(), "a caller outlived close()"
            error = caller.get("error")
            assert isinstance(error, ExecutorFailure), caller
            assert not isinstance(error, CommandTimeout), caller  # closed, not timed out
        wait_for(lambda: not connect_threads(), "the connect to end", 5)
        stats = ex.statistics()
        assert stats.connects == 0 and stats.commands_failed == 60, stats
        server.start()
        assert ex.run_command("echo back", timeout=30).stdout == "back\n"
    finally:
        ex.close()
    threads_back_to(baseline)


@pytest.mark.hang_timeout(60)
def test_a_bounded_caller_hears_a_refused_login_not_a_timeout(make_sshd: Any,
                                                               tmp_path: Any) -> None:
    """A connect that fails for good (the key is refused) before the deadline is that
    failure for a bounded caller too, at once."""
    import paramiko

    from paramiko_executor import AuthenticationFailure

    server = make_sshd(max_sessions=10)
    stranger = tmp_path / "stranger"
    key = paramiko.ECDSAKey.generate()
    key.write_private_key_file(str(stranger))
    parameters = dict(server.executor_parameters(), client_keys=[str(stranger)],
                      allow_agent=False, look_for_keys=False)
    with SSHExecutor(**SLOW_RETRIES, **parameters) as ex:
        started = time.monotonic()
        outcome = outcome_within(20, lambda: ex.run_command("echo never", timeout=15))
        assert isinstance(outcome.get("error"), AuthenticationFailure), outcome
        assert time.monotonic() - started < 10  # not retried, not waited out
        assert ex.statistics().connect_failures == 1
    wait_for(lambda: not connect_threads(), "the connect to end", 5)


@pytest.mark.hang_timeout(90)
def test_waves_of_bounded_callers_during_a_frozen_handshake_share_one_connection(
        make_test_server: Any) -> None:
    """Callers come and go while the server holds the handshake: they all join the one try
    in flight; thawed, it is the only connection. Frozen past banner_timeout with nobody
    waiting, the try fails and no retry follows."""
    server = make_test_server(max_sessions=10)
    server.freeze()
    ex = SSHExecutor(**SLOW_RETRIES, banner_timeout=3, **server.executor_parameters())
    try:
        for _wave in range(5):
            results, errors = run_threads(
                lambda i: ex.run_command("echo never", timeout=0.05 + 0.01 * i), 20, 20)
            assert not results and len(errors) == 20
            assert all(isinstance(e, CommandTimeout) for e in errors), errors
        server.thaw()
        assert ex.run_command("echo thawed", timeout=20).stdout == "thawed\n"
        assert server.connections_accepted == 1 and ex.statistics().connects == 1
        ex.close()
        # Frozen again, one bounded caller, then nobody: one try (its banner timeout), no retry.
        server.freeze()
        outcome = outcome_within(10, lambda: ex.run_command("echo never", timeout=0.3))
        assert isinstance(outcome.get("error"), CommandTimeout), outcome
        wait_for(lambda: not connect_threads(), "the unwanted connect to end", 15)
        assert ex.statistics().connect_failures == 1, ex.statistics()
    finally:
        server.thaw()
        ex.close()
    assert "echo never" not in server.commands
    # (No thread count here: the test server's side of the frozen connection keeps
    # paramiko's 15 s handshake timer after thaw, a thread of the server's, not ours.)


# --- a HostGroup whose hosts accept TCP and then say nothing -------------------------------


class Silent:
    """Listening sockets that never accept: the kernel completes each TCP connect, and
    nothing ever answers (no banner), as a host whose sshd hangs."""

    def __init__(self, count: int) -> None:
        self.socks = []
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            self.socks.append(sock)
        self.ports = [sock.getsockname()[1] for sock in self.socks]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def silent_group_run(server: Any, workers: int, banner_timeout: Optional[float] = None
                     ) -> Dict[str, Any]:
    """Run a command with timeout=0.3 on 30 silent hosts through ``workers`` threads;
    the peaks of the group's threads and of connect threads meanwhile, and the rest.
    With a ``banner_timeout``, the group stays open until its connects ended by themselves
    (``drained``: how long after the call), and ``tries`` counts their connect attempts."""
    from paramiko_executor import HostGroup

    silent = Silent(30)
    peaks = {"workers": 0, "connects": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.01):
            names = [t.name for t in threading.enumerate()]
            peaks["workers"] = max(peaks["workers"],
                                   sum(1 for n in names if n.startswith("HostGroup")))
            peaks["connects"] = max(peaks["connects"],
                                    sum(1 for n in names if n.startswith(CONNECT_THREAD)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    hosts = [{"name": f"silent{i}", **server.executor_parameters(), "port": port}
             for i, port in enumerate(silent.ports)]
    try:
        options: Dict[str, Any] = ({} if banner_timeout is None
                                   else {"banner_timeout": banner_timeout})
        extra: Dict[str, Any] = {}
        with HostGroup(hosts, max_workers=workers, **options, **SLOW_RETRIES) as group:
            started = time.monotonic()
            outcome = outcome_within(60, lambda: group.run_command("echo hi", timeout=0.3))
            took = time.monotonic() - started
            done.set()
            watcher.join(5)
            left = len(connect_threads())
            if banner_timeout is not None:
                wait_for(lambda: not connect_threads(), "the connects to end", 30)
                extra["drained"] = time.monotonic() - started - took
                extra["tries"] = sum(s.connect_failures for s in group.statistics().values())
        closed = time.monotonic()
        wait_for(lambda: not connect_threads(), "close() to end the connects", 10)
        return dict(outcome, took=took, left=left, ended=time.monotonic() - closed, **peaks,
                    **extra)
    finally:
        done.set()
        silent.close()


@pytest.mark.hang_timeout(120)
def test_a_group_of_silent_hosts_costs_each_its_timeout_and_close_ends_their_connects(
        sshd: Any) -> None:
    run = silent_group_run(sshd, workers=3)
    result = run.get("result")
    assert result is not None, run
    assert all(isinstance(result[f"silent{i}"], CommandTimeout) for i in range(30)), result
    assert run["took"] < 20, run  # 30 hosts, 3 workers, 0.3 s each: about 3 s
    assert 0 < run["workers"] <= 3, run
    assert run["ended"] < 5, run  # close() cuts the handshakes still waiting for a banner


@pytest.mark.hang_timeout(120)
def test_a_group_of_silent_hosts_leaves_one_connect_per_host_that_ends_with_its_try(
        sshd: Any) -> None:
    """The connect a timed-out host leaves behind goes on (a slow login still connects for
    the next call) until its try ends: one per host at most, and no retry for nobody."""
    run = silent_group_run(sshd, workers=3, banner_timeout=2)
    assert 0 < run["connects"] <= 30, run
    assert run["drained"] < 2 + 5, run  # each try ends at its banner_timeout ...
    assert run["tries"] == 30, run  # ... and none is retried: nobody waits for it
