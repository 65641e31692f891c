"""Where this library (or another contender) spends client CPU in one workload, by function.

    python benchmarks/profile_library.py [W1 W2 W2C100 W3 W4 W5 W6] [--tool py-spy]
        [--top 25] [--commands N] [--executor-args JSON]

For each workload: starts the private sshd, runs this library's contender in a
fresh interpreter, connects and warms up there, and profiles only the
workload itself, over all threads (the calling threads and paramiko's
transport thread). Workloads as in ``run.py``; ``W2`` means c10 only,
``W2C100`` c100 only. Default workloads: W1 W2 W3.

``--tool cprofile`` (default): every thread runs under ``cProfile`` with its
own CPU clock (``time.thread_time``), so waiting costs nothing and the
ranking is CPU time: self time per function (C functions such as socket
calls and ciphers included) and time including callees. Profiling slows
Python code down by roughly 2x; compare shares, not absolute numbers, with
the benchmark. ``--tool py-spy`` (``pip install py-spy``) samples instead
(low overhead; ``--gil``: only the thread holding the GIL is sampled, so time in C
with the GIL released, e.g. waiting in recv, does not count).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(1, str(REPO))

import workloads as wl  # noqa: E402

RUNNERS = dict(wl.RUNNERS, W2C100=wl.run_w2)
#: what one "unit" of each workload is, for the per-unit column
UNITS = {
    "W1": ("command", 200),
    "W2": ("command", 1000),
    "W2C100": ("command", 1000),
    "W3": ("64 MiB", 3),
    "W4": ("16 MiB", 3),
    "W5": ("connect", 5),
    "W6": ("command", 100),
}
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/",
                   f"{REPO}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _label(code: Any) -> str:
    if isinstance(code, str):
        return code  # a C function: "<method 'recv' of '_socket.socket' objects>"
    return f"{code.co_name} ({_short(code.co_filename)}:{code.co_firstlineno})"


class ThreadProfiles:
    """A CPU-clock cProfile in every thread started from now on, plus the main thread's."""

    def __init__(self) -> None:
        self.profiles: List[cProfile.Profile] = []
        self.lock = threading.Lock()
        self.main = cProfile.Profile(time.thread_time)
        # _bootstrap_inner, not run: paramiko's Transport overrides run().
        original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]
        profiles = self

        def bootstrap_inner(thread: threading.Thread) -> None:
            profile = cProfile.Profile(time.thread_time)
            with profiles.lock:
                profiles.profiles.append(profile)
            profile.enable()
            try:
                original(thread)
            finally:
                profile.disable()

        threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]

    def totals(self) -> Dict[str, List[float]]:
        """label -> [calls, self seconds, seconds with callees], summed over threads so far."""
        rows: Dict[str, List[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
        with self.lock:
            profiles = [*self.profiles, self.main]
        for profile in profiles:
            for entry in profile.getstats():
                row = rows[_label(entry.code)]
                row[0] += entry.callcount
                row[1] += entry.inlinetime
                row[2] += entry.totaltime
        return rows


def worker(
    params: Dict, workload: str, use_cprofile: bool, out: str, commands: int, contender: str
) -> None:
    """In the profiled process: connect, warm up, READY, wait for GO, run, report."""
    profiles = ThreadProfiles() if use_cprofile else None
    from contenders import MODULES

    Contender = importlib.import_module(f"contenders.{MODULES[contender]}").Contender

    plan = _plan(workload, commands)
    counter = wl.ConnectionCounter(params["port"])
    driver = wl.make_driver(Contender(params))
    driver.once("true")
    print("READY", flush=True)
    sys.stdin.readline()
    before = profiles.totals() if profiles else {}
    if profiles:
        profiles.main.enable()
    cpu = wl.cpu_seconds()
    metrics = RUNNERS[workload](driver, plan, counter)
    metrics["profiled_cpu_s"] = wl.cpu_seconds() - cpu
    if profiles:
        profiles.main.disable()
        rows = profiles.totals()
        for label, (calls, inline, total) in before.items():
            row = rows[label]
            row[0] -= calls
            row[1] -= inline
            row[2] -= total
        with open(out, "w") as file:
            json.dump({label: row for label, row in rows.items() if row[0] > 0}, file)
    driver.close()
    print(json.dumps(metrics), flush=True)


def _plan(workload: str, commands: int) -> wl.Plan:
    """The benchmark's plan, with W2 at one concurrency and ``commands`` if given."""
    sizes: Dict[str, Any] = {}
    if workload in ("W2", "W2C100"):
        sizes["w2_concurrency"] = (10,) if workload == "W2" else (100,)
    if commands:
        sizes.update(w1_commands=commands, w2_commands=commands, w6_commands=commands)
    return wl.Plan(**sizes)


def _units(workload: str, commands: int) -> Tuple[str, int]:
    unit, count = UNITS[workload]
    return unit, (commands if commands and unit == "command" else count)


def rank_cprofile(path: str, workload: str, top: int, commands: int) -> str:
    with open(path) as file:
        rows: Dict[str, List[float]] = json.load(file)
    total = sum(row[1] for row in rows.values())
    unit, count = _units(workload, commands)
    groups: Dict[str, float] = collections.Counter()
    for label, row in rows.items():
        groups[_group(label)] += row[1]
    lines = [
        f"  profiled CPU (all threads): {total:.3f} s = {1e6 * total / count:.0f} us per {unit}"
    ]
    lines.append(
        "  self time by area: "
        + ", ".join(
            f"{name} {100 * seconds / total:.0f}%"
            for name, seconds in sorted(groups.items(), key=lambda item: -item[1])
        )
    )
    for title, column in (("self time", 1), ("including callees", 2)):
        lines.append(f"  {title}:   share   us/{unit}     calls/{unit}")
        for label, row in sorted(rows.items(), key=lambda item: -item[1][column])[:top]:
            lines.append(
                f"    {100 * row[column] / total:6.1f}%  {1e6 * row[column] / count:8.1f}"
                f"  {row[0] / count:10.1f}  {label}"
            )
    return "\n".join(lines)


def _group(label: str) -> str:
    if "paramiko_executor/" in label:
        return "paramiko_executor"
    if "paramiko/" in label:
        return "paramiko (Python)"
    if "cryptography" in label or "openssl" in label.lower() or "Cipher" in label:
        return "crypto (C)"
    if "_socket" in label or "select" in label:
        return "socket/select (C)"
    if "threading.py" in label or "_thread" in label:
        return "threading"
    if label.startswith("<"):
        return "other C"
    return "other Python"


def rank_pyspy(raw_path: str, top: int) -> str:
    """Shares of on-CPU samples by thread, by function and including callees."""
    counts: Dict[str, Dict[str, int]] = {
        "by thread": collections.Counter(),
        "self time": collections.Counter(),
        "including callees": collections.Counter(),
    }
    total = 0
    with open(raw_path) as raw:
        for line in raw:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            thread, *frames = stack.split(";")
            total += count
            counts["by thread"][thread] += count
            if frames:
                counts["self time"][_frame(frames[-1])] += count
                for function in {_frame(frame) for frame in frames}:
                    counts["including callees"][function] += count
    lines = [f"  {total} samples"]
    for title, table in counts.items():
        lines.append(f"  {title}:")
        for label, count in sorted(table.items(), key=lambda item: -item[1])[:top]:
            lines.append(f"    {100 * count / max(1, total):5.1f}%  {label}")
    return "\n".join(lines)


def _frame(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match.group('func')} ({_short(match.group('file'))})"


def profile(
    params: Dict, workload: str, tool: str, top: int, out_dir: Path, commands: int, contender: str
) -> Tuple[str, str]:
    out = out_dir / f"{workload}.{'json' if tool == 'cprofile' else 'raw'}"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    argv = [sys.executable, __file__, "--worker", json.dumps(params), "--out", str(out), workload]
    argv += ["--commands", str(commands), "--contender", contender]
    if tool == "cprofile":
        argv.append("--cprofile-worker")
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    spy = None
    try:
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"{workload}: the worker did not get ready")
        if tool == "py-spy":
            spy = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--rate",
                    "1000",
                    "--threads",
                    "--gil",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--nonblocking",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(50):  # py-spy says "Sampling process ..." once attached
                line = spy.stdout.readline()
                if not line or "Sampling" in line:
                    break
        proc.stdin.write("GO\n")
        proc.stdin.flush()
        metrics = proc.stdout.readline().strip()
        proc.wait(timeout=600)
        if spy is not None:
            spy.communicate(timeout=60)
            return metrics, rank_pyspy(str(out), top)
        return metrics, rank_cprofile(str(out), workload, top, commands)
    finally:
        for child in (proc, spy):
            if child is not None and child.poll() is None:
                child.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["W1", "W2", "W3"])
    parser.add_argument("--tool", choices=("cprofile", "py-spy"), default="cprofile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--commands", type=int, default=0, help="commands for W1/W2/W6 (default: the benchmark's)"
    )
    parser.add_argument(
        "--executor-args",
        default="{}",
        help="JSON merged into the SSHExecutor arguments, e.g. '{\"max_sessions\": 10}'",
    )
    parser.add_argument(
        "--contender",
        default="paramiko_executor",
        help="profile another contender (same names as run.py)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cprofile-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workloads = [name.upper() for name in args.workloads]
    unknown = set(workloads) - set(RUNNERS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {sorted(RUNNERS)}")
    if args.worker:
        worker(
            json.loads(args.worker),
            workloads[0],
            args.cprofile_worker,
            args.out,
            args.commands,
            args.contender,
        )
        return 0
    if args.tool == "py-spy" and shutil.which("py-spy") is None:
        parser.error("py-spy not found: pip install py-spy")
    from testsupport.openssh import OpenSSHServer

    out_dir = Path(tempfile.mkdtemp(prefix="paramiko-executor-profile-"))
    with OpenSSHServer(max_sessions=10) as server:
        params = server.executor_parameters()
        params["config"] = list(params["config"])
        params.update(json.loads(args.executor_args))
        for workload in workloads:
            metrics, ranking = profile(
                params, workload, args.tool, args.top, out_dir, args.commands, args.contender
            )
            print(f"== {args.contender} {workload} ({args.tool}): {metrics}")
            print(ranking, flush=True)
    print(f"profiles: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
