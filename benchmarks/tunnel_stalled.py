"""Clients of a forward_local tunnel: this process's CPU while they sit idle or stop reading.

One command::

    python benchmarks/tunnel_stalled.py [--clients 200] [--seconds 20]

It starts a private OpenSSH sshd on 127.0.0.1 (``OpenSSHServer``; needs root
and /usr/sbin/sshd) and a TCP server beside it, forwards a local port to that
server and connects ``--clients`` clients through the tunnel. Two phases,
each measured over ``--seconds`` once every client is forwarded:

- ``idle``: nothing is sent either way.
- ``stalled``: the server sends each client 4 MiB and the clients read
  nothing, so every pipe's thread waits to write to a full local socket
  (it looks whether the tunnel was closed every ``pipe.WRITE_POLL``).

It prints the CPU percent of one core this process used (user and system).
Needs about 4 MiB per client in the stalled phase, and two descriptors per
client. On a shared machine, compare runs of two checkouts side by side.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import threading
import time
from typing import List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paramiko_executor import SSHExecutor  # noqa: E402
from testsupport.openssh import OpenSSHServer  # noqa: E402

#: What the server sends each client in the stalled phase: past the socket buffers.
FLOOD = 4 << 20


class Target:
    """Accepts clients; in the stalled phase, sends each ``FLOOD`` bytes (no one reads them)."""

    def __init__(self, flood: bool) -> None:
        self._flood = flood
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port: int = self.listener.getsockname()[1]
        self._held: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self._held.append(sock)
            if self._flood:
                threading.Thread(target=self._send, args=(sock,), daemon=True).start()

    @staticmethod
    def _send(sock: socket.socket) -> None:
        try:
            sock.sendall(b"x" * FLOOD)
        except OSError:
            pass  # closed at the end of the phase

    def close(self) -> None:
        self.listener.close()
        for sock in self._held:
            sock.close()


def phase(server: OpenSSHServer, clients: int, seconds: float, flood: bool) -> float:
    """The CPU percent of one core this process used with ``clients`` forwarded clients."""
    target = Target(flood)
    try:
        with SSHExecutor(**server.executor_parameters(), max_forwarded=clients + 10) as ex, \
                ex.forward_local(target.port, "127.0.0.1") as tunnel:
            socks = [socket.create_connection(tunnel.local_address, timeout=30)
                     for _ in range(clients)]
            try:
                until = time.monotonic() + 120
                while tunnel.connections < clients and time.monotonic() < until:
                    time.sleep(0.1)
                time.sleep(3)  # the floods reach the full sockets
                before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
                time.sleep(seconds)
                after, ended = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            finally:
                for sock in socks:
                    sock.close()
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return 100 * cpu / (ended - started)
    finally:
        target.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    with OpenSSHServer(max_sessions=10) as server:
        for name, flood in (("idle", False), ("stalled", True)):
            percent = phase(server, args.clients, args.seconds, flood)
            print(f"{name:8} {args.clients} clients: {percent:5.1f} % of one core", flush=True)
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
