"""attack11a: a slot per server session, freed once, on every path (real servers).

Ctrl-C lands where CPython runs signal handlers: at a function's entry, after
a call into C returns (a class's construction included), at a loop's jump
back. The sweeps of test_attack10f raise at the start of a line, so they miss
the points between a call's return and the store of its result, and a
function's own entry. One regression test per defect; a strict xfail names
what is left.
"""

from __future__ import annotations

import dis
import inspect
import threading
from typing import Any, Callable, Dict, List, Optional, Set

import paramiko
import pytest
from helpers import at_line, call_in_thread, make_spare, traced_in, wait_for
from paramiko.common import MSG_CHANNEL_CLOSE, MSG_CHANNEL_OPEN
from test_attack10f import _line

from paramiko_executor import CommandTimeout, ExecutorFailure, SSHExecutor
from paramiko_executor.channel import SessionChannel
from paramiko_executor.internals import send_if_clear, wrap_handlers
from paramiko_executor.slots import Claim, Slots
from paramiko_executor.warm import Spare


def _interrupt() -> None:
    raise KeyboardInterrupt


def _as_it_returns(code: Any, act: Callable[[], None], call: Callable[[], Any],
                   into: Any = None) -> Callable[[], Any]:
    """``call``, with ``act()`` run (once) as the function of ``code`` returns (to a frame
    of ``into``'s code, if given): a Ctrl-C handled in the caller right after the call,
    before the caller stored its result (CPython checks for signals as a call into C,
    such as a class's construction, returns)."""
    done: List[bool] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "return" and not done and (
                into is None or (frame.f_back is not None and frame.f_back.f_code is into)):
            done.append(True)
            act()
        return local

    return traced_in(code, local, done, call)


_SEND = paramiko.packet.Packetizer.send_message


def _in_the_send_of(kind: int, line: int, call: Callable[[], Any],
                    done: List[bool]) -> Callable[[], Any]:
    """``call``, with a Ctrl-C as paramiko's send of the first packet of message ``kind``
    reaches ``line`` (``done`` gets an item then)."""
    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == line and not done \
                and frame.f_locals.get("cmd") == kind:
            done.append(True)
            raise KeyboardInterrupt
        return local

    return traced_in(_SEND.__code__, local, done, call)


def _after_the_write_of(kind: int, call: Callable[[], Any]) -> Callable[[], Any]:
    """``call``, with a Ctrl-C once paramiko wrote the first packet of message ``kind``
    (as it counts the bytes sent: ``len()``, a call into C, where CPython checks)."""
    return _in_the_send_of(kind, _line(_SEND, "self.__sent_bytes += len(out)"), call, [])


_CALLS = {dis.opmap[name] for name in ("CALL", "CALL_FUNCTION", "CALL_METHOD")
          if name in dis.opmap}


def _after_a_call(frame: Any) -> bool:
    """Whether ``frame``'s next instruction is the one after a call, which just returned."""
    code_bytes, before = frame.f_code.co_code, frame.f_lasti - 2
    while before >= 0 and code_bytes[before] == dis.opmap.get("CACHE", -1):
        before -= 2
    return before >= 0 and code_bytes[before] in _CALLS


def _as_the_call_returns(code: Any, line: int, call: Callable[[], Any],
                         caller: Optional[str] = None) -> Callable[[], Any]:
    """``call``, with a Ctrl-C (once) as the first call on ``line`` of the function of
    ``code`` (called from a function of file ``caller``, if given) returns, before the
    next instruction: where CPython checks for signals after a call into C (a lock's
    ``acquire``, say)."""
    done: List[bool] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if caller is not None and (frame.f_back is None
                                   or frame.f_back.f_code.co_filename != caller):
            return local
        if event == "opcode" and not done and frame.f_lineno == line and _after_a_call(frame):
            done.append(True)
            raise KeyboardInterrupt
        return local

    return traced_in(code, local, done, call, opcodes=True)


def _as_a_call_returns(codes: Set[Any], count: int, call: Callable[[], Any]) -> Callable[[], Any]:
    """``call``, with a Ctrl-C as the ``count``-th call (from 1) made in a function of
    ``codes`` returns (in the calling thread); none if fewer calls returned there."""
    returned: List[bool] = []
    done: List[bool] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode" and not done and _after_a_call(frame):
            returned.append(True)
            if len(returned) == count:
                done.append(True)
                raise KeyboardInterrupt
        return local

    return traced_in(frozenset(codes), local, done, call, opcodes=True)


def _free(ex: SSHExecutor) -> int:
    """The slots of ``ex``'s connection that are free or its spare's (no session of a command)."""
    link = ex._connection.link
    assert link is not None and link.slots is not None and link.spare is not None
    return link.slots.available + (1 if link.spare.held else 0)


def _slots(ex: SSHExecutor) -> Slots:
    link = ex._connection.link
    assert link is not None and link.slots is not None
    return link.slots


def _interrupted(call: Callable[[], Any]) -> None:
    with pytest.raises(KeyboardInterrupt):
        call()


def _all_back(ex: SSHExecutor, limit: int, where: str) -> None:
    """Every slot of ``ex``'s connection came back, no thread holding one."""
    wait_for(lambda: _free(ex) == limit and not _slots(ex)._holders,
             f"every slot back {where}", timeout=10,
             explain=lambda: f"free {_free(ex)} of {limit}, holders {_slots(ex)._holders}")


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_the_commands_channel_is_made_gives_its_session_back(
        make_sshd: Any) -> None:
    """MaxSessions 1: a Ctrl-C as ``SessionChannel(...)`` returned into ``_open_session``
    (before ``session =``) left the open session, and its slot held by the thread, no
    one's: every later command of the thread raised "already holds all 1 session(s)"."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        _interrupted(_as_it_returns(SessionChannel.__init__.__code__, _interrupt,
                                    lambda: ex.run_command("true", timeout=30),
                                    into=SSHExecutor._open_session.__code__))
        _all_back(ex, 1, "after a Ctrl-C as the channel was made")
        assert ex.run_command("echo ok", timeout=10).stdout == "ok\n"


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_the_spare_is_made_gives_its_session_back(make_sshd: Any) -> None:
    """MaxSessions 2: a Ctrl-C (in the command's thread, which makes the spare after its
    exec) as ``SessionChannel(...)`` returned into ``Spare.replenish``, before
    ``self._pending =``, left the spare's session open and its slot taken for good."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        link = ex._connection.link
        assert link is not None and link.spare is not None
        wait_for(lambda: _free(ex) == 2, "the probe's slots", timeout=10)
        link.spare.discard()
        wait_for(lambda: _free(ex) == 2, "the spare's slot", timeout=10)
        _interrupted(_as_it_returns(SessionChannel.__init__.__code__, _interrupt,
                                    lambda: ex.run_command("true", timeout=30),
                                    into=Spare._make.__code__))
        _all_back(ex, 2, "after a Ctrl-C as the spare was made")


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_the_claim_gives_its_slot_back_still_gives_it_back(
        make_sshd: Any) -> None:
    """MaxSessions 1: a Ctrl-C at the entry of ``Claim.__exit__`` (a Python function:
    CPython checks for signals there), as a ``bounded_connection`` block ended, kept its
    slot, held by the thread: its next command raised "already holds all 1 session(s)"."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0

        def block() -> None:
            with ex.bounded_connection:
                pass

        _interrupted(at_line(Claim.__exit__.__code__, _line(Claim.__exit__, "if self.taken"),
                             _interrupt, block))
        _all_back(ex, 1, "after a Ctrl-C as the claim began to give its slot back")


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_the_slot_is_taken_gives_it_back(make_sshd: Any) -> None:
    """MaxSessions 1: a Ctrl-C in ``Slots.acquire`` once it counted the slot taken (after
    ``self._holders.get``, a call into C) and before it returned: ``claim.taken`` was
    never set, so no one gave the slot back."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        # Raised at the start of the line after the holder's count: as a signal handled
        # once ``self._holders.get`` returned (still inside ``with self._cond``).
        _interrupted(at_line(Slots.acquire.__code__, _line(Slots.acquire, "return True"),
                             _interrupt,
                             lambda: ex.run_command("true", timeout=30)))
        _all_back(ex, 1, "after a Ctrl-C as the slot was taken")


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_after_the_open_went_out_keeps_its_slot_until_the_server_closes(
        make_sshd: Any) -> None:
    """MaxSessions 1: a Ctrl-C after the OPEN's write (in paramiko's send, as it counts
    the packet), before ``new_session_channel`` returned the channel, lost it: the claim
    gave the slot back, the server confirmed the open ("Success for unrequested
    channel!"), and its session stayed open for the connection's life. Every later open
    was refused (20 times, then ExecutorFailure): the connection unusable for good."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        _interrupted(_after_the_write_of(MSG_CHANNEL_OPEN,
                                         lambda: ex.run_command("true", timeout=30)))
        # The server's confirmation closes the channel, whose CLOSE frees the slot.
        _all_back(ex, 1, "after a Ctrl-C once the OPEN was out")
        before = ex.statistics().refused_opens
        try:
            assert ex.run_command("echo ok", timeout=5).stdout == "ok\n"
        except (CommandTimeout, ExecutorFailure) as exc:  # or the refusals' failure
            raise AssertionError(f"the next command found no session ({exc}): "
                                 f"{ex.statistics().refused_opens - before} opens refused"
                                 ) from None


@pytest.mark.hang_timeout(300)
def test_a_ctrl_c_anywhere_in_the_opens_send_leaves_the_connection_usable(
        make_sshd: Any) -> None:
    """MaxSessions 1: a Ctrl-C at each line of paramiko's send of the OPEN (under its
    write lock, before and after the write): the slot comes back (freed at once when
    the OPEN never went out, on the server's CLOSE when it did), and the next command
    runs. Lines of paramiko's ``finally`` are left out: raised there, paramiko itself
    would keep its write lock (a real Ctrl-C lands only as a call returns)."""
    lines = sorted({line for _, line in dis.findlinestarts(_SEND.__code__) if line})
    first = _line(_SEND, "orig_len = len(data)")
    last = _line(_SEND, "finally:")
    swept = []
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        for line in (line for line in lines if first <= line < last):
            done: List[bool] = []
            run = _in_the_send_of(MSG_CHANNEL_OPEN, line, lambda: ex.run_command(
                "true", timeout=30), done)
            if not _raised(run):
                assert not done, f"the Ctrl-C at line {line} was swallowed"
                continue  # a line this connection's send never reaches (no compression...)
            swept.append(line)
            link = ex._connection.link
            assert link is not None
            # Between the packet's count and the end of its write, the stream is
            # broken: the server ends the connection, and the next command reconnects.
            wait_for(lambda link=link: not link.alive()  # type: ignore[misc]
                     or (_free(ex) == 1 and not _slots(ex)._holders),
                     f"the slot back, or the connection ended, after line {line}",
                     timeout=10)
            assert ex.run_command("echo ok", timeout=10).stdout == "ok\n", line
    assert len(swept) >= 8, f"only lines {swept} of the send were reached"


def _raised(call: Callable[[], Any]) -> bool:
    """Whether ``call()`` raised KeyboardInterrupt (False: it returned)."""
    try:
        call()
    except KeyboardInterrupt:
        return True
    return False


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_the_spare_is_popped_gives_its_session_back(make_sshd: Any) -> None:
    """MaxSessions 2: a Ctrl-C as ``Spare._pop`` left its ``with self._lock`` (after the
    lock's ``__exit__``, a call into C), the spare taken out and not yet returned to
    ``Spare.take``: the spare's session stayed open and its slot taken for good."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        make_spare(ex)
        _interrupted(at_line(Spare._pop.__code__, _line(Spare._pop, "return pending"),
                             _interrupt, lambda: ex.run_command("true", timeout=30)))
        _all_back(ex, 2, "after a Ctrl-C as the spare was popped")


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_the_spares_slot_passes_to_the_thread_gives_it_back(
        make_sshd: Any) -> None:
    """MaxSessions 2: a Ctrl-C in ``SessionChannel.hold`` as ``Slots.pass_on`` returned (the
    spare's slot counted to the thread that took it) before the session recorded its new
    holder: the thread stayed counted for a slot its session said was no thread's."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link = make_spare(ex)
        _interrupted(_as_the_call_returns(
            SessionChannel.hold.__code__, _line(SessionChannel.hold, "self._slots.pass_on("),
            lambda: ex.run_command("true", timeout=30)))
        wait_for(lambda: not link.sessions, "the server's CLOSE of the spare", timeout=10)
        _all_back(ex, 2, "after a Ctrl-C as the spare's slot passed to the thread")
        # Released twice (by the thread's boundary, then at the CLOSE), the slot's
        # release raised in the transport thread, which ended the connection.
        assert link.alive() and ex._connection.link is link, "the connection was lost"
        assert ex.run_command("echo ok", timeout=10).stdout == "ok\n"


@pytest.mark.parametrize("what", ["a bounded_connection block", "a command"])
@pytest.mark.hang_timeout(300)
def test_a_ctrl_c_as_any_call_of_the_slots_returns_gives_the_slot_back(
        make_sshd: Any, what: str) -> None:
    """MaxSessions 1: a Ctrl-C as each call made in the slots' own code returns, one after
    the other, as ``what`` takes its slot and gives it back. ``Slots.acquire`` took the
    slot and then counted it to its thread after ``self._holders.get`` (a call into C):
    a Ctrl-C between left the slot taken and counted to no one, for good; ``release``
    counted it off first: one landing next left it counted off and never freed."""
    server = make_sshd(max_sessions=1)
    codes = {function.__code__ for owner in (Slots, Claim) for function in vars(owner).values()
             if inspect.isfunction(function)}
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0

        def block() -> None:
            with ex.bounded_connection:
                pass

        work = block if what == "a bounded_connection block" else (
            lambda: ex.run_command("true", timeout=30))
        _all_back(ex, 1, "before the sweep")
        for count in range(1, 200):
            try:
                _as_a_call_returns(codes, count, work)()
            except KeyboardInterrupt:
                _all_back(ex, 1, f"after a Ctrl-C as call {count} of the slots returned")
                continue
            assert count > 3, f"only {count - 1} calls of the slots' code returned"
            break
        else:
            raise AssertionError("the sweep did not end: a call returns at every run")
        assert ex.run_command("echo ok", timeout=10).stdout == "ok\n"


@pytest.mark.parametrize("refused", ["a command's open", "the spare's open"])
@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_a_refused_opens_slot_is_freed_gives_it_back(
        make_sshd: Any, refused: str) -> None:
    """The server (MaxSessions 1, the executor told 2) refuses an open while another
    session holds its one: a Ctrl-C in ``SessionChannel._release``, in the thread that
    learnt of the refusal (the opener, or the command taking the refused spare), as its
    ``with`` let go of the lock (the slot's record cleared, its release still to come),
    lost the slot for good."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters(max_sessions=2)) as ex:
        interrupted = at_line(SessionChannel._release.__code__,
                              _line(SessionChannel._release, "if slots is not None"),
                              _interrupt, lambda: ex.run_command("true", timeout=30))
        if refused == "a command's open":
            with ex.bounded_connection as transport:
                chan = transport.open_session(timeout=10)
                try:
                    _interrupted(interrupted)
                finally:
                    chan.close()
        else:
            ex.run_command("sleep 0.5", timeout=30)  # its spare opens as it runs
            link = ex._connection.link
            assert link is not None and link.spare is not None
            spare = link.spare._pending
            assert spare is not None
            wait_for(spare.answered.is_set, "the spare's refusal", timeout=10)
            assert not spare.chan.active, "the spare was not refused"
            _interrupted(interrupted)
        _all_back(ex, 2, f"after a Ctrl-C as {refused}'s slot was freed")
        assert ex.run_command("echo ok", timeout=10).stdout == "ok\n"


@pytest.mark.hang_timeout(120)
def test_a_session_discarded_twice_keeps_its_slot_until_the_server_closes(
        make_test_server: Any) -> None:
    """A second discard of a session (an interrupted thread's boundary sweeps what a first
    discard closed) took the channel, closed by the first, for one whose open was refused,
    and freed its slot at once, while the server still held the session (its CLOSE not
    in yet): an open on that slot would be refused, or exceed MaxSessions."""
    server = make_test_server(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        spare_of = make_spare(ex).spare
        wait_for(lambda: _free(ex) == 2 and spare_of._pending is not None
                 and spare_of._pending.answered.is_set(),
                 "the command's slot back, the spare's open answered", timeout=10)
        spare = spare_of._pop()
        assert spare is not None
        free = _slots(ex).available
        server.freeze()  # the server's CLOSE in reply waits
        try:
            spare.discard()
            spare.discard()
            assert _slots(ex).available == free, "a slot freed before the server's CLOSE"
        finally:
            server.thaw()
        _all_back(ex, 2, "once the server closed the discarded session")


@pytest.mark.hang_timeout(120)
def test_a_close_held_past_a_stalled_key_exchange_does_not_keep_the_session(
        make_test_server: Any) -> None:
    """Our CLOSE, held by a key exchange the server stalls past paramiko's
    ``clear_to_send_timeout``, was given up in its background thread (paramiko's
    ``Channel.close`` marks the channel closed first, then raises), the connection kept:
    the CLOSE never went out, so the session stayed open on the server and its slot
    taken for the connection's life, after the exchange finished too. A stalled
    exchange ends the connection instead, as every other held send does
    (``send_when_clear``)."""
    server = make_test_server(max_sessions=1)  # no spare: the one session is the command's
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true", timeout=20)
        link = ex._connection.link
        assert link is not None
        link.transport.clear_to_send_timeout = 2.0  # paramiko's 30 s, shortened

        def stall() -> None:  # the channel is open, its exec still to send
            server.freeze()
            link.transport._send_kex_init()  # type: ignore[attr-defined]

        def closing() -> bool:
            return any(thread.name == "paramiko_executor rekey"
                       for thread in threading.enumerate())

        try:
            command = at_line(SessionChannel.run.__code__,
                              _line(SessionChannel.run, "if spec.options.on_output"), stall,
                              lambda: ex.run_command("echo never", timeout=1))
            with pytest.raises(CommandTimeout):
                command()
            wait_for(lambda: not closing(), "the held CLOSE to be given up", timeout=30)
        finally:
            server.thaw()
        # The session is closed on the server, with the connection or by our CLOSE.
        wait_for(lambda: server.open_channels == 0, "the server's session to close",
                 timeout=10, explain=lambda: f"executor: {ex.statistics()}")
        assert ex.run_command("echo after", timeout=30).stdout == "after\n"


@pytest.mark.hang_timeout(120)
def test_a_reply_to_the_servers_close_held_past_a_stalled_key_exchange_frees_the_slot(
        make_test_server: Any) -> None:
    """The server's CLOSE arriving as a key exchange starts, which the server then stalls
    past ``clear_to_send_timeout``: paramiko's reply (our CLOSE) raised in its background
    thread, which left before the slot's release, so the slot stayed taken (and the
    session open on the server, which never had our CLOSE) for the connection's life."""
    server = make_test_server(max_sessions=1)  # no spare: the one session is the command's
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true", timeout=20)
        _all_back(ex, 1, "after the first command")  # its CLOSE is in: the next is ours
        link = ex._connection.link
        assert link is not None
        transport = link.transport
        transport.clear_to_send_timeout = 2.0  # paramiko's 30 s, shortened
        stalled: List[bool] = []

        def stall_first(on_close: Any) -> Any:
            def handle(chan: Any, m: Any) -> None:
                if not stalled:
                    stalled.append(True)
                    server.freeze()
                    transport._send_kex_init()  # type: ignore[attr-defined]
                on_close(chan, m)
            return handle

        wrap_handlers(transport, {MSG_CHANNEL_CLOSE: stall_first}, {})

        def replying() -> bool:
            return any(thread.name == "paramiko_executor rekey"
                       for thread in threading.enumerate())

        try:
            # The command's own CLOSE waits for the server's: that one needs a reply.
            command = at_line(SessionChannel._close_quietly.__code__,
                              _line(SessionChannel._close_quietly, "self.hold(None)"),
                              lambda: wait_for(lambda: bool(stalled), "the server's CLOSE"),
                              lambda: ex.run_command("sleep 0.5; echo done", timeout=30))
            assert command().stdout == "done\n"
            wait_for(lambda: not replying(), "the held reply to be given up", timeout=30)
        finally:
            server.thaw()
        wait_for(lambda: server.open_channels == 0, "the server's session to close",
                 timeout=10, explain=lambda: f"executor: {ex.statistics()}")
        link = ex._connection.link
        if link is not None and link.slots is not None and not link.slots.closed:
            _all_back(ex, 1, "after the stalled reply")
        assert ex.run_command("echo after", timeout=30).stdout == "after\n"


def _then_a_command(ex: SSHExecutor, interrupted: Callable[[], Any]) -> Dict[str, Any]:
    """Run ``interrupted`` (a command a Ctrl-C may end), then a command, each in a thread
    of its own: neither hangs, and the second runs. The first's `call_in_thread` outcome."""
    outcome = call_in_thread(interrupted)
    outcome["thread"].join(20)
    assert not outcome["thread"].is_alive(), "the interrupted command hung"
    following = call_in_thread(lambda: ex.run_command("echo ok", timeout=5))
    following["thread"].join(20)
    assert not following["thread"].is_alive(), "the next command hung (a lock kept taken)"
    assert "error" not in following, repr(following.get("error"))
    assert following["result"].stdout == "ok\n"
    return outcome


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_the_slots_lock_is_taken_leaves_the_connection_usable(
        make_sshd: Any) -> None:
    """A Ctrl-C as the slots' lock was got inside ``threading.Condition.__enter__`` (a
    Python function: CPython checks for signals as the lock's acquire returns), before the
    ``with`` held it: the lock stayed taken for good, and the next slot operation of any
    thread (the next command; the transport thread's release at a CLOSE) waited forever.
    The slots guard their state with a plain lock now, whose ``with`` is taken in C: with
    no such point left, the command runs."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        slots = _slots(ex)
        lock = slots._cond._lock  # type: ignore[attr-defined]  # the semaphore's, used before
        try:
            _then_a_command(ex, _as_the_call_returns(
                threading.Condition.__enter__.__code__,
                _line(threading.Condition.__enter__, "return self._lock.__enter__()"),
                lambda: ex.run_command("true", timeout=30),
                caller=Slots.acquire.__code__.co_filename))
        finally:
            if lock.locked():  # kept by the interrupt: let the stuck threads go
                lock.release()


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_a_send_takes_the_send_lock_leaves_the_connection_usable(
        make_sshd: Any) -> None:
    """A Ctrl-C as ``send_if_clear``'s ``clear_to_send_lock.acquire`` returned (a call into
    C: CPython checks for signals there), before ``held =`` stored True: the lock stayed
    taken for good: the next command of any thread timed out (a send with a deadline
    gives up), and one without a timeout would wait forever, on a connection that looked
    alive."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        link = ex._connection.link
        assert link is not None
        lock = link.transport.clear_to_send_lock
        try:
            interrupted = _then_a_command(ex, _as_the_call_returns(
                send_if_clear.__code__,
                _line(send_if_clear, "_take(transport.clear_to_send_lock,"),
                lambda: ex.run_command("true", timeout=30)))
            assert isinstance(interrupted.get("error"), KeyboardInterrupt), interrupted
        finally:
            if lock.locked():  # kept by the interrupt: let the stuck threads go
                lock.release()
