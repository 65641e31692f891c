"""Issue 14, "Trust no more than OpenSSH would": regression tests against a real sshd.

Every ssh_config and known_hosts file is written by the test; the system-wide files are
pointed elsewhere (``GlobalKnownHostsFile`` or ``hostkeys.DEFAULT_GLOBAL_KNOWN_HOSTS``), so
nothing under /etc/ssh is read for trust here or ever written. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import paramiko
import pytest

from paramiko_executor import ExecutorFailure, HostKeyFailure, SSHExecutor, hostkeys
from paramiko_executor.cli import main as cli_main
from paramiko_executor.hostnames import check_hostname, expand_paths
from paramiko_executor.sshconfig import split_arguments
from paramiko_executor.text import printable

#: A ProxyCommand helper: connects to argv[1]:argv[2] and relays stdin/stdout (no nc here).
RELAY = """\
import os, socket, sys, threading
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
sock.settimeout(None)
def upstream():
    while True:
        data = os.read(0, 65536)
        if not data:
            break
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while True:
    data = sock.recv(65536)
    if not data:
        break
    os.write(1, data)
"""


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home directory (``~``, ``%d``) for this test."""
    path = tmp_path / "home"
    (path / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(path))
    return path


@pytest.fixture
def relay(tmp_path: Path) -> str:
    path = tmp_path / "relay.py"
    path.write_text(RELAY)
    return f"{sys.executable} {path}"


def host_line(name: str, key: paramiko.PKey, marker: str = "", sep: str = " ") -> str:
    fields = ([marker] if marker else []) + [name, key.get_name(), key.get_base64()]
    return sep.join(fields) + "\n"


def block(alias: str, server, extra: str = "", *, known: object = None) -> str:
    """A Host block for ``server``; ``known`` its UserKnownHostsFile (None: not set)."""
    text = (f"Host {alias}\n    HostName 127.0.0.1\n    Port {server.port}\n"
            f"    User {server.username}\n    IdentityFile {server.client_key_path}\n"
            "    GlobalKnownHostsFile none\n")
    if known is not None:
        text += f"    UserKnownHostsFile {known}\n"
    return text + extra


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def name_of(server) -> str:
    return f"[127.0.0.1]:{server.port}"


def run(config: str, host: str = "target", **kwargs) -> str:
    with SSHExecutor(host=host, config=config, connect_retries=0, **kwargs) as ex:
        return ex.run_command("echo ok").stdout


# -- 1. markers and fields split on any whitespace ------------------------------------------------


@pytest.mark.parametrize("sep", ["\t", " \t ", "  "])
def test_revoked_line_separated_by_tabs_revokes(sshd, tmp_path, sep):
    key = sshd.host_public_key
    known = write(tmp_path / "kh", host_line(name_of(sshd), key)
                  + host_line("*", key, marker="@revoked", sep=sep))
    config = write(tmp_path / "config", block("target", sshd, known=known))
    with pytest.raises(HostKeyFailure, match="revoked"):
        run(config)


def test_tab_separated_trusted_line_is_understood(sshd, tmp_path):
    known = write(tmp_path / "kh", host_line(name_of(sshd), sshd.host_public_key, sep="\t"))
    assert run(write(tmp_path / "config", block("target", sshd, known=known))) == "ok\n"


# -- 2. system-wide known hosts and RevokedHostKeys -----------------------------------------------


def test_global_known_hosts_file_trusts(sshd, tmp_path):
    empty = write(tmp_path / "user_kh", "")
    global_kh = write(tmp_path / "global_kh", host_line(name_of(sshd), sshd.host_public_key))
    config = write(tmp_path / "config", f"Host target\n    GlobalKnownHostsFile {global_kh}\n"
                   + block("target", sshd, known=empty))
    assert run(config) == "ok\n"


def test_global_revocation_beats_user_trust(sshd, tmp_path):
    key = sshd.host_public_key
    user_kh = write(tmp_path / "user_kh", host_line(name_of(sshd), key))
    global_kh = write(tmp_path / "global_kh", host_line("*", key, marker="@revoked"))
    config = write(tmp_path / "config", f"Host target\n    GlobalKnownHostsFile {global_kh}\n"
                   + block("target", sshd, known=user_kh))
    with pytest.raises(HostKeyFailure, match="revoked"):
        run(config)


def test_accept_new_never_overrides_a_system_wide_pin(sshd, sshd3, tmp_path):
    # The administrator pinned another key for this host: the server's key is a changed key,
    # not a new one, and nothing may be recorded.
    user_kh = tmp_path / "user_kh"
    global_kh = write(tmp_path / "global_kh", host_line(name_of(sshd), sshd3.host_public_key))
    config = write(tmp_path / "config", f"Host target\n    GlobalKnownHostsFile {global_kh}\n"
                   + block("target", sshd, "    StrictHostKeyChecking accept-new\n",
                           known=user_kh))
    with pytest.raises(HostKeyFailure, match="does not match"):
        run(config)
    assert not user_kh.exists() or user_kh.read_text() == ""


def test_default_global_files_are_read(sshd, tmp_path, home, monkeypatch):
    global_kh = write(tmp_path / "etc" / "ssh_known_hosts",
                      host_line(name_of(sshd), sshd.host_public_key))
    monkeypatch.setattr(hostkeys, "DEFAULT_GLOBAL_KNOWN_HOSTS", (global_kh,))
    config = write(tmp_path / "config",
                   f"Host target\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
                   f"    User {sshd.username}\n    IdentityFile {sshd.client_key_path}\n")
    assert run(config) == "ok\n"  # ~/.ssh/known_hosts is empty: the global file trusted it
    revoked = host_line(name_of(sshd), sshd.host_public_key, marker="@revoked")
    write(home / ".ssh" / "known_hosts", host_line(name_of(sshd), sshd.host_public_key))
    write(Path(global_kh), revoked)
    with pytest.raises(HostKeyFailure, match="revoked"):
        run(config)


def test_revoked_host_keys_file(sshd, tmp_path):
    key = sshd.host_public_key
    known = write(tmp_path / "kh", host_line(name_of(sshd), key))
    revoked = write(tmp_path / "revoked", f"# revoked by the admin\n{key.get_name()} "
                    f"{key.get_base64()} old-host-key\n")
    config = write(tmp_path / "config", f"Host target\n    RevokedHostKeys {revoked}\n"
                   + block("target", sshd, known=known))
    with pytest.raises(HostKeyFailure, match="revoked"):
        run(config)
    os.unlink(revoked)  # a revocation list that cannot be read refuses, as in OpenSSH
    with pytest.raises(HostKeyFailure, match="RevokedHostKeys"):
        run(config)
    write(Path(revoked), "")
    assert run(config) == "ok\n"


def test_strict_host_key_checking_no_still_refuses_revoked_keys(sshd, sshd3, tmp_path, caplog):
    key = sshd.host_public_key
    known = tmp_path / "kh"
    config = write(tmp_path / "config", block("target", sshd, "    StrictHostKeyChecking no\n",
                                              known=known))
    write(known, host_line(name_of(sshd), sshd3.host_public_key))  # a changed key: accepted
    with caplog.at_level(logging.WARNING, logger="paramiko_executor.hostkeys"):
        assert run(config) == "ok\n"
    assert any("does not match" in r.getMessage() for r in caplog.records)
    write(known, host_line("*", key, marker="@revoked"))
    with pytest.raises(HostKeyFailure, match="revoked"):
        run(config)
    write(known, "")
    revoked = write(tmp_path / "revoked", f"{key.get_name()} {key.get_base64()}\n")
    config = write(tmp_path / "config", f"Host target\n    RevokedHostKeys {revoked}\n"
                   + block("target", sshd, "    StrictHostKeyChecking no\n", known=known))
    with pytest.raises(HostKeyFailure, match="revoked"):
        run(config)
    assert known.read_text() == ""  # nothing recorded


@pytest.mark.parametrize("spec", ["key", "sha1", "hash"])
def test_revoked_host_keys_krl(sshd, sshd3, tmp_path, spec):
    ssh_keygen = shutil.which("ssh-keygen")
    if ssh_keygen is None:
        pytest.skip("ssh-keygen not installed")

    def krl(key: paramiko.PKey, path: Path) -> str:
        pub = write(tmp_path / "key.pub", f"{key.get_name()} {key.get_base64()}\n")
        lines = {"key": f"key: {key.get_name()} {key.get_base64()}",
                 "sha1": f"sha1: {key.get_name()} {key.get_base64()}",
                 "hash": f"hash: {key.fingerprint}"}
        spec_file = write(tmp_path / "spec", lines[spec] + "\n")
        subprocess.run([ssh_keygen, "-q", "-k", "-f", str(path), spec_file], check=True,
                       capture_output=True, timeout=30)
        os.unlink(pub)
        return str(path)

    known = write(tmp_path / "kh", host_line(name_of(sshd), sshd.host_public_key))
    revoked = krl(sshd.host_public_key, tmp_path / "revoked.krl")
    config = write(tmp_path / "config", f"Host target\n    RevokedHostKeys {revoked}\n"
                   + block("target", sshd, known=known))
    with pytest.raises(HostKeyFailure, match="revoked"):
        run(config)
    krl(sshd3.host_public_key, Path(revoked))  # revokes another key only
    assert run(config) == "ok\n"


# -- 3. a ProxyJump hop keeps its own StrictHostKeyChecking ---------------------------------------


def test_jump_host_keeps_its_own_strict_host_key_checking(sshd, sshd3, tmp_path, home):
    recorded = tmp_path / "recorded"
    config = write(tmp_path / "config",
                   block("target", sshd3, "    StrictHostKeyChecking accept-new\n"
                         "    ProxyJump bastion\n", known=recorded)
                   + block("bastion", sshd, "    StrictHostKeyChecking yes\n"))
    # The bastion's key is in none of its files (~/.ssh/known_hosts is empty): refused.
    with pytest.raises(HostKeyFailure, match=rf"\[127.0.0.1\]:{sshd.port} is unknown"):
        run(config)
    assert not recorded.exists() or name_of(sshd) not in recorded.read_text()
    write(home / ".ssh" / "known_hosts", host_line(name_of(sshd), sshd.host_public_key))
    assert run(config) == "ok\n"  # the target itself is still accept-new
    assert name_of(sshd3) in recorded.read_text()
    assert name_of(sshd) not in recorded.read_text()


# -- 4. UserKnownHostsFile: tokens, variables, quoting, relative paths ----------------------------


def test_user_known_hosts_file_tokens(sshd, tmp_path, home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write(tmp_path / "config", block(
        "target", sshd, "    StrictHostKeyChecking accept-new\n",
        known="%d/.ssh/known_hosts_%h_%p_%r_%n_%%"))
    assert run(config) == "ok\n"
    expected = home / ".ssh" / f"known_hosts_127.0.0.1_{sshd.port}_{sshd.username}_target_%"
    assert name_of(sshd) in expected.read_text()
    assert not (tmp_path / "%d").exists()
    assert run(config) == "ok\n"  # and it is read back from there


def test_user_known_hosts_file_environment_variable_and_quotes(sshd, tmp_path, monkeypatch):
    spaced = tmp_path / "with space"
    write(spaced / "known hosts", host_line(name_of(sshd), sshd.host_public_key))
    monkeypatch.setenv("PE_KNOWN_DIR", str(spaced))
    for value in (f'"{spaced}/known hosts"', '"${PE_KNOWN_DIR}/known hosts"',
                  f'"{tmp_path}/missing" "{spaced}/known hosts"'):
        config = write(tmp_path / "config", block("target", sshd, known=value))
        assert run(config) == "ok\n", value


@pytest.mark.parametrize(
    ("value", "match"),
    [("known_hosts_%h", "relative path"), ("%Z/kh", "unknown token %Z"),
     ("${PE_UNSET_VARIABLE}/kh", "PE_UNSET_VARIABLE"), ('"/tmp/kh', "quotes")],
)
def test_user_known_hosts_file_bad_values_fail_at_construction(sshd, tmp_path, monkeypatch,
                                                               value, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PE_UNSET_VARIABLE", raising=False)
    config = write(tmp_path / "config", block(
        "target", sshd, "    StrictHostKeyChecking accept-new\n", known=value))
    with pytest.raises(ValueError, match="UserKnownHostsFile") as info:
        SSHExecutor(host="target", config=config)
    assert match in str(info.value)
    assert os.listdir(tmp_path) == ["config"]  # nothing created in the working directory


# -- 5. a malformed known_hosts line is skipped ---------------------------------------------------


def test_malformed_known_hosts_lines_are_skipped(sshd, tmp_path, caplog):
    known = write(tmp_path / "kh", "".join([
        "[127.0.0.1]:1 ssh-ed25519 !!!not-base64!!!\n",
        "[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5\n",   # truncated key
        "@bogus-marker * ssh-ed25519 AAAA\n",
        "onlyonefield\n",
        host_line(name_of(sshd), sshd.host_public_key),
    ]))
    config = write(tmp_path / "config", block("target", sshd, known=known))
    with caplog.at_level(logging.DEBUG, logger="paramiko_executor.hostkeys"):
        assert run(config) == "ok\n"
    messages = [r.getMessage() for r in caplog.records if r.name == "paramiko_executor.hostkeys"]
    for lineno in (1, 2, 3, 4):
        assert any(f"{known}:{lineno}" in m and "skipped" in m for m in messages), messages


# -- 6. HashKnownHosts and HostKeyAlias -----------------------------------------------------------


def test_accept_new_hashes_names_with_hash_known_hosts(sshd, tmp_path):
    recorded = tmp_path / "recorded"
    config = write(tmp_path / "config", block(
        "target", sshd, "    StrictHostKeyChecking accept-new\n    HashKnownHosts yes\n",
        known=recorded))
    assert run(config) == "ok\n"
    text = recorded.read_text()
    assert text.startswith("|1|") and "127.0.0.1" not in text
    assert run(config) == "ok\n"
    assert recorded.read_text() == text  # found under its hash: not recorded twice


def test_host_key_alias_is_used_for_lookup_and_recording(sshd, tmp_path):
    known = write(tmp_path / "kh", host_line("mybox", sshd.host_public_key))
    config = write(tmp_path / "config", block("target", sshd, "    HostKeyAlias mybox\n",
                                              known=known))
    assert run(config) == "ok\n"
    # Filed under the real name only: with the alias it is unknown.
    write(Path(known), host_line(name_of(sshd), sshd.host_public_key))
    with pytest.raises(HostKeyFailure, match="Host key for mybox is unknown"):
        run(config)
    recorded = tmp_path / "recorded"
    config = write(tmp_path / "config", block(
        "target", sshd, "    HostKeyAlias mybox\n    StrictHostKeyChecking accept-new\n",
        known=recorded))
    assert run(config) == "ok\n"
    assert recorded.read_text().startswith("mybox ssh-ed25519 ")


def test_host_key_alias_with_pattern_characters_is_refused(sshd, tmp_path):
    config = write(tmp_path / "config", block("target", sshd, "    HostKeyAlias evil,*\n",
                                              known=tmp_path / "kh"))
    with pytest.raises(ValueError, match="HostKeyAlias"):
        SSHExecutor(host="target", config=config)


# -- 7. no shell injection through %h -------------------------------------------------------------


def test_proxy_command_through_a_shell_works_for_a_plain_name(sshd, tmp_path, relay):
    known = write(tmp_path / "kh", host_line(name_of(sshd), sshd.host_public_key))
    config = write(tmp_path / "config", block(
        "target", sshd, f"    ProxyCommand sh -c 'exec {relay} %h %p'\n", known=known))
    assert run(config) == "ok\n"


@pytest.mark.parametrize("template", [
    "x;touch${{IFS}}{marker};",
    "$(touch${{IFS}}{marker})",
    "`touch${{IFS}}{marker}`",
    "x|touch${{IFS}}{marker}",
    "x&&touch${{IFS}}{marker}",
])
def test_shell_metacharacters_in_host_never_reach_a_proxy_command(sshd, tmp_path, relay,
                                                                  template):
    marker = tmp_path / "pwned"
    host = template.format(marker=marker)
    known = write(tmp_path / "kh", host_line(name_of(sshd), sshd.host_public_key))
    config = write(tmp_path / "config",
                   f"Host *\n    Port {sshd.port}\n    User {sshd.username}\n"
                   f"    IdentityFile {sshd.client_key_path}\n    UserKnownHostsFile {known}\n"
                   f"    ProxyCommand sh -c 'exec {relay} %h %p'\n")
    with pytest.raises(ValueError, match="not a valid host name"):
        with SSHExecutor(host=host, config=config, connect_retries=0) as ex:
            ex.run_command("true")
    assert not marker.exists()


@pytest.mark.parametrize("host", ["127.0.0.1 -oProxyCommand=touch", "-oProxyCommand=x",
                                  "127.0.0.1\t-v", "127.0.0.1\n"])
def test_whitespace_or_leading_dash_never_become_arguments(sshd, tmp_path, relay, host):
    config = write(tmp_path / "config", f"Host *\n    Port {sshd.port}\n"
                   f"    ProxyCommand {relay} %h %p\n")
    with pytest.raises(ValueError, match="not a valid host name"):
        SSHExecutor(host=host, config=config)


def test_hostname_from_ssh_config_is_checked_too(sshd, tmp_path, relay):
    marker = tmp_path / "pwned"
    config = write(tmp_path / "config",
                   f"Host safe\n    HostName x;touch${{IFS}}{marker};\n    Port {sshd.port}\n"
                   f"    ProxyCommand sh -c 'exec {relay} %h %p'\n")
    with pytest.raises(ValueError, match="HostName of 'safe'"):
        with SSHExecutor(host="safe", config=config, connect_retries=0) as ex:
            ex.run_command("true")
    assert not marker.exists()


# -- 8. pattern characters are never recorded -----------------------------------------------------


@pytest.mark.parametrize("host", ["evil,*", "*", "h?st", "!127.0.0.1", "a,b"])
def test_pattern_characters_refused_before_anything_is_recorded(sshd, tmp_path, host):
    recorded = tmp_path / "recorded"
    config = write(tmp_path / "config", f"Host *\n    StrictHostKeyChecking accept-new\n"
                   f"    UserKnownHostsFile {recorded}\n")
    sock = socket.create_connection(("127.0.0.1", sshd.port), timeout=10)
    try:
        with pytest.raises(ValueError, match=r"host .* is not a valid host name"):
            with SSHExecutor(host=host, sock=sock, username=sshd.username, config=config,
                             client_keys=[sshd.client_key_path], connect_retries=0) as ex:
                ex.run_command("true")
    finally:
        sock.close()
    assert not recorded.exists()


def test_plain_name_over_a_given_socket_is_recorded_as_itself(sshd, tmp_path):
    recorded = tmp_path / "recorded"
    config = write(tmp_path / "config", f"Host *\n    StrictHostKeyChecking accept-new\n"
                   f"    UserKnownHostsFile {recorded}\n    GlobalKnownHostsFile none\n")
    sock = socket.create_connection(("127.0.0.1", sshd.port), timeout=10)
    with SSHExecutor(host="login.example", sock=sock, username=sshd.username, config=config,
                     client_keys=[sshd.client_key_path]) as ex:
        assert ex.run_command("echo ok").stdout == "ok\n"
    assert recorded.read_text().startswith("login.example ssh-ed25519 ")


@pytest.mark.parametrize("name", ["login.example.org", "10.0.0.1", "::1", "fe80::1%eth0",
                                  "under_score", "[::1]"])
def test_ordinary_host_names_pass(name):
    assert check_hostname(name) == name


def test_yaml_executor_with_a_bad_host_fails_at_load():
    executor_yaml = pytest.importorskip("paramiko_executor.yaml")
    with pytest.raises(ValueError, match=r"not a valid host name.*line 1"):
        executor_yaml.load("!SSHExecutor {host: 'evil,*', config: []}")


# -- 14. --password-env leaves nothing behind for children ---------------------------------------


def test_password_env_is_removed_before_a_proxy_command_runs(sshd, tmp_path, relay, monkeypatch,
                                                             capsys):
    dump = tmp_path / "proxy_env"
    known = write(tmp_path / "kh", host_line(name_of(sshd), sshd.host_public_key))
    config = write(tmp_path / "config", block(
        "target", sshd, f"    ProxyCommand sh -c 'env > {dump}; exec {relay} %h %p'\n",
        known=known))
    monkeypatch.setenv("PE_TEST_PASSWORD", "not-the-real-password-7f3a")
    status = cli_main(["run", "--host", "target", "-F", config, "--password-env",
                       "PE_TEST_PASSWORD", "--", "echo", "hi"])
    assert status == 0 and capsys.readouterr().out == "hi\n"
    assert "PE_TEST_PASSWORD" not in os.environ
    env = dump.read_text()
    assert "PE_TEST_PASSWORD" not in env and "not-the-real-password-7f3a" not in env


# -- 15. server text is escaped before it reaches a terminal --------------------------------------


@pytest.fixture
def hostile_banner_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that answers with 101 lines of terminal escape sequences."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    line = b"\x1b]0;owned\x07\x1b[2J\x1b[31mYou have been hacked\r\n"

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                conn.sendall(line * 101)
                conn.settimeout(10)
                conn.recv(1024)  # until the client gives up
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    thread.join(timeout=30)


def test_cli_escapes_server_text(hostile_banner_server, tmp_path, capsys):
    status = cli_main(["probe", "--host", "127.0.0.1", "--port", str(hostile_banner_server),
                       "--known-hosts", str(tmp_path / "kh"), "-F", "none",
                       "--connect-retries", "0"])
    err = capsys.readouterr().err
    assert status == 255
    assert "\x1b" not in err and "\x07" not in err
    assert "\\x1b" in err  # shown, escaped


def test_printable_escapes_controls_only():
    assert printable("plain text, ünïcode") == "plain text, ünïcode"
    assert printable("a\x1b[2Jb\nc\x00\x7f\x9b\u202e") == "a\\x1b[2Jb\\nc\\x00\\x7f\\x9b\\u202e"
    assert printable(ExecutorFailure("x\ry")) == "x\\ry"


def test_expand_paths_none_and_quotes(tmp_path):
    assert expand_paths(["none"], "UserKnownHostsFile", {}) is None
    words = split_arguments(f'"{tmp_path}/a b" {tmp_path}/c')
    assert expand_paths(words, "K", {}) == (f"{tmp_path}/a b", f"{tmp_path}/c")


def test_auth_messages_escape_server_text():
    from paramiko_executor import AuthenticationFailure
    from paramiko_executor.auth import Credentials, TOTPLedger, _Login, _PromptAnswerer

    answerer = _PromptAnswerer(Credentials(username="u"), TOTPLedger())
    with pytest.raises(EOFError):
        answerer("", "", [("Code\x1b]0;owned\x07:", False)])
    assert "\x1b" not in answerer.refusal and "Code\\x1b]0;owned\\x07:" in answerer.refusal

    class DeadTransport:
        auth_timeout = None

        def is_active(self) -> bool:
            return False

    login = _Login(DeadTransport(), Credentials(username="u"), "h:22")
    login.disconnect = (14, "Too many authentication failures\x1b[2J")
    with pytest.raises(AuthenticationFailure) as info:
        login._raise_if_not_refusal("password", EOFError(), 0.0)
    assert "\x1b" not in str(info.value) and "failures\\x1b[2J" in str(info.value)
    login.disconnect = (2, "bye\x1b[2J")
    with pytest.raises(Exception) as info:
        login._raise_if_not_refusal("password", EOFError(), 0.0)
    assert "\x1b" not in str(info.value) and "bye\\x1b[2J" in str(info.value)


# -- 16. ssh_config errors are the executor's own, without quoting the file -----------------------


@pytest.mark.parametrize("content", ["LeakySecretLine\n", "Host a\nMatch\n"])
def test_unparsable_ssh_config_is_a_value_error_naming_the_file(tmp_path, content):
    config = write(tmp_path / "config", content)
    with pytest.raises(ValueError, match="ssh_config") as info:
        SSHExecutor(host="a", config=config)
    assert config in str(info.value)
    assert "LeakySecretLine" not in str(info.value) and "Match" not in str(info.value)


def test_binary_ssh_config_is_a_value_error(tmp_path):
    config = tmp_path / "config"
    config.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        SSHExecutor(host="a", config=str(config))


def test_yaml_names_the_bad_ssh_config_and_the_document_position(tmp_path):
    executor_yaml = pytest.importorskip("paramiko_executor.yaml")
    config = write(tmp_path / "config", "LeakySecretLine\n")
    with pytest.raises(ValueError) as info:
        executor_yaml.load(f"!SSHExecutor {{host: h, config: '{config}'}}")
    text = str(info.value)
    assert config in text and "line 1" in text and "LeakySecretLine" not in text
