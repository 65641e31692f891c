"""Attack 9c: attack9a's files and trust fixes, attacked again (regression tests).

Each test failed on main before its fix (or is a strict xfail naming what is left).
Only 127.0.0.1 is contacted; every file and node is made by the test in its own directory.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
from helpers import sftp
from test_oracle_hostkeys import block, write

from paramiko_executor import HostKeyFailure, ShellExecutor, SSHExecutor
from testsupport import oracle


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def _node(path: Path, kind: str) -> None:
    """A FIFO, a twin of /dev/null (char 1,3), or a symbolic link to such a twin at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "char-device":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    else:
        device = path.with_name("device")
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        path.symlink_to(device)


# -- put renamed a regular file over a remote device, FIFO or socket ----------------------------


@pytest.mark.parametrize("node", ["char-device", "fifo", "link-to-device"])
def test_an_upload_to_a_device_or_fifo_path_is_refused_not_replaced(
        make_sshd: Callable[..., Any], shared_dir: str, tmp_path: Path, node: str) -> None:
    # attack9a refused get(remote, "/dev/null"); put(local, "/dev/null") with a root login
    # still renamed a regular file over the server's /dev/null (a twin stands in for it).
    source = tmp_path / "source"
    source.write_bytes(b"data\n")
    target = Path(shared_dir, "node")
    _node(target, node)
    before = sorted(os.listdir(shared_dir))
    with pytest.raises(ValueError, match="not a regular file"), \
            SSHExecutor(**make_sshd(user="root").executor_parameters()) as ex:
        ex.put(str(source), str(target))
    mode = target.stat().st_mode
    assert stat.S_ISFIFO(mode) if node == "fifo" else stat.S_ISCHR(mode)
    assert sorted(os.listdir(shared_dir)) == before  # no temporary file left behind


# -- new content kept the set-user-ID bit of the file it replaced -------------------------------


@pytest.mark.parametrize("bits", [0o4755, 0o2755, 0o6775], ids=oct)
def test_an_upload_over_the_users_own_setuid_file_drops_the_bit_as_sftp_does(
        sshd: Any, shared_dir: str, tmp_path: Path, bits: int) -> None:
    # attack9a: "the user's own regular file keeps its bits". A write by anyone but root
    # clears set-user-ID (and set-group-ID of a group-executable file): new content never
    # runs with the old program's privileges. sftp (and cp) leave that; put restored them.
    entry = pwd.getpwnam(sshd.username)
    assert entry.pw_uid != 0
    source = tmp_path / "source"
    source.write_bytes(b"#!/bin/sh\necho new\n")
    source.chmod(0o644)
    modes = {}
    for who in ("sftp", "put"):
        target = Path(shared_dir, who)
        target.write_bytes(b"#!/bin/sh\necho old\n")
        os.chown(target, entry.pw_uid, entry.pw_gid)
        target.chmod(bits)
        if who == "sftp":
            sftp(sshd, f"put {source} {target}")
        else:
            with SSHExecutor(**sshd.executor_parameters()) as ex:
                ex.put(str(source), str(target))
        assert target.read_bytes() == source.read_bytes()
        modes[who] = stat.S_IMODE(target.stat().st_mode)
    assert modes["put"] == modes["sftp"], {k: oct(v) for k, v in modes.items()}


def _as_user(uid: int, gid: int, work: Callable[[], int]) -> int:
    """``work()``'s result (0..255), run in a forked child with ``uid`` and ``gid`` only."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 255
        try:
            signal.alarm(60)  # the child's own bound
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = work()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("bits", [0o4755, 0o2775], ids=oct)
def test_a_download_over_the_users_own_setuid_file_drops_the_bit_as_cp_does(
        sshd: Any, shared_dir: str, bits: int) -> None:
    # The same locally, for a user other than root: cp's in-place write is the reference.
    entry = pwd.getpwnam(sshd.username)
    source = Path(shared_dir, "source")
    source.write_bytes(b"#!/bin/sh\necho new\n")
    source.chmod(0o644)

    def work() -> int:
        os.umask(0o022)
        modes = []
        for who in ("cp", "get"):
            target = Path(shared_dir, who)
            target.write_bytes(b"#!/bin/sh\necho old\n")
            target.chmod(bits)
            if who == "cp":
                subprocess.run(["cp", str(source), str(target)], check=True, timeout=30)
            else:
                ShellExecutor().get(str(source), str(target))
            modes.append(stat.S_IMODE(target.stat().st_mode))
        return 0 if modes[0] == modes[1] else 1

    assert _as_user(entry.pw_uid, entry.pw_gid, work) == 0


# -- known_hosts: a NUL where OpenSSH's C strings end --------------------------------------------

_TRUSTED = "{n} {t} {k}\n"


@pytest.mark.usefixtures("openssh_client")
@pytest.mark.parametrize("text", [
    "{n},\0x {t} {k}\n",  # ssh: the names "{n},", then a key of type "x": the host is unknown
    "{n} {t} {k}\0x\n",  # ssh: the key ends at the NUL and is the server's
    "{n}\0 {t} {k}\n",  # ssh: the NUL ending the names is stepped over like a space
    "\0{n} {t} {k}\n",
    "{n} {t}\0 {k}\n",
    _TRUSTED + "@revoked {n}\0 {t} {k}\n",  # a revocation ssh honours
    _TRUSTED + "@revoked\0 {n} {t} {k}\n",  # and one it reads as no line
])
def test_known_hosts_lines_with_a_nul_are_read_as_ssh_reads_them(
        sshd: Any, tmp_path: Path, text: str) -> None:
    # attack9a made lines split where OpenSSH splits them; a NUL still did not end them
    # where OpenSSH's C strings end: "name,\0x" trusted a key for the host ssh refuses.
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = sshd.host_public_key
    known = tmp_path / "kh"
    known.write_bytes(text.format(n=f"[127.0.0.1]:{sshd.port}", t=key.get_name(),
                                  k=key.get_base64()).encode())
    config = write(tmp_path / "config", block(
        "target", sshd, known,
        "    StrictHostKeyChecking yes\n    PasswordAuthentication no\n    IdentitiesOnly yes\n"))
    status, err = oracle.login(config, "target", str(home))
    try:
        with SSHExecutor(host="target", config=config, connect_retries=0, timeout=10) as ex:
            ex.run_command("true")
        ours = 0
    except HostKeyFailure:
        ours = 255
    assert ours == status, err


# -- a replaced file's group -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["get", "put"])
def test_a_replaced_file_keeps_its_group_as_cp_and_sftp_do(
        sshd: Any, make_sshd: Callable[..., Any], shared_dir: str, kind: str) -> None:
    # A replaced file got the group of the new (temporary) file: root's config file
    # root:<service> 0640 became root:root 0640 after a get or put, and the service could
    # no longer read it. cp and sftp write in place and keep the group.
    server = make_sshd(user="root")
    group = pwd.getpwnam(sshd.username).pw_gid  # a group that is not root's own
    assert group != os.getegid()
    source = Path(shared_dir, "source")
    source.write_bytes(b"setting = 1\n")
    source.chmod(0o644)
    groups = {}
    for who in ("reference", kind):
        target = Path(shared_dir, who)
        target.write_bytes(b"setting = 0\n")
        os.chown(target, 0, group)
        target.chmod(0o640)
        if who == "reference" and kind == "get":
            subprocess.run(["cp", str(source), str(target)], check=True, timeout=30)
        elif who == "reference":
            sftp(server, f"put {source} {target}")
        else:
            with SSHExecutor(**server.executor_parameters()) as ex:
                if kind == "get":
                    ex.get(str(source), str(target))
                else:
                    ex.put(str(source), str(target))
        assert target.read_bytes() == source.read_bytes()
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
        groups[who] = target.stat().st_gid
    assert groups[kind] == groups["reference"] == group
