"""Fan-out benchmark: one command on N hosts at once, HostGroup against the others.

    python benchmarks/fanout.py                 # N = 20 and N = 100, all contenders
    python benchmarks/fanout.py --hosts 20      # one size only
    python benchmarks/fanout.py --only hostgroup,asyncssh
    python benchmarks/fanout.py --hosts 100 --turns 12 --base-library /tmp/main-checkout
                                                # warm rounds in turns, before/after

Needs root and /usr/sbin/sshd: one private OpenSSH sshd (the tests' fixture,
``testsupport.openssh.OpenSSHServer``) listens on 127.0.0.1 ...
127.0.0.16 (sshd listens on 16 sockets at most); host i is 127.0.0.(1 + i % 16),
a host of its own to every client: its own TCP connection and login, and the
answer of ``echo $SSH_CONNECTION`` is checked against its address. ``MaxStartups``
is raised so that N logins at once are not dropped; ``MaxSessions`` stays
OpenSSH's default 10. All traffic stays on 127.0.0.0/8.

Per contender and N, in a fresh interpreter each:

- cold: connect, log in and run ``echo`` on every host; wall time until the
  last result;
- warm: ``true`` on every host over the open connections; the median of 20
  rounds, the client's CPU time (user + system, all threads) per round, and
  its context switches per host (``getrusage``, voluntary and involuntary, all
  threads): a thread woken, or the GIL handed to a waiting thread at a
  blocking call, is one or two each;
- cold CPU/host: the client's CPU time of the cold round divided by N (the
  connect, login and first command of one host), to set against one lone
  connect's (``benchmarks/profile_library.py W5``);
- sshd CPU/host: sshd's CPU time in the cold round (every process it
  started, read from a cgroup of its own: ``benchmarks/sshdcpu.py``, which
  says why not from the listener's ``/proc`` counters) divided by N; n/a
  without root or cgroups.

Contenders: ``hostgroup`` (this library, defaults: each executor probes the
server's MaxSessions when it connects, which costs a few channel opens),
``hostgroup-ms10`` (``max_sessions=10``: no probe), ``paramiko`` (an
``SSHClient`` per host in a thread pool of 64, as a user would write it),
``asyncssh`` (``asyncio.gather`` over one connection per host),
``parallel-ssh`` (``pssh.clients.ParallelSSHClient``, libssh2) and ``fabric``
(``ThreadingGroup``), the last two when installed
(``pip install paramiko-executor[bench]``). Ratios are the contender's time
divided by HostGroup's: above 1 means HostGroup is faster.

Then the memory per idle connected SSHExecutor: the RSS growth of one process
over 100 connected, idle executors (after one more was connected, so that
imports and first-use allocations are not counted), divided by 100.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONTENDERS = ("hostgroup", "hostgroup-ms10", "paramiko", "asyncssh", "parallel-ssh", "fabric")
ROUNDS = 20
POOL = 64  # threads for the thread-based contenders: HostGroup's default max_workers
RUN_TIMEOUT = 600.0  # seconds one contender run may take


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def system_seconds() -> float:
    """The kernel's share of `cpu_seconds` (system calls, thread switches)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def switches() -> int:
    """Context switches of the whole process so far (all threads, voluntary or not)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


#: The contender's: sshd's cgroup CPU file (`sshdcpu.CgroupCpu.usage_file`), when measured.
SSHD_USAGE: Optional[str] = None


def sshd_seconds() -> float:
    from sshdcpu import seconds_in

    return seconds_in(SSHD_USAGE) if SSHD_USAGE else math.nan


def measure(cold: Callable[[], List[str]], warm: Callable[[], None],
            expected: List[str]) -> Dict[str, Any]:
    """Time ``cold`` (whose outputs must be ``expected``) once, then ``warm`` ROUNDS times."""
    cold_cpu, sshd_cpu = cpu_seconds(), sshd_seconds()
    started = time.perf_counter()
    outputs = cold()
    cold_seconds = time.perf_counter() - started
    cold_cpu, sshd_cpu = cpu_seconds() - cold_cpu, sshd_seconds() - sshd_cpu
    if outputs != expected:
        wrong = sum(1 for got, want in zip(outputs, expected) if got != want)
        raise RuntimeError(f"cold round: {wrong + abs(len(outputs) - len(expected))} hosts "
                           f"answered wrongly, e.g. {outputs[:2]!r}")
    times = []
    cpu, switched = cpu_seconds(), switches()
    for _ in range(ROUNDS):
        started = time.perf_counter()
        warm()
        times.append(time.perf_counter() - started)
    cpu, switched = cpu_seconds() - cpu, switches() - switched
    return {"cold": cold_seconds, "warm": statistics.median(times), "cpu": cpu / ROUNDS,
            "switches": switched / ROUNDS / len(expected),
            "cold_cpu_per_host": cold_cpu / len(expected),
            "sshd_cold_cpu_per_host": sshd_cpu / len(expected)}


# -- contenders: each runs in its own interpreter ---------------------------------------------


def lone_connect_cpu(spec: Dict[str, Any]) -> float:
    """Client CPU of one connect, login and ``echo`` on its own (the third of three).

    ``max_sessions`` given, so the process-wide table of probed limits stays empty.
    """
    from paramiko_executor import SSHExecutor

    parameters = dict(spec["parameters"], max_sessions=10)
    for _ in range(3):  # the first pays imports and first use
        cpu = cpu_seconds()
        with SSHExecutor(host=spec["addresses"][0], **parameters) as executor:
            executor.run_command("echo $SSH_CONNECTION")
        cpu = cpu_seconds() - cpu
    return cpu


def run_hostgroup(spec: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    from paramiko_executor.group import HostGroup

    single = lone_connect_cpu(spec)
    hosts = [{"host": address, "name": f"h{i}"} for i, address in enumerate(spec["addresses"])]
    with HostGroup(hosts, **spec["parameters"], **extra) as group:

        def cold() -> List[str]:
            result = group.run_command("echo $SSH_CONNECTION").raise_for_failures()
            return [outcome.stdout.split()[2] for outcome in result.values()]

        numbers = measure(cold, lambda: group.run_command("true").raise_for_failures(),
                          spec["addresses"])
    numbers["single_connect_cpu"] = single
    return numbers


def run_paramiko(spec: Dict[str, Any]) -> Dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    import paramiko

    parameters = spec["parameters"]
    clients: Dict[int, paramiko.SSHClient] = {}
    indexes = range(len(spec["addresses"]))

    def exec_on(client: paramiko.SSHClient, command: str) -> str:
        _stdin, stdout, _stderr = client.exec_command(command)
        out = stdout.read().decode()
        if stdout.channel.recv_exit_status() != 0:
            raise RuntimeError(f"{command!r} failed")
        return out

    def connect_and_echo(index: int) -> str:
        address = spec["addresses"][index]
        client = paramiko.SSHClient()
        client.load_host_keys(parameters["known_hosts"])
        client.connect(address, port=parameters["port"], username=parameters["username"],
                       key_filename=parameters["client_keys"][0], allow_agent=False,
                       look_for_keys=False)
        clients[index] = client
        return exec_on(client, "echo $SSH_CONNECTION").split()[2]

    with ThreadPoolExecutor(min(POOL, len(spec["addresses"]))) as pool:
        try:
            return measure(
                lambda: list(pool.map(connect_and_echo, indexes)),
                lambda: list(pool.map(lambda i: exec_on(clients[i], "true"), indexes)),
                spec["addresses"],
            )
        finally:
            for client in clients.values():
                client.close()


def run_asyncssh(spec: Dict[str, Any]) -> Dict[str, Any]:
    import asyncio

    import asyncssh

    parameters = spec["parameters"]

    async def main() -> Dict[str, Any]:
        loop = asyncio.get_running_loop()
        connections: Dict[int, Any] = {}
        indexes = range(len(spec["addresses"]))

        async def connect_and_echo(index: int) -> str:
            address = spec["addresses"][index]
            conn = await asyncssh.connect(
                address, port=parameters["port"], username=parameters["username"],
                client_keys=parameters["client_keys"], known_hosts=parameters["known_hosts"],
                agent_path=None, config=None)
            connections[index] = conn
            return (await conn.run("echo $SSH_CONNECTION", check=True)).stdout.split()[2]

        async def cold() -> List[str]:
            return list(await asyncio.gather(*map(connect_and_echo, indexes)))

        async def warm() -> None:
            await asyncio.gather(*(connections[i].run("true", check=True) for i in indexes))

        # measure() is synchronous: run each awaited step to completion on this loop
        # from a worker thread, so the event loop itself is what gets measured.
        def sync(coroutine_function: Callable[[], Any]) -> Callable[[], Any]:
            return lambda: asyncio.run_coroutine_threadsafe(coroutine_function(), loop).result()

        try:
            return await loop.run_in_executor(
                None, measure, sync(cold), sync(warm), spec["addresses"])
        finally:
            for conn in connections.values():
                conn.close()

    return asyncio.run(main())


def run_parallel_ssh(spec: Dict[str, Any]) -> Dict[str, Any]:
    from pssh.clients import ParallelSSHClient

    parameters = spec["parameters"]
    client = ParallelSSHClient(
        spec["addresses"], user=parameters["username"], port=parameters["port"],
        pkey=parameters["client_keys"][0], num_retries=0,
        pool_size=max(100, len(spec["addresses"])), allow_agent=False)

    def run(command: str) -> List[str]:
        output = client.run_command(command, stop_on_errors=True)
        client.join(output)
        lines = []
        for host_output in output:
            if host_output.exit_code != 0:
                raise RuntimeError(f"{command!r} failed on {host_output.host}")
            lines.append(" ".join(host_output.stdout))
        return lines

    def cold() -> List[str]:
        return [line.split()[2] for line in run("echo $SSH_CONNECTION")]

    return measure(cold, lambda: run("true"), spec["addresses"])


def run_fabric(spec: Dict[str, Any]) -> Dict[str, Any]:
    from fabric import ThreadingGroup

    parameters = spec["parameters"]
    group = ThreadingGroup(
        *spec["addresses"], user=parameters["username"], port=parameters["port"],
        connect_kwargs={"key_filename": parameters["client_keys"][0], "allow_agent": False,
                        "look_for_keys": False})
    try:
        def cold() -> List[str]:
            results = group.run("echo $SSH_CONNECTION", hide=True)
            return [results[conn].stdout.split()[2] for conn in group]

        return measure(cold, lambda: group.run("true", hide=True), spec["addresses"])
    finally:
        group.close()


def run_memory(spec: Dict[str, Any]) -> Dict[str, Any]:
    """RSS per idle connected SSHExecutor, over len(addresses) - 1 of them."""
    import gc
    import threading

    from paramiko_executor import SSHExecutor

    first, *rest = spec["addresses"]
    warm_up = SSHExecutor(host=first, **spec["parameters"])
    warm_up.run_command("true")  # imports, crypto and first-use allocations: not counted
    gc.collect()
    rss, threads = rss_bytes(), threading.active_count()
    executors = [SSHExecutor(host=address, **spec["parameters"]) for address in rest]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(POOL, len(rest))) as pool:
        list(pool.map(lambda executor: executor.run_command("true"), executors))
    gc.collect()
    time.sleep(0.5)  # let the transports' threads settle into their idle loop
    result = {"per_executor_bytes": (rss_bytes() - rss) / len(rest),
              "threads_per_executor": (threading.active_count() - threads) / len(rest),
              "executors": len(rest)}
    for executor in executors + [warm_up]:
        executor.close()
    return result


# -- warm rounds in turns (--turns): every contender connected at once, one runs at a time --


def serve_turns(run_round: Callable[[], None]) -> None:
    """After ``ready``: for each stdin line ``GO k``, ``k`` warm rounds; print wall and CPU."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] != ["GO"]:
            return
        rounds = int(words[1])
        cpu, system, switched = cpu_seconds(), system_seconds(), switches()
        started = time.perf_counter()
        for _ in range(rounds):
            run_round()
        print(json.dumps({"warm": (time.perf_counter() - started) / rounds,
                          "cpu": (cpu_seconds() - cpu) / rounds,
                          "sys": (system_seconds() - system) / rounds,
                          "switches": (switches() - switched) / rounds}), flush=True)


def turns_hostgroup(spec: Dict[str, Any]) -> None:
    from paramiko_executor.group import HostGroup

    hosts = [{"host": address, "name": f"h{i}"} for i, address in enumerate(spec["addresses"])]
    with HostGroup(hosts, **spec["parameters"], max_sessions=10) as group:
        for _ in range(3):  # connect, then settle
            group.run_command("true").raise_for_failures()
        serve_turns(lambda: group.run_command("true").raise_for_failures() and None)


def turns_asyncssh(spec: Dict[str, Any]) -> None:
    import asyncio
    import threading

    import asyncssh

    parameters = spec["parameters"]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def connect(address: str) -> Any:
        return await asyncssh.connect(
            address, port=parameters["port"], username=parameters["username"],
            client_keys=parameters["client_keys"], known_hosts=parameters["known_hosts"],
            agent_path=None, config=None)

    async def connect_all() -> List[Any]:
        return list(await asyncio.gather(*map(connect, spec["addresses"])))

    connections = asyncio.run_coroutine_threadsafe(connect_all(), loop).result()

    async def round_() -> None:
        await asyncio.gather(*(conn.run("true", check=True) for conn in connections))

    def run_round() -> None:
        asyncio.run_coroutine_threadsafe(round_(), loop).result()

    for _ in range(3):
        run_round()
    serve_turns(run_round)


TURNS: Dict[str, Callable[[Dict[str, Any]], None]] = {
    "hostgroup": turns_hostgroup, "asyncssh": turns_asyncssh}


def run_turns(names: List[str], spec: Dict[str, Any], blocks: int, rounds: int,
              base_library: Optional[str]) -> Dict[str, List[Dict[str, float]]]:
    """Warm rounds in alternating blocks: every contender connected at once, one at a time.

    On a shared machine, runs minutes apart meet different loads; blocks of a
    few rounds, taken in turn (the order rotating), meet the same.
    """
    from sshdcpu import seconds_in

    procs: Dict[str, subprocess.Popen] = {}
    turns: Dict[str, List[Dict[str, float]]] = {name: [] for name in names}
    usage = spec.get("sshd_usage")

    def sshd() -> float:  # only the contender whose turn it is runs commands meanwhile
        return seconds_in(usage) if usage else math.nan
    try:
        for name in names:
            root = base_library if name == BASE and base_library else ROOT
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                filter(None, [root, os.environ.get("PYTHONPATH")])))
            kind = "hostgroup" if name == BASE else name
            procs[name] = subprocess.Popen(
                [sys.executable, __file__, "--turns-contender", kind, "--spec", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for name in names:  # all connected before the first block
            if "ready" not in json.loads(procs[name].stdout.readline() or "{}"):  # type: ignore[union-attr]
                raise RuntimeError(f"{name} did not get ready")
        for block in range(blocks):
            shift = block % len(names)
            for name in names[shift:] + names[:shift]:
                sshd_before = sshd()
                procs[name].stdin.write(f"GO {rounds}\n")  # type: ignore[union-attr]
                procs[name].stdin.flush()  # type: ignore[union-attr]
                turn = json.loads(procs[name].stdout.readline())  # type: ignore[union-attr]
                turn["sshd"] = (sshd() - sshd_before) / rounds
                turn["block"] = block
                turns[name].append(turn)
    finally:
        for proc in procs.values():
            try:
                proc.communicate("END\n", timeout=60)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                proc.kill()
                proc.wait()
    return turns


def print_turns(turns: Dict[str, List[Dict[str, float]]], rounds: int) -> None:
    reference = {turn["block"]: turn for turn in turns.get("hostgroup", [])}
    print(f"warm rounds in alternating blocks of {rounds} ({len(reference)} blocks); "
          "ratio = the contender's / HostGroup's same block (above 1: HostGroup faster, "
          "or uses less CPU)")
    print(f"{'contender':15} {'warm ms':>8} {'CPU ms':>7} {'sys ms':>6} {'sshd ms':>7} "
          f"{'switches':>8} {'warm ratio':>16} {'CPU ratio':>16}   (sys: the kernel's part of "
          "the CPU; sshd: sshd's CPU, all its processes; switches: the process's context "
          "switches; all per round; ratios: median (quartiles))")
    for name, rows in turns.items():
        if not rows:
            continue
        text = (f"{name:15} {1000 * statistics.median(r['warm'] for r in rows):8.1f} "
                f"{1000 * statistics.median(r['cpu'] for r in rows):7.1f} "
                f"{1000 * statistics.median(r['sys'] for r in rows):6.1f} "
                f"{1000 * statistics.median(r['sshd'] for r in rows):7.1f} "
                f"{statistics.median(r['switches'] for r in rows):8.0f}")
        if name != "hostgroup" and reference:
            for key in ("warm", "cpu"):
                ratios = [r[key] / reference[r["block"]][key] for r in rows
                          if r["block"] in reference]
                text += f" {_spread(ratios):>16}"
        print(text)


def _spread(ratios: List[float]) -> str:
    """The median of same-block ratios and their quartiles: whether a difference is the load's."""
    if len(ratios) < 4:
        return f"{statistics.median(ratios):.2f}"
    low, median, high = statistics.quantiles(ratios, n=4)
    return f"{median:.2f} ({low:.2f}-{high:.2f})"


RUNNERS: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "hostgroup": run_hostgroup,
    "hostgroup-ms10": lambda spec: run_hostgroup(spec, max_sessions=10),
    "paramiko": run_paramiko,
    "asyncssh": run_asyncssh,
    "parallel-ssh": run_parallel_ssh,
    "fabric": run_fabric,
    "memory": run_memory,
}
# The import that shows whether an optional contender is installed.
OPTIONAL = {"asyncssh": "asyncssh", "parallel-ssh": "pssh", "fabric": "fabric"}


# -- the driver -------------------------------------------------------------------------------


#: ``--base-library``: HostGroup imported from another checkout, for before/after.
BASE = "hostgroup@base"


def run_contender(name: str, spec: Dict[str, Any], base_library: Optional[str] = None,
                  base_contender: str = "hostgroup") -> Tuple[Optional[Dict[str, Any]], str]:
    """Run one contender in a fresh interpreter; its numbers, or None and why.

    `BASE` is ``base_contender`` with ``base_library`` (a checkout) first on the path.
    """
    root = base_library if name == BASE and base_library else ROOT
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--contender", base_contender if name == BASE else name,
             "--spec", json.dumps(spec)],
            capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {RUN_TIMEOUT:g} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, tail[:160]
    return json.loads(lines[-1]), ""


def installed(name: str) -> bool:
    module = OPTIONAL.get(name)
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="20,100", help="host counts (default: 20,100)")
    parser.add_argument("--only", help="contenders to run, comma-separated")
    parser.add_argument("--json", metavar="FILE", help="write all numbers to FILE")
    parser.add_argument("--base-library", metavar="CHECKOUT",
                        help=f"also run {BASE}: HostGroup from another checkout of this "
                             "repository (e.g. a 'git worktree' of main), for before/after")
    parser.add_argument("--base-contender", default="hostgroup",
                        choices=["hostgroup", "hostgroup-ms10"],
                        help=f"what {BASE} runs (default hostgroup)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per contender, alternating; the table shows medians")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory run")
    parser.add_argument("--turns", type=int, metavar="BLOCKS",
                        help="only warm rounds: hostgroup and asyncssh (and hostgroup@base) "
                             "connected at once, taking turns for BLOCKS blocks")
    parser.add_argument("--turn-rounds", type=int, default=5,
                        help="warm rounds per turn (default 5)")
    parser.add_argument("--turns-contender", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.contender:
        global SSHD_USAGE
        spec = json.loads(args.spec)
        SSHD_USAGE = spec.get("sshd_usage")
        print(json.dumps(RUNNERS[args.contender](spec)))
        return 0
    if args.turns_contender:
        TURNS[args.turns_contender](json.loads(args.spec))
        return 0

    sizes = [int(n) for n in args.hosts.split(",")]
    names = args.only.split(",") if args.only else list(CONTENDERS)
    if args.base_library:
        names.append(BASE)
    biggest = max(max(sizes), 101)  # the memory run uses 101 hosts
    sys.path.insert(0, ROOT)
    from sshdcpu import CgroupCpu

    from testsupport.openssh import MAX_EXTRA_ADDRESSES, OpenSSHServer

    extra = [f"127.0.0.{i}" for i in range(2, MAX_EXTRA_ADDRESSES + 2)]
    cycle = ["127.0.0.1"] + extra
    addresses = [cycle[i % len(cycle)] for i in range(biggest)]
    results: Dict[str, Dict[int, Any]] = {name: {} for name in names}
    notes: Dict[str, str] = {}
    with OpenSSHServer(listen_addresses=extra, max_startups=3 * biggest,
                       log_level="ERROR") as server, contextlib.ExitStack() as stack:
        parameters = server.executor_parameters()
        del parameters["host"]
        parameters["config"] = ()
        base: Dict[str, Any] = {
            "parameters": {k: v for k, v in parameters.items() if k != "config"}}
        base["parameters"]["config"] = []
        try:
            base["sshd_usage"] = stack.enter_context(CgroupCpu(server.pid or 0)).usage_file
        except (OSError, ValueError) as exc:
            notes["sshd CPU"] = f"not measured: {exc}"
        print(f"sshd on 127.0.0.1 and {len(extra)} more loopback addresses, port "
              f"{server.port}, MaxSessions {server.max_sessions}", file=sys.stderr)
        if args.turns:
            names = [name for name in names if name in TURNS or name == BASE]
            for size in sizes:
                turns = run_turns(names, dict(base, addresses=addresses[:size]), args.turns,
                                  args.turn_rounds, args.base_library)
                print(f"N={size}; load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
                print_turns(turns, args.turn_rounds)
                if args.json:
                    with open(args.json, "w", encoding="utf-8") as file:
                        json.dump({"turns": turns}, file, indent=1)
            return 0
        runs: Dict[str, Dict[int, List[Dict[str, Any]]]] = {name: {} for name in names}
        for size in sizes:
            spec = dict(base, addresses=addresses[:size])
            for repetition in range(args.repeat):
                # The order rotates: each contender meets the machine's load in turn.
                shift = repetition % len(names)
                for name in names[shift:] + names[:shift]:
                    if not installed(name):
                        notes[name] = f"not installed (pip install {OPTIONAL[name]})"
                        continue
                    print(f"  N={size} {name} ...", file=sys.stderr, flush=True)
                    numbers, why = run_contender(name, spec, args.base_library,
                                                 args.base_contender)
                    if numbers is None:
                        notes[name] = f"N={size}: {why}"
                    else:
                        runs[name].setdefault(size, []).append(numbers)
            for name in names:
                done = runs[name].get(size)
                results[name][size] = None if not done else {
                    key: statistics.median(run[key] for run in done) for key in done[0]}
        memory: Optional[Dict[str, Any]] = None
        why = "skipped (--no-memory)"
        if not args.no_memory:
            print("  memory ...", file=sys.stderr, flush=True)
            memory, why = run_contender("memory", dict(base, addresses=addresses[:101]))
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}; "
          f"{args.repeat} run(s) per contender, medians")
    print_table(results, sizes, notes)
    if memory is None:
        print(f"\nmemory per idle connected SSHExecutor: failed: {why}")
    else:
        print(f"\nmemory per idle connected SSHExecutor: {memory['per_executor_bytes'] / 1024:.0f}"
              f" KiB RSS, {memory['threads_per_executor']:.1f} threads "
              f"(over {memory['executors']} executors)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"results": results, "runs": runs, "memory": memory, "notes": notes},
                      file, indent=2)
    return 0


def print_table(results: Dict[str, Dict[int, Any]], sizes: List[int],
                notes: Dict[str, str]) -> None:
    reference = results.get("hostgroup", {})

    def cell(name: str, size: int, key: str, scale: float, unit: str) -> str:
        numbers = results[name].get(size)
        if not numbers or math.isnan(numbers.get(key, math.nan)):
            return "n/a"
        text = f"{numbers[key] * scale:.1f}" + (f" {unit}" if unit else "")
        ref = reference.get(size)
        if ref and name != "hostgroup":
            text += f" ({numbers[key] / ref[key]:.2f}x)"
        return text

    header = ["contender"]
    for size in sizes:
        header += [f"N={size} cold", f"N={size} warm", f"N={size} CPU/round",
                   f"N={size} switches/host", f"N={size} cold CPU/host",
                   f"N={size} sshd CPU/host"]
    rows = [header]
    for name in results:
        row = [name]
        for size in sizes:
            row += [cell(name, size, "cold", 1000, "ms"), cell(name, size, "warm", 1000, "ms"),
                    cell(name, size, "cpu", 1000, "ms"), cell(name, size, "switches", 1, ""),
                    cell(name, size, "cold_cpu_per_host", 1000, "ms"),
                    cell(name, size, "sshd_cold_cpu_per_host", 1000, "ms")]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for index, row in enumerate(rows):
        print("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print("\n(x) = the contender's time / HostGroup's (defaults): above 1, HostGroup is faster.")
    for name in ("hostgroup", "hostgroup-ms10"):
        for size in sizes:
            numbers = results.get(name, {}).get(size)
            if numbers and "single_connect_cpu" in numbers:
                per_host, lone = numbers["cold_cpu_per_host"], numbers["single_connect_cpu"]
                print(f"{name} N={size}: cold CPU per host {1000 * per_host:.1f} ms = "
                      f"{per_host / lone:.2f}x a lone connect's {1000 * lone:.1f} ms")
    for name, note in notes.items():
        print(f"note: {name}: {note}")


if __name__ == "__main__":
    sys.exit(main())
