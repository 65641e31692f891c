"""A thread that holds every slot of its connection and asks for one more fails at once.

From a ``progress`` or ``on_output`` callback, a command on the executor whose
call holds every session of the connection would wait for its own thread: it
waited until ``close()`` (or until the holding command ended by itself). Now
it is an `ExecutorFailure` with nothing sent; a thread that holds only some of
the slots, or none, waits as before.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
from helpers import source_file, wait_for

from paramiko_executor import ExecutorFailure, SSHExecutor
from paramiko_executor.slots import Slots

#: The bound on every join: far above what the work takes, so only a hang reaches it.
JOIN = 30.0


def in_thread(work: Callable[[], Any]) -> Dict[str, Any]:
    """``work()`` run in a thread of its own, joined within `JOIN`: its result or its error."""
    outcome: Dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(JOIN)
    outcome["hung"] = thread.is_alive()
    return outcome


# -- the slots alone ---------------------------------------------------------------


def test_a_thread_holding_every_slot_is_refused_at_once_and_holds_nothing_more() -> None:
    slots = Slots(2)
    assert slots.take(None, lambda: True) and slots.take(None, lambda: True)
    me = threading.get_ident()
    assert slots.held_by(me) == 2
    with pytest.raises(ExecutorFailure, match="another executor"):
        slots.take(None, lambda: True)
    assert (slots.available, slots.waiting, slots.held_by(me)) == (0, 0, 2)
    slots.release(holder=me)
    assert slots.take(None, lambda: True)
    slots.release(2, holder=me)
    assert (slots.available, slots.held_by(me)) == (2, 0)


def test_a_thread_holding_some_slots_waits_for_the_others() -> None:
    slots = Slots(2)
    assert slots.take(None, lambda: True)
    other = in_thread(lambda: slots.take(None, lambda: True) and threading.get_ident())
    # Two threads with one slot each: neither is certain to wait forever.
    assert slots.take(time.monotonic() + 0.05, lambda: True) is False
    slots.release(holder=other["result"])
    assert slots.take(None, lambda: True)


def test_a_slot_held_by_no_thread_is_not_counted_until_passed_on() -> None:
    slots = Slots(1)
    assert slots.acquire(blocking=False)  # a spare's: the server's CLOSE frees it
    me = threading.get_ident()
    assert slots.take(time.monotonic() + 0.05, lambda: True) is False
    slots.pass_on(None, me)  # the spare is taken by this thread
    with pytest.raises(ExecutorFailure):
        slots.take(None, lambda: True)
    slots.pass_on(me, None)  # done with it: only the server's CLOSE is awaited
    assert slots.take(time.monotonic() + 0.05, lambda: True) is False


def test_a_slot_handed_to_a_waiter_is_counted_as_the_waiters() -> None:
    slots = Slots(1)
    assert slots.take(None, lambda: True)
    me = threading.get_ident()
    waiter: Dict[str, Any] = {}

    def wait() -> None:
        waiter["ident"] = threading.get_ident()
        waiter["took"] = slots.take(None, lambda: True)
        waiter["held"] = slots.held_by(waiter["ident"])
        with pytest.raises(ExecutorFailure):
            slots.take(None, lambda: True)
        slots.release(holder=waiter["ident"])

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    wait_for(lambda: slots.waiting == 1, "a thread in line", JOIN)
    slots.release(holder=me)
    thread.join(JOIN)
    assert not thread.is_alive()
    assert (waiter["took"], waiter["held"]) == (True, 1)
    assert (slots.available, slots.held_by(me), slots.held_by(waiter["ident"])) == (1, 0, 0)


def test_a_lower_limit_sends_a_waiter_holding_every_slot_away() -> None:
    # A refused open lowers the limit: a waiter left holding every slot would wait forever.
    slots = Slots(3)
    holder: Dict[str, int] = {}
    release = threading.Event()

    def hold_one_and_wait() -> bool:
        assert slots.take(None, lambda: True)
        holder["ident"] = threading.get_ident()
        try:
            return slots.take(None, lambda: True)
        finally:
            release.wait(JOIN)

    # Two other threads' slots, under idents no live thread has: a thread that ended may
    # see its ident reused by the next thread started.
    assert slots.acquire(blocking=False, holder=-1) and slots.acquire(blocking=False, holder=-2)
    waiting: List[Dict[str, Any]] = []
    thread = threading.Thread(target=lambda: waiting.append(in_thread(hold_one_and_wait)),
                              daemon=True)
    thread.start()
    wait_for(lambda: slots.waiting == 1, "a thread in line", JOIN)
    slots.lower(2)  # it holds 1 of 2: the others may still give theirs back
    assert slots.waiting == 1
    slots.lower(1)  # it holds 1 of 1: no one else can
    release.set()
    thread.join(JOIN)
    assert not thread.is_alive()
    assert isinstance(waiting[0].get("error"), ExecutorFailure), waiting[0]
    assert slots.waiting == 0 and slots.held_by(holder["ident"]) == 1


def test_hundreds_of_threads_that_share_the_slots_never_get_the_error() -> None:
    slots = Slots(4)
    errors: List[BaseException] = []
    start = threading.Barrier(300)

    def churn() -> None:
        me = threading.get_ident()
        try:
            start.wait(JOIN)
            for _ in range(20):
                if not slots.take(time.monotonic() + JOIN, lambda: True):
                    raise AssertionError("no slot within the bound")
                slots.release(holder=me)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(300)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert (slots.available, slots.waiting) == (4, 0)
    assert all(slots.held_by(thread.ident) == 0 for thread in threads if thread.ident)


# -- against OpenSSH ---------------------------------------------------------------------


def call_with_inner(ex: SSHExecutor, kind: str, shared_dir: str,
                    inner: Callable[[], Any]) -> Dict[str, Any]:
    """Run a ``kind`` call ("put", "get", "on_output") whose first callback runs ``inner()``."""
    source = source_file(shared_dir)
    seen: Dict[str, Any] = {}

    def once() -> None:
        if "inner" in seen:
            return
        seen["inner"] = None
        try:
            seen["inner"] = inner()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            seen["inner"] = exc

    def outer() -> Any:
        if kind == "put":
            return ex.put(str(source), str(Path(shared_dir, "uploaded")),
                          progress=lambda done, total: once())
        if kind == "get":
            return ex.get(str(source), str(Path(shared_dir, "copy")),
                          progress=lambda done, total: once())
        # The command outlives the callback: its session is not freed meanwhile.
        return ex.run_command("echo first; sleep 2", on_output=lambda stream, line: once())

    outcome = in_thread(outer)
    outcome["inner"] = seen.get("inner")
    return outcome


@pytest.mark.parametrize("kind", ["put", "get"])
def test_a_callback_of_a_call_holding_the_only_session_gets_an_error_at_once(
        make_sshd: Callable[..., Any], shared_dir: str, kind: str) -> None:
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")  # connected, limit probed
        outcome = call_with_inner(ex, kind, shared_dir, lambda: ex.run_command("echo inner"))
        assert not outcome["hung"], "the command waited for its own thread's session"
        inner = outcome["inner"]
        assert isinstance(inner, ExecutorFailure), inner
        assert inner.executor is ex
        assert "callback" in str(inner) and "max_sessions" in str(inner)
        # The call the callback ran in carried on; the connection is untouched.
        assert "error" not in outcome, outcome
        assert ex.run_command("echo after").stdout == "after\n"
        stats = ex.statistics()
    assert (stats.connects, stats.reconnects, stats.commands_retried) == (1, 0, 0)
    assert stats.commands_started == 4
    assert (stats.commands_succeeded, stats.commands_failed) == (3, 1)
    assert stats.waiting == 0


def test_an_on_output_callback_on_the_only_session_waits_for_the_command_to_end(
        make_sshd: Callable[..., Any], shared_dir: str) -> None:
    # The server closes a command's session once the command exits, without the thread
    # whose callback waits: a false error, not a hang, would be the defect here.
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        outcome = call_with_inner(ex, "on_output", shared_dir,
                                  lambda: ex.run_command("echo inner"))
        assert not outcome["hung"] and "error" not in outcome, outcome
        assert outcome["inner"].stdout == "inner\n"
        assert outcome["result"].stdout == "first\n"


@pytest.mark.parametrize("kind", ["get", "on_output"])
def test_a_callback_holding_one_of_two_sessions_runs_its_command(
        make_sshd: Callable[..., Any], shared_dir: str, kind: str) -> None:
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        outcome = call_with_inner(ex, kind, shared_dir, lambda: ex.run_command("echo inner"))
        assert not outcome["hung"] and "error" not in outcome, outcome
        assert outcome["inner"].stdout == "inner\n"


def test_nested_callbacks_wait_for_the_command_that_ends_by_itself(
        make_sshd: Callable[..., Any], shared_dir: str) -> None:
    # The get holds one session and the callback's command the other: the innermost
    # command waits for that command's end, which comes without the waiting thread.
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        innermost: List[Optional[BaseException]] = []

        def nested() -> Any:
            def on_output(stream: str, line: str) -> None:
                if not innermost:
                    try:
                        ex.run_command("echo innermost")
                        innermost.append(None)
                    except ExecutorFailure as exc:
                        innermost.append(exc)
            return ex.run_command("echo inner; sleep 2", on_output=on_output)

        outcome = call_with_inner(ex, "get", shared_dir, nested)
        assert not outcome["hung"] and "error" not in outcome, outcome
        assert outcome["inner"].stdout == "inner\n"
        assert innermost == [None]


def test_hundreds_of_threads_and_a_callback_holding_a_session_all_succeed(
        make_sshd: Callable[..., Any], shared_dir: str) -> None:
    # Threads that hold no slot never get the error, however long they queue;
    # nor does a callback holding one of the two slots while they do.
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        errors: List[BaseException] = []
        start = threading.Barrier(201)

        def command() -> None:
            try:
                start.wait(JOIN)
                ex.run_command("true")
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                errors.append(exc)

        threads = [threading.Thread(target=command, daemon=True) for _ in range(200)]
        for thread in threads:
            thread.start()

        def inner() -> Any:
            start.wait(JOIN)
            return ex.run_command("echo inner")

        outcome = call_with_inner(ex, "get", shared_dir, inner)
        for thread in threads:
            thread.join(JOIN)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        assert not outcome["hung"] and "error" not in outcome, outcome
        assert outcome["inner"].stdout == "inner\n"
        stats = ex.statistics()
    assert stats.commands_failed == 0 and stats.commands_succeeded == 203
