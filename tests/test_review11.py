"""review11: defects found reviewing 0b145da..main (real sshd).

Each test fails on main at the time of the review; see the report of branch review11.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import os
import signal
import socket
import threading
from typing import Any, Callable, List

import pytest
from helpers import at_line, call_in_thread, make_spare, thread_stacks, wait_for
from test_attack10f import _body_lines, _interrupt, _line

from paramiko_executor import CommandTimeout, ExecutorFailure, SSHExecutor, internals, tunnels
from paramiko_executor.channel import SessionChannel
from paramiko_executor.warm import Spare


def _thaw(pids: List[int]) -> None:
    """SIGCONT to ``pids`` (once: they may be gone since)."""
    while pids:
        try:
            os.kill(pids.pop(), signal.SIGCONT)
        except ProcessLookupError:
            pass


def _where(function: Callable[..., Any], line: int) -> str:
    return f"after a Ctrl-C at {linecache.getline(function.__code__.co_filename, line)!r}"


@pytest.mark.hang_timeout(300)
@pytest.mark.parametrize("function", [
    pytest.param(SSHExecutor._run_once, id="_run_once"),
    pytest.param(SessionChannel.run, id="SessionChannel.run"),
])
def test_a_command_interrupted_between_its_open_and_its_run_gives_the_session_back(
        make_sshd: Any, function: Any) -> None:
    """MaxSessions 1: an open session handed to the command (``_open_session``
    returned) is closed by nobody if a Ctrl-C lands before ``run``'s ``try``
    (``log.debug``, ``session.hold(None)``, ``run``'s LiveStream / window setup):
    the server keeps the session, the slot stays taken (and the thread's, before
    ``hold(None)``), and every later command of the thread fails or times out."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        for line in _body_lines(function):
            where = _interrupted_at(function, line, lambda: ex.run_command(
                "cat", b"x" * 10, timeout=30, on_output=lambda *a: None))
            try:
                result = ex.run_command("echo ok", timeout=5, check=False)
            except (ExecutorFailure, CommandTimeout) as exc:
                raise AssertionError(f"{where}: {exc}") from None
            assert result.stdout == "ok\n", f"{where}: {result!r}"


def _interrupted_at(function: Callable[..., Any], line: int, call: Callable[[], Any]) -> str:
    """``call()``, interrupted (Ctrl-C) at ``line`` of ``function``; where, for a message."""
    with contextlib.suppress(KeyboardInterrupt):
        at_line(function.__code__, line, _interrupt, call)()
    return _where(function, line)


@pytest.mark.hang_timeout(300)
def test_a_command_interrupted_taking_the_spare_gives_the_spare_session_back(
        make_sshd: Any) -> None:
    """MaxSessions 2: a Ctrl-C in `Spare.take` after it popped the spare (before or
    during its ``wait_open``) leaves that open session nobody's: never closed, its slot
    taken for the connection's life. Seen as a command from a ``bounded_connection``
    block (one slot the thread's) that can no longer get the second slot."""
    server = make_sshd(max_sessions=2)
    function = Spare.take
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        link: Any = ex._connection.link
        for line in _body_lines(function):
            make_spare(ex)
            where = _interrupted_at(function, line, lambda: ex.run_command("true", timeout=30))
            try:
                with ex.bounded_connection:
                    result = ex.run_command("echo ok", timeout=5, check=False)
            except CommandTimeout as exc:
                raise AssertionError(f"{where}: {exc}") from None
            assert result.stdout == "ok\n", f"{where}: {result!r}"
            assert ex._connection.link is link


@pytest.mark.hang_timeout(120)
def test_a_command_with_a_deadline_behind_a_send_to_a_server_that_stopped_reading_ends_at_it(
        make_sshd: Any) -> None:
    """Frozen server (SIGSTOP), no keepalive: sends on the connection fill the TCP
    buffers, and one blocks in paramiko's socket write holding ``clear_to_send_lock``
    (here a `bounded_connection` user's ``sendall``; a command's stdin does the
    same through `send_if_clear`). A command with ``timeout=3`` then waits for that
    lock without a bound: its OPEN goes through `send_within`, whose default attempt
    is `send_if_clear` with ``within=None`` (so is every `SessionChannel._send`'s),
    whatever the deadline. A frozen server must cost it its timeout
    (`test_without_keepalive_a_frozen_server_is_not_declared_dead`), not its thread
    until the server resumes."""
    server = make_sshd(max_sessions=10)
    blockers = 6  # x 2 MiB of channel window: more than the socket buffers take
    frozen: List[int] = []
    opened = threading.Barrier(blockers + 1, timeout=30)
    go = threading.Event()
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true", timeout=30)

            def block() -> None:
                with ex.bounded_connection as transport:
                    chan = transport.open_session(timeout=30)
                    try:
                        chan.exec_command("sleep 60")
                        opened.wait()
                        go.wait(30)
                        chan.sendall(b"x" * (2 << 20))
                    finally:
                        chan.close()

            senders = [call_in_thread(block) for _ in range(blockers)]
            opened.wait()
            frozen = server.serving_pids()
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            go.set()
            transport: Any = ex._connection.link.transport  # type: ignore[union-attr]
            write_lock = transport.packetizer._Packetizer__write_lock

            def write_blocked() -> bool:
                if write_lock.acquire(timeout=1.0):  # free within 1 s: nothing blocked yet
                    write_lock.release()
                    return False
                return True
            wait_for(write_blocked, "a send blocked on the full socket", 20)
            command = call_in_thread(lambda: ex.run_command("true", timeout=3))
            command["thread"].join(15)
            assert not command["thread"].is_alive(), (
                "a command with timeout=3 still waited 15 s on:\n"
                + thread_stacks([command["thread"]]))
            assert isinstance(command.get("error"), CommandTimeout), command
    finally:
        go.set()
        _thaw(frozen)
    for sender in senders:
        sender["thread"].join(30)


def _line_after(function: Callable[..., Any], text: str) -> int:
    """The line right after ``function``'s line starting with ``text``."""
    lines, first = inspect.getsourcelines(function)
    (index,) = [i for i, line in enumerate(lines) if line.strip().startswith(text)]
    return first + index + 1


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_send_if_clear_takes_the_send_lock_leaves_it_free(sshd: Any) -> None:
    """`send_if_clear` takes ``clear_to_send_lock`` before its ``try``: CPython runs a
    pending signal's handler as a call returns (the end of ``acquire()``), so a
    Ctrl-C there leaves the lock taken for good, and every later send of the
    connection (paramiko's own, the keepalive's, every command's) waits for it
    forever; the interrupted command's own CLOSE (``run``'s ``finally``) waits for it
    in the interrupted thread, so the Ctrl-C hangs the program. The trace raises at
    the line after the acquire, the same moment (`_body_lines` only raises before
    lines with a call, so it never lands here)."""
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true", timeout=30)
        transport: Any = ex._connection.link.transport  # type: ignore[union-attr]
        function = internals.send_if_clear
        line = _line_after(function, "_take(transport.clear_to_send_lock,")
        interrupted = call_in_thread(at_line(function.__code__, line, _interrupt,
                                             lambda: ex.run_command("true", timeout=30)))
        interrupted["thread"].join(15)
        after = call_in_thread(lambda: ex.run_command("echo ok", timeout=5))
        after["thread"].join(15)
        try:
            # The interrupted call's own clean-up (the CLOSE of its channel) may wait
            # for the lock its thread holds: a Ctrl-C that hangs the program.
            assert not interrupted["thread"].is_alive(), \
                "the interrupted command's thread still waited 15 s on"
            assert isinstance(interrupted.get("error"), KeyboardInterrupt), interrupted
            assert not after["thread"].is_alive(), \
                "the next command (timeout=5) waited 15 s on for the send lock"
        finally:
            stuck = interrupted["thread"].is_alive() or after["thread"].is_alive()
            if stuck and transport.clear_to_send_lock.locked():
                transport.clear_to_send_lock.release()  # let them end
            interrupted["thread"].join(15)
            after["thread"].join(15)
        assert after["result"].stdout == "ok\n"


@pytest.mark.hang_timeout(90)
def test_an_executor_close_interrupted_before_a_tunnel_stopped_listening_is_finished_by_the_next(
        sshd: Any, make_backend: Any) -> None:
    """`Tunnel._stop` forgets the tunnel (``Forwarding.forget``, in its ``finally``) even
    when interrupted before it stopped listening: a later ``tunnel.close()`` finishes
    the job (test_attack10f), but a later ``executor.close()`` -- what a ``with``
    block or a Ctrl-C handler calls -- no longer knows the tunnel: its listening
    thread and port live on for good."""
    echo = make_backend("echo")
    function = tunnels.LocalTunnel._stop_listening
    ex = SSHExecutor(**sshd.executor_parameters())
    tunnel = ex.forward_local(echo.port, "127.0.0.1")
    try:
        # Carried once: the listening thread is in its loop (a close before it got
        # there would end it without the wake-up).
        with socket.create_connection(tunnel.local_address, timeout=30) as client:
            client.sendall(b"x")
            assert client.recv(1) == b"x"
        line = _line(function, "self._wake_writer.send(")
        closing = at_line(function.__code__, line, _interrupt, ex.close)
        with pytest.raises(KeyboardInterrupt):
            closing()
        ex.close()
        tunnel._accepting.join(10)
        assert not tunnel._accepting.is_alive(), "the tunnel still listens after ex.close()"
    finally:
        tunnel.close()


@pytest.mark.hang_timeout(120)
def test_a_close_held_back_by_a_stalled_key_exchange_does_not_spin(make_sshd: Any) -> None:
    """`SessionChannel._close_quietly` during a key exchange runs itself again in a new
    thread (`in_background`), which finds the exchange still running and starts the
    next thread at once: a thread-spawning spin for as long as the exchange lasts
    (a server that stalls it: up to ``clear_to_send_timeout``, or for good while it
    sends IGNOREs). Here a command whose exec a stalled rekey held past its deadline
    (`Overdue`, the path meant to leave "the CLOSE below [waiting] in the
    background"). Counted: calls of ``_close_quietly``; one waiting thread makes two."""
    server = make_sshd(max_sessions=10)
    calls: List[int] = []
    code = SessionChannel._close_quietly.__code__

    def count(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is code:
            calls.append(1)

    frozen: List[int] = []
    rekey: Any = None
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            link = make_spare(ex)  # open before the freeze
            transport = link.transport
            frozen = server.serving_pids()
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            rekey = call_in_thread(transport.renegotiate_keys)
            wait_for(lambda: not transport.clear_to_send.is_set(), "our KEXINIT sent")
            threading.setprofile(count)
            try:
                with pytest.raises(CommandTimeout):
                    ex.run_command("true", timeout=1)
                spinning = True
                try:
                    wait_for(lambda: len(calls) > 50, "_close_quietly to spin", timeout=5)
                except AssertionError:
                    spinning = False
            finally:
                threading.setprofile(None)  # type: ignore[arg-type]
            assert transport.is_active()  # still the stalled exchange, not a closed connection
            assert not spinning, f"_close_quietly ran {len(calls)} times during one key exchange"
            _thaw(frozen)
            rekey["thread"].join(30)
            # The CLOSE held back went out once the exchange ended: the session is back.
            wait_for(lambda: ex.statistics().open_channels == 0, "the session's slot back")
            assert ex.run_command("echo ok", timeout=30).stdout == "ok\n"
    finally:
        _thaw(frozen)
        if rekey is not None:
            rekey["thread"].join(30)
