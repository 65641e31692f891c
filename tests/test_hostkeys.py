"""Unit tests of paramiko_executor.hostkeys.HostKeyPolicy with temporary known_hosts files."""

from __future__ import annotations

import io
import multiprocessing
import os
import socket
import stat
import threading

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from helpers import run_threads
from paramiko.hostkeys import HostKeys

from paramiko_executor import hostkeys
from paramiko_executor.hostkeys import HostKeyPolicy, fingerprint, known_hosts_name
from paramiko_executor.results import HostKeyFailure


def ed25519_key() -> tuple[paramiko.Ed25519Key, str]:
    """A new key and its private OpenSSH text."""
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    return paramiko.Ed25519Key(file_obj=io.StringIO(pem)), pem


KEY, KEY_PRIVATE = ed25519_key()
OTHER, OTHER_PRIVATE = ed25519_key()
ECDSA = paramiko.ECDSAKey.generate()


class FakeTransport:
    """What verify() needs of a transport after the key exchange."""

    def __init__(self, key: paramiko.PKey) -> None:
        self.key = key

    def get_remote_server_key(self) -> paramiko.PKey:
        return self.key


def line(name: str, key: paramiko.PKey, marker: str = "") -> str:
    return f"{marker + ' ' if marker else ''}{name} {key.get_name()} {key.get_base64()}\n"


def private_texts(pem: str) -> list[str]:
    """The private key text and each of its base64 lines."""
    return [pem] + pem.splitlines()[1:-1]


def test_known_hosts_name():
    assert known_hosts_name("Example.COM", 22) == "example.com"
    assert known_hosts_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"


def test_known_key_passes(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text("# comment\n\ngarbage line\n" + line("[127.0.0.1]:2222", KEY))
    HostKeyPolicy([str(path)]).verify(FakeTransport(KEY), "127.0.0.1", 2222)


def test_port_22_uses_bare_name(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text(line("127.0.0.1", KEY))
    HostKeyPolicy(str(path)).verify(FakeTransport(KEY), "127.0.0.1", 22)
    # As ssh does, a host unknown as [host]:port is looked up by its bare name too...
    HostKeyPolicy(str(path)).verify(FakeTransport(KEY), "127.0.0.1", 2222)
    with pytest.raises(HostKeyFailure, match=r"\[127.0.0.1\]:2222 is unknown"):
        HostKeyPolicy(str(path)).verify(FakeTransport(OTHER), "127.0.0.1", 2222)
    # ...but not when a key of the same type is filed under [host]:port, nor for an alias.
    path.write_text(line("127.0.0.1", KEY) + line("[127.0.0.1]:2222", OTHER))
    with pytest.raises(HostKeyFailure, match="does not match"):
        HostKeyPolicy(str(path)).verify(FakeTransport(KEY), "127.0.0.1", 2222)
    path.write_text(line("127.0.0.1", KEY))
    with pytest.raises(HostKeyFailure, match="box is unknown"):
        HostKeyPolicy(str(path), host_key_alias="box").verify(FakeTransport(KEY), "127.0.0.1",
                                                              2222)


def test_hashed_and_pattern_entries(tmp_path):
    path = tmp_path / "known_hosts"
    hashed = HostKeys.hash_host("[127.0.0.1]:2222")
    path.write_text(line(hashed, KEY) + line("*.example.org,!bad.example.org", OTHER))
    policy = HostKeyPolicy(str(path))
    policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    policy.verify(FakeTransport(OTHER), "good.example.org", 22)
    with pytest.raises(HostKeyFailure, match="unknown"):
        policy.verify(FakeTransport(OTHER), "bad.example.org", 22)


def test_unknown_host_is_refused_with_fingerprint(tmp_path):
    missing = tmp_path / "nope" / "known_hosts"
    with pytest.raises(HostKeyFailure) as info:
        HostKeyPolicy([str(missing)]).verify(FakeTransport(KEY), "127.0.0.1", 2222)
    text = str(info.value)
    assert text.startswith(
        f"Host key for [127.0.0.1]:2222 is unknown (ssh-ed25519 {fingerprint(KEY)})"
    )
    assert fingerprint(KEY).startswith("SHA256:")
    assert not missing.exists()


def test_changed_key_is_refused_naming_both(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text(line("[127.0.0.1]:2222", OTHER))
    for accept_new in (False, True):
        with pytest.raises(HostKeyFailure) as info:
            HostKeyPolicy([str(path)], accept_new=accept_new).verify(
                FakeTransport(KEY), "127.0.0.1", 2222
            )
        text = str(info.value)
        assert text.startswith(f"Host key for [127.0.0.1]:2222 does not match (server sent "
                               f"ssh-ed25519 {fingerprint(KEY)}")
        assert fingerprint(OTHER) in text and f"{path}:1" in text
        for secret in private_texts(KEY_PRIVATE) + private_texts(OTHER_PRIVATE):
            assert secret not in text
    assert path.read_text() == line("[127.0.0.1]:2222", OTHER)


def test_known_host_with_other_key_type_is_a_mismatch(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text(line("[127.0.0.1]:2222", ECDSA))
    with pytest.raises(HostKeyFailure, match="does not match"):
        HostKeyPolicy([str(path)], accept_new=True).verify(FakeTransport(KEY), "127.0.0.1", 2222)


def test_revoked_key_is_refused(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text(line("[127.0.0.1]:2222", KEY) + line("*", KEY, marker="@revoked"))
    with pytest.raises(HostKeyFailure, match="is revoked"):
        HostKeyPolicy([str(path)], accept_new=True).verify(FakeTransport(KEY), "127.0.0.1", 2222)


def test_later_files_are_consulted_and_tilde_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "second").write_text(line("[127.0.0.1]:2222", KEY))
    policy = HostKeyPolicy(["~/first", "~/second"])
    assert policy.files == (str(tmp_path / "first"), str(tmp_path / "second"))
    policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)


def test_files_are_reread_on_each_verify(tmp_path):
    path = tmp_path / "known_hosts"
    policy = HostKeyPolicy([str(path)])
    with pytest.raises(HostKeyFailure):
        policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    path.write_text(line("[127.0.0.1]:2222", KEY))
    policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)


def test_a_file_is_parsed_once_until_it_changes(tmp_path, monkeypatch):
    # A group's hosts share one known_hosts file, read twice per connect: parsed once.
    parsed = []
    original = hostkeys._parse_line
    monkeypatch.setattr(hostkeys, "_parse_line",
                        lambda raw, where: parsed.append(where) or original(raw, where))
    path = tmp_path / "known_hosts"
    path.write_text(line("[127.0.0.1]:2222", KEY))
    policies = [HostKeyPolicy([str(path)]) for _ in range(3)]
    for policy in policies:
        policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    assert parsed == [f"{path}:1"]
    # A rewrite with the same size and a restored mtime is still seen (inode, ctime).
    stat_before = path.stat()
    replaced = tmp_path / "replaced"
    replaced.write_text(line("[127.0.0.1]:2222", OTHER))
    os.utime(replaced, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    os.replace(replaced, path)
    with pytest.raises(HostKeyFailure, match="changed|differs|does not match|mismatch"):
        policies[0].verify(FakeTransport(KEY), "127.0.0.1", 2222)
    assert len(parsed) == 2


def test_a_hosts_lines_are_matched_once_per_file_version(tmp_path, monkeypatch):
    # prepare() and verify() of one connect ask the same: with many lines (an HMAC
    # each when hashed) the second answer is the first one's, until a file changes.
    path = tmp_path / "known_hosts"
    path.write_text("".join(line(HostKeys.hash_host(f"[10.0.0.{i}]:22"), OTHER)
                            for i in range(20)) + line("[127.0.0.1]:2222", KEY))
    matched = []
    original = hostkeys._names_match
    monkeypatch.setattr(hostkeys, "_names_match",
                        lambda names, name: matched.append(name) or original(names, name))
    policy = HostKeyPolicy([str(path)])
    transport = FakeTransport(KEY)
    ours, theirs = socket.socketpair()
    unstarted = paramiko.Transport(ours)
    try:
        policy.prepare(unstarted, "127.0.0.1", 2222)
    finally:
        unstarted.close()
        theirs.close()
    policy.verify(transport, "127.0.0.1", 2222)
    assert matched == ["[127.0.0.1]:2222"] * 21
    HostKeyPolicy([str(path)]).verify(transport, "127.0.0.1", 2222)  # another executor's
    assert len(matched) == 21
    with path.open("a") as known_hosts:
        known_hosts.write(line("[127.0.0.1]:2222", KEY, marker="@revoked"))
    with pytest.raises(HostKeyFailure, match="revoked"):
        policy.verify(transport, "127.0.0.1", 2222)
    assert len(matched) == 21 + 22


def test_verification_off_accepts_anything():
    policy = HostKeyPolicy(None)
    policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    assert policy.files is None


def test_accept_new_records_once_with_safe_permissions(tmp_path):
    path = tmp_path / "dir" / "known_hosts"
    policy = HostKeyPolicy([str(path), str(tmp_path / "other")], accept_new=True)
    policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    assert path.read_text() == line("[127.0.0.1]:2222", KEY)
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert not (tmp_path / "other").exists()
    with pytest.raises(HostKeyFailure, match="does not match"):
        policy.verify(FakeTransport(OTHER), "127.0.0.1", 2222)
    HostKeyPolicy([str(path)]).verify(FakeTransport(KEY), "127.0.0.1", 2222)


def test_accept_new_appends_after_a_line_without_newline(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text(line("other.example", OTHER).rstrip("\n"))
    HostKeyPolicy([str(path)], accept_new=True).verify(FakeTransport(KEY), "127.0.0.1", 2222)
    assert path.read_text() == line("other.example", OTHER) + line("[127.0.0.1]:2222", KEY)


def test_accept_new_threads_record_one_line(tmp_path):
    path = tmp_path / "known_hosts"
    policy = HostKeyPolicy([str(path)], accept_new=True)
    _, errors = run_threads(
        lambda i: policy.verify(FakeTransport(KEY), "127.0.0.1", 2222), 8, 10
    )
    assert errors == []
    assert path.read_text() == line("[127.0.0.1]:2222", KEY)


def _verify_in_child(path: str, key_text: str, port: int) -> None:
    key = paramiko.Ed25519Key(file_obj=io.StringIO(key_text))
    HostKeyPolicy([path], accept_new=True).verify(FakeTransport(key), "127.0.0.1", port)  # type: ignore[arg-type]


def test_accept_new_processes_record_one_line_each(tmp_path):
    path = tmp_path / "known_hosts"
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_verify_in_child, args=(str(path), KEY_PRIVATE, 2000 + i % 3))
        for i in range(6)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * 6
    lines = path.read_text().splitlines(keepends=True)
    assert sorted(lines) == sorted(line(f"[127.0.0.1]:{port}", KEY) for port in (2000, 2001, 2002))


def test_prepare_puts_known_key_types_first(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text(line("[127.0.0.1]:2222", ECDSA) + line("[127.0.0.1]:2222", KEY))
    transport = paramiko.Transport(_socket())
    try:
        before = list(transport.get_security_options().key_types)
        HostKeyPolicy([str(path)]).prepare(transport, "127.0.0.1", 2222)
        after = list(transport.get_security_options().key_types)
        known = {"ssh-ed25519", ECDSA.get_name()}
        assert set(after[:2]) == known
        assert after[2:] == [t for t in before if t not in known]
        HostKeyPolicy([str(path)]).prepare(transport, "127.0.0.1", 2223)  # unknown: unchanged
        assert list(transport.get_security_options().key_types) == after
    finally:
        transport.close()


def test_prepare_maps_ssh_rsa_to_sha2_algorithms(tmp_path):
    path = tmp_path / "known_hosts"
    rsa = paramiko.RSAKey.generate(1024)
    path.write_text(line("host.example", rsa))
    transport = paramiko.Transport(_socket())
    try:
        HostKeyPolicy([str(path)]).prepare(transport, "host.example", 22)
        first = list(transport.get_security_options().key_types)[:3]
        assert first[:2] == ["rsa-sha2-512", "rsa-sha2-256"]
    finally:
        transport.close()


def _socket():
    import socket

    a, b = socket.socketpair()
    b.close()
    return a


@pytest.mark.parametrize(
    ("known_hosts", "error"),
    [(42, TypeError), ({"a": 1}, TypeError), ([1], TypeError), (b"path", TypeError)],
)
def test_bad_known_hosts(known_hosts, error):
    with pytest.raises(error, match="known_hosts"):
        HostKeyPolicy(known_hosts)


def test_bad_accept_new():
    with pytest.raises(TypeError, match="accept_new"):
        HostKeyPolicy(["x"], accept_new="yes")  # type: ignore[arg-type]



def test_accept_new_without_files_accepts_without_recording():
    policy = HostKeyPolicy([], accept_new=True)
    policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    with pytest.raises(HostKeyFailure, match="unknown"):
        HostKeyPolicy([]).verify(FakeTransport(KEY), "127.0.0.1", 2222)


def test_unreadable_file_is_a_host_key_failure(tmp_path):
    with pytest.raises(HostKeyFailure, match="cannot read known_hosts"):
        HostKeyPolicy([str(tmp_path)]).verify(FakeTransport(KEY), "127.0.0.1", 22)


def test_repr_lists_files():
    assert "accept_new=False" in repr(HostKeyPolicy(["/x"]))
    assert os.sep + "x" in repr(HostKeyPolicy(["/x"]))


# -- with real servers ---------------------------------------------------------------------------


def _handshake(server, policy: HostKeyPolicy) -> None:
    """prepare, key exchange and verify against ``server``, as the executor does."""
    import socket

    sock = socket.create_connection((server.host, server.port), timeout=10)
    transport = paramiko.Transport(sock)
    try:
        policy.prepare(transport, server.host, server.port)
        transport.start_client(timeout=10)
        policy.verify(transport, server.host, server.port)
    finally:
        transport.close()


def test_test_server_known_unknown_changed_and_accept_new(make_test_server, tmp_path):
    server = make_test_server()
    name = f"[127.0.0.1]:{server.port}"
    _handshake(server, HostKeyPolicy([str(server.known_hosts_path)]))
    with pytest.raises(HostKeyFailure, match=rf"Host key for \[127.0.0.1\]:{server.port} is "
                                             rf"unknown \({server.host_key.get_name()} SHA256:"):
        _handshake(server, HostKeyPolicy([str(tmp_path / "empty")]))
    changed = tmp_path / "changed"
    changed.write_text(line(name, ECDSA))
    with pytest.raises(HostKeyFailure, match="does not match") as info:
        _handshake(server, HostKeyPolicy([str(changed)], accept_new=True))
    assert fingerprint(server.host_key) in str(info.value)
    recorded = tmp_path / "new" / "known_hosts"
    _handshake(server, HostKeyPolicy([str(recorded)], accept_new=True))
    assert recorded.read_text() == line(name, server.host_key)
    _handshake(server, HostKeyPolicy([str(recorded)]))


@pytest.mark.parametrize("known", [KEY, ECDSA], ids=["ed25519", "ecdsa"])
def test_prepare_makes_a_multi_key_server_present_the_known_key(tmp_path, known):
    import socket

    path = tmp_path / "known_hosts"
    path.write_text(line("[127.0.0.1]:2222", known))
    client_sock, server_sock = socket.socketpair()
    server = paramiko.Transport(server_sock)
    client = paramiko.Transport(client_sock)
    try:
        server.add_server_key(ECDSA)
        server.add_server_key(KEY)
        server.start_server(event=threading.Event(), server=paramiko.ServerInterface())
        policy = HostKeyPolicy([str(path)])
        policy.prepare(client, "127.0.0.1", 2222)
        client.start_client(timeout=10)
        assert client.get_remote_server_key().asbytes() == known.asbytes()
        policy.verify(client, "127.0.0.1", 2222)
    finally:
        client.close()
        server.close()


def test_sshd_unknown_and_changed_host_key_fail_at_once(sshd, tmp_path):
    from paramiko_executor import SSHExecutor

    empty = tmp_path / "empty"
    changed = tmp_path / "changed"
    changed.write_text(line(f"[127.0.0.1]:{sshd.port}", OTHER))
    key = sshd.host_public_key
    for path, expected in ((empty, "is unknown"), (changed, "does not match")):
        ex = SSHExecutor(**sshd.executor_parameters(known_hosts=str(path)))  # default retries
        with pytest.raises(HostKeyFailure, match=expected) as info:
            ex.run_command("true")
        assert f"[127.0.0.1]:{sshd.port}" in str(info.value)
        assert f"ssh-ed25519 {fingerprint(key)}" in str(info.value)
        assert info.value.executor is ex
    assert not empty.exists()


def test_accept_new_into_an_unwritable_place_is_a_host_key_failure():
    # Missing, so readable as empty; but no directory can be made in /proc (not even by root).
    policy = HostKeyPolicy(["/proc/paramiko-executor-test/known_hosts"], accept_new=True)
    with pytest.raises(HostKeyFailure, match="cannot be recorded"):
        policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)


def test_empty_known_hosts_path_is_refused():
    with pytest.raises(ValueError, match="known_hosts"):
        HostKeyPolicy([""])


# -- issue 14: as strict as OpenSSH ---------------------------------------------------------------


def test_markers_and_fields_split_on_tabs(tmp_path):
    path = tmp_path / "kh"
    path.write_text(line("[127.0.0.1]:2222", KEY) + f"@revoked\t*\t{KEY.get_name()}\t"
                    f"{KEY.get_base64()}\n")
    with pytest.raises(HostKeyFailure, match="revoked"):
        HostKeyPolicy([str(path)]).verify(FakeTransport(KEY), "127.0.0.1", 2222)


def test_malformed_lines_and_hashes_are_skipped(tmp_path):
    path = tmp_path / "kh"
    path.write_text("|1|bad|hash ssh-ed25519 AAAA\n"           # bad base64 key
                    f"|1|!!|!! {KEY.get_name()} {KEY.get_base64()}\n"  # bad hash: no match
                    f"x ssh-unknown {KEY.get_base64()}\n"
                    + line("[127.0.0.1]:2222", KEY))
    HostKeyPolicy([str(path)]).verify(FakeTransport(KEY), "127.0.0.1", 2222)
    with pytest.raises(HostKeyFailure, match="unknown"):
        HostKeyPolicy([str(path)]).verify(FakeTransport(KEY), "127.0.0.1", 2223)


def test_global_files_trust_and_revoke_but_are_never_written(tmp_path):
    user, system = tmp_path / "user", tmp_path / "system"
    system.write_text(line("[127.0.0.1]:2222", KEY))
    policy = HostKeyPolicy([str(user)], accept_new=True, global_known_hosts=[str(system)])
    policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    with pytest.raises(HostKeyFailure, match="does not match"):
        policy.verify(FakeTransport(OTHER), "127.0.0.1", 2222)
    assert not user.exists()
    system.write_text(line("*", KEY, "@revoked"))
    user.write_text(line("[127.0.0.1]:2222", KEY))
    with pytest.raises(HostKeyFailure, match="revoked"):
        policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)


def test_revoked_host_keys_file_missing_or_krl_refuses_everything(tmp_path):
    known = tmp_path / "kh"
    known.write_text(line("[127.0.0.1]:2222", KEY))
    revoked = tmp_path / "revoked"
    policy = HostKeyPolicy([str(known)], revoked_host_keys=str(revoked))
    with pytest.raises(HostKeyFailure, match="cannot read RevokedHostKeys"):
        policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    revoked.write_bytes(b"SSHKRL\n\0" + b"\0" * 40)
    with pytest.raises(HostKeyFailure, match="KRL"):
        policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    revoked.write_text(f"{OTHER.get_name()} {OTHER.get_base64()}\nnot a key\n")
    policy.verify(FakeTransport(KEY), "127.0.0.1", 2222)
    with pytest.raises(HostKeyFailure, match="revoked"):
        HostKeyPolicy([], accept_new=True, revoked_host_keys=str(revoked)).verify(
            FakeTransport(OTHER), "127.0.0.1", 2222)


def test_hashed_recording_and_alias(tmp_path):
    path = tmp_path / "kh"
    HostKeyPolicy([str(path)], accept_new=True, hash_known_hosts=True,
                  host_key_alias="box").verify(FakeTransport(KEY), "127.0.0.1", 2222)
    text = path.read_text()
    assert text.startswith("|1|") and "box" not in text and "127.0.0.1" not in text
    hosts = HostKeys(str(path))
    assert hosts.lookup("box") is not None and hosts.lookup("[127.0.0.1]:2222") is None
    HostKeyPolicy([str(path)], host_key_alias="box").verify(FakeTransport(KEY), "10.1.1.1", 22)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [({"global_known_hosts": 5}, TypeError, "global_known_hosts"),
     ({"revoked_host_keys": 5}, TypeError, "revoked_host_keys"),
     ({"hash_known_hosts": "yes"}, TypeError, "hash_known_hosts"),
     ({"host_key_alias": ""}, TypeError, "host_key_alias")],
)
def test_bad_new_parameters(kwargs, error, name):
    with pytest.raises(error, match=name):
        HostKeyPolicy([], **kwargs)


@pytest.mark.hang_timeout(60)
def test_a_pattern_of_many_stars_is_matched_without_backtracking(tmp_path):
    # A regular expression takes time exponential in the stars here; the matcher is linear.
    path = tmp_path / "known_hosts"
    path.write_text(line("*a" * 30 + "b", KEY))
    with pytest.raises(HostKeyFailure, match="unknown"):
        HostKeyPolicy(str(path)).verify(FakeTransport(KEY), "a" * 64, 22)
