"""A ``bounded_connection`` block's slot is free again once the server closed the sessions
opened in the block, not as the block ends (`paramiko_executor.blocks`).

sshd keeps a session whose command still runs after our CLOSE, until the command
ends: a slot given back at the block's end let the next open be refused.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable, List, Tuple

import paramiko
import pytest
from helpers import call_in_thread, interrupting, wait_for

from paramiko_executor import SSHExecutor, internals
from paramiko_executor import blocks as blocks_module
from paramiko_executor.blocks import Reservation
from paramiko_executor.connection import Link
from paramiko_executor.slots import Slots
from paramiko_executor.warm import Spare


def _connected(ex: SSHExecutor) -> Tuple[Link, Slots, Spare]:
    """``ex``'s connection once a command ran on it: its link, slots and spare."""
    assert ex.run_command("true", timeout=30).exit_code == 0
    link = ex._connection.link
    assert link is not None and link.slots is not None and link.spare is not None
    return link, link.slots, link.spare


def _taken(slots: Slots, spare: Spare) -> int:
    """How many slots something other than the spare holds."""
    return slots.limit - slots.available - spare.held


def _all_back(ex: SSHExecutor, link: Link, slots: Slots, spare: Spare) -> None:
    """Every slot came back once, no thread holds one, no block counts one, and the next
    command runs on the same connection (a second release raises in paramiko's thread,
    which ends the connection)."""
    wait_for(lambda: _taken(slots, spare) == 0 and not slots._holders, "every slot back",
             explain=lambda: f"{slots.available} free, holders {slots._holders}")
    assert link.blocks.reserved() == 0
    assert link.alive() and ex._connection.link is link, "the connection was lost"
    assert ex.run_command("echo ok", timeout=10).stdout == "ok\n"


def _settled(transport: paramiko.Transport) -> None:
    """A round trip: the sessions whose slots were given back before it are free on the
    server after it. OpenSSH frees a session on the pass of its loop after the one that
    read our CLOSE; an open read with that CLOSE is refused, which the executor's own
    opens try again and paramiko's do not (on loopback no open is held back for it)."""
    transport.global_request("keepalive@openssh.com", wait=True)


def _exec(transport: paramiko.Transport, command: str) -> paramiko.Channel:
    chan = transport.open_session(timeout=30)
    chan.exec_command(command)
    return chan


@pytest.mark.hang_timeout(120)
def test_the_slot_stays_taken_until_the_server_closes_the_blocks_session(
        make_sshd: Callable[..., Any]) -> None:
    """MaxSessions 1: the block closes a channel whose command still runs; the block's
    slot stays taken, no thread's, until the command ends, and a command queued
    meanwhile waits for it, never refused. Before, the slot came back as the block
    ended and the command's opens were refused until the sleep ended."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        with ex.bounded_connection as transport:
            _settled(transport)
            chan = _exec(transport, "sleep 3")
            chan.close()
        ended = time.monotonic()
        assert _taken(slots, spare) == 1 and slots.held_by(threading.get_ident()) == 0
        assert ex.statistics().open_channels == 1
        assert link.blocks.reserved() == 1
        refused = ex.statistics().refused_opens
        assert ex.run_command("echo after", timeout=30).stdout == "after\n"
        assert ex.statistics().refused_opens == refused
        assert time.monotonic() - ended > 1.5, "the command did not wait for the session"
        _all_back(ex, link, slots, spare)


@pytest.mark.parametrize("ending", ["returns", "raises"])
@pytest.mark.hang_timeout(120)
def test_a_channel_left_open_is_closed_as_the_block_ends(
        make_sshd: Callable[..., Any], ending: str) -> None:
    """A channel the caller did not close (the block returned, or raised before its
    close) is closed as the block ends; its slot comes back with the server's CLOSE."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        chans: List[paramiko.Channel] = []
        try:
            with ex.bounded_connection as transport:
                _settled(transport)
                chans.append(_exec(transport, "sleep 2"))
                if ending == "raises":
                    raise ValueError("the caller's error")
        except ValueError:
            assert ending == "raises"
        assert chans[0].closed
        assert _taken(slots, spare) == 1 and not slots._holders
        _all_back(ex, link, slots, spare)


@pytest.mark.hang_timeout(120)
def test_a_session_another_thread_opened_in_the_block_counts_to_it(
        make_sshd: Callable[..., Any]) -> None:
    """A worker thread the block started opens a session on the block's transport: the
    block's slot stays taken until the server closed that session too."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        with ex.bounded_connection as transport:
            _settled(transport)
            worker = call_in_thread(lambda: _exec(transport, "sleep 2"))
            worker["thread"].join(30)
            assert "error" not in worker, worker
            chan = worker["result"]
            chan.close()
        assert _taken(slots, spare) == 1 and not slots._holders
        _all_back(ex, link, slots, spare)


@pytest.mark.hang_timeout(120)
def test_a_command_of_another_thread_counts_to_no_block(
        make_sshd: Callable[..., Any], shared_dir: str) -> None:
    """A guard: a command another thread starts while a block runs is no session of the
    block's; the block's slot comes back as it ends, the command's as it ends."""
    server = make_sshd(max_sessions=3)
    marker = os.path.join(shared_dir, "running")
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        with ex.bounded_connection:
            command = call_in_thread(lambda: ex.run_command(
                f"touch {marker}; sleep 2", timeout=30))
            wait_for(lambda: os.path.exists(marker), "the command to run")
            assert _taken(slots, spare) == 2
        assert _taken(slots, spare) == 1  # the command's alone
        command["thread"].join(30)
        assert "error" not in command, command
        _all_back(ex, link, slots, spare)


@pytest.mark.hang_timeout(120)
def test_an_open_answered_after_the_block_ended_counts_to_it(
        make_sshd: Callable[..., Any]) -> None:
    """A worker's open is on its way (the server stopped) as the block ends: the slot
    stays taken, and the channel, answered after the block, is closed at once; the
    slot comes back with the server's CLOSE."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        (pid,) = server.serving_pids()
        with ex.bounded_connection as transport:
            _settled(transport)
            before = len(transport._channels.values())  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGSTOP)
            try:
                worker = call_in_thread(lambda: transport.open_session(timeout=30))
                wait_for(lambda: len(transport._channels.values()) > before,  # type: ignore[attr-defined]
                         "the open to be sent")
            except BaseException:
                os.kill(pid, signal.SIGCONT)
                raise
        try:
            assert _taken(slots, spare) == 1 and not slots._holders
        finally:
            os.kill(pid, signal.SIGCONT)
        worker["thread"].join(30)
        assert "error" not in worker, worker
        assert worker["result"].closed
        _all_back(ex, link, slots, spare)


@pytest.mark.parametrize("where", ["hold", "close_soon"])
@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_a_block_with_a_session_ends_leaves_its_slot_to_the_servers_close(
        make_sshd: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A Ctrl-C as the block's end hands its slot to the server's CLOSE (at the entry of
    `Cover.hold`), or closes the channel the caller left open: the block's boundary
    finishes the end; the slot comes back once, with the server's CLOSE."""
    server = make_sshd(max_sessions=2)
    owner: Any = Reservation if where == "hold" else blocks_module
    original = getattr(owner, where)
    fired: List[bool] = []
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        monkeypatch.setattr(owner, where, interrupting(original, fired, "__exit__"))
        chans: List[paramiko.Channel] = []
        with pytest.raises(KeyboardInterrupt):
            with ex.bounded_connection as transport:
                _settled(transport)
                chans.append(_exec(transport, "sleep 2"))
        monkeypatch.setattr(owner, where, original)
        assert fired
        assert chans[0].closed
        assert _taken(slots, spare) == 1
        _all_back(ex, link, slots, spare)


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_in_the_callers_open_leaves_no_count_behind(
        make_sshd: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C in paramiko's ``open_channel`` before it sent the OPEN: the open counted
    to the block is taken back, and the slot comes back as the block ends."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters()) as ex:
        link, slots, spare = _connected(ex)
        fired: List[bool] = []
        monkeypatch.setattr(link.blocks, "_open", interrupting(link.blocks._open, fired))
        with pytest.raises(KeyboardInterrupt):
            with ex.bounded_connection as transport:
                transport.open_session(timeout=30)
        assert fired
        assert _taken(slots, spare) == 0 and not slots._holders
        assert link.blocks.reserved() == 0
        monkeypatch.undo()
        _all_back(ex, link, slots, spare)


def test_the_canary_names_a_local_of_open_channel_that_paramiko_renamed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A block reads ``chan``, ``event`` and ``start_ts`` from the frame of an open paramiko
    gave up (`internals.given_up_open`): a paramiko whose ``open_channel`` renamed one
    would leave such a session to no slot, silently; the canary names the local."""
    def open_channel(self: Any, kind: str) -> None:
        chan = event = sent_at = None  # noqa: F841 (the locals are what is looked at)

    monkeypatch.setattr(internals, "_OPEN_CHANNEL_CODE", open_channel.__code__)
    assert internals.missing_private_names() == ["Transport.open_channel.start_ts"]
