"""Passwords, passphrases and TOTP secrets never reach a log record, a repr or an exception text.

Every logger runs at DEBUG (paramiko's own included) through a full MFA login, a failed login
and a failed command; then every captured record (formatted with its arguments and traceback),
every repr and every exception text (with its causes) is searched for each secret.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import traceback
from typing import Iterator, List

import pyotp
import pytest

from paramiko_executor import SSHExecutor
from paramiko_executor.auth import Credentials, parse_mfa_config
from paramiko_executor.results import (
    AuthenticationFailure,
    CommandExecutionFailure,
    ExecutorFailure,
)

PASSWORD = "Pw-9f1c2e-never-in-logs"
PASSPHRASE = "Pp-77ab31-never-in-logs"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def all_logs() -> Iterator[_Collect]:
    """Every logger at DEBUG, every record collected; levels and handlers restored afterwards."""
    collect = _Collect()
    manager = logging.Logger.manager
    loggers = [logging.getLogger()] + [
        logger for logger in manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
        if not logger.propagate or logger is loggers[0]:
            logger.addHandler(collect)
    try:
        yield collect
    finally:
        for logger, level, disabled in saved:
            logger.setLevel(level)
            logger.disabled = disabled
            logger.removeHandler(collect)


def _texts_of_records(records: List[logging.LogRecord]) -> List[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts = []
    for record in records:
        texts.append(formatter.format(record))
        texts.append(repr(record.args))
        if record.exc_info:
            texts.append(formatter.formatException(record.exc_info))
    return texts


def _texts_of_error(error: BaseException) -> List[str]:
    return [str(error), repr(error)] + traceback.format_exception(
        type(error), error, error.__traceback__
    )


def _assert_secret_free(texts: List[str], secrets: List[str]) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"a secret leaked into: {text[:200]!r}"


def _encrypted_copy(key_path: str, directory) -> str:
    path = str(directory / "encrypted_key")
    shutil.copyfile(key_path, path)
    os.chmod(path, 0o600)  # ssh-keygen refuses a private key others can read
    subprocess.run(
        ["ssh-keygen", "-q", "-p", "-P", "", "-N", PASSPHRASE, "-f", path],
        check=True,
        capture_output=True,
    )
    return path


def test_no_secret_in_logs_reprs_or_errors_with_real_sshd(sshd_totp, all_logs, tmp_path):
    secret = sshd_totp.totp_secret
    wrong_secret = pyotp.random_base32()
    secrets = [secret, wrong_secret, PASSWORD, PASSPHRASE]
    key = _encrypted_copy(sshd_totp.client_key_path, tmp_path)
    mfa = [{"prompt": sshd_totp.totp_prompt, "totp": secret}]
    params = sshd_totp.executor_parameters(client_keys=[key], passphrase=PASSPHRASE,
                                           password=PASSWORD)
    texts: List[str] = []

    ex = SSHExecutor(**params, mfa_config=mfa)
    texts += [repr(ex), str(ex), repr(parse_mfa_config(mfa))]
    assert ex.run_command("echo hi").stdout == "hi\n"  # a full key + TOTP login
    with pytest.raises(CommandExecutionFailure) as failed_command:
        ex.run_command("echo out; echo err >&2; exit 3", stdin_input="input")
    texts += _texts_of_error(failed_command.value)
    ex.close()

    wrong = SSHExecutor(**params, mfa_config=[{"prompt": sshd_totp.totp_prompt,
                                               "totp": wrong_secret}])
    with pytest.raises(AuthenticationFailure) as failed_login:
        wrong.run_command("true")
    texts += _texts_of_error(failed_login.value) + [repr(wrong)]

    with pytest.raises(ValueError) as bad_config:
        SSHExecutor(**params, mfa_config=[{"prompt": "x", "totp": PASSWORD}])
    texts += _texts_of_error(bad_config.value)

    names = {record.name for record in all_logs.records}
    # The capture saw the login in detail, so finding nothing means something.
    assert any(n.startswith("paramiko.transport") for n in names)
    assert "paramiko_executor.auth" in names
    assert any("keyboard-interactive" in r.getMessage() for r in all_logs.records)
    _assert_secret_free(texts + _texts_of_records(all_logs.records), secrets)


@pytest.mark.parametrize("via", ["password", "keyboard-interactive"])
def test_no_password_in_paramiko_debug_logs(make_test_server, all_logs, via):
    secret = pyotp.random_base32()
    extra = {"password_prompt": "Password: "} if via == "keyboard-interactive" else {}
    methods = ["keyboard-interactive"] if via == "keyboard-interactive" else [
        "password", "keyboard-interactive"]
    server = make_test_server(password=PASSWORD, totp_secret=secret, authorized_keys=[],
                              auth_methods=methods, **extra)
    params = server.executor_parameters(client_keys=[], password=PASSWORD, allow_agent=False,
                                        look_for_keys=False)
    texts: List[str] = []
    ex = SSHExecutor(**params, mfa_config=server.mfa_config())
    assert ex.run_command("echo hi").stdout == "hi\n"
    texts.append(repr(ex))
    ex.close()
    # Another secret, so that the ledger need not wait for the next step: the login fails at
    # the password anyway.
    other = pyotp.random_base32()
    bad = SSHExecutor(**dict(params, password="wrong-" + PASSWORD),
                      mfa_config=[{"prompt": server.mfa_config()[0]["prompt"], "totp": other}])
    with pytest.raises(ExecutorFailure) as failed_login:
        bad.run_command("true")
    texts += _texts_of_error(failed_login.value)
    assert any(r.name.startswith("paramiko.") for r in all_logs.records)
    _assert_secret_free(texts + _texts_of_records(all_logs.records), [PASSWORD, secret, other])


def test_credentials_repr_hides_everything_secret():
    creds = Credentials(
        username="u",
        password=PASSWORD,
        passphrase=PASSPHRASE,
        mfa=parse_mfa_config([{"prompt": "p", "totp": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"}]),
    )
    _assert_secret_free([repr(creds), str(creds)],
                        [PASSWORD, PASSPHRASE, "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"])


@pytest.mark.parametrize("name", ["password", "passphrase"])
def test_a_secret_utf8_cannot_encode_is_refused_without_quoting_it(name):
    """paramiko's encode raised `UnicodeEncodeError`, whose args hold the whole secret."""
    secret = PASSWORD + "\udc80"
    with pytest.raises(ValueError) as raised:
        SSHExecutor(host="127.0.0.1", **{name: secret})
    assert name in str(raised.value)
    texts = [str(raised.value), repr(raised.value), repr(raised.value.args),
             "".join(traceback.format_exception(raised.value))]
    _assert_secret_free(texts, [PASSWORD])
