"""Attacks on two changes: a login waiting in the TOTP ledger for a fresh time step ends once
no caller waits for its connect (`Connection._unwanted` polled by the ledger), and
`LineSplitter` handing a line that never ends to ``on_output`` in pieces of `LINE_PIECE`.

Against the project's paramiko test server with a TOTP secret (it records the time steps
whose codes it accepted), a real OpenSSH sshd, and local shells. Each test states the
contract it holds the code to; a strict xfail marks a bug reproduced here, with its reason.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Set, Tuple

import pyotp
import pytest
from helpers import SLOW_RETRIES, call_in_thread, outcome_within, wait_for
from test_attack_connect_deadline import connect_threads

from paramiko_executor import CommandTimeout, SSHExecutor

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
def totp(make_test_server: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
         caplog: pytest.LogCaptureFixture) -> Iterator[Totp]:
    """The step's code spent by ``first``: another login must wait for the next step. A
    private ledger file: no other test's logins count. Logs at INFO are captured, and none
    may hold the secret."""
    from paramiko_executor import auth
    from paramiko_executor.totp import TOTPLedger

    ledger = str(tmp_path / "ledger")
    monkeypatch.setattr(auth, "TOTP_LEDGER", TOTPLedger(path=ledger))
    caplog.set_level(logging.DEBUG, logger="paramiko_executor")
    server = make_test_server(totp_secret=pyotp.random_base32())
    parameters = dict(server.executor_parameters(), mfa_config=server.mfa_config(),
                      **SLOW_RETRIES)
    into_a_step_with(LEFT)
    step = int(time.time() // STEP)
    first = SSHExecutor(**parameters)
    try:
        assert first.run_command("echo first").stdout == "first\n"
        state = Totp(server, parameters, first, step, ledger)
        assert state.steps() == {step}
        yield state
    finally:
        first.close()
    secret = state.secret
    for record in caplog.records:
        text = record.getMessage()
        assert secret not in text and secret.lower() not in text, text


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
