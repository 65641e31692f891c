"""Raw paramiko, done by hand: the honest do-it-yourself baseline.

One ``paramiko.Transport`` on a socket with TCP_NODELAY, host key checked
against the known_hosts file, public-key authentication, a
``threading.BoundedSemaphore(10)`` around each command, and per command what
``SSHClient.exec_command`` does: open a session channel, exec, send stdin,
read stdout then stderr to their ends, wait for the exit status, close.
"""

import socket
import threading
from typing import Any, Dict, List, Optional

import paramiko

MAX_SESSIONS = 10
READ_SIZE = 1024 * 1024


class Contender:
    is_async = False

    def __init__(self, params: Dict[str, Any]) -> None:
        self.host = params["host"]
        self.port = params["port"]
        self.username = params["username"]
        self.key = paramiko.PKey.from_path(params["client_keys"][0])
        self.host_keys = paramiko.HostKeys(params["known_hosts"])
        self.lock = threading.Lock()
        self.bound = threading.BoundedSemaphore(MAX_SESSIONS)
        self.transport: Optional[paramiko.Transport] = None

    def _connect(self) -> paramiko.Transport:
        sock = socket.create_connection((self.host, self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        transport.start_client(timeout=10)
        key = transport.get_remote_server_key()
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        if not self.host_keys.check(name, key):
            transport.close()
            raise paramiko.BadHostKeyException(name, key, key)
        transport.auth_publickey(self.username, self.key)
        return transport

    def _transport(self) -> paramiko.Transport:
        with self.lock:
            if self.transport is None or not self.transport.is_active():
                self.transport = self._connect()
            return self.transport

    def run(self, command: str, stdin_input: Optional[str]) -> str:
        transport = self._transport()
        with self.bound:
            channel = transport.open_session()
            try:
                channel.exec_command(command)
                if stdin_input is not None:
                    channel.sendall(stdin_input.encode())
                channel.shutdown_write()
                stdout = _read_all(channel.recv)
                stderr = _read_all(channel.recv_stderr)
                status = channel.recv_exit_status()
            finally:
                channel.close()
        if status != 0:
            raise RuntimeError(f"{command!r} exited {status}: {stderr!r}")
        return stdout.decode("utf-8", "replace")

    def connect_probe(self) -> None:
        """Connect, authenticate, open sessions until the server refuses one, close."""
        transport = self._connect()
        channels: List[paramiko.Channel] = []
        try:
            for _ in range(64):
                channels.append(transport.open_session())
        except paramiko.ChannelException:
            pass
        finally:
            for channel in channels:
                channel.close()
            transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _read_all(recv: Any) -> bytes:
    chunks = []
    while True:
        chunk = recv(READ_SIZE)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
