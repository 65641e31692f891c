"""`waits.Signal` and `wait_any`: waiting for the first of several events, bounded."""

from __future__ import annotations

import threading

from helpers import outcome_within

from paramiko_executor.waits import Signal, wait_any


def test_wait_any_wakes_on_whichever_is_set_from_another_thread() -> None:
    first, second = Signal(), Signal()
    timer = threading.Timer(0.05, second.set)
    timer.start()
    try:
        assert outcome_within(10, lambda: wait_any((first, None, second), None))["result"]
    finally:
        timer.join(10)
    assert not first.is_set()


def test_wait_any_returns_at_once_when_one_is_set_already() -> None:
    done = Signal()
    done.set()
    assert wait_any((Signal(), done), None)


def test_a_time_up_is_false_and_a_negative_timeout_does_not_wait_for_ever() -> None:
    # A lock's wait reads -1 as "no limit": a deadline already passed must not be that.
    assert outcome_within(10, lambda: wait_any((Signal(),), -1.0))["result"] is False
    assert wait_any((Signal(),), 0.01) is False


def test_a_watcher_is_forgotten_after_its_wait() -> None:
    signal = Signal()
    for _ in range(3):
        wait_any((signal,), 0)
    assert not signal._watchers
    watcher = threading.Event()
    signal.watch(watcher)
    signal.set()
    assert watcher.is_set() and not signal._watchers
