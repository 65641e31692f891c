"""Attack on the slots' holders (attack10a): threads that hold every slot between them.

A thread that holds every slot of its connection and asks for one more is
refused at once. Two threads that each hold one of two slots (each in a
``progress`` callback of a ``get``) and each ask for one more wait for each
other just the same: both waited until ``close()``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from helpers import source_file, wait_for

from paramiko_executor import ExecutorFailure, SSHExecutor
from paramiko_executor.slots import Slots

#: The bound on every join: far above what the work takes, so only a hang reaches it.
JOIN = 30.0


class Holder(threading.Thread):
    """Takes one slot, waits at ``took``, then for ``ask``, then asks for one more.

    It asks with no deadline unless ``patience`` is given (the test closes
    the slots to end a wait that went wrong).
    """

    def __init__(self, slots: Slots, took: threading.Barrier,
                 patience: Optional[float] = None) -> None:
        super().__init__(daemon=True)
        self.slots, self.took, self.patience = slots, took, patience
        self.ask = threading.Event()
        self.outcome: Any = None
        self.done = threading.Event()

    def run(self) -> None:
        assert self.slots.take(None, lambda: True)
        self.took.wait(JOIN)
        self.ask.wait(JOIN)
        try:
            self.outcome = self.slots.take(
                None if self.patience is None else time.monotonic() + self.patience,
                lambda: True)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.outcome = exc
        finally:
            self.done.set()

    def give_back(self) -> None:
        """Its call ends: every slot it holds goes back."""
        self.slots.release(1 + (self.outcome is True), holder=self.ident)


def in_line(slots: Slots, patience: Optional[float] = None) -> Tuple[Holder, Holder]:
    """Two holders of a slot each, both asking for one more: ``first`` (with ``patience``)
    in line already, ``second`` just asked."""
    took = threading.Barrier(3)
    first, second = Holder(slots, took, patience), Holder(slots, took)
    for thread in (first, second):
        thread.start()
    took.wait(JOIN)
    first.ask.set()
    wait_for(lambda: slots.waiting == 1, "the first in line", JOIN)
    second.ask.set()
    return first, second


def gets_its_slot(slots: Slots, holder: Holder) -> None:
    """``holder``, in line, gets the slot it asked for; its call ends, and every slot of
    the two is free."""
    assert holder.done.wait(JOIN) and holder.outcome is True
    holder.give_back()
    assert (slots.available, slots.waiting, slots._holders) == (2, 0, {})


# -- the slots alone ---------------------------------------------------------------


@pytest.fixture
def make_slots() -> Iterator[Callable[[int], Slots]]:
    """Slots closed at the end: a thread still waiting (the test failed) leaves the line."""
    made: List[Slots] = []

    def make(limit: int) -> Slots:
        made.append(Slots(limit))
        return made[-1]

    yield make
    for slots in made:
        slots.close()


def test_the_last_of_two_threads_holding_every_slot_between_them_is_refused_at_once(
        make_slots: Callable[[int], Slots]) -> None:
    slots = make_slots(2)
    first, second = in_line(slots)
    assert second.done.wait(JOIN), "the second thread waited for the first, which waits for it"
    assert isinstance(second.outcome, ExecutorFailure), second.outcome
    assert "wait forever" in str(second.outcome) and "another executor" in str(second.outcome)
    assert slots.held_by(second.ident or 0) == 1 and slots.waiting == 1  # nothing more taken
    second.give_back()  # its call ends: the first one gets its slot
    gets_its_slot(slots, first)


def test_a_thread_in_line_with_a_deadline_leaves_by_itself_so_the_next_one_waits(
        make_slots: Callable[[int], Slots]) -> None:
    slots = make_slots(2)
    first, second = in_line(slots, patience=0.2)
    assert first.done.wait(JOIN) and first.outcome is False  # its deadline passed
    assert not second.done.is_set()  # it waits: the first's call ends and gives back
    first.give_back()
    gets_its_slot(slots, second)


def test_a_lower_limit_sends_away_the_newest_of_the_threads_holding_every_slot(
        make_slots: Callable[[int], Slots]) -> None:
    slots = make_slots(3)
    assert slots.acquire(blocking=False)  # a spare's: its release comes by itself
    first, second = in_line(slots)
    # The spare's slot would reach the first.
    wait_for(lambda: slots.waiting == 2, "both in line", JOIN)
    slots.lower(2)  # the server allows two: the spare's release is kept back
    assert second.done.wait(JOIN), "the two in line hold both slots and wait for each other"
    assert isinstance(second.outcome, ExecutorFailure), second.outcome
    assert not first.done.is_set()
    second.give_back()  # kept back: three were held, two are allowed
    slots.release()  # the spare's CLOSE: the first one gets it
    gets_its_slot(slots, first)


# -- against OpenSSH ---------------------------------------------------------------------


def test_two_gets_whose_progress_runs_a_command_on_two_sessions_do_not_hang(
        make_sshd: Callable[..., Any], shared_dir: str) -> None:
    # Each get holds one of the two sessions; each progress callback's command
    # waited for the other's session, held by a thread waiting for its own:
    # both waited until close().
    server = make_sshd(max_sessions=2)
    source = source_file(shared_dir, 256 * 1024)
    ex = SSHExecutor(**server.executor_parameters())
    try:
        ex.run_command("true")  # connected, limit probed
        both = threading.Barrier(2)
        inner: Dict[str, Any] = {}
        outer: Dict[str, Any] = {}

        def get(name: str) -> None:
            def progress(done: int, total: int) -> None:
                if name in inner:
                    return
                inner[name] = None
                both.wait(JOIN)  # both gets hold their sessions now
                try:
                    inner[name] = ex.run_command(f"echo {name}")
                except BaseException as exc:  # noqa: BLE001 - handed to the test
                    inner[name] = exc
            try:
                outer[name] = ex.get(str(source), str(Path(shared_dir, name)), progress=progress)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                outer[name] = exc

        threads = [threading.Thread(target=get, args=(name,), daemon=True) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN)
        hung = [thread for thread in threads if thread.is_alive()]
    finally:
        ex.close()  # ends the wait either way
        for thread in threads:
            thread.join(JOIN)
    assert not hung, f"the commands waited for each other: {inner}"
    assert outer == {"a": 256 * 1024, "b": 256 * 1024}
    refused: List[ExecutorFailure] = [v for v in inner.values() if isinstance(v, ExecutorFailure)]
    ran = [v for v in inner.values() if not isinstance(v, BaseException)]
    assert len(refused) == 1 and len(ran) == 1, inner
    assert "wait forever" in str(refused[0]) and refused[0].executor is ex
    assert ran[0].stdout.strip() in ("a", "b")


# -- a refused channel open is not a lost connection -----------------------------------------


def test_a_server_without_sftp_after_a_refused_open_is_not_a_lost_connection(
        make_test_server: Callable[..., Any], shared_dir: str) -> None:
    # The project's test server has no SFTP subsystem. The probe's opens past
    # MaxSessions are refused, and paramiko keeps the refusal's ChannelException
    # as the transport's saved exception: the refused subsystem read as "the
    # connection was lost during the SFTP session: ChannelException(...)".
    server = make_test_server(max_sessions=2)
    source = Path(shared_dir, "source")
    source.write_bytes(b"data")
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")  # connected, limit probed: opens were refused
        assert server.channels_refused > 0
        with pytest.raises(ExecutorFailure) as caught:
            ex.get(str(source), str(Path(shared_dir, "copy")))
        assert "SFTP subsystem" in str(caught.value), caught.value
        assert "lost" not in str(caught.value)
        assert ex.run_command("echo alive").stdout == "alive\n"


# -- left: a callback that waits for another thread's command ---------------------------------


@pytest.mark.xfail(strict=True, reason=(
    "a callback holding the only session that runs the command through another thread (a "
    "HostGroup's pool, a thread pool) and waits for it: that thread holds no slot and waits, "
    "the callback's thread waits on it, not on the slots; the slots cannot tell, and it waits "
    "until the command's timeout (or close())"))
def test_a_group_command_from_a_progress_callback_holding_the_only_session_is_an_error(
        make_sshd: Callable[..., Any], shared_dir: str) -> None:
    from paramiko_executor import HostGroup

    server = make_sshd(max_sessions=1)
    source = Path(shared_dir, "source")
    source.write_bytes(os.urandom(256 * 1024))
    parameters = server.executor_parameters()
    host = parameters.pop("host")
    with HostGroup([host], **parameters) as group:
        ex = group.executor(host)
        assert isinstance(ex, SSHExecutor)
        ex.run_command("true")
        inner: List[Any] = []

        def progress(done: int, total: int) -> None:
            if not inner:
                # Bounded: the host's command gives up after 3 s in the pool's thread.
                inner.append(group.run_command("echo inner", timeout=3)[host])

        ex.get(str(source), str(Path(shared_dir, "copy")), progress=progress)
    assert isinstance(inner[0], ExecutorFailure) and "callback" in str(inner[0]), inner
