"""Slots and ConnectRetry: pure unit tests."""

from __future__ import annotations

import threading

import pytest

from paramiko_executor.retry import ConnectRetry
from paramiko_executor.slots import Slots


def test_is_a_bounded_semaphore():
    sem = Slots(2)
    assert isinstance(sem, threading.BoundedSemaphore)
    assert sem.acquire() and sem.acquire()
    assert not sem.acquire(blocking=False)
    assert not sem.acquire(timeout=0.01)
    sem.release()
    sem.release()
    with pytest.raises(ValueError):
        sem.release()


def test_waiters_are_served_in_arrival_order():
    sem = Slots(1)
    sem.acquire()
    order = []
    lock = threading.Lock()
    threads = []
    for i in range(300):
        def wait(i=i):
            with sem:
                with lock:
                    order.append(i)
        t = threading.Thread(target=wait)
        t.start()
        threads.append(t)
        # Admit the next thread only once this one is queued, to fix the arrival order.
        deadline = 200
        while len(sem._waiters) < i + 1 and deadline:
            threading.Event().wait(0.005)
            deadline -= 1
        assert len(sem._waiters) == i + 1
    sem.release()
    for t in threads:
        t.join(30)
    assert order == list(range(300))


def test_a_late_arrival_cannot_barge_past_waiters():
    sem = Slots(1)
    sem.acquire()
    waiter_done = threading.Event()
    t = threading.Thread(target=lambda: (sem.acquire(), waiter_done.set()))
    t.start()
    for _ in range(400):
        if sem._waiters:
            break
        threading.Event().wait(0.005)
    sem.release()  # handed straight to the waiter...
    assert not sem.acquire(blocking=False)  # ...so a newcomer finds nothing free
    assert waiter_done.wait(10)
    sem.release()
    t.join(10)


def test_timed_out_waiter_leaves_the_queue_and_slots_balance():
    sem = Slots(3)
    for _ in range(3):
        sem.acquire()
    results = []
    threads = [threading.Thread(target=lambda: results.append(sem.acquire(timeout=0.05)))
               for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [False] * 200 and not sem._waiters
    for _ in range(3):
        sem.release()
    assert sem._value == 3


def test_hundreds_of_threads_never_exceed_the_bound():
    sem = Slots(5)
    lock = threading.Lock()
    inside = peak = 0
    done = []

    def work():
        nonlocal inside, peak
        for _ in range(50):
            with sem:
                with lock:
                    inside += 1
                    peak = max(peak, inside)
                with lock:
                    inside -= 1
        done.append(1)

    threads = [threading.Thread(target=work) for _ in range(300)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(done) == 300
    assert peak <= 5 and sem._value == 5 and not sem._waiters


def test_connect_retry_delays_double_up_to_the_cap():
    assert list(ConnectRetry(retries=4, backoff=1.0).delays()) == [1, 2, 4, 8]
    assert list(ConnectRetry(retries=9, backoff=1.0).delays())[-3:] == [60, 60, 60]
    assert list(ConnectRetry(retries=0).delays()) == []


@pytest.mark.parametrize("kwargs, error, name", [
    ({"retries": -1}, ValueError, "connect_retries"),
    ({"retries": 1.5}, TypeError, "connect_retries"),
    ({"backoff": "1"}, TypeError, "connect_backoff"),
    ({"backoff": -1}, ValueError, "connect_backoff"),
])
def test_connect_retry_rejects_bad_values(kwargs, error, name):
    with pytest.raises(error, match=name):
        ConnectRetry(**kwargs)


def test_command_retry_counts_lost_and_never_started_apart():
    from paramiko_executor.errors import ConnectionLost, NeverStarted
    from paramiko_executor.retry import CommandRetry

    retry = CommandRetry(lost=1, never_started=2)
    lost = ConnectionLost("lost", started=True)
    retry = retry.increment(lost)
    assert (retry.lost, retry.never_started) == (0, 2)
    with pytest.raises(ConnectionLost):
        retry.increment(lost)
    retry = retry.increment(ConnectionLost("before the exec", started=False))
    retry = retry.increment(NeverStarted("refused"))
    assert (retry.lost, retry.never_started) == (0, 0)
    with pytest.raises(NeverStarted):
        retry.increment(NeverStarted("again"))
