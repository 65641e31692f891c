"""Attack 9a: files and local trust, against a real sshd (regression tests).

Each test failed on main before its fix (or is a strict xfail naming what is left).
Only 127.0.0.1 is contacted; every file is written by the test.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pwd
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, cast

import pytest
from helpers import source_file
from test_ledger_trust import LOGGER, NOW, SECRET, STEP, private_dir, record
from test_totp_ledger import FakeClock, fake_ledger
from test_trust import block, host_line, name_of, write

from paramiko_executor import ExecutorFailure, HostKeyFailure, ShellExecutor, SSHExecutor, hostkeys
from paramiko_executor.cli import main as cli_main


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


# -- a download into a shared sticky directory: nobody else's file lends its mode ---------------


def plant(target: Path, planted: str) -> None:
    """Another user's world-writable file at ``target``, or their link to one."""
    other = 4242  # a uid that is neither root nor the sshd login user
    if planted == "file":
        target.touch()
        target.chmod(0o666)
        os.chown(target, other, other)
    else:
        wide = target.with_name(target.name + "-wide")
        wide.touch()
        wide.chmod(0o777)
        os.chown(wide, other, other)
        target.symlink_to(wide)
        os.lchown(target, other, other)


@pytest.mark.parametrize("planted", ["file", "symlink"])
@pytest.mark.parametrize("kind", ["ssh", "shell"])
def test_a_file_planted_by_another_user_does_not_widen_a_download(
        sshd: Any, shared_dir: str, planted: str, kind: str) -> None:
    # root downloads into /tmp-like shared space; another user planted the name first, as a
    # world-writable file of theirs or a link to one. "A replaced file keeps its own mode"
    # made root's new file writable by them (who could then change a script root runs).
    os.chmod(shared_dir, 0o1777)
    source = Path(shared_dir, "source")
    source.write_bytes(b"#!/bin/sh\necho hello\n")
    os.chown(source, pwd.getpwnam(sshd.username).pw_uid, 0)
    source.chmod(0o750)
    target = Path(shared_dir, "download")
    plant(target, planted)
    previous = os.umask(0o022)
    try:
        if kind == "ssh":
            with SSHExecutor(**sshd.executor_parameters()) as ex:
                ex.get(str(source), str(target))
        else:
            ShellExecutor().get(str(source), str(target))
    finally:
        os.umask(previous)
    status = target.lstat()
    assert stat.S_ISREG(status.st_mode) and status.st_uid == os.geteuid()
    # No bit beyond the remote file's less the umask (nor beyond the planted file's).
    assert stat.S_IMODE(status.st_mode) == (0o640 if planted == "file" else 0o750)
    assert target.read_bytes() == source.read_bytes()


# -- ssh_config keywords end at spaces, tabs and "=", not at any Unicode white space ------------


def test_a_keyword_glued_to_a_unicode_space_is_no_proxy_command(
        sshd: Any, tmp_path: Path) -> None:
    # ssh reads "ProxyCommand\x1c;touch ..." as one unknown keyword and refuses the file;
    # the library read it as a ProxyCommand and ran it.
    marker = tmp_path / "ran"
    known = write(tmp_path / "kh", host_line(name_of(sshd), sshd.host_public_key))
    config = write(tmp_path / "config", block("target", sshd, known=known)
                   + f"    ProxyCommand\x1c;touch {marker}\n")
    reference = subprocess.run(["ssh", "-G", "-F", config, "target"], capture_output=True,
                               text=True, check=False)
    assert reference.returncode != 0 and "Bad configuration option" in reference.stderr
    with SSHExecutor(host="target", config=config, connect_retries=0) as ex:
        assert ex.run_command("echo ok").stdout == "ok\n"
    assert not marker.exists()


# -- a file object's made-up counts: refused, never SFTP framing nor an endless copy -----------


class _Miscounting(io.RawIOBase):
    """Reads ``size`` bytes of b"A" but answers ``readinto`` with ``lie(actual count)``."""

    def __init__(self, size: int, lie: Callable[[int], int]) -> None:
        self.left = size
        self.lie = lie

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = b"A" * count
        self.left -= count
        return self.lie(count) if count else 0


@pytest.mark.parametrize("lie", [lambda n: n + 7, lambda n: -1], ids=["too-many", "negative"])
@pytest.mark.parametrize("kind", ["ssh", "shell"])
def test_a_file_object_that_miscounts_is_an_error(
        sshd: Any, shared_dir: str, kind: str, lie: Callable[[int], int]) -> None:
    # io's buffered files refuse such counts (OSError); the upload framed its SFTP WRITE
    # by a count past the buffer (the next request's bytes became file data) or, with -1,
    # copied for ever, holding its session.
    directory = Path(shared_dir, "remote")
    directory.mkdir()
    os.chown(directory, pwd.getpwnam(sshd.username).pw_uid, 0)
    target = str(directory / "file")
    outcome: Dict[str, Any] = {}

    def put() -> None:
        try:
            if kind == "ssh":
                with SSHExecutor(**sshd.executor_parameters()) as ex:
                    outcome["result"] = ex.put(cast(BinaryIO, _Miscounting(3 * 1024 * 1024, lie)),
                                               target)
                    outcome["after"] = ex.run_command("echo ok").stdout
            else:
                outcome["result"] = ShellExecutor().put(
                    cast(BinaryIO, _Miscounting(3 * 1024 * 1024, lie)), target)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=put, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the copy never ended"
    assert isinstance(outcome.get("error"), OSError), outcome
    assert "returned" in str(outcome["error"])
    assert os.listdir(directory) == []  # no file, no temporary file left


class _MiscountingSink(io.RawIOBase):
    """Takes every byte it is given, but answers ``write`` with ``lie(len(data))``."""

    def __init__(self, lie: Callable[[int], int]) -> None:
        self.lie = lie
        self.calls = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.calls += 1
        if self.calls > 100_000:  # bounds the old endless loop, for the test's sake
            raise RuntimeError("written for ever")
        return self.lie(len(data))


@pytest.mark.parametrize("lie", [lambda n: n + 7, lambda n: -1], ids=["too-many", "negative"])
@pytest.mark.parametrize("kind", ["ssh", "shell"])
def test_a_sink_that_miscounts_is_an_error(
        sshd: Any, shared_dir: str, kind: str, lie: Callable[[int], int]) -> None:
    source = source_file(shared_dir, 1024 * 1024)
    sink = _MiscountingSink(lie)
    with pytest.raises(OSError, match="returned"):
        if kind == "ssh":
            with SSHExecutor(**sshd.executor_parameters()) as ex:
                ex.get(str(source), cast(BinaryIO, sink))
        else:
            ShellExecutor().get(str(source), cast(BinaryIO, sink))


@pytest.mark.parametrize("planted", ["file", "symlink"])
def test_a_remote_file_planted_by_another_user_does_not_widen_an_upload(
        make_sshd: Callable[..., Any], shared_dir: str, tmp_path: Path, planted: str) -> None:
    # The same on the server: a root login uploads into a shared sticky directory.
    server = make_sshd(user="root")
    os.chmod(shared_dir, 0o1777)
    source = tmp_path / "source"
    source.write_bytes(b"#!/bin/sh\necho hello\n")
    source.chmod(0o750)
    target = Path(shared_dir, "upload")
    plant(target, planted)
    mine = Path(shared_dir, "mine")  # root's own file keeps its bits, as before
    mine.touch()
    mine.chmod(0o604)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.put(str(source), str(target))
        ex.put(str(source), str(mine))
    status = target.lstat()
    assert stat.S_ISREG(status.st_mode) and status.st_uid == 0
    assert stat.S_IMODE(status.st_mode) == (0o640 if planted == "file" else 0o750)
    assert target.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(mine.stat().st_mode) == 0o604


# -- an upload's new file: the server's umask, as sftp leaves it --------------------------------


def test_a_new_upload_gets_the_servers_umask_as_with_sftp(
        make_sshd: Callable[..., Any], shared_dir: str, tmp_path: Path) -> None:
    # put gave a new remote file the local file's exact bits (FSETSTAT after the upload);
    # sftp creates it with them, so the server's umask applies: a group- or world-writable
    # local file stayed so on the server.
    previous = os.umask(0o022)
    try:
        server = make_sshd()  # its sftp-server runs under umask 022
    finally:
        os.umask(previous)
    entry = pwd.getpwnam(server.username)
    os.chown(shared_dir, entry.pw_uid, entry.pw_gid)
    source = tmp_path / "source"
    source.write_bytes(b"data\n")
    source.chmod(0o666)
    subprocess.run(
        ["sftp", "-F", "/dev/null", "-i", server.client_key_path,
         "-o", f"UserKnownHostsFile={server.known_hosts_path}", "-o", "BatchMode=yes",
         "-P", str(server.port), "-b", "-", f"{server.username}@{server.host}"],
        input=f"put {source} {shared_dir}/by-sftp\n".encode(), check=True, timeout=60,
        stdout=subprocess.DEVNULL)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.put(str(source), f"{shared_dir}/by-us")
    by_sftp = stat.S_IMODE(os.stat(f"{shared_dir}/by-sftp").st_mode)
    assert by_sftp == 0o644
    assert stat.S_IMODE(os.stat(f"{shared_dir}/by-us").st_mode) == by_sftp


# -- a download never renames a regular file over a device, FIFO or socket ----------------------


@pytest.mark.parametrize("node", ["char-device", "fifo", "link-to-device"])
@pytest.mark.parametrize("kind", ["ssh", "shell"])
def test_a_download_to_a_device_or_fifo_path_is_refused_not_replaced(
        sshd: Any, shared_dir: str, kind: str, node: str) -> None:
    # get(remote, "/dev/null") as root renamed a regular file over /dev/null: the machine's
    # /dev/null became a 0644 file. A twin of /dev/null (char 1,3) stands in for it here.
    source = Path(shared_dir, "source")
    source.write_bytes(b"data\n")
    source.chmod(0o644)
    target = Path(shared_dir, "node")
    device = Path(shared_dir, "device")
    if node == "fifo":
        os.mkfifo(target)
    else:
        os.mknod(device if node == "link-to-device" else target,
                 stat.S_IFCHR | 0o666, os.makedev(1, 3))
        if node == "link-to-device":
            target.symlink_to(device)
    with pytest.raises(ValueError, match="not a regular file"):
        if kind == "ssh":
            with SSHExecutor(**sshd.executor_parameters()) as ex:
                ex.get(str(source), str(target))
        else:
            ShellExecutor().get(str(source), str(target))
    mode = target.stat().st_mode
    assert stat.S_ISFIFO(mode) if node == "fifo" else stat.S_ISCHR(mode)
    assert sorted(os.listdir(shared_dir)) == sorted(
        ["source", "node"] + (["device"] if node == "link-to-device" else []))


def test_the_command_line_get_to_a_device_is_an_error_message(
        sshd: Any, shared_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    source = Path(shared_dir, "source")
    source.write_bytes(b"data\n")
    source.chmod(0o644)
    node = Path(shared_dir, "null")
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    parameters = sshd.executor_parameters()
    code = cli_main(["get", "--host", "127.0.0.1", "--port", str(parameters["port"]),
                     "--user", parameters["username"], "--key", parameters["client_keys"][0],
                     "--known-hosts", parameters["known_hosts"], str(source), str(node)])
    assert code == 255 and "not a regular file" in capsys.readouterr().err
    assert stat.S_ISCHR(node.stat().st_mode)


# -- accept-new makes the known_hosts file's missing parents owner-only, whatever the umask ------


def test_accept_new_makes_missing_parents_owner_only_under_umask_0(
        sshd: Any, tmp_path: Path) -> None:
    # os.makedirs gave the parents 0777 less the umask: under umask 0 anyone could swap
    # "b" for a directory of theirs, holding a known_hosts that trusts their server.
    known = tmp_path / "a" / "b" / "known_hosts"
    config = write(tmp_path / "config",
                   block("target", sshd, "    StrictHostKeyChecking accept-new\n", known=known))
    previous = os.umask(0)
    try:
        with SSHExecutor(host="target", config=config, connect_retries=0) as ex:
            assert ex.run_command("echo ok").stdout == "ok\n"
    finally:
        os.umask(previous)
    assert name_of(sshd) in known.read_text()
    for directory in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


# -- a progress callback that runs a command on its own executor ---------------------------------


def test_a_command_from_progress_with_every_slot_held_is_an_error_not_a_hang(
        make_sshd: Callable[..., Any], shared_dir: str) -> None:
    # It waited for a slot its own thread held (MaxSessions 1) until close().
    server = make_sshd(max_sessions=1)
    source = source_file(shared_dir, 1024 * 1024)
    outcome: Dict[str, Any] = {}
    with SSHExecutor(**server.executor_parameters()) as ex:

        def progress(done: int, total: int) -> None:
            if "inner" not in outcome:
                outcome["inner"] = None
                try:
                    outcome["inner"] = ex.run_command("echo inner").stdout
                except BaseException as exc:  # noqa: BLE001 - handed to the test
                    outcome["inner"] = exc

        def get() -> None:
            try:
                outcome["get"] = ex.get(str(source), str(Path(shared_dir, "copy")),
                                        progress=progress)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                outcome["get"] = exc

        thread = threading.Thread(target=get, daemon=True)
        thread.start()
        thread.join(15)
        hung = thread.is_alive()
        ex.close()  # ends the wait either way
        thread.join(15)
    assert not hung, "the command waited for its own thread's slot"
    assert isinstance(outcome["inner"], ExecutorFailure), outcome["inner"]
    assert "another executor" in str(outcome["inner"])
    assert outcome["get"] == 1024 * 1024  # the transfer itself carried on


# -- a file whose name is long but valid can be transferred --------------------------------------


@pytest.mark.parametrize("kind", ["ssh", "shell"])
def test_a_long_file_name_is_no_reason_to_fail(sshd: Any, shared_dir: str, kind: str) -> None:
    # The temporary name ".<name>.<16 hex>.tmp" is 22 bytes longer than the final one: a
    # final name of 234 to 255 bytes made every put and get fail with "File name too long".
    directory = Path(shared_dir, "remote")
    directory.mkdir()
    os.chown(directory, pwd.getpwnam(sshd.username).pw_uid, 0)
    source = Path(shared_dir, "source")
    source.write_bytes(b"data\n")
    source.chmod(0o644)
    name = "\u00e9" * 100 + "x" * 50  # 250 bytes in UTF-8
    uploaded, downloaded = directory / name, Path(shared_dir, name)
    if kind == "ssh":
        with SSHExecutor(**sshd.executor_parameters()) as ex:
            assert ex.put(str(source), str(uploaded)) == 5
            assert ex.get(str(uploaded), str(downloaded)) == 5
    else:
        assert ShellExecutor().put(str(source), str(uploaded)) == 5
        assert ShellExecutor().get(str(uploaded), str(downloaded)) == 5
    assert downloaded.read_bytes() == b"data\n"
    assert sorted(os.listdir(directory)) == [name]


# -- the TOTP ledger's lock is never held while a log handler runs --------------------------------


def test_the_ledger_lock_is_free_while_its_warning_is_logged(tmp_path: Path) -> None:
    # The "step ahead of the clock" warning was logged with the ledger's flock (and the
    # process's ledger lock) held: a handler that blocks (a full stderr pipe, a network
    # handler) held up every login of every process of the user.
    path = private_dir(tmp_path) / "totp-ledger"
    fake_ledger(path, FakeClock(NOW - 3600)).issue(SECRET)  # makes the key
    record(path, STEP + 100)
    seen: List[str] = []

    class Probe(logging.Handler):
        def emit(self, entry: logging.LogRecord) -> None:
            if "ahead of the clock" not in entry.getMessage():
                return
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")
            finally:
                os.close(fd)

    probe = Probe()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(probe)
    try:
        fake_ledger(path, FakeClock()).issue(SECRET)
    finally:
        logger.removeHandler(probe)
    assert seen == ["free"]
