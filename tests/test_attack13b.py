"""attack13b: defects found attacking `paramiko_executor.blocks` (fix13b) against a real sshd.

Each test fails on main at the time of the attack; see the report of branch attack13b.
"""

from __future__ import annotations

import inspect
import linecache
import os
import signal
import threading
from typing import Any, Callable, Dict, List

import paramiko
import pytest
from helpers import at_line, call_in_thread, wait_for
from test_blocks import _all_back, _connected, _exec, _settled, _taken
from test_review11 import _thaw

from paramiko_executor import ExecutorFailure, SSHExecutor
from paramiko_executor.blocks import Reservation
from paramiko_executor.connection import Link
from paramiko_executor.slots import Slots
from paramiko_executor.warm import Spare


def _sent(transport: paramiko.Transport, before: int) -> Callable[[], bool]:
    """Whether paramiko registered a channel beyond the ``before`` it knew (its OPEN is out)."""
    return lambda: len(transport._channels.values()) > before  # type: ignore[attr-defined]


@pytest.mark.hang_timeout(120)
def test_an_open_that_timed_out_in_a_block_is_covered_until_the_server_closed_it(
        make_sshd: Callable[..., Any]) -> None:
    """MaxSessions 1: the block's ``open_session(timeout=...)`` gives up on a server that
    answers late (stopped). paramiko raises with the OPEN out; the server confirms it
    later, a session no slot covered: the slot came back as the block ended, and every
    open after it is refused for the connection's life (paramiko forgot the channel, so
    nothing ever closes it). It must stay covered, and be closed once confirmed."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        pids = list(server.serving_pids())
        try:
            with pytest.raises(paramiko.SSHException, match="Timeout"):
                with ex.bounded_connection as transport:
                    _settled(transport)
                    os.kill(pids[0], signal.SIGSTOP)
                    transport.open_session(timeout=1)
        finally:
            _thaw(pids)
        _no_session_uncovered(ex, link, slots, spare)


@pytest.mark.hang_timeout(120)
def test_an_open_refused_after_the_block_ended_gives_the_slot_back(
        make_sshd: Callable[..., Any]) -> None:
    """A worker's open is on its way as the block ends (the slot stays with the block for
    its answer); the server refuses it. The count is taken back, but nothing settles the
    block: its slot was kept for good."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        pids = list(server.serving_pids())
        try:
            with ex.bounded_connection as transport:
                _settled(transport)
                # The server's one session, past the block's count: the worker's open is refused.
                full = link.blocks._open("session", timeout=30)
                before = len(transport._channels.values())  # type: ignore[attr-defined]
                os.kill(pids[0], signal.SIGSTOP)
                worker = call_in_thread(lambda: transport.open_session(timeout=30))
                wait_for(_sent(transport, before), "the open to be sent")
        finally:
            _thaw(pids)
        worker["thread"].join(30)
        assert isinstance(worker.get("error"), paramiko.ChannelException), worker
        full.close()
        wait_for(lambda: full.closed and link.transport._channels.get(full.chanid) is None,  # type: ignore[attr-defined]
                 "the server's close")
        _all_back(ex, link, slots, spare)


def _no_session_uncovered(ex: SSHExecutor, link: Link, slots: Slots, spare: Spare) -> None:
    """Once the server's late answers came (a round trip), a command on MaxSessions 1 is
    not refused: the server holds no session that no slot covers; then `_all_back`."""
    _settled(link.transport)
    refused = ex.statistics().refused_opens
    assert ex.run_command("echo after", timeout=15).stdout == "after\n"
    assert ex.statistics().refused_opens == refused, "the server held a session no slot covered"
    _all_back(ex, link, slots, spare)


def _block_in_thread(ex: SSHExecutor, end: threading.Event) -> Dict[str, Any]:
    """A block of ``ex`` running in a thread of its own (`call_in_thread`'s outcome) once
    it began, until ``end`` is set."""
    began = threading.Event()

    def block() -> None:
        with ex.bounded_connection:
            began.set()
            assert end.wait(30)

    outcome = call_in_thread(block)
    assert began.wait(30), outcome
    return outcome


def _back_soon(ex: SSHExecutor, link: Link, slots: Slots, spare: Spare) -> None:
    """`_all_back`, failing within seconds when a slot is kept (a loop's many tries)."""
    wait_for(lambda: _taken(slots, spare) == 0 and not slots._holders, "every slot back",
             timeout=5)
    _all_back(ex, link, slots, spare)


def _line_of(function: Callable[..., Any], text: str) -> int:
    """The line of ``function``'s source holding ``text`` (the first)."""
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_in_the_callers_open_after_its_open_was_sent_leaves_no_session_uncovered(
        make_sshd: Callable[..., Any]) -> None:
    """MaxSessions 1: a Ctrl-C in paramiko's ``open_channel`` as it waits for the answer
    (the OPEN is out). The count was taken back and the slot came back as the block
    ended; the server's confirmation made a session no slot covers and no one closes."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        open_channel = paramiko.Transport.open_channel
        wait = _line_of(open_channel, "event.wait(")

        def interrupt() -> None:
            raise KeyboardInterrupt

        def block() -> None:
            with ex.bounded_connection as transport:
                _settled(transport)
                transport.open_session(timeout=30)

        with pytest.raises(KeyboardInterrupt):
            at_line(open_channel.__code__, wait, interrupt, block)()
        _no_session_uncovered(ex, link, slots, spare)


@pytest.mark.hang_timeout(120)
def test_an_open_from_outside_every_block_is_covered_while_several_blocks_run(
        make_sshd: Callable[..., Any]) -> None:
    """MaxSessions 2, both slots held by blocks A (begun first) and B: a thread in no
    block opens a session through the transport (a worker A started, say), and B opens
    its own. The outsider's open counts to B, the block that began last, so A's slot
    comes back as A ends while both sessions stay on the server: the command that takes
    it is refused, a quiet refusal that lowers the cap given (2) to 1 for the
    connection's life. Every block that could own the open must keep its slot for it.

    The outsider's command runs until the test ends it (its stdin's end): the command
    waits in line for as long (it ran at once, refused, before). Once the server closed
    the outsider's session, the command's open may still be refused, read by the server
    with our CLOSE in reply (a slot freed by a CLOSE, `slots`): it is tried again, and
    that refusal is no quiet one (the cap stays 2)."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters(max_sessions=2)) as ex:
        link, slots, spare = _connected(ex)
        a_end = threading.Event()
        a = _block_in_thread(ex, a_end)
        chans: List[paramiko.Channel] = []
        with ex.bounded_connection as transport:
            _settled(transport)
            chans.append(_exec(transport, "sleep 3"))
            outsider = call_in_thread(lambda: _exec(transport, "read line"))
            outsider["thread"].join(30)
            assert "error" not in outsider, outsider
            a_end.set()
            a["thread"].join(30)
            assert "error" not in a, a
            _settled(transport)
            refused = ex.statistics().refused_opens
            command = call_in_thread(lambda: ex.run_command("echo after", timeout=30))
            wait_for(lambda: slots.waiting == 1 or not command["thread"].is_alive(),
                     "the command in line for a slot")
            _settled(transport)  # an open sent on a slot it got meanwhile is answered
            assert slots.waiting == 1 and ex.statistics().refused_opens == refused, (
                f"a session no slot covered: {command}")
            outsider["result"].shutdown_write()  # its read ends, and the session with it
            command["thread"].join(30)
            assert command.get("result") is not None, command
            chans[0].close()
        outsider["result"].close()
        assert slots.limit == 2
        _all_back(ex, link, slots, spare)


@pytest.mark.hang_timeout(300)
def test_a_ctrl_c_at_any_line_of_a_blocks_open_leaves_every_slot_and_session_settled(
        make_sshd: Callable[..., Any]) -> None:
    """MaxSessions 1: a Ctrl-C at each line of the open counted to a block (paramiko's
    open returning a channel the caller closes). At the line storing ``counted`` after
    the count, or at the first lines of the ``finally`` taking it back, the count
    stayed: the slot was kept for good, and the next command timed out."""
    server = make_sshd(max_sessions=1)
    functions = [getattr(Reservation, name) for name in ("open_channel", "_finish")
                 if hasattr(Reservation, name)]
    bad: List[str] = []
    for function in functions:
        code = function.__code__
        lines = sorted({line for _, _, line in code.co_lines()
                        if line is not None and line > code.co_firstlineno})
        for line in lines:
            with SSHExecutor(**server.executor_parameters()) as ex:
                link, slots, spare = _connected(ex)

                def interrupt() -> None:
                    raise KeyboardInterrupt

                def block() -> None:
                    with ex.bounded_connection as transport:
                        _settled(transport)
                        chan = _exec(transport, "sleep 0.2")
                        chan.close()

                try:
                    at_line(code, line, interrupt, block)()
                except KeyboardInterrupt:
                    pass
                try:
                    _back_soon(ex, link, slots, spare)
                except (AssertionError, ExecutorFailure) as exc:
                    text = linecache.getline(code.co_filename, line).strip()
                    bad.append(f"{function.__name__} line {line}: {text!r}: {exc!r:.60}")
    assert not bad, bad


@pytest.mark.hang_timeout(120)
def test_an_outsiders_session_is_closed_by_the_last_block_running_as_it_opened(
        make_sshd: Callable[..., Any]) -> None:
    """Blocks A and B run; a thread in no block (A's worker, say) opens a session and
    uses it. B ends first: it closed the worker's channel under it (counted to B, the
    block that began last), though A, which may own it, still ran."""
    server = make_sshd(max_sessions=3)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        b_end = threading.Event()
        with ex.bounded_connection as transport:
            _settled(transport)
            b = _block_in_thread(ex, b_end)
            outsider = call_in_thread(lambda: _exec(transport, "cat"))
            outsider["thread"].join(30)
            assert "error" not in outsider, outsider
            chan = outsider["result"]
            b_end.set()
            b["thread"].join(30)
            assert "error" not in b, b
            assert not chan.closed, "block B closed a session that was not (only) its"
            chan.sendall(b"still\n")
            chan.shutdown_write()
            assert chan.makefile("rb").read() == b"still\n"
        assert chan.closed
        _all_back(ex, link, slots, spare)
