"""The TOTP ledger file: no code sent twice by any process of the user on this machine.

Unit tests use fake clocks and ledgers pointing at one file (in one process and
across spawned processes); the last test logs two processes in at once with one
secret against a real sshd that refuses a reused code (google-authenticator's
DISALLOW_REUSE).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import stat
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Tuple

import pyotp
import pytest

from paramiko_executor import SSHExecutor, auth
from paramiko_executor.errors import AuthenticationInterrupted
from paramiko_executor.totp import (
    LEDGER_ENV,
    TOTP_LEDGER,
    TOTPLedger,
    default_ledger_path,
)

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
OTHER_SECRET = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"
NOW = 1_000_040.0  # 20 s into a 30 s step


class FakeClock:
    """A clock that only moves when the ledger waits."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now
        self.waits: List[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, delay: float) -> None:
        self.waits.append(delay)
        self.now += delay


def fake_ledger(path: str, clock: FakeClock) -> TOTPLedger:
    return TOTPLedger(clock=clock, wait=clock.wait, path=str(path))


def test_the_process_wide_ledger_uses_the_shared_file():
    assert auth.TOTP_LEDGER is TOTP_LEDGER and auth.TOTPLedger is TOTPLedger
    assert TOTP_LEDGER.path == default_ledger_path()


def test_two_ledgers_on_one_file_never_issue_one_code_twice(tmp_path):
    path = tmp_path / "ledger"
    first_clock, second_clock = FakeClock(), FakeClock()
    first = fake_ledger(path, first_clock).issue(SECRET)
    second = fake_ledger(path, second_clock).issue(SECRET)
    assert first == pyotp.TOTP(SECRET).at(NOW)
    assert first_clock.waits == [] and len(second_clock.waits) == 1
    assert 10 <= second_clock.waits[0] <= 10.1  # to just past the step boundary
    assert second == pyotp.TOTP(SECRET).at(second_clock.now) != first


def test_ledgers_without_a_file_do_not_see_each_other(tmp_path):
    clock = FakeClock()
    TOTPLedger(clock=clock, wait=clock.wait).issue(SECRET)
    TOTPLedger(clock=clock, wait=clock.wait).issue(SECRET)
    assert clock.waits == []


def test_secrets_are_kept_apart(tmp_path):
    path = tmp_path / "ledger"
    clock = FakeClock()
    fake_ledger(path, clock).issue(SECRET)
    fake_ledger(path, clock).issue(OTHER_SECRET)
    assert clock.waits == []


def test_wait_until_fresh_reserves_the_step_for_this_ledgers_next_issue(tmp_path):
    path = tmp_path / "ledger"
    clock, other_clock = FakeClock(), FakeClock()
    ledger, other = fake_ledger(path, clock), fake_ledger(path, other_clock)
    ledger.wait_until_fresh(SECRET)
    # Another process waits BEFORE its login asks for a code, not in the middle of it.
    other.wait_until_fresh(SECRET)
    assert len(other_clock.waits) == 1
    assert ledger.issue(SECRET) == pyotp.TOTP(SECRET).at(NOW) and clock.waits == []
    assert other.issue(SECRET) == pyotp.TOTP(SECRET).at(other_clock.now)
    assert len(other_clock.waits) == 1  # its reservation is the current step: no more waiting


def test_a_reservation_of_a_step_gone_by_is_dropped(tmp_path):
    clock = FakeClock()
    ledger = fake_ledger(tmp_path / "ledger", clock)
    ledger.wait_until_fresh(SECRET)  # the login never asks for the code...
    clock.now += 30
    ledger.issue(SECRET)  # ...and the next one, a step later, needs no wait
    assert clock.waits == []
    ledger.issue(SECRET)  # a code of that step was sent: the one after waits
    assert len(clock.waits) == 1


def test_a_login_waits_at_most_one_time_step(tmp_path):
    # Two turns taken in the file by others (the second a step ahead): the third would
    # wait two steps, so it gives up at once, temporarily: its next attempt takes a turn.
    path = tmp_path / "ledger"
    takers = [FakeClock() for _ in range(3)]
    for clock in takers[:2]:
        fake_ledger(path, clock).issue(SECRET)
    assert [len(c.waits) for c in takers[:2]] == [0, 1]
    with pytest.raises(AuthenticationInterrupted, match="within one time step"):
        fake_ledger(path, takers[2]).issue(SECRET)
    assert takers[2].waits == []
    takers[2].now += 30  # a step later the next turn is free
    fake_ledger(path, takers[2]).issue(SECRET)
    assert len(takers[2].waits) == 1


def test_the_file_holds_no_secret_and_only_its_owner_may_read_it(tmp_path):
    path = tmp_path / "private" / "ledger"
    fake_ledger(path, FakeClock()).issue(SECRET)
    text = path.read_text()
    (name, step), = (line.split() for line in text.splitlines())
    assert step == str(int(NOW // 30))
    for leak in (SECRET, SECRET.lower(), hashlib.sha256(SECRET.encode()).hexdigest(),
                 pyotp.TOTP(SECRET).at(NOW)):
        assert leak not in text
    assert len(bytes.fromhex(name)) == 32  # an HMAC-SHA256, keyed by the file beside it
    key = path.parent / "ledger.key"
    assert len(key.read_bytes()) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_damaged_lines_are_ignored_and_old_records_dropped(tmp_path):
    path = tmp_path / "ledger"
    fake_ledger(path, FakeClock(NOW - 3600)).issue(OTHER_SECRET)  # an hour ago
    with open(path, "a", encoding="ascii") as file:
        file.write("garbage\nabc not-a-step\n")
    clock = FakeClock()
    fake_ledger(path, clock).issue(SECRET)
    assert clock.waits == []
    assert len(path.read_text().splitlines()) == 1  # only the step just taken


def test_an_unusable_file_leaves_a_ledger_of_this_process(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    clock = FakeClock()
    ledger = fake_ledger(blocker / "ledger", clock)  # a directory that cannot exist
    with caplog.at_level(logging.WARNING, logger="paramiko_executor.auth"):
        ledger.issue(SECRET)
        ledger.issue(SECRET)
    assert len(clock.waits) == 1  # still never the same code twice in this process
    # Each login tried the file again: a failure concerns that one login only.
    assert caplog.text.count("not used for this login") == 2
    assert SECRET not in caplog.text


def test_default_ledger_path(monkeypatch, tmp_path):
    monkeypatch.setenv(LEDGER_ENV, str(tmp_path / "explicit"))
    assert default_ledger_path() == str(tmp_path / "explicit")
    monkeypatch.delenv(LEDGER_ENV)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert default_ledger_path() == str(runtime / "paramiko_executor" / "totp-ledger")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_ledger_path() == str(tmp_path / "cache" / "paramiko_executor" / "totp-ledger")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_ledger_path() == str(
        tmp_path / "home" / ".cache" / "paramiko_executor" / "totp-ledger")


# -- across processes -----------------------------------------------------------------------------

_barrier: Any = None


def _remember_barrier(barrier: Any) -> None:
    global _barrier
    _barrier = barrier


def _issue_in_a_process(path: str) -> Tuple[int, str, List[float]]:
    """Issue a code for SECRET at the fake time NOW, after the other process is ready."""
    _barrier.wait(60)
    clock = FakeClock()
    return os.getpid(), fake_ledger(path, clock).issue(SECRET), clock.waits


class _RecordingLedger(TOTPLedger):
    """A ledger that remembers the codes it issued."""

    issued: List[str] = []

    def issue(self, secret: str) -> str:
        code = super().issue(secret)
        self.issued.append(code)
        return code


def _login_in_a_process(parameters: Dict[str, Any], mfa: list, path: str) -> Tuple[int, List[str]]:
    """Log in (and run ``true``) once the other process is ready; returns pid and codes sent."""
    _barrier.wait(60)
    # The clock sits 0.5 s before a step boundary (a bit behind the real one, whose previous
    # step's code the server takes too), so the second login waits half a second, not 30.
    # Both processes compute it within milliseconds of each other, after the barrier.
    shift = (time.time() - 29.5) % 30
    ledger = _RecordingLedger(clock=lambda: time.time() - shift, path=path)
    auth.TOTP_LEDGER = ledger
    with SSHExecutor(**parameters, mfa_config=mfa) as executor:
        executor.run_command("true")
    return os.getpid(), ledger.issued


def _in_two_processes(function: Any, *args: Any) -> List[Any]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    with ProcessPoolExecutor(2, mp_context=context, initializer=_remember_barrier,
                             initargs=(barrier,)) as pool:
        futures = [pool.submit(function, *args) for _ in range(2)]
        return [future.result(timeout=120) for future in futures]


def test_two_processes_at_once_take_turns(tmp_path):
    results = _in_two_processes(_issue_in_a_process, str(tmp_path / "ledger"))
    assert len({pid for pid, _, _ in results}) == 2
    codes = [code for _, code, _ in results]
    assert len(set(codes)) == 2
    assert sorted(len(waits) for _, _, waits in results) == [0, 1]


@pytest.mark.hang_timeout(300)
def test_two_processes_log_in_at_once_with_one_secret(sshd_totp, tmp_path):
    mfa = [{"prompt": sshd_totp.totp_prompt, "totp": sshd_totp.totp_secret}]
    results = _in_two_processes(_login_in_a_process, sshd_totp.executor_parameters(), mfa,
                                str(tmp_path / "ledger"))
    assert len({pid for pid, _ in results}) == 2
    codes = [code for _, issued in results for code in issued]
    assert len(codes) == 2 and codes[0] != codes[1]
    assert sshd_totp.wait_for_log("Accepted keyboard-interactive/pam", 2) == 2
    assert "Failed keyboard-interactive" not in sshd_totp.read_log()
    # google-authenticator lists the steps it accepted: two, so neither login overlapped the
    # other's rewrite of its file (concurrent logins can both pass with ONE code otherwise).
    with open(os.path.join(sshd_totp.workdir, "totp", "google_authenticator")) as file:
        used = next(line for line in file if line.startswith('" DISALLOW_REUSE'))
    assert len(used.split()) == 4, used


@pytest.mark.parametrize("secret",
                         ["JBSWY3DP\udcffEHPK3PXP", "JBSWY3DPÉHPK3PXP", "NOT-BASE32!", "  "])
@pytest.mark.parametrize("method", ["issue", "wait_until_fresh"])
def test_a_secret_the_ledger_cannot_use_is_a_valueerror_quoting_none_of_it(
        tmp_path, method: str, secret: str) -> None:
    """Before, a secret UTF-8 cannot encode raised the codec's error, which holds all of it
    (the executors pass only secrets ``mfa_config`` checked; these are public methods)."""
    ledger = fake_ledger(str(tmp_path / "ledger"), FakeClock())
    with pytest.raises(ValueError, match=r"^secret (is not a valid base32|must not be empty)") \
            as info:
        getattr(ledger, method)(secret)
    chained: List[BaseException] = [info.value]
    while (chained[-1].__cause__ or chained[-1].__context__) is not None and len(chained) < 20:
        chained.append(chained[-1].__cause__ or chained[-1].__context__)  # type: ignore[arg-type]
    assert chained == [info.value]
    assert secret.strip() not in repr(info.value.args) or not secret.strip()


@pytest.mark.parametrize("method", ["issue", "wait_until_fresh"])
def test_a_secret_that_is_no_str_is_a_typeerror(tmp_path, method: str) -> None:
    ledger = fake_ledger(str(tmp_path / "ledger"), FakeClock())
    with pytest.raises(TypeError, match="^secret must be a str, not bytes"):
        getattr(ledger, method)(SECRET.encode())
