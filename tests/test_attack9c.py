"""Attack 9c: attack9a's files and trust fixes, attacked again (regression tests).

Each test failed on main before its fix (or is a strict xfail naming what is left).
Only 127.0.0.1 is contacted; every file and node is made by the test in its own directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable

import pytest

from paramiko_executor import ShellExecutor, SSHExecutor


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
@pytest.mark.parametrize("kind", ["ssh", "shell"])
def test_an_upload_to_a_device_or_fifo_path_is_refused_not_replaced(
        make_sshd: Callable[..., Any], shared_dir: str, tmp_path: Path,
        node: str, kind: str) -> None:
    # attack9a refused get(remote, "/dev/null"); put(local, "/dev/null") with a root login
    # still renamed a regular file over the server's /dev/null (a twin stands in for it).
    source = tmp_path / "source"
    source.write_bytes(b"data\n")
    target = Path(shared_dir, "node")
    _node(target, node)
    before = sorted(os.listdir(shared_dir))
    with pytest.raises(ValueError, match="not a regular file"):
        if kind == "ssh":
            with SSHExecutor(**make_sshd(user="root").executor_parameters()) as ex:
                ex.put(str(source), str(target))
        else:
            ShellExecutor().put(str(source), str(target))
    mode = target.stat().st_mode
    assert stat.S_ISFIFO(mode) if node == "fifo" else stat.S_ISCHR(mode)
    assert sorted(os.listdir(shared_dir)) == before  # no temporary file left behind
