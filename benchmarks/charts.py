"""Bar charts of the benchmarks against their peers, drawn from the results the scripts write.

    python benchmarks/run.py --json benchmarks/results/commands.json
    python benchmarks/fanout.py --json benchmarks/results/fanout.json
    python benchmarks/transfer.py | tee benchmarks/results/transfer.txt
    python benchmarks/charts.py                  # redraws docs/_static/benchmarks/*.png

Each input is optional: a chart is drawn for every results file that exists
and skipped (with a note) otherwise. ``run.py``'s and ``fanout.py``'s JSON are
read as they write them; ``transfer.py`` prints its medians as a table, which
is read from its saved output. Cells are medians over the repetitions, as the
scripts' own tables show them; a contender that did not run (n/a) has no bar.
Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CHARTS = HERE.parent / "docs" / "_static" / "benchmarks"

#: run.py's metrics drawn, with their unit and which way is better.
COMMAND_METRICS = (
    ("w1_ms_per_cmd", "W1 sequential true\nms per command", "lower"),
    ("w2c10_cmd_s", "W2 true from 10 threads\ncommands/s", "higher"),
    ("w2c100_cmd_s", "W2 true from 100 threads\ncommands/s", "higher"),
    ("w3_mib_s", "W3 64 MiB stdout\nMiB/s", "higher"),
    ("w4_mib_s", "W4 16 MiB stdin\nMiB/s", "higher"),
    ("w5_ms", "W5 connect+auth+probe\nms", "lower"),
    ("w6_cmd_s", "W6 1 MiB|base64 from 20 threads\ncommands/s", "higher"),
    ("w1_cpu_ms_per_cmd", "client CPU per true (W1)\nms", "lower"),
)

#: fanout.py's metrics per host count (seconds in the file, drawn in ms).
FANOUT_METRICS = (
    ("cold", "cold: connect, log in, echo\nms until the last result", "lower"),
    ("warm", "warm: true on every host\nms per round", "lower"),
    ("cpu", "client CPU per warm round\nms", "lower"),
)

#: The library's own bar stands out; every peer gets the same neutral colour.
OURS = ("paramiko_executor", "hostgroup", "hostgroup-ms10", "transfer")
OURS_COLOUR = "#2b6cb0"
PEER_COLOUR = "#a0aec0"


def command_medians(results: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """``run.py --json``: contender -> metric -> median over its repetitions."""
    medians: Dict[str, Dict[str, float]] = {}
    for contender, runs in results["runs"].items():
        for key, _, _ in COMMAND_METRICS:
            values = [run[key] for run in runs if isinstance(run.get(key), (int, float))]
            if values:
                medians.setdefault(contender, {})[key] = statistics.median(values)
    return medians


def fanout_cells(results: Dict[str, Any]) -> Dict[int, Dict[str, Dict[str, float]]]:
    """``fanout.py --json``: host count -> contender -> metric in ms."""
    cells: Dict[int, Dict[str, Dict[str, float]]] = {}
    for contender, by_size in results["results"].items():
        for size, numbers in by_size.items():
            if numbers:
                cells.setdefault(int(size), {})[contender] = {
                    key: numbers[key] * 1000 for key, _, _ in FANOUT_METRICS
                }
    return cells


def transfer_medians(text: str) -> Dict[str, Tuple[float, float]]:
    """``transfer.py``'s table: contender -> (up MiB/s, down MiB/s).

    The table starts after the ``contender  up MiB/s ...`` header and ends at
    the first blank line; a contender's name fills the first 10 columns and
    may hold spaces (``sftp -b``).
    """
    medians: Dict[str, Tuple[float, float]] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("contender") and "up MiB/s" in line:
            break
    else:
        raise ValueError("no 'contender  up MiB/s' table in the transfer results")
    for line in lines:
        if not line.strip():
            break
        fields = line[10:].split()
        if len(fields) != 4:
            raise ValueError(f"unexpected line in the transfer table: {line!r}")
        medians[line[:10].strip()] = (float(fields[0]), float(fields[1]))
    return medians


def _bars(axes: Any, labels: Sequence[str], values: Sequence[float], title: str,
          better: str) -> None:
    colours = [OURS_COLOUR if label in OURS else PEER_COLOUR for label in labels]
    positions = range(len(labels))
    axes.barh(positions, values, color=colours)
    axes.set_yticks(list(positions), labels)
    axes.invert_yaxis()  # contenders top to bottom in the scripts' order
    axes.set_title(f"{title} ({better} is better)", fontsize=9)
    axes.tick_params(labelsize=8)
    top = max(values) if values else 1.0
    for position, value in zip(positions, values):
        label = f"{value:.0f}" if value >= 100 else f"{value:.3g}"
        axes.text(value + top * 0.01, position, label, va="center", fontsize=7)
    axes.set_xlim(0, top * 1.18)


def _figure(panels: List[Tuple[List[str], List[float], str, str]], columns: int,
            caption: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = -(-len(panels) // columns)
    figure, grid = pyplot.subplots(rows, columns, figsize=(4.2 * columns, 2.3 * rows),
                                   squeeze=False)
    for axes, panel in zip(grid.flat, panels):
        _bars(axes, *panel)
    for axes in list(grid.flat)[len(panels):]:
        axes.set_visible(False)
    figure.suptitle(caption, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp or version in the file: a redraw of the same numbers is the same PNG.
    figure.savefig(path, dpi=110, metadata={"Software": None})
    pyplot.close(figure)


def draw_commands(source: Path, path: Path) -> None:
    results = _load_json(source)
    medians = command_medians(results)
    panels = []
    for key, title, better in COMMAND_METRICS:
        labels = [name for name in medians if key in medians[name]]
        if labels:
            panels.append((labels, [medians[name][key] for name in labels], title, better))
    # The file holds every repetition of every contender; the most any contender ran.
    repeats = max(len(runs) for runs in results["runs"].values())
    _figure(panels, 2, "Commands over one connection to a private OpenSSH sshd, MaxSessions 10"
            f" (median of {repeats})", path)


def draw_fanout(source: Path, path: Path) -> None:
    panels = []
    for size, contenders in sorted(fanout_cells(_load_json(source)).items()):
        for key, title, better in FANOUT_METRICS:
            labels = list(contenders)
            panels.append((labels, [contenders[name][key] for name in labels],
                           f"N={size} {title}", better))
    _figure(panels, len(FANOUT_METRICS), "Many hosts: one sshd on 16 loopback addresses", path)


def draw_transfer(source: Path, path: Path) -> None:
    medians = transfer_medians(source.read_text(encoding="utf-8"))
    labels = list(medians)
    panels = [
        (labels, [medians[name][0] for name in labels], "upload MiB/s", "higher"),
        (labels, [medians[name][1] for name in labels], "download MiB/s", "higher"),
    ]
    _figure(panels, 2, "SFTP over one connection to a private OpenSSH sshd"
            " (transfer = this library)", path)


def _load_json(path: Path) -> Dict[str, Any]:
    with path.open(encoding="utf-8") as file:
        loaded: Dict[str, Any] = json.load(file)
    return loaded


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=Path, default=RESULTS / "commands.json",
                        help="run.py --json output (default: %(default)s)")
    parser.add_argument("--fanout", type=Path, default=RESULTS / "fanout.json",
                        help="fanout.py --json output (default: %(default)s)")
    parser.add_argument("--transfer", type=Path, default=RESULTS / "transfer.txt",
                        help="transfer.py's printed output (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=CHARTS,
                        help="directory for the PNGs (default: %(default)s)")
    args = parser.parse_args(argv)
    jobs = (
        (args.commands, "commands.png", draw_commands),
        (args.fanout, "fanout.png", draw_fanout),
        (args.transfer, "transfer.png", draw_transfer),
    )
    drawn = 0
    for source, name, draw in jobs:
        target = args.out / name
        if not source.exists():
            print(f"note: {source} not found: {name} not drawn", file=sys.stderr)
            continue
        draw(source, target)
        print(f"{target} from {source}")
        drawn += 1
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(main())
