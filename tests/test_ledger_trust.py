"""The TOTP ledger trusts its files only as far as they deserve, and never holds a login long.

Local attackers: symlinks planted for ``totp-ledger`` and ``totp-ledger.key``
in a shared directory (their targets must stay untouched), a directory others
may write, a file of another user. A recorded step far ahead of the clock
(a clock that ran fast, or a forged line) is ignored. A failing read or write
concerns one login only. A login waits at most one time step, and its wait
ends with its deadline or once the connection is closed (against a real sshd).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import pwd
import threading
import time
from typing import Any, Dict, List

import pyotp
import pytest
from helpers import outcome_within
from test_totp_ledger import FakeClock, fake_ledger

from paramiko_executor import ExecutorFailure, SSHExecutor, auth
from paramiko_executor.errors import AuthenticationInterrupted
from paramiko_executor.totp import TOTPLedger

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = 1_000_040.0  # 20 s into a 30 s step
STEP = int(NOW // 30)
WAIT = 20.0  # seconds a call that must end early may take before the test counts it as hung
LOGGER = "paramiko_executor.auth"


def private_dir(parent: Any) -> Any:
    directory = parent / "private"
    directory.mkdir(mode=0o700)
    return directory


def snapshot(*paths: Any) -> Dict[str, Any]:
    return {str(p): (p.read_bytes(), os.stat(p).st_mtime_ns, os.stat(p).st_mode) for p in paths}


def issue_twice(ledger: TOTPLedger, clock: FakeClock) -> None:
    """Two codes in one step: this process's own record still makes the second wait."""
    ledger.issue(SECRET)
    ledger.issue(SECRET)
    assert len(clock.waits) == 1


# -- files and directories that are not to be trusted ---------------------------------------


@pytest.mark.parametrize("mode", [0o1777, 0o700])
def test_planted_symlinks_are_never_followed(tmp_path, caplog, mode):
    # 1777: a shared directory like /tmp (refused as a whole); 0700: the user's own
    # directory, where O_NOFOLLOW alone must refuse the links.
    victims = tmp_path / "victims"
    victims.mkdir()
    keys, secret_file = victims / "authorized_keys", victims / "other"
    keys.write_text("ssh-ed25519 AAAA... the victim's key\n")
    secret_file.write_text("precious\n")
    keys.chmod(0o600)
    secret_file.chmod(0o600)
    before = snapshot(keys, secret_file)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    (shared / "totp-ledger").symlink_to(keys)
    (shared / "totp-ledger.key").symlink_to(secret_file)
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        issue_twice(fake_ledger(shared / "totp-ledger", clock), clock)
    assert snapshot(keys, secret_file) == before
    assert str(shared / "totp-ledger") in caplog.text
    assert SECRET not in caplog.text


def test_a_symlinked_ledger_directory_is_not_used(tmp_path, caplog):
    elsewhere = private_dir(tmp_path)
    (tmp_path / "link").symlink_to(elsewhere)
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        issue_twice(fake_ledger(tmp_path / "link" / "totp-ledger", clock), clock)
    assert list(elsewhere.iterdir()) == []
    assert "not used for this login" in caplog.text


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o720])
def test_a_directory_others_may_write_is_not_used(tmp_path, caplog, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        issue_twice(fake_ledger(shared / "totp-ledger", clock), clock)
    assert list(shared.iterdir()) == []  # nothing created there
    assert str(shared / "totp-ledger") in caplog.text and "writable by other users" in caplog.text


@pytest.mark.parametrize("name", ["totp-ledger", "totp-ledger.key"])
def test_a_file_of_another_user_is_not_used(tmp_path, caplog, name):
    directory = private_dir(tmp_path)
    fake_ledger(directory / "totp-ledger", FakeClock(NOW - 3600)).issue(SECRET)  # both exist
    nobody = pwd.getpwnam("nobody")
    os.chown(directory / name, nobody.pw_uid, nobody.pw_gid)
    before = snapshot(directory / "totp-ledger", directory / "totp-ledger.key")
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        issue_twice(fake_ledger(directory / "totp-ledger", clock), clock)
    assert snapshot(directory / "totp-ledger", directory / "totp-ledger.key") == before
    assert "belongs to another user" in caplog.text and str(directory / name) in caplog.text


def test_a_file_others_may_write_is_not_used(tmp_path, caplog):
    directory = private_dir(tmp_path)
    fake_ledger(directory / "totp-ledger", FakeClock(NOW - 3600)).issue(SECRET)
    (directory / "totp-ledger").chmod(0o622)
    before = snapshot(directory / "totp-ledger")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fake_ledger(directory / "totp-ledger", FakeClock()).issue(SECRET)
    assert snapshot(directory / "totp-ledger") == before
    assert "writable by other users" in caplog.text


# -- implausible records ---------------------------------------------------------------------


def record(path: Any, step: int) -> None:
    """Write ``step`` as SECRET's record, keyed as the ledger keys it."""
    key = (path.parent / (path.name + ".key")).read_bytes()
    name = hmac.new(key, SECRET.encode(), hashlib.sha256).hexdigest()
    path.write_text(f"{name} {step}\n")


@pytest.mark.parametrize("ahead", [3, 2880, 10 ** 17])  # just too far, a day, overflow
def test_a_step_far_ahead_of_the_clock_is_ignored(tmp_path, caplog, ahead):
    path = private_dir(tmp_path) / "totp-ledger"
    fake_ledger(path, FakeClock(NOW - 3600)).issue(SECRET)  # makes the key
    record(path, STEP + ahead)
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        code = fake_ledger(path, clock).issue(SECRET)
    assert clock.waits == [] and code == pyotp.TOTP(SECRET).at(NOW)
    assert "ahead of the clock" in caplog.text
    assert path.read_text().split()[1] == str(STEP)  # replaced by the step just taken


def test_a_step_far_ahead_never_blocks_a_real_wait(tmp_path):
    # With the real Condition wait: a day ahead used to block for a day, and
    # 10**17 steps raised OverflowError.
    path = private_dir(tmp_path) / "totp-ledger"
    TOTPLedger(path=str(path)).issue(SECRET)
    now_step = int(time.time() // 30)
    outcome = outcome_within(WAIT, lambda: [record(path, now_step + ahead) or
                                   TOTPLedger(path=str(path)).issue(SECRET)
                                   for ahead in (2880, 10 ** 17)])
    assert "error" not in outcome, outcome


def test_a_plausible_step_ahead_waits_at_most_one_step(tmp_path):
    path = private_dir(tmp_path) / "totp-ledger"
    fake_ledger(path, FakeClock(NOW - 3600)).issue(SECRET)
    record(path, STEP + 1)  # the next step taken already: two steps to wait
    clock = FakeClock()
    with pytest.raises(AuthenticationInterrupted, match="within one time step"):
        fake_ledger(path, clock).issue(SECRET)
    assert clock.waits == []


# -- failures concern one login ---------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES, errno.ENOSPC])
def test_a_transient_failure_affects_that_login_only(tmp_path, caplog, monkeypatch, code):
    path = private_dir(tmp_path) / "totp-ledger"
    real_open = os.open
    failures: List[str] = []

    def failing_once(name: Any, *args: Any, **kwargs: Any) -> int:
        if os.path.basename(os.fspath(name)) == "totp-ledger" and not failures:
            failures.append(os.fspath(name))
            raise OSError(code, os.strerror(code), os.fspath(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_once)
    clock = FakeClock()
    ledger = fake_ledger(path, clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ledger.issue(SECRET)  # the file failed: this login is tracked in the process alone
    assert failures and os.strerror(code) in caplog.text
    clock.now += 30
    ledger.issue(SECRET)  # the next login uses the file again
    assert path.read_text().split()[1] == str(STEP + 1)


def test_a_real_failure_affects_that_login_only(tmp_path, caplog):
    path = private_dir(tmp_path) / "totp-ledger"
    path.mkdir()  # opening the ledger fails (EISDIR)
    clock = FakeClock()
    ledger = fake_ledger(path, clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ledger.issue(SECRET)
    assert "not used for this login" in caplog.text
    path.rmdir()
    clock.now += 30
    ledger.issue(SECRET)
    assert path.read_text().split()[1] == str(STEP + 1)


# -- the wait has a way out -------------------------------------------------------------------


def early_in_a_step() -> float:
    """How far to set a clock back so that it stands 1 s into a step: 29 s to the next."""
    return (time.time() - 1.0) % 30


def test_the_wait_ends_at_the_deadline_and_when_abandoned(tmp_path):
    path = str(private_dir(tmp_path) / "totp-ledger")
    shift = early_in_a_step()
    TOTPLedger(clock=lambda: time.time() - shift, path=path).issue(SECRET)
    waiting = TOTPLedger(clock=lambda: time.time() - shift, path=path)
    for kwargs in ({"deadline": time.monotonic() + 0.3}, {"abandoned": lambda: True}):
        outcome = outcome_within(WAIT, lambda kw=kwargs: waiting.wait_until_fresh(SECRET, **kw))
        assert isinstance(outcome.get("error"), AuthenticationInterrupted), outcome


@pytest.mark.hang_timeout(120)
def test_close_ends_a_login_waiting_for_a_fresh_code(sshd_totp, tmp_path, monkeypatch):
    shift = early_in_a_step()
    ledger = TOTPLedger(clock=lambda: time.time() - shift, path=str(tmp_path / "ledger"))
    ledger.issue(sshd_totp.totp_secret)  # this step's code is taken: a login waits ~29 s
    monkeypatch.setattr(auth, "TOTP_LEDGER", ledger)
    mfa = [{"prompt": sshd_totp.totp_prompt, "totp": sshd_totp.totp_secret}]
    executor = SSHExecutor(**sshd_totp.executor_parameters(), mfa_config=mfa, connect_retries=0)
    started = threading.Event()
    real_wait = ledger.wait_until_fresh

    def wait_until_fresh(secret: str, **kwargs: Any) -> None:
        started.set()
        real_wait(secret, **kwargs)

    monkeypatch.setattr(ledger, "wait_until_fresh", wait_until_fresh)

    outcome: Dict[str, Any] = {}

    def in_thread() -> None:
        try:
            outcome["result"] = executor.run_command("true")
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=in_thread, daemon=True)
    thread.start()
    assert started.wait(WAIT)
    executor.close()
    thread.join(10)
    assert not thread.is_alive(), "the login kept waiting after close()"
    assert isinstance(outcome.get("error"), ExecutorFailure), outcome
