"""Parameter checks and ssh_config resolution, without a network."""

from __future__ import annotations

import inspect
import pickle

import paramiko
import pytest

from paramiko_executor import DupingSSHExecutor, ShellExecutor, SSHExecutor
from paramiko_executor.options import (
    DEFAULT_KNOWN_HOSTS,
    connect_parameter_names,
    normalize_parameters,
)


def target(ex):
    return ex._connection.target


def test_paramiko_names_and_aliases_are_accepted():
    ex = SSHExecutor(host="h", port=2222, username="u", client_keys=["/k"], known_hosts=None,
                     config=())
    t = target(ex)
    assert (t.hostname, t.port, t.credentials.username) == ("h", 2222, "u")
    assert t.credentials.key_filenames == ("/k",)
    assert t.host_keys.files is None
    ex2 = SSHExecutor(hostname="h", key_filename="/k", config=())
    assert target(ex2).credentials.key_filenames == ("/k",)


def test_every_connect_parameter_of_installed_paramiko_is_known():
    names = set(inspect.signature(paramiko.SSHClient.connect).parameters) - {"self"}
    assert connect_parameter_names() == names
    assert set(normalize_parameters({n: None for n in names})) == names


@pytest.mark.parametrize("kwargs, name", [
    ({"host": "h", "hostname": "h"}, "hostname"),
    ({"host": "h", "client_keys": ["/a"], "key_filename": "/b"}, "key_filename"),
])
def test_both_spellings_are_a_type_error(kwargs, name):
    with pytest.raises(TypeError, match=name):
        SSHExecutor(config=(), **kwargs)


def test_unknown_parameter_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="hostnmae"):
        SSHExecutor(hostnmae="h", config=())
    with pytest.raises(TypeError, match="bogus"):
        DupingSSHExecutor(host="h", bogus=1, config=())
    with pytest.raises(TypeError, match="nonsense"):
        ShellExecutor(nonsense=1)


@pytest.mark.parametrize("kwargs, error, name", [
    ({}, TypeError, "host"),
    ({"host": 5}, TypeError, "host"),
    ({"host": "h", "port": "x"}, TypeError, "port"),
    ({"host": "h", "port": 0}, ValueError, "port"),
    ({"host": "h", "port": True}, TypeError, "port"),
    ({"host": "h", "timeout": -1}, ValueError, "timeout"),
    ({"host": "h", "password": 1234}, TypeError, "password"),
    ({"host": "h", "pkey": "not a key"}, TypeError, "pkey"),
    ({"host": "h", "client_keys": [1]}, TypeError, "client_keys"),
    ({"host": "h", "allow_agent": "yes"}, TypeError, "allow_agent"),
    ({"host": "h", "on_disconnect_retry": -1}, ValueError, "on_disconnect_retry"),
    ({"host": "h", "on_disconnect_retry": "3"}, TypeError, "on_disconnect_retry"),
    ({"host": "h", "max_sessions": 0}, ValueError, "max_sessions"),
    ({"host": "h", "connect_retries": -2}, ValueError, "connect_retries"),
    ({"host": "h", "connect_backoff": "1"}, TypeError, "connect_backoff"),
    ({"host": "h", "keepalive_interval": 0}, ValueError, "keepalive_interval"),
    ({"host": "h", "keepalive_count_max": 0}, ValueError, "keepalive_count_max"),
    ({"host": "h", "known_hosts": 5}, TypeError, "known_hosts"),
    ({"host": "h", "mfa_config": "nope"}, TypeError, "mfa_config"),
    ({"host": "h", "config": "/nonexistent/ssh_config"}, ValueError, "config"),
])
def test_bad_values_fail_at_construction_naming_the_parameter(kwargs, error, name):
    kwargs.setdefault("config", ())
    with pytest.raises(error, match=name):
        SSHExecutor(**kwargs)


def test_bad_run_command_arguments(sshd_free_executor=None):
    ex = SSHExecutor(host="h", config=())
    with pytest.raises(TypeError, match="command"):
        ex.run_command(b"echo")
    with pytest.raises(TypeError, match="stdin_input"):
        ex.run_command("cat", stdin_input=5)
    with pytest.raises(ValueError, match="timeout"):
        ex.run_command("true", timeout=0)
    with pytest.raises(TypeError, match="timeout"):
        ex.run_command("true", timeout="1")


def test_known_hosts_default_and_explicit(tmp_path):
    ex = SSHExecutor(host="h", config=())
    home = __import__("os").path.expanduser("~")
    assert target(ex).host_keys.files == tuple(p.replace("~", home) for p in DEFAULT_KNOWN_HOSTS)
    assert target(ex).host_keys.files[1].endswith("/.ssh/known_hosts2")  # as OpenSSH reads
    path = tmp_path / "kh"
    ex = SSHExecutor(host="h", known_hosts=str(path), config=())
    assert target(ex).host_keys.files == (str(path),)


def write_config(tmp_path, text):
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return str(path)


def test_ssh_config_resolves_the_alias(tmp_path):
    key = tmp_path / "id_test"
    key.write_text("not read here")
    config = write_config(tmp_path, f"""
Host login
    HostName 127.0.0.9
    User alice
    Port 2200
    IdentityFile {key}
    ServerAliveInterval 7
    ServerAliveCountMax 2
    UserKnownHostsFile {tmp_path}/kh1 {tmp_path}/kh2
""")
    t = target(SSHExecutor(host="login", config=config))
    assert (t.hostname, t.port, t.credentials.username) == ("127.0.0.9", 2200, "alice")
    assert t.credentials.key_filenames == (str(key),)
    assert (t.keepalive_interval, t.keepalive_count_max) == (7.0, 2)
    assert t.host_keys.files == (f"{tmp_path}/kh1", f"{tmp_path}/kh2")
    assert not t.host_keys.accept_new


def test_explicit_parameters_win_over_the_file(tmp_path):
    config = write_config(tmp_path, """
Host login
    HostName 127.0.0.9
    User alice
    Port 2200
    ServerAliveInterval 7
    StrictHostKeyChecking no
""")
    t = target(SSHExecutor(host="login", username="bob", port=22, keepalive_interval=3,
                           known_hosts=str(tmp_path / "kh"), config=[config]))
    assert (t.port, t.credentials.username, t.keepalive_interval) == (22, "bob", 3.0)
    assert t.host_keys.files == (str(tmp_path / "kh"),)


def test_strict_host_key_checking_values(tmp_path):
    config = write_config(tmp_path, """
Host off
    StrictHostKeyChecking no
Host new
    StrictHostKeyChecking accept-new
""")
    off = target(SSHExecutor(host="off", config=config)).host_keys
    assert not off.strict and not off.accept_new  # still refuses revoked keys
    new = target(SSHExecutor(host="new", config=config)).host_keys
    assert new.files is not None and new.accept_new
    assert target(SSHExecutor(host="other", config=config)).host_keys.files is not None


def test_proxy_jump_chain(tmp_path):
    config = write_config(tmp_path, """
Host target
    HostName 10.0.0.5
    ProxyJump jumper@first:2201,second
Host first
    HostName 127.0.0.2
Host second
    HostName 127.0.0.3
    User carol
    ProxyJump ignored-for-later-hops
""")
    t = target(SSHExecutor(host="target", username="dave", config=config))
    assert t.hostname == "10.0.0.5" and t.jump is not None
    second = t.jump
    assert (second.hostname, second.port, second.credentials.username) == ("127.0.0.3", 22, "carol")
    first = second.jump
    assert (first.hostname, first.port, first.credentials.username) == ("127.0.0.2", 2201, "jumper")
    assert first.jump is None


def test_proxy_jump_loop_is_refused(tmp_path):
    config = write_config(tmp_path, """
Host a
    ProxyJump b
Host b
    ProxyJump a
""")
    with pytest.raises(ValueError, match="ProxyJump"):
        SSHExecutor(host="a", config=config)


def test_proxy_command_from_config(tmp_path):
    config = write_config(tmp_path, "Host p\n    ProxyCommand nc %h %p\n")
    assert target(SSHExecutor(host="p", config=config)).proxy_command == "nc p 22"


def test_pickle_carries_configuration_only(tmp_path):
    ex = SSHExecutor(host="h", port=2022, username="u", password="s3cret", config=())
    copy = pickle.loads(pickle.dumps(ex))
    assert repr(copy) == repr(ex)
    assert copy._connection is not ex._connection and copy.state is None
    duping = pickle.loads(pickle.dumps(DupingSSHExecutor(host="h", wrapper="/w", config=())))
    assert duping._wrapper == "/w"


def test_jump_hops_keep_their_own_host_key_settings(tmp_path):
    config = write_config(tmp_path, f"""
Host target
    StrictHostKeyChecking accept-new
    UserKnownHostsFile {tmp_path}/target_kh
    ProxyJump bastion
Host bastion
    StrictHostKeyChecking yes
    HostKeyAlias bastion-key
""")
    t = target(SSHExecutor(host="target", config=config))
    assert t.host_keys.accept_new and t.host_keys.files == (f"{tmp_path}/target_kh",)
    hop = t.jump.host_keys
    assert not hop.accept_new and hop.host_key_alias == "bastion-key"
    assert hop.files == tuple(__import__("os").path.expanduser(p) for p in DEFAULT_KNOWN_HOSTS)
    # An explicit known_hosts names the files of the whole chain, not its strictness.
    t = target(SSHExecutor(host="target", config=config, known_hosts=str(tmp_path / "kh")))
    assert t.jump.host_keys.files == (str(tmp_path / "kh"),)
    assert t.host_keys.accept_new and not t.jump.host_keys.accept_new


@pytest.mark.parametrize("host", ["evil,*", "a b", "-x", "x;y", "$(id)", "`id`", "a\x1b", ""])
def test_unsafe_host_names_fail_at_construction(host):
    with pytest.raises((ValueError, TypeError), match="host"):
        SSHExecutor(host=host, config=())


def test_global_known_hosts_and_revoked_from_config(tmp_path):
    config = write_config(tmp_path, f"""
Host h
    GlobalKnownHostsFile "{tmp_path}/g 1" ~/g2
    RevokedHostKeys %d/revoked_%h
    HashKnownHosts yes
""")
    keys = target(SSHExecutor(host="h", config=config)).host_keys
    home = __import__("os").path.expanduser("~")
    assert keys.global_files == (f"{tmp_path}/g 1", f"{home}/g2")
    assert keys.revoked_file == f"{home}/revoked_h" and keys.hash_known_hosts
    default = target(SSHExecutor(host="h", config=())).host_keys
    assert default.global_files == ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
