"""A local SSH server for tests, built on paramiko's server side.

`SSHTestServer` listens on 127.0.0.1 and runs every ``exec`` request for real,
as ``/bin/sh -c COMMAND`` in a subprocess whose stdin, stdout, stderr and exit
status travel over the channel. It behaves like OpenSSH's sshd where tests
depend on it:

- ``MaxSessions``: at most ``max_sessions`` session channels are open at once
  on one connection; a channel open past that is refused with
  ``OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED``. A slot is freed once the
  channel is closed on both sides.
- Output is relayed in chunks as it arrives; the server sends the exit status,
  then EOF, then closes the channel, once the command has exited and both of
  its output pipes are drained. A command killed by a signal gets an
  ``exit-signal`` message instead of an exit status, as sshd sends.
- A ``signal`` channel request (RFC 4254 6.9) signals the command's process
  group, as sshd does.
- Authentication: public keys, a password, keyboard-interactive prompts
  answered with TOTP codes (verified with pyotp, each code accepted at most
  once) and a configurable sequence of steps with partial success, like
  sshd's ``AuthenticationMethods``. A separate key can be restricted to one
  forced command, like ``command=`` in ``authorized_keys``.

Port forwarding, as with sshd's ``AllowTcpForwarding yes``: a
``direct-tcpip`` channel connects to its target from the server (a target
that refuses is ``OPEN_CONNECT_FAILED``), and a ``tcpip-forward`` request
listens on 127.0.0.1 and opens a ``forwarded-tcpip`` channel per connection.
Forwarded channels take no MaxSessions slot. `SSHTestServer.allow_forwarding`
set to False (also while running) refuses both, like ``AllowTcpForwarding no``.

It also injects faults: `SSHTestServer.drop_connections` closes every live
TCP connection at once, `SSHTestServer.freeze` stops all traffic without
closing anything until `SSHTestServer.thaw`, and
`SSHTestServer.refuse_connections` closes the listening socket so that new
connections are refused until `SSHTestServer.accept_connections`.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import paramiko
import pyotp
from paramiko.channel import Channel
from paramiko.common import (
    AUTH_FAILED,
    AUTH_PARTIALLY_SUCCESSFUL,
    AUTH_SUCCESSFUL,
    MSG_CHANNEL_REQUEST,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_CONNECT_FAILED,
    OPEN_FAILED_UNKNOWN_CHANNEL_TYPE,
    OPEN_SUCCEEDED,
    cMSG_CHANNEL_FAILURE,
    cMSG_CHANNEL_REQUEST,
    cMSG_CHANNEL_SUCCESS,
)
from paramiko.message import Message
from paramiko.pkey import PublicBlob
from paramiko.server import InteractiveQuery

from paramiko_executor.internals import send_when_clear, wrap_handlers
from paramiko_executor.pipe import Pipe

__all__ = ["SSHTestServer"]

_log = logging.getLogger(__name__)
#: paramiko's log records of the server side of each connection.
_transport_log = logging.getLogger(f"{__name__}.transport")
# A client that just closes its socket is routine here, yet paramiko logs the
# reset at ERROR: without logging configured, Python would print each such
# record to stderr (in the middle of the demo's output, say). Records still
# reach whatever handlers the application configures.
_transport_log.addHandler(logging.NullHandler())

#: The only address the server listens on.
HOST = "127.0.0.1"
#: Largest read from a command's output pipe, and from a channel into its stdin.
_CHUNK = 64 * 1024
_AUTH_METHODS = ("publickey", "password", "keyboard-interactive")
#: How long connecting to a direct-tcpip channel's target may take.
_CONNECT_TIMEOUT = 5.0

AuthorizedKey = Union[paramiko.PKey, str, "os.PathLike[str]"]


class SSHTestServer:
    """A local SSH server on 127.0.0.1 for tests, demos and users' own test suites.

    All parameters are keyword-only and optional: ``SSHTestServer()`` accepts
    the generated client key (`client_key_path`) for user ``"test"`` and
    allows 10 sessions per connection. Use it as a context manager, or call
    `start` and `stop`; ``SSHExecutor(**server.executor_parameters())``
    connects to it.

    :param port: TCP port on 127.0.0.1; 0 picks a free one.
    :param username: the only user that can log in.
    :param max_sessions: session channels allowed open at once per connection
        (sshd's ``MaxSessions``); None means unlimited.
    :param password: enables password authentication with this password.
    :param authorized_keys: the public keys accepted for the user, as
        `paramiko.PKey` objects or paths of files in ``authorized_keys``
        format (without options). By default the generated client key is
        accepted; when keys are given, only those are (the generated key
        remains available as an unauthorized key).
    :param forced_command: generates a second client key (`forced_key_path`)
        whose logins run this command instead of any requested one, with the
        requested command in the environment variable
        ``SSH_ORIGINAL_COMMAND``, like ``command=`` in ``authorized_keys``.
        A shell request on such a login runs the forced command too.
    :param totp_secret: base32 TOTP secret(s) for keyboard-interactive
        authentication: one secret for every prompt of `totp_prompts`, or a
        sequence with one secret per prompt.
    :param totp_prompts: the keyboard-interactive prompts answered with a TOTP
        code, asked one per round in this order. A code accepted once for a
        secret is refused afterwards (like google-authenticator's
        ``DISALLOW_REUSE``), also within one login.
    :param password_prompt: makes keyboard-interactive ask this prompt for the
        password before the TOTP prompts (requires `password`).
    :param auth_methods: the authentication steps that must succeed in this
        order, each ``"publickey"``, ``"password"`` or
        ``"keyboard-interactive"``; every step but the last answers with
        partial success. By default one step that accepts a public key or,
        when `password` is set, the password (also through
        keyboard-interactive when `password_prompt` is set), followed by a
        keyboard-interactive step when `totp_secret` is set.
    :param host_key: the server's host key; by default a new ECDSA key.
    :param allow_forwarding: serve ``direct-tcpip`` channels and
        ``tcpip-forward`` requests (sshd's ``AllowTcpForwarding``); the
        attribute of the same name may be changed at any time and applies to
        the channels and requests that follow.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        username: str = "test",
        max_sessions: Optional[int] = 10,
        password: Optional[str] = None,
        authorized_keys: Optional[Iterable[AuthorizedKey]] = None,
        forced_command: Optional[str] = None,
        totp_secret: Union[str, Sequence[str], None] = None,
        totp_prompts: Sequence[str] = ("Verification code: ",),
        password_prompt: Optional[str] = None,
        auth_methods: Optional[Sequence[str]] = None,
        host_key: Optional[paramiko.PKey] = None,
        allow_forwarding: bool = True,
    ) -> None:
        _check_int("port", port, 0, 65535)
        _check_text("username", username)
        if max_sessions is not None:
            _check_int("max_sessions", max_sessions, 0, None)
        for name, text in (
            ("password", password),
            ("forced_command", forced_command),
            ("password_prompt", password_prompt),
        ):
            if text is not None:
                _check_text(name, text)
        if password_prompt is not None and password is None:
            raise ValueError("password_prompt needs password to be set")
        if host_key is not None and not isinstance(host_key, paramiko.PKey):
            raise TypeError(f"host_key must be a paramiko.PKey, got {type(host_key).__name__}")

        if not isinstance(allow_forwarding, bool):
            raise TypeError("allow_forwarding must be True or False, "
                            f"not {type(allow_forwarding).__name__}")
        self.allow_forwarding = allow_forwarding
        self.username = username
        self.max_sessions = max_sessions
        self.forced_command = forced_command
        self._requested_port = port
        self._password = password
        self.host_key: paramiko.PKey = host_key or paramiko.ECDSAKey.generate()
        self.client_key: paramiko.PKey = paramiko.ECDSAKey.generate()
        self.forced_key: Optional[paramiko.PKey] = (
            paramiko.ECDSAKey.generate() if forced_command is not None else None
        )
        if authorized_keys is None:
            self._authorized: Set[bytes] = {self.client_key.asbytes()}
        else:
            self._authorized = _load_authorized_keys(authorized_keys)

        prompts = _text_sequence("totp_prompts", totp_prompts)
        self._totp_secrets = _totp_secrets(totp_secret, len(prompts))
        self._totp_prompts = prompts if self._totp_secrets else ()
        # Each keyboard-interactive prompt with the check of its answer.
        self._kbd_prompts: Tuple[Tuple[str, Callable[[str], bool]], ...] = tuple(
            (prompt, partial(self._accept_totp, secret))
            for prompt, secret in zip(self._totp_prompts, self._totp_secrets)
        )
        if password_prompt is not None:
            self._kbd_prompts = ((password_prompt, self._check_password),) + self._kbd_prompts
        self._auth_steps = self._resolve_auth_steps(auth_methods)

        self._lock = threading.Lock()
        self._thawed = threading.Event()
        self._thawed.set()
        self._state = "new"
        self._listener: Optional[_Listener] = None
        self._port: Optional[int] = None
        self._directory: Optional[Path] = None
        self._connections: Set[_Connection] = set()
        self._session_threads: Set[threading.Thread] = set()
        self._used_totp: Dict[str, Set[int]] = {}
        self._connections_accepted = 0
        self._channels_opened = 0
        self._channels_refused = 0
        self._open_channels = 0
        self._peak_channels = 0
        self._commands: List[str] = []
        self._logins = 0
        self._totp_accepted = 0

    def _resolve_auth_steps(
        self, auth_methods: Optional[Sequence[str]]
    ) -> Tuple[frozenset[str], ...]:
        """Turn `auth_methods` (or the default) into the steps a login must pass, in order."""
        if auth_methods is None:
            first = {"publickey"} | ({"password"} if self._password is not None else set())
            if self._totp_secrets:
                return (frozenset(first), frozenset({"keyboard-interactive"}))
            if self._kbd_prompts:  # password_prompt alone: another way to give the password
                first.add("keyboard-interactive")
            return (frozenset(first),)
        names = _text_sequence("auth_methods", auth_methods)
        for name in names:
            if name not in _AUTH_METHODS:
                raise ValueError(
                    f"auth_methods: unknown method {name!r}, use one of {_AUTH_METHODS}"
                )
        if "password" in names and self._password is None:
            raise ValueError("auth_methods has a 'password' step but no password is set")
        if "keyboard-interactive" in names and not self._kbd_prompts:
            raise ValueError(
                "auth_methods has a 'keyboard-interactive' step but neither totp_secret"
                " nor password_prompt is set"
            )
        if self._kbd_prompts and "keyboard-interactive" not in names:
            raise ValueError(
                "totp_secret or password_prompt is set but auth_methods has no"
                " 'keyboard-interactive' step"
            )
        return tuple(frozenset({name}) for name in names)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> SSHTestServer:
        """Bind 127.0.0.1, write the key and known_hosts files, start accepting; returns self.

        A server starts once; after `stop` make a new one.
        """
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"SSHTestServer cannot start: it is {self._state}")
            self._state = "running"
            self._owner_pid = os.getpid()
        directory = Path(tempfile.mkdtemp(prefix="paramiko-executor-test-server-"))
        try:
            listener = _Listener(self._requested_port, self._accept)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            with self._lock:
                self._state = "stopped"
            raise
        self._directory = directory
        self._port = listener.port
        self.client_key.write_private_key_file(str(self.client_key_path))
        if self.forced_key is not None:
            self.forced_key.write_private_key_file(str(directory / "forced_key"))
        host = HOST if self._port == 22 else f"[{HOST}]:{self._port}"
        self.known_hosts_path.write_text(
            f"{host} {self.host_key.get_name()} {self.host_key.get_base64()}\n"
        )
        with self._lock:
            self._listener = listener
        _log.debug("SSH test server listening on %s:%d", HOST, self._port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop at once: stop listening, drop every connection, kill running commands.

        Waits at most about `timeout` seconds for the server's threads, then
        removes the temporary directory with the key and known_hosts files.
        Calling it again, or on a server never started, does nothing; so does
        calling it in a forked child, whose sockets are the parent's too.
        """
        with self._lock:
            if self._state == "running" and self._owner_pid != os.getpid():
                return
            if self._state != "running":
                self._state = "stopped"
                return
            self._state = "stopped"
            listener, self._listener = self._listener, None
        deadline = time.monotonic() + timeout
        if listener is not None:
            listener.close(timeout)
        connections = self._drop_connections()
        with self._lock:
            # A thread is registered just before it starts.
            threads = [t for t in self._session_threads if t.ident is not None]
        for thread in [c.transport for c in connections] + threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
        _log.debug("SSH test server on port %s stopped", self._port)

    def __enter__(self) -> SSHTestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{HOST}:{self._port}" if self._port is not None else "unbound"
        return f"<SSHTestServer {where} user={self.username!r} {self._state}>"

    # -- connection details ------------------------------------------------

    @property
    def host(self) -> str:
        """The address the server listens on: always ``"127.0.0.1"``."""
        return HOST

    @property
    def port(self) -> int:
        """The TCP port; known once started."""
        if self._port is None:
            raise RuntimeError("SSHTestServer is not started")
        return self._port

    @property
    def directory(self) -> Path:
        """The server's temporary directory (removed by `stop`)."""
        if self._directory is None:
            raise RuntimeError("SSHTestServer is not started")
        return self._directory

    @property
    def client_key_path(self) -> str:
        """Path of the generated client private key.

        It is authorized unless `authorized_keys` is given.
        """
        return str(self.directory / "client_key")

    @property
    def forced_key_path(self) -> Optional[str]:
        """Path of the private key restricted to `forced_command`, or None without one."""
        return None if self.forced_key is None else str(self.directory / "forced_key")

    @property
    def known_hosts_path(self) -> Path:
        """Path of a known_hosts file with the host key for ``[127.0.0.1]:PORT``."""
        return self.directory / "known_hosts"

    def executor_parameters(self, **overrides: Any) -> Dict[str, Any]:
        """Keyword arguments for ``SSHExecutor`` that connect to this server.

        ``host``, ``port``, ``username``, ``client_keys=[client_key_path]``,
        ``known_hosts`` and ``config=()`` (no ssh_config files), updated with
        `overrides` (for example ``client_keys=[server.forced_key_path]``).
        """
        parameters: Dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "username": self.username,
            "client_keys": [self.client_key_path],
            "known_hosts": str(self.known_hosts_path),
            "config": (),
        }
        parameters.update(overrides)
        return parameters

    def mfa_config(self) -> List[Dict[str, str]]:
        """The executor's ``mfa_config`` answering this server's TOTP prompts.

        The result holds the TOTP secrets: keep it out of logs.
        """
        return [
            {"prompt": prompt, "totp": secret}
            for prompt, secret in zip(self._totp_prompts, self._totp_secrets)
        ]

    # -- fault injection ---------------------------------------------------

    def drop_connections(self) -> None:
        """Close every live connection at once (TCP closed); their commands are killed."""
        self._drop_connections()

    def _drop_connections(self) -> List[_Connection]:
        """`drop_connections`, returning the dropped connections for `stop` to wait on."""
        with self._lock:
            connections = list(self._connections)
        # Shut every socket down before the slower transport teardown, so all
        # clients see their connection end at the same moment.
        for connection in connections:
            connection.shutdown_socket()
        for connection in connections:
            connection.transport.close()
        return connections

    def freeze(self) -> None:
        """Stop answering: no byte is read from or written to any connection until `thaw`.

        TCP connections stay open and new ones are still accepted by the
        kernel, but the server sends nothing, not even its SSH banner.
        Commands keep running until their output pipes fill.
        """
        self._thawed.clear()

    def thaw(self) -> None:
        """Resume the traffic that `freeze` held; nothing is lost."""
        self._thawed.set()

    @property
    def frozen(self) -> bool:
        """True between `freeze` and `thaw`."""
        return not self._thawed.is_set()

    def refuse_connections(self) -> None:
        """Close the listening socket: new connections are refused; live ones carry on."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close(10.0)

    def accept_connections(self) -> None:
        """Listen again on the same port after `refuse_connections`."""
        with self._lock:
            if self._state != "running":
                raise RuntimeError("SSHTestServer is not running")
            if self._listener is not None:
                return
            self._listener = _Listener(self.port, self._accept)

    # -- counters ----------------------------------------------------------

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since start."""
        with self._lock:
            return self._connections_accepted

    @property
    def active_connections(self) -> int:
        """Connections whose transport is still running."""
        with self._lock:
            return len(self._connections)

    @property
    def channels_opened(self) -> int:
        """Session channels opened since start."""
        with self._lock:
            return self._channels_opened

    @property
    def channels_refused(self) -> int:
        """Channel opens refused since start (MaxSessions, or not a session channel)."""
        with self._lock:
            return self._channels_refused

    @property
    def open_channels(self) -> int:
        """Session channels open now, over all connections."""
        with self._lock:
            return self._open_channels

    @property
    def peak_channels(self) -> int:
        """The most session channels ever open at once on one connection."""
        with self._lock:
            return self._peak_channels

    @property
    def commands(self) -> List[str]:
        """Every command requested by ``exec``, in arrival order (a copy)."""
        with self._lock:
            return list(self._commands)

    @property
    def logins(self) -> int:
        """Completed authentications (every step passed)."""
        with self._lock:
            return self._logins

    @property
    def totp_accepted(self) -> int:
        """TOTP codes accepted."""
        with self._lock:
            return self._totp_accepted

    # -- internals used by the connections ---------------------------------

    def _accept(self, sock: socket.socket) -> None:
        """Serve one accepted TCP connection (called in the listener's thread)."""
        # Without TCP_NODELAY small replies wait for the peer's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(self, sock)
        with self._lock:
            self._connections_accepted += 1
            self._connections.add(connection)
        connection.start()

    def _connection_ended(self, connection: _Connection, open_channels: int) -> None:
        with self._lock:
            self._connections.discard(connection)
            self._open_channels -= open_channels

    def _channel_opened(self, open_on_connection: int) -> None:
        with self._lock:
            self._channels_opened += 1
            self._open_channels += 1
            self._peak_channels = max(self._peak_channels, open_on_connection)

    def _channel_refused(self) -> None:
        with self._lock:
            self._channels_refused += 1

    def _channel_closed(self) -> None:
        with self._lock:
            self._open_channels -= 1

    def _login_completed(self) -> None:
        with self._lock:
            self._logins += 1

    def _session_started(self, command: Optional[str], thread: threading.Thread) -> None:
        with self._lock:
            if command is not None:
                self._commands.append(command)
            # Forget finished threads here so the set stays as small as the
            # number of commands running at once (ident None: starting now).
            self._session_threads = {
                t for t in self._session_threads if t.ident is None or t.is_alive()
            }
            self._session_threads.add(thread)

    def _is_authorized(self, key: paramiko.PKey) -> bool:
        return key.asbytes() in self._authorized

    def _is_forced(self, key: paramiko.PKey) -> bool:
        return self.forced_key is not None and key.asbytes() == self.forced_key.asbytes()

    def _check_password(self, password: Union[str, bytes]) -> bool:
        if self._password is None:
            return False
        if isinstance(password, str):
            password = password.encode("utf-8")
        return hmac.compare_digest(password, self._password.encode("utf-8"))

    def _accept_totp(self, secret: str, code: str) -> bool:
        """Accept `code` for `secret` if it is the code of the current, previous or next
        30 s step (clock skew and step boundaries) and was never accepted before."""
        totp = pyotp.TOTP(secret)
        now = int(time.time()) // totp.interval
        answer = code.encode("utf-8")
        with self._lock:
            used = self._used_totp.setdefault(secret, set())
            for step in (now - 1, now, now + 1):
                if hmac.compare_digest(totp.generate_otp(step).encode("ascii"), answer):
                    if step in used:
                        return False
                    used.difference_update({s for s in used if s < now - 1})
                    used.add(step)
                    self._totp_accepted += 1
                    return True
        return False


class _Listener:
    """The listening socket on 127.0.0.1 and its accept thread.

    The thread blocks in ``select`` on the socket and a wake-up socket, so it
    never polls and `close` ends it at once.
    """

    def __init__(self, port: int, on_accept: Callable[[socket.socket], None]) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR lets accept_connections() bind the same port again
            # while old connections linger in TIME_WAIT.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((HOST, port))
            self._sock.listen(128)
        except BaseException:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]
        self._on_accept = on_accept
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread = threading.Thread(
            target=self._run, name=f"SSHTestServer-accept-{self.port}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._wake_reader in ready:
                    return
                try:
                    sock, _ = self._sock.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    continue  # the client gave up between select and accept
                except OSError:
                    _log.exception("SSH test server: accept failed, no longer listening")
                    return
                try:
                    self._on_accept(sock)
                except Exception:
                    sock.close()
                    _log.exception("SSH test server: could not serve a new connection")

    def close(self, timeout: float) -> None:
        """Stop accepting and close the socket: later connects are refused."""
        self._wake_writer.send(b"\0")
        self._thread.join(timeout)
        self._sock.close()
        self._wake_reader.close()
        self._wake_writer.close()


def _close_later(listener: _Listener) -> None:
    """Close ``listener`` from a thread of its own: the transport thread must not wait for it."""
    threading.Thread(target=listener.close, args=(10.0,), daemon=True,
                     name=f"SSHTestServer-unlisten-{listener.port}").start()


class _GatedSocket:
    """An accepted TCP socket as its paramiko Transport sees it: traffic passes only
    while the server is thawed.

    `SSHTestServer.freeze` must stop the server answering while TCP stays up.
    Holding ``recv`` and ``send`` here, right under paramiko's packetizer,
    stops every byte in both directions for all connections at once, without
    the relay threads and copies of a proxy in front of each connection.
    paramiko already treats ``socket.timeout`` from ``recv``/``send`` as
    "nothing yet" and retries after checking whether it should stop, so a
    frozen socket raises exactly that after waiting one socket timeout.
    Everything else is delegated to the real socket.
    """

    def __init__(self, sock: socket.socket, thawed: threading.Event) -> None:
        self._sock = sock
        self._thawed = thawed
        self._timeout: Optional[float] = None

    def settimeout(self, timeout: Optional[float]) -> None:
        self._timeout = timeout
        self._sock.settimeout(timeout)

    def _pass(self) -> None:
        if not self._thawed.wait(self._timeout):
            if self._sock.fileno() == -1:
                raise OSError(errno.EBADF, "socket is closed")
            raise socket.timeout("SSH test server is frozen")

    def recv(self, size: int) -> bytes:
        self._pass()
        return self._sock.recv(size)

    def send(self, data: bytes) -> int:
        self._pass()
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        # paramiko also uses close(), getpeername() and the private _closed.
        return getattr(self._sock, name)


def _channel_request_handler(on_request: Callable[[Channel, Message], None]
                             ) -> Callable[[Channel, Message], None]:
    """paramiko's channel-request handler, extended with ``signal`` and with
    starting commands only after their ``exec`` reply.

    paramiko's own handler answers every request it does not know, ``signal``
    included, with failure and never tells the ServerInterface;
    `_ServerTransport` wraps it with this (through `internals.wrap_handlers`).
    """

    def handle(channel: Channel, m: Message) -> None:
        # An open channel's transport is a _ServerTransport, its server object a _Connection.
        connection: _Connection = channel.transport.server_object  # type: ignore[union-attr, assignment]
        start = m.packet.tell()
        if m.get_text() == "signal":
            want_reply = m.get_boolean()
            ok = connection.signal_session(channel, m.get_text())
            if want_reply:
                reply = Message()
                reply.add_byte(cMSG_CHANNEL_SUCCESS if ok else cMSG_CHANNEL_FAILURE)
                reply.add_int(channel.remote_chanid)
                send_when_clear(channel.transport, reply)  # type: ignore[arg-type]
            return
        m.packet.seek(start)
        on_request(channel, m)
        # The reply to exec/shell has been sent by now: a fast command's output,
        # exit status or close must never overtake it (a client waiting for the
        # reply would see a closed channel instead of a started command).
        connection.start_session(channel)

    return handle


class _ServerTransport(paramiko.Transport):
    """paramiko's server-mode Transport with the hooks the test server needs.

    - ``signal`` requests reach the server (see `_handle_channel_request`);
    - the connection learns when a channel is fully closed (to free its
      MaxSessions slot and kill its command) and when the transport ends;
    - opened channels go to the connection instead of the queue for
      `Transport.accept`, which the server never calls (that queue would
      grow by one channel per command). paramiko keeps channels only by weak
      reference, so the connection holds them until they are closed.
    """

    server_object: _Connection  # set by start_server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        wrap_handlers(self, {MSG_CHANNEL_REQUEST: _channel_request_handler}, {})

    def _unlink_channel(self, chanid: int) -> None:
        # Called once the client's CLOSE has been handled (both sides closed),
        # or when the transport dies with the channel still open.
        super()._unlink_channel(chanid)  # type: ignore[misc]
        self.server_object.channel_closed(chanid)

    def _queue_incoming_channel(self, channel: Channel) -> None:
        self.server_object.channel_opened(channel)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.server_object.connection_lost()


class _Connection(paramiko.ServerInterface):
    """One client connection: its authentication progress and its session channels.

    paramiko calls the ``check_*`` methods in the transport thread, so they
    never block: commands run in threads of their own.
    """

    def __init__(self, server: SSHTestServer, sock: socket.socket) -> None:
        self._server = server
        self._socket = _GatedSocket(sock, server._thawed)
        self._lock = threading.Lock()
        self._step = 0  # index of the authentication step in progress
        self._prompt: Optional[int] = None  # keyboard-interactive prompt awaiting its answer
        self._forced = False
        self._open_channels: Set[int] = set()
        self._held_channels: Dict[int, Channel] = {}  # strong references, see _ServerTransport
        self._sessions: Dict[int, _Session] = {}
        # Sessions waiting for their exec reply to go out, with the requested command.
        self._unstarted: Dict[int, Tuple[_Session, Optional[str]]] = {}
        # direct-tcpip channels whose target is connected, waiting to be opened.
        self._targets: Dict[int, socket.socket] = {}
        self._pipes: Set[Pipe] = set()
        self._forwards: Dict[int, _Listener] = {}  # tcpip-forward listeners, by port
        self.transport = _ServerTransport(self._socket)
        self.transport.set_log_channel(_transport_log.name)
        self.transport.add_server_key(server.host_key)

    def start(self) -> None:
        # With an event start_server returns at once; negotiation runs in the transport thread.
        self.transport.start_server(event=threading.Event(), server=self)

    def shutdown_socket(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    # -- authentication ----------------------------------------------------

    def get_allowed_auths(self, username: str) -> str:
        steps = self._server._auth_steps
        return ",".join(sorted(steps[min(self._step, len(steps) - 1)]))

    def _allows(self, username: str, method: str) -> bool:
        steps = self._server._auth_steps
        return (
            username == self._server.username
            and self._step < len(steps)
            and method in steps[self._step]
        )

    def _step_result(self) -> int:
        last = self._step + 1 == len(self._server._auth_steps)
        return AUTH_SUCCESSFUL if last else AUTH_PARTIALLY_SUCCESSFUL

    def _complete_step(self) -> None:
        self._step += 1
        if self._step == len(self._server._auth_steps):
            self._server._login_completed()

    def check_auth_password(self, username: str, password: Union[str, bytes]) -> int:
        if not self._allows(username, "password") or not self._server._check_password(password):
            return AUTH_FAILED
        result = self._step_result()
        self._complete_step()
        return result

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        forced = self._server._is_forced(key)
        if not self._allows(username, "publickey") or not (
            forced or self._server._is_authorized(key)
        ):
            return AUTH_FAILED
        # paramiko asks this both for a bare query (to answer PK_OK) and
        # before checking a signature, and verifies the signature only after
        # we answer. The step therefore completes, and the forced-command
        # restriction applies, only when paramiko's verification of this
        # very key object succeeds.
        step = self._step
        verify = key.verify_ssh_sig

        def verify_and_complete(data: bytes, msg: Message) -> bool:
            verified = bool(verify(data, msg))
            if verified and self._step == step:
                self._forced = forced
                self._complete_step()
            return verified

        key.verify_ssh_sig = verify_and_complete  # type: ignore[method-assign]
        return self._step_result()

    def check_auth_interactive(self, username: str, submethods: str) -> Any:
        if not self._allows(username, "keyboard-interactive"):
            return AUTH_FAILED
        self._prompt = 0
        return self._query()

    def _query(self) -> InteractiveQuery:
        assert self._prompt is not None
        text, _ = self._server._kbd_prompts[self._prompt]
        return InteractiveQuery("", "", (text, False))

    def check_auth_interactive_response(self, responses: List[str]) -> Any:
        index, self._prompt = self._prompt, None
        if index is None or len(responses) != 1:
            return AUTH_FAILED
        _, check = self._server._kbd_prompts[index]
        if not check(responses[0]):
            return AUTH_FAILED
        if index + 1 < len(self._server._kbd_prompts):
            self._prompt = index + 1
            return self._query()
        result = self._step_result()
        self._complete_step()
        return result

    # -- channels ----------------------------------------------------------

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session":
            self._server._channel_refused()
            return OPEN_FAILED_UNKNOWN_CHANNEL_TYPE
        limit = self._server.max_sessions
        with self._lock:
            if limit is not None and len(self._open_channels) >= limit:
                refused = True
            else:
                refused = False
                self._open_channels.add(chanid)
                open_now = len(self._open_channels)
        if refused:
            _log.debug("SSH test server: refusing channel %d at MaxSessions %s", chanid, limit)
            self._server._channel_refused()
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        self._server._channel_opened(open_now)
        return OPEN_SUCCEEDED

    def channel_opened(self, channel: Channel) -> None:
        with self._lock:
            target = self._targets.pop(channel.get_id(), None)
            if target is None:
                self._held_channels[channel.get_id()] = channel
        if target is not None:
            self._relay(target, channel, "direct-tcpip")

    # -- port forwarding ---------------------------------------------------

    def check_channel_direct_tcpip_request(self, chanid: int, origin: Tuple[str, int],
                                           destination: Tuple[str, int]) -> int:
        if not self._server.allow_forwarding:
            self._server._channel_refused()
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        try:
            # In the transport thread, as sshd connects before it confirms;
            # the tests' targets are local, so this is quick.
            target = socket.create_connection(destination, timeout=_CONNECT_TIMEOUT)
        except OSError:
            self._server._channel_refused()
            return OPEN_FAILED_CONNECT_FAILED
        target.settimeout(None)
        with self._lock:
            self._targets[chanid] = target
        return OPEN_SUCCEEDED

    def check_port_forward_request(self, address: str, port: int) -> Union[int, bool]:
        if not self._server.allow_forwarding:
            return False
        try:
            listener = _Listener(port, partial(self._forwarded, address))
        except OSError:
            return False
        with self._lock:
            self._forwards[listener.port] = listener
        return listener.port

    def cancel_port_forward_request(self, address: str, port: int) -> None:
        with self._lock:
            listener = self._forwards.pop(port, None)
        if listener is not None:
            _close_later(listener)

    def _forwarded(self, address: str, sock: socket.socket) -> None:
        # The listener's thread: the channel open waits for the client, elsewhere.
        port = sock.getsockname()[1]
        origin = sock.getpeername()[:2]

        def open_and_relay() -> None:
            try:
                channel = self.transport.open_forwarded_tcpip_channel(origin, (address, port))
            except (paramiko.SSHException, OSError, EOFError):
                sock.close()
                return
            self._relay(sock, channel, "forwarded-tcpip")

        threading.Thread(target=open_and_relay, daemon=True,
                         name=f"SSHTestServer-forward-{port}").start()

    def _relay(self, sock: socket.socket, channel: Channel, kind: str) -> None:
        pipe = Pipe(sock, channel, f"SSHTestServer {kind}", done=self._relayed)
        with self._lock:
            self._pipes.add(pipe)
        threading.Thread(target=pipe.run, daemon=True, name=f"SSHTestServer-{kind}").start()

    def _relayed(self, pipe: Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)

    def check_channel_exec_request(self, channel: Channel, command: bytes) -> bool:
        return self._prepare_session(channel, command.decode("utf-8", "surrogateescape"))

    def check_channel_shell_request(self, channel: Channel) -> bool:
        # Like sshd, a command-restricted key runs its command for a shell
        # request too; other shell requests are refused.
        return self._forced and self._prepare_session(channel, None)

    def _prepare_session(self, channel: Channel, requested: Optional[str]) -> bool:
        """Create the command for `channel`; `start_session` starts it after the reply."""
        env = dict(os.environ)
        if self._forced:
            assert self._server.forced_command is not None
            command = self._server.forced_command
            if requested is not None:
                env["SSH_ORIGINAL_COMMAND"] = requested
        elif requested is not None:
            command = requested
        else:
            return False
        chanid = channel.get_id()
        with self._lock:
            if chanid in self._sessions or chanid not in self._open_channels:
                return False  # one command per channel
            session = _Session(channel, command, env)
            self._sessions[chanid] = session
            self._unstarted[chanid] = (session, requested)
        return True

    def start_session(self, channel: Channel) -> None:
        with self._lock:
            unstarted = self._unstarted.pop(channel.get_id(), None)
        if unstarted is not None:
            session, requested = unstarted
            # Recorded first, so the command is listed before its output can arrive.
            self._server._session_started(requested, session.thread)
            session.thread.start()

    def signal_session(self, channel: Channel, name: str) -> bool:
        signum = signal.Signals.__members__.get("SIG" + name)
        with self._lock:
            session = self._sessions.get(channel.get_id())
        return signum is not None and session is not None and session.signal(signum)

    def channel_closed(self, chanid: int) -> None:
        with self._lock:
            if chanid not in self._open_channels:
                return
            self._open_channels.discard(chanid)
            self._held_channels.pop(chanid, None)
            session = self._sessions.pop(chanid, None)
            self._unstarted.pop(chanid, None)
        self._server._channel_closed()
        if session is not None:
            session.terminate()

    def connection_lost(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            self._unstarted.clear()
            still_open = len(self._open_channels)
            self._open_channels.clear()
            self._held_channels.clear()
            targets = list(self._targets.values())
            self._targets.clear()
            pipes = list(self._pipes)
            forwards = list(self._forwards.values())
            self._forwards.clear()
        for session in sessions:
            session.terminate()
        for sock in targets:
            sock.close()
        for pipe in pipes:
            pipe.abort()
        for listener in forwards:
            _close_later(listener)
        self._server._connection_ended(self, still_open)


class _Session:
    """One command on one channel: ``/bin/sh -c COMMAND`` with its pipes relayed.

    The command runs in a new session (its own process group), so a
    ``signal`` request or the end of the channel reaches everything it
    started, as with sshd.
    """

    def __init__(self, channel: Channel, command: str, env: Dict[str, str]) -> None:
        self._channel = channel
        self._command = command
        self._env = env
        self._lock = threading.Lock()
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._ended = False  # the channel is gone: the command must not run on
        self._pending_signals: List[int] = []  # signals that arrived before the process
        self.thread = threading.Thread(
            target=self._run, name=f"SSHTestServer-session-{channel.get_id()}", daemon=True
        )

    def signal(self, signum: int) -> bool:
        """Send `signum` to the command's process group; False once the channel is gone."""
        with self._lock:
            if self._ended:
                return False
            if self._process is None:
                self._pending_signals.append(signum)
                return True
            process = self._process
        _signal_group(process, signum)
        return True

    def terminate(self) -> None:
        """The channel is closed or the connection lost: kill the command if it still runs."""
        with self._lock:
            self._ended = True
            process = self._process
        if process is not None:
            _signal_group(process, signal.SIGKILL)

    def _run(self) -> None:
        try:
            process = subprocess.Popen(
                ["/bin/sh", "-c", self._command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                start_new_session=True,
            )
        except OSError as error:
            _log.warning("SSH test server: cannot run /bin/sh: %s", error)
            self._finish(127)
            return
        with self._lock:
            self._process = process
            signals = [signal.SIGKILL] if self._ended else self._pending_signals
        for signum in signals:
            _signal_group(process, signum)
        assert process.stdin and process.stdout and process.stderr
        stdin_relay = threading.Thread(
            target=self._relay_stdin, args=(process.stdin,), name=f"{self.thread.name}-stdin",
            daemon=True,
        )
        stdin_relay.start()
        self._relay_output(process.stdout, process.stderr)
        self._finish(process.wait())
        process.stdout.close()
        process.stderr.close()
        # The channel is closed now, so the relay's recv() returns; a write to
        # a pipe still held by a background child ends when stop() kills the group.
        stdin_relay.join()

    def _relay_stdin(self, stdin: IO[bytes]) -> None:
        """Copy channel data into the command's stdin; close it at the client's EOF."""
        writable = True
        try:
            while True:
                try:
                    data = self._channel.recv(_CHUNK)
                except (EOFError, OSError, paramiko.SSHException):
                    return  # the connection ended while acknowledging the data
                if not data:
                    return  # EOF or channel closed
                if writable:
                    try:
                        _write_all(stdin.fileno(), data)
                    except OSError:
                        # The command stopped reading. Like sshd, keep consuming
                        # the channel so the client's window never stalls.
                        writable = False
        finally:
            stdin.close()

    def _relay_output(self, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        """Relay both output pipes until both reach EOF.

        One thread suffices: stdout and extended data share one channel
        window, so waiting for window space on one stream never starves the
        other. Reading whole chunks rather than lines keeps huge outputs fast.
        """
        senders = {
            stdout.fileno(): self._channel.sendall,
            stderr.fileno(): self._channel.sendall_stderr,
        }
        relaying = True
        with selectors.DefaultSelector() as selector:
            for fd in senders:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                for key, _ in selector.select():
                    data = os.read(key.fd, _CHUNK)
                    if not data:
                        selector.unregister(key.fd)
                    elif relaying:
                        try:
                            senders[key.fd](data)
                        except (OSError, EOFError):
                            # The channel or the connection is gone (the
                            # command is being killed): drain the pipes
                            # without sending.
                            relaying = False

    def _finish(self, returncode: int) -> None:
        """Send the exit status (or exit-signal), then EOF, then close the channel."""
        channel = self._channel
        if channel.closed:
            return
        try:
            if returncode >= 0:
                channel.send_exit_status(returncode)
            else:
                _send_exit_signal(channel, -returncode)
            channel.shutdown_write()
            channel.close()
        except (OSError, EOFError):
            pass  # the connection died meanwhile: nobody is left to tell


def _send_exit_signal(channel: Channel, signum: int) -> None:
    """Send RFC 4254 6.10 ``exit-signal``, which sshd sends instead of an exit
    status for a command killed by a signal; paramiko has no method for it."""
    try:
        name = signal.Signals(signum).name[len("SIG"):]
    except ValueError:
        name = str(signum)
    m = Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(channel.remote_chanid)
    m.add_string("exit-signal")
    m.add_boolean(False)
    m.add_string(name)
    m.add_boolean(False)  # core dumped: subprocess does not tell
    m.add_string("")  # error message
    m.add_string("")  # language tag
    send_when_clear(channel.transport, m)  # type: ignore[arg-type]


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.returncode is not None:
        return  # reaped: its process group id may belong to someone else by now
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass  # the whole group has exited


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _check_int(name: str, value: object, minimum: int, maximum: Optional[int]) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def _check_text(name: str, value: object) -> None:
    """A non-empty str; the message never shows the value (it may be a password)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")


def _text_sequence(name: str, value: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of str, got {type(value).__name__}")
    items = tuple(value)
    if not items or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{name} must hold at least one str, and only str")
    return items


def _totp_secrets(secret: Union[str, Sequence[str], None], prompts: int) -> Tuple[str, ...]:
    """One validated secret per TOTP prompt, or () without TOTP. Error texts never show a secret."""
    if secret is None:
        return ()
    if isinstance(secret, str):
        secrets: Tuple[str, ...] = (secret,) * prompts
    elif isinstance(secret, Sequence) and all(isinstance(s, str) for s in secret):
        secrets = tuple(secret)
        if len(secrets) != prompts:
            raise ValueError(
                f"totp_secret holds {len(secrets)} secrets for {prompts} totp_prompts"
            )
    else:
        raise TypeError("totp_secret must be None, a str or a sequence of str")
    for s in secrets:
        try:
            pyotp.TOTP(s).now()
        except Exception:
            raise ValueError("totp_secret is not a valid base32 TOTP secret") from None
    return secrets


def _load_authorized_keys(keys: Iterable[AuthorizedKey]) -> Set[bytes]:
    """The public key blobs of `keys`: PKey objects or authorized_keys-format files."""
    if isinstance(keys, (str, bytes, os.PathLike, paramiko.PKey)):
        raise TypeError("authorized_keys must be an iterable of keys or paths, not a single one")
    blobs: Set[bytes] = set()
    for key in keys:
        if isinstance(key, paramiko.PKey):
            blobs.add(key.asbytes())
        elif isinstance(key, (str, os.PathLike)):
            for line in Path(key).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    try:
                        blobs.add(PublicBlob.from_string(line).key_blob)
                    except ValueError as error:
                        raise ValueError(f"authorized_keys: {key}: {error}") from None
        else:
            raise TypeError(
                f"authorized_keys items must be paramiko.PKey or paths, got {type(key).__name__}"
            )
    return blobs
