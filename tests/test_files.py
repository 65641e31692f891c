"""put and get through the executors: slots, retries, atomicity and errors, against real servers.

The SFTP engine itself is tested in test_transfer.py; here it is the
executor's contract: one connection, one slot per transfer, retries after a
lost connection, no temporary file left behind.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import pathlib
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from paramiko_executor import (
    DupingSSHExecutor,
    ExecutorFailure,
    ShellExecutor,
    SSHExecutor,
    TransferTimeout,
    executors,
    transfer,
)
from paramiko_executor.transfer import SFTPNotStarted


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def workdir(shared_dir):
    """A directory the sshd login user can write and the test can read."""
    return pathlib.Path(shared_dir)


def leftovers(directory: pathlib.Path):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(params=["ssh", "shell"])
def executor(request, sshd):
    if request.param == "shell":
        yield ShellExecutor()
        return
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        yield ex


class _FullDisk(io.RawIOBase):
    """A raw file on a disk that is full until ``full`` is cleared: writes fail as the kernel's."""

    full = True

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)


def test_get_into_a_buffered_file_object_reports_a_full_disk_itself(executor, workdir):
    """A buffered file object held the download, and ``get`` returned success: the full
    disk only showed at the caller's ``close()``, long after."""
    remote = workdir / "small"
    remote.write_bytes(b"x" * 1000)
    disk = _FullDisk()
    target = io.BufferedWriter(disk, buffer_size=1024 * 1024)
    with pytest.raises(OSError) as info:
        executor.get(str(remote), target)
    assert info.value.errno == errno.ENOSPC
    disk.full = False
    target.close()
    if isinstance(executor, SSHExecutor):
        assert executor.statistics().reconnects == 0


def test_round_trips_paths_pathlike_and_file_objects(executor, workdir, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 7)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    remote = str(workdir / "remote.bin")
    assert executor.put(source, remote) == len(data)           # os.PathLike
    assert executor.get(remote, str(tmp_path / "back.bin")) == len(data)
    assert digest((tmp_path / "back.bin").read_bytes()) == digest(data)
    assert executor.put(io.BytesIO(data[:1000]), remote) == 1000   # file object
    out = io.BytesIO()
    assert executor.get(remote, out) == 1000 and out.getvalue() == data[:1000]
    assert executor.put(io.BytesIO(b""), remote) == 0               # empty file
    assert executor.get(remote, str(tmp_path / "empty")) == 0
    assert (tmp_path / "empty").read_bytes() == b""
    assert leftovers(workdir) == [] and leftovers(tmp_path) == []


def test_mode_and_progress(executor, workdir, tmp_path):
    remote = str(workdir / "script.sh")
    calls = []
    executor.put(io.BytesIO(b"#!/bin/sh\necho hi\n"), remote, mode=0o750,
                 progress=lambda done, total: calls.append((done, total, threading.get_ident())))
    assert os.stat(remote).st_mode & 0o7777 == 0o750
    assert calls and calls[-1][0] == 18 and {c[2] for c in calls} == {threading.get_ident()}


def test_missing_and_forbidden_files_name_the_path(executor, workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        executor.get(str(workdir / "nowhere"), str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        executor.put(io.BytesIO(b"x"), str(workdir / "no-such-dir" / "f"))
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []


def test_forbidden_remote_paths_are_permission_errors(sshd, tmp_path):
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        with pytest.raises(PermissionError, match="/root"):
            ex.put(io.BytesIO(b"x"), "/root/pe-forbidden")
        with pytest.raises(PermissionError, match="shadow"):
            ex.get("/etc/shadow", str(tmp_path / "shadow"))
        assert ex.run_command("echo usable").stdout == "usable\n"


def refused_as_a_directory(error, remote, executor):
    """``error`` is the local file system's directory error for ``remote``."""
    assert isinstance(error, IsADirectoryError) and error.errno == errno.EISDIR
    assert error.filename == str(remote)
    if isinstance(executor, SSHExecutor):
        assert "(remote)" in str(error)


@pytest.mark.parametrize("link", [False, True], ids=["directory", "link-to-a-directory"])
def test_a_remote_directory_is_a_directory_error_as_on_the_local_file_system(
        executor, workdir, tmp_path, link):
    """Was, on SSH: get raised ExecutorFailure("... Failure (SFTP status 4)"), put onto an
    existing directory ExecutorFailure (its rename failed) or, where its parent takes no
    new file (put onto "/tmp"), a PermissionError about the temporary file in "/"."""
    directory = workdir / "a-directory"
    directory.mkdir()
    remote = workdir / "link" if link else directory
    if link:
        remote.symlink_to(directory)
    with pytest.raises(IsADirectoryError) as got:
        executor.get(str(remote), str(tmp_path / "copy"))
    refused_as_a_directory(got.value, remote, executor)
    assert list(tmp_path.iterdir()) == []  # the local side untouched: no temporary file
    with pytest.raises(IsADirectoryError) as put:
        executor.put(io.BytesIO(b"x"), str(remote))
    refused_as_a_directory(put.value, remote, executor)
    assert remote.is_symlink() == link and list(directory.iterdir()) == []
    assert leftovers(workdir) == []
    with pytest.raises(IsADirectoryError) as put:
        executor.put(io.BytesIO(b"x"), "/tmp")
    refused_as_a_directory(put.value, "/tmp", executor)
    if isinstance(executor, SSHExecutor):
        stats = executor.statistics()
        assert stats.reconnects == 0 and stats.commands_retried == 0


def test_a_remote_device_is_refused_not_read_for_ever(executor):
    """Was, on SSH: get("/dev/zero") read zeros until the timeout (without one: for ever,
    into a local file until the disk was full)."""
    sink = _FullDisk()
    sink.full = False
    with pytest.raises(ValueError, match="regular file"):
        executor.get("/dev/zero", sink, timeout=10)


def test_bad_arguments_fail_at_the_call(executor):
    with pytest.raises(TypeError, match="remote"):
        executor.put(io.BytesIO(b""), None)
    with pytest.raises(TypeError, match="local"):
        executor.get("/tmp/x", 42)
    with pytest.raises(ValueError, match="mode"):
        executor.put(io.BytesIO(b""), "/tmp/x", mode=0o17777)
    with pytest.raises(ValueError, match="timeout"):
        executor.get("/tmp/x", io.BytesIO(), timeout=-1)


def test_transfers_and_commands_share_the_cap_on_one_connection(make_sshd, tmp_path, workdir):
    server = make_sshd(max_sessions=10)
    data = os.urandom(1024 * 1024)
    source = tmp_path / "one-mib"
    source.write_bytes(data)
    remote_dir = workdir
    with SSHExecutor(**server.executor_parameters()) as ex:
        with ThreadPoolExecutor(100) as pool:
            puts = [pool.submit(ex.put, str(source), str(remote_dir / f"f{i}")) for i in range(50)]
            runs = [pool.submit(ex.run_command, f"echo {i}") for i in range(50)]
            assert [f.result(timeout=120) for f in puts] == [len(data)] * 50
            assert [f.result(timeout=120).stdout for f in runs] == [f"{i}\n" for i in range(50)]
        stats = ex.statistics()
    assert all(digest((remote_dir / f"f{i}").read_bytes()) == digest(data) for i in range(50))
    assert stats.connects == 1 and stats.commands_failed == 0
    assert stats.bytes_sent == 50 * len(data)
    assert server.read_log().count("Accepted publickey") == 1


def kill_connections(server):
    for pid in server.serving_pids():
        os.kill(pid, signal.SIGKILL)


def test_an_upload_broken_by_a_lost_connection_is_retried_and_leaves_nothing(
        make_sshd, workdir):
    server = make_sshd(max_sessions=10)
    data = os.urandom(64 * 1024 * 1024)
    target = workdir / "big.bin"
    temps = set()
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        killed = threading.Event()

        def progress(done, total):
            temps.update(leftovers(workdir))
            if done > len(data) // 8 and not killed.is_set():
                killed.set()
                kill_connections(server)

        assert ex.put(io.BytesIO(data), str(target), progress=progress) == len(data)
        stats = ex.statistics()
        assert killed.is_set() and stats.reconnects == 1 and stats.commands_retried == 1
    assert digest(target.read_bytes()) == digest(data)
    assert leftovers(workdir) == []
    assert len(temps) == 2  # each attempt made a temporary file of its own


def connection_killer(server):
    """A ``progress`` callback that kills ``server``'s connections once past 1 MiB,
    and the event it sets then."""
    killed = threading.Event()

    def progress(done, total):
        if done > 1024 * 1024 and not killed.is_set():
            killed.set()
            kill_connections(server)
    return progress, killed


def put_with_the_connection_killed(ex, server, remote):
    """A put to ``remote`` whose connection ``server`` kills mid-way: an `ExecutorFailure`
    once ``ex`` has no retries left."""
    ex.run_command("true")
    progress, _killed = connection_killer(server)
    with pytest.raises(ExecutorFailure):
        ex.put(io.BytesIO(os.urandom(32 * 1024 * 1024)), remote, progress=progress)


def test_no_retries_left_removes_the_temporary_file(make_sshd, workdir):
    server = make_sshd(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        put_with_the_connection_killed(ex, server, str(workdir / "f"))
        assert ex.statistics().commands_failed == 1
        # The clean-up needs a connection: the next transfer's (re)connect brings one.
        ex.put(io.BytesIO(b"ok"), str(workdir / "g"))
    assert not (workdir / "f").exists() and leftovers(workdir) == []


def test_a_timeout_is_a_transfer_timeout(make_test_server, tmp_path):
    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        server.freeze()
        try:
            with pytest.raises(TransferTimeout) as info:
                ex.get(str(tmp_path / "x"), io.BytesIO(), timeout=1)
            assert isinstance(info.value, TimeoutError) and isinstance(info.value, ExecutorFailure)
        finally:
            server.thaw()


def test_a_command_restricted_key_cannot_open_sftp(sshd, tmp_path):
    params = sshd.executor_parameters(client_keys=[sshd.forced_key_path])
    with DupingSSHExecutor(**params) as ex:
        with pytest.raises(ExecutorFailure, match="SFTP") as info:
            ex.put(io.BytesIO(b"x"), str(tmp_path / "x"), timeout=60)
        assert "command" in str(info.value)
        assert ex.run_command("echo still").stdout == "still\n"


@pytest.fixture
def sftp_starts(monkeypatch):
    """A list that gets an item each time an SFTP session is started (clean-ups too)."""
    starts = []
    start = transfer._Session.start

    def counted(session):
        starts.append(session)
        return start(session)
    monkeypatch.setattr(transfer._Session, "start", counted)
    return starts


@pytest.mark.parametrize("calls", [
    [("put", None), ("put", None), ("get", None)],
    [("put", 30), ("put", 30), ("get", 30)],
], ids=["no timeout", "timeout=30"])
def test_transfers_on_a_command_restricted_key_each_start_sftp_once(
        sshd, workdir, monkeypatch, sftp_starts, calls):
    # A failed put's temporary names were kept for removal before SFTP had even
    # started, and every later transfer tried them again, a new session (and a wait
    # for a version that never comes) per name: 3 sessions for the first put, 7 for
    # the second, 5 for the get after them (30, 70, 50 s; with timeout=30 the get was
    # a TransferTimeout).
    monkeypatch.setattr(transfer, "NEGOTIATION_TIMEOUT", 3.0)
    params = sshd.executor_parameters(client_keys=[sshd.forced_key_path])
    with DupingSSHExecutor(**params) as ex:
        ex.run_command("true")
        for kind, timeout in calls:
            before = len(sftp_starts)
            started = time.monotonic()
            with pytest.raises(SFTPNotStarted, match="did not start SFTP"):
                if kind == "put":
                    ex.put(io.BytesIO(b"x"), str(workdir / "never"), timeout=timeout)
                else:
                    ex.get(str(workdir / "never"), io.BytesIO(), timeout=timeout)
            took = time.monotonic() - started
            assert len(sftp_starts) - before == 1, f"{kind}: {len(sftp_starts) - before} sessions"
            assert took < 2 * transfer.NEGOTIATION_TIMEOUT, f"{kind} took {took:.1f} s"
    assert leftovers(workdir) == []


def test_a_leftover_where_sftp_does_not_start_is_given_up_at_once(
        sshd, monkeypatch, sftp_starts, caplog):
    # Kept for the next transfer, it cost each of them a session and a wait, for good.
    monkeypatch.setattr(transfer, "NEGOTIATION_TIMEOUT", 1.0)
    params = sshd.executor_parameters(client_keys=[sshd.forced_key_path])
    with DupingSSHExecutor(**params) as ex, \
            caplog.at_level(logging.DEBUG, logger="paramiko_executor.executors"):
        ex.run_command("true")
        ex._remove_leftover(["/tmp/.never.0000000000000000.tmp"], None)
        assert len(sftp_starts) == 1
        assert "did not start SFTP" in caplog.text
        with pytest.raises(SFTPNotStarted):
            ex.get("/etc/hostname", io.BytesIO())
        assert len(sftp_starts) == 2


def test_a_leftover_the_server_will_not_remove_is_tried_a_bounded_number_of_times(
        make_sshd, workdir, sftp_starts, caplog):
    # An upload broken with its connection leaves its temporary file; the next
    # transfers remove it. One the server refuses to remove was kept and tried
    # again by every later transfer, for good.
    server = make_sshd(max_sessions=10)
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o777)
    source = workdir / "source"
    source.write_bytes(b"data")
    source.chmod(0o644)
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        put_with_the_connection_killed(ex, server, str(locked / "f"))
        assert leftovers(locked), "the broken upload left no temporary file"
        locked.chmod(0o755)  # root's: the login may no longer remove what is in it
        sessions = []
        with caplog.at_level(logging.DEBUG, logger="paramiko_executor.executors"):
            for _ in range(executors.LEFTOVER_TRIES + 2):
                before = len(sftp_starts)
                assert ex.get(str(source), io.BytesIO(), timeout=60) == 4
                sessions.append(len(sftp_starts) - before)
    assert sessions == [2] * executors.LEFTOVER_TRIES + [1, 1]
    assert "gave up the temporary files of failed uploads" in caplog.text
    assert leftovers(locked)


def test_atomic_put_seen_from_a_concurrent_reader(sshd, workdir):
    remote = workdir / "atomic.bin"
    data = os.urandom(32 * 1024 * 1024)
    sizes = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                sizes.add(remote.stat().st_size)
            except FileNotFoundError:
                sizes.add(None)

    watcher = threading.Thread(target=watch)
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        watcher.start()
        try:
            ex.put(io.BytesIO(data), str(remote))
        finally:
            stop.set()
            watcher.join(10)
    assert sizes <= {None, len(data)} and len(data) in sizes | {remote.stat().st_size}


def test_command_line_put_and_get(sshd, workdir, tmp_path, capfd):
    from paramiko_executor.cli import main

    params = sshd.executor_parameters()
    options = ["--host", "127.0.0.1", "--port", str(params["port"]), "--user",
               params["username"], "--key", params["client_keys"][0], "--known-hosts",
               str(params["known_hosts"]), "-F", "none"]
    data = os.urandom(5 * 1024 * 1024)
    (tmp_path / "up").write_bytes(data)
    remote = str(workdir / "cli.bin")
    assert main(["put", *options, "--mode", "640", str(tmp_path / "up"), remote]) == 0
    err = capfd.readouterr().err
    assert "progress:" in err and f"put {len(data)} bytes" in err  # plain lines: no terminal
    assert os.stat(remote).st_mode & 0o777 == 0o640
    assert main(["get", *options, remote, str(tmp_path / "down")]) == 0
    assert digest((tmp_path / "down").read_bytes()) == digest(data)
    assert main(["get", *options, str(workdir / "missing"), str(tmp_path / "x")]) == 255
    assert "missing" in capfd.readouterr().err


# --- the caller's errors are the caller's (issue: errors by their origin) ------------------


class Refusing(io.RawIOBase):
    """A binary file object whose every read and write raises ``error``."""

    def __init__(self, error: OSError) -> None:
        super().__init__()
        self.error = error
        self.calls = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer):
        self.calls += 1
        raise self.error

    def write(self, data):
        self.calls += 1
        raise self.error


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB file system, to be filled."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                             capture_output=True, timeout=30)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=True, timeout=30)


def raising(error):
    calls = []

    def progress(done, total):
        calls.append(done)
        raise error

    return progress, calls


def case_put_from_a_directory(ex, workdir, tmp_path, tmpfs):
    return lambda: ex.put(str(tmp_path), str(workdir / "f")), IsADirectoryError, None


def case_get_onto_a_directory(ex, workdir, tmp_path, tmpfs):
    return lambda: ex.get(str(workdir / "file"), str(tmp_path)), IsADirectoryError, None


def case_progress_raising_broken_pipe_on_put(ex, workdir, tmp_path, tmpfs):
    error = BrokenPipeError(32, "Broken pipe")
    progress, calls = raising(error)
    return (lambda: ex.put(io.BytesIO(b"x" * 100000), str(workdir / "f"), progress=progress),
            error, calls)


def case_progress_raising_broken_pipe_on_get(ex, workdir, tmp_path, tmpfs):
    error = BrokenPipeError(32, "Broken pipe")
    progress, calls = raising(error)
    return (lambda: ex.get(str(workdir / "file"), io.BytesIO(), progress=progress),
            error, calls)


def case_file_object_raising_on_read(ex, workdir, tmp_path, tmpfs):
    source = Refusing(OSError(5, "Input/output error"))
    return lambda: ex.put(source, str(workdir / "f")), source.error, source


def case_file_object_raising_on_write(ex, workdir, tmp_path, tmpfs):
    target = Refusing(OSError(5, "Input/output error"))
    return lambda: ex.get(str(workdir / "file"), target), target.error, target


def case_a_full_local_disk(ex, workdir, tmp_path, tmpfs):
    return lambda: ex.get(str(workdir / "file"), str(tmpfs / "copy")), OSError, None


CALLER_CASES = [case_put_from_a_directory, case_get_onto_a_directory,
                case_progress_raising_broken_pipe_on_put, case_progress_raising_broken_pipe_on_get,
                case_file_object_raising_on_read, case_file_object_raising_on_write,
                case_a_full_local_disk]


@pytest.mark.parametrize("case", CALLER_CASES, ids=lambda case: case.__name__[5:])
def test_the_callers_errors_reach_it_at_once_and_touch_nothing_else(
        sshd, workdir, tmp_path, request, case):
    tmpfs = request.getfixturevalue("tmpfs") if case is case_a_full_local_disk else None
    (workdir / "file").write_bytes(os.urandom(2 * 1024 * 1024))
    counter = workdir / "runs"
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        call, expected, calls = case(ex, workdir, tmp_path, tmpfs)
        with ThreadPoolExecutor(1) as pool:
            # A command of another thread, running while the transfer fails.
            other = pool.submit(ex.run_command, f"echo run >> {counter}; sleep 2")
            for _ in range(200):
                if counter.exists() or other.done():
                    break
                threading.Event().wait(0.05)
            assert counter.exists(), "the other thread's command never started"
            with pytest.raises(BaseException) as caught:
                call()
            assert other.result(timeout=60).exit_code == 0
        stats = ex.statistics()
        assert ex.run_command("echo still").stdout == "still\n"
    if isinstance(expected, BaseException):
        assert caught.value is expected  # the very object the caller's code raised
    else:
        assert type(caught.value) is expected or isinstance(caught.value, expected)
    if calls is not None:  # the caller's code ran once: no second attempt
        assert (len(calls) if isinstance(calls, list) else calls.calls) == 1
    if case is case_a_full_local_disk:
        assert caught.value.errno == errno.ENOSPC and os.listdir(tmpfs) == []
    assert counter.read_text() == "run\n"  # the other command ran exactly once
    assert stats.reconnects == 0 and stats.commands_retried == 0
    assert leftovers(workdir) == [] and leftovers(tmp_path) == []


def test_shell_executor_gives_the_callers_errors_back_as_raised(workdir, tmp_path):
    ex = ShellExecutor()
    with pytest.raises(IsADirectoryError):
        ex.put(str(tmp_path), str(workdir / "f"))
    error = BrokenPipeError(32, "Broken pipe")
    progress, calls = raising(error)
    with pytest.raises(BrokenPipeError) as caught:
        ex.put(io.BytesIO(b"x"), str(workdir / "f"), progress=progress)
    assert caught.value is error and calls == [1]
    assert leftovers(workdir) == []


# --- file objects that cannot seek -------------------------------------------------------


def test_pipes_as_source_and_target(executor, workdir):
    data = os.urandom(3 * 1024 * 1024 + 5)
    remote = str(workdir / "from-pipe")
    totals = set()
    read_end, write_end = os.pipe()
    # The pipe's read end closes first: a feeder left writing then ends.
    with ThreadPoolExecutor(1) as pool, os.fdopen(read_end, "rb") as source:
        def feed():
            with os.fdopen(write_end, "wb") as sink:
                sink.write(data)

        fed = pool.submit(feed)
        assert executor.put(source, remote,
                            progress=lambda done, total: totals.add(total)) == len(data)
        fed.result(timeout=60)
    assert totals == {-1} and digest((workdir / "from-pipe").read_bytes()) == digest(data)
    read_end, write_end = os.pipe()
    with ThreadPoolExecutor(1) as pool, os.fdopen(read_end, "rb") as drain:
        drained = pool.submit(drain.read)
        with os.fdopen(write_end, "wb") as target:
            assert executor.get(remote, target) == len(data)
        assert digest(drained.result(timeout=60)) == digest(data)


def test_a_pipe_cannot_be_read_again_after_a_lost_connection(make_sshd, workdir):
    server = make_sshd(max_sessions=10)
    read_end, write_end = os.pipe()
    with SSHExecutor(**server.executor_parameters()) as ex, ThreadPoolExecutor(1) as pool:
        ex.run_command("true")
        progress, killed = connection_killer(server)

        def feed():
            try:
                with os.fdopen(write_end, "wb") as sink:
                    for _ in range(64):
                        sink.write(os.urandom(1024 * 1024))
            except BrokenPipeError:
                pass  # the reader is gone: the transfer ended

        fed = pool.submit(feed)
        with os.fdopen(read_end, "rb") as source:
            with pytest.raises(ExecutorFailure, match="cannot be tried again"):
                ex.put(source, str(workdir / "f"), progress=progress)
        fed.result(timeout=60)
        assert killed.is_set() and ex.statistics().reconnects == 1
    assert not (workdir / "f").exists() and leftovers(workdir) == []


def test_a_fifo_path_is_refused_not_waited_on(executor, workdir, tmp_path):
    """A FIFO with no writer would block the open for ever, holding the transfer's slot."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="regular file"):
        executor.put(fifo, str(workdir / "from-fifo"), timeout=5)
    assert not (workdir / "from-fifo").exists()
    assert executor.run_command("echo still here").stdout == "still here\n"
