"""put's modes against OpenSSH's own ``sftp`` (and ShellExecutor's against ``cp``), case by case.

Each case: a local file of one mode, uploaded by ``sftp -b`` and by
`SSHExecutor.put` to a server (a private sshd on 127.0.0.1) started under
one umask, once as a new file and once over a file of the login's own;
the remote bits must be the same. sftp creates a new file asking for the
local bits (less set-id and sticky) and the server's umask takes its share;
a replaced file keeps its own bits (less set-user-ID, and set-group-ID of
a group-executable file: the kernel clears them at a write by anyone but
root). Our rules that differ on purpose (another user's file or a symbolic
link is not written through but replaced, with the bits both it and a new
file have) are not among these cases: test_files_trust and test_attack9a
cover them.
"""

from __future__ import annotations

import io
import os
import pwd
import stat
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

from paramiko_executor import ShellExecutor, SSHExecutor

LOCAL_MODES = (0o600, 0o644, 0o664, 0o666, 0o755, 0o777, 0o4755, 0o2775, 0o1777)
UMASKS = (0o022, 0o077, 0o002, 0o000)


def bits(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def replaced_bits(index: int) -> int:
    """The bits of the file that case ``index`` replaces: another case's local mode."""
    return LOCAL_MODES[(index + 4) % len(LOCAL_MODES)]


@pytest.fixture
def umask_of() -> Iterator[Callable[[int], int]]:
    """Sets this process's umask; the old one comes back after the test."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def sftp_server_with_umask(make_sshd: Callable[..., Any], umask: int) -> Any:
    """A private sshd whose SFTP server runs under ``umask``, as an administrator sets it.

    sshd itself adds 0o022 to the umask it inherits; ``internal-sftp -u`` sets it whole.
    """
    return make_sshd(extra_config=[f"ForceCommand internal-sftp -u {umask:03o}"])


def sources(directory: Path) -> Dict[int, Path]:
    made = {}
    for mode in LOCAL_MODES:
        path = directory / f"source-{mode:o}"
        path.write_bytes(f"mode {mode:o}\n".encode())
        path.chmod(mode)
        made[mode] = path
    return made


def plant(path: Path, mode: int, uid: int, gid: int) -> None:
    """A file to replace: ``mode``, owned by ``uid``:``gid``."""
    path.write_bytes(b"old\n")
    os.chown(path, uid, gid)
    path.chmod(mode)  # after chown, which clears set-id bits


@pytest.mark.parametrize("umask", UMASKS, ids=lambda u: f"umask{u:03o}")
def test_put_leaves_the_bits_sftp_leaves(make_sshd: Callable[..., Any], shared_dir: str,
                                         tmp_path: Path, umask_of: Callable[[int], None],
                                         umask: int) -> None:
    server = sftp_server_with_umask(make_sshd, umask)
    entry = pwd.getpwnam(server.username)
    assert entry.pw_uid != 0
    remote = Path(shared_dir)
    os.chown(remote, entry.pw_uid, entry.pw_gid)
    local = sources(tmp_path)
    for tool in ("sftp", "ours"):
        for index, mode in enumerate(LOCAL_MODES):
            plant(remote / f"{tool}-old-{mode:o}", replaced_bits(index),
                  entry.pw_uid, entry.pw_gid)
    commands = [f"put {local[mode]} {remote}/sftp-{kind}-{mode:o}"
                for mode in LOCAL_MODES for kind in ("new", "old")]
    subprocess.run(
        ["sftp", "-F", "/dev/null", "-i", server.client_key_path,
         "-o", f"UserKnownHostsFile={server.known_hosts_path}", "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", "-P", str(server.port), "-b", "-",
         f"{server.username}@{server.host}"],
        input="\n".join(commands).encode(), check=True, timeout=60, stdout=subprocess.DEVNULL)
    with SSHExecutor(**server.executor_parameters()) as ex:
        for mode in LOCAL_MODES:
            for kind in ("new", "old"):
                ex.put(str(local[mode]), f"{remote}/ours-{kind}-{mode:o}")
    found = {tool: {f"{kind}-{mode:o}": oct(bits(remote / f"{tool}-{kind}-{mode:o}"))
                    for mode in LOCAL_MODES for kind in ("new", "old")}
             for tool in ("sftp", "ours")}
    assert found["ours"] == found["sftp"]
    # The reference is what it is said to be: the umask took its share of a new file.
    for mode in LOCAL_MODES:
        assert found["sftp"][f"new-{mode:o}"] == oct(mode & 0o777 & ~umask)
    for path in remote.iterdir():
        assert path.read_bytes() == local[int(path.name.rsplit("-", 1)[1], 8)].read_bytes()
    # Nothing left behind: no temporary file, no probe.
    assert len(list(remote.iterdir())) == 4 * len(LOCAL_MODES)


@pytest.mark.parametrize("umask", UMASKS, ids=lambda u: f"umask{u:03o}")
def test_a_local_put_leaves_the_bits_cp_leaves(tmp_path: Path, umask_of: Callable[[int], None],
                                               umask: int) -> None:
    # ShellExecutor's put is a copy on this machine, which is then the server: its umask
    # comes off a new file, as off cp's (it kept the source's bits whole).
    local = sources(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    for tool in ("cp", "ours"):
        for index, mode in enumerate(LOCAL_MODES):
            plant(target / f"{tool}-old-{mode:o}", replaced_bits(index), os.getuid(),
                  os.getgid())
    umask_of(umask)
    for mode in LOCAL_MODES:
        for kind in ("new", "old"):
            subprocess.run(["cp", str(local[mode]), str(target / f"cp-{kind}-{mode:o}")],
                           check=True, timeout=30)
            ShellExecutor().put(str(local[mode]), str(target / f"ours-{kind}-{mode:o}"))
    found = {tool: {f"{kind}-{mode:o}": oct(bits(target / f"{tool}-{kind}-{mode:o}"))
                    for mode in LOCAL_MODES for kind in ("new", "old")}
             for tool in ("cp", "ours")}
    assert found["ours"] == found["cp"]
    assert len(list(target.iterdir())) == 4 * len(LOCAL_MODES)


@pytest.mark.parametrize("kind", ["ssh", "shell"])
def test_mode_is_set_exactly_whatever_the_umask(make_sshd: Callable[..., Any], shared_dir: str,
                                                umask_of: Callable[[int], None],
                                                kind: str) -> None:
    # mode= is the caller's word: no umask takes anything off it.
    server = sftp_server_with_umask(make_sshd, 0o077)
    umask_of(0o077)  # the ShellExecutor's server's
    entry = pwd.getpwnam(server.username)
    remote = Path(shared_dir)
    os.chown(remote, entry.pw_uid, entry.pw_gid)
    with (SSHExecutor(**server.executor_parameters()) if kind == "ssh"
          else ShellExecutor()) as ex:
        ex.put(io.BytesIO(b"data"), f"{remote}/explicit", mode=0o2775)
        ex.put(io.BytesIO(b"data"), f"{remote}/object")
    assert bits(remote / "explicit") == 0o2775
    assert bits(remote / "object") == 0o600  # 0o644 for a file object, less the umask


def test_the_upload_is_owner_only_until_its_final_bits_under_umask_0(
        make_sshd: Callable[..., Any], shared_dir: str, tmp_path: Path,
        umask_of: Callable[[int], None]) -> None:
    # The new file's bits come from a probe file: the temporary file holding the data
    # still starts owner-only, whatever the umask would have let through.
    server = sftp_server_with_umask(make_sshd, 0o000)
    entry = pwd.getpwnam(server.username)
    remote = Path(shared_dir)
    os.chown(remote, entry.pw_uid, entry.pw_gid)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(3 * 1024 * 1024))
    source.chmod(0o666)
    seen: List[int] = []

    def progress(done: int, total: int) -> None:
        seen.extend(bits(path) for path in remote.iterdir() if path.name.endswith(".tmp"))

    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.put(str(source), f"{remote}/up", progress=progress)
    assert seen and set(seen) == {0o600}
    assert bits(remote / "up") == 0o666
    assert [path.name for path in remote.iterdir()] == ["up"]
