"""The tunnel benchmark: one forwarded stream's MiB/s through forward_local, ssh -L and sshtunnel.

One command::

    python benchmarks/tunnel.py [--size-mib 512] [--repeat 3]

It starts a private OpenSSH sshd on 127.0.0.1 (``OpenSSHServer``; needs root
and /usr/sbin/sshd) and, in a process of its own, a TCP server behind it
that sends ``--size-mib`` MiB to a client that asks (``down``) or reads that
much and answers (``up``). Each contender forwards a local port to it through
the sshd:

- ``forward_local``: ``SSHExecutor.forward_local`` of this library.
- ``ssh -L``: OpenSSH's client, ``ssh -N -L`` with its defaults (its
  cipher is chacha20-poly1305 unless the server or config says otherwise);
  ``ssh -L aes-gcm`` the same with the cipher this library prefers,
  ``aes128-gcm@openssh.com``.
- ``sshtunnel``: the ``sshtunnel`` package's ``SSHTunnelForwarder`` (paramiko
  with its defaults).

The client is a process of its own too, so the tunnel's process runs only
the tunnel; every contender has the same client and server. Each stream's
size is checked (the server counts what it read; the client what arrived).
The table shows the median MiB/s of ``--repeat`` runs per direction, in
rotating order, forward_local's ratio to each of the others (of the medians,
and the lowest and highest of the rounds: each round runs every contender
once, so a round's ratio compares runs minutes apart at most), and the CPU
seconds per GiB of the tunnel's process (ours and sshtunnel's: this one;
``ssh``'s: its process), which a busy machine disturbs less than MiB/s. The
load average is printed before and after: on a shared machine, compare
within one run. ``--contenders`` picks some of them (forward_local always).
Last, the latency of ``true`` commands (10 threads) on the tunnel's own
connection, idle and while a stream runs through the tunnel: the commands
share the connection with the stream but never wait behind it. Everything
runs on one machine: the sshd's CPU competes with the client's.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paramiko_executor import SSHExecutor  # noqa: E402
from testsupport.openssh import OpenSSHServer  # noqa: E402

#: One stream may take at most this long before the benchmark gives up.
STREAM_TIMEOUT = 600.0

#: The server behind the sshd: ``D`` asks for SIZE bytes, ``U`` sends SIZE bytes,
#: answered with how many arrived (no half-close: sshtunnel does not pass an EOF on).
SERVER = r"""
import socket, sys, threading
size = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
block = b"\xa5" * (1 << 20)
def serve(sock):
    with sock:
        kind = sock.recv(1)
        if kind == b"D":
            left = size
            while left:
                left -= sock.send(memoryview(block)[:min(left, len(block))])
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)
        elif kind == b"U":
            got = 0
            while got < size:
                data = sock.recv(1 << 20)
                if not data:
                    break
                got += len(data)
            sock.sendall(str(got).encode())
while True:
    sock, _ = listener.accept()
    threading.Thread(target=serve, args=(sock,), daemon=True).start()
"""

#: The client: connects to PORT, moves SIZE bytes in DIRECTION, prints the seconds it took.
CLIENT = r"""
import socket, sys, time
direction, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.create_connection(("127.0.0.1", port))
buffer = bytearray(1 << 20)
started = time.perf_counter()
if direction == "down":
    sock.sendall(b"D")
    got = 0
    while True:
        n = sock.recv_into(buffer)
        if not n:
            break
        got += n
    assert got == size, (got, size)
else:
    sock.sendall(b"U")
    block = memoryview(b"\x5a" * (1 << 20))
    left = size
    while left:
        left -= sock.send(block[:min(left, len(block))])
    answer = sock.recv(64)
    assert int(answer) == size, (answer, size)
print(time.perf_counter() - started)
"""


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port: int = sock.getsockname()[1]
        return port


def stream(direction: str, port: int, size: int) -> float:
    """Seconds one client took to move ``size`` bytes through the tunnel on ``port``."""
    out = subprocess.run([sys.executable, "-c", CLIENT, direction, str(port), str(size)],
                         capture_output=True, text=True, timeout=STREAM_TIMEOUT, check=True)
    return float(out.stdout)


#: Opens a tunnel: (local port, close, the CPU seconds the tunnel's process used so far).
Tunnel = Callable[[], Tuple[int, Callable[[], None], Callable[[], float]]]


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def contenders(server: OpenSSHServer, target: int, **endpoint: Any) -> Dict[str, Tunnel]:
    """The tunnels to ``target`` through ``server``; ``endpoint`` overrides where to log in
    (``host``, ``port``, ``known_hosts``: wan.py reaches the sshd through its relay)."""
    login = server.executor_parameters(**endpoint)

    def forward_local() -> Tuple[int, Callable[[], None], Callable[[], float]]:
        ex = SSHExecutor(**login)
        tunnel = ex.forward_local(target, "127.0.0.1")
        # Connected before the first stream, as ssh -L and sshtunnel are when their port
        # listens: else the first stream pays the connect (5-6 round trips over a WAN).
        ex.run_command("true")
        return tunnel.local_address[1], ex.close, own_cpu

    def ssh_l(*options: str) -> Tuple[int, Callable[[], None], Callable[[], float]]:
        port = free_port()
        proc = subprocess.Popen(
            ["ssh", "-N", "-F", "/dev/null", *options,
             "-L", f"127.0.0.1:{port}:127.0.0.1:{target}",
             "-p", str(login["port"]), "-i", server.client_key_path,
             "-o", f"UserKnownHostsFile={login['known_hosts']}",
             "-o", "StrictHostKeyChecking=yes", "-o", "ExitOnForwardFailure=yes",
             "-o", "BatchMode=yes", f"{server.username}@{login['host']}"],
            stdin=subprocess.DEVNULL)
        wait_listening(port)

        def close() -> None:
            proc.terminate()
            proc.wait(30)

        return port, close, lambda: process_cpu(proc.pid)

    def sshtunnel() -> Tuple[int, Callable[[], None], Callable[[], float]]:
        import sshtunnel as package

        forwarder = package.SSHTunnelForwarder(
            (login["host"], login["port"]), ssh_username=server.username,
            ssh_pkey=server.client_key_path, remote_bind_address=("127.0.0.1", target),
            local_bind_address=("127.0.0.1", 0), allow_agent=False)
        forwarder.start()
        return forwarder.local_bind_port, forwarder.stop, own_cpu

    return {"forward_local": forward_local, "ssh -L": ssh_l,
            "ssh -L aes-gcm": lambda: ssh_l("-c", "aes128-gcm@openssh.com"),
            "sshtunnel": sshtunnel}


def command_latencies(ex: SSHExecutor, count: int, until: Callable[[], bool]) -> List[float]:
    """Seconds each of up to ``count`` ``true`` commands took (10 threads), until ``until()``."""
    def one(_: int) -> Optional[float]:
        if until():
            return None
        started = time.perf_counter()
        ex.run_command("true")
        return time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=10) as pool:
        return [t for t in pool.map(one, range(count)) if t is not None]


def beside_a_stream(server: OpenSSHServer, target: int, size: int) -> None:
    """Command latency on the tunnel's own connection, idle and while a stream runs through it."""
    with SSHExecutor(**server.executor_parameters()) as ex, \
            ex.forward_local(target, "127.0.0.1") as tunnel:
        command_latencies(ex, 20, lambda: False)  # connected, probed, warm
        idle = command_latencies(ex, 200, lambda: False)
        done = threading.Event()
        streaming = threading.Thread(
            target=lambda: (stream("down", tunnel.local_address[1], size), done.set()))
        streaming.start()
        time.sleep(0.5)  # the stream under way
        busy = command_latencies(ex, 200, done.is_set)
        streaming.join(STREAM_TIMEOUT)
    for label, times in (("idle", idle), ("during a stream", busy)):
        if not times:  # a small --size-mib: the stream ended before the commands began
            print(f"commands on the tunnel's connection, {label:15}: none (stream too short)")
            continue
        times.sort()
        print(f"commands on the tunnel's connection, {label:15}: {len(times):3} commands, "
              f"median {statistics.median(times) * 1000:6.1f} ms, "
              f"p95 {times[int(len(times) * 0.95) - 1] * 1000:6.1f} ms")


@contextmanager
def backend(size: int) -> Iterator[int]:
    """The TCP server behind the sshd (a process of its own); yields its port."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(size)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


Rates = Dict[Tuple[str, str], List[float]]


def measure(tunnels: Dict[str, Tunnel], size: int, repeat: int) -> Tuple[Rates, Rates]:
    """MiB/s and the tunnel process's CPU s/GiB of each stream, ``repeat`` rounds, rotating."""
    rates: Rates = {}
    cpus: Rates = {}
    names = list(tunnels)
    for round_ in range(repeat):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            port, close, cpu = tunnels[name]()
            try:
                for direction in ("down", "up"):
                    used = cpu()
                    seconds = stream(direction, port, size)
                    per_gib = (cpu() - used) / (size / 2**30)
                    rate = size / seconds / 2**20
                    rates.setdefault((name, direction), []).append(rate)
                    cpus.setdefault((name, direction), []).append(per_gib)
                    print(f"  {name:15} {direction:4} {rate:8.1f} MiB/s "
                          f"{per_gib:6.2f} CPU s/GiB", flush=True)
            finally:
                close()
    return rates, cpus


def report(names: List[str], rates: Rates, cpus: Rates, size_mib: int, repeat: int,
           floor: Optional[float] = None) -> None:
    """The table: medians, forward_local's ratio to each other, and to ``floor`` MiB/s if given."""
    print(f"\none stream of {size_mib} MiB, median of {repeat}: MiB/s, and the "
          "tunnel process's CPU seconds per GiB")
    print(f"{'contender':15} {'down':>8} {'up':>8} {'CPU down':>9} {'CPU up':>8}   "
          + ("x floor (down, up)   " if floor else "") + "forward_local's MiB/s is")
    median = {key: statistics.median(values) for key, values in rates.items()}

    def ratio(name: str, direction: str) -> str:
        ours, theirs = rates[("forward_local", direction)], rates[(name, direction)]
        rounds = [a / b for a, b in zip(ours, theirs)]
        return (f"{median[('forward_local', direction)] / median[(name, direction)]:.2f}x "
                f"{direction} (rounds {min(rounds):.2f}-{max(rounds):.2f})")

    for name in names:
        down, up = median[(name, "down")], median[(name, "up")]
        of_floor = f"{down / floor:.2f}x, {up / floor:.2f}x{'':9}" if floor else ""
        ratio_text = "" if name == "forward_local" else \
            f"{ratio(name, 'down')}, {ratio(name, 'up')}"
        print(f"{name:15} {down:8.1f} {up:8.1f} {statistics.median(cpus[(name, 'down')]):9.2f} "
              f"{statistics.median(cpus[(name, 'up')]):8.2f}   {of_floor}{ratio_text}")
    if floor:
        print(f"floor: {floor:.1f} MiB/s (the relay's bandwidth)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--contenders", default="",
                        help="comma-separated, of: ssh -L, ssh -L aes-gcm, sshtunnel "
                             "(default: all)")
    parser.add_argument("--no-commands", action="store_true",
                        help="skip the command latencies beside a stream")
    args = parser.parse_args()
    size = args.size_mib << 20
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    with OpenSSHServer(max_sessions=10) as server, backend(size) as target:
        tunnels = contenders(server, target)
        if args.contenders:
            wanted = {"forward_local", *(name.strip() for name in args.contenders.split(","))}
            unknown = wanted - set(tunnels)
            if unknown:
                parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
            tunnels = {name: tunnel for name, tunnel in tunnels.items() if name in wanted}
        rates, cpus = measure(tunnels, size, args.repeat)
        if not args.no_commands:
            beside_a_stream(server, target, size)
    report(list(tunnels), rates, cpus, args.size_mib, args.repeat)
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
