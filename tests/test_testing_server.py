"""Tests of paramiko_executor.testing.SSHTestServer, driven by raw paramiko as the client.

The executor is not used here, so these tests hold even while it is broken.
Every wait has a bound: channels get a socket timeout and threads a join timeout.
"""

from __future__ import annotations

import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import paramiko
import pyotp
import pytest
from paramiko.common import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_REQUEST,
    MSG_CHANNEL_SUCCESS,
    MSG_CHANNEL_WINDOW_ADJUST,
    cMSG_CHANNEL_REQUEST,
)

from paramiko_executor.testing import SSHTestServer

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"

#: Seconds any single blocking client operation may take before the test fails.
WAIT = 30.0

@pytest.fixture
def clients() -> Iterator[List[paramiko.Transport]]:
    """Client transports opened by the test, closed at its end."""
    transports: List[paramiko.Transport] = []
    yield transports
    for transport in transports:
        transport.close()


def connect(server: SSHTestServer, clients: List[paramiko.Transport]) -> paramiko.Transport:
    """An unauthenticated client transport whose host key was checked."""
    sock = socket.create_connection((server.host, server.port), timeout=WAIT)
    transport = paramiko.Transport(sock)
    clients.append(transport)
    transport.start_client(timeout=WAIT)
    assert transport.get_remote_server_key().asbytes() == server.host_key.asbytes()
    return transport


def login(
    server: SSHTestServer, clients: List[paramiko.Transport], key_path: Optional[str] = None
) -> paramiko.Transport:
    """A client transport authenticated with a key (by default the server's client key)."""
    transport = connect(server, clients)
    key = paramiko.PKey.from_path(key_path or server.client_key_path)
    assert transport.auth_publickey(server.username, key) == []
    return transport


def read_all(read: Callable[[int], bytes]) -> bytes:
    chunks: List[bytes] = []
    while True:
        chunk = read(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def run(
    transport: paramiko.Transport, command: str, stdin: bytes = b""
) -> Tuple[bytes, bytes, int]:
    """Run `command` on its own channel; stdin is sent and both outputs read concurrently."""
    channel = transport.open_session(timeout=WAIT)
    channel.settimeout(WAIT)
    channel.exec_command(command)
    results: dict = {}

    def feed_and_read_stderr() -> None:
        channel.sendall(stdin)
        channel.shutdown_write()
        results["stderr"] = read_all(channel.recv_stderr)

    helper = threading.Thread(target=feed_and_read_stderr)
    helper.start()
    stdout = read_all(channel.recv)
    helper.join(WAIT)
    assert not helper.is_alive()
    status = channel.recv_exit_status()
    channel.close()
    return stdout, results["stderr"], status


def send_signal(channel: paramiko.Channel, name: str) -> None:
    """Send an RFC 4254 ``signal`` request; paramiko's client has no method for it."""
    message = paramiko.Message()
    message.add_byte(cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("signal")
    message.add_boolean(False)
    message.add_string(name)
    channel.transport._send_user_message(message)  # type: ignore[attr-defined]


def totp_answers(
    answers: Callable[[str], str], seen: List[str]
) -> Callable[[str, str, List[Tuple[str, bool]]], List[str]]:
    """A keyboard-interactive handler answering each prompt with ``answers(prompt)``."""

    def handler(title: str, instructions: str, prompts: List[Tuple[str, bool]]) -> List[str]:
        seen.extend(prompt for prompt, _ in prompts)
        return [answers(prompt) for prompt, _ in prompts]

    return handler


class RecordingTransport(paramiko.Transport):
    """A client transport that records, per channel, the messages the server sent."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.received: List[Tuple[int, str]] = []
        self.changed = threading.Condition()

    def kinds(self, chanid: int) -> List[str]:
        with self.changed:
            return [kind for channel, kind in self.received if channel == chanid]

    def wait_for_close(self, chanid: int) -> bool:
        """Wait (bounded) until the server's CLOSE for `chanid` has arrived."""
        with self.changed:
            return self.changed.wait_for(lambda: "close" in self.kinds(chanid), WAIT)


def _recording(ptype: int, handler: Callable[[paramiko.Channel, paramiko.Message], None]) -> Any:
    names = {
        MSG_CHANNEL_SUCCESS: "success",
        MSG_CHANNEL_DATA: "data",
        MSG_CHANNEL_EXTENDED_DATA: "stderr",
        MSG_CHANNEL_EOF: "eof",
        MSG_CHANNEL_CLOSE: "close",
    }

    def record(channel: paramiko.Channel, m: paramiko.Message) -> None:
        name = names.get(ptype, str(ptype))
        if ptype == MSG_CHANNEL_REQUEST:
            start = m.packet.tell()
            name = m.get_text()
            m.packet.seek(start)
        handler(channel, m)
        if ptype != MSG_CHANNEL_WINDOW_ADJUST:
            # A RecordingTransport's own attributes, and paramiko's private table below.
            with channel.transport.changed:  # type: ignore[attr-defined]
                channel.transport.received.append((channel.get_id(), name))  # type: ignore[attr-defined]
                channel.transport.changed.notify_all()  # type: ignore[attr-defined]

    return record


RecordingTransport._channel_handler_table = {  # type: ignore[attr-defined]
    ptype: _recording(ptype, handler)
    for ptype, handler in paramiko.Transport._channel_handler_table.items()  # type: ignore[attr-defined]
}


# -- commands -----------------------------------------------------------------------------------


def test_exec_returns_stdout_stderr_and_exit_status(test_server, clients):
    transport = login(test_server, clients)
    assert run(transport, "echo out; echo err >&2; exit 3") == (b"out\n", b"err\n", 3)
    assert run(transport, "true") == (b"", b"", 0)
    assert test_server.commands == ["echo out; echo err >&2; exit 3", "true"]


def test_reply_output_exit_status_eof_close_arrive_in_order(test_server, clients):
    sock = socket.create_connection((test_server.host, test_server.port), timeout=WAIT)
    transport = RecordingTransport(sock)
    clients.append(transport)
    transport.start_client(timeout=WAIT)
    transport.auth_publickey(
        test_server.username, paramiko.PKey.from_path(test_server.client_key_path)
    )
    for _ in range(20):
        channel = transport.open_session(timeout=WAIT)
        channel.settimeout(WAIT)
        channel.exec_command("echo out; echo err >&2")
        channel.shutdown_write()
        assert read_all(channel.recv) == b"out\n"
        assert read_all(channel.recv_stderr) == b"err\n"
        assert transport.wait_for_close(channel.get_id())
        kinds = transport.kinds(channel.get_id())
        # The exec reply comes first, output (in either order) before the exit
        # status, then EOF, then CLOSE: the order sshd sends them in.
        assert kinds[0] == "success"
        assert sorted(kinds[1:3]) == ["data", "stderr"]
        assert kinds[3:] == ["exit-status", "eof", "close"]


def test_stdin_is_relayed_and_eof_closes_it(test_server, clients):
    transport = login(test_server, clients)
    assert run(transport, "cat", b"line 1\nline 2") == (b"line 1\nline 2", b"", 0)
    assert run(transport, "cat") == (b"", b"", 0)
    assert run(transport, "wc -c", b"x" * 100_000) == (b"100000\n", b"", 0)


def test_large_stdin_through_cat(test_server, clients):
    transport = login(test_server, clients)
    data = bytes(range(256)) * (8 * 4096)  # 8 MiB
    stdout, stderr, status = run(transport, "cat", data)
    assert (len(stdout), stderr, status) == (len(data), b"", 0)
    assert stdout == data


def test_8_mib_interleaved_stdout_and_stderr(test_server, clients):
    transport = login(test_server, clients)
    script = (
        "import sys\n"
        "for _ in range(64):\n"
        "    sys.stdout.buffer.write(b'o' * 65536); sys.stdout.flush()\n"
        "    sys.stderr.buffer.write(b'e' * 65536); sys.stderr.flush()\n"
    )
    stdout, stderr, status = run(transport, f"{sys.executable} -c {shlex.quote(script)}")
    assert status == 0
    assert stdout == b"o" * (4 << 20)
    assert stderr == b"e" * (4 << 20)


def test_signal_term_ends_the_command(test_server, clients):
    transport = login(test_server, clients)
    channel = transport.open_session(timeout=WAIT)
    channel.settimeout(WAIT)
    channel.exec_command("echo started; sleep 30")
    assert channel.recv(100) == b"started\n"
    send_signal(channel, "TERM")
    # Without the signal this recv would run into the channel timeout and raise.
    assert read_all(channel.recv) == b""
    # Killed by a signal: like sshd the server sends exit-signal, not exit-status.
    assert channel.recv_exit_status() == -1


def test_signal_right_after_exec_is_not_lost(test_server, clients):
    transport = login(test_server, clients)
    for _ in range(5):
        channel = transport.open_session(timeout=WAIT)
        channel.settimeout(WAIT)
        channel.exec_command("sleep 30")
        # Often handled before the process exists: the server delivers it once it does.
        send_signal(channel, "TERM")
        assert read_all(channel.recv) == b""
        assert channel.recv_exit_status() == -1
        channel.close()


def test_client_closing_the_channel_frees_its_slot(make_test_server, clients):
    server = make_test_server(max_sessions=1)
    transport = login(server, clients)
    channel = transport.open_session(timeout=WAIT)
    channel.exec_command("sleep 30")
    channel.close()
    # The CLOSE travels before the next open on the same connection: the slot is free.
    assert run(transport, "echo again") == (b"again\n", b"", 0)


def test_200_threads_2000_commands_over_one_connection(make_test_server, clients):
    server = make_test_server(max_sessions=10)
    transport = login(server, clients)
    slots = threading.BoundedSemaphore(10)
    failures: List[str] = []

    def run_with_slot(number: int) -> None:
        # paramiko's client answers the server's CLOSE in its transport thread,
        # after the channel already looks closed to this thread: an open sent
        # right after can overtake that CLOSE and be refused at MaxSessions, as
        # with sshd. A bare-paramiko client has to retry such a refusal.
        for _ in range(100):
            try:
                with slots:
                    result = run(transport, f"echo {number}")
                break
            except paramiko.ChannelException:
                continue
        else:
            failures.append(f"{number}: refused 100 times")
            return
        if result != (f"{number}\n".encode(), b"", 0):
            failures.append(f"{number}: {result!r}")

    def worker(first: int) -> None:
        for number in range(first, first + 10):
            run_with_slot(number)

    threads = [threading.Thread(target=worker, args=(first,)) for first in range(0, 2000, 10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not [thread for thread in threads if thread.is_alive()]
    assert failures == []
    assert server.connections_accepted == 1
    assert len(server.commands) == 2000
    assert server.peak_channels <= 10
    assert server.channels_opened == 2000


# -- MaxSessions --------------------------------------------------------------------------------


def test_max_sessions_refuses_the_channel_past_the_limit(make_test_server, clients):
    server = make_test_server(max_sessions=3)
    transport = login(server, clients)
    channels = [transport.open_session(timeout=WAIT) for _ in range(3)]
    with pytest.raises(paramiko.ChannelException) as refused:
        transport.open_session(timeout=WAIT)
    assert refused.value.code == paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
    assert (server.channels_opened, server.channels_refused, server.peak_channels) == (3, 1, 3)
    # The limit is per connection.
    other = login(server, clients)
    others = [other.open_session(timeout=WAIT) for _ in range(3)]
    # Closing one channel frees its slot for the next open on that connection.
    channels.pop().close()
    channels.append(transport.open_session(timeout=WAIT))
    assert server.open_channels == 6
    assert server.peak_channels == 3
    for channel in channels + others:
        channel.close()


def test_max_sessions_none_is_unlimited(make_test_server, clients):
    server = make_test_server(max_sessions=None)
    transport = login(server, clients)
    channels = [transport.open_session(timeout=WAIT) for _ in range(40)]
    assert (server.peak_channels, server.channels_refused) == (40, 0)
    for channel in channels:
        channel.close()


# -- authentication -----------------------------------------------------------------------------


def test_password_authentication(make_test_server, clients):
    server = make_test_server(password="s3cret-pw")
    assert connect(server, clients).auth_password(server.username, "s3cret-pw") == []
    with pytest.raises(paramiko.AuthenticationException):
        connect(server, clients).auth_password(server.username, "wrong")
    with pytest.raises(paramiko.AuthenticationException):
        connect(server, clients).auth_password("someone-else", "s3cret-pw")
    assert server.logins == 1


def test_unknown_key_and_wrong_user_are_refused(test_server, clients):
    with pytest.raises(paramiko.AuthenticationException):
        connect(test_server, clients).auth_publickey(
            test_server.username, paramiko.ECDSAKey.generate()
        )
    with pytest.raises(paramiko.AuthenticationException):
        connect(test_server, clients).auth_publickey(
            "root", paramiko.PKey.from_path(test_server.client_key_path)
        )
    assert test_server.logins == 0


def test_authorized_keys_replace_the_generated_key(make_test_server, clients, tmp_path):
    by_object, by_file = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    public = tmp_path / "authorized_keys"
    public.write_text(f"# comment\n{by_file.get_name()} {by_file.get_base64()} me@host\n")
    server = make_test_server(authorized_keys=[by_object, str(public)])
    for key in (by_object, by_file):
        assert connect(server, clients).auth_publickey(server.username, key) == []
    with pytest.raises(paramiko.AuthenticationException):
        connect(server, clients).auth_publickey(
            server.username, paramiko.PKey.from_path(server.client_key_path)
        )


def test_key_then_totp_and_reuse_rejection(make_test_server, clients):
    secret = pyotp.random_base32()
    server = make_test_server(totp_secret=secret, totp_prompts=("Enter 2FA Token:",))
    key = paramiko.PKey.from_path(server.client_key_path)
    totp = pyotp.TOTP(secret)
    code = totp.now()
    seen: List[str] = []

    transport = connect(server, clients)
    assert transport.auth_publickey(server.username, key) == ["keyboard-interactive"]
    assert transport.auth_interactive(server.username, totp_answers(lambda p: code, seen)) == []
    assert seen == ["Enter 2FA Token:"]
    assert run(transport, "echo in") == (b"in\n", b"", 0)

    # The same code again is refused, even inside its time step.
    transport = connect(server, clients)
    transport.auth_publickey(server.username, key)
    with pytest.raises(paramiko.AuthenticationException):
        transport.auth_interactive(server.username, totp_answers(lambda p: code, seen))

    # A wrong code is refused; the next step's code is fresh and accepted.
    transport = connect(server, clients)
    transport.auth_publickey(server.username, key)
    wrong = f"{(int(code) + 1) % 1000000:06d}"
    with pytest.raises(paramiko.AuthenticationException):
        transport.auth_interactive(server.username, totp_answers(lambda p: wrong, seen))
    transport = connect(server, clients)
    transport.auth_publickey(server.username, key)
    next_code = totp.at(time.time() + totp.interval)
    answers = totp_answers(lambda p: next_code, seen)
    assert transport.auth_interactive(server.username, answers) == []
    assert (server.logins, server.totp_accepted) == (2, 2)


def test_totp_cannot_skip_the_key_step(make_test_server, clients):
    secret = pyotp.random_base32()
    server = make_test_server(totp_secret=secret)
    transport = connect(server, clients)
    with pytest.raises(paramiko.AuthenticationException):
        transport.auth_interactive(
            server.username, totp_answers(lambda p: pyotp.TOTP(secret).now(), [])
        )
    assert server.logins == 0


def test_password_then_totp(make_test_server, clients):
    secret = pyotp.random_base32()
    server = make_test_server(
        password="pw", totp_secret=secret, auth_methods=("password", "keyboard-interactive")
    )
    transport = connect(server, clients)
    with pytest.raises(paramiko.AuthenticationException):
        transport.auth_publickey(server.username, paramiko.PKey.from_path(server.client_key_path))
    assert transport.auth_password(server.username, "pw") == ["keyboard-interactive"]
    code = pyotp.TOTP(secret).now()
    assert transport.auth_interactive(server.username, totp_answers(lambda p: code, [])) == []
    assert run(transport, "echo ok") == (b"ok\n", b"", 0)


def test_two_totp_prompts_with_their_own_secrets(make_test_server, clients):
    secrets = {"First code:": pyotp.random_base32(), "Second code:": pyotp.random_base32()}
    server = make_test_server(
        totp_prompts=tuple(secrets), totp_secret=tuple(secrets.values())
    )
    assert server.mfa_config() == [{"prompt": p, "totp": s} for p, s in secrets.items()]
    seen: List[str] = []
    transport = connect(server, clients)
    transport.auth_publickey(server.username, paramiko.PKey.from_path(server.client_key_path))
    answers = totp_answers(lambda prompt: pyotp.TOTP(secrets[prompt]).now(), seen)
    assert transport.auth_interactive(server.username, answers) == []
    # One prompt per round, in order, as PAM modules ask them.
    assert seen == ["First code:", "Second code:"]


def test_keyboard_interactive_password_prompt(make_test_server, clients):
    secret = pyotp.random_base32()
    server = make_test_server(
        password="pw",
        password_prompt="Password: ",
        totp_secret=secret,
        auth_methods=("keyboard-interactive",),
    )
    code = pyotp.TOTP(secret).now()
    seen: List[str] = []
    transport = connect(server, clients)
    answers = totp_answers(lambda prompt: "pw" if prompt == "Password: " else code, seen)
    assert transport.auth_interactive(server.username, answers) == []
    assert seen == ["Password: ", "Verification code: "]


def test_password_prompt_alone_is_a_password_login(make_test_server, clients):
    server = make_test_server(password="pw", password_prompt="Password:")
    seen: List[str] = []
    transport = connect(server, clients)
    assert transport.auth_interactive(server.username, totp_answers(lambda p: "pw", seen)) == []
    assert seen == ["Password:"]
    with pytest.raises(paramiko.AuthenticationException):
        connect(server, clients).auth_interactive(
            server.username, totp_answers(lambda p: "wrong", [])
        )


def test_forced_command(make_test_server, clients):
    server = make_test_server(forced_command='echo "forced: $SSH_ORIGINAL_COMMAND"')
    assert server.forced_key_path is not None
    forced = login(server, clients, server.forced_key_path)
    assert run(forced, "echo hi") == (b"forced: echo hi\n", b"", 0)
    assert server.commands == ["echo hi"]
    # A shell request runs the forced command too, without SSH_ORIGINAL_COMMAND.
    channel = forced.open_session(timeout=WAIT)
    channel.settimeout(WAIT)
    channel.invoke_shell()
    assert read_all(channel.recv) == b"forced: \n"
    # The ordinary key is not restricted, and gets no shell.
    normal = login(server, clients)
    assert run(normal, "echo hi") == (b"hi\n", b"", 0)
    with pytest.raises(paramiko.SSHException):
        normal.open_session(timeout=WAIT).invoke_shell()


# -- fault injection ----------------------------------------------------------------------------


def test_drop_connections_closes_every_connection(test_server, clients):
    transports = [login(test_server, clients) for _ in range(3)]
    channel = transports[0].open_session(timeout=WAIT)
    channel.settimeout(WAIT)
    channel.exec_command("sleep 30")
    test_server.drop_connections()
    assert read_all(channel.recv) == b""  # the running command's channel ends too
    for transport in transports:
        transport.join(WAIT)  # the client's transport thread ends with the connection
        assert not transport.is_active()
    # The server still serves new connections.
    assert run(login(test_server, clients), "echo back") == (b"back\n", b"", 0)
    assert test_server.connections_accepted == 4


def test_freeze_stops_answering_until_thaw(test_server, clients):
    transport = login(test_server, clients)
    answered = threading.Event()

    def keepalive() -> None:
        transport.global_request("keepalive@openssh.com", wait=True)
        answered.set()

    test_server.freeze()
    assert test_server.frozen
    asking = threading.Thread(target=keepalive, daemon=True)
    asking.start()
    # A bounded wait for a reply that must not come while frozen.
    assert not answered.wait(1.0)
    assert transport.is_active()  # TCP stays up
    test_server.thaw()
    assert answered.wait(WAIT)
    asking.join(WAIT)
    assert transport.is_active()
    assert run(transport, "echo thawed") == (b"thawed\n", b"", 0)


def test_stop_while_frozen(clients):
    server = SSHTestServer().start()
    try:
        transport = login(server, clients)
        channel = transport.open_session(timeout=WAIT)
        channel.settimeout(WAIT)
        channel.exec_command("sleep 30")
        server.freeze()
    finally:
        server.stop()
    # stop() waited (bounded) for the connection's thread: it ended although frozen.
    assert server.active_connections == 0
    assert read_all(channel.recv) == b""
    transport.join(WAIT)
    assert not transport.is_active()


def test_refuse_and_accept_connections(test_server, clients):
    port = test_server.port
    test_server.refuse_connections()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((test_server.host, port), timeout=WAIT).close()
    test_server.accept_connections()
    assert test_server.port == port
    assert run(login(test_server, clients), "echo up") == (b"up\n", b"", 0)


# -- lifecycle and helpers ----------------------------------------------------------------------


def test_stop_ends_connections_commands_and_files(clients):
    server = SSHTestServer().start()
    try:
        directory, port = server.directory, server.port
        transport = login(server, clients)
        channel = transport.open_session(timeout=WAIT)
        channel.settimeout(WAIT)
        channel.exec_command("sleep 30")
    finally:
        server.stop()
    assert read_all(channel.recv) == b""
    transport.join(WAIT)
    assert not transport.is_active()
    assert not directory.exists()
    assert server.active_connections == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, port), timeout=WAIT).close()
    server.stop()  # a second stop does nothing
    with pytest.raises(RuntimeError):
        server.start()


def test_executor_parameters_and_known_hosts(test_server):
    parameters = test_server.executor_parameters(on_disconnect_retry=0)
    assert parameters == {
        "host": "127.0.0.1",
        "port": test_server.port,
        "username": "test",
        "client_keys": [test_server.client_key_path],
        "known_hosts": str(test_server.known_hosts_path),
        "config": (),
        "on_disconnect_retry": 0,
    }
    host_keys = paramiko.HostKeys(str(test_server.known_hosts_path))
    entry = host_keys.lookup(f"[127.0.0.1]:{test_server.port}")
    assert entry is not None
    assert entry[test_server.host_key.get_name()].asbytes() == test_server.host_key.asbytes()
    assert Path(test_server.client_key_path).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"max_sessions": -1}, ValueError, "max_sessions"),
        ({"max_sessions": True}, TypeError, "max_sessions"),
        ({"max_sessions": "10"}, TypeError, "max_sessions"),
        ({"port": 70000}, ValueError, "port"),
        ({"username": ""}, ValueError, "username"),
        ({"username": None}, TypeError, "username"),
        ({"password": b"pw"}, TypeError, "password"),
        ({"forced_command": ""}, ValueError, "forced_command"),
        ({"totp_prompts": "Code:", "totp_secret": SECRET}, TypeError, "totp_prompts"),
        ({"auth_methods": ("publickey", "smartcard")}, ValueError, "auth_methods"),
        ({"auth_methods": ("password",)}, ValueError, "password"),
        ({"auth_methods": ("keyboard-interactive",)}, ValueError, "totp_secret"),
        ({"password_prompt": "Password: "}, ValueError, "password"),
        ({"authorized_keys": "/some/file.pub"}, TypeError, "authorized_keys"),
        ({"host_key": "key"}, TypeError, "host_key"),
        (
            {"totp_secret": (SECRET,), "totp_prompts": ("A:", "B:")},
            ValueError,
            "totp_secret",
        ),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: Any, error: type, name: str):
    with pytest.raises(error, match=name):
        SSHTestServer(**kwargs)


def test_secrets_stay_out_of_repr_and_errors():
    server = SSHTestServer(password="pw-must-not-leak", totp_secret=SECRET)
    assert "pw-must-not-leak" not in repr(server)
    assert SECRET not in repr(server)
    with pytest.raises(ValueError) as bad:
        SSHTestServer(totp_secret="not base32 !!! secret-must-not-leak")
    assert "secret-must-not-leak" not in str(bad.value)
    assert bad.value.__cause__ is None and bad.value.__suppress_context__
