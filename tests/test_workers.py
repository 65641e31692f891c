"""Task frameworks that ship a pickled executor with every task: one connection per process.

The contract: executors unpickled in one process with the same configuration
share one connection (a process-wide registry keeps it open after the copy that
made it is gone), so ``concurrent.futures.ProcessPoolExecutor`` and Dask
distributed open one connection per worker process and host, not one per task.
Counted at the server: sshd logs one "Accepted publickey" per connection, and
``$SSH_CONNECTION`` names each session's client port (one port per connection).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Tuple

import pytest

from paramiko_executor import SSHExecutor

WAIT = 120.0  # seconds a batch of tasks may take before the test counts it as hung


def where_it_ran(executor: SSHExecutor, task: int) -> Tuple[int, str, int]:
    """Run one command; return this worker's pid, the connection's client port, the task."""
    client_port = executor.run_command("echo $SSH_CONNECTION").stdout.split()[1]
    return os.getpid(), client_port, task


@pytest.fixture
def sshd_workers(make_sshd):
    """A private sshd for one test: its log holds only that test's logins."""
    return make_sshd(max_sessions=10)


def check_one_connection_per_process(server, results, tasks: int) -> None:
    assert sorted(task for _, _, task in results) == list(range(tasks))
    pids = {pid for pid, _, _ in results}
    ports = {port for _, port, _ in results}
    assert os.getpid() not in pids
    # One connection per worker process: the same client port for all its tasks...
    assert len(ports) == len(pids), f"{len(ports)} connections for {len(pids)} processes"
    for pid in pids:
        assert len({port for p, port, _ in results if p == pid}) == 1
    # ...and sshd saw exactly that many logins (wait_for_log: sshd logs a bit late; it
    # returns early once it sees more, which then fails the equality).
    assert server.wait_for_log("Accepted publickey", len(pids) + 1, timeout=2) == len(pids)


@pytest.mark.hang_timeout(300)
def test_process_pool_opens_one_connection_per_worker_process(sshd_workers):
    executor = SSHExecutor(**sshd_workers.executor_parameters())
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        # submit pickles the executor anew for every task, as task frameworks do
        futures = [pool.submit(where_it_ran, executor, task) for task in range(20)]
        results = [future.result(timeout=WAIT) for future in futures]
    check_one_connection_per_process(sshd_workers, results, 20)


@pytest.mark.hang_timeout(300)
def test_dask_local_cluster_opens_one_connection_per_worker_process(sshd_workers):
    distributed = pytest.importorskip("distributed")
    cloudpickle = pytest.importorskip("cloudpickle")
    # Ship this module's task function by value: the worker processes need not import it.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    executor = SSHExecutor(**sshd_workers.executor_parameters())
    try:
        with distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=2, dashboard_address=None,
            silence_logs=40,
        ) as cluster, distributed.Client(cluster) as client:
            futures = [client.submit(where_it_ran, executor, task, pure=False)
                       for task in range(40)]
            distributed.wait(futures, timeout=WAIT)
            results = client.gather(futures, errors="raise")
            worker_pids = set(client.run(os.getpid).values())
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert {pid for pid, _, _ in results} <= worker_pids
    check_one_connection_per_process(sshd_workers, results, 40)
