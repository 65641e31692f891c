"""Fork, spawn and pickle: every process runs its own connection, never its parent's."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from paramiko_executor import SSHExecutor


def run_batch(executor: SSHExecutor, worker: int, count: int) -> list:
    """Run ``count`` commands in a spawned worker; returns their outputs and the worker's pid."""
    outputs = [executor.run_command(f"echo {worker}-{i}").stdout for i in range(count)]
    return [os.getpid(), outputs]


def test_pickled_executor_connects_on_first_use(test_server):
    ex = SSHExecutor(**test_server.executor_parameters())
    assert ex.run_command("echo parent").stdout == "parent\n"
    copy = pickle.loads(pickle.dumps(ex))
    assert copy.state is None
    assert copy.run_command("echo copy").stdout == "copy\n"
    assert test_server.connections_accepted == 2
    assert ex.run_command("echo parent again").stdout == "parent again\n"
    ex.close()
    copy.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_opens_its_own_connection(test_server):
    ex = SSHExecutor(**test_server.executor_parameters())
    with ThreadPoolExecutor(8) as pool:
        # Commands in flight in other threads while the process forks.
        busy = [pool.submit(ex.run_command, f"sleep 0.2; echo {i}") for i in range(8)]
        parent_transport = ex.state.transport if ex.state else None
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: must not touch the parent's socket
            status = 1
            try:
                os.close(read_end)
                assert ex.state is None
                outputs = [ex.run_command(f"echo child {i}").stdout for i in range(20)]
                ok = outputs == [f"child {i}\n" for i in range(20)]
                os.write(write_end, b"ok" if ok else b"bad")
                status = 0 if ok else 1
            finally:
                os._exit(status)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as pipe:
            assert pipe.read() == b"ok"
        assert os.WEXITSTATUS(status) == 0
        assert [f.result(timeout=30).stdout for f in busy] == [f"{i}\n" for i in range(8)]
    assert ex.run_command("echo parent").stdout == "parent\n"
    if parent_transport is not None:
        assert ex.state.transport is parent_transport
    assert test_server.connections_accepted == 2
    ex.close()


def test_spawned_process_pool_runs_its_own_connections(test_server):
    ex = SSHExecutor(**test_server.executor_parameters())
    ex.run_command("true")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=context) as pool:
        results = list(pool.map(run_batch, [ex] * 4, range(4), [50] * 4, timeout=120))
    for worker, (_, outputs) in enumerate(results):
        assert outputs == [f"{worker}-{i}\n" for i in range(50)]
    workers = {pid for pid, _ in results}
    assert os.getpid() not in workers
    # One connection for the parent and one per worker process that ran a batch.
    assert test_server.connections_accepted == 1 + len(workers)
    assert ex.run_command("echo parent").stdout == "parent\n"
    ex.close()


def test_copies_unpickled_from_separate_pickles_share_one_connection():
    # A task framework pickles the executor anew for every task; a pkey's text
    # differs between picklings (OpenSSH's random check value, a fresh salt when
    # encrypted), yet it is the same configuration.
    import io

    import paramiko
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from paramiko_executor import SSHExecutor

    text = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()).decode()
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(text))
    for extra in ({}, {"passphrase": "not a secret"}):
        ex = SSHExecutor(host="127.0.0.1", port=1, username="u", pkey=key, known_hosts=None,
                         config=(), **extra)
        first, second = (pickle.loads(pickle.dumps(ex)) for _ in range(2))
        assert first._connection is second._connection
        other = SSHExecutor(host="127.0.0.1", port=2, username="u", pkey=key, known_hosts=None,
                            config=(), **extra)
        assert pickle.loads(pickle.dumps(other))._connection is not first._connection
