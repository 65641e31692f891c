"""Regression tests from an attack on the connect path (pipelined probe, remembered limits, login).

Each test puts a real server (OpenSSH sshd, Dropbear) behind a fault: a
ProxyCommand relay that cuts or delays the SSH stream at a chosen message, or
a server restarted with another configuration on the same port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest
from helpers import run_threads, wait_for

from paramiko_executor import SSHExecutor
from paramiko_executor.results import ExecutorFailure
from paramiko_executor.slots import Slots

#: A ProxyCommand: relays stdin/stdout to 127.0.0.1:PORT, reading the
#: unencrypted start of each direction up to its NEWKEYS (message 21).
#: ``cut-once``: on the first connection (MARKER absent) stdin is closed right
#: after the client's NEWKEYS, so the client's next write fails while its
#: reads just wait (nothing comes). ``delay``: what the server sends after its
#: NEWKEYS (EXT_INFO first) is held back DELAY seconds.
RELAY = textwrap.dedent("""
    import os, socket, sys, threading, time
    port, mode, marker, delay = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    first = not os.path.exists(marker)
    open(marker, "a").close()
    sock = socket.create_connection(("127.0.0.1", port))

    def newkeys_end(data):
        # Where NEWKEYS ends in data (the banner lines first), None if not in it yet.
        at, banner = 0, False
        while not banner:
            end = data.find(b"\\r\\n", at)
            if end < 0:
                return None
            banner = data[at:end + 2].startswith(b"SSH-")
            at = end + 2
        while len(data) >= at + 6:
            length = int.from_bytes(data[at:at + 4], "big")
            if len(data) < at + 4 + length:
                return None
            kind = data[at + 5]
            at += 4 + length
            if kind == 21:
                return at
        return None

    def pump(read, write, on_newkeys):
        seen, done = b"", False
        while True:
            chunk = read()
            if not chunk:
                return
            if not done:
                seen += chunk
                end = newkeys_end(seen)
                if end is not None:
                    done = True
                    cut = len(chunk) - (len(seen) - end)
                    write(chunk[:cut])
                    on_newkeys()
                    chunk = chunk[cut:]
            if chunk:
                write(chunk)

    def to_client(data):
        os.write(1, data)

    def client_newkeys():
        if mode == "cut-once" and first:
            os.close(0)
            time.sleep(60)
            os._exit(0)

    def server_newkeys():
        if mode == "delay":
            time.sleep(delay)

    threading.Thread(target=pump, args=(lambda: sock.recv(65536), to_client, server_newkeys),
                     daemon=True).start()
    pump(lambda: os.read(0, 65536), sock.sendall, client_newkeys)
    time.sleep(60)
""")


def relayed(server: Any, tmp_path: Any, mode: str, delay: float = 0.0,
            **overrides: Any) -> Dict[str, Any]:
    """Executor parameters reaching ``server`` through the `RELAY` ProxyCommand."""
    script = tmp_path / "relay.py"
    script.write_text(RELAY)
    config = tmp_path / "ssh_config"
    config.write_text(f"Host {server.host}\n  ProxyCommand {sys.executable} {script} "
                      f"{server.port} {mode} {tmp_path / 'marker'} {delay}\n")
    return server.executor_parameters(config=str(config), **overrides)


def test_a_connection_broken_while_the_login_is_sent_is_retried(sshd: Any, tmp_path: Any) -> None:
    # The first connection breaks under the client's service and publickey
    # requests: a temporary failure, never "no method was accepted".
    params = relayed(sshd, tmp_path, "cut-once", connect_retries=2, connect_backoff=0.1)
    with SSHExecutor(**params, max_sessions=2) as ex:
        assert ex.run_command("echo ok").stdout == "ok\n"
        assert ex.statistics().connect_failures == 1


@pytest.fixture
def rsa_dropbear(sshd: Any, tmp_path: Any) -> Iterator[Any]:
    """Dropbear (RSA signatures: rsa-sha2-256, not -512) logging sshd's user in with an RSA key."""
    from testsupport.dropbear import DropbearServer, DropbearUnavailable

    key = str(tmp_path / "id_rsa")
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", key],
                   check=True, timeout=60)
    try:
        server = DropbearServer(username=sshd.username, client_key_path=key)
    except DropbearUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with server:
        yield server


def test_an_rsa_key_waits_for_the_servers_signature_algorithms(rsa_dropbear: Any,
                                                               tmp_path: Any) -> None:
    # The server's EXT_INFO (server-sig-algs) arrives after start_client returned:
    # signing with paramiko's default (rsa-sha2-512) before reading it is refused.
    params = relayed(rsa_dropbear, tmp_path, "delay", delay=0.5, connect_retries=0,
                     allow_agent=False, look_for_keys=False, known_hosts=None)
    with SSHExecutor(**params, max_sessions=2) as ex:
        assert ex.run_command("echo ok").stdout == "ok\n"


@pytest.mark.hang_timeout(120)
def test_a_remembered_limit_above_a_restarted_servers_maxsessions_fails_no_command(
        make_sshd: Any) -> None:
    server = make_sshd(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(connect_backoff=0.1)) as ex:
        ex.run_command("true")  # probed and remembered: 10
        server.stop()
        server.max_sessions = 2
        with open(server.config_path, "w", encoding="utf-8") as config:
            config.write(server._config_text())
        server.start()
        results, errors = run_threads(
            lambda i: ex.run_command(f"sleep 8; echo {i}").stdout, 5, 100)
        assert ex.statistics().max_sessions == 2
    assert [e for e in errors if isinstance(e, ExecutorFailure)] == []
    assert results == {i: f"{i}\n" for i in range(5)}


def test_lowered_slots_keep_back_the_releases_of_slots_taken_away() -> None:
    slots = Slots(4)
    for _ in range(3):
        assert slots.acquire(blocking=False)
    slots.lower(2)  # the free slot goes, and one of the three held
    assert (slots.limit, slots.available) == (2, 0)
    slots.release()  # kept back
    assert slots.available == 0
    slots.release()
    assert slots.available == 1
    with pytest.raises(ValueError, match="limit must be from 1 to 1"):
        slots.lower(2)


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose SYNs go unanswered: a listener that never accepts, backlog full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # bounded: more than a backlog of 0 admits
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(1.0)
    try:
        with pytest.raises(OSError):  # the timeout: the backlog is full
            probe.connect(("127.0.0.1", port))
    finally:
        probe.close()
    yield port
    for sock in fillers + [listener]:
        sock.close()


def test_close_cuts_a_tcp_connect_short(unanswered_port: int) -> None:
    ex = SSHExecutor(host="127.0.0.1", port=unanswered_port, username="nobody",
                     known_hosts=None, config=(), password="x", connect_retries=0,
                     allow_agent=False, look_for_keys=False)
    outcome: List[BaseException] = []

    def command() -> None:
        try:
            ex.run_command("true")
        except BaseException as exc:  # collected for the assertion
            outcome.append(exc)

    caller = threading.Thread(target=command, daemon=True)
    caller.start()
    wait_for(lambda: ex._connection._attempt is not None, "the connect attempt")
    time.sleep(0.5)  # into the kernel's connect, which only a shutdown ends
    ex.close()
    caller.join(10)
    assert not caller.is_alive(), "close() left the caller in a TCP connect"
    assert [type(exc) for exc in outcome] == [ExecutorFailure]
    assert "closed while connecting" in str(outcome[0])
