"""A user's program over the documented API, written as README.rst shows.

Never run: ``tests/test_typing.py`` checks it with ``mypy --strict``, so the
package's public types cannot regress. No casts, no ``type: ignore``: a user
writing this must get no errors.
"""

from __future__ import annotations

import io
import selectors
import socket
from concurrent.futures import ThreadPoolExecutor, as_completed
from types import MappingProxyType
from typing import Dict, List, Mapping, Optional, Union

import paramiko

from paramiko_executor import (
    SAFE_WRAPPER,
    AuthenticationFailure,
    CommandExecutionFailure,
    CommandResult,
    CommandTimeout,
    ConnectionState,
    DupingSSHExecutor,
    Executor,
    ExecutorError,
    ExecutorFailure,
    ExecutorStatistics,
    ForwardedSocket,
    ForwardTimeout,
    GroupFailure,
    GroupResult,
    HostGroup,
    HostKeyFailure,
    LocalTunnel,
    RemoteTunnel,
    ShellExecutor,
    SSHExecutor,
    TransferTimeout,
    Tunnel,
    probe_max_session,
)
from paramiko_executor.testing import SSHTestServer


def quickstart() -> int:
    with SSHExecutor(host="login.example.org", username="clown") as executor:
        with ThreadPoolExecutor(max_workers=100) as pool:
            results = pool.map(executor.run_command, [f"echo {n}" for n in range(1000)])
            return sum(int(result.stdout) for result in results)


def everyday(executor: SSHExecutor) -> None:
    result = executor.run_command("uname -a")
    print(result.stdout, result.stderr, result.exit_code)
    result = executor.run_command("wc -l", stdin_input="one\ntwo\n")
    first: str = result.stdout.strip()
    lines: List[str] = result.stdout.splitlines()
    code: int = result.exit_code
    signal_name: str | None = result.exit_signal
    print(first, lines, code, signal_name)
    try:
        executor.run_command("exit 3", timeout=10)
    except CommandTimeout as timeout:
        print(timeout.exit_code is None, timeout.stdout)
    except CommandExecutionFailure as failure:
        exit_code: int | None = failure.exit_code
        print(exit_code, failure.stdout, failure.stderr, failure.message, failure.exit_signal)
        print(f"refused (exit {failure.exit_code}): {failure.stderr.strip()}")
    except ExecutorFailure as failure:
        description: str = failure.description
        owner: Executor | None = failure.executor
        print(description, owner)
    executor.run_command("env | grep ^PEXEC_", env={"PEXEC_MODE": "fast"}, check=False)
    settings: Mapping[str, str] = MappingProxyType({"PEXEC_MODE": "slow"})
    executor.run_command("env | grep ^PEXEC_", env=settings, check=False)
    blob: bytes = executor.run_command("tar -C /data -c .", encoding=None).stdout
    raw: CommandResult[bytes] = executor.run_command("cat /bin/true", encoding=None)
    text: CommandResult[str] = executor.run_command("cat /etc/hostname", encoding="latin-1")
    print(len(blob), raw.stderr.decode(), text.stdout.upper())


def live_output(executor: SSHExecutor) -> None:
    def show(stream: str, line: str) -> None:
        print(f"[{stream}] {line}", end="")

    def show_bytes(stream: str, line: bytes) -> None:
        print(stream, line.hex())

    collected: List[str] = []
    executor.run_command("tail -n 50 -f job.log | head -n 1000", on_output=show,
                         keep_output=False)
    executor.run_command("cat /bin/true", encoding=None, on_output=show_bytes)
    executor.run_command("seq 3", on_output=lambda stream, line: collected.append(line))


def files() -> None:
    with SSHExecutor(host="login.example.org", username="clown") as executor:
        sent: int = executor.put("report.csv", "/srv/data/report.csv", mode=0o640)
        received: int = executor.get("/var/log/app.log", "app.log", timeout=60)
        buffer = io.BytesIO()
        executor.get("/etc/hostname", buffer, progress=lambda done, total: print(done, total))
        print(sent, received, buffer.getvalue())


def connection() -> None:
    with SSHExecutor(host="login.example.org", max_sessions=8) as executor:
        with executor.bounded_connection as transport:
            channel: paramiko.Channel = transport.open_session()
            channel.close()
        statistics: ExecutorStatistics = executor.statistics()
        wait: float = statistics.queue_wait_seconds_max
        limit: int | None = executor.session_limit
        print(statistics.commands_started, statistics.max_sessions, wait, limit)


def tunnels() -> None:
    with SSHExecutor(host="login.example.org") as executor:
        with executor.forward_local(5432, "db.internal") as tunnel:
            host, port = tunnel.local_address
            print(f"postgresql://{host}:{port}/app")
        with executor.forward_remote(8080, 8000) as remote:
            print(remote.remote_address[1])
        with executor.open_connection("db.internal", 5432, timeout=10) as sock:
            sock.sendall(b"ping")
            reply: bytes = sock.recv(4)
            print(reply)


def futures(executor: SSHExecutor, nodes: List[str]) -> Dict[str, str]:
    found: Dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=50) as pool:
        submitted = {pool.submit(executor.run_command, f"scontrol show node {node}"): node
                     for node in nodes}
        for future in as_completed(submitted):
            found[submitted[future]] = future.result().stdout.split()[0]
    return found


def free_disk(executor: Executor) -> str:
    return executor.run_command("df -h /").stdout


def either(executor: Executor, encoding: Optional[str]) -> Union[str, bytes]:
    return executor.run_command("cat /etc/motd", encoding=encoding).stdout


def local_and_duping() -> None:
    with ShellExecutor() as shell:
        local: ShellExecutor = shell
        print(free_disk(local), shell.run_command("ls", encoding=None).stdout.count(b"\n"))
    with DupingSSHExecutor(host="login.example.org", wrapper="/bin/bash") as duping:
        same: DupingSSHExecutor = duping
        same.run_command("sbatch", stdin_input=b"#!/bin/sh\n")
        print(free_disk(same))


def many_hosts() -> None:
    hosts = [
        "node1",
        {"host": "10.0.0.7", "port": 2222, "name": "gpu"},
        {"host": "login.example.org", "username": "ops"},
    ]
    with HostGroup(hosts, username="clown", connect_retries=2) as group:
        same: HostGroup = group
        result: GroupResult[CommandResult[str]] = group.run_command("uptime", timeout=30)
        for name, outcome in result.succeeded.items():
            print(name, outcome.stdout.strip())
        for name, failure in result.failed.items():
            print(name, "failed:", failure)
        for name, entry in result.items():
            if isinstance(entry, CommandResult):
                print(name, entry.exit_code)
        for name, done in group.run_command_as_completed("hostname"):
            print(name, done)
        sizes: GroupResult[int] = same.put("report.csv", "/tmp/report.csv")
        total: int = sum(sizes.succeeded.values())
        fetched = group.get("/etc/hostname", "collected")
        every: Dict[str, ExecutorStatistics] = group.statistics()
        print(total, len(fetched.failed), every)
        try:
            result.raise_for_failures()
        except GroupFailure as failure:
            print(sorted(failure.failed))


def timeouts_are_timeout_errors(executor: SSHExecutor) -> None:
    try:
        executor.put("big.tar", "/scratch/big.tar", timeout=60)
    except TransferTimeout as late:
        as_timeout: TimeoutError = late
        as_failure: ExecutorFailure = late
        print(as_timeout, as_failure.description)
    try:
        executor.open_connection("db.internal", 5432, timeout=5).close()
    except ForwardTimeout as late:
        also_timeout: TimeoutError = late
        print(also_timeout)
    except (AuthenticationFailure, HostKeyFailure) as refused:
        print("login refused:", refused.description)
    except ExecutorError as anything_of_ours:
        print(anything_of_ours)


def forwarded_socket(executor: SSHExecutor) -> None:
    sock: ForwardedSocket = executor.open_connection("db.internal", 5432, timeout=10)
    with sock:
        sent: int = sock.send(b"ping")
        sock.shutdown(socket.SHUT_WR)
        buffer = bytearray(4)
        read: int = sock.recv_into(buffer)
        sock.setblocking(False)
        timeout: float | None = sock.gettimeout()
        with selectors.DefaultSelector() as selector:
            selector.register(sock.fileno(), selectors.EVENT_READ)
            ready = selector.select(timeout=1.0)
        closed: bool = sock.closed
        print(sent, read, timeout, ready, closed)
        lines: io.TextIOWrapper = sock.makefile("r", encoding="utf-8")
        first: str = lines.readline()
        stream: io.BufferedIOBase = sock.makefile("rwb")
        chunk: bytes = stream.read(4)
        raw: io.RawIOBase = sock.makefile("rb", buffering=0)
        print(first, chunk, raw.readable())


def tunnel_types(executor: SSHExecutor) -> None:
    local: LocalTunnel = executor.forward_local(5432, "db.internal", local_port=0)
    remote: RemoteTunnel = executor.forward_remote(0, 8000, local_host="127.0.0.1")
    for tunnel in (local, remote):
        either: Tunnel = tunnel
        print(either.closed)
        either.close()
    address: tuple[str, int] = local.local_address
    print(address, remote.remote_address)


def connection_details(executor: SSHExecutor) -> None:
    state: ConnectionState | None = executor.state
    if state is not None:
        print(state.transport.is_active(), state.bound)
    with executor.bounded_connection as transport:
        print(probe_max_session(transport, limit=16) + 0)


def shell_files_and_safe_wrapper() -> None:
    with ShellExecutor() as shell:
        copied: int = shell.put("report.csv", "/tmp/report.csv", mode=0o600, timeout=10)
        fetched: int = shell.get("/tmp/report.csv", io.BytesIO(), progress=print)
        print(copied + fetched)
    with DupingSSHExecutor(host="login.example.org", wrapper=SAFE_WRAPPER) as duping:
        print(duping.run_command("hostname").stdout.strip())


def test_server() -> None:
    with SSHTestServer(max_sessions=4) as server:
        with SSHExecutor(**server.executor_parameters()) as executor:
            print(executor.run_command("true").exit_code)
