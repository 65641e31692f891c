"""Attacks on put's umask probe (attack10b)."""

from __future__ import annotations

import io
import os
import pwd
import stat
import struct
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import paramiko
import pytest
from helpers import sftp
from test_files_trust import _U32, FXP, HostileSFTPServer, good_reply, packet, read_packet

from paramiko_executor import HostGroup, ShellExecutor, SSHExecutor, TransferTimeout


def bits(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def own_dir(server: Any, shared_dir: str) -> Path:
    entry = pwd.getpwnam(server.username)
    os.chown(shared_dir, entry.pw_uid, entry.pw_gid)
    return Path(shared_dir)


def put_beside_sftp(make_sshd: Callable[..., Any], shared_dir: str, tmp_path: Path,
                    refused: str, mode: int) -> Path:
    """The remote directory once a local file of ``mode`` was uploaded to it by sftp (as
    ``by-sftp``) and by put (as ``by-put``), through an sshd whose sftp-server refuses
    the request ``refused``; nothing else is left in it."""
    server = make_sshd(extra_config=[f"ForceCommand internal-sftp -P {refused}"])
    remote = own_dir(server, shared_dir)
    source = tmp_path / "source"
    source.write_bytes(b"data\n")
    source.chmod(mode)
    sftp(server, f"put {source} {remote}/by-sftp")
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.put(str(source), f"{remote}/by-put")
    assert sorted(p.name for p in remote.iterdir()) == ["by-put", "by-sftp"]
    return remote


def test_a_server_that_refuses_remove_is_left_no_probe(
        make_sshd: Callable[..., Any], shared_dir: str, tmp_path: Path) -> None:
    # An upload-only drop box: sftp-server -P remove denies REMOVE (files are never
    # deleted), renames and writes still work, and so does sftp's put. The probe's
    # REMOVE was refused: every put left an empty ".<name>.<random>.tmp" behind.
    remote = put_beside_sftp(make_sshd, shared_dir, tmp_path, "remove", 0o644)
    assert bits(remote / "by-put") == bits(remote / "by-sftp")
    assert (remote / "by-put").read_bytes() == b"data\n"


# -- a real sftp-server behind a relay that cuts the connection mid-batch ------------------------

SFTP_SERVER = "/usr/lib/openssh/sftp-server"


class RelaySFTPServer(HostileSFTPServer):
    """An SSH server whose ``sftp`` subsystem is a real OpenSSH sftp-server (as root),
    relayed request by request. In the first session only, the connection is dropped
    when ``cut(index, kind)`` says so of a request (``index`` counts from 0 after INIT),
    once the requests before it were answered by sftp-server: the server processed part
    of a batch that its client had sent whole (a batch split over SSH packets, say by a
    small window). ``hold(index, kind)``: seconds to hold a request of the first session
    back before it goes on (a slow server). ``sessions``: how many SFTP sessions it
    served; ``first_done`` is set once the first one ended."""

    def __init__(self, directory: Path, cut: Callable[[int, int], bool],
                 hold: Callable[[int, int], float] = lambda index, kind: 0.0) -> None:
        super().__init__(directory, {})
        self.cut = cut
        self.hold = hold
        self.first_done = threading.Event()
        self.sessions = 0
        self.lock = threading.Lock()

    def serve(self, chan: paramiko.Channel) -> None:
        with self.lock:
            self.sessions += 1
            first = self.sessions == 1
        proc = subprocess.Popen([SFTP_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        answered = threading.Semaphore(0)

        def pump() -> None:
            assert proc.stdout is not None
            while True:
                head = proc.stdout.read(4)
                if len(head) < 4:
                    return
                body = proc.stdout.read(_U32.unpack(head)[0])
                try:
                    chan.sendall(head + body)
                except (EOFError, OSError, paramiko.SSHException):
                    return
                answered.release()

        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        sent = 0
        try:
            chan.settimeout(10)
            while True:
                kind, request_id, payload = read_packet(chan)
                if first and kind != FXP["INIT"] and self.cut(sent - 1, kind):
                    # Everything before this request answered: then the connection goes.
                    for _ in range(sent):  # INIT's VERSION too
                        if not answered.acquire(timeout=10):
                            break
                    chan.get_transport().close()
                    return
                if first and kind != FXP["INIT"]:
                    time.sleep(self.hold(sent - 1, kind))
                body = bytes((kind,)) + (b"" if kind == FXP["INIT"]
                                         else _U32.pack(request_id)) + payload
                assert proc.stdin is not None
                proc.stdin.write(_U32.pack(len(body)) + body)
                proc.stdin.flush()
                sent += 1
        except (EOFError, OSError, paramiko.SSHException):
            pass
        finally:
            with suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            proc.wait(10)
            pumper.join(10)
            if first:
                self.first_done.set()


def is_probe_lstat(index: int, kind: int) -> bool:
    return kind == FXP["LSTAT"]


def test_an_attempt_cut_off_after_the_probe_was_created_leaves_no_probe(
        tmp_path: Path) -> None:
    # The connection is lost after the server created the attempt's temporary file and
    # its probe, before the probe's LSTAT and REMOVE reached it. The retry on a new
    # connection succeeds, and the broken attempt's temporary file is removed (the
    # executor remembers its name); its probe was not: nothing knew its name.
    directory = tmp_path / "remote"
    directory.mkdir()
    server = RelaySFTPServer(tmp_path, is_probe_lstat)
    try:
        with SSHExecutor(**server.executor_parameters(), on_disconnect_retry=1) as ex:
            assert ex.put(io.BytesIO(b"data"), f"{directory}/up", timeout=60) == 4
        assert server.sessions >= 2
        assert sorted(p.name for p in directory.iterdir()) == ["up"]
    finally:
        server.close()


def test_a_server_that_refuses_lstat_gives_the_bits_sftp_gives(
        make_sshd: Callable[..., Any], shared_dir: str, tmp_path: Path) -> None:
    # sftp-server -P lstat (or a server without LSTAT): sftp's put needs no LSTAT and
    # leaves 0o755 & ~umask; put took the probe's refused LSTAT for "no answer" and
    # left the new file owner-only (0o700). The probe's handle tells the same by FSTAT.
    remote = put_beside_sftp(make_sshd, shared_dir, tmp_path, "lstat", 0o775)
    assert bits(remote / "by-sftp") == 0o755
    assert bits(remote / "by-put") == bits(remote / "by-sftp")


def test_a_deadline_passed_while_the_server_was_slow_to_create_leaves_nothing_behind(
        tmp_path: Path) -> None:
    # The server takes 3 s over the batch that creates the temporary file and the probe;
    # the put's deadline passes meanwhile. The executor's clean-up, in a session of its
    # own, found nothing to remove yet; the temporary file was created after it, and
    # stayed. Removed in the same session, after the requests that create it, it goes.
    directory = tmp_path / "remote"
    directory.mkdir()
    server = RelaySFTPServer(tmp_path, lambda index, kind: False,
                             hold=lambda index, kind: 3.0 if kind == FXP["STAT"] else 0.0)
    try:
        with SSHExecutor(**server.executor_parameters()) as ex, \
                pytest.raises(TransferTimeout):
            ex.put(io.BytesIO(b"data"), f"{directory}/up", timeout=1.5)
        assert server.first_done.wait(20)
        assert list(directory.iterdir()) == []
    finally:
        server.close()


#: The requests of a put of a small file without ``mode``: the limits extension, STAT,
#: OPEN (the temporary file), OPEN and LSTAT (the probe), REMOVE and CLOSE (the probe,
#: with the WRITE), WRITE, FSETSTAT, CLOSE, posix-rename. With ``mode``, 8: no probe.
PUT_REQUESTS = 11


@pytest.mark.parametrize("mode", [None, 0o640])
@pytest.mark.parametrize("at", range(PUT_REQUESTS))
def test_an_attempt_cut_off_anywhere_leaves_nothing_behind(
        tmp_path: Path, at: int, mode: Optional[int]) -> None:
    directory = tmp_path / "remote"
    directory.mkdir()
    server = RelaySFTPServer(tmp_path, lambda index, _kind: index == at)
    try:
        with SSHExecutor(**server.executor_parameters(), on_disconnect_retry=1) as ex:
            assert ex.put(io.BytesIO(b"data"), f"{directory}/up", mode=mode, timeout=60) == 4
        assert sorted(p.name for p in directory.iterdir()) == ["up"]
        assert (directory / "up").read_bytes() == b"data"
        umask = os.umask(0o022)  # the relayed sftp-server's, inherited from this process
        os.umask(umask)
        assert bits(directory / "up") == (0o644 & ~umask if mode is None else mode)
    finally:
        server.close()


# -- a hostile server's answers about the probe ---------------------------------------------------


class ReversingSFTPServer(HostileSFTPServer):
    """`HostileSFTPServer` that answers each batch of requests in reverse order (the
    requests that arrived together), LSTAT as ``lstat`` says, and notes the bits of
    every FSETSTAT in ``modes``; ``largest``: the most requests answered at once."""

    def __init__(self, directory: Path, lstat: bytes) -> None:
        super().__init__(directory, {})
        self.lstat = lstat
        self.modes: List[int] = []
        self.largest = 0

    def reply(self, kind: int, request_id: int, payload: bytes) -> bytes:
        if kind == FXP["LSTAT"]:
            return packet(FXP["ATTRS"], _U32.pack(request_id), self.lstat)
        if kind == FXP["FSETSTAT"]:
            (length,) = _U32.unpack_from(payload)
            flags, perms = struct.unpack_from(">II", payload, 4 + length)
            if flags & 0x4:
                self.modes.append(perms)
        return good_reply(kind, request_id, payload)

    def serve(self, chan: paramiko.Channel) -> None:
        chan.settimeout(10)
        try:
            read_packet(chan)  # INIT
            chan.sendall(packet(FXP["VERSION"], _U32.pack(3)))
            while True:
                batch = [read_packet(chan)]
                while chan.recv_ready():  # what came with it
                    batch.append(read_packet(chan))
                self.largest = max(self.largest, len(batch))
                chan.sendall(b"".join(self.reply(*request) for request in reversed(batch)))
        except (EOFError, OSError, paramiko.SSHException):
            pass


@pytest.mark.parametrize(("lstat", "final"), [
    (struct.pack(">IQI", 0x5, 0, 0o100640), 0o640),  # a well-behaved answer
    (struct.pack(">IQI", 0x5, 0, 0o120777), 0o600),  # a symbolic link
    (struct.pack(">IQI", 0x5, 0, 0o107777), 0o644),  # every bit, set-id and sticky too
    (struct.pack(">IQI", 0x5, 0, 0xFFFFFFFF), 0o600),  # not even a file type
    (struct.pack(">IQII", 0x3, 0, 0, 0), 0o600),  # no permissions (another owner's ids)
    (struct.pack(">II", 0x4, 0o7777), 0o644),  # permissions without a type
], ids=["0640", "link", "07777", "huge", "no-perms", "no-type"])
def test_the_probe_answered_in_any_order_and_any_way_never_widens(
        tmp_path: Path, lstat: bytes, final: int) -> None:
    server = ReversingSFTPServer(tmp_path, lstat)
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.put(io.BytesIO(b"data"), "/dir/up", timeout=30)  # a file object: 0o644
        assert server.modes == [final]
        assert server.largest >= 4  # STAT, OPEN and the probe's OPEN and LSTAT
    finally:
        server.close()


# -- HostGroup.get's check of the hosts' local files ----------------------------------------------


def group_of_two(sshd: Any) -> HostGroup:
    """Hosts "a" and "b" (both sshd), one at a time, in that order."""
    parameters = sshd.executor_parameters()
    host = parameters.pop("host")
    return HostGroup([{"name": "a", "host": host}, {"name": "b", "host": host}],
                     max_workers=1, **parameters)


def test_a_hosts_local_link_to_a_fifo_is_refused_before_anything_runs(
        sshd: Any, shared_dir: str, tmp_path: Path) -> None:
    remote = Path(shared_dir) / "file"
    remote.write_bytes(b"data")
    remote.chmod(0o644)
    os.mkfifo(tmp_path / "fifo")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b").symlink_to(tmp_path / "fifo")
    with group_of_two(sshd) as group, pytest.raises(ValueError, match="regular file"):
        group.get(str(remote), str(out), timeout=30)
    assert sorted(os.listdir(out)) == ["b"]  # host a did not run


def test_a_fifo_made_after_the_check_is_that_hosts_failure(
        sshd: Any, shared_dir: str, tmp_path: Path) -> None:
    """A FIFO made under host b's name after the check (here by host a's progress
    callback) raised ValueError out of the whole call, host a's download lost."""
    remote = Path(shared_dir) / "file"
    remote.write_bytes(b"data")
    remote.chmod(0o644)
    out = tmp_path / "out"
    out.mkdir()

    def progress(done: int, total: int) -> None:
        if not (out / "b").exists():
            os.mkfifo(out / "b")

    with group_of_two(sshd) as group:
        result = group.get(str(remote), str(out), progress=progress, timeout=30)
    assert result["a"] == 4
    assert isinstance(result["b"], Exception)


# -- a local directory with a default ACL ---------------------------------------------------------

#: A default ACL (the xattr's binary form) that gives others nothing: user::rwx,
#: group::r-x, other::---. The kernel then takes it, not the umask, off a new file.
_UNDEFINED = 0xFFFFFFFF
PRIVATE_DEFAULT_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perms, _UNDEFINED) for tag, perms in ((1, 7), (4, 5), (0x20, 0)))


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def private_dir(path: Path) -> Path:
    path.mkdir()
    os.setxattr(path, "system.posix_acl_default", PRIVATE_DEFAULT_ACL)
    return path


def test_a_local_put_into_a_directory_whose_acl_gives_others_nothing_is_as_cps(
        tmp_path: Path, umask_022: None) -> None:
    # cp's new file gets 0o644 less what the default ACL takes: 0o640. ShellExecutor's put
    # took the umask (0o022) off instead: 0o644, readable by everyone.
    target = private_dir(tmp_path / "private")
    source = tmp_path / "source"
    source.write_bytes(b"data")
    source.chmod(0o644)
    subprocess.run(["cp", str(source), str(target / "by-cp")], check=True, timeout=30)
    ShellExecutor().put(str(source), str(target / "by-put"))
    assert bits(target / "by-cp") == 0o640
    assert bits(target / "by-put") == 0o640
    assert sorted(os.listdir(target)) == ["by-cp", "by-put"]


def test_a_get_into_a_directory_whose_acl_gives_others_nothing_is_as_sftps(
        sshd: Any, shared_dir: str, tmp_path: Path, umask_022: None) -> None:
    remote = Path(shared_dir) / "file"
    remote.write_bytes(b"data")
    remote.chmod(0o644)
    target = private_dir(tmp_path / "private")
    sftp(sshd, f"get {remote} {target}/by-sftp")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.get(str(remote), str(target / "by-get"))
    assert bits(target / "by-sftp") == 0o640
    assert bits(target / "by-get") == 0o640
    assert sorted(os.listdir(target)) == ["by-get", "by-sftp"]
