"""OpenSSH client configuration against real sshd servers: aliases and ProxyJump."""

from __future__ import annotations

import paramiko
import pytest

from paramiko_executor import HostKeyFailure, SSHExecutor


def known_hosts(tmp_path, *servers):
    path = tmp_path / "known_hosts"
    path.write_text("".join(open(s.known_hosts_path).read() for s in servers))
    return path


def host_block(alias, server, known, extra=""):
    return (f"Host {alias}\n    HostName 127.0.0.1\n    Port {server.port}\n"
            f"    User {server.username}\n    IdentityFile {server.client_key_path}\n"
            f"    UserKnownHostsFile {known}\n{extra}")


def test_connect_by_alias_with_no_other_parameter(sshd, tmp_path):
    known = known_hosts(tmp_path, sshd)
    config = tmp_path / "config"
    config.write_text(host_block("login", sshd, known))
    with SSHExecutor(host="login", config=str(config)) as ex:
        assert ex.run_command("echo via alias").stdout == "via alias\n"
        assert ex.run_command("whoami").stdout == f"{sshd.username}\n"


def test_explicit_parameters_override_the_alias(sshd, sshd3, tmp_path):
    known = known_hosts(tmp_path, sshd, sshd3)
    config = tmp_path / "config"
    config.write_text(host_block("login", sshd, known))
    with SSHExecutor(host="login", port=sshd3.port, client_keys=[sshd3.client_key_path],
                     config=str(config)) as ex:
        ex.run_command("true")
        assert ex.session_limit == 3  # sshd3, not the alias's sshd


def test_proxy_jump_through_a_second_sshd(sshd, sshd3, tmp_path):
    known = known_hosts(tmp_path, sshd, sshd3)
    config = tmp_path / "config"
    config.write_text(host_block("target", sshd3, known, "    ProxyJump jump\n")
                      + host_block("jump", sshd, known))
    with SSHExecutor(host="target", config=str(config)) as ex:
        assert ex.run_command("echo through the jump host").stdout == "through the jump host\n"
        transport = ex.state.transport
        assert isinstance(transport.sock, paramiko.Channel)  # tunnelled, not a TCP socket
        assert ex.session_limit == 3
        jump_transport = transport.sock.get_transport()
    assert not jump_transport.is_active()  # closing the executor closed the whole chain


def test_strict_host_key_checking_no_is_the_users_opt_out(sshd, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    config = tmp_path / "config"
    config.write_text(host_block("strict", sshd, empty)
                      + host_block("lax", sshd, empty, "    StrictHostKeyChecking no\n"))
    with pytest.raises(HostKeyFailure):
        SSHExecutor(host="strict", config=str(config), connect_retries=0).run_command("true")
    with SSHExecutor(host="lax", config=str(config)) as ex:
        assert ex.run_command("echo lax").stdout == "lax\n"


def test_accept_new_records_the_key_then_refuses_a_changed_one(sshd, sshd3, tmp_path):
    recorded = tmp_path / "recorded"
    config = tmp_path / "config"
    config.write_text(host_block("new", sshd, recorded, "    StrictHostKeyChecking accept-new\n"))
    with SSHExecutor(host="new", config=str(config)) as ex:
        assert ex.run_command("echo first").stdout == "first\n"
    assert f"[127.0.0.1]:{sshd.port}" in recorded.read_text()
    # Same host and port, another key: pretend sshd3's key was recorded for it.
    other = open(sshd3.known_hosts_path).read().replace(str(sshd3.port), str(sshd.port))
    recorded.write_text(other)
    with pytest.raises(HostKeyFailure):
        SSHExecutor(host="new", config=str(config)).run_command("true")


def test_default_config_with_alias_and_jump_needs_only_host(sshd, sshd3, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    known = known_hosts(tmp_path, sshd, sshd3)
    (home / ".ssh" / "config").write_text(
        host_block("cluster", sshd3, known, "    ProxyJump gateway\n")
        + host_block("gateway", sshd, known)
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with SSHExecutor(host="cluster") as ex:
        assert ex.run_command("echo hello from the cluster").stdout == "hello from the cluster\n"
        assert isinstance(ex.state.transport.sock, paramiko.Channel)
