"""A userspace TCP relay that adds a one-way delay each way and caps bandwidth: a WAN on loopback.

    python benchmarks/relay.py --delay-ms 25 --mbit 100 --map 127.0.0.2:22=127.0.0.1:2222

Each ``--map LISTEN=UPSTREAM`` listens on LISTEN and forwards every connection
to UPSTREAM. Bytes read from one side reach the other ``--delay-ms`` later,
after queueing behind the bytes before them on a link of ``--mbit`` Mbit/s
(per connection and direction). The TCP handshake is emulated too: the
upstream connection is made 1.5 round trips after the client's connect (the
client's connect returns at once, so everything it sends is held until then,
and what the server sends first, its banner, reaches the client 2 round trips
after the connect, as over a real path).

Before it serves, the relay measures what it adds: a ping-pong through a
mapping of its own to an echo server, printed as one JSON line on stdout
(``{"ready": true, "rtt_ms": ..., "first_reply_ms": ...}``). It runs until its
stdin closes (the parent ended) or it gets SIGTERM/SIGINT.

``--trace`` prints, per connection and as it happens, every read with its
time since the connect in ms and in round trips and, until a direction's
NEWKEYS, the SSH message types it held; afterwards, with an AES-GCM cipher
(whose packet lengths are not encrypted), the sizes of the encrypted
packets. That shows each request and reply of a connect and login.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import struct
import sys
import time
from typing import Dict, List, Optional, Tuple

#: SSH message numbers seen in the clear, by name (RFC 4250).
MESSAGE_NAMES: Dict[int, str] = {
    1: "DISCONNECT", 2: "IGNORE", 3: "UNIMPLEMENTED", 4: "DEBUG", 5: "SERVICE_REQUEST",
    6: "SERVICE_ACCEPT", 7: "EXT_INFO", 20: "KEXINIT", 21: "NEWKEYS", 30: "KEX_ECDH_INIT",
    31: "KEX_ECDH_REPLY", 32: "KEX_32", 33: "KEX_33", 34: "KEX_34",
}
GCM_TAG = 16
READ_SIZE = 64 * 1024
#: How many pings the self-measurement sends (after one unmeasured warm-up).
PINGS = 5

#: What one direction of a connection holds: (when to deliver, bytes; b"" is the end).
Chunks = asyncio.Queue[Tuple[float, bytes]]


class _Direction:
    """What one direction of a traced connection has carried: its parse state."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.buffer = b""
        self.banner_done = False
        self.encrypted = False
        self.kexinit: Optional[List[List[str]]] = None

    def feed(self, data: bytes, gcm: bool) -> List[str]:
        """The message names (or encrypted packet sizes) that ``data`` completes."""
        self.buffer += data
        found: List[str] = []
        if not self.banner_done:
            end = self.buffer.find(b"\n")
            if end < 0:
                return found
            found.append(self.buffer[:end].decode("ascii", "replace").strip())
            self.buffer = self.buffer[end + 1:]
            self.banner_done = True
        while len(self.buffer) >= 5:
            (length,) = struct.unpack(">I", self.buffer[:4])
            if self.encrypted:
                if not gcm:
                    found.append(f"enc {len(self.buffer)}B")
                    self.buffer = b""
                    return found
                size = 4 + length + GCM_TAG
                if len(self.buffer) < size:
                    break
                found.append(f"enc{length}")
                self.buffer = self.buffer[size:]
                continue
            size = 4 + length
            if len(self.buffer) < size:
                break
            payload = self.buffer[5:size - self.buffer[4]]
            self.buffer = self.buffer[size:]
            kind = payload[0] if payload else -1
            found.append(MESSAGE_NAMES.get(kind, f"MSG{kind}"))
            if kind == 20:
                self.kexinit = _name_lists(payload[17:], 10)
            if kind == 21:
                self.encrypted = True
        return found


def _name_lists(data: bytes, count: int) -> List[List[str]]:
    lists = []
    for _ in range(count):
        (length,) = struct.unpack(">I", data[:4])
        lists.append(data[4:4 + length].decode("ascii", "replace").split(","))
        data = data[4 + length:]
    return lists


class _Trace:
    """The trace of one connection: reads, in order, with their times."""

    def __init__(self, number: int, rtt: float) -> None:
        self.number = number
        self.rtt = rtt
        self.started = time.monotonic()
        self.directions = {"C>S": _Direction("C>S"), "S>C": _Direction("S>C")}

    def gcm(self) -> bool:
        client = self.directions["C>S"].kexinit
        server = self.directions["S>C"].kexinit
        if client is None or server is None:
            return False
        cipher = next((c for c in client[2] if c in server[2]), "")
        return "gcm" in cipher

    def read(self, direction: str, data: bytes) -> None:
        elapsed = time.monotonic() - self.started
        names = self.directions[direction].feed(data, self.gcm())
        print(f"[conn {self.number}] {elapsed * 1000:8.1f} ms {elapsed / self.rtt:5.2f} RTT "
              f"{direction} {len(data):6d} B  {' '.join(names)}", flush=True)


class Relay:
    """The mappings of one relay process, with one delay and bandwidth for all."""

    def __init__(self, delay: float, mbit: float) -> None:
        self.delay = delay
        self.bytes_per_second = mbit * 1e6 / 8
        self.connections = 0
        self.rtt = 2 * delay or 1e-3
        self.servers: List[asyncio.AbstractServer] = []

    async def listen(self, listen: Tuple[str, int], upstream: Tuple[str, int],
                     trace: bool) -> int:
        """Serve ``listen``; returns the port (useful when it was 0)."""
        server = await asyncio.start_server(
            lambda r, w: self._connection(r, w, upstream, trace), listen[0], listen[1],
            reuse_address=True, backlog=512)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _connection(self, client_reader: asyncio.StreamReader,
                          client_writer: asyncio.StreamWriter,
                          upstream: Tuple[str, int], tracing: bool) -> None:
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        self.connections += 1
        trace = _Trace(self.connections, self.rtt) if tracing else None
        # The client's data waits for the emulated handshake like the server does.
        connected = loop.create_future()
        to_server: Chunks = asyncio.Queue()
        to_client: Chunks = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._read(client_reader, to_server, trace, "C>S"))]
        server_writer: Optional[asyncio.StreamWriter] = None
        try:
            await asyncio.sleep(max(0.0, accepted + 3 * self.delay - loop.time()))
            server_reader, server_writer = await asyncio.open_connection(*upstream)
            connected.set_result(None)
            tasks += [
                asyncio.ensure_future(self._read(server_reader, to_client, trace, "S>C")),
                asyncio.ensure_future(self._write(to_server, server_writer)),
                asyncio.ensure_future(self._write(to_client, client_writer)),
            ]
            await asyncio.gather(*tasks)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a side reset, or the relay stops: the connection ends
        finally:
            for task in tasks:
                task.cancel()
            for writer in (client_writer, server_writer):
                if writer is not None:
                    writer.close()

    async def _read(self, reader: asyncio.StreamReader, queue: Chunks,
                    trace: Optional[_Trace], direction: str) -> None:
        loop = asyncio.get_running_loop()
        link_free = 0.0
        while True:
            data = await reader.read(READ_SIZE)
            now = loop.time()
            if trace is not None and data:
                trace.read(direction, data)
            # Serialised behind what went before at the link's rate, then the delay.
            link_free = max(now, link_free) + len(data) / self.bytes_per_second
            queue.put_nowait((link_free + self.delay, data))
            if not data:
                return

    async def _write(self, queue: Chunks, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(READ_SIZE):
        writer.write(data)
        await writer.drain()
    writer.close()


async def measure(relay: Relay) -> Dict[str, float]:
    """The round trip the relay adds, by a ping-pong through it to an echo server."""
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    port = await relay.listen(("127.0.0.1", 0), ("127.0.0.1", echo_port), trace=False)
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    for ping in range(PINGS + 1):
        sent = time.perf_counter()
        writer.write(b"x")
        await reader.readexactly(1)
        if ping == 0:
            first = time.perf_counter() - started
        else:
            times.append(time.perf_counter() - sent)
    writer.close()
    relay.servers.pop().close()
    echo.close()
    relay.connections = 0
    return {"rtt_ms": statistics.median(times) * 1000, "first_reply_ms": first * 1000}


def _address(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(args: argparse.Namespace) -> None:
    relay = Relay(args.delay_ms / 1000, args.mbit)
    measured = await measure(relay)
    relay.rtt = measured["rtt_ms"] / 1000
    for mapping in args.map:
        listen, _, upstream = mapping.partition("=")
        await relay.listen(_address(listen), _address(upstream), args.trace)
    print(json.dumps({"ready": True, "delay_ms": args.delay_ms, "mbit": args.mbit,
                      **{k: round(v, 2) for k, v in measured.items()}}), flush=True)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, finish)

    def stdin_ready() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            finish()

    loop.add_reader(sys.stdin.fileno(), stdin_ready)
    await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay, each way")
    parser.add_argument("--mbit", type=float, default=100.0, help="bandwidth per direction")
    parser.add_argument("--map", action="append", default=[], metavar="LISTEN=UPSTREAM",
                        help="HOST:PORT=HOST:PORT, repeatable")
    parser.add_argument("--trace", action="store_true", help="print every read (see above)")
    asyncio.run(main(parser.parse_args()))
