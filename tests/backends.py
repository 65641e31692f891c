"""Real TCP servers on 127.0.0.1 for the tunnel tests: the services behind the login node."""

from __future__ import annotations

import hashlib
import socket
import threading
from typing import List, Set

#: How much a backend reads or writes at a time.
BLOCK = 1024 * 1024


class Backend:
    """A real TCP server on 127.0.0.1: the "database" behind the login node.

    ``mode`` per server: ``"echo"`` sends back what it reads; ``"digest"``
    reads to EOF, then answers the SHA-256 and length of what it read (a
    reply that can only come after the client's EOF); ``"flood"`` sends
    without end until the peer goes away.
    """

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._socks: Set[socket.socket] = set()
        self._threads: List[threading.Thread] = []
        self.accepted = 0
        self.sent = 0  # by the flood
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._socks.add(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            if self.mode == "echo":
                while True:
                    data = sock.recv(BLOCK)
                    if not data:
                        break
                    sock.sendall(data)
            elif self.mode == "digest":
                digest, size = hashlib.sha256(), 0
                while True:
                    data = sock.recv(BLOCK)
                    if not data:
                        break
                    digest.update(data)
                    size += len(data)
                sock.sendall(f"{digest.hexdigest()} {size}\n".encode())
            else:
                block = b"x" * BLOCK
                while True:
                    sock.sendall(block)
                    with self._lock:
                        self.sent += len(block)
        except OSError:
            pass
        finally:
            with self._lock:
                self._socks.discard(sock)
            sock.close()

    @property
    def connected(self) -> int:
        """Connections open right now."""
        with self._lock:
            return len(self._socks)

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accepting.join(10)
        for thread in self._threads:
            thread.join(10)
