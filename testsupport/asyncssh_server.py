"""A private asyncssh server on 127.0.0.1: an SSH implementation beside sshd and Dropbear.

:class:`AsyncSSHServer` runs asyncssh's own ``SSHServer`` on an event loop in
a thread of the test process. It logs in one user with a generated client key
and, when given, a password or keyboard-interactive TOTP codes (one factor
each: asyncssh's server has no partial success). Commands run in a local
shell as the test process's user. Its work directory holds the client key and
a ``known_hosts`` naming its host key.

asyncssh servers since 2.14.1 disconnect a client that asks for the
``ssh-userauth`` service a second time: a client that does (paramiko before
our fix) cannot log in here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from typing import Any, List, Optional, Sequence, Tuple

import asyncssh
import pyotp

from testsupport.private import PrivateServer

__all__ = ["AsyncSSHServer"]

TOTP_PROMPT = "Verification code: "


class _Server(asyncssh.SSHServer):
    """One connection's authentication, from the owning `AsyncSSHServer`'s settings."""

    def __init__(self, owner: AsyncSSHServer) -> None:
        self._owner = owner

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        with self._owner._lock:
            self._owner.connections += 1

    def begin_auth(self, username: str) -> bool:
        return True  # every user must authenticate

    def public_key_auth_supported(self) -> bool:
        return self._owner.allow_key

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return (username == self._owner.username
                and key.public_data == self._owner.client_key.public_data)

    def password_auth_supported(self) -> bool:
        return self._owner.password is not None

    def validate_password(self, username: str, password: str) -> bool:
        return username == self._owner.username and password == self._owner.password

    def kbdint_auth_supported(self) -> bool:
        return self._owner.totp_secret is not None

    def get_kbdint_challenge(self, username: str, lang: str,
                             submethods: str) -> Tuple[str, str, str, List[Tuple[str, bool]]]:
        return "", "", "", [(TOTP_PROMPT, False)]

    def validate_kbdint_response(self, username: str, responses: Sequence[str]) -> bool:
        return username == self._owner.username and self._owner.accept_totp(responses)


class AsyncSSHServer(PrivateServer):
    """asyncssh's SSH server on 127.0.0.1 at a free port; `start`, then `close` (or ``with``).

    :param username: the only user that can log in.
    :param allow_key: accept the generated client key (`client_key_path`).
    :param password: also accept this password.
    :param totp_secret: also accept keyboard-interactive with a TOTP code of
        this base32 secret (prompt `TOTP_PROMPT`); a code is accepted once.
    """

    def __init__(self, *, username: str = "test", allow_key: bool = True,
                 password: Optional[str] = None, totp_secret: Optional[str] = None) -> None:
        self.username = username
        self.allow_key = allow_key
        self.password = password
        self.totp_secret = totp_secret
        self._used_codes: List[str] = []
        self._lock = threading.Lock()
        #: Commands run, and TCP connections accepted, since start.
        self.commands = 0
        self.connections = 0
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._directory = tempfile.mkdtemp(prefix="pe-asyncssh-")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._acceptor: Any = None
        self._port: Optional[int] = None
        self.client_key.write_private_key(self.client_key_path, "openssh")

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the asyncssh server was not started")
        return self._port

    @property
    def client_key_path(self) -> str:
        return os.path.join(self._directory, "id_ed25519")

    @property
    def known_hosts_path(self) -> str:
        return os.path.join(self._directory, "known_hosts")

    @property
    def log_path(self) -> str:
        return os.path.join(self._directory, "log")

    def accept_totp(self, responses: Sequence[str]) -> bool:
        """Whether ``responses`` is one current TOTP code not accepted before."""
        assert self.totp_secret is not None
        if len(responses) != 1:
            return False
        code = responses[0]
        with self._lock:
            if code in self._used_codes or not pyotp.TOTP(self.totp_secret).verify(code):
                return False
            self._used_codes.append(code)
            return True

    async def _serve(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        with self._lock:
            self.commands += 1
        local = await asyncio.create_subprocess_shell(
            process.command or "true", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdin, stdout, stderr = local.stdin, local.stdout, local.stderr
        assert stdin is not None and stdout is not None and stderr is not None

        async def feed() -> None:
            try:
                while True:
                    data = await process.stdin.read(65536)
                    if not data:
                        break
                    stdin.write(data)
                    await stdin.drain()
            except (OSError, asyncssh.Error):
                pass  # the command ended without reading it all
            finally:
                stdin.close()

        async def pump(source: asyncio.StreamReader, sink: asyncssh.SSHWriter[bytes]) -> None:
            while True:
                data = await source.read(65536)
                if not data:
                    return
                sink.write(data)
                await sink.drain()

        # Output is forwarded in full before the exit status: asyncssh's
        # redirect() may let exit() overtake the last of it.
        feeding = asyncio.ensure_future(feed())
        await asyncio.gather(pump(stdout, process.stdout), pump(stderr, process.stderr))
        status = await local.wait()
        feeding.cancel()
        process.exit(status)

    def start(self, timeout: float = 15.0) -> AsyncSSHServer:
        """Listen on a free port of 127.0.0.1; returns once connections are accepted."""
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="asyncssh server",
                                        daemon=True)
        self._thread.start()

        async def listen() -> Any:
            return await asyncssh.create_server(
                lambda: _Server(self), "127.0.0.1", 0, server_host_keys=[self._host_key],
                process_factory=self._serve, encoding=None)

        self._acceptor = asyncio.run_coroutine_threadsafe(listen(), loop).result(timeout)
        self._port = self._acceptor.get_port()
        public = self._host_key.export_public_key("openssh").decode().strip()
        with open(self.known_hosts_path, "w", encoding="ascii") as stream:
            stream.write(f"[127.0.0.1]:{self._port} {public}\n")
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop listening, end every connection and the loop's thread, remove the files."""
        loop, self._loop = self._loop, None
        if loop is not None:
            if self._acceptor is not None:
                acceptor = self._acceptor

                async def stop() -> None:
                    acceptor.close()
                    await acceptor.wait_closed()

                try:
                    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout)
                except (asyncio.TimeoutError, TimeoutError, OSError):
                    pass  # the loop ends below all the same
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout)
            loop.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> AsyncSSHServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AsyncSSHServer 127.0.0.1:{self._port} user={self.username!r}>"
