"""Connection's leader/waiter/epoch logic, without a server: the transport is faked.

The behaviour against real servers is proven in test_faults.py and
test_executor_sshd.py; here the connect is a function the test controls.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from helpers import run_threads, wait_for

from paramiko_executor import connection as connection_module
from paramiko_executor.connection import Connection
from paramiko_executor.errors import ExecutorFailure, TemporaryFailure
from paramiko_executor.retry import ConnectRetry


class FakeTransport:
    """What Connection and Link touch of a paramiko Transport."""

    sock = None
    #: Read by `Link` (its `Starts`): a server whose sessions may start side by side.
    remote_version = "SSH-2.0-OpenSSH_9.2p1"

    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active

    def close(self) -> None:
        self.active = False

    def open_channel(self, kind: str, *args: Any, **kwargs: Any) -> Any:
        # A Link puts its bounded_connection blocks' count in front of it (blocks.Blocks).
        raise AssertionError("no channel is opened in these tests")


class FakeConnect:
    """Replaces ``connection._open``: counts calls, may block or fail on demand."""

    def __init__(self, failures: int = 0, gate: Optional[threading.Event] = None) -> None:
        self.calls = 0
        self.failures = failures
        self.gate = gate
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, target, started, connecting=None, abandoned=None):
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.failures
        transport = FakeTransport()
        if started is not None:
            started(transport)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        if fail:
            raise TemporaryFailure("refused (fake)")
        if not transport.is_active():
            raise EOFError("closed while connecting")
        return transport, {}, SimpleNamespace()


TARGET = SimpleNamespace(keepalive_interval=None, keepalive_count_max=None)


@pytest.fixture
def fake(monkeypatch):
    def install(**kwargs):
        connect = FakeConnect(**kwargs)
        monkeypatch.setattr(connection_module, "_open", connect)
        monkeypatch.setattr(connection_module, "Pinger", lambda requests, transport: None)
        return connect
    return install


class CountingEvent(threading.Event):
    """An attempt's ``done`` event that counts the threads waiting on it."""

    waiting = 0

    def wait(self, timeout=None):
        with _count_lock:
            CountingEvent.waiting += 1
        return super().wait(timeout)


_count_lock = threading.Lock()


@pytest.fixture
def counted(monkeypatch):
    """Every connect attempt's waiters are counted in ``CountingEvent.waiting``."""
    original = connection_module._Attempt.__init__

    def init(self, *args):
        original(self, *args)
        self.done = CountingEvent()

    CountingEvent.waiting = 0
    monkeypatch.setattr(connection_module._Attempt, "__init__", init)


def open_when_waiting(gate: threading.Event, waiters: int) -> threading.Thread:
    """Open ``gate`` once ``waiters`` threads wait for the attempt in flight."""
    def run():
        wait_for(lambda: CountingEvent.waiting >= waiters, f"{waiters} waiting threads")
        gate.set()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def make(retries: int = 0) -> Connection:
    return Connection(TARGET, retry=ConnectRetry(retries=retries, backoff=0.0),  # type: ignore[arg-type]
                      max_sessions=4)


def test_many_threads_share_one_connect(fake, counted):
    gate = threading.Event()
    connect = fake(gate=gate)
    conn = make()
    opener = open_when_waiting(gate, 199)
    results, errors = run_threads(lambda i: conn.get(), 200, timeout=30)
    opener.join()
    assert errors == [] and connect.calls == 1
    assert len({id(link) for link in results.values()}) == 1
    stats = conn.counters.snapshot(open_channels=0, waiting=0, max_sessions=None)
    assert (stats.connects, stats.reconnects, stats.connect_failures) == (1, 0, 0)


def test_waiters_share_the_failure_of_one_retry_cycle(fake, counted):
    gate = threading.Event()
    connect = fake(failures=100, gate=gate)
    conn = make(retries=2)
    opener = open_when_waiting(gate, 49)
    results, errors = run_threads(lambda i: conn.get(), 50, timeout=30)
    opener.join()
    assert results == {} and len(errors) == 50
    assert all(isinstance(e, ExecutorFailure) and "after 3 attempts" in str(e) for e in errors)
    assert connect.calls == 3
    stats = conn.counters.snapshot(open_channels=0, waiting=0, max_sessions=None)
    assert stats.connect_failures == 3 and stats.connects == 0


def test_a_call_after_close_does_not_inherit_the_cancelled_connect(fake):
    gate = threading.Event()
    connect = fake(gate=gate)
    conn = make()
    outcome = {}
    early = threading.Thread(target=lambda: outcome.setdefault("early", _try(conn.get)))
    early.start()
    assert connect.entered.wait(10)
    conn.close()
    late = threading.Thread(target=lambda: outcome.setdefault("late", _try(conn.get)))
    late.start()
    gate.set()
    early.join(10)
    late.join(10)
    assert isinstance(outcome["early"], ExecutorFailure) and "closed" in str(outcome["early"])
    assert not isinstance(outcome["late"], BaseException), outcome["late"]
    assert conn.link is outcome["late"]


def test_drop_of_an_old_link_leaves_the_new_one(fake):
    fake()
    conn = make()
    old = conn.get()
    old.transport.close()  # the old connection died; the next get reconnects
    new = conn.get()
    assert new is not old and conn.link is new
    conn.drop(old)
    assert conn.link is new and new.alive()
    stats = conn.counters.snapshot(open_channels=0, waiting=0, max_sessions=None)
    assert (stats.connects, stats.reconnects) == (2, 1)
    assert old.slots.closed and not new.slots.closed


def _try(call):
    try:
        return call()
    except BaseException as exc:  # collected for the assertions
        return exc
