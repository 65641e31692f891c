"""What idle connections cost: client CPU of N connected, idle executors, and how fast they close.

    python benchmarks/idle.py                     # 200 executors, 10 s idle
    python benchmarks/idle.py --executors 50 --seconds 5 --library-path /other/checkout

Needs root and ``/usr/sbin/sshd``: one private sshd on 127.0.0.1 (testsupport's
fixture). The script connects ``--executors`` SSHExecutors (``max_sessions=10``
given: no probe), each runs ``true`` once, then the process sits idle for
``--seconds`` while its CPU time (user + system, all threads, ``getrusage``)
is measured: printed as a percentage of one core. Then every executor is
closed, one after another, and the time per ``close()`` (median and worst) is
printed, with how long the last transport thread took to end.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--executors", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0, help="idle time measured")
    parser.add_argument("--library-path", help="import paramiko_executor from this checkout")
    args = parser.parse_args()
    if not 1 <= args.executors <= 1000 or not 0 < args.seconds <= 120:
        parser.error("--executors must be 1..1000 and --seconds 0..120")
    sys.path.insert(0, ROOT)
    if args.library_path:
        sys.path.insert(0, os.path.abspath(args.library_path))
    from paramiko_executor import SSHExecutor
    from testsupport.openssh import OpenSSHServer

    server = OpenSSHServer(max_sessions=10, max_startups=100, log_level="ERROR")
    executors: List[Any] = []
    try:
        server.start()
        params = server.executor_parameters(max_sessions=10)
        executors = [SSHExecutor(**params) for _ in range(args.executors)]
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(lambda ex: ex.run_command("true"), executors))
        threads = threading.active_count()
        time.sleep(1.0)  # let every transport thread settle into its idle read
        cpu, started = cpu_seconds(), time.perf_counter()
        time.sleep(args.seconds)
        share = (cpu_seconds() - cpu) / (time.perf_counter() - started)
        transports = [ex.state.transport for ex in executors]
        closes = []
        for ex in executors:
            began = time.perf_counter()
            ex.close()
            closes.append(time.perf_counter() - began)
        began = time.perf_counter()
        for transport in transports:
            transport.join(30)
        ended = time.perf_counter() - began
        print(f"{args.executors} idle connected executors ({threads} threads): "
              f"{share * 100:.2f} % of one core over {args.seconds:g} s")
        print(f"close(): median {statistics.median(closes) * 1000:.2f} ms, worst "
              f"{max(closes) * 1000:.2f} ms; every transport thread ended "
              f"{ended * 1000:.0f} ms after the last close")
        return 0
    finally:
        for ex in executors:
            ex.close()
        server.close()


if __name__ == "__main__":
    sys.exit(main())
