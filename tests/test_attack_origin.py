"""Attacks on issue 18 (errors by their origin) that broke something: one regression test each.

Real OpenSSH sshd (the ``sshd`` fixtures) unless the attack is local.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
from typing import Callable

import pytest
from helpers import wait_for

from paramiko_executor import HostGroup, ShellExecutor, SSHExecutor

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def in_child(work: Callable[[], bytes], limit: int = 20) -> bytes:
    """``work()`` in a forked child, killed by SIGALRM after ``limit`` s; what it returned.

    A child that hangs dies of the alarm and returns b"hung"; one that raises returns the
    exception's type name.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            signal.alarm(limit)
            os.write(write_end, work())
            code = 0
        except BaseException as exc:
            os.write(write_end, type(exc).__name__.encode())
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read()
    return b"hung" if os.WIFSIGNALED(status) else said


def group_of(server) -> HostGroup:
    params = server.executor_parameters()
    host = {"host": params.pop("host"), "port": params.pop("port"), "name": "h"}
    return HostGroup([host], **params)


@needs_fork
@pytest.mark.hang_timeout(90)
def test_group_used_before_fork_runs_in_the_child(sshd):
    """The parent's pool threads do not exist in a child: the child needs a pool of its own."""
    with group_of(sshd) as group:
        assert group.run_command("echo parent", timeout=20)["h"].stdout == "parent\n"
        said = in_child(lambda: group.run_command("echo child", timeout=10)["h"].stdout.encode())
        assert said == b"child\n"
        assert group.run_command("echo parent", timeout=20)["h"].stdout == "parent\n"


@needs_fork
@pytest.mark.hang_timeout(90)
def test_group_forked_during_a_call_runs_in_the_child(sshd, shared_dir):
    """A fork while another thread is inside a group call: its lock and calls are the parent's."""
    go = os.path.join(shared_dir, "go")
    with group_of(sshd) as group:
        group.run_command("true", timeout=20)
        busy = threading.Thread(target=group.run_command, args=(
            f"i=0; while [ ! -e {go} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done",),
            kwargs={"timeout": 30})
        busy.start()
        try:
            said = in_child(lambda: group.run_command("echo child", timeout=10)["h"]
                            .stdout.encode())
        finally:
            open(go, "w").close()
            busy.join(60)
        assert not busy.is_alive()
        assert said == b"child\n"


def nonblocking_pipe(first: bytes):
    """A pipe's read end in non-blocking mode holding ``first``, its writer still open.

    Returns the raw read end and its write end (the caller closes both).
    """
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.write(write_end, first)
    return open(read_end, "rb", buffering=0), write_end  # noqa: SIM115 (closed by the caller)


@pytest.mark.hang_timeout(60)
@pytest.mark.parametrize("kind", ["ssh", "shell"])
def test_put_from_a_nonblocking_pipe_never_uploads_a_silent_part(kind, sshd, shared_dir):
    """readinto() of a non-blocking file with no data yet returns None: not the end of the file.

    Taken for the end, the upload succeeded with what was there so far, the rest never sent.
    """
    source, writer = nonblocking_pipe(b"a" * 1000)
    target = os.path.join(shared_dir, "up")
    executor = SSHExecutor(**sshd.executor_parameters()) if kind == "ssh" else ShellExecutor()
    try:
        with source, executor:
            with pytest.raises(BlockingIOError):
                executor.put(source, target, timeout=20)
    finally:
        os.close(writer)
    assert not os.path.exists(target)


class ReadOnly:
    """A file object with read() only, over ``raw``: what it returns, unchanged."""

    def __init__(self, raw) -> None:
        self.raw = raw

    def read(self, size: int = -1):
        return self.raw.read(size)


@pytest.mark.hang_timeout(60)
def test_put_from_a_nonblocking_reader_without_readinto(sshd, shared_dir):
    """read() answering None (no data yet) is a BlockingIOError, not a TypeError of ours."""
    source, writer = nonblocking_pipe(b"a" * 1000)
    target = os.path.join(shared_dir, "up")
    try:
        with source, SSHExecutor(**sshd.executor_parameters()) as executor:
            with pytest.raises(BlockingIOError):
                executor.put(ReadOnly(source), target, timeout=20)
            assert executor.statistics().reconnects == 0
    finally:
        os.close(writer)
    assert not os.path.exists(target)


@pytest.mark.hang_timeout(60)
@pytest.mark.parametrize("kind", ["ssh", "shell"])
def test_get_into_a_full_nonblocking_pipe_never_drops_data(kind, sshd, shared_dir):
    """A raw non-blocking file's write() answers None when it took nothing: not "took it all".

    Taken for "took it all", the download reported every byte and the pipe held 64 KiB.
    """
    source = os.path.join(shared_dir, "big")
    with open(source, "wb") as file:
        file.write(os.urandom(1 << 20))
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    executor = SSHExecutor(**sshd.executor_parameters()) if kind == "ssh" else ShellExecutor()
    try:
        with open(write_end, "wb", buffering=0) as target, executor:
            with pytest.raises(BlockingIOError):
                executor.get(source, target, timeout=20)
    finally:
        os.close(read_end)


def test_copies_with_another_home_never_share_its_default_keys(sshd, tmp_path, monkeypatch):
    """``look_for_keys`` tries ``~/.ssh/id_*``: another HOME logs in with other keys.

    The keys found are not part of the resolved target: both copies resolved alike, and the
    copy whose HOME holds no key got the connection the other had logged in with its key.
    """
    from paramiko_executor import AuthenticationFailure

    keyed = tmp_path / "keyed"
    (keyed / ".ssh").mkdir(parents=True)
    with open(sshd.client_key_path) as source:
        (keyed / ".ssh" / "id_ed25519").write_text(source.read())
    (keyed / ".ssh" / "id_ed25519").chmod(0o600)
    keyless = tmp_path / "keyless"
    keyless.mkdir()
    parameters = sshd.executor_parameters(allow_agent=False)
    del parameters["client_keys"]  # look_for_keys: ~/.ssh/id_*
    monkeypatch.setenv("HOME", str(keyed))
    data = pickle.dumps(SSHExecutor(**parameters))
    first = pickle.loads(data)
    try:
        assert first.run_command("echo in", timeout=20).stdout == "in\n"
        monkeypatch.setenv("HOME", str(keyless))
        other = pickle.loads(data)
        with pytest.raises(AuthenticationFailure):
            other.run_command("echo in", timeout=20)
        assert first.statistics().reconnects == 0
    finally:
        first.close()


# --- a server's late message for a channel both sides closed -----------------------------------


@pytest.fixture
def hostile():
    from test_origin import HostileServer, finish

    servers = []

    def make(behaviours):
        server = HostileServer({**behaviours, b"sync": finish})
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.mark.hang_timeout(90)
def test_a_late_message_for_a_closed_channel_leaves_the_connection_alone(hostile):
    """A message for a channel closed on both sides is ignored, as paramiko itself does.

    paramiko's own server sends one (a window adjust raced by its CLOSE): the client had
    forgotten the channel and, on "a message for an unknown channel", paramiko ended the
    whole connection under every other command on it.
    """
    from paramiko.common import cMSG_CHANNEL_WINDOW_ADJUST
    from test_origin import finish, send_raw

    sent = threading.Event()

    def late(chan) -> None:
        finish(chan)
        wait_for(lambda: chan.transport._channels.get(chan.chanid) is None, "the client's CLOSE")
        send_raw(chan, cMSG_CHANNEL_WINDOW_ADJUST, 4096)
        sent.set()

    server = hostile({b"late": late})
    with SSHExecutor(**server.parameters(max_sessions=1)) as executor:
        assert executor.run_command("late", timeout=30).exit_code == 0
        assert sent.wait(30)
        # Each answer comes after the late message on the connection: it is handled by then.
        for _ in range(2):
            assert executor.run_command("sync", timeout=30).exit_code == 0
        assert executor.statistics().reconnects == 0
        assert executor.statistics().commands_retried == 0
    assert server.connections == 1


def test_closed_channels_are_remembered_only_a_bounded_while(sshd):
    """paramiko's record of closed channels stays bounded over many commands."""
    from paramiko_executor.channel import REMEMBERED_CLOSED

    with SSHExecutor(**sshd.executor_parameters(max_sessions=2)) as executor:
        for _ in range(REMEMBERED_CLOSED + 50):
            executor.run_command("true", timeout=30)
        state = executor.state
        assert state is not None
        assert len(state.transport.channels_seen) <= REMEMBERED_CLOSED + 2


@pytest.mark.parametrize("kind", ["ssh", "shell"])
@pytest.mark.parametrize("direction", ["put", "get"])
def test_a_text_file_object_is_refused_at_the_call(kind, direction, sshd, shared_dir):
    """A text file object is bad input: a TypeError naming ``local`` before anything moves."""
    path = os.path.join(shared_dir, "text")
    with open(path, "w") as file:
        file.write("x\n")
    executor = SSHExecutor(**sshd.executor_parameters()) if kind == "ssh" else ShellExecutor()
    with executor, open(path, "r" if direction == "put" else "a") as text:
        with pytest.raises(TypeError, match="local"):
            if direction == "put":
                executor.put(text, os.path.join(shared_dir, "out"))
            else:
                executor.get(path, text)
        if kind == "ssh":
            assert executor.statistics().commands_started == 0


# --- the TOTP ledger's lock and fork ----------------------------------------------------------


@needs_fork
@pytest.mark.hang_timeout(90)
def test_a_fork_during_a_ledger_claim_leaves_no_lock_in_the_child(tmp_path, monkeypatch):
    """A child forked while a thread had the ledger file open must not hold its flock.

    The child inherited the descriptor, and with it the lock: every other login of the
    machine found the ledger locked for as long as the child lived, and went without it.
    """
    from paramiko_executor import totp

    path = str(tmp_path / "ledger" / "totp")
    inside, leave = threading.Event(), threading.Event()
    plain = totp._LedgerFile._claim_locked

    def held(self, fd, name, step):
        inside.set()
        assert leave.wait(30)
        return plain(self, fd, name, step)

    monkeypatch.setattr(totp._LedgerFile, "_claim_locked", held)
    claiming = threading.Thread(target=totp._LedgerFile(path).claim, args=("S1", 1))
    claiming.start()
    assert inside.wait(30)
    # The fork waits for the claim, if it must: let the claim go on meanwhile.
    threading.Timer(0.5, leave.set).start()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child lives on until the parent is done (bounded)
        os.close(write_end)
        signal.alarm(30)
        os.read(read_end, 1)
        os._exit(0)
    try:
        os.close(read_end)
        claiming.join(30)
        assert not claiming.is_alive()
        monkeypatch.setattr(totp._LedgerFile, "_claim_locked", plain)
        monkeypatch.setattr(totp._LedgerFile, "LOCK_TIMEOUT", 2.0)
        assert totp._LedgerFile(path).claim("S2", 1) is None  # free, and taken now
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)


@needs_fork
@pytest.mark.hang_timeout(90)
def test_a_fork_during_a_known_hosts_append_leaves_no_lock_in_the_child(tmp_path, monkeypatch):
    """accept-new appends under a flock: a child forked meanwhile must not keep it.

    The child inherited the descriptor, and with it the lock: every other process's
    accept-new append waited, without bound, for as long as the child lived.
    """
    import fcntl

    import paramiko

    from paramiko_executor import hostkeys

    path = str(tmp_path / "known_hosts")
    inside, leave = threading.Event(), threading.Event()
    plain = hostkeys._read_entries

    def held(name):
        inside.set()
        assert leave.wait(30)
        return plain(name)

    monkeypatch.setattr(hostkeys, "_read_entries", held)
    policy = hostkeys.HostKeyPolicy([path], accept_new=True)
    key = paramiko.ECDSAKey.generate()
    appending = threading.Thread(target=policy._append, args=(path, key, "[127.0.0.1]:2222"))
    appending.start()
    assert inside.wait(30)
    threading.Timer(0.5, leave.set).start()  # the fork may wait for the append
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_end)
        signal.alarm(30)
        os.read(read_end, 1)
        os._exit(0)
    try:
        os.close(read_end)
        appending.join(30)
        assert not appending.is_alive()
        with open(path, "rb") as other:  # another open file: as another process would
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)
