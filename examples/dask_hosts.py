"""Scale out: Dask worker processes running remote commands through a pickled SSHExecutor.

    python examples/dask_hosts.py                       # against the built-in test server
    python examples/dask_hosts.py --host login.example.org --user clown

A Dask ``LocalCluster`` of 2 worker processes (2 threads each) runs 40 tasks;
every task gets the executor as an argument, so Dask pickles it into every
task. Pickling carries the configuration, not the connection, and executors
unpickled in one process with the same configuration share one connection:
the server sees one connection per worker process, not one per task.
Needs ``pip install "dask[distributed]"``.
"""

import os

import _target
from distributed import Client, LocalCluster

from paramiko_executor import CommandExecutionFailure, ExecutorFailure, SSHExecutor

TASKS = 40


def checksum(executor: SSHExecutor, number: int) -> tuple:
    """One task: the remote ``cksum`` of a number; the worker's pid and its connection's port."""
    result = executor.run_command("cksum", stdin_input=f"{number}\n")
    with executor.bounded_connection as transport:  # the connection the command used
        local_port = transport.sock.getsockname()[1]
    return os.getpid(), local_port, result.stdout.split()[0]


def main() -> int:
    args = _target.parser(__doc__.splitlines()[0]).parse_args()
    with _target.target(args) as parameters, SSHExecutor(**parameters) as executor:
        with LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            futures = [client.submit(checksum, executor, n, pure=False) for n in range(TASKS)]
            done = []
            for future in futures:
                try:
                    done.append(future.result(timeout=120))
                except (CommandExecutionFailure, ExecutorFailure) as failure:
                    print(f"a task failed: {failure}")
        workers = {pid for pid, _, _ in done}
        connections = {(pid, port) for pid, port, _ in done}
        print(f"{len(done)} of {TASKS} tasks succeeded on {len(workers)} worker processes")
        print(f"cksum of 0..2: {[crc for _, _, crc in done[:3]]}")
        print(f"SSH connections used: {len(connections)} (one per worker process)")
    return 0 if len(done) == TASKS else 1


if __name__ == "__main__":
    raise SystemExit(main())
