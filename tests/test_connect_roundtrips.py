"""What a connect sends: no request the login does not need, the probe's opens at once.

Counted on the wire's message types, through a ``transport_factory`` that
records every message the client sends, against a real OpenSSH sshd and the
project's test server. (How many round trips that makes over a real-latency
path is measured by benchmarks/wan.py, not here.)
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Counter, List

import paramiko
from paramiko.common import MSG_CHANNEL_OPEN, MSG_SERVICE_REQUEST, MSG_USERAUTH_REQUEST

from paramiko_executor import SSHExecutor

SENT: List[int] = []


class Recording(paramiko.Transport):
    """Records the type of every message it sends."""

    def _send_message(self, data: Any) -> None:
        SENT.append(data.asbytes()[0])
        super()._send_message(data)  # type: ignore[misc]


def sent_types() -> Counter[int]:
    return collections.Counter(SENT)


def test_a_key_login_sends_one_service_request_and_one_authentication_request(sshd: Any) -> None:
    SENT.clear()
    with SSHExecutor(**sshd.executor_parameters(transport_factory=Recording,
                                                max_sessions=10)) as ex:
        assert ex.run_command("echo in").stdout == "in\n"
    counts = sent_types()
    # No "none" request before the key, no service request per attempt.
    assert counts[MSG_SERVICE_REQUEST] == 1
    assert counts[MSG_USERAUTH_REQUEST] == 1


def test_the_first_authentication_request_goes_with_the_service_request(
        make_test_server: Any) -> None:
    # The server freezes as the service request leaves: the authentication
    # request must follow without waiting for the service accept.
    server = make_test_server(max_sessions=10)
    followed: List[bool] = []

    def watch() -> None:
        deadline = time.monotonic() + 10
        while MSG_USERAUTH_REQUEST not in SENT and time.monotonic() < deadline:
            time.sleep(0.01)
        followed.append(MSG_USERAUTH_REQUEST in SENT)
        server.thaw()

    class FreezingAtService(Recording):
        def _send_message(self, data: Any) -> None:
            if data.asbytes()[0] == MSG_SERVICE_REQUEST:
                server.freeze()
                threading.Thread(target=watch).start()
            super()._send_message(data)

    SENT.clear()
    try:
        with SSHExecutor(**server.executor_parameters(transport_factory=FreezingAtService,
                                                      max_sessions=10)) as ex:
            ex.run_command("true")
    finally:
        server.thaw()
    assert followed == [True]


def test_a_password_after_a_refused_key_asks_for_the_service_once(make_test_server: Any) -> None:
    server = make_test_server(password="sesame", authorized_keys=[])
    SENT.clear()
    params = server.executor_parameters(transport_factory=Recording, password="sesame",
                                        allow_agent=False, look_for_keys=False, max_sessions=10)
    with SSHExecutor(**params) as ex:
        ex.run_command("true")
    counts = sent_types()
    assert counts[MSG_SERVICE_REQUEST] == 1
    assert counts[MSG_USERAUTH_REQUEST] == 2  # the refused key, then the password


def test_a_connect_probes_once_per_server(make_test_server: Any) -> None:
    server = make_test_server(max_sessions=10)
    params = server.executor_parameters(transport_factory=Recording)
    SENT.clear()
    with SSHExecutor(**params) as ex:
        ex.run_command("true")  # on a channel the probe kept: no open of its own
    # One wave (10 confirmed, 6 refused), and the spare asked for after the
    # command if a probe channel's CLOSE had freed a slot by then.
    assert sent_types()[MSG_CHANNEL_OPEN] in (16, 17)
    SENT.clear()
    with SSHExecutor(**params) as ex:
        ex.run_command("true")
    # The limit was remembered: the command's own open, and the spare it asked for.
    assert sent_types()[MSG_CHANNEL_OPEN] == 2
