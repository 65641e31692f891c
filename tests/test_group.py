"""HostGroup: one command on many hosts, through a bounded pool of threads.

The unit tests drive the group with a test double for the executor class; the
others run against one private sshd listening on several loopback addresses
(127.0.0.2, 127.0.0.3, ...), each a host of its own to the client: its own TCP
connection, and ``$SSH_CONNECTION`` in a session names the address reached.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from conftest import start_openssh
from helpers import call_in_thread, drain_terminal

from paramiko_executor import SSHExecutor
from paramiko_executor.group import GroupFailure, GroupResult, HostGroup
from paramiko_executor.results import (
    CommandExecutionFailure,
    CommandResult,
    ExecutorFailure,
)

ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
WAIT = 30.0  # seconds any blocking step of a test may take before it counts as a hang


# -- a test double for the executor class ---------------------------------------------------


class FakeExecutor:
    """Records its parameters and calls; what a host does is set per host name."""

    built: List[Dict[str, Any]] = []
    calls: List[str] = []
    behaviour: Dict[str, Any] = {}
    lock = threading.Lock()

    def __init__(self, **parameters: Any) -> None:
        if not isinstance(parameters.get("port", 22), int):
            raise TypeError("port must be an integer")
        self.parameters = parameters
        self.host = parameters.get("host", parameters.get("hostname"))
        self.closed = 0
        with self.lock:
            self.built.append(parameters)

    def run_command(self, command, stdin_input=None, *, timeout=None):
        host = self.host
        with self.lock:
            self.calls.append(host)
        action = self.behaviour.get(host)
        if isinstance(action, BaseException):
            raise action
        if callable(action):
            action()
        return CommandResult(stdout=f"{host}: {command}\n", stderr="", exit_code=0)

    def get(self, remote, local, **options):
        with open(local, "w", encoding="utf-8") as file:
            file.write(f"{remote} from {self.host}")
        return 1

    def statistics(self):
        return ("statistics of", self.host)

    def close(self):
        self.closed += 1


@pytest.fixture(autouse=True)
def fresh_fake():
    FakeExecutor.built = []
    FakeExecutor.calls = []
    FakeExecutor.behaviour = {}
    yield


def new_group_threads(before) -> list:
    """The group pool threads started since ``before`` (a set of threads) was taken."""
    return [t for t in set(threading.enumerate()) - before if t.name.startswith("HostGroup")]


def fake_group(hosts, **kwargs) -> HostGroup:
    return HostGroup(hosts, executor_class=FakeExecutor, **kwargs)  # type: ignore[arg-type]


# -- construction -------------------------------------------------------------------------------


def test_names_and_order_follow_the_hosts_given():
    group = fake_group([
        "b-alias",
        {"host": "10.0.0.1"},
        {"host": "10.0.0.1", "port": 2222},
        {"hostname": "n4", "name": "node four"},
        "a-alias",
    ])
    assert group.names == ("b-alias", "10.0.0.1", "10.0.0.1:2222", "node four", "a-alias")
    result = group.run_command("hostname")
    assert list(result) == list(group.names)


@pytest.mark.parametrize("hosts", [
    ["a", "b", "a"],
    ["a", {"host": "a"}],
    [{"host": "a", "port": 22}, "a:22"],
    [{"host": "x", "name": "n"}, {"host": "y", "name": "n"}],
])
def test_duplicate_hosts_are_refused(hosts):
    with pytest.raises(ValueError, match="duplicate host"):
        fake_group(hosts)


@pytest.mark.parametrize("value, error", [(0, ValueError), (-3, ValueError), ("8", TypeError),
                                          (True, TypeError), (2.5, TypeError)])
def test_bad_max_workers_is_refused_by_name(value, error):
    with pytest.raises(error, match="max_workers"):
        fake_group(["a"], max_workers=value)


@pytest.mark.parametrize("hosts, kwargs, error, match", [
    ("a,b", {}, TypeError, "iterable"),
    ({"host": "a"}, {}, TypeError, "iterable"),
    ([3], {}, TypeError, r"hosts\[0\]"),
    ([""], {}, ValueError, r"hosts\[0\]"),
    ([{"port": 22}], {}, TypeError, "'host'"),
    ([{"host": "a", "hostname": "b"}], {}, TypeError, "same parameter"),
    ([{"host": "a", "name": 7}], {}, TypeError, "'name'"),
    (["a"], {"host": "b"}, TypeError, "common parameter"),
])
def test_bad_hosts_are_refused_at_construction(hosts, kwargs, error, match):
    with pytest.raises(error, match=match):
        fake_group(hosts, **kwargs)


def test_executors_are_built_on_first_use_with_the_hosts_own_parameters():
    group = fake_group(
        ["a", {"host": "b", "port": 2222, "username": "other", "name": "bee"}],
        username="common", port=22, connect_retries=1,
    )
    assert FakeExecutor.built == []  # nothing built (nor connected) at construction
    group.run_command("true")
    assert FakeExecutor.built == [
        {"username": "common", "port": 22, "connect_retries": 1, "host": "a"},
        {"username": "other", "port": 2222, "connect_retries": 1, "host": "b"},
    ]
    group.run_command("true")
    assert len(FakeExecutor.built) == 2  # built once


def test_a_hosts_bad_parameters_are_raised_before_any_command_runs():
    group = fake_group(["a", "b", "c"], port="not a port")
    with pytest.raises((TypeError, ValueError), match="host 'a'"):
        group.run_command("true")
    assert FakeExecutor.calls == []


@pytest.mark.parametrize("bad", ["invalid host", "x;touch /tmp/f", "evil,*", "-oProxyCommand=x"])
def test_unsafe_host_names_are_refused_when_the_group_is_built(bad):
    with pytest.raises(ValueError, match="not a valid host name"):
        HostGroup(["ok", bad])
    with pytest.raises(ValueError, match="not a valid host name"):
        HostGroup([{"host": bad, "name": "fine"}])


@pytest.mark.parametrize("args, kwargs, error", [
    ((123,), {}, TypeError),
    (("true", 5), {}, TypeError),
    (("true",), {"timeout": -1}, ValueError),
    (("true",), {"timeout": "1"}, TypeError),
])
def test_bad_arguments_are_raised_once_before_any_command_runs(args, kwargs, error):
    group = fake_group(["a", "b"])
    with pytest.raises(error):
        group.run_command(*args, **kwargs)
    with pytest.raises(error):
        group.run_command_as_completed(*args, **kwargs)
    assert FakeExecutor.calls == []


# -- outcomes -----------------------------------------------------------------------------------


def test_failures_are_entries_and_raise_for_failures_collects_them():
    lost = ExecutorFailure("host unreachable after all retries")
    exited = CommandExecutionFailure("command 'x' failed with exit code 3", 3, "", "boom")
    FakeExecutor.behaviour = {"b": lost, "d": exited}
    result = fake_group(["a", "b", "c", "d"]).run_command("x")
    assert isinstance(result, GroupResult) and len(result) == 4
    assert list(result.succeeded) == ["a", "c"]
    assert result.succeeded["a"].stdout == "a: x\n"
    assert dict(result.failed) == {"b": lost, "d": exited}
    with pytest.raises(GroupFailure) as info:
        result.raise_for_failures()
    failure = info.value
    assert isinstance(failure, ExecutorFailure)
    assert dict(failure.failed) == {"b": lost, "d": exited}
    assert str(failure).startswith("2 of 4 hosts failed: b: ExecutorFailure: host unreachable")
    copy = pickle.loads(pickle.dumps(failure))
    assert str(copy) == str(failure) and list(copy.failed) == ["b", "d"]
    assert repr(result) == "<GroupResult 4 hosts: 2 succeeded, 2 failed ['b', 'd']>"


def test_raise_for_failures_returns_the_result_when_all_succeeded():
    result = fake_group(["a", "b"]).run_command("x")
    assert result.raise_for_failures() is result
    assert not result.failed


def test_an_unexpected_exception_of_an_executor_is_raised():
    FakeExecutor.behaviour = {"b": RuntimeError("a bug in the executor")}
    with pytest.raises(RuntimeError, match="a bug"):
        fake_group(["a", "b"]).run_command("x")


def test_an_unexpected_exception_is_raised_while_other_hosts_still_run():
    # run_command waits for every host at once (one wake-up, not one per
    # host), but what the call must raise ends that wait at once.
    release, finished = threading.Event(), threading.Event()

    def slow() -> None:
        release.wait(WAIT)
        finished.set()

    FakeExecutor.behaviour = {"slow": slow, "b": RuntimeError("a bug in the executor")}
    group = fake_group(["slow", "b"], max_workers=2)
    try:
        with pytest.raises(RuntimeError, match="a bug"):
            group.run_command("x")
        assert not finished.is_set()
    finally:
        release.set()
        group.close()


def test_results_come_as_hosts_finish_and_a_slow_host_holds_up_only_its_own_entry():
    release = threading.Event()
    FakeExecutor.behaviour = {"slow": lambda: release.wait(WAIT)}
    group = fake_group(["slow", "a", "b", "c"], max_workers=4)
    arrived = []
    for name, outcome in group.run_command_as_completed("x"):
        arrived.append(name)
        assert isinstance(outcome, CommandResult)
        if len(arrived) == 3:
            assert not release.is_set()  # three results while "slow" still runs
            release.set()
    assert sorted(arrived[:3]) == ["a", "b", "c"] and arrived[3] == "slow"
    group.close()


def test_leaving_the_loop_early_cancels_the_hosts_not_started():
    started_b, release_b = threading.Event(), threading.Event()

    def hold_b() -> None:
        started_b.set()
        release_b.wait(WAIT)

    FakeExecutor.behaviour = {"b": hold_b}
    group = fake_group(["a", "b", "c"], max_workers=1)
    for name, _outcome in group.run_command_as_completed("x"):
        assert name == "a"
        assert started_b.wait(WAIT)  # the one worker holds "b"; "c" waits in the queue
        break
    release_b.set()
    group.close()  # waits for "b"
    assert FakeExecutor.calls == ["a", "b"]


def test_threads_never_exceed_max_workers():
    # Every call waits at a barrier of max_workers parties: it passes only when that
    # many calls run at once, and a ninth concurrent call would show in the peak.
    max_workers = 8
    barrier = threading.Barrier(max_workers)
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def crowd() -> None:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        try:
            barrier.wait(WAIT)
        finally:
            with lock:
                state["now"] -= 1

    hosts = [f"n{i}" for i in range(96)]
    FakeExecutor.behaviour = dict.fromkeys(hosts, crowd)
    before = set(threading.enumerate())
    with fake_group(hosts, max_workers=max_workers) as group:
        result = group.run_command("x")
        pool_threads = new_group_threads(before)
        assert len(pool_threads) == max_workers
    assert not result.failed and state["peak"] == max_workers
    assert not any(t.is_alive() for t in pool_threads)  # close() ended the pool


def test_the_pool_gets_a_task_per_worker_not_per_host(monkeypatch):
    # Each host as a pool task of its own cost a Future and a waiter per host:
    # a call hands the pool one task per worker, and the workers share the hosts.
    from concurrent.futures import ThreadPoolExecutor

    submitted = []
    original = ThreadPoolExecutor.submit
    monkeypatch.setattr(ThreadPoolExecutor, "submit",
                        lambda pool, fn, *a: submitted.append(fn) or original(pool, fn, *a))
    hosts = [f"n{i}" for i in range(96)]
    with fake_group(hosts, max_workers=8) as group:
        result = group.run_command("x")
        assert len(submitted) == 8
        assert dict(group.run_command_as_completed("y")).keys() == set(hosts)
        assert len(submitted) == 16
    assert list(result) == hosts and not result.failed
    assert sorted(FakeExecutor.calls) == sorted(hosts * 2)


def test_a_thousand_hosts_from_one_process():
    hosts = [{"host": f"10.0.{i // 250}.{i % 250}", "name": f"n{i:04}"} for i in range(1000)]
    before = set(threading.enumerate())
    with fake_group(hosts, max_workers=16) as group:
        started = time.monotonic()
        result = group.run_command("x")
        assert time.monotonic() - started < WAIT
        assert len(new_group_threads(before)) <= 16
    assert list(result) == [f"n{i:04}" for i in range(1000)] and not result.failed
    assert result["n0999"].stdout == "10.0.3.249: x\n"


def test_close_closes_every_executor_and_the_group_stays_usable():
    before = set(threading.enumerate())
    group = fake_group(["a", "b"])
    group.run_command("x")
    pool_threads = new_group_threads(before)
    executors = [group.executor("a"), group.executor("b")]
    group.close()
    assert all(e.closed for e in executors)  # at least once; again after its calls ended
    assert pool_threads and not any(t.is_alive() for t in pool_threads)
    assert not group.run_command("y").failed
    with pytest.raises(KeyError):
        group.executor("c")
    group.close()


def test_statistics_maps_every_host_to_its_executors_statistics():
    stats = fake_group(["a", {"host": "b", "name": "bee"}]).statistics()
    assert stats == {"a": ("statistics of", "a"), "bee": ("statistics of", "b")}


def test_get_names_each_file_after_its_host(tmp_path):
    group = fake_group(["a", {"host": "b", "port": 2222}])
    result = group.get("/etc/motd", tmp_path)
    assert dict(result) == {"a": 1, "b:2222": 1}
    assert (tmp_path / "a").read_text() == "/etc/motd from a"
    assert (tmp_path / "b:2222").read_text() == "/etc/motd from b"


def test_get_refuses_host_names_that_are_no_file_names(tmp_path):
    with pytest.raises(ValueError, match="give the host a 'name'"):
        fake_group(["a", {"host": "b", "name": "../b"}]).get("/x", tmp_path)
    with pytest.raises(NotADirectoryError):
        fake_group(["a"]).get("/x", tmp_path / "missing")
    assert FakeExecutor.calls == [] and not list(tmp_path.iterdir())


def test_put_refuses_a_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        fake_group(["a"]).put(tmp_path / "missing", "/tmp/x")


# -- against a real sshd on several loopback addresses ------------------------------------------


@pytest.fixture(scope="module")
def sshd_hosts():
    """A private sshd listening on 127.0.0.1 and ADDRESSES, shared by this module."""
    server = start_openssh(max_sessions=10, listen_addresses=ADDRESSES)
    yield server
    server.close()


def common(server, **overrides) -> Dict[str, Any]:
    """The executor parameters of ``server`` without a host: each host gives its own."""
    parameters = server.executor_parameters(**overrides)
    del parameters["host"]
    return parameters


def reached(result: CommandResult) -> str:
    """The server address a session reached, from ``echo $SSH_CONNECTION``."""
    return result.stdout.split()[2]


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_each_host_gets_its_own_connection_and_answers_in_order(sshd_hosts):
    hosts = list(reversed(ADDRESSES))
    with HostGroup(hosts, **common(sshd_hosts)) as group:
        first = group.run_command("echo $SSH_CONNECTION")
        second = group.run_command("echo $SSH_CONNECTION")
    assert list(first) == hosts and not first.failed
    assert [reached(first[h]) for h in hosts] == hosts
    assert [reached(second[h]) for h in hosts] == hosts
    # One connection per host, kept for the second command: same client port.
    ports = [first[h].stdout.split()[1] for h in hosts]
    assert len(set(ports)) == len(hosts)
    assert [second[h].stdout.split()[1] for h in hosts] == ports
    # sshd logged one login from each of those client ports, and one only.
    for port in ports:
        line = f"Accepted publickey for {sshd_hosts.username} from 127.0.0.1 port {port} "
        assert sshd_hosts.wait_for_log(line) == 1


def test_a_dead_host_fails_alone_within_its_own_retries(sshd_hosts):
    dead = {"host": "127.0.0.1", "port": free_port(), "name": "dead"}
    hosts = [ADDRESSES[0], dead, ADDRESSES[1]]
    started = time.monotonic()
    with HostGroup(hosts, **common(sshd_hosts, connect_retries=1, connect_backoff=0.1)) as group:
        result = group.run_command("echo $SSH_CONNECTION")
    elapsed = time.monotonic() - started
    assert list(result.failed) == ["dead"]
    assert isinstance(result["dead"], ExecutorFailure)
    assert "2 attempts" in str(result["dead"]) or "refused" in str(result["dead"]).lower()
    assert [reached(result[h]) for h in (ADDRESSES[0], ADDRESSES[1])] == list(ADDRESSES[:2])
    assert elapsed < 10  # one retry of 0.1 s, not the default nine


def test_a_slow_host_does_not_hold_up_the_others(sshd_hosts):
    slow = ADDRESSES[1]
    command = f'case "$SSH_CONNECTION" in *" {slow} "*) sleep 3;; esac; echo ok'
    with HostGroup(ADDRESSES, **common(sshd_hosts)) as group:
        group.run_command("true")  # connected: what follows times the commands only
        started = time.monotonic()
        arrivals = {name: time.monotonic() - started
                    for name, _ in group.run_command_as_completed(command)}
        result = group.run_command(command, timeout=1)
    assert list(arrivals)[-1] == slow and arrivals[slow] >= 3
    assert all(arrivals[h] < 2.5 for h in ADDRESSES if h != slow)
    # With a timeout, only the slow host's entry is a failure.
    assert list(result.failed) == [slow]
    assert type(result[slow]).__name__ == "CommandTimeout"


def test_per_host_overrides_and_names(sshd_hosts):
    # The common port is dead: only the hosts that give the right one can answer.
    parameters = common(sshd_hosts, connect_retries=0)
    parameters["port"] = free_port()
    hosts = [
        {"host": ADDRESSES[0], "port": sshd_hosts.port, "name": "first"},
        {"host": ADDRESSES[1], "name": "dead-port"},
        {"host": ADDRESSES[2], "port": sshd_hosts.port, "username": "nobody-here",
         "name": "wrong-user"},
    ]
    with HostGroup(hosts, **parameters) as group:
        result = group.run_command("echo $SSH_CONNECTION")
    assert list(result) == ["first", "dead-port", "wrong-user"]
    assert reached(result["first"]) == ADDRESSES[0]
    assert list(result.failed) == ["dead-port", "wrong-user"]
    assert type(result["wrong-user"]).__name__ == "AuthenticationFailure"


def test_group_threads_stay_within_max_workers_on_a_real_server(sshd_hosts):
    # Twelve hosts (three names per address) and two workers: each command sleeps
    # 0.3 s, so six rounds of at most two take 1.8 s at least.
    hosts = [{"host": ADDRESSES[i % len(ADDRESSES)], "name": f"n{i}"} for i in range(12)]
    before = set(threading.enumerate())
    with HostGroup(hosts, max_workers=2, **common(sshd_hosts)) as group:
        group.run_command("true")
        started = time.monotonic()
        result = group.run_command("sleep 0.3")
        elapsed = time.monotonic() - started
        assert len(new_group_threads(before)) == 2
    assert not result.failed and elapsed >= 1.8


needs_transfers = pytest.mark.skipif(
    not hasattr(SSHExecutor, "put"), reason="SSHExecutor.put/get are not there yet (executor core)"
)


@needs_transfers
def test_put_and_get_on_every_host(sshd_hosts, shared_dir, tmp_path):
    local = tmp_path / "payload"
    local.write_bytes(b"payload for every host\n" * 1000)
    remote = os.path.join(shared_dir, "payload")
    with HostGroup(ADDRESSES, **common(sshd_hosts)) as group:
        sent = group.put(local, remote)
        assert dict(sent) == dict.fromkeys(ADDRESSES, local.stat().st_size)
        received = group.get(remote, tmp_path)
        missing = group.get(remote + ".missing", tmp_path)
    assert dict(received) == dict.fromkeys(ADDRESSES, local.stat().st_size)
    for address in ADDRESSES:
        assert (tmp_path / address).read_bytes() == local.read_bytes()
    assert all(isinstance(e, FileNotFoundError) for e in missing.values())


def test_a_remote_directory_is_each_hosts_entry(sshd_hosts, shared_dir, tmp_path):
    """Was an ExecutorFailure per host ("Failure (SFTP status 4)"); now each host's
    IsADirectoryError, as a missing file's FileNotFoundError is."""
    local = tmp_path / "payload"
    local.write_bytes(b"x")
    directory = os.path.join(shared_dir, "a-directory")
    os.mkdir(directory)
    (tmp_path / "got").mkdir()
    with HostGroup(ADDRESSES[:2], **common(sshd_hosts)) as group:
        for result in (group.put(local, directory), group.get(directory, tmp_path / "got")):
            assert list(result) == list(ADDRESSES[:2])
            assert all(isinstance(e, IsADirectoryError) and e.filename == directory
                       for e in result.values())
        assert all(s.reconnects == 0 for s in group.statistics().values())
    assert os.listdir(directory) == [] and os.listdir(tmp_path / "got") == []


@pytest.mark.parametrize("direction", ["put", "get"])
def test_a_progress_callback_error_is_the_calls_not_a_hosts(sshd_hosts, shared_dir, tmp_path,
                                                             direction):
    """What the caller's callback raises (an OSError too) is raised by the call, unchanged."""
    local = tmp_path / "payload"
    local.write_bytes(b"x" * 100_000)
    remote = os.path.join(shared_dir, f"progress-{direction}")
    raised: List[BaseException] = []

    def progress(done: int, total: int) -> None:
        if done:
            raised.append(BrokenPipeError("the caller's pipe"))
            raise raised[-1]

    with HostGroup(ADDRESSES[:2], **common(sshd_hosts)) as group:
        group.put(local, remote)
        (tmp_path / "got").mkdir()
        with pytest.raises(BrokenPipeError) as info:
            if direction == "put":
                group.put(local, remote, progress=progress)
            else:
                group.get(remote, tmp_path / "got", progress=progress)
        assert any(info.value is exc for exc in raised)
        # A host's own failure is still its entry.
        missing = group.get(remote + ".missing", tmp_path / "got", progress=progress)
        assert all(isinstance(e, FileNotFoundError) for e in missing.values())
        assert all(s.reconnects == 0 for s in group.statistics().values())


@pytest.mark.parametrize("node", ["fifo", "directory"])
def test_get_refuses_a_host_file_it_must_not_replace_before_anything_runs(
        sshd_hosts, shared_dir, tmp_path, node):
    """A FIFO under one host's name aborted the whole call after the other hosts had
    downloaded (their files written, the call's result lost)."""
    remote = os.path.join(shared_dir, "both")
    Path(remote).write_text("data\n")
    os.chmod(remote, 0o644)
    first, second = ADDRESSES[:2]
    blocker = tmp_path / second
    os.mkfifo(blocker) if node == "fifo" else blocker.mkdir()
    error = ValueError if node == "fifo" else IsADirectoryError
    with HostGroup([first, second], **common(sshd_hosts)) as group:
        with pytest.raises(error, match=re.escape(str(blocker))):
            group.get(remote, tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [second]
        assert all(s.connects == 0 for s in group.statistics().values())


@pytest.mark.skipif(not hasattr(SSHExecutor, "statistics"),
                    reason="SSHExecutor.statistics is not there yet (executor core)")
def test_statistics_per_host(sshd_hosts):
    with HostGroup(ADDRESSES[:2], **common(sshd_hosts)) as group:
        group.run_command("true")
        stats = group.statistics()
    assert list(stats) == list(ADDRESSES[:2])
    assert all(s.connects == 1 and s.commands_succeeded == 1 for s in stats.values())


# -- the command line ---------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m paramiko_executor ARGS`` with this checkout's package first on the path."""
    import paramiko_executor

    root = os.path.dirname(os.path.dirname(os.path.abspath(paramiko_executor.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "paramiko_executor", *args], input=b"",
                          capture_output=True, timeout=120, env=env)


def cli_options(server) -> List[str]:
    parameters = common(server)
    return ["--port", str(parameters["port"]), "--user", parameters["username"], "-F", "none",
            "--key", parameters["client_keys"][0], "--known-hosts", parameters["known_hosts"],
            "--connect-retries", "0"]


def test_cli_runs_on_every_host_with_prefixed_lines(sshd_hosts):
    hosts = ",".join(ADDRESSES[:3])
    proc = cli("run", "--hosts", hosts, *cli_options(sshd_hosts), "--",
               'echo "$SSH_CONNECTION" | cut -d" " -f3; echo second; echo err >&2')
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    for address in ADDRESSES[:3]:
        # each host's lines together, in its order, each prefixed with its name
        at = lines.index(f"{address}: {address}")
        assert lines[at + 1] == f"{address}: second"
    assert len(lines) == 6
    assert sorted(proc.stderr.decode().splitlines()) == [f"{a}: err" for a in ADDRESSES[:3]]


def test_cli_hosts_file_failures_and_exit_status(sshd_hosts, tmp_path):
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(f"# the nodes\n{ADDRESSES[0]}\n\n{ADDRESSES[1]}  # fails\n")
    failing = f'case "$SSH_CONNECTION" in *" {ADDRESSES[1]} "*) echo no; exit 3;; esac; echo ok'
    proc = cli("run", "--hosts-file", str(hosts_file), *cli_options(sshd_hosts), "--", failing)
    assert proc.returncode == 1
    assert sorted(proc.stdout.decode().splitlines()) == [f"{ADDRESSES[0]}: ok",
                                                         f"{ADDRESSES[1]}: no"]
    stderr = proc.stderr.decode()
    assert "1 of 2 hosts failed:" in stderr and f"  {ADDRESSES[1]}: command" in stderr
    assert "exit code 3" in stderr and "\r" not in stderr  # not a terminal: no progress bar
    # A host nobody answers on (127.0.0.9 does not listen) is an executor failure: 255.
    proc = cli("run", "--hosts", f"{ADDRESSES[2]},127.0.0.9", "--hosts-file", str(hosts_file),
               *cli_options(sshd_hosts), "--", failing)
    assert proc.returncode == 255
    assert "3 of 4 hosts failed:" not in proc.stderr.decode()
    assert "2 of 4 hosts failed:" in proc.stderr.decode()


def test_cli_hosts_usage_errors(sshd_hosts):
    assert cli("run", "--hosts", "a,b,a", *cli_options(sshd_hosts), "--", "true").returncode == 2
    proc = cli("run", "--hosts", " , ", *cli_options(sshd_hosts), "--", "true")
    assert proc.returncode == 2 and b"no host" in proc.stderr
    proc = cli("run", "--hosts", "a", "--host", "b", "--", "true")
    assert proc.returncode == 2 and b"cannot be combined" in proc.stderr


def test_cli_draws_progress_on_a_terminal_only(sshd_hosts):
    import pty

    import paramiko_executor

    root = os.path.dirname(os.path.dirname(os.path.abspath(paramiko_executor.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "paramiko_executor", "run", "--hosts", ",".join(ADDRESSES),
             *cli_options(sshd_hosts), "--", "echo ok"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal, env=env)
        os.close(terminal)
        terminal = None
        drawn = drain_terminal(controller, proc, 120)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        os.close(controller)
        if terminal is not None:
            os.close(terminal)
    assert proc.returncode == 0
    assert b"\r[" in drawn and b"4/4 100%" in drawn
    assert sorted(stdout.decode().splitlines()) == [f"{a}: ok" for a in ADDRESSES]


# -- close() at any moment ---------------------------------------------------------------------


def race_close(group: HostGroup, call, delay: float = 0.0) -> Any:
    """``call()`` in a thread, and ``group.close()`` here ``delay`` s after both were released.

    Returns what the call returned; fails if it raised or outlived `WAIT`.
    """
    barrier = threading.Barrier(2, timeout=WAIT)
    raced = call_in_thread(lambda: (barrier.wait(), call())[1])
    barrier.wait()
    until = time.perf_counter() + delay
    while time.perf_counter() < until:
        pass  # a busy wait: a sleep's wake-up is far coarser than the offsets swept
    group.close()
    raced["thread"].join(WAIT)
    assert not raced["thread"].is_alive()
    assert "error" not in raced, repr(raced.get("error"))
    return raced["result"]


def closed_entry(outcome) -> bool:
    return isinstance(outcome, ExecutorFailure) and str(outcome) == "the group was closed"


def test_close_ends_a_running_call_at_once_and_keeps_finished_hosts():
    release, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(WAIT)

    FakeExecutor.behaviour["slow"] = hold
    group = fake_group(["fast", "slow"])
    call = call_in_thread(lambda: group.run_command("x"))
    assert started.wait(WAIT)
    closer = call_in_thread(group.close)
    try:
        call["thread"].join(WAIT / 3)
        assert not call["thread"].is_alive(), "run_command waited for its hosts after close()"
    finally:
        release.set()
        closer["thread"].join(WAIT)
    result = call["result"]
    assert result["fast"].stdout == "fast: x\n"
    assert closed_entry(result["slow"]) and list(result.failed) == ["slow"]
    assert "error" not in closer and not closer["thread"].is_alive()


def test_close_ends_a_running_as_completed_loop_too():
    release, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(WAIT)

    FakeExecutor.behaviour["slow"] = hold
    group = fake_group(["slow", "fast"], max_workers=1)  # "fast" waits behind "slow"
    call = call_in_thread(lambda: list(group.run_command_as_completed("x")))
    assert started.wait(WAIT)
    closer = call_in_thread(group.close)
    try:
        call["thread"].join(WAIT / 3)
        assert not call["thread"].is_alive()
    finally:
        release.set()
        closer["thread"].join(WAIT)
    outcomes = dict(call["result"])
    assert closed_entry(outcomes["slow"]) and closed_entry(outcomes["fast"])
    assert FakeExecutor.calls == ["slow"]  # the host not started yet never started


@pytest.fixture
def frequent_thread_switches():
    """Threads switch every microsecond, not every 5 ms: races show within few tries."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.parametrize("method", ["run_command", "get"])
def test_close_racing_group_calls_never_raises(method, tmp_path, frequent_thread_switches):
    hosts = [f"h{i}" for i in range(32)]
    group = fake_group(hosts, max_workers=4)
    call = ((lambda: group.run_command("x")) if method == "run_command"
            else (lambda: group.get("/x", tmp_path)))
    # close() lands at offsets swept across the call's first 3 ms, 10 us apart.
    for step in range(300):
        result = race_close(group, call, delay=step * 1e-5)
        assert list(result) == hosts
        assert all(closed_entry(outcome) for outcome in result.failed.values())
    group.close()


def test_close_racing_run_command_on_a_real_server(sshd_hosts):
    with HostGroup(ADDRESSES, **common(sshd_hosts, connect_retries=0)) as group:
        for _ in range(40):
            for outcome in race_close(group, lambda: group.run_command("echo ok")).values():
                assert isinstance(outcome, (CommandResult, ExecutorFailure)), repr(outcome)
        assert not group.run_command("echo ok").failed
