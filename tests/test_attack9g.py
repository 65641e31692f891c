"""attack9g: attacks on attack9f's fixes (timed TERM send, encode_text, LoginAbandoned),
against real servers. One regression test per defect (or a strict xfail naming what is left).
"""

from __future__ import annotations

from typing import Any, List

import pytest
from helpers import call_in_thread, outcome_within, wait_for
from test_attack_abandon import Totp, abandoned, ledger, login_waiting, totp  # noqa: F401

from paramiko_executor import CommandTimeout, ExecutorFailure, SSHExecutor


def _chain(error: BaseException) -> List[BaseException]:
    """``error`` and every exception it was raised from or during."""
    seen: List[BaseException] = []
    current: Any = error
    while current is not None and len(seen) < 20:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


@pytest.mark.hang_timeout(120)
def test_a_server_breaking_the_totp_wait_is_no_abandon_for_the_caller_waiting(
        totp: Totp, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """The ledger's ``abandoned`` was ``_Login.gone``, true also once the transport ended:
    the server dropping a login that waited for the next step raised `LoginAbandoned`
    ("the login was abandoned") to a caller that still waited."""
    from paramiko_executor.totp import LoginAbandoned

    second = SSHExecutor(**dict(totp.parameters, connect_retries=0))
    try:
        waiting = call_in_thread(lambda: second.run_command("echo never", timeout=60))
        login_waiting(caplog)
        totp.server.drop_connections()
        waiting["thread"].join(10)
        assert not waiting["thread"].is_alive(), "the caller still waits after the drop"
        error = waiting.get("error")
        assert isinstance(error, ExecutorFailure), waiting
        assert not any(isinstance(e, LoginAbandoned) for e in _chain(error)), _chain(error)
        assert "abandoned" not in str(error), error
        assert second.statistics().connect_failures == 1
    finally:
        second.close()


@pytest.mark.hang_timeout(120)
def test_a_server_breaking_the_totp_wait_nobody_waits_for_counts_as_failed(
        totp: Totp, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """attack9f counts a login the server broke though no caller waits (4fe1ba8), but a
    break while the login waited for the next TOTP step was a `LoginAbandoned` (the
    transport's end made ``gone`` true) and left out of ``connect_failures``."""
    from paramiko_executor import totp as totp_module

    # The ledger looks every 2 s: the caller has left and the server broken the
    # connection before it does, so both are true when it looks.
    monkeypatch.setattr(totp_module, "_ABANDON_POLL", 2.0)
    second = SSHExecutor(**totp.parameters)
    try:
        left = outcome_within(10, lambda: second.run_command("echo never", timeout=0.5))
        assert isinstance(left.get("error"), CommandTimeout), left
        totp.server.drop_connections()
        abandoned(totp.server, 0)
        wait_for(lambda: second.statistics().connect_failures == 1,
                 "the broken login to be counted", timeout=10)
        assert totp.server.totp_accepted == 1
    finally:
        second.close()


def _holds(error: BaseException, text: str) -> bool:
    """Whether ``error`` or an exception chained to it (shown or not) carries ``text``."""
    return any(text in repr(e) or text in repr(getattr(e, "object", "")) for e in _chain(error))


@pytest.mark.hang_timeout(60)
@pytest.mark.parametrize("where", ["ssh", "shell", "group", "password"])
def test_text_utf8_cannot_encode_stays_out_of_the_errors_context(sshd: Any, where: str) -> None:
    """attack9f's ``encode_text`` raised its ValueError inside the ``except``: ``from None``
    only hides the codec's UnicodeEncodeError from tracebacks; it stays the error's
    ``__context__``, whose ``object`` is the whole text (a ``sudo -S`` password, say)."""
    from paramiko_executor import HostGroup, ShellExecutor

    secret = "hunter2\udc80\n"
    with pytest.raises(ValueError) as caught:
        if where == "password":
            SSHExecutor(**dict(sshd.executor_parameters(), password=secret))
        elif where == "group":
            with HostGroup([sshd.executor_parameters()]) as group:
                group.run_command("sudo -S true", secret)
        else:
            with (SSHExecutor(**sshd.executor_parameters()) if where == "ssh"
                  else ShellExecutor()) as ex:
                ex.run_command("sudo -S true", secret, timeout=20)
    name = "password" if where == "password" else "stdin_input"
    assert name in str(caught.value)
    assert not _holds(caught.value, "hunter2"), [repr(e) for e in _chain(caught.value)]


@pytest.mark.hang_timeout(60)
def test_a_non_ascii_totp_secret_stays_out_of_the_errors_context(make_test_server: Any) -> None:
    """parse_mfa_config refused a secret ``from None`` inside the ``except``: base32's
    UnicodeEncodeError, the secret in its ``object``, stayed in the error's context chain."""
    server = make_test_server()
    secret = "JBSWY3DPEHPK3PXQé"
    with pytest.raises(ValueError) as caught:
        SSHExecutor(**server.executor_parameters(),
                    mfa_config=[{"prompt": "Verification code: ", "totp": secret}])
    assert "mfa_config[0]['totp']" in str(caught.value)
    assert not _holds(caught.value, "JBSWY3DPEHPK3PXQ"), [repr(e) for e in _chain(caught.value)]
