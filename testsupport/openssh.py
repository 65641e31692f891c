"""A private, real OpenSSH ``sshd`` on 127.0.0.1 for tests and benchmarks.

:class:`OpenSSHServer` runs ``/usr/sbin/sshd`` as a child process with its own
work directory: host key, ``sshd_config``, pid file, log, client keys,
``authorized_keys`` and ``known_hosts``. It never reads or changes the system
sshd or its configuration. Logins go to a dedicated user made with ``useradd``
whose shell profile is empty, so a command costs what sshd costs, not what a
heavy ``.bashrc`` costs.

With ``totp_secret`` the server demands a key and then a TOTP code
(``AuthenticationMethods publickey,keyboard-interactive``) through PAM and
Debian's ``libpam-google-authenticator``. sshd names its PAM service after its
program name, so such a server is started through a uniquely named symlink to
sshd, and its PAM stack is a new, uniquely named file in ``/etc/pam.d`` that is
removed when the server stops. No existing system file is edited.

Running it needs root (``useradd``, sshd's privilege separation, ``/etc/pam.d``).
"""

from __future__ import annotations

import atexit
import base64
import glob
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence

import paramiko

from testsupport.private import PrivateServer

__all__ = ["OpenSSHServer", "OpenSSHServerError", "OpenSSHUnavailable", "close_all"]

SSHD_PATH = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"
PAM_DIR = "/etc/pam.d"
#: Prefix of the PAM service names (and sshd symlinks) of TOTP servers; the
#: creating process's pid follows it, so leftovers of dead processes can be
#: recognised and removed.
PAM_SERVICE_PREFIX = "sshd-pe-"
#: How many ``listen_addresses`` sshd takes besides 127.0.0.1 (its MAX_LISTEN_SOCKS is 16).
MAX_EXTRA_ADDRESSES = 15
#: The prompt pam_google_authenticator sends unless told otherwise.
DEFAULT_TOTP_PROMPT = "Verification code: "

_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}\Z")
_BASE32_RE = re.compile(r"[A-Z2-7]{16,}\Z")
_PAM_MODULE_GLOBS = (
    "/lib/*/security/pam_google_authenticator.so",
    "/usr/lib/*/security/pam_google_authenticator.so",
    "/lib/security/pam_google_authenticator.so",
    "/usr/lib/security/pam_google_authenticator.so",
)
# Servers not yet closed, so that close_all() (and interpreter exit) can end them.
_LIVE: weakref.WeakSet[OpenSSHServer] = weakref.WeakSet()


class OpenSSHServerError(RuntimeError):
    """The private sshd could not be prepared or started; the text says why."""


class OpenSSHUnavailable(OpenSSHServerError):
    """This machine cannot run a private sshd (sshd or the PAM module is missing, not root)."""


class OpenSSHServer(PrivateServer):
    """A private OpenSSH sshd listening on 127.0.0.1 at a free port.

    Nothing runs until :meth:`start` (or ``with``). The constructor only checks
    its arguments. The first :meth:`start` prepares the work directory, the
    login user and the keys and chooses the port; later starts reuse them, so a
    server stopped with :meth:`stop` comes back on the same port with the same
    host key. :meth:`close` stops it and deletes the work directory (unless the
    caller gave one).

    Args:
        max_sessions: sshd's ``MaxSessions``: session channels per connection.
        user: login user; created with ``useradd`` (shell ``/bin/bash``, empty
            ``.bashrc``/``.profile``) when absent, which needs root.
        forced_command: if given, a second client key (:attr:`forced_key_path`)
            is authorized with ``command="<forced_command>"``: whatever the
            client asks for, sshd runs this (``$SSH_ORIGINAL_COMMAND`` holds
            the request).
        totp_secret: base32 TOTP secret. If given, logins need the client key
            AND then the current code, asked through keyboard-interactive with
            :attr:`totp_prompt`. A code is accepted once only (google
            authenticator's ``DISALLOW_REUSE``); codes of the previous and next
            30 s step are accepted too (``WINDOW_SIZE 3``).
        totp_prompt: the keyboard-interactive prompt for the code.
        extra_config: more ``sshd_config`` lines. They come before the defaults
            (sshd keeps the first value of a keyword, so they override them);
            a ``Match`` line and all that follows it go to the end.
        workdir: directory for the server's files, created if missing and kept
            after :meth:`close`; default: a new temporary directory, deleted at
            :meth:`close`.
        sshd_path: the sshd binary.
        start_timeout: seconds :meth:`start` waits for the SSH banner.
        log_level: sshd's ``LogLevel``; the log is :attr:`log_path`.
        listen_addresses: more loopback addresses (127.0.0.2, ...; all of
            127.0.0.0/8 reaches this machine on Linux) to listen on, besides
            127.0.0.1, at the same port: each looks like a host of its own to a
            client (own TCP connections; ``$SSH_CONNECTION`` names the address
            a session reached) and :attr:`known_hosts_path` lists them all. At
            most 15: sshd listens on 16 sockets at most.
        max_startups: the first number of sshd's ``MaxStartups``
            (``N:30:2N``): unauthenticated connections sshd takes at once before
            it starts dropping new ones. Raise it to log in to many addresses
            at once.
    """


    def __init__(
        self,
        *,
        max_sessions: int = 10,
        user: str = "pe-test",
        forced_command: Optional[str] = None,
        totp_secret: Optional[str] = None,
        totp_prompt: str = DEFAULT_TOTP_PROMPT,
        extra_config: Sequence[str] = (),
        workdir: Optional[str] = None,
        sshd_path: str = SSHD_PATH,
        start_timeout: float = 15.0,
        log_level: str = "VERBOSE",
        listen_addresses: Sequence[str] = (),
        max_startups: int = 100,
    ) -> None:
        if not isinstance(max_sessions, int) or isinstance(max_sessions, bool):
            raise TypeError(f"max_sessions must be an int, not {type(max_sessions).__name__}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, not {max_sessions}")
        if not isinstance(user, str) or not _USER_RE.match(user):
            raise ValueError(f"user must be a plain login name, not {user!r}")
        if forced_command is not None:
            _check_line("forced_command", forced_command)
        if totp_secret is not None:
            # The secret itself never goes into an error message.
            if not isinstance(totp_secret, str):
                raise TypeError("totp_secret must be a str")
            if not _BASE32_RE.match(totp_secret):
                raise ValueError("totp_secret must be base32 (A-Z, 2-7), 16 characters or more")
        _check_line("totp_prompt", totp_prompt)
        if "]" in totp_prompt or not totp_prompt.strip():
            raise ValueError("totp_prompt must be non-empty and must not contain ']'")
        if isinstance(extra_config, (str, bytes)):
            raise TypeError("extra_config must be a sequence of lines, not a single string")
        for line in extra_config:
            _check_line("extra_config", line)
        if not isinstance(start_timeout, (int, float)) or start_timeout <= 0:
            raise ValueError("start_timeout must be a positive number of seconds")
        extra_addresses = _loopback_addresses(listen_addresses)
        if isinstance(max_startups, bool) or not isinstance(max_startups, int):
            raise TypeError(f"max_startups must be an int, not {type(max_startups).__name__}")
        if max_startups < 1:
            raise ValueError(f"max_startups must be at least 1, not {max_startups}")

        self.max_sessions = max_sessions
        self.username = user
        self.forced_command = forced_command
        self.totp_secret = totp_secret
        self.totp_prompt = totp_prompt
        self.extra_config = tuple(extra_config)
        self.sshd_path = sshd_path
        self.start_timeout = float(start_timeout)
        self.log_level = log_level
        self.addresses = (self.host,) + extra_addresses
        self.max_startups = max_startups
        self._given_workdir = workdir
        self._workdir: Optional[str] = None
        self._port: Optional[int] = None
        self._host_public_key: Optional[paramiko.PKey] = None
        self._proc: Optional[subprocess.Popen] = None
        self._watchdog: Optional[subprocess.Popen] = None
        self._owner_pid = os.getpid()
        self._pam_service: Optional[str] = None

    # ------------------------------------------------------------------ files

    @property
    def workdir(self) -> str:
        """The directory holding config, keys, pid file and log."""
        return self._require_prepared(self._workdir)

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 (fixed by the first :meth:`start`)."""
        return self._require_prepared(self._port)

    @property
    def config_path(self) -> str:
        """The ``sshd_config`` written for this server."""
        return os.path.join(self.workdir, "sshd_config")

    @property
    def log_path(self) -> str:
        """sshd's log (``-E``), also its stderr."""
        return os.path.join(self.workdir, "sshd.log")

    @property
    def pid_path(self) -> str:
        """sshd's ``PidFile``."""
        return os.path.join(self.workdir, "sshd.pid")

    @property
    def client_key_path(self) -> str:
        """Private ed25519 key (no passphrase) authorized for :attr:`username`."""
        return os.path.join(self.workdir, "client_ed25519")

    @property
    def forced_key_path(self) -> Optional[str]:
        """Private key restricted to :attr:`forced_command`; None without one."""
        if self.forced_command is None:
            return None
        return os.path.join(self.workdir, "forced_ed25519")

    @property
    def known_hosts_path(self) -> str:
        """A known_hosts file holding ``[ADDRESS]:PORT`` with the host key, for each address."""
        return os.path.join(self.workdir, "known_hosts")

    @property
    def host_public_key(self) -> paramiko.PKey:
        """The server's ed25519 host key (public half)."""
        return self._require_prepared(self._host_public_key)

    @property
    def pam_service(self) -> Optional[str]:
        """The PAM service name (file in /etc/pam.d) while a TOTP server runs, else None."""
        return self._pam_service

    @property
    def pid(self) -> Optional[int]:
        """The pid of the listening sshd, or None when it is not running."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        """Whether the listening sshd process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 10.0) -> int:
        """Wait until ``text`` occurs ``count`` times in the log; return how often it occurs.

        sshd writes its log lines asynchronously, often after the client has
        seen the outcome they describe: read them through this, not at once.
        Returns early with the count found (fewer than ``count``) after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.read_log().count(text)
            if found >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.01)

    # ------------------------------------------------------------- lifecycle

    def start(self) -> OpenSSHServer:
        """Start sshd and return once it sends its SSH banner; a no-op if running.

        Raises:
            OpenSSHUnavailable: sshd, root or the PAM module is missing.
            OpenSSHServerError: sshd exited or stayed silent past ``start_timeout``.
        """
        if self.running:
            return self
        _LIVE.add(self)
        first = self._workdir is None
        try:
            if first:
                self._prepare()
            if self.totp_secret is not None:
                self._install_pam_service()
            # A port chosen free can be taken before sshd binds it: choose again
            # (only on the first start: a restart must come back on its port).
            for attempt in range(3 if first else 1):
                if attempt:
                    self._choose_port()
                if self._launch():
                    return self
            raise OpenSSHServerError(
                f"sshd could not bind 127.0.0.1:{self._port}:\n{self._log_tail()}"
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop sshd and every process it started (connections, commands).

        Frozen (SIGSTOPped) processes are continued so they can exit. SIGTERM
        first, SIGKILL for what is still alive after a few seconds. The files
        stay, so :meth:`start` can bring the server back on the same port. The
        PAM service file of a TOTP server is removed.

        In a process forked from the one that started the server, this does
        nothing: the server belongs to the parent.
        """
        if os.getpid() != self._owner_pid:
            return
        try:
            self._end_processes()
        finally:
            self._remove_pam_service()

    def close(self) -> None:
        """Stop the server and delete its work directory unless the caller gave it.

        Like :meth:`stop`, a no-op in a forked child.
        """
        if os.getpid() != self._owner_pid:
            return
        try:
            self.stop()
        finally:
            _LIVE.discard(self)
            if self._workdir is not None and self._given_workdir is None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def __enter__(self) -> OpenSSHServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = f"{self.host}:{self._port}" if self._port else "unprepared"
        return (
            f"<OpenSSHServer {where} user={self.username!r} "
            f"max_sessions={self.max_sessions} totp={self.totp_secret is not None} {state}>"
        )

    # ------------------------------------------------------------- processes

    def serving_pids(self) -> List[int]:
        """Pids of the sshd processes serving authenticated connections, one per connection.

        With privilege separation sshd runs, per connection, a root monitor
        (title ``sshd: USER [priv]``) and, once the user is authenticated, a
        process owned by the user that speaks the SSH protocol (``sshd:
        USER@notty``, or ``sshd: USER`` before the first session). That one is
        returned: SIGKILL on it drops the connection (the monitor exits with
        it); SIGSTOP freezes the server side while TCP stays up. For root
        logins sshd skips the separate process and the monitor itself serves
        (``sshd: root@notty``); that pid is returned then. Connections still
        authenticating are not included.
        """
        if not self.running:
            return []
        table = _process_table()
        sshd_exe = os.path.realpath(self.sshd_path)
        # sshd titles its processes after the name it was started by: the PAM
        # symlink for TOTP servers.
        prefix = f"{self._pam_service or os.path.basename(self.sshd_path)}: "
        candidates = set()
        for pid in _descendants(table, self._proc.pid):
            title = _cmdline(pid)
            if "[" in title or not title.startswith(prefix):
                continue  # monitors, preauth children, user commands
            try:
                if os.path.realpath(f"/proc/{pid}/exe") != sshd_exe:
                    continue  # a user command that calls itself "sshd: ..."
            except OSError:
                continue  # exited meanwhile
            candidates.add(pid)
        # A serving process's child that has not yet exec'd the user's command
        # still looks like sshd: its parent gives it away.
        return sorted(pid for pid in candidates if table[pid][0] not in candidates)

    # ------------------------------------------------------------ internals

    def _require_prepared(self, value: Any) -> Any:
        if value is None:
            raise RuntimeError("the OpenSSHServer has not been started yet")
        return value

    def _prepare(self) -> None:
        if not os.path.exists(self.sshd_path):
            raise OpenSSHUnavailable(f"{self.sshd_path} not found: apt-get install openssh-server")
        if self.totp_secret is not None:
            if os.geteuid() != 0:
                raise OpenSSHUnavailable("a TOTP sshd needs root to add its /etc/pam.d service")
            if not any(glob.glob(pattern) for pattern in _PAM_MODULE_GLOBS):
                raise OpenSSHUnavailable(
                    "pam_google_authenticator.so not found: "
                    "apt-get install libpam-google-authenticator"
                )
        _ensure_user(self.username, pam=self.totp_secret is not None)
        if self._given_workdir is None:
            workdir = tempfile.mkdtemp(prefix="pe-sshd-")
        else:
            workdir = os.path.abspath(self._given_workdir)
            os.makedirs(workdir, exist_ok=True)
        # sshd reads authorized_keys as the login user: it must traverse this.
        os.chmod(workdir, 0o711)
        self._workdir = workdir
        try:
            self._write_keys()
            self._choose_port()
        except BaseException:
            self.close()
            raise

    def _write_keys(self) -> None:
        workdir = self.workdir
        host_key = os.path.join(workdir, "host_ed25519")
        _keygen(host_key, "pe-sshd host key")
        self._host_public_key = _load_public_key(host_key + ".pub")
        keys_dir = os.path.join(workdir, "authorized_keys")
        os.mkdir(keys_dir, 0o755)
        _keygen(self.client_key_path, f"{self.username} client key")
        lines = [_read(self.client_key_path + ".pub").strip()]
        if self.forced_command is not None:
            _keygen(self.forced_key_path, f"{self.username} forced-command key")
            quoted = self.forced_command.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'command="{quoted}" ' + _read(self.forced_key_path + ".pub").strip())
        # AuthorizedKeysFile is <workdir>/authorized_keys/%u: other users get nothing.
        authorized = os.path.join(keys_dir, self.username)
        with open(authorized, "w", encoding="ascii") as file:
            file.write("\n".join(lines) + "\n")
        os.chmod(authorized, 0o644)
        if self.totp_secret is not None:
            totp_dir = os.path.join(workdir, "totp")
            os.mkdir(totp_dir, 0o700)
            # pam_google_authenticator's file format; it rewrites the file to
            # record used codes (DISALLOW_REUSE), so the directory stays private.
            _write_private(
                os.path.join(totp_dir, "google_authenticator"),
                f'{self.totp_secret}\n" TOTP_AUTH\n" DISALLOW_REUSE\n" WINDOW_SIZE 3\n'
                '" STEP_SIZE 30\n',
            )

    def _choose_port(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((self.host, 0))
            self._port = sock.getsockname()[1]
        with open(self.known_hosts_path, "w", encoding="ascii") as file:
            key = self.host_public_key
            for address in self.addresses:
                file.write(f"[{address}]:{self._port} {key.get_name()} {key.get_base64()}\n")
        with open(self.config_path, "w", encoding="utf-8") as file:
            file.write(self._config_text())

    def _config_text(self) -> str:
        workdir = self.workdir
        totp = self.totp_secret is not None
        lines = [
            "# Private sshd of paramiko_executor.testing.OpenSSHServer (not the system sshd).",
            f"Port {self._port}",
            *(f"ListenAddress {address}" for address in self.addresses),
            "AddressFamily inet",
            f"PidFile {self.pid_path}",
            f"HostKey {os.path.join(workdir, 'host_ed25519')}",
            f"AuthorizedKeysFile {os.path.join(workdir, 'authorized_keys', '%u')}",
            f"MaxSessions {self.max_sessions}",
            # Tests open many connections at once; sshd's default 10:30:100
            # would drop some of them at random.
            f"MaxStartups {self.max_startups}:30:{2 * self.max_startups}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "HostbasedAuthentication no",
            f"KbdInteractiveAuthentication {'yes' if totp else 'no'}",
            f"UsePAM {'yes' if totp else 'no'}",
            # The work directory lives under /tmp, which StrictModes rejects.
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PermitUserRC no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "X11Forwarding no",
            "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp",
            f"LogLevel {self.log_level}",
        ]
        if totp:
            lines.append("AuthenticationMethods publickey,keyboard-interactive")
        extra = list(self.extra_config)
        match_at = next(
            (i for i, line in enumerate(extra) if line.split()[:1] in (["Match"], ["match"])),
            len(extra),
        )
        return "\n".join(extra[:match_at] + lines + extra[match_at:]) + "\n"

    def _install_pam_service(self) -> None:
        _remove_stale_pam_services()
        service = f"{PAM_SERVICE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        secret_file = os.path.join(self.workdir, "totp", "google_authenticator")
        prompt = ""
        if self.totp_prompt != DEFAULT_TOTP_PROMPT:
            prompt = f" [authtok_prompt={self.totp_prompt}]"
        # user=root: the module reads and rewrites the secret file as root, so
        # the file lives in the private work directory, owned by root, mode 0600.
        text = (
            f"# paramiko_executor.testing.OpenSSHServer on 127.0.0.1:{self.port}, pid "
            f"{os.getpid()}; removed when that server stops.\n"
            f"auth required pam_google_authenticator.so secret={secret_file} user=root"
            f" noskewadj{prompt}\n"
            "account required pam_permit.so\n"
            "session required pam_permit.so\n"
            "password required pam_deny.so\n"
        )
        path = os.path.join(PAM_DIR, service)
        # O_EXCL: only ever create a new file, never overwrite one.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        self._pam_service = service

    def _remove_pam_service(self) -> None:
        service, self._pam_service = self._pam_service, None
        if service is not None:
            _unlink_quietly(os.path.join(PAM_DIR, service))

    def _launch(self) -> bool:
        """Run sshd; True once it is serving, False if it could not bind its port."""
        _unlink_quietly(self.pid_path)
        if os.geteuid() == 0:
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        argv0 = self.sshd_path
        if self._pam_service is not None:
            # sshd's PAM service name is its program name: start it as the service.
            argv0 = os.path.join(self.workdir, self._pam_service)
            _unlink_quietly(argv0)
            os.symlink(self.sshd_path, argv0)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [argv0, "-D", "-f", self.config_path, "-E", self.log_path],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=True,
            )
        # If this process dies without stop() (killed, or the hang guard's
        # _exit), the watchdog reads EOF on its stdin and ends the listener, so
        # no sshd outlives its tests. Its own session keeps it out of Ctrl-C.
        self._watchdog = subprocess.Popen(
            ["/bin/sh", "-c", 'read -r _ || :; kill -TERM "$0" 2>/dev/null', str(self._proc.pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        # sshd writes its pid file once its socket listens: wait for that, then
        # for the banner, which shows sshd accepts and serves (privsep dir, keys).
        while not self._pid_file_written():
            if self._proc.poll() is not None:
                if "Address already in use" in self._log_tail():
                    self._end_processes()
                    return False
                raise OpenSSHServerError(
                    f"sshd exited with status {self._proc.returncode}:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise OpenSSHServerError(f"sshd did not start listening:\n{self._log_tail()}")
            time.sleep(0.005)
        banner = _read_banner(self.host, self.port, max(0.5, deadline - time.monotonic()))
        if not banner.startswith(b"SSH-2.0-"):
            raise OpenSSHServerError(
                f"127.0.0.1:{self.port} answered {banner[:80]!r}:\n{self._log_tail()}"
            )
        return True

    def _end_processes(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            # First, so it can never signal the listener's pid once reaped and reused.
            watchdog.kill()
            watchdog.wait()
            watchdog.stdin.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate_tree(proc)

    def _pid_file_written(self) -> bool:
        try:
            return _read(self.pid_path).strip() == str(self._proc.pid)
        except OSError:
            return False

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.read_log().splitlines()[-lines:])


def close_all() -> int:
    """Close every OpenSSHServer of this process not closed yet; return how many ran.

    Servers started by a parent process (before a fork) are left alone.
    """
    servers = [server for server in _LIVE if server._owner_pid == os.getpid()]
    running = sum(1 for server in servers if server.running)
    for server in servers:
        server.close()
    return running


atexit.register(close_all)


# ------------------------------------------------------------------ helpers


def _check_line(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"{name} must be a single line")


def _loopback_addresses(addresses: Sequence[str]) -> tuple:
    """``addresses`` checked: distinct IPv4 loopback addresses other than 127.0.0.1."""
    if isinstance(addresses, (str, bytes)):
        raise TypeError("listen_addresses must be a sequence of addresses, not a single string")
    checked: List[str] = []
    for address in addresses:
        if not isinstance(address, str):
            raise TypeError(f"listen_addresses must hold strings, not {type(address).__name__}")
        try:
            parsed = ipaddress.IPv4Address(address)
        except ValueError:
            raise ValueError(f"listen_addresses: {address!r} is not an IPv4 address") from None
        if not parsed.is_loopback:
            raise ValueError(f"listen_addresses: {address} is not in 127.0.0.0/8")
        if str(parsed) == OpenSSHServer.host or str(parsed) in checked:
            raise ValueError(f"listen_addresses: {address} is given twice (127.0.0.1 always is)")
        checked.append(str(parsed))
    if len(checked) > MAX_EXTRA_ADDRESSES:
        raise ValueError(f"listen_addresses: at most {MAX_EXTRA_ADDRESSES} (sshd listens on at "
                         f"most {MAX_EXTRA_ADDRESSES + 1} sockets, 127.0.0.1 included)")
    return tuple(checked)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(text)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _keygen(path: str, comment: str) -> None:
    try:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise OpenSSHUnavailable("ssh-keygen not found: apt-get install openssh-client") from exc
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace")
        raise OpenSSHServerError(f"ssh-keygen failed: {detail}") from exc


def _load_public_key(pub_path: str) -> paramiko.PKey:
    key_type, data = _read(pub_path).split()[:2]
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(data))


def _ensure_user(user: str, *, pam: bool) -> None:
    """Create ``user`` (plain bash, empty profile) if absent; check it can log in."""
    entry = _getpwnam(user)
    if entry is not None:
        if not pam and _password_locked(user):
            raise OpenSSHServerError(
                f"login user {user!r} has a locked password ('!'): sshd without PAM refuses "
                f"even key logins to it; unlock it with: usermod --password '*' {user}"
            )
        return
    if os.geteuid() != 0:
        raise OpenSSHUnavailable(
            f"login user {user!r} does not exist and only root can create it "
            f"(run as root, or: useradd --create-home --shell /bin/bash --password '*' {user})"
        )
    # Password '*' (no password, not locked): without PAM, sshd refuses even key
    # logins to accounts whose password is locked ('!'), useradd's default.
    result = subprocess.run(
        [
            "useradd",
            "--create-home",
            "--shell",
            "/bin/bash",
            "--password",
            "*",
            "--comment",
            "paramiko_executor test user",
            user,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    entry = _getpwnam(user)
    # A failure because a concurrent process created the user meanwhile is fine.
    if entry is None:
        raise OpenSSHServerError(f"useradd {user} failed: {result.stdout.decode(errors='replace')}")
    # An empty profile: a command costs sshd's time, not a .bashrc's.
    for name in (".bashrc", ".profile", ".bash_logout"):
        path = os.path.join(entry.pw_dir, name)
        with open(path, "w", encoding="ascii"):
            pass
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _getpwnam(user: str) -> Optional[pwd.struct_passwd]:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def _password_locked(user: str) -> bool:
    """Whether /etc/shadow marks ``user``'s password locked (False if unreadable)."""
    try:
        with open("/etc/shadow", encoding="utf-8", errors="replace") as shadow:
            for line in shadow:
                name, _, rest = line.partition(":")
                if name == user:
                    return rest.startswith("!")
    except OSError:
        pass
    return False


def _remove_stale_pam_services() -> None:
    """Remove PAM service files that servers of processes now dead left behind."""
    pattern = re.compile(re.escape(PAM_SERVICE_PREFIX) + r"(\d+)-[0-9a-f]+\Z")
    for name in os.listdir(PAM_DIR):
        found = pattern.match(name)
        if found and not _pid_alive(int(found.group(1))):
            _unlink_quietly(os.path.join(PAM_DIR, name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_banner(host: str, port: int, timeout: float) -> bytes:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            data = b""
            while b"\n" not in data and len(data) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
            return data
    except OSError as exc:
        raise OpenSSHServerError(f"no SSH banner from {host}:{port}: {exc}") from exc


def _process_table() -> Dict[int, tuple]:
    """``{pid: (ppid, state)}`` of all processes, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue  # exited meanwhile
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0].decode())
    return table


def _descendants(table: Dict[int, tuple], root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for pid, (ppid, _state) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: List[int] = []
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _terminate_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End sshd's listener ``proc`` and all its descendants, reaping the listener."""
    if proc.poll() is not None:
        return  # reaped: its pid may belong to another process by now
    tree = _freeze_tree(proc.pid)
    for pid in tree:
        _signal(pid, signal.SIGTERM)
        # A stopped process acts on SIGTERM only once continued.
        _signal(pid, signal.SIGCONT)
    deadline = time.monotonic() + grace
    while True:
        alive = [pid for pid in tree if _alive_not_zombie(pid, proc)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    for pid in alive:
        _signal(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:  # cannot happen after SIGKILL, short of a hung kernel
        pass


def _freeze_tree(root: int) -> List[int]:
    """SIGSTOP ``root`` and all its descendants, top down, until no new ones appear.

    Frozen processes cannot fork, so the returned list is the whole tree and
    none of it can escape (be re-parented) before it is signalled.
    """
    frozen: List[int] = [root]
    _signal(root, signal.SIGSTOP)
    for _round in range(20):
        new = [pid for pid in _descendants(_process_table(), root) if pid not in frozen]
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        frozen.extend(new)
    return frozen


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive_not_zombie(pid: int, proc: subprocess.Popen) -> bool:
    if pid == proc.pid:
        return proc.poll() is None
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"
