"""The file-transfer benchmark: SFTP upload/download speed and client CPU.

One command::

    python benchmarks/transfer.py [--size-mib 256] [--repeat 5]

It starts a private OpenSSH sshd on 127.0.0.1 (``OpenSSHServer``: its
``Subsystem sftp internal-sftp``; needs root and /usr/sbin/sshd), writes one
random file, and moves it up and down with each contender, ``--repeat``
times, in rotating order:

- ``transfer``: ``paramiko_executor.transfer.upload``/``download`` over a
  paramiko Transport set up like the executor's (window, max packet, cipher
  preference, ``TCP_NODELAY``; the executor's read-ahead socket and channel
  hooks when ``paramiko_executor.connection``/``channel`` have them: without
  the hooks, paramiko can deadlock when a key exchange, due every 512 MiB,
  meets a channel close the server started).
- ``paramiko``: ``SFTPClient.put``/``get`` with their defaults, over a
  plain ``SSHClient.connect`` (paramiko's defaults throughout); and
  ``paramiko*``: the same over a Transport set up like the executor's, so
  only the SFTP code differs. The targets are checked against the faster.
- ``asyncssh``: ``SFTPClient.put``/``get`` with their defaults.
- ``sftp -b`` and ``scp``: OpenSSH's binaries. Their process start and login
  are subtracted: each run of a binary is paired with a run moving a 1-byte
  file, whose time and CPU are taken off.

Every transfer's result is checked by sha256 (not timed). The table shows
medians: MiB/s and client CPU seconds (user+system of this process, or of
the child process for the binaries) per transfer, and this module's ratios.
The server runs on the same machine, so the numbers include its CPU
competing with the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import paramiko

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paramiko_executor import channel, connection, transfer  # noqa: E402
from testsupport.openssh import OpenSSHServer  # noqa: E402

#: One transfer may take at most this long before the benchmark gives up.
TRANSFER_TIMEOUT = 600.0

Measure = Tuple[float, float]  # (seconds, client CPU seconds)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while True:
            block = file.read(1 << 20)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def executor_like_transport(server: OpenSSHServer) -> paramiko.Transport:
    """A logged-in Transport configured as ``paramiko_executor.connection`` does."""
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    wrapper = getattr(connection, "_TransportSocket", None)
    if wrapper is not None:
        sock = wrapper(sock.family, sock.type, sock.proto, fileno=sock.detach())
    transport = paramiko.Transport(sock)
    hooks = getattr(channel, "install_channel_hooks", None)
    if hooks is not None:
        hooks(transport, {})  # the executor's hooks, no session of its own on this transport
    transport.default_window_size = connection.WINDOW_SIZE
    transport.default_max_packet_size = connection.MAX_PACKET_SIZE
    options = transport.get_security_options()
    first = [c for c in connection.PREFERRED_CIPHERS if c in options.ciphers]
    options.ciphers = tuple(first + [c for c in options.ciphers if c not in first])
    transport.start_client(timeout=30)
    key = paramiko.Ed25519Key.from_private_key_file(server.client_key_path)
    transport.auth_publickey(server.username, key)
    return transport


def timed(action: Callable[[], object]) -> Measure:
    cpu = time.process_time()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start, time.process_time() - cpu


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_binary(argv: List[str], stdin: Optional[bytes] = None) -> Measure:
    cpu = children_cpu()
    start = time.perf_counter()
    subprocess.run(argv, input=stdin, check=True, timeout=TRANSFER_TIMEOUT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start, children_cpu() - cpu


class Bench:
    def __init__(self, server: OpenSSHServer, workdir: str, size: int) -> None:
        self.server = server
        self.workdir = workdir
        self.size = size
        self.source = os.path.join(workdir, "source")
        self.tiny = os.path.join(workdir, "tiny")
        self.remote = os.path.join(workdir, "remote")  # the same machine: sshd's view
        self.local = os.path.join(workdir, "local")
        with open(self.source, "wb") as file:
            for _ in range(size // (1 << 20)):
                file.write(os.urandom(1 << 20))
            file.write(os.urandom(size % (1 << 20)))
        with open(self.tiny, "wb") as file:
            file.write(b"x")
        self.digest = sha256_of(self.source)
        self.transport = executor_like_transport(server)
        self.loop = asyncio.new_event_loop()
        self.ssh_options = [
            "-i", server.client_key_path, "-o", f"UserKnownHostsFile={server.known_hosts_path}",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-F", "/dev/null",
            "-o", f"Ciphers={','.join(connection.PREFERRED_CIPHERS)}",
        ]

    def check(self, path: str) -> None:
        if sha256_of(path) != self.digest:
            raise SystemExit(f"content check failed for {path}")
        os.unlink(path)

    # --- contenders: each returns (up, down) measures --------------------------

    def this_module(self) -> Tuple[Measure, Measure]:
        deadline = time.monotonic() + TRANSFER_TIMEOUT
        up = timed(lambda: transfer.upload(
            self.transport.open_session(), self.source, self.remote, deadline=deadline))
        down = timed(lambda: transfer.download(
            self.transport.open_session(), self.remote, self.local, deadline=deadline))
        return up, down

    def paramiko_defaults(self) -> Tuple[Measure, Measure]:
        client = paramiko.SSHClient()
        client.load_host_keys(self.server.known_hosts_path)
        client.connect(self.server.host, self.server.port, self.server.username,
                       key_filename=self.server.client_key_path, look_for_keys=False,
                       allow_agent=False, timeout=30)
        try:
            return self._paramiko(client.open_sftp())
        finally:
            client.close()

    def paramiko_executor_transport(self) -> Tuple[Measure, Measure]:
        sftp = paramiko.SFTPClient.from_transport(self.transport)
        assert sftp is not None
        return self._paramiko(sftp)

    def _paramiko(self, sftp: paramiko.SFTPClient) -> Tuple[Measure, Measure]:
        sftp.get_channel().settimeout(TRANSFER_TIMEOUT)
        try:
            up = timed(lambda: sftp.put(self.source, self.remote))
            down = timed(lambda: sftp.get(self.remote, self.local))
        finally:
            sftp.close()
        return up, down

    def asyncssh(self) -> Tuple[Measure, Measure]:
        import asyncssh

        async def both() -> Tuple[Measure, Measure]:
            async with asyncssh.connect(
                self.server.host, port=self.server.port, username=self.server.username,
                client_keys=[self.server.client_key_path],
                known_hosts=self.server.known_hosts_path, config=None,
            ) as conn:
                async with conn.start_sftp_client() as sftp:
                    cpu, start = time.process_time(), time.perf_counter()
                    await sftp.put(self.source, self.remote)
                    up = time.perf_counter() - start, time.process_time() - cpu
                    cpu, start = time.process_time(), time.perf_counter()
                    await sftp.get(self.remote, self.local)
                    down = time.perf_counter() - start, time.process_time() - cpu
            return up, down

        return self.loop.run_until_complete(asyncio.wait_for(both(), 2 * TRANSFER_TIMEOUT))

    def _binary(self, argv: Callable[[str, str, bool], Tuple[List[str], Optional[bytes]]]
                ) -> Tuple[Measure, Measure]:
        """Up and down with an OpenSSH binary, less a 1-byte transfer's cost."""
        result = []
        for up in (True, False):
            big = run_binary(*argv(self.source if up else self.remote,
                                   self.remote if up else self.local, up))
            small = run_binary(*argv(self.tiny if up else self.remote + ".tiny",
                                     self.remote + ".tiny" if up else self.local + ".tiny", up))
            result.append((max(big[0] - small[0], 1e-9), max(big[1] - small[1], 0.0)))
        return result[0], result[1]

    def _login(self) -> str:
        return f"{self.server.username}@{self.server.host}"

    def sftp(self) -> Tuple[Measure, Measure]:
        def argv(src: str, dst: str, up: bool) -> Tuple[List[str], Optional[bytes]]:
            command = f"put {src} {dst}" if up else f"get {src} {dst}"
            return (["sftp", *self.ssh_options, "-P", str(self.server.port), "-b", "-",
                     self._login()], command.encode() + b"\n")

        return self._binary(argv)

    def scp(self) -> Tuple[Measure, Measure]:
        def argv(src: str, dst: str, up: bool) -> Tuple[List[str], Optional[bytes]]:
            if up:
                dst = f"{self._login()}:{dst}"
            else:
                src = f"{self._login()}:{src}"
            return ["scp", *self.ssh_options, "-P", str(self.server.port), src, dst], None

        return self._binary(argv)

    def run(self, repeat: int) -> Dict[str, List[Tuple[Measure, Measure]]]:
        contenders: Dict[str, Callable[[], Tuple[Measure, Measure]]] = {
            "transfer": self.this_module,
            "paramiko": self.paramiko_defaults,
            "paramiko*": self.paramiko_executor_transport,
            "asyncssh": self.asyncssh,
            "sftp -b": self.sftp,
            "scp": self.scp,
        }
        results: Dict[str, List[Tuple[Measure, Measure]]] = {name: [] for name in contenders}
        names = list(contenders)
        for round_ in range(repeat):
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for name in order:
                up, down = contenders[name]()
                self.check(self.local)
                # The uploaded file is checked by the next download; check it too.
                results[name].append((up, down))
                print(f"  round {round_ + 1} {name:9s} up {self.rate(up[0]):7.1f} MiB/s "
                      f"down {self.rate(down[0]):7.1f} MiB/s", file=sys.stderr, flush=True)
            for leftover in (self.remote + ".tiny", self.local + ".tiny"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        # The last upload, checked: every contender's download read it intact.
        self.check(self.remote)
        return results

    def rate(self, seconds: float) -> float:
        return self.size / (1 << 20) / seconds

    def close(self) -> None:
        self.transport.close()
        self.loop.close()


def report(bench: Bench, results: Dict[str, List[Tuple[Measure, Measure]]]) -> None:
    medians: Dict[str, Tuple[float, float, float, float]] = {}
    for name, runs in results.items():
        medians[name] = (
            statistics.median(bench.rate(up[0]) for up, _ in runs),
            statistics.median(bench.rate(down[0]) for _, down in runs),
            statistics.median(up[1] for up, _ in runs),
            statistics.median(down[1] for _, down in runs),
        )
    print(f"{bench.size / (1 << 20):g} MiB, median of {len(next(iter(results.values())))}, "
          f"paramiko {paramiko.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"{'contender':10s} {'up MiB/s':>9s} {'down MiB/s':>10s} {'up CPU s':>9s} "
          f"{'down CPU s':>10s}")
    for name, (up, down, up_cpu, down_cpu) in medians.items():
        print(f"{name:10s} {up:9.1f} {down:10.1f} {up_cpu:9.2f} {down_cpu:10.2f}")
    ours = medians["transfer"]
    print("\nthis module's ratios (speed): up / down")
    for name, (up, down, _, _) in medians.items():
        if name != "transfer":
            print(f"  vs {name:9s} {ours[0] / up:5.2f} / {ours[1] / down:5.2f}")
    # paramiko: the faster of its two set-ups, per direction.
    paramiko_best = tuple(max(medians[n][i] for n in ("paramiko", "paramiko*")) for i in (0, 1))
    print("targets:")
    for name, best, goal in (("paramiko", paramiko_best, 1.5),
                             ("asyncssh", medians["asyncssh"][:2], 1.0),
                             ("sftp -b", medians["sftp -b"][:2], 0.8)):
        ratios = (ours[0] / best[0], ours[1] / best[1])
        verdict = "PASS" if min(ratios) >= goal else "FAIL"
        print(f"  >= {goal:g} x {name:9s} up {ratios[0]:5.2f} down {ratios[1]:5.2f}  {verdict}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    for binary in ("sftp", "scp"):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} not found: apt-get install openssh-client")
    workdir = tempfile.mkdtemp(prefix="pe-transfer-bench-")
    os.chmod(workdir, 0o777)  # the sshd login user writes here
    try:
        with OpenSSHServer() as server:
            bench = Bench(server, workdir, args.size_mib << 20)
            try:
                report(bench, bench.run(args.repeat))
            finally:
                bench.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
