"""attack12d: the boundary of a call that takes sessions and slots (`Link.taking`).

Its clean-up gives back what *its thread* holds beyond what that thread held
as the call began, a ``bounded_connection`` block's slot left out, and its
start what an earlier boundary of the thread left. One regression test per
defect; a strict xfail names what is left.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Callable, Generator, List, Tuple

import pytest
from helpers import at_line, interrupting, source_file, wait_for
from test_attack11a import _as_it_returns, _interrupt
from test_attack12c import _lines

from paramiko_executor import SSHExecutor
from paramiko_executor.blocks import Reservation
from paramiko_executor.channel import SessionChannel
from paramiko_executor.connection import Link, _Taking
from paramiko_executor.slots import Claim, Slots
from paramiko_executor.warm import Spare


def _bounded(ex: SSHExecutor) -> Generator[None, None, None]:
    """A generator holding a ``bounded_connection`` block open while suspended."""
    with ex.bounded_connection:
        yield


def _opening_a_block(ex: SSHExecutor) -> Tuple[List[Generator[None, None, None]],
                                                Callable[..., None]]:
    """A callback that enters a ``bounded_connection`` block of ``ex`` the first time
    (kept open, in the list returned), then raises ValueError each time."""
    blocks: List[Generator[None, None, None]] = []

    def callback(*args: Any) -> None:
        if not blocks:
            blocks.append(_bounded(ex))
            next(blocks[0])
        raise ValueError("the callback's own error")

    return blocks, callback


def _connected(ex: SSHExecutor) -> Tuple[Link, Slots, Spare]:
    """``ex``'s connection once a command ran on it: its link, slots and spare."""
    assert ex.run_command("true", timeout=30).exit_code == 0
    link = ex._connection.link
    assert link is not None and link.slots is not None and link.spare is not None
    return link, link.slots, link.spare


def _all_back(ex: SSHExecutor, link: Link, slots: Slots, spare: Spare) -> None:
    """Every slot of ``link`` came back, no thread holding one, and the next command runs
    on the same connection."""
    wait_for(lambda: slots.available + spare.held == slots.limit and not slots._holders,
             "every slot back", timeout=10,
             explain=lambda: f"{slots.available} free, holders {slots._holders}")
    assert link.alive() and ex._connection.link is link, "the connection was lost"
    assert ex.run_command("echo ok", timeout=10).stdout == "ok\n"


@pytest.mark.hang_timeout(120)
def test_a_bounded_connection_closed_inside_a_transfer_keeps_the_transfers_slot(
        make_sshd: Any, shared_dir: str) -> None:
    """MaxSessions 2: a ``bounded_connection`` block left suspended in a generator, closed
    (``GeneratorExit``) from a ``progress`` callback of a put of the same thread, gave back
    the put's slot too: its boundary released every slot the thread held beyond those it
    held as the block began, the put's among them, which the put's session released again
    at the server's CLOSE. The block's boundary now gives back its own claim alone once
    the block is handed to its caller (`_Taking.only`)."""
    server = make_sshd(max_sessions=2)
    source = source_file(shared_dir, 1024 * 1024)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        block = _bounded(ex)
        next(block)
        me = threading.get_ident()
        seen: List[int] = []

        def progress(done: int, total: int) -> None:
            if not seen:
                seen.append(slots.held_by(me))  # the block's and the put's
                block.close()
                seen.append(slots.held_by(me))  # the put's alone
                seen.append(slots.available)  # one: the put's session is open

        ex.put(str(source), str(Path(shared_dir, "copy")), progress=progress)
        assert seen == [2, 1, 1], seen
        _all_back(ex, link, slots, spare)


@pytest.mark.parametrize("kind", ["on_output", "progress"])
@pytest.mark.hang_timeout(120)
def test_a_block_a_callback_keeps_open_keeps_its_slot_past_the_calls_error(
        make_sshd: Any, shared_dir: str, kind: str) -> None:
    """MaxSessions 2: a callback enters a ``bounded_connection`` block (a suspended
    generator) and then raises ValueError: the call's boundary released the block's slot,
    still held (its claim taken), and the block released it again as it ended."""
    server = make_sshd(max_sessions=2)
    source = source_file(shared_dir, 256 * 1024)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        me = threading.get_ident()
        blocks, callback = _opening_a_block(ex)
        with pytest.raises(ValueError):
            if kind == "on_output":
                ex.run_command("echo first; sleep 0.2", timeout=30, on_output=callback)
            else:
                ex.put(str(source), str(Path(shared_dir, "copy")), progress=callback)
        assert slots.held_by(me) == 1, "the open block's slot was given back"
        blocks[0].close()
        _all_back(ex, link, slots, spare)


@pytest.mark.parametrize("taken_over", [False, True])
def test_a_boundary_gives_back_a_leaked_slot_and_not_a_kept_blocks(taken_over: bool) -> None:
    """A thread holds a kept block's slot (`Slots.keep`), by its claim or, past the
    block's end with a session not closed yet, by the reservation itself (a Ctrl-C
    before it passed the slot on to no thread), and a slot no one gives back (leaked
    by a Ctrl-C): the boundary gives back the leaked one alone, the block its own."""
    slots = Slots(3)
    me = threading.get_ident()
    block = Reservation(slots, me)
    block.taken = slots.acquire(blocking=False, holder=me)
    slots.keep(block)
    if taken_over:
        block._slots, block._holder = slots, me  # as `Reservation.__exit__` takes it over
        block.taken = False
    assert slots.acquire(blocking=False, holder=me)  # the leaked one
    assert (slots.held_by(me), slots.loose(me)) == (2, 1)
    slots.release_beyond(me, 0)
    assert (slots.available, slots.held_by(me), slots.loose(me)) == (2, 1, 0)
    if taken_over:
        block._release()
    else:
        Claim.__exit__(block)
    assert (slots.available, slots._holders, slots.loose(me)) == (3, {}, 0)
    assert not slots._kept, "a claim holding no slot is still kept"  # no lock per call again


def _interrupted_discard(fired: List[bool], interrupts: int) -> Callable[[SessionChannel], None]:
    """`SessionChannel.discard`, raising KeyboardInterrupt at its entry the first
    ``interrupts`` times a boundary's clean-up (`Link.give_back`) calls it (a trace function
    that raised is switched off: the later Ctrl-Cs are raised here)."""
    discard = SessionChannel.discard

    def interrupted_discard(session: SessionChannel) -> None:
        caller = sys._getframe(1)
        callers = (caller.f_code.co_name, caller.f_back.f_code.co_name if caller.f_back else "")
        if len(fired) < interrupts and "give_back" in callers:
            fired.append(True)
            raise KeyboardInterrupt
        discard(session)

    return interrupted_discard


@pytest.mark.parametrize("interrupts", [1, 2])
@pytest.mark.hang_timeout(120)
def test_more_ctrl_cs_as_the_boundary_discards_a_session_leave_the_thread_usable(
        make_sshd: Any, monkeypatch: pytest.MonkeyPatch, interrupts: int) -> None:
    """MaxSessions 1: a Ctrl-C as ``SessionChannel(...)`` returned into ``_open_session``
    (which the boundary covers), then more as the boundary discarded that session (at
    ``SessionChannel.discard``'s entry): every later command of the thread raised "already
    holds all 1 session(s)", the session left open for the connection's life. The
    boundary discards again after a second Ctrl-C; after a third, the thread's next
    call's boundary does as it begins (when no other call of the thread is in its
    boundary: see test_attack14c)."""
    server = make_sshd(max_sessions=1)
    discard = SessionChannel.discard
    fired: List[bool] = []
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        monkeypatch.setattr(SessionChannel, "discard", _interrupted_discard(fired, interrupts))
        with pytest.raises(KeyboardInterrupt):
            _as_it_returns(SessionChannel.__init__.__code__, _interrupt,
                           lambda: ex.run_command("true", timeout=30),
                           into=SSHExecutor._open_session.__code__)()
        monkeypatch.setattr(SessionChannel, "discard", discard)
        assert len(fired) == interrupts, "the boundary discarded less often"
        if interrupts > 1:
            assert slots.held_by(threading.get_ident()) == 1, "the session was given back"
            assert ex.run_command("true", timeout=30).exit_code == 0
        _all_back(ex, link, slots, spare)


@pytest.mark.parametrize("where", ["the claim's release", "the boundary's narrowing"])
@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_a_bounded_connection_block_ends_or_narrows_gives_its_slot_back(
        make_sshd: Any, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """MaxSessions 1: a Ctrl-C at the entry of ``Slots.release`` as the block's claim gives
    its slot back (the claim still taken: the boundary's second exit of the claim gives it
    back), or as the boundary narrows to the claim (`_Taking.only`: the whole boundary
    gives back): the slot comes back, no thread holding it."""
    server = make_sshd(max_sessions=1)
    owner, name = (Slots, "release") if where == "the claim's release" else (_Taking, "only")
    original = getattr(owner, name)
    fired: List[bool] = []
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        monkeypatch.setattr(owner, name, interrupting(
            original, fired, None if name == "only" else "__exit__"))
        with pytest.raises(KeyboardInterrupt):
            with ex.bounded_connection:
                pass
        monkeypatch.setattr(owner, name, original)
        assert fired
        _all_back(ex, link, slots, spare)


#: Ctrl-C at each line of these (the first time the calling thread reaches it), as an
#: ``on_output`` callback enters a block it keeps open and raises.
_SWEPT: List[Callable[..., Any]] = [
    _Taking.__init__, _Taking.only, _Taking.__exit__, Link.give_back, Link.discard_left,
    Slots.loose, Slots.keep, Slots._kept_by, Slots.release_beyond]
_CASES: List[Tuple[Callable[..., Any], int]] = [
    (function, line) for function in _SWEPT for line in _lines(function)]


@pytest.mark.parametrize("function,line", _CASES,
                         ids=[f"{function.__qualname__}:{line}" for function, line in _CASES])
@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_at_any_line_of_the_boundary_leaves_every_slot_given_back_once(
        make_sshd: Any, function: Callable[..., Any], line: int) -> None:
    """MaxSessions 2: a callback enters a block it keeps open, then raises; a Ctrl-C at
    one line of the boundary's code on the way (lines this path does not reach, such as
    a loop's body with nothing to give back, are passed): once the block ends, every
    slot is back, none released twice (`Slots` raises on one released too many)."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        blocks, callback = _opening_a_block(ex)
        with pytest.raises((ValueError, KeyboardInterrupt)):
            at_line(function.__code__, line, _interrupt, lambda: ex.run_command(
                "echo first; sleep 0.2", timeout=30, on_output=callback))()
        for block in blocks:
            block.close()
        _all_back(ex, link, slots, spare)
