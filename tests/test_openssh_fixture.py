"""Tests of the private OpenSSH server fixture, driven with raw paramiko.

They prove the fixture gives what the executor tests rely on: a verified host
key, MaxSessions enforced by the real sshd, a per-connection process that can
be killed or frozen, a forced-command key, and key + TOTP login through PAM
with single-use codes.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from typing import Callable, List, Optional

import paramiko
import pyotp
import pytest
from conftest import openssh_unavailable, require_sshd

from testsupport.openssh import OpenSSHServer, OpenSSHUnavailable, close_all

WAIT = 10.0  # seconds: the bound on every wait for the server below


def connect(server: OpenSSHServer, key_path: Optional[str] = None) -> paramiko.SSHClient:
    """Log in with paramiko's SSHClient, checking the host key against the fixture's file."""
    client = paramiko.SSHClient()
    client.load_host_keys(server.known_hosts_path)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        server.host,
        server.port,
        server.username,
        key_filename=key_path or server.client_key_path,
        look_for_keys=False,
        allow_agent=False,
        timeout=WAIT,
    )
    return client


def run(transport: paramiko.Transport, command: str, stdin: bytes = b"") -> tuple[int, bytes]:
    """Run ``command`` on a new session channel; return (exit status, stdout)."""
    channel = transport.open_session(timeout=WAIT)
    channel.settimeout(WAIT)
    channel.exec_command(command)
    if stdin:
        channel.sendall(stdin)
    channel.shutdown_write()
    out = b""
    while True:
        chunk = channel.recv(65536)
        if not chunk:
            break
        out += chunk
    status = channel.recv_exit_status()
    channel.close()
    return status, out


def totp_transport(server: OpenSSHServer, code: str, prompts: List[str]) -> paramiko.Transport:
    """Key, then keyboard-interactive answering every prompt with ``code``.

    Appends the prompts seen to ``prompts``; raises AuthenticationException on refusal.
    """
    transport = paramiko.Transport((server.host, server.port))
    try:
        transport.start_client(timeout=WAIT)
        assert transport.get_remote_server_key() == server.host_public_key
        key = paramiko.Ed25519Key.from_private_key_file(server.client_key_path)
        # Partial success: the key is accepted, keyboard-interactive must follow.
        assert transport.auth_publickey(server.username, key) == ["keyboard-interactive"]

        def answer(title: str, instructions: str, questions: list) -> List[str]:
            prompts.extend(text for text, _echo in questions)
            return [code] * len(questions)

        transport.auth_interactive(server.username, answer)
    except BaseException:
        transport.close()
        raise
    assert transport.is_authenticated()
    return transport


# ------------------------------------------------------------------ login


def test_key_login_with_verified_host_key(sshd: OpenSSHServer) -> None:
    with connect(sshd) as client:
        transport = client.get_transport()
        assert transport.get_remote_server_key() == sshd.host_public_key
        assert run(transport, "id -un") == (0, b"pe-test\n")
    assert sshd.wait_for_log("Accepted publickey for pe-test") >= 1


def test_wrong_host_key_is_rejected(sshd: OpenSSHServer, sshd3: OpenSSHServer, tmp_path) -> None:
    # sshd3's host key recorded for sshd's address: paramiko must refuse sshd.
    other = sshd3.host_public_key
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other.get_name()} {other.get_base64()}\n")
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(
            sshd.host,
            sshd.port,
            sshd.username,
            key_filename=sshd.client_key_path,
            look_for_keys=False,
            allow_agent=False,
            timeout=WAIT,
        )
    client.close()


def test_executor_parameters(sshd: OpenSSHServer) -> None:
    assert sshd.executor_parameters(timeout=3) == {
        "host": "127.0.0.1",
        "port": sshd.port,
        "username": "pe-test",
        "client_keys": [sshd.client_key_path],
        "known_hosts": sshd.known_hosts_path,
        "config": (),
        "timeout": 3,
    }


def test_user_profile_is_plain(sshd: OpenSSHServer) -> None:
    with connect(sshd) as client:
        status, out = run(client.get_transport(), "cat ~/.bashrc ~/.profile; echo $SHELL")
    assert (status, out) == (0, b"/bin/bash\n")


# ------------------------------------------------------------ MaxSessions


@pytest.mark.parametrize("fixture, limit", [("sshd", 10), ("sshd3", 3)])
def test_max_sessions_enforced(request, fixture: str, limit: int) -> None:
    server: OpenSSHServer = request.getfixturevalue(fixture)
    with connect(server) as client:
        transport = client.get_transport()
        channels = [transport.open_session(timeout=WAIT) for _ in range(limit)]
        with pytest.raises(paramiko.ChannelException):
            transport.open_session(timeout=WAIT)
        # The refusal is per channel: the connection and its sessions live on.
        channels[0].exec_command("echo still here")
        channels[0].settimeout(WAIT)
        assert channels[0].recv(100) == b"still here\n"
        for channel in channels:
            channel.close()


# ------------------------------------------------------ killing, freezing


def test_serving_pid_kill_drops_the_connection(make_sshd: Callable[..., OpenSSHServer]) -> None:
    server = make_sshd()
    with connect(server) as client:
        transport = client.get_transport()
        assert run(transport, "true")[0] == 0  # the user-owned process exists after a session
        pids = server.serving_pids()
        assert len(pids) == 1
        channel = transport.open_session(timeout=WAIT)
        channel.settimeout(WAIT)
        channel.exec_command("sleep 60")
        os.kill(pids[0], signal.SIGKILL)
        assert channel.recv(1) == b""  # EOF, not a timeout: the connection died
        transport.join(WAIT)  # paramiko closes channels before it marks itself inactive
        assert not transport.is_active()
    # The listener is untouched: a new connection works.
    with connect(server) as client:
        assert run(client.get_transport(), "true")[0] == 0


def test_serving_pids_one_per_connection(make_sshd: Callable[..., OpenSSHServer]) -> None:
    server = make_sshd()
    clients = [connect(server) for _ in range(3)]
    try:
        for client in clients:
            run(client.get_transport(), "true")
        pids = server.serving_pids()
        assert len(pids) == 3
        # Each is owned by the login user (the root monitors are not returned).
        assert {os.stat(f"/proc/{pid}").st_uid for pid in pids} == {pwd.getpwnam("pe-test").pw_uid}
    finally:
        for client in clients:
            client.close()


def test_sigstop_freezes_and_stop_ends_frozen_server(
    make_sshd: Callable[..., OpenSSHServer],
) -> None:
    server = make_sshd()
    with connect(server) as client:
        transport = client.get_transport()
        run(transport, "true")
        [pid] = server.serving_pids()
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(paramiko.SSHException, match="Timeout"):
            transport.open_session(timeout=1.0)  # a frozen server never answers
        assert transport.is_active()  # TCP is still up
        os.kill(pid, signal.SIGCONT)
        assert run(transport, "echo thawed") == (0, b"thawed\n")
        os.kill(pid, signal.SIGSTOP)
        server.stop()  # continues and ends the frozen process
        assert server.serving_pids() == []
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2 :].split()[0] == b"Z"


def test_stop_then_start_comes_back_on_same_port(make_sshd: Callable[..., OpenSSHServer]) -> None:
    server = make_sshd()
    port, host_key = server.port, server.host_public_key
    client = connect(server)
    server.stop()
    assert not server.running
    with pytest.raises((OSError, paramiko.SSHException)):
        connect(server)
    client.close()
    server.start()
    assert (server.port, server.host_public_key) == (port, host_key)
    with connect(server) as client:
        assert run(client.get_transport(), "echo back") == (0, b"back\n")


# ---------------------------------------------------------- forced command


def test_forced_key_runs_bash_from_stdin(sshd: OpenSSHServer) -> None:
    # The fixture's forced command is /bin/bash: it ignores the requested
    # command and runs what arrives on stdin, as DupingSSHExecutor needs.
    with connect(sshd, sshd.forced_key_path) as client:
        status, out = run(
            client.get_transport(), "echo not run", b'echo "asked: $SSH_ORIGINAL_COMMAND"\n'
        )
    assert (status, out) == (0, b"asked: echo not run\n")


def test_forced_command_with_quotes(make_sshd: Callable[..., OpenSSHServer]) -> None:
    server = make_sshd(forced_command='printf "%s|" forced "$SSH_ORIGINAL_COMMAND"')
    with connect(server, server.forced_key_path) as client:
        assert run(client.get_transport(), "id") == (0, b"forced|id|")
    # The ordinary key is not restricted.
    with connect(server) as client:
        assert run(client.get_transport(), "echo free") == (0, b"free\n")


# -------------------------------------------------------------------- TOTP


@pytest.mark.parametrize("prompt", [None, "Enter 2FA Token: "])
def test_totp_login_and_code_reuse_refused(
    make_sshd: Callable[..., OpenSSHServer], prompt: Optional[str]
) -> None:
    secret = pyotp.random_base32()
    kwargs = {"totp_prompt": prompt} if prompt else {}
    server = make_sshd(totp_secret=secret, **kwargs)
    assert os.path.exists(f"/etc/pam.d/{server.pam_service}")
    totp = pyotp.TOTP(secret)
    # Codes are picked by step so that a step change during the test cannot
    # explain a refusal: WINDOW_SIZE 3 accepts the previous and the next step.
    step = int(time.time()) // 30
    code, next_code = totp.at(step * 30), totp.at((step + 1) * 30)
    prompts: List[str] = []
    first = totp_transport(server, code, prompts)
    try:
        assert run(first, "echo in") == (0, b"in\n")
    finally:
        first.close()
    assert prompts == [server.totp_prompt]
    # The same code again, still inside the window: DISALLOW_REUSE refuses it.
    with pytest.raises(paramiko.AuthenticationException):
        totp_transport(server, code, [])
    # A different valid code is accepted: the refusal was about reuse.
    totp_transport(server, next_code, []).close()
    service = server.pam_service
    server.stop()
    assert not os.path.exists(f"/etc/pam.d/{service}")


def test_totp_wrong_code_refused(sshd_totp: OpenSSHServer) -> None:
    totp = pyotp.TOTP(sshd_totp.totp_secret)
    now = time.time()
    valid = {totp.at(now + 30 * offset) for offset in range(-2, 3)}
    wrong = next(c for c in (f"{n:06d}" for n in range(1, 10)) if c not in valid)
    with pytest.raises(paramiko.AuthenticationException):
        totp_transport(sshd_totp, wrong, [])


def test_totp_key_alone_is_not_enough(sshd_totp: OpenSSHServer) -> None:
    transport = paramiko.Transport((sshd_totp.host, sshd_totp.port))
    try:
        transport.start_client(timeout=WAIT)
        key = paramiko.Ed25519Key.from_private_key_file(sshd_totp.client_key_path)
        assert transport.auth_publickey(sshd_totp.username, key) == ["keyboard-interactive"]
        assert not transport.is_authenticated()
    finally:
        transport.close()


# ------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"max_sessions": "3"}, TypeError, "max_sessions"),
        ({"max_sessions": True}, TypeError, "max_sessions"),
        ({"max_sessions": 0}, ValueError, "max_sessions"),
        ({"user": "Bad User"}, ValueError, "user"),
        ({"forced_command": "a\nb"}, ValueError, "forced_command"),
        ({"extra_config": "LogLevel DEBUG"}, TypeError, "extra_config"),
        ({"extra_config": ["A b\nC d"]}, ValueError, "extra_config"),
        ({"totp_secret": "not base32!"}, ValueError, "totp_secret"),
        ({"totp_prompt": "a]b"}, ValueError, "totp_prompt"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        OpenSSHServer(**kwargs)


def test_secret_not_in_repr_or_errors() -> None:
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    assert secret not in repr(OpenSSHServer(totp_secret=secret))
    bad = secret.lower()
    with pytest.raises(ValueError) as info:
        OpenSSHServer(totp_secret=bad)
    assert bad not in str(info.value)


# ------------------------------------------------------- where sshd cannot run


def test_not_root_and_no_user_is_unavailable(monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    server = OpenSSHServer(user="pe-absent-user")
    with pytest.raises(OpenSSHUnavailable, match="useradd"):
        server.start()
    server.close()


def test_unavailable_skips_locally_and_fails_under_ci(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install"):
        openssh_unavailable("sshd not found: apt-get install openssh-server")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must run"):
        openssh_unavailable("sshd not found: apt-get install openssh-server")


def test_no_sshd_outlives_a_killed_test_process(tmp_path) -> None:
    require_sshd()
    script = (
        "import sys, time\n"
        "from testsupport.openssh import OpenSSHServer\n"
        "server = OpenSSHServer(workdir=sys.argv[1]).start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "srv")],
        stdout=subprocess.PIPE,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )
    try:
        listener = int(child.stdout.readline())
        assert _alive(listener)
    finally:
        child.kill()  # no stop(), no atexit: only the watchdog is left to act
        child.wait()
        child.stdout.close()
    deadline = time.monotonic() + WAIT
    while _alive(listener) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(listener)


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and not _is_zombie(pid)


def test_forked_child_leaves_the_parents_server_alone(make_sshd) -> None:
    server = make_sshd()
    pid = os.fork()
    if pid == 0:  # the child: what its interpreter exit would do
        try:
            close_all()
            server.close()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert server.running
    with connect(server) as client:
        assert run(client.get_transport(), "true")[0] == 0
