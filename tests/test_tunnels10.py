"""Tunnels: a prompt `Tunnel.close`, and TLS to a service behind the login node.

Against a real sshd on 127.0.0.1 and real TCP (and TLS) servers beside it.
The closes are checked with the waits they used to rely on made long
(``monkeypatch``), so a close that still relied on them would leave its
thread behind past `tunnels.JOIN_TIMEOUT`: no timing is asserted.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Tuple

import pytest
from backends import TCPServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import call_in_thread, carried_pipe, flood_stopped, wait_for

from paramiko_executor import SSHExecutor, pipe, tunnels

#: What `Tunnel.close` may wait for its threads in these tests: far below the waits
#: made long, so a thread that only ends at one of those is still alive after it.
JOIN = 5.0


def tunnel_threads(earlier: Iterable[threading.Thread] = ()) -> List[threading.Thread]:
    """The tunnels' threads alive now, but for those in ``earlier`` (another test's)."""
    seen = set(earlier)
    return [thread for thread in threading.enumerate()
            if thread.name.startswith("paramiko_executor tunnel") and thread not in seen]


def test_close_ends_a_pipe_blocked_writing_to_a_client_that_stopped_reading(
        sshd: Any, make_backend: Any, monkeypatch: Any) -> None:
    """A write to a full local socket is given up at once: no wait for the socket's timeout."""
    monkeypatch.setattr(pipe, "SOCKET_POLL", 120.0)
    monkeypatch.setattr(tunnels, "JOIN_TIMEOUT", JOIN)
    flood = make_backend("flood")
    earlier = tunnel_threads()
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        tunnel = ex.forward_local(flood.port, "127.0.0.1")
        client = socket.create_connection(tunnel.local_address, timeout=30)
        try:
            carried, window = carried_pipe(tunnel)

            def blocked() -> bool:
                # The client reads nothing: once its socket is full, the pipe's write to
                # it blocks, and the pipe holds the window, which stays spent.
                stopped = flood_stopped(ex, flood)
                return carried.held >= window - window // 10 and stopped

            wait_for(blocked, "the client's socket and the window to fill")
            threads = tunnel_threads(earlier)
            assert carried.thread in threads
            tunnel.close()
            alive = [thread.name for thread in threads if thread.is_alive()]
            assert not alive, f"close() left {alive} behind"
            assert carried.chan.closed
            assert ex.run_command("echo ok").stdout == "ok\n"
        finally:
            client.close()


@pytest.fixture
def unanswered() -> Iterator[Tuple[str, int]]:
    """A listening address whose connects hang: its backlog is full, so SYNs are dropped."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    queued = []
    try:
        for _ in range(3):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(listener.getsockname())
            queued.append(sock)
        yield listener.getsockname()
    finally:
        for sock in queued:
            sock.close()
        listener.close()


def test_close_ends_a_remote_forward_connecting_to_a_target_that_never_answers(
        sshd: Any, unanswered: Tuple[str, int], monkeypatch: Any) -> None:
    """The connect to the local target is given up at the close, not at its own timeout."""
    monkeypatch.setattr(tunnels, "LOCAL_CONNECT_TIMEOUT", 120.0)
    monkeypatch.setattr(tunnels, "JOIN_TIMEOUT", JOIN)
    earlier = tunnel_threads()
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        remote = ex.forward_remote(0, unanswered[1])
        _, port = remote.remote_address
        # A client on the server: it waits (bounded) for the forwarded connection to end.
        command = call_in_thread(lambda: ex.run_command(
            "python3 -c 'import socket; s = socket.create_connection((\"127.0.0.1\", "
            f"{port})); s.settimeout(30); print(repr(s.recv(1)))'"))
        try:
            # The supervisor, and the thread connecting to the target for the client.
            wait_for(lambda: len(remote._threads) == 2, "the connect to the local target")
            threads = tunnel_threads(earlier)
            remote.close()
            alive = [thread.name for thread in threads if thread.is_alive()]
            assert not alive, f"close() left {alive} behind"
        finally:
            command["thread"].join(60)
        # The client's connection was closed, not left to its timeout.
        assert command.get("result") is not None, command
        assert command["result"].stdout == "b''\n", command


# --- TLS through a local forward --------------------------------------------------------


def make_certificate(directory: Path, name: str) -> Tuple[str, str]:
    """A self-signed certificate for ``name`` and its key: (certificate file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder()
                   .subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                  critical=True)
                   .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


class TLSEcho(TCPServer):
    """A TLS server on 127.0.0.1 that answers each line in upper case; one thread per client."""

    #: Each client ends its connection itself (its reads are bounded).
    CUT = False

    def __init__(self, cert_file: str, key_file: str) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert_file, key_file)
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        try:
            with self._context.wrap_socket(sock, server_side=True) as tls, \
                    tls.makefile("rwb") as file:
                for line in file:
                    file.write(line.upper())
                    file.flush()
        except (OSError, ssl.SSLError):
            pass  # a client that refused the certificate


def test_tls_to_a_service_behind_the_server_through_a_local_forward(sshd: Any,
                                                                    tmp_path: Path) -> None:
    """The documented way: a real local socket, wrapped by ssl, verified for the service's name."""
    cert_file, key_file = make_certificate(tmp_path, "db.internal")
    service = TLSEcho(cert_file, key_file)
    try:
        context = ssl.create_default_context(cafile=cert_file)
        with SSHExecutor(**sshd.executor_parameters()) as ex, \
                ex.forward_local(service.port, "127.0.0.1") as tunnel:
            with socket.create_connection(tunnel.local_address, timeout=30) as raw, \
                    context.wrap_socket(raw, server_hostname="db.internal") as tls:
                tls.sendall(b"select 1\n")
                with tls.makefile("rb") as reply:
                    assert reply.readline() == b"SELECT 1\n"
                peer = tls.getpeercert()
                assert peer is not None and peer["subject"] == ((("commonName", "db.internal"),),)
            # The certificate is checked end to end: another name is refused.
            with socket.create_connection(tunnel.local_address, timeout=30) as raw, \
                    pytest.raises(ssl.SSLCertVerificationError):
                context.wrap_socket(raw, server_hostname="other.internal")
    finally:
        service.close()


# --- threads per forwarded connection ----------------------------------------------------


def test_a_local_forwards_client_costs_two_threads_its_open_none_of_its_own(
        sshd: Any, make_backend: Any, monkeypatch: Any) -> None:
    """The client's thread sends the open and waits for the answer itself; the pipe's
    other direction is the only other thread. (An open given up still gets one, rarely.)"""
    backend = make_backend("echo")
    started: List[str] = []
    start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        if thread.name.startswith("paramiko_executor tunnel"):
            started.append(thread.name)
        start(thread)

    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(backend.port, "127.0.0.1") as tunnel:
        assert ex.run_command("true").exit_code == 0
        monkeypatch.setattr(threading.Thread, "start", counting_start)
        clients = 5
        for i in range(clients):
            with socket.create_connection(tunnel.local_address, timeout=30) as client:
                client.sendall(b"ping %d" % i)
                assert client.recv(64) == b"ping %d" % i
        monkeypatch.undo()
        assert len(started) == 2 * clients, started
