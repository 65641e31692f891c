"""attack13b: defects found attacking `paramiko_executor.blocks` (fix13b) against a real sshd.

Each test fails on main at the time of the attack; see the report of branch attack13b.
"""

from __future__ import annotations

import inspect
import os
import signal
from typing import Any, Callable

import paramiko
import pytest
from helpers import at_line, call_in_thread, wait_for
from test_blocks import _all_back, _connected, _settled
from test_review11 import _thaw

from paramiko_executor import SSHExecutor


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
        _settled(link.transport)  # the late confirmation has come
        refused = ex.statistics().refused_opens
        assert ex.run_command("echo after", timeout=15).stdout == "after\n"
        assert ex.statistics().refused_opens == refused, "the server held a session no slot covered"
        _all_back(ex, link, slots, spare)


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
        _settled(link.transport)  # the confirmation has come
        refused = ex.statistics().refused_opens
        assert ex.run_command("echo after", timeout=15).stdout == "after\n"
        assert ex.statistics().refused_opens == refused, "the server held a session no slot covered"
        _all_back(ex, link, slots, spare)
