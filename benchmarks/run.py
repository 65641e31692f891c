"""The command benchmark: this library against raw paramiko, the asyncio executor and asyncssh.

One command::

    python benchmarks/run.py                 # full table, 3 repetitions
    python benchmarks/run.py --quick         # small smoke run, 1 repetition
    python benchmarks/run.py --scale         # 1000 threads x 10 000 commands on one executor
    python benchmarks/run.py --w1-turns 20   # W1 only: contenders alternate, 20 blocks each

It starts a private OpenSSH sshd on 127.0.0.1 with ``MaxSessions 10``
(``testsupport.openssh.OpenSSHServer``; needs root and
/usr/sbin/sshd), then runs every contender in its own fresh interpreter,
once per repetition (the order rotates between repetitions), and prints one
table of medians with each contender's ratio to the asyncio executor measured
in the same run, and PASS/FAIL against the library's targets (the ``target`` column).

The asyncio executor is cobald-tardis' ``SSHExecutor``. cobald-tardis pins
``pydantic<2``, so it may live in its own virtual environment:
``python benchmarks/run.py --setup-tardis`` creates one under
``~/.cache/paramiko-executor-bench`` that later runs find by themselves
(or pass ``--tardis-python PATH``). A contender that cannot be imported shows
"n/a" with a note instead of failing the run.

Numbers depend on the machine and on what else runs on it: on a busy machine
take them as noisy (the header shows the load average before and after).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(1, str(REPO))  # after benchmarks/ itself: paramiko_executor.testing

from contenders import BASELINE, MODULES  # noqa: E402
from report import LIBRARY, render, render_scale, spread  # noqa: E402
from workloads import FULL, QUICK, WORKLOADS  # noqa: E402

TARDIS_VENV = Path.home() / ".cache" / "paramiko-executor-bench" / "tardis-venv"
TARDIS_PYTHON_ENV = "PARAMIKO_EXECUTOR_BENCH_TARDIS_PYTHON"
MAX_SESSIONS = 10


def tardis_python(explicit: Optional[str]) -> str:
    """The asyncio executor's python: given, $ENV, this one if it has tardis, the cache venv."""
    if explicit:
        return explicit
    if os.environ.get(TARDIS_PYTHON_ENV):
        return os.environ[TARDIS_PYTHON_ENV]
    if importlib.util.find_spec("tardis") is None and (TARDIS_VENV / "bin" / "python").exists():
        return str(TARDIS_VENV / "bin" / "python")
    return sys.executable


def setup_tardis() -> None:
    """Create the cache venv and pip-install cobald-tardis (and its asyncssh) into it."""
    print(f"creating {TARDIS_VENV} with cobald-tardis ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TARDIS_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(TARDIS_VENV / "bin" / "pip"), "install", "-q", "cobald-tardis"],
        check=True,
        timeout=900,
    )


def version_of(python: str, distribution: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    try:
        result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    return result.stdout.strip() or "n/a"


def run_worker(
    python: str,
    contender: str,
    params: Dict[str, Any],
    extra: List[str],
    timeout: float,
    log_path: Path,
) -> Tuple[Dict[str, Any], List[str], Optional[str]]:
    """Run one contender in a fresh interpreter; return (metrics, notes, why unavailable)."""
    command = [python, str(HERE / "worker.py"), contender, json.dumps(params), *extra]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    notes: List[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            notes.append(f"{contender}: killed at its {timeout:.0f} s timeout (log {log_path})")
    metrics: Dict[str, Any] = {}
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "unavailable" in record:
            return {}, notes, record["unavailable"]
        if "error" in record:
            notes.append(f"{contender} {record['workload']}: {record['error']} (log {log_path})")
        metrics.update(record.get("metrics", {}))
    if proc.returncode not in (0, None) and not metrics:
        notes.append(f"{contender}: exited {proc.returncode} without results (log {log_path})")
    for key, value in metrics.items():
        if key.endswith("_first_error"):
            notes.append(f"{contender} {key[: -len('_first_error')]}: first failure: {value}")
        if key.endswith("_incomplete") and value:
            notes.append(
                f"{contender} {key[: -len('_incomplete')]}: hit its time limit: not all ran"
            )
    return metrics, notes, None


#: The name of the library's second copy in ``--w1-turns`` (``--base-library``).
BASE_LIBRARY = f"{LIBRARY}@base"


def run_w1_turns(
    pythons: Dict[str, str],
    contenders: List[str],
    params: Dict[str, Any],
    blocks: int,
    commands: int,
    log_dir: Path,
    base_library: Optional[Path] = None,
) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, str]]:
    """W1 in alternating blocks: every contender connected at once, one runs at a time.

    Block after block, each contender in turn (the order rotating) runs
    ``commands`` sequential ``true``, so that all of them meet the same load:
    on a shared machine, runs minutes apart do not. With ``base_library`` (a
    checkout of this repository), the library imported from there takes turns
    too, as ``BASE_LIBRARY``: a before/after comparison under the same load.
    Returns each contender's turns and why a contender was unavailable.
    """

    def env_for(repo: Path) -> Dict[str, str]:
        return dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(repo), os.environ.get("PYTHONPATH")])))

    if base_library is not None:
        contenders = [*contenders, BASE_LIBRARY]
        pythons = dict(pythons, **{BASE_LIBRARY: pythons.get(LIBRARY, sys.executable)})
    procs: Dict[str, subprocess.Popen] = {}
    unavailable: Dict[str, str] = {}
    turns: Dict[str, List[Dict[str, Any]]] = {name: [] for name in contenders}

    def record(name: str) -> Dict[str, Any]:
        for line in procs[name].stdout:  # type: ignore[union-attr]
            try:
                return dict(json.loads(line))
            except ValueError:
                continue
        return {"unavailable": f"exited (log {log_dir / (name + '-turns.log')})"}

    try:
        for name in contenders:
            with open(log_dir / f"{name}-turns.log", "w") as log:
                base = name == BASE_LIBRARY
                procs[name] = subprocess.Popen(
                    [pythons[name], str(HERE / "worker.py"), LIBRARY if base else name,
                     json.dumps(params), "--w1-turns"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                    env=env_for(base_library if base and base_library else REPO), cwd=REPO)
        for name in contenders:
            first = record(name)
            if "ready" not in first:
                unavailable[name] = str(first.get("unavailable", first))
        ready = [name for name in contenders if name not in unavailable]
        for block in range(blocks):
            for name in ready[block % len(ready):] + ready[: block % len(ready)]:
                stdin = procs[name].stdin
                assert stdin is not None
                stdin.write(f"GO {commands}\n")
                stdin.flush()
                turn = record(name).get("turn")
                if turn is None:
                    raise RuntimeError(f"{name} gave no W1 turn (log {log_dir})")
                turn["block"] = block
                turns[name].append(turn)
    finally:
        for proc in procs.values():
            try:
                proc.communicate("END\n", timeout=30)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                proc.kill()
                proc.wait()
    return turns, unavailable


def render_w1_turns(turns: Dict[str, List[Dict[str, Any]]], commands: int) -> str:
    """Per contender: median ms/cmd and CPU, and its per-block ratio to the baseline."""
    import statistics

    base = {turn["block"]: turn["ms_per_cmd"] for turn in turns.get(BASELINE, [])}
    lines = [f"W1 in alternating blocks of {commands} commands "
             f"({len(base)} blocks; ratio = this block's time / {BASELINE}'s same block):",
             f"{'contender':20} {'ms/cmd':>7} {'CPU ms/cmd':>10} {'ratio median':>12} "
             f"{'min':>5} {'max':>5}  blocks <= 0.8x"]
    for name, rows in turns.items():
        if not rows:
            continue
        ratios = [row["ms_per_cmd"] / base[row["block"]] for row in rows if row["block"] in base]
        text = (f"{name:20} {statistics.median(r['ms_per_cmd'] for r in rows):7.2f} "
                f"{statistics.median(r['cpu_ms_per_cmd'] for r in rows):10.3f}")
        if ratios and name != BASELINE:
            text += (f" {statistics.median(ratios):12.2f} {min(ratios):5.2f} {max(ratios):5.2f}"
                     f"  {sum(r <= 0.8 for r in ratios)}/{len(ratios)}")
        lines.append(text)
    for name, rows in turns.items():
        before = {turn["block"]: turn for turn in turns.get(f"{name}@base", [])}
        pairs = [(before[row["block"]], row) for row in rows if row["block"] in before]
        if len(pairs) >= 4:  # the same library before/after: its own same-block ratios
            text = f"{name}@base / {name}, same block, median (quartiles):"
            for key in ("ms_per_cmd", "cpu_ms_per_cmd"):
                low, median, high = statistics.quantiles(
                    [base_row[key] / row[key] for base_row, row in pairs], n=4)
                text += f" {key} {median:.3f} ({low:.3f}-{high:.3f})"
            lines.append(text)
    return "\n".join(lines)


def sshd_logins(server: Any, offset: int) -> Tuple[int, int]:
    """Logins sshd logged since byte ``offset`` of its log, and the new offset."""
    text = server.read_log()
    return len(re.findall(r"Accepted publickey for ", text[offset:])), len(text)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="paramiko_executor vs raw paramiko, the asyncio executor and asyncssh.",
        epilog="See the module docstring of benchmarks/run.py.",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="repetitions per contender (default 5; --quick 1)"
    )
    parser.add_argument("--quick", action="store_true", help="small workloads: a fast smoke run")
    parser.add_argument("--only", help="comma-separated contenders: " + ", ".join(MODULES))
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated, default all"
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="run the scale workload (default contender: this library)",
    )
    parser.add_argument(
        "--tardis-python", help=f"interpreter with cobald-tardis (or ${TARDIS_PYTHON_ENV})"
    )
    parser.add_argument(
        "--setup-tardis", action="store_true", help=f"create {TARDIS_VENV} with cobald-tardis first"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds per contender run (default 300; --quick 90)"
    )
    parser.add_argument("--json", help="also write all per-repetition results to this file")
    parser.add_argument(
        "--w1-turns", type=int, metavar="BLOCKS",
        help="only W1, every contender connected at once, taking turns for BLOCKS blocks",
    )
    parser.add_argument(
        "--turn-commands", type=int, default=50, help="commands per W1 turn (default 50)"
    )
    parser.add_argument(
        "--base-library", type=Path, metavar="CHECKOUT",
        help=f"with --w1-turns: the library of another checkout takes turns too, "
             f"as {BASE_LIBRARY} (e.g. a 'git worktree' of main, for before/after)",
    )
    args = parser.parse_args()

    contenders = list(MODULES)
    if args.only:
        contenders = [name.strip() for name in args.only.split(",")]
    elif args.scale:
        contenders = [LIBRARY]
    unknown = sorted(set(contenders) - set(MODULES))
    if unknown:
        parser.error(
            f"--only: unknown contender(s) {', '.join(unknown)}; known: {', '.join(MODULES)}"
        )
    workloads = [name.strip().upper() for name in args.workloads.split(",")]
    if set(workloads) - set(WORKLOADS):
        parser.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick or args.scale else 5)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    timeout = args.timeout or (90.0 if args.quick else 300.0)
    if args.setup_tardis:
        setup_tardis()

    from testsupport.openssh import OpenSSHServer, OpenSSHUnavailable

    plan = QUICK if args.quick else FULL
    pythons = {name: sys.executable for name in contenders}
    if BASELINE in pythons:
        pythons[BASELINE] = tardis_python(args.tardis_python)
    extra = (
        ["--workloads", ",".join(workloads)]
        + (["--quick"] if args.quick else [])
        + (["--scale"] if args.scale else [])
    )
    log_dir = Path(tempfile.mkdtemp(prefix="paramiko-executor-bench-"))
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in contenders}
    unavailable: Dict[str, str] = {}
    notes: List[str] = []
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        server = OpenSSHServer(max_sessions=MAX_SESSIONS)
        server.start()
    except OpenSSHUnavailable as error:
        print(f"cannot start a private sshd: {error}", file=sys.stderr)
        return 2
    with server:
        params = server.executor_parameters()
        params["config"] = list(params["config"])  # JSON
        if args.w1_turns:
            turns, unavailable = run_w1_turns(
                pythons, contenders, params, args.w1_turns, args.turn_commands, log_dir,
                args.base_library)
            load_after = os.getloadavg()
            print(f"load average (1 min) before / after: {load_before[0]:.2f} / "
                  f"{load_after[0]:.2f}")
            print(render_w1_turns(turns, args.turn_commands))
            for name, why in unavailable.items():
                print(f"note: {name} n/a: {why}")
            if args.json:
                with open(args.json, "w") as file:
                    json.dump({"w1_turns": turns, "unavailable": unavailable}, file, indent=1)
            return 0
        offset = 0
        for repetition in range(repeat):
            order = (
                contenders[repetition % len(contenders) :]
                + contenders[: repetition % len(contenders)]
            )
            for name in order:
                if name in unavailable:
                    continue
                print(
                    f"[{time.monotonic() - started:4.0f} s] {repetition + 1}/{repeat}: {name}",
                    flush=True,
                )
                _, offset = sshd_logins(server, offset)
                metrics, run_notes, why = run_worker(
                    pythons[name],
                    name,
                    params,
                    extra,
                    timeout,
                    log_dir / f"{name}-{repetition + 1}.log",
                )
                if why is not None:
                    unavailable[name] = why
                    continue
                metrics["sshd_logins"], offset = sshd_logins(server, offset)
                runs[name].append(metrics)
                notes += run_notes
    load_after = os.getloadavg()
    baseline_python = pythons.get(BASELINE, tardis_python(args.tardis_python))

    print()
    print(
        f"paramiko_executor benchmark: {'quick' if args.quick else 'full'} plan, "
        f"{repeat} repetition(s), "
        f"sshd MaxSessions {MAX_SESSIONS} on 127.0.0.1, {os.cpu_count()} CPUs, "
        f"{time.monotonic() - started:.0f} s"
    )
    print(
        f"versions: python {sys.version.split()[0]}, "
        f"paramiko {version_of(sys.executable, 'paramiko')}, "
        f"asyncssh {version_of(sys.executable, 'asyncssh')}, "
        f"cobald-tardis {version_of(baseline_python, 'cobald-tardis')} ({baseline_python})"
    )
    print(
        "load average (1 min) before / after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f}"
        + (
            "   (> 1: other work was running; numbers are noisy)"
            if max(load_before[0], load_after[0]) > 1
            else ""
        )
    )
    print()
    if args.scale:
        print(render_scale({name: (runs[name][0] if runs[name] else {}) for name in contenders}))
    else:
        print(render(runs, contenders, workloads, plan))
        print()
        print(
            f"cells: median over repetitions (ratio to {BASELINE} in this run); "
            "failures / reconnects: totals."
        )
        print(spread(runs, contenders))
        logins = {
            name: [run["sshd_logins"] for run in runs[name]] for name in contenders if runs[name]
        }
        print(
            f"sshd logins per contender run (expect 1, + {plan.w5_runs} if W5 ran, + reconnects): "
            + ", ".join(f"{name} {values}" for name, values in logins.items())
        )
    for name, why in unavailable.items():
        print(f"note: {name} n/a: {why}")
        if name == BASELINE:
            print(f"note: ratios need {BASELINE}: run once with --setup-tardis, or --tardis-python")
    for note in dict.fromkeys(notes):  # de-duplicated, in order
        print(f"note: {note}")
    print(f"logs: {log_dir}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {"plan": plan.__dict__, "runs": runs, "unavailable": unavailable, "notes": notes},
                file,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
