"""Real TCP servers on 127.0.0.1 for the tunnel tests: the services behind the login node."""

from __future__ import annotations

import hashlib
import socket
import threading
from typing import List, Set

#: How much a backend reads or writes at a time.
BLOCK = 1024 * 1024


class TCPServer:
    """A TCP server on 127.0.0.1 that runs `serve` for each connection in a thread of its own.

    `close` wakes the accept with a shutdown (a close would not, and the
    descriptor's number could be reused meanwhile), shuts down the connections
    still open (unless `CUT` is false: `serve` then ends by itself), and waits
    for every thread, bounded.
    """

    #: Seconds `close` waits for each connection's thread.
    JOIN = 10.0
    #: Whether `close` cuts the connections still open.
    CUT = True

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._socks: Set[socket.socket] = set()
        self._threads: List[threading.Thread] = []
        self.accepted = 0
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def serve(self, sock: socket.socket) -> None:
        """Talk to one client; the socket is closed afterwards."""
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._socks.add(sock)
            thread = threading.Thread(target=self._run, args=(sock,), daemon=True,
                                      name=self.thread_name)
            self._threads.append(thread)
            thread.start()

    #: The name of each connection's thread (tests count threads by name).
    thread_name = "tcp-server"

    def _run(self, sock: socket.socket) -> None:
        try:
            self.serve(sock)
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
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._accepting.join(10)
        self._listener.close()
        with self._lock:
            socks = list(self._socks) if self.CUT else []
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(self.JOIN)
        assert not any(thread.is_alive() for thread in self._threads)


class Backend(TCPServer):
    """A real TCP server on 127.0.0.1: the "database" behind the login node.

    ``mode`` per server: ``"echo"`` sends back what it reads; ``"digest"``
    reads to EOF, then answers the SHA-256 and length of what it read (a
    reply that can only come after the client's EOF); ``"flood"`` sends
    without end until the peer goes away.
    """

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.sent = 0  # by the flood
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
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
