"""Attacks on the per-process caches of merge 9ad1961 (key files, known_hosts, handshake timer)."""

from __future__ import annotations

import mmap
import os
import socket
from typing import Any, Callable, Iterator, List

import paramiko
import pytest

from paramiko_executor.auth import Credentials, authenticate
from paramiko_executor.hostkeys import HostKeyPolicy
from paramiko_executor.results import AuthenticationFailure, HostKeyFailure

Login = Callable[..., paramiko.Transport]


@pytest.fixture
def login() -> Iterator[Login]:
    """``login(server, **Credentials kwargs)``: a host-key-verified, authenticated transport."""
    transports: List[paramiko.Transport] = []

    def do_login(server: Any, **kwargs: Any) -> paramiko.Transport:
        kwargs.setdefault("username", server.username)
        kwargs.setdefault("allow_agent", False)
        kwargs.setdefault("look_for_keys", False)
        sock = socket.create_connection((server.host, server.port), timeout=10)
        transport = paramiko.Transport(sock)
        transports.append(transport)
        policy = HostKeyPolicy([str(server.known_hosts_path)])
        policy.prepare(transport, server.host, server.port)
        transport.start_client(timeout=10)
        policy.verify(transport, server.host, server.port)
        transport.auth_timeout = 10
        authenticate(transport, Credentials(**kwargs))
        assert transport.is_authenticated()
        return transport

    yield do_login
    for transport in transports:
        transport.close()


def test_a_passphrase_that_only_encodes_alike_does_not_unlock_a_cached_key(
        make_test_server: Callable[..., Any], login: Login, tmp_path: Any) -> None:
    # A lone surrogate cannot be a passphrase (paramiko cannot encode it), so it must not
    # find the key another login decrypted with "pass?" (what "replace" would encode it to).
    server = make_test_server()
    path = str(tmp_path / "encrypted")
    server.client_key.write_private_key_file(path, password="pass?")
    login(server, key_filenames=(path,), passphrase="pass?")
    with pytest.raises((AuthenticationFailure, UnicodeError)):
        login(server, key_filenames=(path,), passphrase="pass\udc80")


def test_a_key_file_rewritten_without_a_new_stamp_is_loaded_again(
        make_test_server: Callable[..., Any], login: Login, tmp_path: Any) -> None:
    # Writes through a shared map change the file's bytes but, after the first one, not
    # its mtime or ctime (nor do rewrites within a second on a file system that keeps
    # whole seconds, e.g. ext2 with 128-byte inodes): the stat stamp is no version.
    server = make_test_server()
    path = str(tmp_path / "key")
    server.client_key.write_private_key_file(path)
    stranger = paramiko.ECDSAKey.generate()
    stranger.write_private_key_file(path + ".other")
    with open(path + ".other", "rb") as other:
        replacement = other.read()
    assert len(replacement) == os.path.getsize(path)  # P-256 PEM keys: one size
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        mapped[:1] = mapped[:1]  # the first write through the map stamps the file
        stamp = os.stat(path)
        login(server, key_filenames=(path,))
        mapped[:] = replacement
        assert os.stat(path).st_mtime_ns == stamp.st_mtime_ns
        with pytest.raises(AuthenticationFailure, match=stranger.fingerprint.replace("+", r"\+")):
            login(server, key_filenames=(path,))


class _Presented:
    """A transport after its key exchange, as far as HostKeyPolicy.verify looks."""

    def __init__(self, key: paramiko.PKey) -> None:
        self.key = key

    def get_remote_server_key(self) -> paramiko.PKey:
        return self.key


def test_a_known_hosts_file_rewritten_without_a_new_stamp_is_read_again(tmp_path: Any) -> None:
    # As for key files: a line whose host was renamed in place (same size) through a
    # shared map no longer trusts the key for that host.
    key = paramiko.ECDSAKey.generate()
    path = str(tmp_path / "known_hosts")
    with open(path, "w") as text:
        text.write(f"[127.0.0.1]:2222 {key.get_name()} {key.get_base64()}\n")
    policy = HostKeyPolicy([path])
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        mapped[:1] = mapped[:1]  # the first write through the map stamps the file
        stamp = os.stat(path)
        policy.verify(_Presented(key), "127.0.0.1", 2222)  # type: ignore[arg-type]
        mapped[:16] = b"[127.0.0.9]:2222"
        assert os.stat(path).st_mtime_ns == stamp.st_mtime_ns
        with pytest.raises(HostKeyFailure, match="unknown"):
            policy.verify(_Presented(key), "127.0.0.1", 2222)  # type: ignore[arg-type]
