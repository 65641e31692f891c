"""Attacks on two changes: a login waiting in the TOTP ledger for a fresh time step ends once
no caller waits for its connect (`Connection._unwanted` polled by the ledger), and
`LineSplitter` handing a line that never ends to ``on_output`` in pieces of `LINE_PIECE`.

Against the project's paramiko test server with a TOTP secret (it records the time steps
whose codes it accepted), a real OpenSSH sshd, and local shells. Each test states the
contract it holds the code to; a strict xfail marks a bug reproduced here, with its reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pyotp
import pytest
from helpers import SLOW_RETRIES, at_line, call_in_thread, outcome_within, reap, wait_for
from test_attack_connect_deadline import connect_threads

from paramiko_executor import CommandTimeout, ExecutorFailure, ShellExecutor, SSHExecutor

STEP = 30

#: The log line of a login that waits for the next time step (`TOTPLedger._take_turn`).
WAITING = "waiting"


@dataclass
class Totp:
    """A TOTP test server, the parameters of executors that log in to it, and the step in
    which ``first`` logged in (with at least `LEFT` seconds of it left at the time)."""

    server: Any
    parameters: Dict[str, Any]
    first: SSHExecutor
    step: int
    ledger: str

    @property
    def secret(self) -> str:
        return str(self.parameters["mfa_config"][0]["totp"])

    def steps(self) -> Set[int]:
        """The steps whose codes the server accepted."""
        return set(self.server._used_totp.get(self.secret, ()))


#: Seconds of the time step the fixture leaves for a test's own moves before the next.
LEFT = 12.0


def into_a_step_with(left: float) -> None:
    """Return once the current step has at least ``left`` s to go (waits at most ``left`` s)."""
    remaining = STEP - time.time() % STEP
    if remaining < left:
        time.sleep(remaining + 0.1)


@pytest.fixture
def ledger(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
           ) -> Iterator[Tuple[str, List[str]]]:
    """A private TOTP ledger file (no other test's logins count), and the list of secrets
    the test uses: no log record may hold one (logs are captured from DEBUG up)."""
    from paramiko_executor import auth
    from paramiko_executor.totp import TOTPLedger

    path = str(tmp_path / "ledger")
    monkeypatch.setattr(auth, "TOTP_LEDGER", TOTPLedger(path=path))
    caplog.set_level(logging.DEBUG, logger="paramiko_executor")
    secrets: List[str] = []
    yield path, secrets
    for record in caplog.records:
        text = record.getMessage()
        for secret in secrets:
            assert secret not in text and secret.lower() not in text, text


@pytest.fixture
def totp(make_test_server: Any, ledger: Tuple[str, List[str]]) -> Iterator[Totp]:
    """The step's code spent by ``first``: another login must wait for the next step."""
    secret = pyotp.random_base32()
    ledger[1].append(secret)
    server = make_test_server(totp_secret=secret)
    parameters = dict(server.executor_parameters(), mfa_config=server.mfa_config(),
                      **SLOW_RETRIES)
    into_a_step_with(LEFT)
    step = int(time.time() // STEP)
    first = SSHExecutor(**parameters)
    try:
        assert first.run_command("echo first").stdout == "first\n"
        state = Totp(server, parameters, first, step, ledger[0])
        assert state.steps() == {step}
        yield state
    finally:
        first.close()


def waits_logged(caplog: pytest.LogCaptureFixture) -> int:
    return sum(WAITING in r.getMessage() and "TOTP" in r.getMessage() for r in caplog.records)


def login_waiting(caplog: pytest.LogCaptureFixture, before: int = 0) -> None:
    """Return once one more login than ``before`` logged its wait for the next step."""
    wait_for(lambda: waits_logged(caplog) > before, "a login to wait for the next step", 10)


def abandoned(server: Any, connections: int) -> None:
    """Return once the executors' logins have ended: only ``connections`` stay at the server,
    and no connect thread is left (its login can no longer send a code)."""
    wait_for(lambda: not connect_threads() and server.active_connections == connections,
             "the login nobody waits for to end", 3)


# --- bounded callers coming and going while the login waits ------------------------------


#: (timeout, pause before the next caller starts): callers that overlap the one before,
#: come just after it left, or a while after (before and after the ledger's 0.1 s poll).
CHAIN = [(timeout, gap) for timeout in (0.05, 0.1, 0.2, 0.3)
         for gap in (0.0, 0.03, 0.08, 0.12, 0.25, 0.4)]


@pytest.mark.hang_timeout(120)
def test_bounded_callers_coming_and_going_never_lose_the_login_under_them_and_spend_nothing(
        totp: Totp, caplog: pytest.LogCaptureFixture) -> None:
    """24 bounded callers, overlapping or not, while the login waits for the next step: each
    gets its CommandTimeout no earlier than its own timeout (a login abandoned under a
    caller still waiting would end its wait early); once the last left, the login ends
    without a code. A patient caller then logs in at the next step: no step was lost."""
    second = SSHExecutor(**totp.parameters)
    before = totp.server.connections_accepted
    outcomes: List[Tuple[float, float, Any]] = []
    callers = []
    try:
        for timeout, gap in CHAIN:
            def call(timeout: float = timeout) -> None:
                started = time.monotonic()
                try:
                    second.run_command("echo never", timeout=timeout)
                    outcome: Any = "ran"
                except BaseException as exc:  # judged below
                    outcome = exc
                outcomes.append((timeout, time.monotonic() - started, outcome))
            caller = threading.Thread(target=call, daemon=True)
            caller.start()
            callers.append(caller)
            time.sleep(gap)  # the schedule of arrivals, not a wait for anything
        for caller in callers:
            caller.join(10)
        assert len(outcomes) == len(CHAIN)
        assert int(time.time() // STEP) == totp.step, "the test ran into the next step"
        for timeout, took, outcome in outcomes:
            assert isinstance(outcome, CommandTimeout), outcome
            assert took >= timeout, (timeout, took)
            for text in (str(outcome), repr(outcome), repr(second)):
                assert totp.secret not in text and totp.secret.lower() not in text, text
        abandoned(totp.server, 1)
        assert totp.server.totp_accepted == 1 and second.statistics().connects == 0
        connects = totp.server.connections_accepted - before
        assert 1 <= connects <= len(CHAIN), connects
        # The next step's code is still free: a patient caller takes it, and no later one.
        assert second.run_command("echo second").stdout == "second\n"
        assert int(time.time() // STEP) == totp.step + 1
        assert totp.steps() == {totp.step, totp.step + 1}
    finally:
        second.close()


@pytest.mark.hang_timeout(120)
def test_a_patient_caller_joining_before_the_poll_keeps_the_login_waiting(
        totp: Totp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The bounded caller left, and a patient one joined its connect before the ledger looked
    again (its poll slowed to 1 s to make that certain): the login is kept for it, on the
    same connection, and logs in at the next step."""
    from paramiko_executor import totp as totp_module

    monkeypatch.setattr(totp_module, "_ABANDON_POLL", 1.0)
    second = SSHExecutor(**totp.parameters)
    before = totp.server.connections_accepted
    try:
        left = outcome_within(10, lambda: second.run_command("echo never", timeout=0.3))
        assert isinstance(left.get("error"), CommandTimeout), left
        patient = call_in_thread(lambda: second.run_command("echo patient"))
        patient["thread"].join(STEP + 10)
        assert patient.get("result") is not None, patient
        assert patient["result"].stdout == "patient\n"
        assert totp.server.connections_accepted - before == 1  # one connect served both
        assert totp.steps() == {totp.step, totp.step + 1}
        assert waits_logged(caplog) == 1
    finally:
        second.close()


@pytest.mark.hang_timeout(120)
def test_a_bounded_caller_joining_before_the_poll_keeps_the_login_until_its_deadline(
        totp: Totp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """As above, but the caller joining has a timeout of 2 s: the login waits on for it (the
    connect thread lives past the first caller's deadline and the poll) and ends only once
    its deadline passed, without a code."""
    from paramiko_executor import totp as totp_module

    monkeypatch.setattr(totp_module, "_ABANDON_POLL", 1.0)
    second = SSHExecutor(**totp.parameters)
    before = totp.server.connections_accepted
    try:
        left = outcome_within(10, lambda: second.run_command("echo never", timeout=0.3))
        assert isinstance(left.get("error"), CommandTimeout), left
        joined = call_in_thread(lambda: second.run_command("echo joined", timeout=2.0))
        time.sleep(1.2)  # past a poll: the login must still wait for the caller that joined
        assert connect_threads(), "the login was abandoned under a caller still waiting"
        joined["thread"].join(5)
        assert isinstance(joined.get("error"), CommandTimeout), joined
        abandoned(totp.server, 1)
        assert totp.server.connections_accepted - before == 1
        assert totp.server.totp_accepted == 1
    finally:
        second.close()


@pytest.mark.hang_timeout(120)
def test_against_openssh_a_login_nobody_waits_for_spends_no_code(
        sshd_totp: Any, ledger: Tuple[str, List[str]], caplog: pytest.LogCaptureFixture
        ) -> None:
    """Real sshd, google-authenticator with DISALLOW_REUSE: a login, then a caller with a
    0.5 s timeout whose login must wait for the next step. It ends without a code; a patient
    caller then logs in at the next step: two logins accepted, no code refused."""
    ledger[1].append(sshd_totp.totp_secret)
    parameters = dict(sshd_totp.executor_parameters(), **SLOW_RETRIES, mfa_config=[
        {"prompt": sshd_totp.totp_prompt, "totp": sshd_totp.totp_secret}])
    into_a_step_with(LEFT)
    step = int(time.time() // STEP)
    with SSHExecutor(**parameters) as first, SSHExecutor(**parameters) as second:
        assert first.run_command("echo first").stdout == "first\n"
        left = outcome_within(10, lambda: second.run_command("echo never", timeout=0.5))
        assert isinstance(left.get("error"), CommandTimeout), left
        wait_for(lambda: not connect_threads(), "the login nobody waits for to end", 3)
        assert int(time.time() // STEP) == step
        assert second.run_command("echo second").stdout == "second\n"
        assert int(time.time() // STEP) == step + 1
    log = sshd_totp.read_log()
    assert log.count("Accepted keyboard-interactive/pam for") == 2
    assert log.count("Failed keyboard-interactive/pam for") == 0


@pytest.mark.hang_timeout(90)
def test_an_abandoned_login_is_not_logged_as_retrying(
        totp: Totp, caplog: pytest.LogCaptureFixture) -> None:
    """Was: logged as 'connecting to ... failed (AuthenticationInterrupted: the login was
    abandoned ...); retrying in 1.0 s', and nothing was retried (`_establish` logged the
    retry before `_back_off` found that no caller waited). Now its end says why."""
    second = SSHExecutor(**totp.parameters)
    try:
        left = outcome_within(10, lambda: second.run_command("echo never", timeout=0.5))
        assert isinstance(left.get("error"), CommandTimeout), left
        abandoned(totp.server, 1)
        assert totp.server.connections_accepted == 2  # the first's and this one: no retry
        retrying = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
        assert retrying == []
        assert any("no caller waits for it any more" in r.getMessage() for r in caplog.records)
    finally:
        second.close()


def late_at_leaving(call: Callable[[], Any], late: float) -> Callable[[], Any]:
    """``call``, its thread held ``late`` seconds when `Connection.get` is about to count it
    out (its wait over): as a thread the machine runs late, just after its deadline."""
    import inspect

    from paramiko_executor.connection import Connection

    code = Connection.get.__code__
    lines, first = inspect.getsourcelines(Connection.get)
    [line] = [first + n for n, text in enumerate(lines)
              if text.strip() == "self._leave(attempt, deadline is None)"]
    return at_line(code, line, lambda: time.sleep(late), call)


@pytest.mark.hang_timeout(90)
def test_a_caller_run_late_past_its_deadline_hears_of_its_timeout_not_of_the_abandon(
        totp: Totp, caplog: pytest.LogCaptureFixture) -> None:
    """Was: with no retry left (connect_retries=0, or the last of them), the abandoned login
    ended as ExecutorFailure('cannot connect to ... after 1 attempts: AuthenticationInterrupted:
    the login was abandoned ...'), and a caller whose thread ran a little late after its
    deadline (held here 0.5 s) got that instead of its CommandTimeout. The login ended for
    want of callers, as any abandoned connect."""
    second = SSHExecutor(**dict(totp.parameters, connect_retries=0))
    try:
        late = outcome_within(10, late_at_leaving(
            lambda: second.run_command("echo never", timeout=0.5), 0.5))
        assert isinstance(late.get("error"), CommandTimeout), late
        abandoned(totp.server, 1)
        assert totp.server.totp_accepted == 1
    finally:
        second.close()


# --- Ctrl-C and close() while the login waits ---------------------------------------------


@contextlib.contextmanager
def sigint_once(condition: Callable[[], bool]) -> Iterator[None]:
    """SIGINT to the main thread (Python's own handler: KeyboardInterrupt) once ``condition``."""
    assert threading.current_thread() is threading.main_thread()

    def interrupt() -> None:
        wait_for(condition, "the moment to interrupt", 10)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    # Python's handler even when the suite runs with SIGINT ignored (a background job).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter = threading.Thread(target=interrupt, daemon=True)
    interrupter.start()
    try:
        yield
    finally:
        interrupter.join(15)
        signal.signal(signal.SIGINT, previous)


@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("timeout", [20, None], ids=["bounded", "patient"])
def test_ctrl_c_in_a_caller_while_the_login_waits_ends_the_login_without_a_code(
        totp: Totp, caplog: pytest.LogCaptureFixture, timeout: Optional[float]) -> None:
    """Bounded: the caller is counted out by its interrupt, long before its own deadline,
    and the login it left (in a connect thread of its own) ends without a code. Patient: was
    ExecutorFailure('cannot connect to ...: KeyboardInterrupt: '), the interrupt lost
    (`Connection._establish` classified every BaseException as a failed connect); the
    caller's own thread runs the login, and the interrupt ends it, without a code."""
    second = SSHExecutor(**totp.parameters)
    try:
        with sigint_once(lambda: waits_logged(caplog) > 0):
            with pytest.raises(KeyboardInterrupt):
                second.run_command("echo never", timeout=timeout)
        abandoned(totp.server, 1)
        assert totp.server.totp_accepted == 1 and second.statistics().connects == 0
    finally:
        second.close()


@pytest.mark.hang_timeout(120)
def test_ctrl_c_in_the_patient_leader_leaves_a_joined_bounded_caller_its_login(
        totp: Totp, caplog: pytest.LogCaptureFixture) -> None:
    second = SSHExecutor(**totp.parameters)
    try:
        until_next = (totp.step + 1) * STEP - time.time()
        joined: Dict[str, Any] = {}

        def join_then_interrupt() -> bool:
            """Once the login waits, a bounded caller joins; once it counts, interrupt."""
            if not joined and waits_logged(caplog) > 0:
                joined["call"] = call_in_thread(lambda: second.run_command(
                    "echo joined", timeout=until_next + 10))
            attempt = second._connection._attempt
            return bool(joined) and attempt is not None and attempt.waiters == 2

        with sigint_once(join_then_interrupt):
            with pytest.raises(KeyboardInterrupt):
                second.run_command("echo never")
        outcome = joined["call"]
        outcome["thread"].join(until_next + 15)
        assert outcome.get("result") is not None, outcome
        assert outcome["result"].stdout == "joined\n"
    finally:
        second.close()


@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("callers", ["waiting", "gone"])
def test_close_while_the_login_waits_ends_it_at_once_without_a_code(
        totp: Totp, callers: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``waiting``: a patient and a bounded caller wait; close() ends the login, both hear
    the executor was closed. ``gone``: the only caller left and the ledger has not looked
    yet (its poll slowed to 2 s); close() ends the login all the same."""
    from paramiko_executor import totp as totp_module

    second = SSHExecutor(**totp.parameters)
    try:
        if callers == "waiting":
            waiting = [call_in_thread(lambda: second.run_command("echo never")),
                       call_in_thread(lambda: second.run_command("echo never", timeout=20))]
            login_waiting(caplog)
        else:
            monkeypatch.setattr(totp_module, "_ABANDON_POLL", 2.0)
            left = outcome_within(10, lambda: second.run_command("echo never", timeout=0.5))
            assert isinstance(left.get("error"), CommandTimeout), left
            waiting = []
            assert connect_threads(), "the login ended before close()"
        outcome_within(5, second.close)
        for outcome in waiting:
            outcome["thread"].join(3)
            error = outcome.get("error")
            assert isinstance(error, ExecutorFailure) and "closed" in str(error), outcome
        abandoned(totp.server, 1)
        assert totp.server.totp_accepted == 1 and second.statistics().connects == 0
    finally:
        second.close()


@pytest.mark.hang_timeout(120)
def test_of_two_executors_waiting_for_the_next_step_only_the_one_left_stops(
        totp: Totp, caplog: pytest.LogCaptureFixture) -> None:
    """Two executors with the secret wait for the next step in one ledger: one for a caller
    with a 1 s timeout, one for a caller whose timeout ends 10 s after that step begins.
    The first login ends without a code; the second, still wanted, logs in at the step."""
    left_alone, wanted = SSHExecutor(**totp.parameters), SSHExecutor(**totp.parameters)
    try:
        until_next = (totp.step + 1) * STEP - time.time()
        keeps = call_in_thread(lambda: wanted.run_command("echo wanted",
                                                          timeout=until_next + 10))
        login_waiting(caplog)
        gone = outcome_within(10, lambda: left_alone.run_command("echo never", timeout=1))
        assert isinstance(gone.get("error"), CommandTimeout), gone
        wait_for(lambda: totp.server.active_connections == 2,
                 "the login nobody waits for to end", 3)
        assert keeps["thread"].is_alive() and totp.server.totp_accepted == 1
        keeps["thread"].join(until_next + 15)
        assert keeps.get("result") is not None, keeps
        assert keeps["result"].stdout == "wanted\n"
        assert totp.steps() == {totp.step, totp.step + 1}
        assert left_alone.statistics().connects == 0
    finally:
        left_alone.close()
        wanted.close()


# --- another process logs in with the secret meanwhile -------------------------------------


#: A patient login in a process of its own; exit status 0 if it logged in at step argv[2].
CHILD = """
import json, sys, time
from paramiko_executor import CommandTimeout, ExecutorFailure, ShellExecutor, SSHExecutor
parameters, step = json.loads(sys.argv[1]), int(sys.argv[2])
with SSHExecutor(**parameters) as ex:
    assert ex.run_command("echo child").stdout == "child\\n"
sys.exit(0 if int(time.time() // 30) == step else 3)
"""


def child_login(process: str, totp: Totp) -> Callable[[float], int]:
    """Start a process that logs in patiently, sharing the ledger file; a function waiting
    (bounded) for its exit status."""
    if process == "spawn":
        env = dict(os.environ, PARAMIKO_EXECUTOR_TOTP_LEDGER=totp.ledger)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(totp.parameters), str(totp.step + 1)],
            env=env, cwd=root)

        def wait_spawned(bound: float) -> int:
            try:
                return proc.wait(bound)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return wait_spawned
    pid = os.fork()
    if pid == 0:  # the child: what the parent's threads held at the fork is not its own
        status = 1
        try:
            with SSHExecutor(**totp.parameters) as ex:
                if ex.run_command("echo child").stdout == "child\n":
                    status = 0 if int(time.time() // STEP) == totp.step + 1 else 3
        finally:
            os._exit(status)

    return lambda bound: reap(pid, bound)


@pytest.mark.hang_timeout(120)
@pytest.mark.parametrize("process", ["fork", "spawn"])
def test_another_process_takes_the_next_step_the_abandoned_login_left_free(
        totp: Totp, process: str, caplog: pytest.LogCaptureFixture) -> None:
    """While this process's login waits for the next step (for a caller with a 3 s timeout),
    another process (forked in the middle of that wait, or started anew) logs in patiently
    with the secret through the same ledger file. The abandoned login claims nothing: the
    other process logs in at the very next step, and no step is spent for no one."""
    second = SSHExecutor(**totp.parameters)
    try:
        bounded = call_in_thread(lambda: second.run_command("echo never", timeout=3))
        login_waiting(caplog)
        reap = child_login(process, totp)
        bounded["thread"].join(10)
        assert isinstance(bounded.get("error"), CommandTimeout), bounded
        wait_for(lambda: not connect_threads(), "the login nobody waits for to end", 3)
        assert reap(STEP + 15) == 0, "the other process did not log in at the next step"
        assert totp.steps() == {totp.step, totp.step + 1} and totp.server.totp_accepted == 2
        assert second.statistics().connects == 0
    finally:
        second.close()


# --- a HostGroup whose hosts share one secret -----------------------------------------------


@pytest.mark.hang_timeout(120)
def test_a_group_whose_hosts_share_a_secret_leaves_no_login_spending_a_step(
        make_test_server: Any, ledger: Tuple[str, List[str]],
        caplog: pytest.LogCaptureFixture) -> None:
    """Two hosts, one secret: one logs in, the other must wait for the next step and its
    call times out (3 s). Its login ends without a code and is not retried; the next call
    without a timeout logs it in at the next step, using the step nothing else spent."""
    from paramiko_executor import HostGroup

    secret = pyotp.random_base32()
    ledger[1].append(secret)
    servers = [make_test_server(totp_secret=secret) for _ in range(2)]
    hosts = [{"name": f"h{i}", **server.executor_parameters()} for i, server in enumerate(servers)]
    into_a_step_with(LEFT)
    step = int(time.time() // STEP)
    with HostGroup(hosts, mfa_config=servers[0].mfa_config(), **SLOW_RETRIES) as group:
        bounded = outcome_within(15, lambda: group.run_command("echo hi", timeout=3))
        assert "result" in bounded, bounded
        failed = bounded["result"].failed
        assert len(failed) == 1, dict(bounded["result"])
        [(late, error)] = failed.items()
        assert isinstance(error, CommandTimeout), error
        waiting = servers[int(late[1:])]
        wait_for(lambda: not connect_threads() and waiting.active_connections == 0,
                 "the login nobody waits for to end", 3)
        # One try, not retried; stopped by the executor, so not counted as failed.
        assert waiting.totp_accepted == 0 and waiting.connections_accepted == 1
        assert group.statistics()[late].connect_failures == 0
        patient = outcome_within(STEP + 15, lambda: group.run_command("echo hi"))
        assert "result" in patient and not patient["result"].failed, patient
    used = [server._used_totp.get(secret, set()) for server in servers]
    assert sorted(map(sorted, used)) == [[step], [step + 1]], used


@pytest.mark.hang_timeout(120)
def test_calls_timing_out_again_and_again_join_each_hosts_one_connect(sshd: Any) -> None:
    """Ten hosts that never answer (banner_timeout 3 s), three calls with a 0.3 s timeout in
    a row: each later call joins the connect its host has in flight instead of starting
    another, so there is never more than one per host, each tried once and not retried."""
    from test_attack_connect_deadline import Silent

    from paramiko_executor import HostGroup

    silent = Silent(10)
    hosts = [{"name": f"silent{i}", **sshd.executor_parameters(), "port": port}
             for i, port in enumerate(silent.ports)]
    try:
        with HostGroup(hosts, max_workers=10, banner_timeout=3, **SLOW_RETRIES) as group:
            peak = 0
            for _ in range(3):
                outcome = outcome_within(10, lambda: group.run_command("echo hi", timeout=0.3))
                assert "result" in outcome, outcome
                assert all(isinstance(e, CommandTimeout)
                           for e in outcome["result"].failed.values()), outcome
                assert len(outcome["result"].failed) == 10
                peak = max(peak, len(connect_threads()))
            assert 0 < peak <= 10, peak
            wait_for(lambda: not connect_threads(), "the connects to end with their try", 10)
            tries = sum(s.connect_failures for s in group.statistics().values())
            assert tries == 10, tries
    finally:
        silent.close()


# --- on_output: a line that never ends, in pieces ------------------------------------------


#: Per encoding, a run of characters for a long line: multibyte ones (astral ones where the
#: encoding has them, a surrogate pair in UTF-16) beside ASCII and a \r, as a progress bar.
UNITS: Dict[Optional[str], str] = {
    "utf-8": "\r42% \u00e9\u6f22\U0001f600=",
    "utf-16": "\r42% \u00e9\u6f22\U0001f600=",
    "utf-32-le": "\r42% \u00e9\U0001f600=",
    "shift_jis": "\r42% \u6f22\u5b57\uff71=",
    "gb18030": "\r42% \u6f22\U0001f600=",
    None: "\r42% \u00e9\u6f22\U0001f600=",  # sent as UTF-8, handed on as bytes
}


def splitter_pieces(encoding: Optional[str], chunks: List[bytes]) -> List[Any]:
    from paramiko_executor.output import LineSplitter

    pieces: List[Any] = []
    splitter = LineSplitter("stdout", lambda stream, piece: pieces.append(piece), encoding)
    for chunk in chunks:
        splitter.feed(chunk)
    splitter.finish()
    return pieces


def check_pieces(pieces: List[Any], whole: Any, piece: int) -> None:
    """``pieces`` are ``whole`` cut at line ends and every `LINE_PIECE` (``piece``) units
    (bytes: moved a few bytes off a UTF-8 character's middle)."""
    newline = b"\n" if isinstance(whole, bytes) else "\n"
    assert whole[:0].join(pieces) == whole
    for n, part in enumerate(pieces):
        assert part, "an empty piece"
        assert newline not in part[:-1], "a line end inside a piece"
        if not part.endswith(newline) and n < len(pieces) - 1:
            if isinstance(part, bytes):
                assert abs(len(part) - piece) <= 3, (n, len(part))
            else:
                assert len(part) == piece, (n, len(part))


@pytest.mark.parametrize("encoding", list(UNITS))
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_pieces_of_a_long_line_are_whole_characters_in_arrival_order(
        encoding: Optional[str], piece: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way of cutting the bytes (1 to 5 bytes a chunk, pieces of 1 to 7 units) gives
    back the text exactly, without a replacement character: no character is split between
    pieces, a surrogate pair of UTF-16 or a shift_jis pair included."""
    import random

    from paramiko_executor import output

    monkeypatch.setattr(output, "LINE_PIECE", piece)
    text = UNITS[encoding] * 5 + "\n\n" + UNITS[encoding] * 3 + "\nend"
    data = text.encode(encoding or "utf-8")
    whole: Any = data if encoding is None else text
    rng = random.Random(f"{encoding}{piece}")
    for _ in range(40):  # bounded: 40 random cuttings
        chunks, at = [], 0
        while at < len(data):
            size = rng.randint(1, 5)
            chunks.append(data[at:at + size])
            at += size
        pieces = splitter_pieces(encoding, chunks)
        check_pieces(pieces, whole, piece)
        if encoding is not None:
            assert "\ufffd" not in "".join(pieces)


def long_line_script(encoding: Optional[str], count: int) -> str:
    """A shell command printing ``count`` units (`UNITS`) on stdout without a line end, then
    a line end and ``tail``; and on stderr half as many, then a line end."""
    name = encoding or "utf-8"
    script = (
        "import sys\n"
        f"unit = {UNITS[encoding]!r}\n"
        f"out = (unit * {count} + '\\n' + 'tail').encode({name!r})\n"
        f"err = (unit * {count // 2} + '\\n').encode({name!r})\n"
        "half = len(out) // 2\n"
        "sys.stdout.buffer.write(out[:half]); sys.stdout.flush()\n"
        "sys.stderr.buffer.write(err); sys.stderr.flush()\n"
        "sys.stdout.buffer.write(out[half:]); sys.stdout.flush()\n")
    return f"python3 -c {shlex.quote(script)}"


@pytest.fixture(params=["sshd", "shell"])
def run_on(request: Any, sshd: Any) -> Iterator[Any]:
    if request.param == "shell":
        yield ShellExecutor()
        return
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        yield ex


@pytest.mark.hang_timeout(120)
@pytest.mark.parametrize("encoding", list(UNITS))
def test_a_huge_line_in_any_encoding_comes_in_pieces_that_join_to_it(
        run_on: Any, encoding: Optional[str]) -> None:
    """Over 3 LINE_PIECE of multibyte characters on one line, on stdout and on stderr at once:
    each stream's pieces join to exactly its text (arrival order kept per stream), none
    empty, every unterminated piece LINE_PIECE long (a few bytes off with encoding=None), and
    the last unterminated piece at EOF."""
    from paramiko_executor.output import LINE_PIECE

    unit = UNITS[encoding]
    count = 3 * LINE_PIECE // len(unit) + 11
    pieces: Dict[str, List[Any]] = {"stdout": [], "stderr": []}
    result = run_on.run_command(long_line_script(encoding, count), encoding=encoding,
                                keep_output=False, timeout=60,
                                on_output=lambda stream, piece: pieces[stream].append(piece))
    assert result.stdout in ("", b"") and result.exit_code == 0
    out = unit * count + "\ntail"
    err = unit * (count // 2) + "\n"
    if encoding is None:
        wanted: Dict[str, Any] = {"stdout": out.encode(), "stderr": err.encode()}
    else:
        wanted = {"stdout": out, "stderr": err}
    for stream in ("stdout", "stderr"):
        check_pieces(pieces[stream], wanted[stream], LINE_PIECE)
    assert len(pieces["stdout"]) >= 3 and pieces["stdout"][-1] in ("tail", b"tail")
    if encoding is not None:
        assert all("\ufffd" not in piece for piece in pieces["stdout"] + pieces["stderr"])


class Boom(Exception):
    """The caller's own exception, raised by its callback."""


@pytest.fixture(params=["sshd", "sshd-pty", "shell", "shell-pty"])
def one_slot(request: Any, sshd: Any) -> Iterator[Tuple[Any, bool]]:
    """An executor (over sshd: one session at most, so a slot not given back shows) and
    whether to run on a pseudo-terminal."""
    pty = request.param.endswith("pty")
    if request.param.startswith("shell"):
        yield ShellExecutor(), pty
        return
    with SSHExecutor(max_sessions=1, **sshd.executor_parameters()) as ex:
        yield ex, pty


@pytest.mark.hang_timeout(120)
@pytest.mark.parametrize("on", ["first piece", "line end"])
def test_a_callback_raising_on_a_piece_ends_the_command_with_its_own_exception(
        one_slot: Tuple[Any, bool], on: str) -> None:
    """Was (before pieces): no call until the line ended, so a command printing a line that
    never ends ran into its timeout instead. The callback raises on the first piece, or on
    the piece that ends the line: the call raises that very exception at once (the command
    would sleep 30 s more), and the slot is free for the next command."""
    from paramiko_executor.output import LINE_PIECE

    ex, pty = one_slot
    boom = Boom(on)
    seen: List[int] = []

    def callback(stream: str, piece: str) -> None:
        seen.append(len(piece))
        if (on == "first piece") != piece.endswith("\n"):
            raise boom

    command = f"head -c {3 * LINE_PIECE} /dev/zero | tr '\\0' x; echo; sleep 30"
    outcome = outcome_within(25, lambda: ex.run_command(
        command, pty=pty, keep_output=False, on_output=callback, timeout=20))
    assert outcome.get("error") is boom, outcome
    assert seen[0] >= LINE_PIECE
    if on == "first piece":
        assert len(seen) == 1
    else:
        assert sum(seen) >= 3 * LINE_PIECE + 1
    after = outcome_within(15, lambda: ex.run_command("echo next", pty=pty, timeout=10))
    assert after.get("result") is not None, after
    assert after["result"].stdout.strip() == "next"
    if isinstance(ex, SSHExecutor):
        wait_for(lambda: ex.statistics().open_channels == 0, "the slot to be given back", 5)


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.hang_timeout(300)
@pytest.mark.parametrize("pty", [False, True], ids=["pipe", "pty"])
def test_200_mb_on_one_line_with_keep_output_false_keeps_memory_flat(
        run_on: Any, pty: bool) -> None:
    """``yes | tr -d '\\n'``: 200 MB on one line, handed on as it comes. Python's allocations
    (tracemalloc's peak) and the process's RSS stay within a few windows of 8 MiB, where
    the line held whole until its end took 200 MB (and as much again to join it)."""
    total = 200_000_000
    seen = {"chars": 0, "pieces": 0, "rss": 0}
    start_rss = rss()

    def count(stream: str, piece: str) -> None:
        seen["chars"] += len(piece)
        seen["pieces"] += 1
        seen["rss"] = max(seen["rss"], rss() - start_rss)

    tracemalloc.start()
    try:
        result = run_on.run_command(f"yes | tr -d '\\n' | head -c {total}", pty=pty,
                                    keep_output=False, on_output=count, timeout=240)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.stdout == "" and seen["chars"] == total
    assert seen["pieces"] >= 10, seen
    print(f"\n{run_on!r} pty={pty}: {seen['pieces']} pieces, tracemalloc peak "
          f"{peak / 2**20:.1f} MiB, RSS grew {seen['rss'] / 2**20:.1f} MiB")
    assert peak < 64 * 2**20, peak
    assert seen["rss"] < 128 * 2**20, seen


def test_a_bytes_piece_never_ends_inside_a_utf8_character() -> None:
    from paramiko_executor.output import LINE_PIECE

    data = b"x" * (LINE_PIECE - 1) + "\u00e9".encode() + b" done\n"
    pieces = splitter_pieces(None, [data[:LINE_PIECE], data[LINE_PIECE:]])
    assert b"".join(pieces) == data
    for piece in pieces:
        piece.decode("utf-8")


@pytest.mark.hang_timeout(120)
def test_a_slow_callback_still_gets_pieces_of_about_a_mib(sshd: Any) -> None:
    from paramiko_executor.output import LINE_PIECE

    sizes: List[int] = []

    def slow(stream: str, piece: str) -> None:
        if not sizes:
            time.sleep(1.5)  # the caller's own slow work; meanwhile the window fills
        sizes.append(len(piece))

    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command(f"head -c {12 * LINE_PIECE} /dev/zero | tr '\\0' x", timeout=60,
                       keep_output=False, on_output=slow)
    assert sum(sizes) == 12 * LINE_PIECE
    assert max(sizes) < 2 * LINE_PIECE, sizes
