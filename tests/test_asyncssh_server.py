"""Logins to asyncssh's own SSH server: a key, a password, keyboard-interactive TOTP.

asyncssh servers (>= 2.14.1) disconnect a client that asks for the
``ssh-userauth`` service twice, as paramiko's ``auth_*`` calls do each time;
the executor asks once per connection. A server that disconnects during
authentication for a protocol reason fails the connect at once, without retries.
"""

from __future__ import annotations

from typing import Any, Iterator

import paramiko
import pyotp
import pytest

from paramiko_executor import SSHExecutor, internals
from paramiko_executor.errors import AuthenticationFailure, ExecutorFailure
from testsupport.asyncssh_server import TOTP_PROMPT, AsyncSSHServer


@pytest.fixture
def make_asyncssh() -> Iterator[Any]:
    servers = []

    def make(**kwargs: Any) -> AsyncSSHServer:
        server = AsyncSSHServer(**kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.close()


def test_key_login(make_asyncssh: Any) -> None:
    server = make_asyncssh()
    with SSHExecutor(**server.executor_parameters(), connect_retries=0) as ex:
        assert ex.run_command("echo key").stdout == "key\n"
        assert ex.statistics().max_sessions is not None
    assert server.connections == 1


def test_password_login_after_a_refused_key(make_asyncssh: Any) -> None:
    # The key is refused first: the password goes out on the same connection
    # without asking for the service again.
    server = make_asyncssh(allow_key=False, password="sesame")
    params = server.executor_parameters(password="sesame", allow_agent=False,
                                        look_for_keys=False, connect_retries=0)
    with SSHExecutor(**params) as ex:
        assert ex.run_command("echo password").stdout == "password\n"
    assert server.connections == 1


def test_keyboard_interactive_totp_login(make_asyncssh: Any) -> None:
    secret = pyotp.random_base32()
    server = make_asyncssh(allow_key=False, totp_secret=secret)
    params = server.executor_parameters(
        client_keys=[], allow_agent=False, look_for_keys=False, connect_retries=0,
        mfa_config=[{"prompt": TOTP_PROMPT, "totp": secret}])
    with SSHExecutor(**params) as ex:
        assert ex.run_command("echo totp").stdout == "totp\n"


def test_wrong_password_is_an_authentication_failure(make_asyncssh: Any) -> None:
    server = make_asyncssh(allow_key=False, password="sesame")
    params = server.executor_parameters(password="wrong", client_keys=[], allow_agent=False,
                                        look_for_keys=False, connect_retries=3,
                                        connect_backoff=0.0)
    with pytest.raises(AuthenticationFailure):
        SSHExecutor(**params).run_command("true")
    assert server.connections == 1


def test_a_protocol_disconnect_during_login_is_not_retried(
        make_asyncssh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Asking for the service with every request, as paramiko itself does, makes
    # asyncssh disconnect ("Unexpected service in service request"): no retry fixes that.
    monkeypatch.setattr(internals.UserAuth, "_asked",
                        property(lambda self: False, lambda self, value: None), raising=False)
    server = make_asyncssh(password="sesame")
    params = server.executor_parameters(password="sesame", client_keys=[], allow_agent=False,
                                        look_for_keys=False, connect_retries=3,
                                        connect_backoff=0.0)
    # A key the server does not know goes first: the password is the second request.
    with pytest.raises(ExecutorFailure, match="protocol reason") as caught:
        with SSHExecutor(**params, pkey=paramiko.ECDSAKey.generate()) as ex:
            ex.run_command("true")
    assert not isinstance(caught.value, AuthenticationFailure)
    assert server.connections == 1
