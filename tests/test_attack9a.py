"""Attack 9a: files and local trust, against a real sshd (regression tests).

Each test failed on main before its fix (or is a strict xfail naming what is left).
Only 127.0.0.1 is contacted; every file is written by the test.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
from pathlib import Path
from typing import Any, Dict

import pytest
from test_trust import block, host_line, name_of, write

from paramiko_executor import HostKeyFailure, SSHExecutor, hostkeys


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


# -- accept-new waits for another process's lock on known_hosts without bound -------------------


def test_accept_new_gives_up_on_a_known_hosts_file_locked_by_another_process(
        sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stopped process (another executor's accept-new, SIGSTOPped) holding the flock
    # used to hang the connect past its timeout, and every os.fork() of this process with it.
    monkeypatch.setattr(hostkeys, "APPEND_LOCK_TIMEOUT", 0.5, raising=False)
    known = tmp_path / "kh"
    known.write_text("")
    config = write(tmp_path / "config",
                   block("target", sshd, "    StrictHostKeyChecking accept-new\n", known=known))
    outcome: Dict[str, BaseException] = {}

    def connect() -> None:
        try:
            with SSHExecutor(host="target", config=config, connect_retries=0, timeout=3) as ex:
                ex.run_command("true")
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome["error"] = exc

    holder = os.open(known, os.O_RDWR)  # its own open file description: its own flock
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(30)
        hung = thread.is_alive()
    finally:
        os.close(holder)  # lets a hung connect finish
    thread.join(30)
    assert not hung, "the connect waited for the known_hosts lock without bound"
    assert isinstance(outcome.get("error"), HostKeyFailure)
    assert "cannot be recorded" in str(outcome["error"])
    assert known.read_text() == ""


# -- known_hosts lines: split where OpenSSH splits them, nowhere else ----------------------------


@pytest.mark.parametrize("breaker", ["\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028"])
def test_a_line_break_python_knows_does_not_make_a_comment_a_trusted_line(
        sshd: Any, tmp_path: Path, breaker: str) -> None:
    # The comment of another host's line smuggles in a line trusting the server's key;
    # OpenSSH reads one line (ssh-keygen -F does not find the host): so must the library.
    smuggled = host_line(name_of(sshd), sshd.host_public_key)
    known = tmp_path / "kh"
    known.write_bytes((host_line("other.example", sshd.host_public_key).rstrip("\n")
                       + f" a comment{breaker}{smuggled}").encode())
    reference = subprocess.run(["ssh-keygen", "-F", name_of(sshd), "-f", str(known)],
                               capture_output=True, check=False)
    assert reference.returncode == 1 and not reference.stdout  # OpenSSH: not a known host
    config = write(tmp_path / "config", block("target", sshd, known=known))
    with pytest.raises(HostKeyFailure, match="unknown"):
        with SSHExecutor(host="target", config=config, connect_retries=0) as ex:
            ex.run_command("true")


# -- the local user is the password database's, never $USER or $LOGNAME ------------------------


def test_match_localuser_and_the_default_user_ignore_user_environment_variables(
        sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ssh takes the local user from getpwuid(getuid()); a process whose environment names
    # someone else (sudo -E, a service's unit file) took that user's Match blocks.
    known = write(tmp_path / "kh", host_line(name_of(sshd), sshd.host_public_key))
    config = write(tmp_path / "config",
                   "Match localuser pe-impostor\n    Port 1\n    User pe-impostor\n"
                   + block("target", sshd, known=known))
    monkeypatch.setenv("USER", "pe-impostor")
    monkeypatch.setenv("LOGNAME", "pe-impostor")
    reference = subprocess.run(["ssh", "-G", "-F", config, "target"], capture_output=True,
                               text=True, check=True).stdout.splitlines()
    assert f"port {sshd.port}" in reference and f"user {sshd.username}" in reference
    with SSHExecutor(host="target", config=config, connect_retries=0) as ex:
        assert ex.run_command("echo ok").stdout == "ok\n"
