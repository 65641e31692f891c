"""attack14c: a call's boundary (`Link.taking`) discards at its start the sessions an
earlier boundary of its thread left (`Link.discard_left`), on the claim that no outer
call of the thread holds a session not running while code of the thread runs.

Code other than the call's callbacks runs in a thread amid a call: a signal handler
(in the main thread, between two lines, or while a wait is interrupted), a finalizer.
"""

from __future__ import annotations

import dis
import functools
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Generator, List, Tuple

import pytest
from helpers import at_line, call_in_thread, source_file, wait_for
from test_attack11a import _as_it_returns, _interrupt
from test_attack12c import _lines
from test_attack12d import _all_back, _bounded, _connected, _interrupted_discard

from paramiko_executor import ExecutorFailure, SSHExecutor
from paramiko_executor.blocks import Reservation
from paramiko_executor.channel import Cover, SessionChannel
from paramiko_executor.connection import Link, _Taking
from paramiko_executor.executors import SSHExecutor as _SSH
from paramiko_executor.slots import Slots
from paramiko_executor.warm import Spare


def _line_of(code: Any, text: str) -> int:
    """The number of the line of the function of ``code`` holding ``text`` (once)."""
    lines = Path(code.co_filename).read_text().splitlines()
    first = code.co_firstlineno
    last = max(line for _, line in dis.findlinestarts(code))
    found = [number for number in range(first, last + 1) if text in lines[number - 1]]
    assert len(found) == 1, (text, found)
    return found[0]


def _by_signal(act: Callable[[], None]) -> Callable[[], None]:
    """``act`` run by a SIGUSR1 handler raised now: a signal arriving in the main thread."""

    def fire() -> None:
        previous = signal.signal(signal.SIGUSR1, lambda *_: act())
        try:
            signal.raise_signal(signal.SIGUSR1)
        finally:
            signal.signal(signal.SIGUSR1, previous)

    return fire


def _without_spare(ex: SSHExecutor) -> Tuple[Link, Slots, Spare]:
    """`_connected`, its spare closed, and the server done freeing its session (a round
    trip: an open read with our CLOSE in reply would be refused)."""
    link, slots, spare = _connected(ex)
    spare.discard()
    wait_for(lambda: slots.available == slots.limit, "the spare's slot back", 10)
    link.transport.global_request("keepalive@openssh.com", wait=True)
    return link, slots, spare


def _recording_discards(monkeypatch: pytest.MonkeyPatch) -> List[SessionChannel]:
    """The sessions discarded (`SessionChannel.discard`) from now on, in a list kept up."""
    discarded: List[SessionChannel] = []
    original = SessionChannel.discard

    def discard(session: SessionChannel) -> None:
        discarded.append(session)
        original(session)

    monkeypatch.setattr(SessionChannel, "discard", discard)
    return discarded


WHERE = {
    # The open answered, its session this thread's: the wait for the answer is where a
    # signal lands most (a round trip per command).
    "settle_open": (SessionChannel.settle_open, "if self.opened:"),
    # The same, for the spare the command takes (its taker this thread).
    "spare": (SessionChannel.settle_open, "if self.opened:"),
    # Between the open and the run.
    "run_once": (_SSH._run_once, "return session.run(spec, deadline, after_exec=after_exec)"),
    # A transfer's, between the open and its hand-over to paramiko's SFTP client.
    "transfer": (next(code for code in _SSH._transfer.__code__.co_consts
                      if getattr(code, "co_name", None) == "attempt"),
                 "return work(session.hand_over(), deadline, side)"),
}


@pytest.mark.parametrize("where", sorted(WHERE))
@pytest.mark.hang_timeout(120)
def test_a_signal_handlers_command_leaves_the_interrupted_commands_session_alone(
        make_sshd: Any, shared_dir: str, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A command run by a signal handler (SIGUSR1, say, to stop a remote job) landing as
    a command of the main thread holds its session, not running yet: the handler's call
    discarded that session at its boundary's start, as one left by an earlier call."""
    server = make_sshd(max_sessions=3)
    function, text = WHERE[where]
    code = getattr(function, "__code__", function)
    line = _line_of(code, text)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        link = ex._connection.link
        assert link is not None and link.slots is not None and link.spare is not None
        slots, spare = link.slots, link.spare
        if where == "spare":
            # A spare's open may be refused while the probe's sessions are being freed:
            # the next command's exec makes another.
            for _ in range(20):
                if spare.held:
                    break
                assert ex.run_command("true", timeout=30).exit_code == 0
            assert spare.held, "no spare was made in 20 commands"
        else:
            _without_spare(ex)  # the command opens its own channel
        nested: List[str] = []

        def handler() -> None:
            nested.append(ex.run_command("echo nested", timeout=30).stdout)

        if where == "transfer":
            source = source_file(shared_dir, 64 * 1024)

            def outer() -> Any:
                return ex.put(str(source), str(Path(shared_dir, "copy")), timeout=30)
        else:
            def outer() -> Any:
                return ex.run_command("echo outer", timeout=30).stdout

        before = ex.statistics()
        discarded = _recording_discards(monkeypatch)
        result = at_line(code, line, _by_signal(handler), outer)()
        assert nested == ["nested\n"], "the handler did not run"
        assert result == (64 * 1024 if where == "transfer" else "outer\n")
        after = ex.statistics()
        assert not discarded, "the handler's call discarded the outer call's session"
        assert after.refused_opens == before.refused_opens, "an open was refused"
        assert after.reconnects == before.reconnects, "the connection was lost"
        wait_for(lambda: slots.available + spare.held == slots.limit and not slots._holders,
                 "every slot back", timeout=10,
                 explain=lambda: f"{slots.available} free, holders {slots._holders}")
        assert ex._connection.link is link


@pytest.mark.hang_timeout(120)
def test_a_session_left_inside_a_block_is_discarded_by_the_threads_next_call(
        make_sshd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """MaxSessions 2, inside a ``bounded_connection`` block of the thread (its boundary
    running for as long as the block): a Ctrl-C as ``SessionChannel(...)`` returned into
    ``_open_session``, then two more as the boundary discarded that session, leave it the
    thread's; the thread's next call discards it as it begins: the block's boundary,
    narrowed to its claim, holds no session (it does not hold that discard back)."""
    server = make_sshd(max_sessions=2)
    discard = SessionChannel.discard
    fired: List[bool] = []

    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        me = threading.get_ident()
        with ex.bounded_connection:
            spare.discard()  # the command opens its own channel
            wait_for(lambda: slots.available == 1, "the spare's slot back", 10)
            monkeypatch.setattr(SessionChannel, "discard", _interrupted_discard(fired, 2))
            with pytest.raises(KeyboardInterrupt):
                _as_it_returns(SessionChannel.__init__.__code__, _interrupt,
                               lambda: ex.run_command("true", timeout=30),
                               into=SSHExecutor._open_session.__code__)()
            monkeypatch.setattr(SessionChannel, "discard", discard)
            assert len(fired) == 2
            assert slots.held_by(me) == 2, "the block's slot and the session left"
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
            assert slots.held_by(me) == 1, "the session left is still the thread's"
        _all_back(ex, link, slots, spare)


def _put_interrupted_by_progress(ex: SSHExecutor, shared_dir: str) -> None:
    """A put whose ``progress`` raises KeyboardInterrupt (its boundary gives back)."""
    def progress(done: int, total: int) -> None:
        raise KeyboardInterrupt

    ex.put(str(source_file(shared_dir, 64 * 1024)), str(Path(shared_dir, "copy")),
           progress=progress, timeout=30)


def _blocks_three_deep(ex: SSHExecutor, shared_dir: str) -> None:
    """Three ``bounded_connection`` blocks of the thread, one in the other, each opening a
    session; the innermost raises KeyboardInterrupt."""
    with ex.bounded_connection as transport:
        _exec(transport, "true").recv_exit_status()
        with ex.bounded_connection:
            with ex.bounded_connection:
                _exec(transport, "true").recv_exit_status()
                raise KeyboardInterrupt


def _kept_block_closed_in_another_thread(ex: SSHExecutor, shared_dir: str) -> None:
    """A block kept in a generator by a command's ``on_output``, which raises; the
    generator is closed by another thread (the sweep's Ctrl-C traces that one too)."""
    held: List[Generator[None, None, None]] = []

    def callback(*args: Any) -> None:
        if not held:
            held.append(_bounded(ex))
            next(held[0])
        raise ValueError("the callback's own error")

    try:
        ex.run_command("echo first; sleep 0.1", timeout=30, on_output=callback)
    finally:
        for block in held:
            closer = call_in_thread(functools.partial(_traced_like_caller, block.close))
            closer["thread"].join(30)
            assert not closer["thread"].is_alive()
            if isinstance(closer.get("error"), KeyboardInterrupt):
                block.close()  # the Ctrl-C landed in the closer: the caller ends it


#: The sweep's tracer, set in the calling thread; a closer thread traces the same lines.
_TRACE: List[Callable[[Callable[[], Any]], Callable[[], Any]]] = []


def _traced_like_caller(call: Callable[[], Any]) -> Any:
    return (_TRACE[0](call) if _TRACE else call)()


def _exec(transport: Any, command: str) -> Any:
    chan = transport.open_session(timeout=30)
    chan.exec_command(command)
    return chan


_PATHS: Dict[str, Tuple[int, Callable[[SSHExecutor, str], None]]] = {
    "put": (1, _put_interrupted_by_progress),
    "blocks three deep": (3, _blocks_three_deep),
    "kept block closed in another thread": (2, _kept_block_closed_in_another_thread),
}
_BOUNDARY: List[Callable[..., Any]] = [
    _Taking.__init__, _Taking.only, _Taking.__exit__, Link.give_back, Link.discard_left,
    Slots.loose, Slots.keep, Slots._kept_by, Slots.release_beyond]


def _fire(fired: List[bool]) -> None:
    fired.append(True)
    raise KeyboardInterrupt


@pytest.mark.parametrize("path", sorted(_PATHS))
@pytest.mark.hang_timeout(600)
def test_a_ctrl_c_at_each_line_of_the_boundary_on_other_paths(
        make_sshd: Any, shared_dir: str, path: str) -> None:
    """A Ctrl-C at each line of the boundary's code (the first time a thread of the path
    reaches it) on a put whose ``progress`` raises KeyboardInterrupt (MaxSessions 1), three
    nested blocks raising it (MaxSessions 3), and a block an ``on_output`` callback keeps
    then closed by another thread (MaxSessions 2): every slot back, none twice, the
    connection kept, the next command runs."""
    sessions, run = _PATHS[path]
    server = make_sshd(max_sessions=sessions)
    bad: List[str] = []
    reached = 0
    for function in _BOUNDARY:
        for line in _lines(function):
            fired: List[bool] = []
            _TRACE[:] = [functools.partial(at_line, function.__code__, line,
                                           functools.partial(_fire, fired))]
            with SSHExecutor(**server.executor_parameters()) as ex:
                link, slots, spare = _connected(ex)
                try:
                    _traced_like_caller(lambda: run(ex, shared_dir))
                except (KeyboardInterrupt, ValueError):
                    pass
                _TRACE.clear()
                reached += bool(fired)
                try:
                    _all_back(ex, link, slots, spare)
                    assert not any(ref() is not None and ref().running  # type: ignore[union-attr]
                                   for refs in link.boundaries.values() for ref in refs)
                except AssertionError as exc:
                    bad.append(f"{function.__qualname__}:{line}: {exc}")
    assert not bad, "\n".join(bad)
    assert reached, "no line of the boundary was reached"


@pytest.mark.hang_timeout(120)
def test_a_signal_handlers_failing_command_leaves_the_interrupted_commands_session_alone(
        make_sshd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """MaxSessions 1: a signal handler runs a command as a command of the main thread has
    its open answered (its session the only one, the thread's): the handler's command
    fails at once ("already holds all 1 session(s)"), as it should, and its boundary's
    clean-up discarded the outer command's session, which then ran on a closed channel
    (before 99452eb too). It now leaves alone the sessions the thread held as it began
    while an outer call of the thread ran (`_Taking.spared`)."""
    server = make_sshd(max_sessions=1)
    line = _line_of(SessionChannel.settle_open.__code__, "if self.opened:")
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _without_spare(ex)
        failures: List[BaseException] = []

        def handler() -> None:
            try:
                ex.run_command("echo nested", timeout=30)
            except ExecutorFailure as exc:
                failures.append(exc)

        discarded = _recording_discards(monkeypatch)
        result = at_line(SessionChannel.settle_open.__code__, line, _by_signal(handler),
                         lambda: ex.run_command("echo outer", timeout=30))()
        monkeypatch.undo()
        assert len(failures) == 1, "the handler's command did not fail"
        assert result.stdout == "outer\n"
        assert not discarded, "the handler's call discarded the outer call's session"
        _all_back(ex, link, slots, spare)


@pytest.mark.hang_timeout(120)
def test_a_signal_handlers_command_as_the_spare_is_made_does_not_wait_for_good(
        make_sshd: Any) -> None:
    """MaxSessions 3: a signal handler runs a command as a command of the main thread
    makes the spare after its exec (`Spare.replenish`, under the spare's lock): the
    handler's command takes the spare, waiting for that lock, held by its own thread.
    A watchdog lets go of the lock after 5 s (the test would hang for good else)."""
    server = make_sshd(max_sessions=3)
    line = _line_of(Spare._make.__code__, "spare.hold(None)")
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _without_spare(ex)
        began = threading.Event()
        ended = threading.Event()
        freed: List[bool] = []

        def watchdog() -> None:
            if began.wait(30) and not ended.wait(5) and spare._lock.locked():
                freed.append(True)
                spare._lock.release()

        def handler() -> None:
            began.set()
            try:
                ex.run_command("echo nested", timeout=30)
            finally:
                ended.set()

        guard = threading.Thread(target=watchdog, daemon=True)
        guard.start()
        try:
            at_line(Spare._make.__code__, line, _by_signal(handler),
                    lambda: ex.run_command("echo outer", timeout=30))()
        except RuntimeError:
            pass  # the watchdog's release: the lock was let go twice
        guard.join(30)
        assert not freed, "the handler's command waited for its own thread's lock"


def test_a_boundary_does_not_count_a_kept_blocks_slot_loose_as_its_cover_releases_it() -> None:
    """A block kept by thread ``me`` ended in another thread with a session unclosed (its
    reservation took the slot over, still ``me``'s), and the server's CLOSE of that session
    releases it in paramiko's thread (`Cover._release`: the holder cleared, then the
    slot released) just as a call of ``me`` fails (`Slots.release_beyond`): in between, the
    slot is counted to ``me`` and to no kept claim, so the boundary released it as leaked,
    and the cover released it again."""
    slots = Slots(3)
    me = threading.get_ident()
    block = Reservation(slots, me)
    block.taken = slots.acquire(blocking=False, holder=me)
    slots.keep(block)
    held = slots.loose(me)  # a call of ``me`` begins: the block's slot is not loose
    block._slots, block._holder = slots, me  # taken over, as `Reservation.__exit__` does
    block.taken = False
    paused = threading.Event()
    go = threading.Event()

    def pause() -> None:
        paused.set()
        assert go.wait(10)

    line = _line_of(Cover._release.__code__, "if slots is not None:")
    closer = call_in_thread(at_line(Cover._release.__code__, line, pause, block._release))
    assert paused.wait(10), closer
    try:
        slots.release_beyond(me, held)  # the call's boundary, after an error
    finally:
        go.set()
        closer["thread"].join(10)
    assert "error" not in closer, closer
    assert (slots.available, slots._holders) == (3, {})
