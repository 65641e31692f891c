"""attack10e: giving up a key exchange after ``clear_to_send_timeout``, on a healthy connection.

A regression test per defect found, against a real OpenSSH sshd reached
through a relay on 127.0.0.1 that slows the server's stream to a slow link's
rate.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from paramiko_executor import SSHExecutor

RATE = 256 * 1024  # bytes a second from the server: a slow link
OUTPUT = 3 * 1024 * 1024


class SlowLink:
    """A TCP relay to ``port`` passing the server's bytes at `RATE`, the client's at once."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(4)
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._sockets: List[socket.socket] = []
        self._spawn(self._accept)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target), timeout=10)
            for sock in (client, server):
                sock.settimeout(0.2)
                self._sockets.append(sock)
            self._spawn(self._pump, client, server, None)
            self._spawn(self._pump, server, client, RATE)

    def _pump(self, source: socket.socket, sink: socket.socket, rate: Any) -> None:
        chunk = 4096 if rate else 65536
        while not self._stop.is_set():
            try:
                data = source.recv(chunk)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                sink.sendall(data)
            except OSError:
                break
            if rate:
                time.sleep(len(data) / rate)
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)
        for sock in self._sockets:
            sock.close()


def _through(server: Any, link: SlowLink, tmp_path: Path) -> Dict[str, Any]:
    """``server``'s executor parameters, connecting through ``link``."""
    known = Path(server.known_hosts_path).read_text()
    hosts = tmp_path / "known_hosts"
    hosts.write_text(known.replace(f"]:{server.port} ", f"]:{link.port} "))
    return server.executor_parameters(port=link.port, known_hosts=str(hosts))


@pytest.mark.hang_timeout(180)
def test_a_key_exchange_slowed_by_a_slow_link_with_data_flowing_keeps_the_connection(
        make_sshd, tmp_path):
    """A key exchange queued behind a slow link's data closed a healthy connection.

    The server answers our KEXINIT after the output it had queued before it:
    on a slow link that can take longer than ``clear_to_send_timeout`` while
    the server's bytes keep arriving all along. Any send held that long (a
    new command's OPEN, a window adjust) closed the connection as if the
    exchange were stalled: the running command was cut off and the new one
    reconnected. A server whose bytes still arrive is not stalled.
    """
    server = make_sshd(max_sessions=4)
    link = SlowLink(server.port)
    try:
        with SSHExecutor(**_through(server, link, tmp_path)) as executor:
            executor.run_command("true", timeout=30)
            with executor.bounded_connection as transport:
                pass
            transport.clear_to_send_timeout = 3.0  # paramiko's 30 s, shortened for the test
            got = threading.Event()
            seen = [0]

            def on_output(stream: str, data: Any) -> None:
                seen[0] += len(data)
                if seen[0] > 256 * 1024:
                    got.set()

            ended: Dict[str, Any] = {}

            def big() -> None:
                try:
                    ended["big"] = executor.run_command(
                        f"head -c {OUTPUT} /dev/zero", on_output=on_output)
                except BaseException as exc:  # noqa: B036 (recorded, judged below)
                    ended["big"] = exc

            thread = threading.Thread(target=big, daemon=True)
            thread.start()
            assert got.wait(30), repr(ended)
            transport._send_kex_init()  # a rekey, as paramiko starts one after 1 GB
            small = executor.run_command("echo small", timeout=120)
            thread.join(120)
            assert not thread.is_alive()
            assert small.stdout == "small\n"
            result = ended["big"]
            assert not isinstance(result, BaseException), repr(result)
            assert seen[0] == OUTPUT
            assert transport.is_active()
            assert executor.statistics().connects == 1
    finally:
        link.close()
