"""Unit tests of paramiko_executor.auth: mfa_config parsing, secrecy, the TOTP ledger, prompts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import paramiko
import pyotp
import pytest
from helpers import run_threads

from paramiko_executor import auth as auth_module
from paramiko_executor.auth import (
    AuthenticationInterrupted,
    Credentials,
    MFAEntry,
    TOTPLedger,
    _PromptAnswerer,
    _PromptRefused,
    authenticate,
    parse_mfa_config,
)
from paramiko_executor.hostkeys import HostKeyPolicy
from paramiko_executor.results import AuthenticationFailure

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # 160 bits
OTHER_SECRET = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"
PASSWORD = "pa55-w0rd-that-must-not-leak"
PASSPHRASE = "passphrase-that-must-not-leak"


class FakeClock:
    """A clock that only moves when the ledger waits (or the test says so)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, delay: float) -> None:
        self.waits.append(delay)
        self.now += delay


# -- parse_mfa_config -------------------------------------------------------------------------


def test_parse_none_is_empty():
    assert parse_mfa_config(None) == ()


def test_parse_valid_entries_normalises_secret():
    entries = parse_mfa_config(
        [
            {"prompt": "Enter 2FA Token:", "totp": SECRET.lower()},
            {"prompt": "  Second code: ", "totp": "KRSX G5CT MVRX EZLU KRSX G5CT MVRX EZLU"},
        ]
    )
    assert entries == (
        MFAEntry("Enter 2FA Token:", SECRET),
        MFAEntry("  Second code: ", OTHER_SECRET),
    )
    assert parse_mfa_config(entries) == entries


def test_parse_accepts_80_bit_google_authenticator_secret():
    secret = "JBSWY3DPEHPK3PXP"  # 16 characters, as google-authenticator used to issue
    (entry,) = parse_mfa_config([{"prompt": "Verification code:", "totp": secret}])
    assert entry.totp == secret


@pytest.mark.parametrize(
    "value",
    [SECRET, {"prompt": "x", "totp": SECRET}, 42, b"bytes"],
)
def test_parse_rejects_non_list(value):
    with pytest.raises(TypeError, match="mfa_config") as info:
        parse_mfa_config(value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ([SECRET], TypeError, r"mfa_config\[0\] must be a dict"),
        ([{"prompt": 1, "totp": SECRET}], TypeError, r"mfa_config\[0\]\['prompt'\]"),
        ([{"prompt": "p", "totp": 1234}], TypeError, r"mfa_config\[0\]\['totp'\]"),
        ([{"prompt": "p"}], ValueError, r"mfa_config\[0\] must have exactly.*totp"),
        ([{"prompt": "p", "totp": SECRET, "x": 1}], ValueError, r"unknown: x"),
        ([{"prompt": "  ", "totp": SECRET}], ValueError, r"\['prompt'\] must not be empty"),
        ([{"prompt": "p", "totp": " "}], ValueError, r"\['totp'\] must not be empty"),
        (
            [{"prompt": "p", "totp": SECRET}, {"prompt": " p ", "totp": SECRET}],
            ValueError,
            r"mfa_config\[1\]\['prompt'\] repeats",
        ),
    ],
)
def test_parse_rejects_bad_entries(value, error, match):
    with pytest.raises(error, match=match) as info:
        parse_mfa_config(value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("secret", ["NOT-BASE32-SECRET-1!", "ABCDEFGH1", "A" * 9])
def test_parse_rejects_invalid_base32_without_echoing_it(secret):
    with pytest.raises(ValueError, match=r"mfa_config\[0\]\['totp'\] is not a valid base32") as e:
        parse_mfa_config([{"prompt": "p", "totp": secret}])
    assert secret not in str(e.value)
    assert e.value.__cause__ is None and e.value.__context__ is None  # nothing holds it


# -- secrecy of reprs -----------------------------------------------------------------------


def test_reprs_hide_secrets():
    mfa = parse_mfa_config([{"prompt": "Token:", "totp": SECRET}])
    creds = Credentials(
        username="alice", password=PASSWORD, passphrase=PASSPHRASE, key_filenames=("k",), mfa=mfa
    )
    for text in (repr(creds), str(creds), repr(mfa), str(mfa[0])):
        for secret in (PASSWORD, PASSPHRASE, SECRET):
            assert secret not in text
    assert "alice" in repr(creds) and "Token:" in repr(mfa[0]) and "<hidden>" in repr(creds)
    assert "password=None" in repr(Credentials(username="bob"))


def test_credentials_are_frozen():
    creds = Credentials(username="alice")
    with pytest.raises(AttributeError):
        creds.username = "mallory"  # type: ignore[misc]


# -- the TOTP ledger ----------------------------------------------------------------------------


def test_ledger_never_issues_a_code_twice():
    clock = FakeClock(1_000_040.0)  # 20 s into a 30 s step
    ledger = TOTPLedger(clock=clock, wait=clock.wait)
    first = ledger.issue(SECRET)
    assert first == pyotp.TOTP(SECRET).at(1_000_040)
    assert clock.waits == []
    second = ledger.issue(SECRET)
    # It waited until just past the step boundary, no longer than the rest of the step.
    assert len(clock.waits) == 1 and 10 <= clock.waits[0] <= 10.1
    assert second == pyotp.TOTP(SECRET).at(clock.now) != first


def test_ledger_keeps_secrets_apart():
    clock = FakeClock(1_000_040.0)
    ledger = TOTPLedger(clock=clock, wait=clock.wait)
    ledger.issue(SECRET)
    ledger.issue(OTHER_SECRET)
    assert clock.waits == []


def test_ledger_wait_until_fresh_does_not_record():
    clock = FakeClock(1_000_040.0)
    ledger = TOTPLedger(clock=clock, wait=clock.wait)
    ledger.wait_until_fresh(SECRET)
    ledger.issue(SECRET)
    assert clock.waits == []
    ledger.wait_until_fresh(SECRET)
    assert len(clock.waits) == 1
    ledger.issue(SECRET)  # the step moved on: no second wait
    assert len(clock.waits) == 1


def test_ledger_gives_up_when_the_clock_stands_still():
    waits: list[float] = []
    ledger = TOTPLedger(clock=lambda: 1_000_040.0, wait=waits.append)
    ledger.issue(SECRET)
    with pytest.raises(AuthenticationFailure, match="clock") as info:
        ledger.issue(SECRET)
    assert SECRET not in str(info.value)
    assert len(waits) == TOTPLedger._MAX_WAITS + 1


def test_ledger_is_thread_safe():
    clock = FakeClock(1_000_040.0)
    lock = threading.Lock()

    def wait(delay: float) -> None:
        with lock:
            clock.wait(delay)

    ledger = TOTPLedger(clock=clock, wait=wait)
    codes: list[str] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait(timeout=10)
        codes.append(ledger.issue(SECRET))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(codes) == 8
    assert len(set(codes)) == 8


def test_ledger_real_condition_wait_ends_at_the_next_step():
    # The real Condition wait, on a clock shifted to sit 0.3 s before a step boundary.
    shift = time.time() % 30 - 29.7
    ledger = TOTPLedger(clock=lambda: time.time() - shift)
    first = ledger.issue(SECRET)
    second = ledger.issue(SECRET)
    assert first != second
    assert (time.time() - shift) % 30 < 15  # woke in the next step, not a whole step later


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_ledger_survives_fork_with_the_parents_record():
    clock = FakeClock(1_000_040.0)
    ledger = TOTPLedger(clock=clock, wait=clock.wait)
    ledger.issue(SECRET)
    holder = threading.Thread(target=lambda: ledger._cond.acquire())
    holder.start()  # a thread holding the lock at fork time: it does not exist in the child
    holder.join(timeout=10)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            ledger.issue(SECRET)
            os.write(write_end, str(len(clock.waits)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read()
    finally:
        os.waitpid(pid, 0)
    assert answer == b"1"  # the child knew the parent's code and waited for the next step


# -- the keyboard-interactive handler ----------------------------------------------------------


def answerer(password=None, mfa=(("Verification code:", SECRET),)):
    clock = FakeClock(1_000_040.0)
    ledger = TOTPLedger(clock=clock, wait=clock.wait)
    creds = Credentials(
        username="alice",
        password=password,
        mfa=parse_mfa_config([{"prompt": p, "totp": s} for p, s in mfa]),
    )
    return _PromptAnswerer(creds, ledger), clock


def test_handler_answers_totp_and_password_prompts():
    handler, clock = answerer(password=PASSWORD)
    answers = handler("", "", [("Password: ", False), (" Verification code: ", False)])
    assert answers == [PASSWORD, pyotp.TOTP(SECRET).at(clock.now)]


def test_handler_answers_empty_prompt_list():
    handler, _ = answerer()
    assert handler("title", "instructions", []) == []


def test_handler_prefers_configured_prompt_over_password_rule():
    handler, clock = answerer(password=PASSWORD, mfa=(("One-time password:", SECRET),))
    assert handler("", "", [("One-time password:", False)]) == [pyotp.TOTP(SECRET).at(clock.now)]


@pytest.mark.parametrize(
    ("password", "prompt", "why"),
    [
        (PASSWORD, "Favourite colour:", "no mfa_config entry matches"),
        (None, "Password:", "asks for a password and none was given"),
        (PASSWORD, "New password:", "no mfa_config entry matches"),
    ],
)
def test_handler_refuses_other_prompts_and_records_no_code(password, prompt, why):
    handler, clock = answerer(password=password)
    with pytest.raises(_PromptRefused) as info:
        handler("", "", [("Verification code:", False), (prompt, False)])
    assert handler.refusal is not None
    assert repr(prompt) in handler.refusal and why in handler.refusal
    for text in (str(info.value), handler.refusal):
        assert PASSWORD not in text and SECRET not in text
    # The refused round sent nothing, so the next round may use the current code at once.
    handler("", "", [("Verification code:", False)])
    assert clock.waits == []


def test_handler_two_prompts_same_secret_get_different_codes():
    handler, clock = answerer(mfa=(("Code 1:", SECRET), ("Code 2:", SECRET)))
    first, second = handler("", "", [("Code 1:", False), ("Code 2:", False)])
    assert first != second and len(clock.waits) == 1


# -- against the project's paramiko test server --------------------------------------------------


def _connect(server, auth_timeout: float = 10.0) -> paramiko.Transport:
    """A started, host-key-verified client transport to ``server``, not yet authenticated."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    transport = paramiko.Transport(sock)
    policy = HostKeyPolicy([str(server.known_hosts_path)])
    policy.prepare(transport, server.host, server.port)
    transport.start_client(timeout=10)
    policy.verify(transport, server.host, server.port)
    transport.auth_timeout = auth_timeout
    return transport


@pytest.fixture
def login(make_test_server):
    """``login(server, **Credentials kwargs)``: authenticate a new transport (closed afterwards)."""
    transports: list[paramiko.Transport] = []

    def do_login(server, **kwargs) -> paramiko.Transport:
        kwargs.setdefault("username", server.username)
        kwargs.setdefault("allow_agent", False)
        kwargs.setdefault("look_for_keys", False)
        transport = _connect(server)
        transports.append(transport)
        authenticate(transport, Credentials(**kwargs))
        assert transport.is_authenticated()
        return transport

    yield do_login
    for transport in transports:
        transport.close()


@pytest.fixture(autouse=True)
def fresh_ledger(monkeypatch):
    """Each test starts with an empty process-wide ledger: tests share secrets, not servers."""
    monkeypatch.setattr(auth_module, "TOTP_LEDGER", TOTPLedger())


@pytest.fixture
def shifted_ledger(monkeypatch):
    """Make the process-wide ledger's clock sit 0.5 s before a step boundary (a bit behind the
    real clock, which the test server accepts: it takes the previous step's code too), so that
    a second login in the same step waits half a second instead of up to 30."""
    shift = (time.time() - 29.5) % 30
    ledger = TOTPLedger(clock=lambda: time.time() - shift)
    monkeypatch.setattr(auth_module, "TOTP_LEDGER", ledger)
    return ledger


def test_key_login(make_test_server, login):
    server = make_test_server()
    login(server, key_filenames=(server.client_key_path,))
    assert server.logins == 1


def test_pkey_login(make_test_server, login):
    server = make_test_server()
    login(server, pkey=server.client_key)


def test_password_login(make_test_server, login):
    server = make_test_server(password=PASSWORD, authorized_keys=[])
    login(server, password=PASSWORD)


def test_wrong_key_fails_at_once_with_a_useful_description(make_test_server, login):
    server = make_test_server(authorized_keys=[paramiko.ECDSAKey.generate()])
    started = time.monotonic()
    with pytest.raises(AuthenticationFailure) as info:
        login(server, key_filenames=(server.client_key_path,), password=None)
    assert time.monotonic() - started < 10  # a hang guard; the report has the measurement
    text = str(info.value)
    assert f"as {server.username!r} on 127.0.0.1:{server.port} failed" in text
    assert f"publickey {server.client_key_path} ecdsa-sha2-nistp256 SHA256:" in text
    assert "(refused)" in text and "server allows: publickey" in text


def test_wrong_password_is_refused_without_echo(make_test_server, login):
    server = make_test_server(password=PASSWORD, authorized_keys=[])
    with pytest.raises(AuthenticationFailure, match=r"password \(refused\)") as info:
        login(server, password="not-" + PASSWORD)
    assert PASSWORD not in str(info.value)


def test_encrypted_key_with_passphrase_or_password(make_test_server, login, tmp_path):
    server = make_test_server()
    path = str(tmp_path / "encrypted")
    server.client_key.write_private_key_file(path, password=PASSPHRASE)
    login(server, key_filenames=(path,), passphrase=PASSPHRASE)
    # paramiko's rule: without a passphrase the password decrypts the key.
    login(server, key_filenames=(path,), password=PASSPHRASE)
    with pytest.raises(AuthenticationFailure, match="unusable: Bad password") as info:
        login(server, key_filenames=(path,), passphrase="wrong")
    assert PASSPHRASE not in str(info.value)
    with pytest.raises(AuthenticationFailure, match="unusable: it is encrypted and no passphrase"):
        login(server, key_filenames=(path,))


def test_an_empty_passphrase_is_none_for_an_openssh_format_key(make_test_server, login,
                                                                tmp_path):
    """bcrypt refuses an empty passphrase with a bare ValueError, which ended the connect
    as an ``ExecutorFailure``; ssh takes an empty answer to its prompt as no passphrase."""
    server = make_test_server()
    path = str(tmp_path / "id_ed25519")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE, "-f", path],
                   check=True, stdin=subprocess.DEVNULL)
    with pytest.raises(AuthenticationFailure, match="unusable: it is encrypted and no passphrase"):
        login(server, key_filenames=(path,), passphrase="", password=None)


def test_a_key_file_is_read_once_until_it_changes(make_test_server, login, tmp_path,
                                                 monkeypatch):
    """Every login of a HostGroup reads the same key file: parsed once, reloaded on a change."""
    server = make_test_server()
    path = str(tmp_path / "key")
    server.client_key.write_private_key_file(path)
    reads: list[str] = []
    read = paramiko.PKey._read_private_key_file

    def counting(self, tag, filename, password=None):
        reads.append(filename)
        return read(self, tag, filename, password)

    monkeypatch.setattr(paramiko.PKey, "_read_private_key_file", counting)
    login(server, key_filenames=(path,))
    first = len(reads)
    assert first >= 1
    login(server, key_filenames=(path,))
    assert len(reads) == first  # the same unchanged file: not read again
    # Rewritten in place (same inode) with a key the server does not know: that key
    # is the one offered now, and refused.
    stranger = paramiko.ECDSAKey.generate()
    stranger.write_private_key_file(path)
    with pytest.raises(AuthenticationFailure, match=stranger.fingerprint.replace("+", r"\+")):
        login(server, key_filenames=(path,))
    assert len(reads) > first
    # Replaced by another file (a new inode) with the authorized key again.
    server.client_key.write_private_key_file(path + ".new")
    os.replace(path + ".new", path)
    login(server, key_filenames=(path,))


def test_missing_key_file_is_reported(make_test_server, login, tmp_path):
    server = make_test_server()
    missing = str(tmp_path / "missing")
    with pytest.raises(AuthenticationFailure, match="No such file") as info:
        login(server, key_filenames=(missing,))
    assert missing in str(info.value)
    # ... and does not stop the next key.
    login(server, key_filenames=(missing, server.client_key_path))


def test_look_for_keys_uses_home_ssh(make_test_server, login, tmp_path, monkeypatch):
    server = make_test_server()
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    server.client_key.write_private_key_file(str(tmp_path / ".ssh" / "id_ecdsa"))
    with pytest.raises(AuthenticationFailure, match="tried: nothing"):
        login(server, look_for_keys=False)
    login(server, look_for_keys=True)


@pytest.mark.skipif(shutil.which("ssh-agent") is None, reason="needs ssh-agent (openssh-client)")
def test_agent_keys_when_allowed(make_test_server, login, tmp_path, monkeypatch):
    server = make_test_server()
    sock = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):  # bounded: 10 s
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        env = dict(os.environ, SSH_AUTH_SOCK=sock)
        subprocess.run(
            ["ssh-add", server.client_key_path], env=env, check=True, capture_output=True
        )
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
        with pytest.raises(AuthenticationFailure):
            login(server, allow_agent=False)
        login(server, allow_agent=True)
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def test_key_then_totp(make_test_server, login):
    server = make_test_server(totp_secret=SECRET)
    mfa = parse_mfa_config(server.mfa_config())
    login(server, key_filenames=(server.client_key_path,), mfa=mfa)
    assert server.totp_accepted == 1 and server.logins == 1


def test_password_then_totp(make_test_server, login):
    server = make_test_server(
        password=PASSWORD, totp_secret=SECRET, auth_methods=["password", "keyboard-interactive"]
    )
    login(server, password=PASSWORD, mfa=parse_mfa_config(server.mfa_config()))
    assert server.totp_accepted == 1


def test_key_then_password_prompt_and_totp(make_test_server, login):
    server = make_test_server(
        password=PASSWORD,
        password_prompt="Password: ",
        totp_secret=SECRET,
        auth_methods=["publickey", "keyboard-interactive"],
    )
    login(
        server,
        key_filenames=(server.client_key_path,),
        password=PASSWORD,
        mfa=parse_mfa_config(server.mfa_config()),
    )
    assert server.totp_accepted == 1


def test_two_totp_prompts(make_test_server, login):
    server = make_test_server(
        totp_secret=[SECRET, OTHER_SECRET], totp_prompts=("First code:", "Second code: ")
    )
    login(server, pkey=server.client_key, mfa=parse_mfa_config(server.mfa_config()))
    assert server.totp_accepted == 2


def test_keyboard_interactive_only(make_test_server, login):
    server = make_test_server(totp_secret=SECRET, auth_methods=["keyboard-interactive"])
    login(server, mfa=parse_mfa_config(server.mfa_config()))


def test_unmatched_prompt_is_not_answered(make_test_server, login):
    server = make_test_server(totp_secret=SECRET, totp_prompts=("Verification code: ",))
    mfa = parse_mfa_config([{"prompt": "Enter 2FA Token:", "totp": SECRET}])
    with pytest.raises(AuthenticationFailure) as info:
        login(server, pkey=server.client_key, mfa=mfa)
    text = str(info.value)
    assert "prompt 'Verification code:' not answered" in text and "'Enter 2FA Token:'" in text
    assert SECRET not in text
    assert server.totp_accepted == 0 and server.logins == 0


def test_wrong_totp_secret_is_refused(make_test_server, login):
    server = make_test_server(totp_secret=SECRET)
    mfa = parse_mfa_config([{"prompt": "Verification code:", "totp": OTHER_SECRET}])
    started = time.monotonic()
    with pytest.raises(AuthenticationFailure, match=r"keyboard-interactive \(refused\)") as info:
        login(server, pkey=server.client_key, mfa=mfa)
    assert time.monotonic() - started < 10  # a hang guard; the report has the measurement
    assert OTHER_SECRET not in str(info.value) and "server allows: keyboard-interactive" in str(
        info.value
    )


def test_login_again_in_the_same_step_waits_for_a_fresh_code(
    make_test_server, login, shifted_ledger
):
    server = make_test_server(totp_secret=SECRET)
    mfa = parse_mfa_config(server.mfa_config())
    first = login(server, pkey=server.client_key, mfa=mfa)
    second = login(server, pkey=server.client_key, mfa=mfa)  # the server refuses a reused code
    assert first.is_authenticated() and second.is_authenticated()
    assert server.totp_accepted == 2


def test_concurrent_logins_never_share_a_code(make_test_server, login, shifted_ledger):
    server = make_test_server(totp_secret=SECRET)
    mfa = parse_mfa_config(server.mfa_config())
    _, errors = run_threads(lambda i: login(server, pkey=server.client_key, mfa=mfa), 2, 60)
    assert errors == [] and server.totp_accepted == 2


def test_auth_strategy_then_totp(make_test_server, login):
    from paramiko.auth_strategy import AuthStrategy, InMemoryPrivateKey

    server = make_test_server(totp_secret=SECRET)

    class KeyStrategy(AuthStrategy):
        def get_sources(self):
            yield InMemoryPrivateKey(server.username, server.client_key)

    login(
        server,
        auth_strategy=KeyStrategy(ssh_config=paramiko.SSHConfig()),
        mfa=parse_mfa_config(server.mfa_config()),
    )
    assert server.totp_accepted == 1


def test_connection_lost_during_auth_is_not_an_authentication_failure(make_test_server):
    server = make_test_server()
    transport = _connect(server)
    try:
        server.freeze()
        threading.Timer(0.5, server.drop_connections).start()
        with pytest.raises(AuthenticationInterrupted, match="lost during authentication"):
            authenticate(
                transport,
                Credentials(username=server.username, pkey=server.client_key,
                            allow_agent=False, look_for_keys=False),
            )
        assert not isinstance(AuthenticationInterrupted("x"), AuthenticationFailure)
        assert isinstance(AuthenticationInterrupted("x"), paramiko.SSHException)
    finally:
        server.thaw()
        transport.close()


def test_silent_server_is_an_auth_timeout(make_test_server):
    server = make_test_server()
    transport = _connect(server, auth_timeout=1.0)
    try:
        server.freeze()
        with pytest.raises(AuthenticationInterrupted, match="within auth_timeout"):
            authenticate(
                transport,
                Credentials(username=server.username, pkey=server.client_key,
                            allow_agent=False, look_for_keys=False),
            )
    finally:
        server.thaw()
        transport.close()


def test_host_names_the_server_in_the_description(make_test_server):
    server = make_test_server(authorized_keys=[])
    transport = _connect(server)
    try:
        with pytest.raises(AuthenticationFailure, match="on login.example.org failed"):
            authenticate(
                transport,
                Credentials(username="nobody", pkey=server.client_key, allow_agent=False,
                            look_for_keys=False),
                host="login.example.org",
            )
    finally:
        transport.close()
