"""Key + TOTP login against a real OpenSSH sshd (PAM google-authenticator, DISALLOW_REUSE).

``sshd_totp`` (tests/conftest.py) demands ``AuthenticationMethods publickey,keyboard-interactive``
with a fresh TOTP secret per test; google-authenticator refuses a code it already accepted, and
sshd logs every accepted and failed keyboard-interactive attempt, which the tests count.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pyotp
import pytest
from helpers import run_threads

from paramiko_executor import SSHExecutor
from paramiko_executor.results import AuthenticationFailure

STEP = 30


def mfa_of(server) -> list:
    return [{"prompt": server.totp_prompt, "totp": server.totp_secret}]


def kbd_accepted(server) -> int:
    return server.read_log().count("Accepted keyboard-interactive/pam for")


def kbd_failed(server) -> int:
    return server.read_log().count("Failed keyboard-interactive/pam for")


def log_after_disconnect(server) -> str:
    """sshd's log once it has logged the client's disconnect before authentication completed.

    sshd writes its log through the privilege-separation monitor, a little after it answers:
    this line comes after every line about the failed login.
    """
    for _ in range(100):  # bounded: 10 s
        text = server.read_log()
        if "Connection closed by authenticating user" in text:
            return text
        time.sleep(0.1)
    raise AssertionError("sshd never logged the disconnect")


def start_of_a_step(min_left: float = 5.0) -> None:
    """Return once the current TOTP step has at least ``min_left`` seconds left (bounded wait).

    So that a login and a reconnect right after it (well under a second apart) fall into the
    same step, and the test exercises the wait for the next one.
    """
    left = STEP - time.time() % STEP
    if left < min_left:
        time.sleep(left + 0.05)


def test_50_threads_on_a_fresh_executor_share_one_mfa_login(sshd_totp):
    ex = SSHExecutor(**sshd_totp.executor_parameters(), mfa_config=mfa_of(sshd_totp))
    with ex:
        results, errors = run_threads(lambda i: ex.run_command(f"echo {i}").stdout, 50, 120)
    assert errors == []
    assert results == {i: f"{i}\n" for i in range(50)}
    assert kbd_accepted(sshd_totp) == 1  # one authenticated connection for all 50 threads
    assert kbd_failed(sshd_totp) == 0


def _drop_connection(ex) -> None:
    with ex.bounded_connection as transport:
        transport.sock.shutdown(socket.SHUT_RDWR)  # the TCP connection ends under the executor


@pytest.mark.parametrize("reconnect", ["close", "drop"])
def test_reconnect_in_the_same_step_waits_for_the_next_code(sshd_totp, reconnect):
    with SSHExecutor(**sshd_totp.executor_parameters(), mfa_config=mfa_of(sshd_totp)) as ex:
        start_of_a_step()
        first_step = int(time.time() // STEP)
        ex.run_command("true")
        # Either the executor is closed, or its connection breaks (the next command finds it
        # dead, or fails on it and is retried): both make a new login in the same step.
        if reconnect == "close":
            ex.close()
        else:
            _drop_connection(ex)
        assert ex.run_command("echo again").stdout == "again\n"
        # The second login could not reuse the first code: it waited for the next step.
        assert int(time.time() // STEP) > first_step
    assert kbd_accepted(sshd_totp) == 2
    assert kbd_failed(sshd_totp) == 0  # the server never saw a reused code


def test_wrong_totp_secret_fails_once_and_is_not_retried(sshd_totp):
    wrong = [{"prompt": sshd_totp.totp_prompt, "totp": pyotp.random_base32()}]
    ex = SSHExecutor(**sshd_totp.executor_parameters(), mfa_config=wrong)  # default retries
    started = time.monotonic()
    with pytest.raises(AuthenticationFailure) as info:
        ex.run_command("true")
    assert time.monotonic() - started < 10  # a hang guard; the report has the measurement
    text = str(info.value)
    assert "keyboard-interactive (refused)" in text and "(partial success)" in text
    assert wrong[0]["totp"] not in text and sshd_totp.totp_secret not in text
    log = log_after_disconnect(sshd_totp)
    assert log.count("Failed keyboard-interactive/pam") == 1  # one try: never retried
    assert "Accepted keyboard-interactive" not in log


def test_unknown_prompt_is_never_answered(sshd_totp):
    other_prompt = [{"prompt": "Enter 2FA Token:", "totp": sshd_totp.totp_secret}]
    ex = SSHExecutor(**sshd_totp.executor_parameters(), mfa_config=other_prompt)
    with pytest.raises(AuthenticationFailure) as info:
        ex.run_command("true")
    assert f"prompt {sshd_totp.totp_prompt.strip()!r} not answered" in str(info.value)
    # Nothing was sent: no failed login counts against the account.
    assert "Failed keyboard-interactive" not in log_after_disconnect(sshd_totp)


def test_too_many_authentication_failures_is_an_authentication_failure(make_sshd, tmp_path):
    server = make_sshd(extra_config=["MaxAuthTries 2"])
    keys = []
    for i in range(3):
        path = str(tmp_path / f"stranger{i}")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
        keys.append(path)
    ex = SSHExecutor(**server.executor_parameters(client_keys=keys, connect_backoff=0.01))
    with pytest.raises(AuthenticationFailure, match="server closed the connection") as info:
        ex.run_command("true")
    # The server's own reason, from its DISCONNECT message. Had it been taken for a lost
    # connection, the retries would have ended in a plain ExecutorFailure instead.
    assert "Too many authentication failures" in str(info.value)
