"""A private Dropbear SSH server on 127.0.0.1 for tests.

`DropbearServer` runs ``/usr/sbin/dropbear`` in the foreground with its own
ed25519 host key, pid file and log in a temporary directory, at a free port.
Logins go to the user an `OpenSSHServer` created, with that server's client
key: Dropbear reads ``~user/.ssh/authorized_keys``, so the key is written there
(owned by the user, mode 0600, in a 0700 ``.ssh``) for as long as the server
runs: its line is added, and taken away again at `close`, under a lock, so
servers of test runs sharing the user keep each other's keys.

Needs root and the ``dropbear-bin`` package.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Iterator, Optional

from testsupport.private import PrivateServer

DROPBEAR_PATH = "/usr/sbin/dropbear"
DROPBEARKEY_PATH = "/usr/bin/dropbearkey"
AUTHORIZED_LOCK_PATH = "/run/pe-test-dropbear.lock"


@contextlib.contextmanager
def _authorized_lock() -> Iterator[None]:
    with open(AUTHORIZED_LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class DropbearUnavailable(RuntimeError):
    """Dropbear (or root) is missing here."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DropbearServer(PrivateServer):
    """Dropbear on 127.0.0.1, logging in ``username`` with the public key in ``public_key_path``."""


    def __init__(self, *, username: str, client_key_path: str, start_timeout: float = 15.0):
        for path in (DROPBEAR_PATH, DROPBEARKEY_PATH):
            if not os.path.exists(path):
                raise DropbearUnavailable(f"{path} not found: apt-get install dropbear-bin")
        if os.geteuid() != 0:
            raise DropbearUnavailable("a Dropbear server logging in another user needs root")
        self.username = username
        self.client_key_path = client_key_path
        self.start_timeout = start_timeout
        self.workdir = tempfile.mkdtemp(prefix="pe-dropbear-")
        self.port = 0
        self._proc: Optional[subprocess.Popen] = None
        self._authorized_path: Optional[str] = None
        self._authorized_line = b""

    @property
    def known_hosts_path(self) -> str:
        return os.path.join(self.workdir, "known_hosts")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "dropbear.log")

    def start(self) -> DropbearServer:
        try:
            self._install_authorized_key()
            host_key = os.path.join(self.workdir, "host_ed25519")
            subprocess.run([DROPBEARKEY_PATH, "-t", "ed25519", "-f", host_key], check=True,
                           stdin=subprocess.DEVNULL, capture_output=True)
            public = subprocess.run([DROPBEARKEY_PATH, "-y", "-f", host_key], check=True,
                                    stdin=subprocess.DEVNULL, capture_output=True).stdout
            line = next(x for x in public.decode().splitlines() if x.startswith("ssh-ed25519 "))
            kind, blob = line.split()[:2]
            for _attempt in range(3):
                self.port = _free_port()
                with open(self.known_hosts_path, "w", encoding="ascii") as file:
                    file.write(f"[{self.host}]:{self.port} {kind} {blob}\n")
                with open(self.log_path, "ab") as log:
                    # -F foreground, -E log to stderr, -s no passwords, -m no motd,
                    # -w no root logins, -j/-k no forwarding.
                    self._proc = subprocess.Popen(
                        [DROPBEAR_PATH, "-F", "-E", "-s", "-m", "-w", "-j", "-k",
                         "-r", host_key, "-P", os.path.join(self.workdir, "dropbear.pid"),
                         "-p", f"{self.host}:{self.port}"],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                        start_new_session=True,
                    )
                if self._wait_for_banner():
                    return self
                self._stop_process()
            raise RuntimeError(f"dropbear did not start:\n{self.read_log()[-2000:]}")
        except BaseException:
            self.close()
            raise

    def _wait_for_banner(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _install_authorized_key(self) -> None:
        entry = pwd.getpwnam(self.username)
        ssh_dir = os.path.join(entry.pw_dir, ".ssh")
        with open(self.client_key_path + ".pub", "rb") as file:
            line = file.read().strip() + b"\n"
        # Several test runs (or servers) may share the user: each adds its own line and
        # takes only that line away, under one lock, so none logs out another's key.
        with _authorized_lock():
            if not os.path.isdir(ssh_dir):
                os.mkdir(ssh_dir, 0o700)
                os.chown(ssh_dir, entry.pw_uid, entry.pw_gid)
            path = os.path.join(ssh_dir, "authorized_keys")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "r+b") as file:
                size = file.seek(0, os.SEEK_END)
                if size:
                    file.seek(size - 1)
                    if file.read(1) != b"\n":
                        file.write(b"\n")
                file.write(line)
            os.chown(path, entry.pw_uid, entry.pw_gid)
            os.chmod(path, 0o600)
        self._authorized_path = path
        self._authorized_line = line

    def _restore_authorized_key(self) -> None:
        path, self._authorized_path = self._authorized_path, None
        if path is None:
            return
        with _authorized_lock():
            try:
                with open(path, "rb") as file:
                    lines = file.read().splitlines(keepends=True)
            except FileNotFoundError:
                return
            if self._authorized_line in lines:
                lines.remove(self._authorized_line)
            with open(path, "wb") as file:
                file.writelines(lines)

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        # Its own session: the listener and every connection's process with it.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def close(self) -> None:
        try:
            self._stop_process()
        finally:
            self._restore_authorized_key()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DropbearServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
