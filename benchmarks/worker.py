"""Runs the workloads for ONE contender in this (fresh) interpreter.

Started by ``run.py``, once per contender per repetition::

    python benchmarks/worker.py CONTENDER PARAMS_JSON --workloads W1,W2 [--quick] [--scale]

Writes one JSON object per line to stdout as each workload finishes, so a
run that is killed at its timeout still reports what it measured:
``{"unavailable": why}`` when the contender cannot be imported,
``{"workload": W, "metrics": {...}}`` or ``{"workload": W, "error": why}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from typing import Any, Dict

from contenders import MODULES
from workloads import (
    FULL,
    QUICK,
    RUNNERS,
    ConnectionCounter,
    make_driver,
    run_scale,
    serve_w1_turns,
)


def emit(record: Dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contender", choices=sorted(MODULES))
    parser.add_argument("params", help="executor parameters as JSON")
    parser.add_argument("--workloads", default=",".join(RUNNERS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", action="store_true", help="run the scale workload only")
    parser.add_argument("--w1-turns", action="store_true",
                        help="connect, print ready, then W1 blocks as stdin asks (run.py)")
    args = parser.parse_args()
    params = json.loads(args.params)
    plan = QUICK if args.quick else FULL
    try:
        module = importlib.import_module(f"contenders.{MODULES[args.contender]}")
    except ImportError as error:
        emit({"unavailable": f"{type(error).__name__}: {error}"})
        return 3
    counter = ConnectionCounter(params["port"])
    driver = make_driver(module.Contender(params))
    try:
        driver.once("true")  # connect and warm up outside any measurement
        if args.w1_turns:
            emit({"ready": True})
            serve_w1_turns(driver, plan, sys.stdin, emit)
            return 0
        runners = (
            {"scale": run_scale}
            if args.scale
            else {w: RUNNERS[w] for w in args.workloads.split(",")}
        )
        for name, runner in runners.items():
            try:
                emit({"workload": name, "metrics": runner(driver, plan, counter)})
            except Exception as error:  # report and go on with the next workload
                traceback.print_exc()
                emit({"workload": name, "error": f"{type(error).__name__}: {error}"[:300]})
    finally:
        driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
