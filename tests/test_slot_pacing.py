"""Holding back an open on a slot the server's CLOSE just freed (`Slots.pace`).

sshd frees a session only on the pass of its main loop after the one that
read our CLOSE, so an open read together with that CLOSE is refused. The
slots remember recent releases and tell an opener how long to hold back.
The unit tests run on a fake clock; the sshd test checks, counting on the
server's side, that holding back never lets more sessions run than slots.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List

import pytest
from helpers import run_threads

from paramiko_executor import SSHExecutor
from paramiko_executor import slots as slots_module
from paramiko_executor.slots import PACE_MAX, PACE_MIN, PACE_SHARE, Slots


class FakeClock:
    """`time.monotonic` and `time.sleep` of the slots module, under the test's control."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: List[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(slots_module.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(slots_module.time, "sleep", fake.sleep)
    return fake


def full(limit: int, round_trip: float) -> Slots:
    slots = Slots(limit)
    slots.open_answered(round_trip, refused=True)
    for _ in range(limit):
        assert slots.acquire(blocking=False)
    return slots


def test_pace_is_a_share_of_the_shortest_round_trip_once_an_open_was_refused() -> None:
    slots = Slots(3)
    assert slots.pace == 0.0  # nothing measured: nothing held back
    slots.open_answered(0.05, refused=False)
    assert slots.pace == 0.0  # a server that never refused costs nothing
    slots.open_answered(0.08, refused=True)  # queueing, not the path
    assert slots.pace == pytest.approx(0.05 * PACE_SHARE)
    slots.open_answered(0.04, refused=False)
    assert slots.pace == pytest.approx(0.04 * PACE_SHARE)
    slots.open_answered(0.06, refused=True)
    assert slots.pace == pytest.approx(0.04 * PACE_SHARE)
    far = Slots(3)
    far.open_answered(10.0, refused=True)
    assert far.pace == PACE_MAX
    near = Slots(3)
    near.open_answered(PACE_MIN / PACE_SHARE * 0.9, refused=True)  # a fast path: refusals are cheap
    assert near.pace == 0.0


def test_no_round_trip_measured_means_no_delay(clock: FakeClock) -> None:
    slots = Slots(2)
    assert slots.acquire(blocking=False) and slots.acquire(blocking=False)
    slots.release()
    assert slots.acquire(blocking=False)
    assert slots.open_delay() == 0.0
    slots.hold_back(None)
    assert clock.slept == []


def test_a_slot_freed_at_saturation_is_held_back_one_pace(clock: FakeClock) -> None:
    slots = full(3, 0.1)
    pace = slots.pace
    slots.release()  # the server's CLOSE: our CLOSE in reply is on its way
    assert slots.acquire(blocking=False)
    clock.now += pace / 4  # the waiter took a while to wake
    assert slots.open_delay() == pytest.approx(pace * 3 / 4)


def test_a_session_freed_a_pace_ago_holds_nothing_back(clock: FakeClock) -> None:
    slots = full(3, 0.1)
    slots.release()
    assert slots.acquire(blocking=False)
    clock.now += slots.pace
    assert slots.open_delay() == 0.0


def test_each_open_waits_for_its_own_closing_session(clock: FakeClock) -> None:
    slots = full(3, 0.1)
    pace = slots.pace
    slots.release()
    clock.now += pace / 4
    slots.release()  # two sessions closing
    assert slots.acquire(blocking=False) and slots.acquire(blocking=False)
    # The first open needs only the older session freed: the second one's
    # slot holds no server session until its own open arrives.
    assert slots.open_delay() == pytest.approx(pace * 3 / 4)
    assert slots.open_delay() == pytest.approx(pace)
    assert slots.open_delay() == 0.0  # no third session closing


def test_free_slots_cover_sessions_still_closing(clock: FakeClock) -> None:
    slots = full(3, 0.1)
    pace = slots.pace
    slots.release()
    slots.release()  # two sessions closing, two slots free
    assert slots.acquire(blocking=False)
    # One free slot is left for the server to spend on one closing session.
    assert slots.open_delay() == pytest.approx(pace)
    # The next open takes the last free slot: it waits for the other session.
    assert slots.acquire(blocking=False)
    assert slots.open_delay() == pytest.approx(pace)


def test_a_long_idle_slot_is_not_held_back(clock: FakeClock) -> None:
    slots = Slots(3)
    slots.open_answered(0.1, refused=True)
    assert slots.acquire(blocking=False)
    slots.release()  # the server still counts it for one pace, but two more are free
    assert slots.acquire(blocking=False)
    assert slots.open_delay() == 0.0


def test_hold_back_sleeps_the_delay_but_never_past_the_deadline(clock: FakeClock) -> None:
    slots = full(2, 0.1)
    pace = slots.pace
    slots.release()
    assert slots.acquire(blocking=False)
    slots.hold_back(clock.now + pace / 3)
    assert clock.slept == [pytest.approx(pace / 3)]
    slots.hold_back(clock.now - 1.0)  # the deadline passed: no wait
    assert clock.slept == [pytest.approx(pace / 3)]
    slots.release()
    assert slots.acquire(blocking=False)
    slots.hold_back(None)
    assert clock.slept == [pytest.approx(pace / 3), pytest.approx(pace)]


def test_releases_kept_back_after_lower_are_no_closing_sessions(clock: FakeClock) -> None:
    slots = full(3, 0.1)
    slots.lower(1)  # all three held: the next two releases are kept back
    slots.release()
    slots.release()
    assert slots.available == 0
    slots.release()
    assert slots.acquire(blocking=False)
    assert slots.open_delay() == pytest.approx(slots.pace)  # only the third counted
    assert slots.open_delay() == 0.0


def test_a_release_too_many_still_raises() -> None:
    slots = Slots(1)
    slots.open_answered(0.1, refused=True)
    with pytest.raises(ValueError):
        slots.release()
    assert slots.available == 1


def slots_of(executor: SSHExecutor) -> Slots:
    state = executor.state
    assert state is not None and isinstance(state.bound, Slots)
    return state.bound


# --- against servers ----------------------------------------------------------------------------


def test_the_hold_back_starts_with_the_servers_first_refusal(
        make_test_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Every answered open is timed; a refused one arms the hold-back.
    monkeypatch.setattr(slots_module, "PACE_SHARE", 1e6)  # any round trip: the longest pace
    server = make_test_server(max_sessions=1)
    with SSHExecutor(**server.executor_parameters(), max_sessions=1) as ex:
        for _ in range(3):
            ex.run_command("true")
        # One slot, one session: the server never refused, nothing is held back.
        assert ex.statistics().refused_opens == 0 and server.channels_refused == 0
        assert slots_of(ex).pace == 0.0
    with SSHExecutor(**server.executor_parameters(), max_sessions=2) as ex:
        # The spare's open follows the exec at once, while the command holds
        # the server's only session: refused.
        ex.run_command("true")
        ex.run_command("true")
        assert server.channels_refused >= 1
        assert slots_of(ex).pace == PACE_MAX




#: Counts, on the server, the commands running at once (flock serialises the count).
COUNTED = ("exec 9>>{d}/lock; flock 9; n=$(( $(cat {d}/n) + 1 )); echo $n > {d}/n; "
           "echo $n >> {d}/seen; flock -u 9; sleep 0.01; flock 9; "
           "echo $(( $(cat {d}/n) - 1 )) > {d}/n; flock -u 9")


@pytest.mark.hang_timeout(240)
def test_held_back_opens_never_run_more_sessions_than_slots(
        make_sshd: Callable[..., Any], shared_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server allows twice the executor's slots: only the slots can keep
    # the executor to 3 sessions, and a slot handed on early, twice, or while
    # its open is held back would show as a fourth command running at once.
    server = make_sshd(max_sessions=6)
    for name, text in (("n", "0\n"), ("seen", ""), ("lock", "")):
        with open(os.path.join(shared_dir, name), "w", encoding="ascii") as stream:
            stream.write(text)
        os.chmod(os.path.join(shared_dir, name), 0o666)  # written by the login user
    command = COUNTED.format(d=shared_dir)
    # As over a slow path: every slot freed at saturation is held back the longest.
    monkeypatch.setattr(slots_module, "PACE_SHARE", 1e6)
    with SSHExecutor(**server.executor_parameters(), max_sessions=3) as ex:
        ex.run_command("true")
        bound = slots_of(ex)
        bound.open_answered(1.0, refused=True)  # as if sshd had refused one: held back from now
        assert bound.pace == PACE_MAX

        def work(i: int) -> None:
            for _ in range(2):
                ex.run_command(command, timeout=120)

        _, errors = run_threads(work, 200, timeout=220)
        stats = ex.statistics()
    assert not errors, errors[:3]
    assert stats.commands_failed == 0 and stats.reconnects == 0
    with open(os.path.join(shared_dir, "seen"), encoding="ascii") as stream:
        seen = [int(line) for line in stream]
    with open(os.path.join(shared_dir, "n"), encoding="ascii") as stream:
        assert stream.read().strip() == "0"
    assert len(seen) == 400
    assert max(seen) <= 3, f"{max(seen)} commands ran at once on 3 slots"
