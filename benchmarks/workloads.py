"""The benchmark workloads, and the drivers that run them on one contender.

This module runs inside each contender's own interpreter (which may be a
separate virtual environment), so it uses the standard library only.

A contender is an object with ``run(command, stdin_input) -> stdout``,
``connect_probe()`` (a fresh connection: connect, authenticate, probe the
session limit, close) and ``close()``. Synchronous contenders are driven by
threads; asynchronous ones (``is_async = True``, coroutine methods) by tasks
on one event loop that lives as long as the contender.
"""

from __future__ import annotations

import asyncio
import math
import resource
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

MIB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    """Sizes of the workloads; ``FULL`` is the targets' sizes, ``QUICK`` a smoke run."""

    w1_commands: int = 200
    w2_commands: int = 1000
    w2_concurrency: tuple = (10, 100)
    w3_bytes: int = 64 * MIB
    w3_runs: int = 5
    w4_bytes: int = 16 * MIB
    w4_runs: int = 5
    w5_runs: int = 5
    w6_commands: int = 100
    w6_concurrency: int = 20
    w6_bytes: int = 1 * MIB
    scale_threads: int = 1000
    scale_commands: int = 10_000
    #: no workload starts new commands after this many seconds
    workload_seconds: float = 120.0
    scale_seconds: float = 180.0


FULL = Plan()
QUICK = Plan(
    w1_commands=20,
    w2_commands=100,
    w3_bytes=8 * MIB,
    w3_runs=1,
    w4_bytes=2 * MIB,
    w4_runs=1,
    w5_runs=2,
    w6_commands=10,
    scale_threads=100,
    scale_commands=1000,
    workload_seconds=30.0,
    scale_seconds=30.0,
)

WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6")


def base64_length(size: int) -> int:
    """Length of GNU ``base64`` output for ``size`` input bytes (76-column lines)."""
    encoded = 4 * math.ceil(size / 3)
    return encoded + math.ceil(encoded / 76)


class ConnectionCounter:
    """Counts the TCP connections this process opens to one server port.

    Every contender connects through ``socket.socket.connect`` (paramiko
    directly, asyncio's selector loop for its non-blocking connect), so
    counting there sees reconnects of any contender without its help.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        original = socket.socket.connect
        counter = self

        def connect(sock: socket.socket, address: Any) -> Any:
            if isinstance(address, tuple) and len(address) >= 2 and address[1] == counter.port:
                counter.count += 1
            return original(sock, address)

        socket.socket.connect = connect  # type: ignore[method-assign]


def cpu_seconds() -> float:
    """User plus system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)  # finer-grained than os.times()
    return usage.ru_utime + usage.ru_stime


def _status_field(name: str) -> int:
    """A numeric field of /proc/self/status (Linux), -1 if absent."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return -1


def rss_kib() -> int:
    """Current resident set size of this process in KiB."""
    return _status_field("VmRSS")


def peak_rss_kib() -> int:
    """Peak resident set size of this process so far, in KiB."""
    return _status_field("VmHWM")


def os_threads() -> int:
    """Number of OS threads of this process, including non-Python ones."""
    return _status_field("Threads")


@dataclass
class Batch:
    """Outcome of running one command many times."""

    count: int
    seconds: float
    done: int
    failures: int
    started: int
    hung: int
    first_error: Optional[str]
    cpu: float


class Driver:
    """Runs commands of one contender, sequentially or concurrently.

    ``on_progress(done)`` is called after every finished command of a batch
    (from the thread or task that finished it).
    """

    def __init__(self, contender: Any) -> None:
        self.contender = contender

    def once(self, command: str, stdin_input: Any = None) -> Any:
        raise NotImplementedError

    def connect_probe(self) -> None:
        raise NotImplementedError

    def batch(
        self,
        command: str,
        count: int,
        concurrency: int,
        check: Callable[[Any], None],
        seconds: float,
        on_progress: Optional[Callable[[int], None]] = None,
    ) -> Batch:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _Tally:
    """Shared counters of one batch, guarded by one lock."""

    def __init__(self, count: int, deadline: float) -> None:
        self.count = count
        self.deadline = deadline
        self.lock = threading.Lock()
        self.started = 0
        self.done = 0
        self.failures = 0
        self.first_error: Optional[str] = None

    def take(self) -> bool:
        with self.lock:
            if self.started >= self.count or time.monotonic() > self.deadline:
                return False
            self.started += 1
            return True

    def record(
        self, error: Optional[BaseException], on_progress: Optional[Callable[[int], None]]
    ) -> None:
        """Count one finished command (``error`` None: it succeeded) and report progress."""
        with self.lock:
            if error is None:
                self.done += 1
            else:
                self.failures += 1
                if self.first_error is None:
                    self.first_error = f"{type(error).__name__}: {error}"[:300]
            finished = self.done + self.failures
        if on_progress is not None:
            on_progress(finished)


class ThreadDriver(Driver):
    """Drives a synchronous contender with a fixed pool of worker threads."""

    def once(self, command: str, stdin_input: Any = None) -> Any:
        return self.contender.run(command, stdin_input)

    def connect_probe(self) -> None:
        self.contender.connect_probe()

    def batch(self, command, count, concurrency, check, seconds, on_progress=None) -> Batch:
        tally = _Tally(count, time.monotonic() + seconds)
        go = threading.Event()

        def worker() -> None:
            go.wait()
            while tally.take():
                try:
                    check(self.contender.run(command, None))
                except Exception as error:  # a failure is a result here, not a crash
                    tally.record(error, on_progress)
                else:
                    tally.record(None, on_progress)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        cpu0 = cpu_seconds()
        start = time.perf_counter()
        go.set()
        # Grace for commands still running at the deadline; a hung one is reported.
        join_until = time.monotonic() + seconds + 60
        for thread in threads:
            thread.join(max(0.0, join_until - time.monotonic()))
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds() - cpu0
        hung = sum(thread.is_alive() for thread in threads)
        return Batch(
            count, elapsed, tally.done, tally.failures, tally.started, hung, tally.first_error, cpu
        )

    def close(self) -> None:
        self.contender.close()


class AsyncDriver(Driver):
    """Drives an asyncio contender with a fixed pool of worker tasks."""

    def __init__(self, contender: Any) -> None:
        super().__init__(contender)
        self.loop = asyncio.new_event_loop()

    def once(self, command: str, stdin_input: Any = None) -> Any:
        return self.loop.run_until_complete(self.contender.run(command, stdin_input))

    def connect_probe(self) -> None:
        self.loop.run_until_complete(self.contender.connect_probe())

    def batch(self, command, count, concurrency, check, seconds, on_progress=None) -> Batch:
        tally = _Tally(count, time.monotonic() + seconds)

        async def worker() -> None:
            while tally.take():
                try:
                    check(await self.contender.run(command, None))
                except Exception as error:  # a failure is a result here, not a crash
                    tally.record(error, on_progress)
                else:
                    tally.record(None, on_progress)

        async def all_workers() -> int:
            tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
            _, pending = await asyncio.wait(tasks, timeout=seconds + 60)
            for task in pending:
                task.cancel()
            return len(pending)

        cpu0 = cpu_seconds()
        start = time.perf_counter()
        hung = self.loop.run_until_complete(all_workers())
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds() - cpu0
        return Batch(
            count, elapsed, tally.done, tally.failures, tally.started, hung, tally.first_error, cpu
        )

    def close(self) -> None:
        self.loop.run_until_complete(self.contender.close())
        self.loop.close()


def make_driver(contender: Any) -> Driver:
    return (
        AsyncDriver(contender) if getattr(contender, "is_async", False) else ThreadDriver(contender)
    )


def _expect_empty(stdout: Any) -> None:
    if len(stdout) != 0:
        raise AssertionError(f"`true` printed {len(stdout)} characters")


def _expect_length(length: int) -> Callable[[Any], None]:
    def check(stdout: Any) -> None:
        if len(stdout) != length:
            raise AssertionError(f"expected {length} characters of output, got {len(stdout)}")

    return check


def _batch_metrics(prefix: str, batch: Batch, reconnects: int) -> Dict[str, Any]:
    metrics: Dict[str, Any] = {
        f"{prefix}_done": batch.done,
        f"{prefix}_cmd_s": batch.done / batch.seconds if batch.done else 0.0,
        # commands started but never finished (hung past the grace) count as failures
        f"{prefix}_failures": batch.started - batch.done,
        f"{prefix}_reconnects": reconnects,
        f"{prefix}_cpu_ms_per_cmd": 1000 * batch.cpu / max(1, batch.done + batch.failures),
        f"{prefix}_incomplete": batch.started < batch.count,
    }
    if batch.first_error:
        metrics[f"{prefix}_first_error"] = batch.first_error
    if batch.hung:
        metrics[f"{prefix}_hung"] = batch.hung
    return metrics


def run_w1(driver: Driver, plan: Plan, counter: ConnectionCounter) -> Dict[str, Any]:
    """W1: sequential ``true`` commands, one at a time from one caller."""
    connections = counter.count
    batch = driver.batch("true", plan.w1_commands, 1, _expect_empty, plan.workload_seconds)
    metrics = _batch_metrics("w1", batch, counter.count - connections)
    metrics["w1_ms_per_cmd"] = 1000 * batch.seconds / max(1, batch.done)
    return metrics


def serve_w1_turns(driver: Driver, plan: Plan, lines: Any, emit: Callable[[Dict[str, Any]], None]
                   ) -> None:
    """W1 in turns: for each line ``GO n`` read from ``lines``, ``n`` sequential ``true``.

    Emits ``{"turn": {"ms_per_cmd": ..., "cpu_ms_per_cmd": ..., "done": ...}}``
    after each turn; ends at a line ``END`` or at the end of ``lines``. The
    driver of ``run.py --w1-turns`` starts every contender, connected and
    idle, and gives them turns one after another, so that each block of
    every contender runs under the same load of the machine.
    """
    for line in lines:
        words = line.split()
        if words[:1] != ["GO"] or len(words) != 2:
            return
        batch = driver.batch("true", int(words[1]), 1, _expect_empty, plan.workload_seconds)
        emit({"turn": {"ms_per_cmd": 1000 * batch.seconds / max(1, batch.done),
                       "cpu_ms_per_cmd": 1000 * batch.cpu / max(1, batch.done),
                       "done": batch.done, "failures": batch.started - batch.done}})


def run_w2(driver: Driver, plan: Plan, counter: ConnectionCounter) -> Dict[str, Any]:
    """W2: ``true`` at each concurrency over the one (already open) connection."""
    metrics: Dict[str, Any] = {}
    for concurrency in plan.w2_concurrency:
        connections = counter.count
        batch = driver.batch(
            "true", plan.w2_commands, concurrency, _expect_empty, plan.workload_seconds
        )
        metrics.update(_batch_metrics(f"w2c{concurrency}", batch, counter.count - connections))
    return metrics


def _bulk(
    driver: Driver, command: str, stdin_input: Any, runs: int, check: Callable[[Any], None]
) -> List[float]:
    # One run first, unmeasured: the first large transfer of a process pays
    # for growing buffers on both sides (up to 4x slower here), not for its client.
    check(driver.once(command, stdin_input))
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        output = driver.once(command, stdin_input)
        seconds.append(time.perf_counter() - start)
        check(output)
    return seconds


def run_w3(driver: Driver, plan: Plan, counter: ConnectionCounter) -> Dict[str, Any]:
    """W3: one large stdout (``head -c N /dev/zero``), median of a few runs."""
    cpu0 = cpu_seconds()
    seconds = _bulk(
        driver,
        f"head -c {plan.w3_bytes} /dev/zero",
        None,
        plan.w3_runs,
        _expect_length(plan.w3_bytes),
    )
    return {
        "w3_mib_s": plan.w3_bytes / MIB / statistics.median(seconds),
        "w3_cpu_s_per_64mib": (cpu_seconds() - cpu0) / plan.w3_runs * (64 * MIB / plan.w3_bytes),
    }


def run_w4(driver: Driver, plan: Plan, counter: ConnectionCounter) -> Dict[str, Any]:
    """W4: a large stdin into ``wc -c``; the count printed back is checked."""
    data = "x" * plan.w4_bytes

    def check(stdout: Any) -> None:
        text = stdout.decode() if isinstance(stdout, bytes) else stdout
        if int(text.strip()) != plan.w4_bytes:
            raise AssertionError(f"wc -c counted {text.strip()}, sent {plan.w4_bytes}")

    seconds = _bulk(driver, "wc -c", data, plan.w4_runs, check)
    return {"w4_mib_s": plan.w4_bytes / MIB / statistics.median(seconds)}


def run_w5(driver: Driver, plan: Plan, counter: ConnectionCounter) -> Dict[str, Any]:
    """W5: a fresh connection: connect, authenticate, probe MaxSessions, close."""
    seconds = []
    for _ in range(plan.w5_runs):
        start = time.perf_counter()
        driver.connect_probe()
        seconds.append(time.perf_counter() - start)
    return {"w5_ms": 1000 * statistics.median(seconds)}


def run_w6(driver: Driver, plan: Plan, counter: ConnectionCounter) -> Dict[str, Any]:
    """W6: medium outputs (1 MiB of random data, base64) at concurrency 20."""
    connections = counter.count
    command = f"head -c {plan.w6_bytes} /dev/urandom | base64"
    batch = driver.batch(
        command,
        plan.w6_commands,
        plan.w6_concurrency,
        _expect_length(base64_length(plan.w6_bytes)),
        plan.workload_seconds,
    )
    metrics = _batch_metrics("w6", batch, counter.count - connections)
    return metrics


RUNNERS = {"W1": run_w1, "W2": run_w2, "W3": run_w3, "W4": run_w4, "W5": run_w5, "W6": run_w6}


def run_scale(driver: Driver, plan: Plan, counter: ConnectionCounter) -> Dict[str, Any]:
    """Scale: many callers on one executor; rate vs c100, memory and thread samples.

    Samples (commands finished, RSS, OS threads) are taken at every tenth of
    the commands, by the caller that finished that command.
    """
    reference = driver.batch("true", plan.w2_commands, 100, _expect_empty, plan.workload_seconds)
    samples: List[Dict[str, int]] = []
    step = max(1, plan.scale_commands // 10)
    sample_lock = threading.Lock()

    def on_progress(finished: int) -> None:
        if finished % step == 0:
            sample = {"done": finished, "rss_kib": rss_kib(), "threads": os_threads()}
            with sample_lock:
                samples.append(sample)

    connections = counter.count
    threads_before = os_threads()
    rss_before = rss_kib()
    batch = driver.batch(
        "true",
        plan.scale_commands,
        plan.scale_threads,
        _expect_empty,
        plan.scale_seconds,
        on_progress,
    )
    samples.sort(key=lambda sample: sample["done"])
    metrics = _batch_metrics("scale", batch, counter.count - connections)
    metrics.update(
        {
            "scale_c100_cmd_s": reference.done / reference.seconds if reference.done else 0.0,
            "scale_threads_before": threads_before,
            "scale_threads_max": max((sample["threads"] for sample in samples), default=-1),
            "scale_rss_before_kib": rss_before,
            "scale_samples": samples,
            "scale_peak_rss_kib": peak_rss_kib(),
            "scale_workers": plan.scale_threads,
            "scale_count": plan.scale_commands,
        }
    )
    return metrics
