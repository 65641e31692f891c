"""Host-key decisions compared with OpenSSH's own: ``ssh-keygen -F`` and real ``ssh`` logins.

Every file is written by the test; ``GlobalKnownHostsFile none`` keeps /etc/ssh out of it.
Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

from pathlib import Path

import paramiko
import pytest

from paramiko_executor import HostKeyFailure, SSHExecutor
from testsupport import oracle


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def home(tmp_path: Path) -> str:
    path = tmp_path / "home"
    (path / ".ssh").mkdir(parents=True)
    return str(path)


def host_line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}\n"


def block(alias: str, server, known: Path, extra: str = "") -> str:
    return (f"Host {alias}\n    HostName 127.0.0.1\n    Port {server.port}\n"
            f"    User {server.username}\n    IdentityFile {server.client_key_path}\n"
            f"    GlobalKnownHostsFile none\n    UserKnownHostsFile {known}\n" + extra)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def run(config: str, host: str = "target") -> str:
    with SSHExecutor(host=host, config=config, connect_retries=0) as ex:
        return ex.run_command("echo ok").stdout


# -- issue 19.1: HostKeyAlias is lower-cased, as OpenSSH does -------------------------------------


def test_upper_case_host_key_alias_with_accept_new(sshd, sshd3, tmp_path, home):
    recorded = tmp_path / "recorded"
    alias = "    HostKeyAlias ProdDB\n    StrictHostKeyChecking accept-new\n"
    genuine = write(tmp_path / "genuine", block("target", sshd, recorded, alias))
    assert run(genuine) == "ok\n"
    first = recorded.read_text()
    assert first == host_line("proddb", sshd.host_public_key)
    assert run(genuine) == "ok\n"
    assert recorded.read_text() == first  # found again: not appended a second time
    # OpenSSH finds the same line: it logs in without recording anything either.
    assert oracle.login(genuine, "target", home)[0] == 0
    assert recorded.read_text() == first

    impostor = write(tmp_path / "impostor", block("target", sshd3, recorded, alias))
    with pytest.raises(HostKeyFailure, match="Host key for proddb does not match"):
        run(impostor)
    status, err = oracle.login(impostor, "target", home)
    assert status == 255 and "HOST IDENTIFICATION HAS CHANGED" in err
    assert recorded.read_text() == first


def test_upper_case_host_key_alias_with_yes_accepts_the_genuine_host(sshd, tmp_path, home):
    # The line as OpenSSH records it for "HostKeyAlias ProdDB".
    known = tmp_path / "known"
    known.write_text(host_line("proddb", sshd.host_public_key))
    config = write(tmp_path / "config", block(
        "target", sshd, known, "    HostKeyAlias ProdDB\n    StrictHostKeyChecking yes\n"))
    assert oracle.login(config, "target", home)[0] == 0
    assert run(config) == "ok\n"
