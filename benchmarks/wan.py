"""WAN benchmark: this library and its peers over a path with real latency, against the floor.

    python benchmarks/wan.py                       # 50 ms RTT, 100 Mbit/s, every contender
    python benchmarks/wan.py --delay-ms 50 --only library,paramiko
    python benchmarks/wan.py --trace-connect       # also: every message of one connect
    python benchmarks/wan.py --library-path /other/checkout   # another version of the library
    python benchmarks/wan.py --tunnel-mib 32       # only: one tunnelled stream each way

Needs root, ``/usr/sbin/sshd``, ``ssh`` and ``unshare``: the script re-runs
itself in a private network namespace (``unshare --net``, loopback brought
up), so every 127.0.0.x address is its own and nothing leaves the machine.
There it starts a private sshd (``MaxSessions 10``, testsupport's fixture) and
``relay.py`` processes that delay every byte by ``--delay-ms`` each way and cap
the bandwidth: ``127.0.0.2:22`` at ``--mbit`` for everything but bulk output,
``127.0.0.3:22`` at ``--bulk-mbit`` for that, and ``127.0.1.1`` ... for the
fan-out hosts, all to the one sshd. The relay measures the round trip it adds
and every ratio uses that measured RTT.

Each contender runs in a fresh interpreter (one at a time), with bounded
counts: connect (cold, then ``--connects`` more), W1 (``--commands``
sequential ``true``), W2 (``--w2-commands`` ``true`` from 10 callers on one
connection), bulk (16 MiB of stdout, median of 3), fan-out (``echo`` on
``--hosts`` hosts, cold: connect, log in, run). Each contender run is killed
after ``--timeout`` seconds. See benchmarks/README.md for the floors.

``--tunnel-mib N`` runs instead tunnel.py's contenders (``forward_local``,
``ssh -L`` with its default cipher and with AES-GCM, ``sshtunnel``), logged in
through the ``--mbit`` relay: one stream of N MiB down and up per contender and
round, ``--tunnel-repeat`` rounds in rotating order, against the relay's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from w2timeline import PacketLog, breakdown, describe

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NETNS_MARK = "PARAMIKO_EXECUTOR_WAN_NETNS"
CONTENDERS = ("library", "paramiko", "asyncssh", "openssh")
MAIN, BULK, TRACE = "127.0.0.2", "127.0.0.3", "127.0.0.4"
PORT = 22
BULK_BYTES = 16 * 1024 * 1024
CALLERS = 10  # W2's concurrent callers, and sshd's MaxSessions

#: The floors, in round trips (see the README): connect without and with the probe
#: (TCP, banner/KEXINIT, key exchange, NEWKEYS + service, publickey; + the probe),
#: a cold host's first result (connect, then open + exec; or the probe, then exec on a
#: channel it opened), one command on an open channel.
FLOOR_CONNECT, FLOOR_CONNECT_PROBE, FLOOR_FIRST, FLOOR_FANOUT = 5, 6, 7, 7


# -- contenders: each runs in its own interpreter -------------------------------------------------


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def concurrently(work: Callable[[], None], callers: int, total: int) -> Dict[str, Any]:
    """``total`` calls of ``work`` from ``callers`` threads: rate and failures."""
    remaining = [total]
    lock = threading.Lock()
    failures = [0]

    def caller() -> None:
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            try:
                work()
            except Exception:  # counted: the row says how many failed
                with lock:
                    failures[0] += 1

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"w2_rate": (total - failures[0]) / elapsed, "w2_failures": failures[0]}


def bulk_rate(run: Callable[[], int]) -> float:
    """MiB/s of 16 MiB of stdout, median of 3; ``run`` returns the bytes received."""
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        got = run()
        elapsed = time.perf_counter() - started
        if got != BULK_BYTES:
            raise RuntimeError(f"bulk: {got} bytes instead of {BULK_BYTES}")
        rates.append(BULK_BYTES / 2**20 / elapsed)
    return statistics.median(rates)


def run_library(spec: Dict[str, Any]) -> Dict[str, Any]:
    if spec["library_path"]:
        sys.path.insert(0, spec["library_path"])
    from paramiko_executor import SSHExecutor
    from paramiko_executor.group import HostGroup

    common = {"port": PORT, "username": spec["username"], "client_keys": [spec["key"]],
              "known_hosts": spec["known_hosts"], "config": ()}
    opened: List[Any] = []

    def connect(**extra: Any) -> Dict[str, float]:
        started = time.perf_counter()
        ex = SSHExecutor(host=MAIN, **common, **extra)
        opened.append(ex)
        ex._connection.get()  # connected: logged in, limit known (private: no public connect)
        connected = time.perf_counter() - started
        ex.run_command("true")
        return {"connect": connected, "first": time.perf_counter() - started}

    try:
        result = connect()
        again = [connect() for _ in range(spec["connects"])]
        given = [connect(max_sessions=CALLERS) for _ in range(spec["connects"])]
        result["connect_again"] = statistics.median(r["connect"] for r in again)
        result["first_again"] = statistics.median(r["first"] for r in again)
        result["connect_given"] = statistics.median(r["connect"] for r in given)
        ex = opened[0]
        ex.run_command("true")
        result["w1"] = statistics.mean(
            timed(lambda: ex.run_command("true")) for _ in range(spec["commands"]))
        refused = ex.statistics().refused_opens
        result.update(concurrently(lambda: ex.run_command("true"), CALLERS,
                                   spec["w2_commands"]))
        result["w2_refused"] = (ex.statistics().refused_opens - refused) / spec["w2_commands"]
        bulk = SSHExecutor(host=BULK, **common)
        opened.append(bulk)
        bulk.run_command("true")
        result["bulk"] = bulk_rate(
            lambda: len(bulk.run_command(f"head -c {BULK_BYTES} /dev/zero", encoding=None).stdout))
        hosts = [{"host": address, "name": f"h{i}"} for i, address in enumerate(spec["fanout"])]
        with HostGroup(hosts, **common) as group:
            started = time.perf_counter()
            outcome = group.run_command("echo ok").raise_for_failures()
            result["fanout"] = time.perf_counter() - started
            assert all(r.stdout == "ok\n" for r in outcome.values())
        return result
    finally:
        for ex in opened:
            ex.close()


def run_paramiko(spec: Dict[str, Any]) -> Dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    import paramiko

    clients: List[paramiko.SSHClient] = []

    def client_for(host: str) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.load_host_keys(spec["known_hosts"])
        client.connect(host, port=PORT, username=spec["username"], key_filename=spec["key"],
                       allow_agent=False, look_for_keys=False)
        clients.append(client)
        return client

    def run(client: paramiko.SSHClient, command: str) -> bytes:
        _stdin, stdout, _stderr = client.exec_command(command)
        out = stdout.read()
        if stdout.channel.recv_exit_status() != 0:
            raise RuntimeError(f"{command!r} failed")
        return out

    def connect() -> Dict[str, float]:
        started = time.perf_counter()
        client = client_for(MAIN)
        connected = time.perf_counter() - started
        run(client, "true")
        return {"connect": connected, "first": time.perf_counter() - started}

    try:
        result: Dict[str, Any] = connect()
        again = [connect() for _ in range(spec["connects"])]
        result["connect_again"] = statistics.median(r["connect"] for r in again)
        result["first_again"] = statistics.median(r["first"] for r in again)
        client = clients[0]
        result["w1"] = statistics.mean(
            timed(lambda: run(client, "true")) for _ in range(spec["commands"]))
        bound = threading.BoundedSemaphore(CALLERS)

        def bounded() -> None:
            with bound:
                run(client, "true")

        result.update(concurrently(bounded, CALLERS, spec["w2_commands"]))
        bulk = client_for(BULK)
        result["bulk"] = bulk_rate(lambda: len(run(bulk, f"head -c {BULK_BYTES} /dev/zero")))
        with ThreadPoolExecutor(len(spec["fanout"])) as pool:
            started = time.perf_counter()
            outputs = list(pool.map(lambda a: run(client_for(a), "echo ok"), spec["fanout"]))
            result["fanout"] = time.perf_counter() - started
        assert outputs == [b"ok\n"] * len(spec["fanout"])
        return result
    finally:
        for client in clients:
            client.close()


def run_asyncssh(spec: Dict[str, Any]) -> Dict[str, Any]:
    import asyncio

    import asyncssh

    async def main() -> Dict[str, Any]:
        connections: List[Any] = []

        async def connect(host: str) -> Any:
            conn = await asyncssh.connect(
                host, port=PORT, username=spec["username"], client_keys=[spec["key"]],
                known_hosts=spec["known_hosts"], agent_path=None, config=None)
            connections.append(conn)
            return conn

        async def atimed(coroutine: Any) -> float:
            started = time.perf_counter()
            await coroutine
            return time.perf_counter() - started

        async def connect_and_run() -> Dict[str, float]:
            started = time.perf_counter()
            conn = await connect(MAIN)
            connected = time.perf_counter() - started
            await conn.run("true", check=True)
            return {"connect": connected, "first": time.perf_counter() - started}

        try:
            result: Dict[str, Any] = await connect_and_run()
            again = [await connect_and_run() for _ in range(spec["connects"])]
            result["connect_again"] = statistics.median(r["connect"] for r in again)
            result["first_again"] = statistics.median(r["first"] for r in again)
            conn = connections[0]
            result["w1"] = statistics.mean(
                [await atimed(conn.run("true", check=True)) for _ in range(spec["commands"])])
            bound = asyncio.Semaphore(CALLERS)
            failures = 0

            async def one() -> None:
                nonlocal failures
                async with bound:
                    try:
                        await conn.run("true", check=True)
                    except (asyncssh.Error, OSError):
                        failures += 1

            elapsed = await atimed(asyncio.gather(*(one() for _ in range(spec["w2_commands"]))))
            result["w2_rate"] = (spec["w2_commands"] - failures) / elapsed
            result["w2_failures"] = failures
            bulk = await connect(BULK)
            rates = []
            for _ in range(3):
                started = time.perf_counter()
                out = await bulk.run(f"head -c {BULK_BYTES} /dev/zero", check=True,
                                     encoding=None)
                if len(out.stdout) != BULK_BYTES:
                    raise RuntimeError("bulk: short output")
                rates.append(BULK_BYTES / 2**20 / (time.perf_counter() - started))
            result["bulk"] = statistics.median(rates)

            async def cold(host: str) -> str:
                return str((await (await connect(host)).run("echo ok", check=True)).stdout)

            started = time.perf_counter()
            outputs = await asyncio.gather(*map(cold, spec["fanout"]))
            result["fanout"] = time.perf_counter() - started
            assert outputs == ["ok\n"] * len(spec["fanout"])
            return result
        finally:
            for conn in connections:
                conn.close()

    return asyncio.run(main())


def run_openssh(spec: Dict[str, Any]) -> Dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    workdir = tempfile.mkdtemp(prefix="pe-wan-ssh-")
    options = ["-F", "/dev/null", "-i", spec["key"], "-o", "IdentitiesOnly=yes",
               "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={spec['known_hosts']}",
               "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
               "-p", str(PORT), "-l", spec["username"]]
    masters: List[List[str]] = []

    def master(host: str) -> List[str]:
        control = ["-S", os.path.join(workdir, f"ctl{len(masters)}")]
        subprocess.run(["ssh", *options, *control, "-M", "-o", "ControlPersist=300", "-fN",
                        host], check=True, timeout=60)
        masters.append([*control, host])
        return [*control, host]

    def ssh(via: List[str], command: str) -> bytes:
        return subprocess.run(["ssh", *options, *via[:-1], via[-1], command], check=True,
                              stdout=subprocess.PIPE, timeout=120).stdout

    try:
        # Without a master, one ssh process: connect, log in, run.
        result: Dict[str, Any] = {"first": timed(lambda: ssh([MAIN], "true"))}
        result["first_again"] = statistics.median(
            timed(lambda: ssh([MAIN], "true")) for _ in range(spec["connects"]))
        result["connect"] = timed(lambda: master(MAIN))
        result["connect_again"] = statistics.median(
            timed(lambda: master(MAIN)) for _ in range(spec["connects"]))
        main = masters[0]
        ssh(main, "true")
        result["w1"] = statistics.mean(
            timed(lambda: ssh(main, "true")) for _ in range(spec["commands"]))
        def one() -> None:
            ssh(main, "true")

        result.update(concurrently(one, CALLERS, spec["w2_commands"]))
        bulk = master(BULK)
        result["bulk"] = bulk_rate(lambda: len(ssh(bulk, f"head -c {BULK_BYTES} /dev/zero")))
        with ThreadPoolExecutor(len(spec["fanout"])) as pool:
            started = time.perf_counter()
            outputs = list(pool.map(lambda a: ssh([a], "echo ok"), spec["fanout"]))
            result["fanout"] = time.perf_counter() - started
        assert outputs == [b"ok\n"] * len(spec["fanout"])
        return result
    finally:
        for via in masters:
            subprocess.run(["ssh", *options, *via[:-1], "-O", "exit", via[-1]],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def run_w2(spec: Dict[str, Any]) -> Dict[str, Any]:
    """W2 alone on a connected library executor: rate and refused opens per command.

    A first round of as many commands warms the connection up (the executor
    times its first opens), so the measured round sees it as it settles.
    """
    if spec["library_path"]:
        sys.path.insert(0, spec["library_path"])
    from paramiko_executor import SSHExecutor

    packets = None
    if spec.get("w2_trace"):
        packets = PacketLog()
        packets.install()
    with SSHExecutor(host=MAIN, port=PORT, username=spec["username"],
                     client_keys=[spec["key"]], known_hosts=spec["known_hosts"],
                     config=()) as ex:
        concurrently(lambda: ex.run_command("true"), CALLERS, spec["w2_commands"])
        refused = ex.statistics().refused_opens
        mark = packets.mark() if packets is not None else 0
        result = concurrently(lambda: ex.run_command("true"), CALLERS, spec["w2_commands"])
        result["w2_refused"] = (ex.statistics().refused_opens - refused) / spec["w2_commands"]
        if packets is not None:
            result["w2_parts"] = breakdown(packets.events[mark:packets.mark()], spec["rtt"])
        started = time.perf_counter()
        for _ in range(spec["commands"]):
            ex.run_command("true")
        result["w1"] = (time.perf_counter() - started) / spec["commands"]
        return result


def w2_rounds(spec: Dict[str, Any], compare: str, rounds: int, timeout: float,
              rtt: float) -> None:
    """W2 (and W1) of this checkout and of ``compare``, alternating, each in a fresh interpreter."""
    floor = CALLERS / 2 / rtt
    paths = {"library": spec["library_path"], "compare": os.path.abspath(compare)}
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in paths}
    for number in range(rounds):
        for name, path in paths.items():
            result = run_child("w2", {**spec, "library_path": path}, timeout)
            if "error" in result:
                print(f"round {number + 1} {name}: {result['error']}", flush=True)
                continue
            runs[name].append(result)
            print(f"round {number + 1} {name}: W2 {result['w2_rate']:.1f} cmd/s "
                  f"({result['w2_rate'] / floor:.3f}x floor), "
                  f"{result['w2_refused']:.3f} refused opens per command, "
                  f"{result['w2_failures']} failed; W1 {result['w1'] * 1000:.1f} ms "
                  f"({result['w1'] / rtt:.2f} RTT)", flush=True)
            if "w2_parts" in result:
                print(f"  {describe(result['w2_parts'])}", flush=True)
    print()
    print("| checkout | W2 c10 cmd/s (x floor), median | per round | refused opens per command "
          "| W1 ms/cmd (RTT) |")
    print("|---|---|---|---|---|")
    for name, path in paths.items():
        done = runs[name]
        if not done:
            print(f"| {path} | n/a | | | |")
            continue
        rates = [r["w2_rate"] / floor for r in done]
        rate = statistics.median(r["w2_rate"] for r in done)
        refused = statistics.mean(r["w2_refused"] for r in done)
        w1 = statistics.median(r["w1"] for r in done)
        print(f"| {path} | {rate:.1f} ({rate / floor:.3f}x) | "
              f"{' '.join(f'{x:.3f}' for x in rates)} | {refused:.3f} "
              f"| {w1 * 1000:.1f} ({w1 / rtt:.2f}) |")
    print(f"| floor | {floor:.1f} (5 per RTT) | | 0 | {rtt * 1000:.1f} (1) |")
    for name, path in paths.items():
        parts = [r["w2_parts"] for r in runs[name] if "w2_parts" in r]
        if parts:
            print(f"{path}, medians of the rounds' means: "
                  f"{describe({k: statistics.median(p[k] for p in parts) for k in parts[0]})}")


def run_trace(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One library connect (login and probe) through the tracing relay."""
    if spec["library_path"]:
        sys.path.insert(0, spec["library_path"])
    from paramiko_executor import SSHExecutor

    started = time.perf_counter()
    ex = SSHExecutor(host=TRACE, port=PORT, username=spec["username"],
                     client_keys=[spec["key"]], known_hosts=spec["known_hosts"], config=())
    try:
        ex._connection.get()
        connected = time.perf_counter() - started
        ex.run_command("true")
        return {"connect": connected, "first": time.perf_counter() - started}
    finally:
        ex.close()


RUNNERS: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "library": run_library, "paramiko": run_paramiko, "asyncssh": run_asyncssh,
    "openssh": run_openssh, "trace": run_trace, "w2": run_w2,
}


# -- the parent: namespace, sshd, relays, table ---------------------------------------------------


class RelayProcess:
    """A relay.py child; its stdout (the ready line, then trace lines) is collected."""

    def __init__(self, delay_ms: float, mbit: float, maps: List[str], trace: bool = False):
        command = [sys.executable, os.path.join(HERE, "relay.py"), "--delay-ms", str(delay_ms),
                   "--mbit", str(mbit)]
        for mapping in maps:
            command += ["--map", mapping]
        if trace:
            command.append("--trace")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the relay did not start")
        self.measured = json.loads(ready)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def trace_lines(self) -> List[str]:
        lines = []
        while not self.lines.empty():
            lines.append(self.lines.get())
        return lines

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_child(name: str, spec: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, __file__, "--child", name, json.dumps(spec)],
                              stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"killed after {timeout:g} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"exit status {done.returncode}"}
    return dict(json.loads(lines[-1]))


def fmt(value: Optional[float], unit: float, floor: Optional[float], digits: int = 0,
        per: str = "RTT") -> str:
    """``value`` (scaled by ``unit``) with its ratio: in RTTs, or as a fraction of a floor."""
    if value is None:
        return "n/a"
    text = f"{value * unit:.{digits}f}"
    if floor is None:
        return text
    return f"{text} ({value / floor:.2f}{'' if per == 'x' else ' '}{per})"


def table(results: Dict[str, Dict[str, Any]], rtt: float, mbit: float) -> str:
    bulk_floor = mbit * 1e6 / 8 / 2**20
    w2_floor = CALLERS / 2 / rtt
    header = ("| contender | connect ms (RTT) | again | max_sessions given | connect + first "
              "command | again | W1 ms/cmd (RTT) | W2 c10 cmd/s (x floor) | refused per cmd "
              "| failed | 16 MiB stdout MiB/s (x floor) | 20 hosts cold s (RTT) |")
    rows = [header, "|" + "---|" * 12]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | {r['error']} |" + " |" * 10)
            continue
        cells = [fmt(r.get(key), 1000, rtt) for key in
                 ("connect", "connect_again", "connect_given", "first", "first_again")]
        refused = r.get("w2_refused")
        cells += [fmt(r.get("w1"), 1000, rtt, 1), fmt(r.get("w2_rate"), 1, w2_floor, 1, "x"),
                  "n/a" if refused is None else f"{refused:.3f}", str(r.get("w2_failures", "n/a")),
                  fmt(r.get("bulk"), 1, bulk_floor, 1, "x"),
                  fmt(r.get("fanout"), 1, rtt, 2)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append(
        f"| floor | {FLOOR_CONNECT_PROBE * rtt * 1000:.0f} ({FLOOR_CONNECT_PROBE} with probe; "
        f"{FLOOR_CONNECT} without) | | {FLOOR_CONNECT * rtt * 1000:.0f} ({FLOOR_CONNECT}) "
        f"| {FLOOR_FIRST * rtt * 1000:.0f} ({FLOOR_FIRST}) | "
        f"| {rtt * 1000:.1f} (1) | {w2_floor:.1f} (5 per RTT) | 0 | | {bulk_floor:.1f} "
        f"| {FLOOR_FANOUT * rtt:.2f} ({FLOOR_FANOUT}) |")
    return "\n".join(rows)


def run_tunnels(server: Any, known_hosts: str, args: argparse.Namespace, rtt_ms: float) -> None:
    """tunnel.py's streams, each tunnel logged in to the sshd through the relay on MAIN."""
    import tunnel

    size = args.tunnel_mib << 20
    with tunnel.backend(size) as target:
        tunnels = tunnel.contenders(server, target, host=MAIN, port=PORT,
                                    known_hosts=known_hosts)
        rates, cpus = tunnel.measure(tunnels, size, args.tunnel_repeat)
    print(f"(through the relay: measured RTT {rtt_ms:.1f} ms, {args.mbit:g} Mbit/s)")
    tunnel.report(list(tunnels), rates, cpus, args.tunnel_mib, args.tunnel_repeat,
                  floor=args.mbit * 1e6 / 8 / 2**20)


def parent(args: argparse.Namespace) -> int:
    sys.path.insert(0, ROOT)
    from testsupport.openssh import OpenSSHServer

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    fanout = [f"127.0.1.{i + 1}" for i in range(args.hosts)]
    server = OpenSSHServer(max_sessions=CALLERS, max_startups=max(100, 2 * args.hosts),
                           log_level="ERROR")
    relays: List[RelayProcess] = []
    workdir = tempfile.mkdtemp(prefix="pe-wan-")
    try:
        server.start()
        upstream = f"127.0.0.1:{server.port}"
        known_hosts = os.path.join(workdir, "known_hosts")
        public = f"{server.host_public_key.get_name()} {server.host_public_key.get_base64()}"
        with open(known_hosts, "w", encoding="ascii") as stream:
            for address in [MAIN, BULK, TRACE, *fanout]:
                stream.write(f"{address} {public}\n")
        main = RelayProcess(args.delay_ms, args.mbit,
                            [f"{a}:{PORT}={upstream}" for a in [MAIN, *fanout]])
        relays.append(main)
        relays.append(RelayProcess(args.delay_ms, args.bulk_mbit, [f"{BULK}:{PORT}={upstream}"]))
        rtt = main.measured["rtt_ms"] / 1000
        spec = {"username": server.username, "key": server.client_key_path,
                "known_hosts": known_hosts, "fanout": fanout, "commands": args.commands,
                "w2_commands": args.w2_commands, "connects": args.connects,
                "library_path": os.path.abspath(args.library_path or ROOT)}
        print(f"relay: {args.delay_ms:g} ms one way, {args.mbit:g} Mbit/s (bulk "
              f"{args.bulk_mbit:g}): measured RTT {main.measured['rtt_ms']:.1f} ms, first reply "
              f"{main.measured['first_reply_ms']:.1f} ms after connect (TCP handshake: 1 RTT); "
              f"sshd MaxSessions {CALLERS}; library from {spec['library_path']}", flush=True)
        if args.tunnel_mib:
            run_tunnels(server, known_hosts, args, main.measured["rtt_ms"])
            return 0
        if args.w2_rounds:
            w2_rounds({**spec, "rtt": rtt, "w2_trace": args.w2_trace},
                      args.compare_path or ROOT, args.w2_rounds, args.timeout, rtt)
            return 0
        if args.trace_connect:
            tracer = RelayProcess(args.delay_ms, args.mbit, [f"{TRACE}:{PORT}={upstream}"],
                                  trace=True)
            relays.append(tracer)
            traced = run_child("trace", spec, args.timeout)
            time.sleep(2 * rtt)  # the close's last reads
            print("\nTrace of one library connect (login, probe):")
            for line in tracer.trace_lines():
                print("  " + line)
            print(f"  -> connected after {fmt(traced.get('connect'), 1000, rtt)}, first "
                  f"command's result after {fmt(traced.get('first'), 1000, rtt)}\n")
        results: Dict[str, Dict[str, Any]] = {}
        for name in args.only.split(","):
            started = time.perf_counter()
            results[name] = run_child(name, spec, args.timeout)
            print(f"{name}: {time.perf_counter() - started:.1f} s {results[name]}", flush=True)
        print()
        print(table(results, rtt, args.bulk_mbit))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as stream:
                json.dump({"rtt_ms": rtt * 1000, "relay": main.measured, "args": vars(args),
                           "results": results}, stream, indent=2)
        return 0
    finally:
        for relay in relays:
            relay.close()
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay each way")
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--bulk-mbit", type=float, default=1000.0)
    parser.add_argument("--only", default=",".join(CONTENDERS))
    parser.add_argument("--hosts", type=int, default=20, help="fan-out hosts (at most 250)")
    parser.add_argument("--commands", type=int, default=20, help="W1's sequential commands")
    parser.add_argument("--w2-commands", type=int, default=200)
    parser.add_argument("--connects", type=int, default=3, help="connects after the first")
    parser.add_argument("--timeout", type=float, default=300.0, help="per contender, seconds")
    parser.add_argument("--library-path", help="import paramiko_executor from this checkout")
    parser.add_argument("--trace-connect", action="store_true")
    parser.add_argument("--w2-rounds", type=int, default=0,
                        help="only W2 (then W1) of the library: this many rounds, alternating "
                             "with --compare-path's checkout")
    parser.add_argument("--compare-path", help="the other checkout for --w2-rounds")
    parser.add_argument("--w2-trace", action="store_true",
                        help="with --w2-rounds: where each W2 command's time goes, from "
                             "paramiko's messages (benchmarks/w2timeline.py)")
    parser.add_argument("--tunnel-mib", type=int, default=0,
                        help="only the tunnel workload: one stream of this many MiB each way")
    parser.add_argument("--tunnel-repeat", type=int, default=2, help="tunnel rounds")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, spec = args.child
        print(json.dumps(RUNNERS[name](json.loads(spec))))
        return 0
    for name in args.only.split(","):
        if name not in CONTENDERS:
            parser.error(f"--only: unknown contender {name!r} (known: {', '.join(CONTENDERS)})")
    if not 1 <= args.hosts <= 250:
        parser.error("--hosts must be between 1 and 250")
    if os.environ.get(NETNS_MARK) != "1":
        os.environ[NETNS_MARK] = "1"
        os.execvp("unshare", ["unshare", "--net", sys.executable, *sys.argv])
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
