"""attack11b: close_soon, send_if_clear and the deadline-bound sends of main (real sshd).

Each test failed on main at the time of the attack (b0859c1); see the report of
branch attack11b.
"""

from __future__ import annotations

import io
import linecache
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import pytest
from helpers import at_line, call_in_thread, make_spare, outcome_within, thread_stacks, wait_for
from test_attack10f import _body_lines, _interrupt
from test_review11 import _thaw

from paramiko_executor import CommandTimeout, SSHExecutor, TransferTimeout, channel, internals
from paramiko_executor.channel import SessionChannel
from paramiko_executor.transfer import CLEANUP_GRACE

#: Prints "y" every 0.1 s for good: killed (SIGPIPE) once sshd closes its output, on our
#: CLOSE; the session (and its MaxSessions slot) ends with it, and only then.
FOREVER = "while :; do echo y; sleep 0.1; done"


def _interrupted_at(monkeypatch: Any, module: Any, name: str, line: int) -> List[int]:
    """Make ``module.name`` raise KeyboardInterrupt (a Ctrl-C) at its ``line``, traced
    afresh on each call (a trace that raised earlier in the thread is switched off);
    the list returned gets an item when it does."""
    function = getattr(module, name)
    hits: List[int] = []

    def act() -> None:
        hits.append(line)
        raise KeyboardInterrupt

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        return at_line(function.__code__, line, act, lambda: function(*args, **kwargs))()
    monkeypatch.setattr(module, name, interrupted)
    return hits


@pytest.mark.hang_timeout(300)
def test_a_second_ctrl_c_during_a_commands_close_soon_still_closes_its_session(
        make_sshd: Any, monkeypatch: Any) -> None:
    """A Ctrl-C while a command runs (in its wait) ends `SessionChannel.run` through its
    ``finally``: `close_soon` sends EOF and CLOSE. A second Ctrl-C anywhere in
    `close_soon` (the user pressing it again) loses them: before `close_messages`
    nobody closes the channel again, after it the channel is marked closed and its
    messages are dropped with the frame. sshd keeps the session while the command
    runs: MaxSessions 1, every later command waits for the slot, for good."""
    server = make_sshd(max_sessions=1)
    wait_code = SessionChannel._wait.__code__
    wait_line = _body_lines(SessionChannel._wait)[0]
    function = channel.close_soon
    assert function.__module__ == 'paramiko_executor.channel'
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        for line in _body_lines(function):
            where = (f"after a Ctrl-C at close_soon's "
                     f"{linecache.getline(function.__code__.co_filename, line).strip()!r}")
            with monkeypatch.context() as patch:
                hits = _interrupted_at(patch, channel, "close_soon", line)
                interrupted = at_line(wait_code, wait_line, _interrupt,
                                      lambda: ex.run_command(FOREVER, timeout=60))
                with pytest.raises(KeyboardInterrupt) as raised:
                    interrupted()
            if not hits:
                continue  # a line this close never reaches (the one for an interrupt, say)
            # The second Ctrl-C, in close_soon, is the one that came out.
            assert "close_soon" in [entry.name for entry in raised.traceback], raised.traceback
            try:
                result = ex.run_command("echo ok", timeout=10, check=False)
            except CommandTimeout:
                raise AssertionError(f"{where}: the command's session was never closed, "
                                     "its slot taken for good") from None
            assert result.stdout == "ok\n", f"{where}: {result!r}"


@pytest.mark.hang_timeout(180)
def test_a_put_with_a_timeout_to_a_server_that_froze_mid_upload_ends_near_it(
        make_sshd: Any, shared_dir: str) -> None:
    """``timeout`` covers the whole transfer. A put whose server froze (SIGSTOP) mid-upload
    times out, its own clean-up gives up after `CLEANUP_GRACE`, and then
    `SSHExecutor._remove_leftover` tries again in the caller's thread (only a key
    exchange running sends it to the background): a new session per temporary name
    (the file and the umask probe), each waiting `LEFTOVER_TIMEOUT` for an answer
    that never comes. ``put(timeout=3)`` raised after about 29 s."""
    server = make_sshd(max_sessions=4)
    remote = os.path.join(shared_dir, "remote")
    frozen: List[int] = []

    def freeze(done: int, total: int) -> None:
        if not frozen and done > 0:
            frozen.extend(server.serving_pids())
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)

    timeout = 3.0
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true", timeout=30)
            begun = time.monotonic()
            outcome = outcome_within(60, lambda: ex.put(io.BytesIO(bytes(256 << 20)), remote,
                                                        timeout=timeout, progress=freeze))
            took = time.monotonic() - begun
            assert frozen, "the put ended before its first progress call"
            _thaw(frozen)
            assert isinstance(outcome.get("error"), TransferTimeout), outcome
            assert took < timeout + CLEANUP_GRACE + 3, f"put(timeout=3) raised after {took:.1f} s"
    finally:
        _thaw(frozen)


def _waiting_for_a_lock(thread_id: int) -> bool:
    """Whether thread ``thread_id`` is at an acquire in `send_if_clear` (or a function it calls)."""
    frame = sys._current_frames().get(thread_id)
    return (frame is not None and frame.f_code.co_filename == internals.__file__
            and "acquire" in linecache.getline(frame.f_code.co_filename, frame.f_lineno)
            and (frame.f_code is internals.send_if_clear.__code__
                 or frame.f_back is not None
                 and frame.f_back.f_code is internals.send_if_clear.__code__))


def _free(lock: Any) -> bool:
    """Whether another thread can take ``lock`` within 3 s (given back at once)."""
    taken = lock.acquire(timeout=3)
    if taken:
        lock.release()
    return bool(taken)


@pytest.mark.hang_timeout(120)
@pytest.mark.usefixtures("python_sigint")
@pytest.mark.parametrize("lock_of", [
    pytest.param(lambda transport: transport.clear_to_send_lock, id="clear_to_send_lock"),
    pytest.param(lambda transport: transport.packetizer._Packetizer__write_lock,
                 id="packet write lock"),
])
def test_a_ctrl_c_as_send_if_clear_gets_a_lock_another_thread_held_leaves_it_free(
        sshd: Any, lock_of: Callable[[Any], Any]) -> None:
    """`send_if_clear` records a lock it took in a variable (``held = lock.acquire(...)``),
    in its ``try``. CPython runs a pending signal's handler as a call made from Python
    returns, before its value is stored: a Ctrl-C that came while the main thread waited
    for a lock another thread held (the kernel gave the signal to that thread, so the
    wait went on) raises as the lock is got, ``held`` still False, and the lock stays
    taken for good: every later send of the connection waits for it (for the packet
    write lock, every other thread's). Here the command's OPEN (``timeout=30``: the
    path with ``within``) waits for the lock, held by a helper thread, which takes the
    SIGINT itself and lets the lock go."""
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true", timeout=30)
        transport: Any = ex._connection.link.transport  # type: ignore[union-attr]
        lock = lock_of(transport)
        main = threading.get_ident()
        assert threading.current_thread() is threading.main_thread()

        def hold() -> None:
            with lock:
                wait_for(lambda: _waiting_for_a_lock(main), "the command waiting for the lock", 30)
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)

        holder = call_in_thread(hold)
        try:
            with pytest.raises(KeyboardInterrupt):
                ex.run_command("true", timeout=30)
        finally:
            holder["thread"].join(30)
        assert "error" not in holder, holder
        free = outcome_within(10, lambda: _free(lock))
        if free.get("result") is not True:
            lock.release()  # taken by this (the main) thread: let the executor close
        assert free.get("result") is True, "the lock was left taken by the interrupted send"
        assert ex.run_command("echo ok", timeout=10).stdout == "ok\n"


@pytest.mark.hang_timeout(120)
def test_a_spare_given_up_during_a_stalled_key_exchange_does_not_hold_the_caller(
        make_sshd: Any) -> None:
    """`SessionChannel.discard` (through ``_close_answered``) still closed with paramiko's
    ``Channel.close``, which waits out a key exchange up to ``clear_to_send_timeout`` in
    the caller's thread. A command's thread discards the spare when it queues for a
    slot (`SSHExecutor._take_slot`'s ``queued=spare.discard``): during a stalled
    exchange a command with ``timeout=2`` was held that long; `close_soon` leaves
    the CLOSE to the background, as for a command's own channel."""
    server = make_sshd(max_sessions=4)
    frozen: List[int] = []
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            link = make_spare(ex)
            wait_for(lambda: ex.statistics().open_channels == 1, "only the spare open")
            transport: Any = link.transport
            transport.clear_to_send_timeout = 10.0  # paramiko's 30 s, shortened for the test
            frozen = server.serving_pids()
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            transport._send_kex_init()
            discarded = call_in_thread(link.spare.discard)
            discarded["thread"].join(5)
            held = discarded["thread"].is_alive()
            _thaw(frozen)
            discarded["thread"].join(30)
            assert not held, "discarding the spare waited for the stalled key exchange"
            assert transport.is_active()
            # The CLOSE went out once the exchange ended: the slot is back.
            wait_for(lambda: ex.statistics().open_channels == 0, "the spare's slot back")
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
    finally:
        _thaw(frozen)


def frozen_with_writes_blocked(ex: SSHExecutor, server: Any, monkeypatch: Any, count: int,
                               timeout: Optional[float], frozen: List[int]) -> List[Dict[str, Any]]:
    """Start ``count`` commands on ``ex`` (``cat``, 64 MiB of stdin each, ``timeout``), and
    freeze ``server`` (SIGSTOP; the pids appended to ``frozen``, for `_thaw`) once each has
    its exec answered with a window (sshd grants a session's window only then); then they
    send. Their windows (2 MiB each) hold more than the socket buffers take, so a
    command's own packet write blocks. Returns their `call_in_thread` outcomes."""
    ready = threading.Barrier(count + 1, timeout=30)
    send_stdin = SessionChannel._send_stdin

    def after_the_freeze(self: SessionChannel, *args: Any) -> int:
        if not getattr(self, "waited", False):
            self.waited = True  # type: ignore[attr-defined]
            wait_for(lambda: self.chan.out_window_size >= 1 << 20, "the window of the exec")
            ready.wait()  # the server freezes now
            ready.wait()
        return send_stdin(self, *args)

    monkeypatch.setattr(SessionChannel, "_send_stdin", after_the_freeze)
    commands = [call_in_thread(lambda: ex.run_command(
        "cat >/dev/null", stdin_input=bytes(64 << 20), timeout=timeout))
        for _ in range(count)]
    ready.wait()
    frozen.extend(server.serving_pids())
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    ready.wait()
    return commands


@pytest.mark.hang_timeout(180)
def test_every_command_with_stdin_ends_near_its_timeout_while_the_server_is_frozen(
        make_sshd: Any, monkeypatch: Any) -> None:
    """Nine commands (``cat``, 64 MiB of stdin each, ``timeout=6``) send on a frozen
    server (`frozen_with_writes_blocked`): one command's own packet write blocks in paramiko's
    ``write_all``, which retries on the socket's timeout for as long as the peer lives:
    `send_if_clear`'s ``within`` bounded only the waits for the locks, not the write
    under them, and that command ended when the server resumed, not at its timeout
    (the others end at theirs: the fix of 88dbb9a). The write now gives up
    `WRITE_GRACE` past the deadline (`DeadlineWrites`): every command is a
    `CommandTimeout`, and the executor runs commands again once the server resumes."""
    server = make_sshd(max_sessions=10)
    frozen: List[int] = []
    timeout = 6.0
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true", timeout=30)
            commands = frozen_with_writes_blocked(ex, server, monkeypatch, 9, timeout, frozen)
            end = time.monotonic() + timeout + 5
            for command in commands:
                command["thread"].join(max(0.0, end - time.monotonic()))
            stuck = [command for command in commands if command["thread"].is_alive()]
            stacks = thread_stacks([command["thread"] for command in stuck])
            _thaw(frozen)
            for command in commands:
                command["thread"].join(60)
            assert not stuck, f"{len(stuck)} command(s) with timeout=6 still ran:\n{stacks}"
            errors = [command.get("error") for command in commands]
            assert all(isinstance(error, CommandTimeout) for error in errors), errors
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
    finally:
        _thaw(frozen)
