"""The benchmark's table: medians per contender, ratios to the asyncio executor, targets.

Standard library only. ``runs[contender]`` is a list of metric dicts, one per
repetition (a metric missing from a repetition was not measured there).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from contenders import BASELINE
from workloads import MIB

LIBRARY = "paramiko_executor"


@dataclass(frozen=True)
class Row:
    """One line of the table.

    ``kind``: ``"median"`` (median over repetitions, ratio to the baseline
    shown), ``"total"`` (sum over repetitions, no ratio: failure counts).
    ``target``: ``(">=" or "<=", value, "ratio" or "abs")`` judged on this
    library's column, or None.
    """

    label: str
    keys: Sequence[str]
    kind: str = "median"
    target: Optional[tuple] = None
    digits: int = 2
    workload: str = ""


ROWS = (
    Row(
        "W1 {w1_commands} x true, sequential  ms/cmd",
        ("w1_ms_per_cmd",),
        target=("<=", 0.8, "ratio"),
        workload="W1",
    ),
    Row(
        "W2 {w2_commands} x true, c10          cmd/s",
        ("w2c10_cmd_s",),
        target=(">=", 5.0, "ratio"),
        digits=0,
        workload="W2",
    ),
    Row(
        "   c10 failures / reconnects",
        ("w2c10_failures", "w2c10_reconnects"),
        kind="total",
        target=("<=", 0, "abs"),
        workload="W2",
    ),
    Row(
        "W2 {w2_commands} x true, c100         cmd/s",
        ("w2c100_cmd_s",),
        target=(">=", 1.35, "ratio"),
        digits=0,
        workload="W2",
    ),
    Row(
        "   c100 failures / reconnects",
        ("w2c100_failures", "w2c100_reconnects"),
        kind="total",
        target=("<=", 0, "abs"),
        workload="W2",
    ),
    Row(
        "W3 {w3_mib} MiB stdout, head -c   MiB/s",
        ("w3_mib_s",),
        target=(">=", 1.5, "ratio"),
        digits=0,
        workload="W3",
    ),
    Row(
        "W4 {w4_mib} MiB stdin -> wc -c     MiB/s",
        ("w4_mib_s",),
        target=(">=", 1.5, "ratio"),
        digits=0,
        workload="W4",
    ),
    Row(
        "W5 connect+auth+probe        ms",
        ("w5_ms",),
        target=("<=", 0.5, "ratio"),
        digits=1,
        workload="W5",
    ),
    Row(
        "W6 {w6_commands} x {w6_mib} MiB|base64, c{w6_concurrency}  cmd/s",
        ("w6_cmd_s",),
        target=(">=", 1.1, "ratio"),
        digits=1,
        workload="W6",
    ),
    Row(
        "   W6 failures / reconnects", ("w6_failures", "w6_reconnects"), kind="total", workload="W6"
    ),
    Row(
        "CPU per true, W1 (client)    ms",
        ("w1_cpu_ms_per_cmd",),
        target=("<=", 0.7, "abs"),
        digits=3,
        workload="W1",
    ),
    Row(
        "CPU per true, W2 c10         ms",
        ("w2c10_cpu_ms_per_cmd",),
        target=("<=", 0.7, "abs"),
        digits=3,
        workload="W2",
    ),
    Row("CPU per true, W2 c100        ms", ("w2c100_cpu_ms_per_cmd",), digits=3, workload="W2"),
    Row("CPU per 64 MiB, W3           s", ("w3_cpu_s_per_64mib",), digits=3, workload="W3"),
)


def median(runs: List[Dict[str, Any]], key: str) -> Optional[float]:
    values = [run[key] for run in runs if isinstance(run.get(key), (int, float))]
    return statistics.median(values) if values else None


def total(runs: List[Dict[str, Any]], key: str) -> Optional[int]:
    values = [run[key] for run in runs if isinstance(run.get(key), (int, float))]
    return int(sum(values)) if values else None


def _fmt(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _judge(row: Row, value: Optional[float], ratio: Optional[float]) -> str:
    if row.target is None:
        return ""
    op, limit, kind = row.target
    measured = ratio if kind == "ratio" else value
    if measured is None:
        return "n/a"
    ok = measured >= limit if op == ">=" else measured <= limit
    return "PASS" if ok else "FAIL"


def _target_text(row: Row) -> str:
    if row.target is None:
        return ""
    op, limit, kind = row.target
    return f"{op} {limit:g}x" if kind == "ratio" else f"{op} {limit:g}"


def render(
    runs: Dict[str, List[Dict[str, Any]]],
    contenders: Sequence[str],
    workloads: Sequence[str],
    plan: Any,
) -> str:
    """The fixed-width table: a row per metric, a column per contender; labels show ``plan``."""
    sizes = dict(
        plan.__dict__,
        w3_mib=plan.w3_bytes // MIB,
        w4_mib=plan.w4_bytes // MIB,
        w6_mib=plan.w6_bytes // MIB,
    )
    header = ["workload / metric (median)".ljust(36)]
    for name in contenders:
        header.append(name.rjust(22))
    header += ["target".rjust(9), "result".rjust(7)]
    lines = ["  ".join(header), "-" * len("  ".join(header))]
    for row in ROWS:
        if row.workload not in workloads:
            continue
        cells = [row.label.format(**sizes).ljust(36)]
        library_value = library_ratio = None
        for name in contenders:
            contender_runs = runs.get(name, [])
            if row.kind == "total":
                counts = [total(contender_runs, key) for key in row.keys]
                text = " / ".join("n/a" if count is None else str(count) for count in counts)
                value = None if None in counts else float(sum(counts))
                ratio = None
            else:
                value = median(contender_runs, row.keys[0])
                baseline = median(runs.get(BASELINE, []), row.keys[0])
                ratio = value / baseline if value is not None and baseline else None
                text = _fmt(value, row.digits)
                if ratio is not None and row.target is not None and row.target[2] == "ratio":
                    text += f" ({ratio:.2f}x)"
            if name == LIBRARY:
                library_value, library_ratio = value, ratio
            cells.append(text.rjust(22))
        if LIBRARY in contenders:
            cells += [
                _target_text(row).rjust(9),
                _judge(row, library_value, library_ratio).rjust(7),
            ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def spread(runs: Dict[str, List[Dict[str, Any]]], contenders: Sequence[str]) -> str:
    """Per contender, the largest (max - min) / median over repetitions of any rate or time row."""
    parts = []
    for name in contenders:
        worst = 0.0
        for row in ROWS:
            if row.kind != "median":
                continue
            values = [
                run[row.keys[0]]
                for run in runs.get(name, [])
                if isinstance(run.get(row.keys[0]), float)
            ]
            if len(values) > 1 and statistics.median(values) > 0:
                worst = max(worst, (max(values) - min(values)) / statistics.median(values))
        parts.append(f"{name} {100 * worst:.0f}%")
    return "largest spread (max-min)/median over repetitions: " + ", ".join(parts)


def render_scale(results: Dict[str, Dict[str, Any]]) -> str:
    """The scale table: many threads on one executor."""
    lines = []
    for name, metrics in results.items():
        if not metrics:
            lines.append(f"{name}: n/a")
            continue
        rate, reference = metrics["scale_cmd_s"], metrics["scale_c100_cmd_s"]
        ratio = rate / reference if reference else 0.0
        workers = metrics["scale_workers"]
        samples = metrics["scale_samples"]
        threads_max = metrics["scale_threads_max"]
        # Samples at every tenth of the commands; at 80% all workers are still alive
        # (they exit only once no command is left to take), so 20% -> 80% shows
        # growth with commands run, not threads ending.
        by_tenth = (
            {round(10 * s["done"] / metrics["scale_count"]): s for s in samples} if samples else {}
        )
        start, middle, late, end = (by_tenth.get(tenth) for tenth in (2, 5, 8, 10))
        growth_kib = late["rss_kib"] - start["rss_kib"] if start and late else None
        thread_ok = threads_max <= workers + 20
        memory_ok = growth_kib is not None and growth_kib <= 2048
        lines += [
            f"{name}: {workers} threads, {metrics['scale_done']} commands succeeded, "
            f"{metrics['scale_failures']} failures, {metrics['scale_reconnects']} reconnects",
            f"  rate {rate:.0f} cmd/s vs c100 {reference:.0f} cmd/s (same process): {ratio:.2f}x"
            f"   target >= 0.9x  {'PASS' if ratio >= 0.9 else 'FAIL'}",
            f"  OS threads: {metrics['scale_threads_before']} before, at most {threads_max} during"
            f"   target <= workers + 20  {'PASS' if thread_ok else 'FAIL'}",
            "  RSS MiB after 20% / 50% / 80% / 100% of commands: "
            + " / ".join(
                f"{s['rss_kib'] / 1024:.1f}" if s else "n/a" for s in (start, middle, late, end)
            )
            + f"; peak {metrics['scale_peak_rss_kib'] / 1024:.1f}",
            f"  RSS growth 20% -> 80%: {growth_kib} KiB"
            f"   target <= 2048 KiB  {'PASS' if memory_ok else 'FAIL'}",
            f"  CPU per command: {metrics['scale_cpu_ms_per_cmd']:.3f} ms",
        ]
    return "\n".join(lines)
