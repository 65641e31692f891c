"""The CPU time of a process and everything it starts, read from a cgroup of its own.

Summing the listener's ``utime``/``stime`` and the children's ``cutime``/``cstime``
(``/proc/PID/stat``) misses whatever a descendant leaves unreaped. OpenSSH's
sshd (9.2 measured) is such a case: after an SSH_MSG_DISCONNECT its monitor
exits without waiting for the connection's unprivileged child, so init reaps
that child and its CPU (key exchange, login, serving: about 5 ms per
connection here) never reaches the listener's counters; after a bare
end-of-file the monitor waits for it. A cgroup counts every descendant, reaped
by whomever, while it runs and after.
"""

from __future__ import annotations

import os
from typing import Optional

_ROOTS = ("/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup")


def seconds_in(usage_file: str) -> float:
    """The CPU seconds a cgroup's ``cpuacct.usage`` (v1) or ``cpu.stat`` (v2) holds."""
    with open(usage_file, encoding="ascii") as usage:
        if usage_file.endswith("cpuacct.usage"):
            return int(usage.read()) / 1e9
        for line in usage:
            name, value = line.split()
            if name == "usage_usec":
                return int(value) / 1e6
    raise OSError(f"no usage_usec in {usage_file}")


class CgroupCpu:
    """A fresh cgroup holding ``pid`` (and so all it starts from then on); `seconds` of CPU.

    Needs root and a cgroup v1 ``cpuacct`` or a cgroup v2 hierarchy.
    :meth:`close` moves whatever is left back to the parent cgroup and removes
    the group.
    """

    def __init__(self, pid: int) -> None:
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"pid must be a positive int, not {pid!r}")
        self.path: Optional[str] = None
        for root in _ROOTS:
            v1 = os.path.exists(os.path.join(root, "cpuacct.usage"))
            if not v1 and not os.path.exists(os.path.join(root, "cgroup.controllers")):
                continue
            path = os.path.join(root, f"pe-bench-sshd-{os.getpid()}-{pid}")
            try:
                os.mkdir(path)
                self._write(path, pid)
            except OSError:
                self._remove(path)
                continue
            self.path, self._v1, self._parent = path, v1, root
            return
        raise OSError("no cgroup to measure sshd's CPU in (needs root and cgroup cpuacct or v2)")

    @property
    def usage_file(self) -> str:
        """The file `seconds_in` reads: another process can read the group's CPU from it."""
        if self.path is None:
            raise ValueError("closed")
        return os.path.join(self.path, "cpuacct.usage" if self._v1 else "cpu.stat")

    def seconds(self) -> float:
        """CPU time (user + system) of every process that was in the group, so far."""
        return seconds_in(self.usage_file)

    def close(self) -> None:
        path, self.path = self.path, None
        if path is None:
            return
        try:
            with open(os.path.join(path, "cgroup.procs"), encoding="ascii") as procs:
                pids = [int(line) for line in procs if line.strip()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                self._write(self._parent, pid)
            except OSError:
                pass  # it ended meanwhile
        self._remove(path)

    def __enter__(self) -> CgroupCpu:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _write(path: str, pid: int) -> None:
        with open(os.path.join(path, "cgroup.procs"), "w", encoding="ascii") as procs:
            procs.write(str(pid))

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.rmdir(path)
        except OSError:
            pass  # never made, or a process is still in it: the kernel keeps it
