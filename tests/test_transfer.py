"""paramiko_executor.transfer against a real private sshd (internal-sftp), and its local twins.

Each test logs in with its own paramiko Transport, set up like the
executor's (window, max packet), and hands `upload`/`download` a fresh
session channel, as the executor will.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pwd
import signal
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Set, Tuple

import paramiko
import pytest
from helpers import wait_for

from paramiko_executor import transfer
from paramiko_executor.connection import MAX_PACKET_SIZE, WINDOW_SIZE
from paramiko_executor.errors import CallerError, ExecutorFailure
from testsupport.openssh import OpenSSHServer

MiB = 1024 * 1024


def connect(host: str, port: int, username: str, key_path: str) -> paramiko.Transport:
    """A logged-in Transport with the executor's window (the executor's own path: test_files)."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    transport.default_window_size = WINDOW_SIZE
    transport.default_max_packet_size = MAX_PACKET_SIZE
    transport.start_client(timeout=10)
    transport.auth_publickey(username, paramiko.PKey.from_path(key_path))
    return transport


@pytest.fixture
def transport(sshd: OpenSSHServer) -> Iterator[paramiko.Transport]:
    t = connect(sshd.host, sshd.port, sshd.username, sshd.client_key_path)
    yield t
    t.close()


@pytest.fixture
def remote_dir(sshd: OpenSSHServer, shared_dir: str) -> str:
    """A directory owned by the sshd login user (so modes apply to it as to anyone's)."""
    path = os.path.join(shared_dir, "remote")
    os.mkdir(path)
    entry = pwd.getpwnam(sshd.username)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def random_file(path: str, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as file:
        file.write(data)
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def temp_files(directory: str) -> List[str]:
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


@contextmanager
def carried(kind: type) -> Iterator[Any]:
    """Expect a `CallerError` carrying a ``kind``: the engine's way to say "the caller's own"."""
    with pytest.raises(CallerError) as caught:
        yield caught
    assert isinstance(caught.value.original, kind), caught.value.original


class Progress:
    """A progress callback recording its calls and the thread they came from."""

    def __init__(self) -> None:
        self.calls: List[Tuple[int, int]] = []
        self.threads: Set[threading.Thread] = set()

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        self.threads.add(threading.current_thread())

    def check(self, size: int, total: int) -> None:
        assert self.calls, "progress was never called"
        assert self.calls[-1] == (size, total)
        dones = [done for done, _ in self.calls]
        assert dones == sorted(dones)
        assert {t for _, t in self.calls} == {total}
        assert self.threads == {threading.current_thread()}


# --- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("kind", [str, pathlib.Path])
def test_round_trip_through_paths(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str, kind: Callable[[str], Any]
) -> None:
    data = random_file(os.path.join(shared_dir, "source"), 3 * MiB + 17)
    remote = os.path.join(remote_dir, "file")
    up, down = Progress(), Progress()

    chan = transport.open_session()
    sent = transfer.upload(chan, kind(os.path.join(shared_dir, "source")), remote, progress=up)
    assert chan.closed
    assert sent == len(data) and read(remote) == data
    up.check(len(data), len(data))

    chan = transport.open_session()
    target = os.path.join(shared_dir, "copy")
    received = transfer.download(chan, remote, kind(target), progress=down)
    assert chan.closed
    assert received == len(data) and read(target) == data
    down.check(len(data), len(data))
    assert len(down.calls) > 1, "the file came in one piece: nothing was pipelined"
    assert temp_files(remote_dir) == [] and temp_files(shared_dir) == []


def test_round_trip_through_file_objects(
    transport: paramiko.Transport, remote_dir: str
) -> None:
    data = os.urandom(MiB + 5)
    source = io.BytesIO(b"skipped" + data)
    source.seek(len(b"skipped"))  # read from the current position on
    remote = os.path.join(remote_dir, "file")
    progress = Progress()
    assert transfer.upload(transport.open_session(), source, remote, progress=progress) == len(data)
    progress.check(len(data), len(data))
    assert read(remote) == data

    target = io.BytesIO()
    target.write(b"kept")
    assert transfer.download(transport.open_session(), remote, target) == len(data)
    assert target.getvalue() == b"kept" + data


def test_upload_from_a_stream_of_unknown_size(
    transport: paramiko.Transport, remote_dir: str
) -> None:
    data = os.urandom(600 * 1024 + 3)

    class Stream:  # only read(): no readinto, seek or fileno
        def __init__(self) -> None:
            self._data = io.BytesIO(data)

        def read(self, size: int) -> bytes:
            return self._data.read(min(size, 4096))  # short reads, as a pipe gives

    progress = Progress()
    remote = os.path.join(remote_dir, "file")
    # Stream is a bare file object (read only), which Source's IO types do not cover.
    assert transfer.upload(transport.open_session(), Stream(), remote, progress=progress) == len(  # type: ignore[arg-type]
        data
    )
    assert read(remote) == data
    progress.check(len(data), -1)


def test_empty_file(transport: paramiko.Transport, remote_dir: str, shared_dir: str) -> None:
    source = os.path.join(shared_dir, "empty")
    open(source, "wb").close()
    remote = os.path.join(remote_dir, "empty")
    up, down = Progress(), Progress()
    assert transfer.upload(transport.open_session(), source, remote, progress=up) == 0
    assert os.path.getsize(remote) == 0
    up.check(0, 0)
    target = os.path.join(shared_dir, "empty-copy")
    assert transfer.download(transport.open_session(), remote, target, progress=down) == 0
    assert read(target) == b""
    down.check(0, 0)


def test_download_follows_a_file_that_grows_meanwhile(
    transport: paramiko.Transport, remote_dir: str
) -> None:
    # Larger than the requests kept in flight, so the read at the size FSTAT
    # reported is asked for only after the first block has arrived.
    remote = os.path.join(remote_dir, "growing")
    data = random_file(remote, transfer.IN_FLIGHT + 8 * MiB)
    more = os.urandom(1000)
    sizes: List[int] = []

    def progress(done: int, total: int) -> None:
        if not sizes:
            with open(remote, "ab") as file:
                file.write(more)
        sizes.append(total)

    target = io.BytesIO()
    assert transfer.download(transport.open_session(), remote, target, progress=progress) == len(
        data + more
    )
    assert target.getvalue() == data + more
    assert set(sizes) == {len(data)}  # total: the size at the start


def test_large_random_file_keeps_its_sha256(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str
) -> None:
    size = 24 * MiB + 12345  # not a multiple of any block size
    data = random_file(os.path.join(shared_dir, "source"), size)
    remote = os.path.join(remote_dir, "big")
    source = os.path.join(shared_dir, "source")
    assert transfer.upload(transport.open_session(), source, remote) == size
    assert sha256(read(remote)) == sha256(data)
    target = os.path.join(shared_dir, "big-copy")
    assert transfer.download(transport.open_session(), remote, target) == size
    assert sha256(read(target)) == sha256(data)


def test_concurrent_transfers_share_one_connection(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str
) -> None:
    datas = [os.urandom(4 * MiB + i) for i in range(4)]
    failures: List[BaseException] = []

    def round_trip(i: int) -> None:
        try:
            remote = os.path.join(remote_dir, f"file{i}")
            transfer.upload(transport.open_session(), io.BytesIO(datas[i]), remote)
            target = io.BytesIO()
            transfer.download(transport.open_session(), remote, target)
            assert target.getvalue() == datas[i]
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=round_trip, args=(i,)) for i in range(len(datas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert sorted(os.listdir(remote_dir)) == [f"file{i}" for i in range(len(datas))]


def test_upload_replaces_an_existing_file(
    transport: paramiko.Transport, remote_dir: str
) -> None:
    remote = os.path.join(remote_dir, "file")
    transfer.upload(transport.open_session(), io.BytesIO(b"old content, longer"), remote)
    transfer.upload(transport.open_session(), io.BytesIO(b"new"), remote)
    assert read(remote) == b"new"
    assert temp_files(remote_dir) == []


def test_servers_without_posix_rename_get_remove_then_rename(
    transport: paramiko.Transport, remote_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the server did not offer the extension (only OpenSSH's does).
    monkeypatch.setattr(transfer, "_POSIX_RENAME", "no-such-extension@example.com")
    remote = os.path.join(remote_dir, "file")
    transfer.upload(transport.open_session(), io.BytesIO(b"old"), remote)
    transfer.upload(transport.open_session(), io.BytesIO(b"new"), remote)
    assert read(remote) == b"new"
    assert os.listdir(remote_dir) == ["file"]


# --- atomicity ----------------------------------------------------------------------


class Watcher:
    """Polls a directory from another thread while a transfer runs.

    Records every size the final name showed, and whether a temporary file
    was seen with part of the data (proof that it looked mid-transfer).
    """

    def __init__(self, directory: str, name: str) -> None:
        self.directory = directory
        self.name = name
        self.sizes: Set[Optional[int]] = set()
        self.saw_partial_temp = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self, name: str) -> Optional[int]:
        try:
            return os.stat(os.path.join(self.directory, name)).st_size
        except FileNotFoundError:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in os.listdir(self.directory):
                if name.endswith(".tmp") and (self._size(name) or 0) > 0:
                    self.saw_partial_temp = True
            self.sizes.add(self._size(self.name))

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def test_a_reader_never_sees_a_partial_upload(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str
) -> None:
    size = 32 * MiB
    data = random_file(os.path.join(shared_dir, "source"), size)
    remote = os.path.join(remote_dir, "file")
    with open(remote, "wb") as old:
        old.write(b"old")
    with Watcher(remote_dir, "file") as watcher:
        transfer.upload(transport.open_session(), os.path.join(shared_dir, "source"), remote)
    assert watcher.saw_partial_temp, "the watcher never looked during the upload"
    assert watcher.sizes <= {3, size}
    assert read(remote) == data
    assert temp_files(remote_dir) == []


def test_a_reader_never_sees_a_partial_download(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str
) -> None:
    size = 32 * MiB
    remote = os.path.join(remote_dir, "file")
    data = random_file(remote, size)
    local_dir = os.path.join(shared_dir, "local")
    os.mkdir(local_dir)
    with Watcher(local_dir, "copy") as watcher:
        transfer.download(transport.open_session(), remote, os.path.join(local_dir, "copy"))
    assert watcher.saw_partial_temp, "the watcher never looked during the download"
    assert watcher.sizes <= {None, size}
    assert read(os.path.join(local_dir, "copy")) == data
    assert temp_files(local_dir) == []


def test_given_temp_name_is_used_and_created_exclusively(
    transport: paramiko.Transport, remote_dir: str
) -> None:
    seen: List[List[str]] = []

    def progress(done: int, total: int) -> None:
        seen.append(sorted(os.listdir(remote_dir)))

    remote = os.path.join(remote_dir, "file")
    transfer.upload(transport.open_session(), io.BytesIO(b"new"), remote,
                    temp_name=".file.first.tmp", progress=progress)
    assert seen[0] == [".file.first.tmp"]
    assert read(remote) == b"new" and os.listdir(remote_dir) == ["file"]
    # A name already taken (a file planted there, here a symlink to another
    # file of the user) is refused, never written through.
    victim = os.path.join(remote_dir, "victim")
    with open(victim, "wb") as file:
        file.write(b"keep")
    os.symlink(victim, os.path.join(remote_dir, ".file.taken.tmp"))
    with pytest.raises(ExecutorFailure, match="temporary file"):
        transfer.upload(transport.open_session(), io.BytesIO(b"other"), remote,
                        temp_name=".file.taken.tmp")
    assert read(victim) == b"keep" and read(remote) == b"new"


def test_temp_path_for_is_next_to_the_target() -> None:
    first = transfer.temp_path_for("/srv/data/report.csv")
    assert first.startswith("/srv/data/.report.csv.") and first.endswith(".tmp")
    assert first != transfer.temp_path_for("/srv/data/report.csv")
    assert transfer.temp_path_for("report.csv").startswith(".report.csv.")
    with pytest.raises(ValueError):
        transfer.temp_path_for("/srv/data/")


# --- modes --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o640, 0o755, 0o777])
def test_mode_bits(transport: paramiko.Transport, remote_dir: str, mode: int) -> None:
    remote = os.path.join(remote_dir, "file")
    transfer.upload(transport.open_session(), io.BytesIO(b"data"), remote, mode=mode)
    # 0o777 beyond the server's umask (022): the bits are set, not just asked for.
    assert os.stat(remote).st_mode & 0o7777 == mode


def test_mode_of_a_replaced_file_is_the_new_one(
    transport: paramiko.Transport, remote_dir: str
) -> None:
    remote = os.path.join(remote_dir, "file")
    transfer.upload(transport.open_session(), io.BytesIO(b"a"), remote, mode=0o700)
    transfer.upload(transport.open_session(), io.BytesIO(b"b"), remote, mode=0o644)
    assert os.stat(remote).st_mode & 0o7777 == 0o644


@pytest.mark.parametrize("mode", [True, "644", 0o10000, -1])
def test_bad_mode_is_refused_before_anything_moves(
    transport: paramiko.Transport, remote_dir: str, mode: Any
) -> None:
    chan = transport.open_session()
    with pytest.raises((TypeError, ValueError)):
        transfer.upload(chan, io.BytesIO(b"x"), os.path.join(remote_dir, "f"), mode=mode)
    assert os.listdir(remote_dir) == []


# --- errors -------------------------------------------------------------------------


def test_missing_remote_file(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str
) -> None:
    remote = os.path.join(remote_dir, "absent")
    target = os.path.join(shared_dir, "copy")
    chan = transport.open_session()
    with pytest.raises(FileNotFoundError) as caught:
        transfer.download(chan, remote, target)
    assert caught.value.filename == remote and remote in str(caught.value)
    assert chan.closed
    assert os.listdir(shared_dir) == ["remote"]  # no target, no temporary file


def test_missing_remote_directory(transport: paramiko.Transport, remote_dir: str) -> None:
    remote = os.path.join(remote_dir, "no-such-dir", "file")
    with pytest.raises(FileNotFoundError) as caught:
        transfer.upload(transport.open_session(), io.BytesIO(b"x"), remote)
    assert caught.value.filename == remote and remote in str(caught.value)


def test_upload_into_a_read_only_directory(
    transport: paramiko.Transport, remote_dir: str
) -> None:
    os.chmod(remote_dir, 0o500)  # the login user owns it: only the mode refuses
    remote = os.path.join(remote_dir, "file")
    with pytest.raises(PermissionError) as caught:
        transfer.upload(transport.open_session(), io.BytesIO(b"x"), remote)
    assert caught.value.filename == remote and remote in str(caught.value)
    assert os.listdir(remote_dir) == []


def test_upload_over_a_file_in_roots_home(transport: paramiko.Transport) -> None:
    with pytest.raises(PermissionError) as caught:
        transfer.upload(transport.open_session(), io.BytesIO(b"x"), "/root/forbidden")
    assert "/root/forbidden" in str(caught.value)


def test_download_of_an_unreadable_file(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str
) -> None:
    remote = os.path.join(remote_dir, "secret")
    random_file(remote, 10)
    os.chmod(remote, 0o000)  # owned by root
    target = os.path.join(shared_dir, "copy")
    with pytest.raises(PermissionError) as caught:
        transfer.download(transport.open_session(), remote, target)
    assert caught.value.filename == remote
    assert not os.path.exists(target) and temp_files(shared_dir) == []


def test_other_sftp_failures_are_executor_failures(
    transport: paramiko.Transport, remote_dir: str
) -> None:
    # A temporary name taken already (O_EXCL: EEXIST) is SFTP's generic FAILURE.
    taken = os.path.join(remote_dir, ".file.taken.tmp")
    random_file(taken, 1)
    remote = os.path.join(remote_dir, "file")
    with pytest.raises(ExecutorFailure, match="SFTP status 4") as caught:
        transfer.upload(transport.open_session(), io.BytesIO(b"x"), remote,
                        temp_name=".file.taken.tmp")
    assert remote in str(caught.value)
    assert sorted(os.listdir(remote_dir)) == [".file.taken.tmp"]


@pytest.mark.parametrize("mode", [None, 0o600], ids=["probed", "mode"])
def test_a_directory_is_refused_before_anything_is_written(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str, mode: Optional[int]
) -> None:
    """Was: a download read the directory and failed with a bare FAILURE (an
    ExecutorFailure, a local temporary file made and removed); an upload wrote the whole
    file and then its rename failed, also a FAILURE."""
    directory = os.path.join(remote_dir, "a-directory")
    os.mkdir(directory)
    chan = transport.open_session()
    with pytest.raises(IsADirectoryError) as caught:
        transfer.download(chan, directory, os.path.join(shared_dir, "copy"))
    assert caught.value.filename == directory and "(remote)" in str(caught.value)
    assert chan.closed and sorted(os.listdir(shared_dir)) == ["remote"]
    read_from = Progress()
    with pytest.raises(IsADirectoryError) as caught:
        transfer.upload(transport.open_session(), io.BytesIO(b"x" * MiB), directory, mode=mode,
                        progress=read_from)
    assert caught.value.filename == directory and "(remote)" in str(caught.value)
    assert read_from.calls == []  # nothing was sent
    assert sorted(os.listdir(remote_dir)) == ["a-directory"]  # temporary and probe files gone
    assert os.listdir(directory) == []


class Boom(Exception):
    pass


def test_a_failed_upload_leaves_no_temporary_file(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str
) -> None:
    random_file(os.path.join(shared_dir, "source"), 16 * MiB)
    remote = os.path.join(remote_dir, "file")

    def progress(done: int, total: int) -> None:
        assert temp_files(remote_dir), "no temporary file while uploading"
        raise Boom()

    chan = transport.open_session()
    with carried(Boom):
        transfer.upload(chan, os.path.join(shared_dir, "source"), remote, progress=progress)
    assert chan.closed
    assert os.listdir(remote_dir) == []
    assert transport.is_active()


def test_a_failed_download_leaves_no_temporary_file(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str
) -> None:
    remote = os.path.join(remote_dir, "file")
    random_file(remote, 16 * MiB)
    local_dir = os.path.join(shared_dir, "local")
    os.mkdir(local_dir)

    def progress(done: int, total: int) -> None:
        assert temp_files(local_dir), "no temporary file while downloading"
        raise Boom()

    with carried(Boom):
        transfer.download(transport.open_session(), remote, os.path.join(local_dir, "copy"),
                          progress=progress)
    assert os.listdir(local_dir) == []


def test_missing_local_source_closes_the_channel(
    transport: paramiko.Transport, remote_dir: str
) -> None:
    chan = transport.open_session()
    with carried(FileNotFoundError):
        transfer.upload(chan, "/nonexistent/source", os.path.join(remote_dir, "f"))
    assert chan.closed
    assert os.listdir(remote_dir) == []


def test_remove(transport: paramiko.Transport, remote_dir: str) -> None:
    path = os.path.join(remote_dir, "leftover")
    random_file(path, 3)
    assert transfer.remove(transport.open_session(), path) is True
    assert not os.path.exists(path)
    assert transfer.remove(transport.open_session(), path) is False


# --- servers that do not start SFTP -------------------------------------------------


def test_forced_command_that_answers_garbage(
    make_sshd: Callable[..., OpenSSHServer],
) -> None:
    server = make_sshd(forced_command="echo this key may only run backups")
    assert server.forced_key_path is not None
    t = connect(server.host, server.port, server.username, server.forced_key_path)
    try:
        chan = t.open_session()
        start = time.monotonic()
        with pytest.raises(ExecutorFailure) as caught:
            transfer.upload(chan, io.BytesIO(b"x"), "/tmp/never")
        assert time.monotonic() - start < transfer.NEGOTIATION_TIMEOUT / 2
        assert "did not start SFTP" in str(caught.value)
        assert "forced command" in str(caught.value)
        assert chan.closed
    finally:
        t.close()


def test_forced_command_that_ended_before_the_init_was_sent(
    make_sshd: Callable[..., OpenSSHServer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The forced command may end, and sshd close the channel, before SFTP's INIT goes out."""
    server = make_sshd(forced_command="echo this key may only run backups")
    assert server.forced_key_path is not None
    invoke = transfer._Session._invoke_subsystem

    def invoke_then_wait_for_the_close(session: Any, until: float) -> None:
        invoke(session, until)
        wait_for(lambda: session.chan.closed, "the forced command's channel to close")

    monkeypatch.setattr(transfer._Session, "_invoke_subsystem", invoke_then_wait_for_the_close)
    t = connect(server.host, server.port, server.username, server.forced_key_path)
    try:
        with pytest.raises(ExecutorFailure) as caught:
            transfer.upload(t.open_session(), io.BytesIO(b"x"), "/tmp/never")
        assert "did not start SFTP" in str(caught.value)
        assert "forced command" in str(caught.value)
    finally:
        t.close()


def test_forced_shell_that_waits_for_input_is_bounded(
    sshd: OpenSSHServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sshd fixture's forced command is bash reading stdin: it never
    # answers the SFTP version at all.
    monkeypatch.setattr(transfer, "NEGOTIATION_TIMEOUT", 1.0)
    assert sshd.forced_key_path is not None
    t = connect(sshd.host, sshd.port, sshd.username, sshd.forced_key_path)
    try:
        start = time.monotonic()
        with pytest.raises(ExecutorFailure) as caught:
            transfer.download(t.open_session(), "/etc/hostname", io.BytesIO())
        assert 1.0 <= time.monotonic() - start < 5.0
        assert "did not start SFTP" in str(caught.value)
    finally:
        t.close()


def test_subsystem_refused(make_test_server: Callable[..., Any]) -> None:
    server = make_test_server()  # the project's test server has no SFTP subsystem
    t = connect(server.host, server.port, "test", server.client_key_path)
    try:
        chan = t.open_session()
        start = time.monotonic()
        with pytest.raises(ExecutorFailure) as caught:
            transfer.download(chan, "/etc/hostname", io.BytesIO())
        assert time.monotonic() - start < 5.0
        assert "refused" in str(caught.value) and "SFTP" in str(caught.value)
        assert t.is_active()
    finally:
        t.close()


# --- deadlines and broken connections ----------------------------------------------


def test_deadline_already_passed(transport: paramiko.Transport, remote_dir: str) -> None:
    chan = transport.open_session()
    with pytest.raises(TimeoutError):
        transfer.upload(chan, io.BytesIO(b"x"), os.path.join(remote_dir, "f"),
                        deadline=time.monotonic())
    assert chan.closed
    assert os.listdir(remote_dir) == []


def test_deadline_during_an_upload_removes_the_temporary_file(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str
) -> None:
    random_file(os.path.join(shared_dir, "source"), 16 * MiB)
    deadline = time.monotonic() + 3.0

    def progress(done: int, total: int) -> None:
        # Hold the transfer until its deadline has passed.
        while time.monotonic() <= deadline:
            time.sleep(0.01)

    start = time.monotonic()
    with pytest.raises(TimeoutError):
        transfer.upload(transport.open_session(), os.path.join(shared_dir, "source"),
                        os.path.join(remote_dir, "file"), progress=progress, deadline=deadline)
    assert time.monotonic() - start < 3.0 + transfer.CLEANUP_GRACE + 2
    assert os.listdir(remote_dir) == []


def test_deadline_during_a_download(
    transport: paramiko.Transport, remote_dir: str, shared_dir: str
) -> None:
    remote = os.path.join(remote_dir, "file")
    random_file(remote, 16 * MiB)
    deadline = time.monotonic() + 2.0

    def progress(done: int, total: int) -> None:
        while time.monotonic() <= deadline:
            time.sleep(0.01)

    target = os.path.join(shared_dir, "copy")
    with pytest.raises(TimeoutError):
        transfer.download(transport.open_session(), remote, target, progress=progress,
                          deadline=deadline)
    assert not os.path.exists(target) and temp_files(shared_dir) == []


def test_deadline_against_a_frozen_server(
    make_sshd: Callable[..., OpenSSHServer], shared_dir: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transfer, "CLEANUP_GRACE", 0.5)
    server = make_sshd()
    t = connect(server.host, server.port, server.username, server.client_key_path)
    random_file(os.path.join(shared_dir, "source"), 64 * MiB)
    frozen: List[int] = []

    def progress(done: int, total: int) -> None:
        if not frozen:  # freeze the server side mid-transfer
            frozen.extend(server.serving_pids())
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)

    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            transfer.upload(t.open_session(), os.path.join(shared_dir, "source"),
                            os.path.join(shared_dir, "file"), progress=progress,
                            deadline=start + 2.0)
        assert frozen
        assert time.monotonic() - start < 2.0 + 0.5 + 2
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        t.close()


def test_a_lost_connection_propagates_as_a_connection_error(
    make_sshd: Callable[..., OpenSSHServer], shared_dir: str,
) -> None:
    server = make_sshd()
    t = connect(server.host, server.port, server.username, server.client_key_path)
    random_file(os.path.join(shared_dir, "source"), 64 * MiB)

    def progress(done: int, total: int) -> None:
        for pid in server.serving_pids():
            os.kill(pid, signal.SIGKILL)

    try:
        with pytest.raises((EOFError, OSError, paramiko.SSHException)) as caught:
            transfer.upload(t.open_session(), os.path.join(shared_dir, "source"),
                            os.path.join(shared_dir, "file"), progress=progress,
                            deadline=time.monotonic() + 60)
        # Not one of the errors that mean "the transfer itself failed".
        assert not isinstance(caught.value, (FileNotFoundError, PermissionError, TimeoutError))
        t.join(10)  # paramiko's transport thread notices the end by itself
        assert not t.is_active()
    finally:
        t.close()


# --- local twins -----------------------------------------------------------------------


def test_local_put_and_get_round_trip(tmp_path: pathlib.Path) -> None:
    data = random_file(str(tmp_path / "source"), 5 * MiB + 1)
    progress = Progress()
    assert transfer.local_put(tmp_path / "source", str(tmp_path / "dest"), mode=0o640,
                              progress=progress) == len(data)
    progress.check(len(data), len(data))
    assert read(str(tmp_path / "dest")) == data
    assert os.stat(tmp_path / "dest").st_mode & 0o7777 == 0o640
    target = io.BytesIO()
    assert transfer.local_get(str(tmp_path / "dest"), target) == len(data)
    assert target.getvalue() == data
    assert transfer.local_put(io.BytesIO(b""), str(tmp_path / "empty")) == 0
    assert read(str(tmp_path / "empty")) == b""
    assert sorted(os.listdir(tmp_path)) == ["dest", "empty", "source"]


def test_local_errors_and_failures_leave_nothing(tmp_path: pathlib.Path) -> None:
    with carried(FileNotFoundError):
        transfer.local_get(str(tmp_path / "absent"), str(tmp_path / "copy"))
    with carried(FileNotFoundError) as caught:
        transfer.local_put(io.BytesIO(b"x"), str(tmp_path / "no-dir" / "dest"))
    assert caught.value.original.filename == str(tmp_path / "no-dir" / "dest")
    random_file(str(tmp_path / "source"), 3 * MiB)

    def progress(done: int, total: int) -> None:
        assert temp_files(str(tmp_path))
        raise Boom()

    with carried(Boom):
        transfer.local_put(str(tmp_path / "source"), str(tmp_path / "dest"), progress=progress)
    assert os.listdir(tmp_path) == ["source"]
