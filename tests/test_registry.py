"""The process-wide registry of shared connections, against a real sshd.

Copies of an executor unpickled in one process share a connection only when
they resolve to the same connection there: another ``HOME`` (so another
``~/.ssh/config``) or an edited ssh_config gives a copy its own. A shared
connection unused for `registry.IDLE_CLOSE` seconds is closed, and the next
command reconnects.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from typing import Any, Dict

import pytest
from helpers import reap

from paramiko_executor import AuthenticationFailure, SSHExecutor, registry

WAIT = 20.0  # seconds any bounded wait of these tests may take
ALIAS = "registry-alias"


@pytest.fixture(scope="module")
def sshd_registry():
    from conftest import start_openssh

    server = start_openssh(max_sessions=4)
    yield server
    server.close()


def write_home(home, user: str) -> str:
    """A HOME whose ``~/.ssh/config`` sends `ALIAS` to 127.0.0.1 as ``user``."""
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = ssh / "config"
    config.write_text(f"Host {ALIAS}\n  HostName 127.0.0.1\n  User {user}\n")
    config.chmod(0o600)
    return str(home)


def alias_parameters(server) -> Dict[str, Any]:
    """The server by `ALIAS`, its user left to ``~/.ssh/config`` (read from ``$HOME``)."""
    parameters = server.executor_parameters(host=ALIAS)
    del parameters["username"], parameters["config"]
    return parameters


def unpickled_with_home(data: bytes, home: str, monkeypatch) -> SSHExecutor:
    monkeypatch.setenv("HOME", home)
    return pickle.loads(data)


def test_copies_unpickled_with_another_home_get_their_own_connection(
        sshd_registry, tmp_path, monkeypatch):
    good = write_home(tmp_path / "good", sshd_registry.username)
    wrong = write_home(tmp_path / "wrong", "nobody-here")
    monkeypatch.setenv("HOME", good)
    data = pickle.dumps(SSHExecutor(**alias_parameters(sshd_registry)))
    first = unpickled_with_home(data, good, monkeypatch)
    assert first.run_command("whoami").stdout == f"{sshd_registry.username}\n"
    other = unpickled_with_home(data, wrong, monkeypatch)
    assert other._connection is not first._connection
    with pytest.raises(AuthenticationFailure):
        other.run_command("whoami")
    # The same HOME again: the same connection as the first copy.
    again = unpickled_with_home(data, good, monkeypatch)
    assert again._connection is first._connection
    first.close()


def test_an_edited_ssh_config_is_seen_by_the_next_copy(sshd_registry, tmp_path, monkeypatch):
    home = write_home(tmp_path / "home", sshd_registry.username)
    monkeypatch.setenv("HOME", home)
    data = pickle.dumps(SSHExecutor(**alias_parameters(sshd_registry)))
    first = pickle.loads(data)
    assert first.run_command("whoami").stdout == f"{sshd_registry.username}\n"
    write_home(tmp_path / "home", "nobody-here")
    edited = pickle.loads(data)
    assert edited._connection is not first._connection
    with pytest.raises(AuthenticationFailure):
        edited.run_command("whoami")
    first.close()


def wait_until_closed(executor: SSHExecutor, poke=lambda: None) -> None:
    """Until ``executor`` has no connection (calling ``poke`` each round); fails after WAIT."""
    deadline = time.monotonic() + WAIT
    while executor.state is not None:
        assert time.monotonic() < deadline, "the idle connection was never closed"
        poke()
        time.sleep(0.05)


def test_an_idle_shared_connection_is_closed_at_a_lookup(sshd_registry, monkeypatch):
    monkeypatch.setattr(registry, "IDLE_CLOSE", 0.3)
    data = pickle.dumps(SSHExecutor(**sshd_registry.executor_parameters()))
    # Another configuration: unpickling it looks the registry up without using `copy`'s.
    other = pickle.dumps(SSHExecutor(**sshd_registry.executor_parameters(connect_retries=1)))
    copy = pickle.loads(data)
    # A command that outlives the idle time holds its connection.
    assert copy.run_command("sleep 1; echo busy").stdout == "busy\n"
    connects = copy.statistics().connects
    assert copy.state is not None
    wait_until_closed(copy, poke=lambda: pickle.loads(other))
    assert copy.run_command("echo again").stdout == "again\n"
    assert copy.statistics().connects == connects + 1
    copy.close()


TIMER_SCRIPT = """
import pickle, sys, time
from paramiko_executor import registry
registry.IDLE_CLOSE = 0.4
copy = pickle.loads(sys.stdin.buffer.read())
copy.run_command("true")
deadline = time.monotonic() + {wait}
while copy.state is not None and time.monotonic() < deadline:
    time.sleep(0.05)
closed = copy.state is None
copy.run_command("true")
print(closed, copy.statistics().reconnects)
"""


def test_an_idle_shared_connection_is_closed_by_the_timer_alone(sshd_registry):
    # A fresh process: its only lookup is the unpickling, so the timer must do it.
    data = pickle.dumps(SSHExecutor(**sshd_registry.executor_parameters()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", TIMER_SCRIPT.format(wait=WAIT)], input=data,
                          capture_output=True, cwd=root, timeout=WAIT * 3, check=True)
    assert done.stdout.split() == [b"True", b"1"], done.stderr.decode(errors="replace")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_holds_the_registry_lock(sshd_registry):
    import threading

    data = pickle.dumps(SSHExecutor(**sshd_registry.executor_parameters()))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with registry._REGISTRY.lock:
            held.set()
            release.wait(WAIT)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(WAIT)
    pid = os.fork()
    if pid == 0:  # child: the holder thread does not exist here
        status = 1
        try:
            copy = pickle.loads(data)  # a lookup: needs the registry's lock
            status = 0 if copy.run_command("echo child").stdout == "child\n" else 1
        finally:
            os._exit(status)
    release.set()
    holder.join(WAIT)
    assert reap(pid, WAIT, "the child hung on the registry's lock") == 0
