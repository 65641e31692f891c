"""Short connections through one forward_local tunnel: connections per second, and threads.

One command::

    python benchmarks/tunnel_connects.py [--count 300] [--repeat 3]

It starts a private OpenSSH sshd on 127.0.0.1 (``OpenSSHServer``; needs root
and /usr/sbin/sshd) and an echo server beside it, forwards a local port to the
echo server, and opens ``--count`` connections one after the other, each
sending 4 bytes and reading them back. It prints, per round, the connections
per second and how many threads this library started per connection (counted
by name; the echo server's are not). Rounds on a shared machine vary: compare
within one run.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from typing import Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paramiko_executor import SSHExecutor  # noqa: E402
from testsupport.openssh import OpenSSHServer  # noqa: E402

_started = 0
_start = threading.Thread.start


def _counting_start(self: threading.Thread) -> None:
    global _started
    if self.name.startswith("paramiko_executor"):
        _started += 1
    _start(self)


def echo_server() -> Tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(sock: socket.socket) -> None:
        with sock:
            while data := sock.recv(4096):
                sock.sendall(data)

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    threading.Thread.start = _counting_start  # type: ignore[method-assign]
    server = OpenSSHServer().start()
    listener, port = echo_server()
    try:
        with SSHExecutor(**server.executor_parameters()) as ex, \
                ex.forward_local(port, "127.0.0.1") as tunnel:
            for round_ in range(args.repeat + 1):
                before, began = _started, time.monotonic()
                for _ in range(args.count):
                    with socket.create_connection(tunnel.local_address, timeout=30) as client:
                        client.sendall(b"ping")
                        assert client.recv(16) == b"ping"
                took = time.monotonic() - began
                if round_:  # the first is a warm-up
                    print(f"{args.count / took:7.1f} connections/s, "
                          f"{(_started - before) / args.count:.2f} threads started per connection")
    finally:
        listener.close()
        server.stop()


if __name__ == "__main__":
    main()
