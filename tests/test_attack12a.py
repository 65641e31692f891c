"""attack12a: real Ctrl-Cs (SIGINT) as a send takes one of the connection's send locks.

A SIGINT's C handler may run in any thread; the main thread then runs the Python
handler at its next check, which comes as a call into C returns: a lock's
``acquire`` that waited for another thread's send included. Here a helper
thread holds the lock until the main thread waits on it, takes the SIGINT
itself (so the main thread's wait is not cut short) and lets the lock go: the
Ctrl-C lands exactly as the main thread's acquire returns, as it would on a
busy connection.
"""

from __future__ import annotations

import contextlib
import io
import signal
import sys
import threading
from typing import Any, Callable, List, Tuple

import paramiko
import pytest
from helpers import at_line, call_in_thread, wait_for
from paramiko.common import MSG_CHANNEL_OPEN, MSG_CHANNEL_OPEN_SUCCESS, MSG_CHANNEL_REQUEST
from test_attack10f import _interrupt, _line
from test_attack11a import _all_back

from paramiko_executor import SSHExecutor
from paramiko_executor.channel import SessionChannel, _NetworkEvent
from paramiko_executor.internals import send_if_clear, wrap_handlers

pytestmark = pytest.mark.usefixtures("python_sigint")


# (code, line of the lock's acquire, the lock, the kind of message being sent), of a frame.
Acquire = Tuple[Any, int, Callable[[Any], Any], Callable[[Any], int]]


def _message_kind(frame: Any) -> int:
    local = frame.f_locals
    message = local.get("message", local.get("data"))
    return int(message.asbytes()[0])


_USER_SEND = paramiko.Transport._send_user_message  # type: ignore[attr-defined]
_CLEAR_TO_SEND: List[Acquire] = [
    # paramiko's own send (that of a transfer without a time limit, say) ...
    (_USER_SEND.__code__, _line(_USER_SEND, "self.clear_to_send_lock.acquire()"),
     lambda frame: frame.f_locals["self"].clear_to_send_lock, _message_kind),
    # ... and the executor's
    (send_if_clear.__code__, _line(send_if_clear, "_take(transport.clear_to_send_lock"),
     lambda frame: frame.f_locals["transport"].clear_to_send_lock, _message_kind),
]
_SEND = paramiko.packet.Packetizer.send_message
_WRITE: List[Acquire] = [
    (_SEND.__code__, _line(_SEND, "self.__write_lock.acquire()"),
     lambda frame: frame.f_locals["self"]._Packetizer__write_lock,
     lambda frame: int(frame.f_locals["cmd"])),
    (send_if_clear.__code__, _line(send_if_clear, "_take(write_lock"),
     lambda frame: frame.f_locals["write_lock"], _message_kind),
]


def _sigint_as_it_acquires(where: List[Acquire], kind: int,
                           call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` in the main thread, with a real SIGINT handled as the first acquire of
    ``where`` (by the main thread's send of a message ``kind``) returns, after a wait
    for another thread that held the lock."""
    codes = {code: (line, lock_of, kind_of) for code, line, lock_of, kind_of in where}
    main = threading.main_thread()
    done: List[bool] = []
    reached = threading.Event()
    taken = threading.Event()
    box: List[Any] = []

    def holder() -> None:
        if not reached.wait(60) or not box:
            return
        frame, lock = box
        lock.acquire()
        taken.set()

        def waiting() -> bool:  # the main thread in the acquire (``_take``'s, or its own)
            top = sys._current_frames().get(main.ident or 0)
            return top is frame or (top is not None and top.f_back is frame)

        try:
            wait_for(waiting, "the main thread waiting for the lock", timeout=10)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        finally:
            lock.release()

    def local(frame: Any, event: str, arg: Any) -> Any:
        line, lock_of, kind_of = codes[frame.f_code]
        if event == "line" and not done and frame.f_lineno == line and kind_of(frame) == kind:
            lock = lock_of(frame)
            # A lock this thread holds already (paramiko's send under the executor's)
            # cannot be held by another thread meanwhile.
            if not getattr(lock, "_is_owned", lambda: False)():
                done.append(True)
                box.extend((frame, lock))
                reached.set()
                assert taken.wait(10), "the helper did not take the lock"
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code in codes and not done else None

    def traced() -> Any:
        assert threading.current_thread() is main
        thread = threading.Thread(target=holder, daemon=True)
        thread.start()
        sys.settrace(tracer)
        try:
            return call()
        finally:
            sys.settrace(None)
            reached.set()
            thread.join(20)
            assert done, "the send never took the lock"
    return traced


def _usable(ex: SSHExecutor) -> None:
    """Another thread's command runs (its sends wait for no lock left taken)."""
    following = call_in_thread(lambda: ex.run_command("echo ok", timeout=5))
    following["thread"].join(20)
    assert not following["thread"].is_alive(), "another thread's command hung in its send"
    assert "error" not in following, repr(following.get("error"))
    assert following["result"].stdout == "ok\n"


@pytest.mark.parametrize("where", [_CLEAR_TO_SEND, _WRITE], ids=["clear_to_send", "write"])
@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_a_transfers_send_takes_a_send_lock_leaves_the_connection_usable(
        make_sshd: Any, shared_dir: str, where: List[Acquire]) -> None:
    """A put without a time limit sent through paramiko's own ``_send_user_message``, which
    takes ``clear_to_send_lock`` (a plain lock) and then the packet write lock each before
    the ``try`` that gives it back. A Ctrl-C as the first acquire returned (the SFTP
    subsystem request) kept ``clear_to_send_lock`` for good: the put's own CLOSE then
    waited for it forever, Ctrl-C or not. One as the second returned kept the write lock,
    the main thread's: every other thread's send (commands, the transport thread's
    replies) waited until the main thread's next send of its own."""
    server = make_sshd(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        link = ex._connection.link
        assert link is not None
        lock = link.transport.clear_to_send_lock
        ended = threading.Event()
        stuck: List[bool] = []

        def watchdog() -> None:  # a put stuck for good: the lock let go, so the test ends
            if not ended.wait(20):
                stuck.append(True)
                if lock.locked():
                    lock.release()

        guard = threading.Thread(target=watchdog, daemon=True)
        guard.start()
        put = _sigint_as_it_acquires(where, MSG_CHANNEL_REQUEST, lambda: ex.put(
            io.BytesIO(b"x" * 100000), f"{shared_dir}/f"))
        try:
            with pytest.raises(KeyboardInterrupt):
                put()
        finally:
            ended.set()
            guard.join(30)
        assert not stuck, "the interrupted put waited 20 s for the lock its Ctrl-C kept"
        _usable(ex)


@pytest.mark.parametrize("kind", [MSG_CHANNEL_OPEN, MSG_CHANNEL_REQUEST], ids=["open", "exec"])
@pytest.mark.parametrize("where", [_CLEAR_TO_SEND, _WRITE], ids=["clear_to_send", "write"])
@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_a_commands_send_takes_a_send_lock_leaves_the_connection_usable(
        make_sshd: Any, where: List[Acquire], kind: int) -> None:
    """Held on c967edd: a command's sends without a time limit (`send_if_clear` with
    ``within`` None, which now takes the write lock too) take each lock in C (``_take``),
    so the Ctrl-C comes after the outcome was stored, and the lock is given back; the
    slot comes back too (MaxSessions 1: the next command finds it). test_attack11b
    covers the OPEN with a time limit."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        run = _sigint_as_it_acquires(where, kind, lambda: ex.run_command("true", timeout=None))
        with pytest.raises(KeyboardInterrupt):
            run()
        _usable(ex)


_WAIT = _NetworkEvent.wait


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_the_wait_for_the_opens_answer_returns_keeps_the_answer(
        make_sshd: Any) -> None:
    """MaxSessions 1: a real Ctrl-C as the command's wait for the server's answer to its
    OPEN returned (``_NetworkEvent.wait`` takes the event's lock, held while the event is
    clear, and gives it back after: an interrupt in between cleared the event). The
    answer was lost: the channel was abandoned, its reaper waited for an answer that had
    come, and the session stayed open on the server, its slot taken for the
    connection's life: every later command waited for a slot (with MaxSessions 10, ten
    such Ctrl-Cs)."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        _all_back(ex, 1, "after the first command")
        link = ex._connection.link
        assert link is not None
        main = threading.main_thread()
        go = threading.Event()
        held: List[bool] = []

        def hold_answer(on_answer: Any) -> Any:  # the answer waits until the wait began
            def handle(*args: Any) -> None:
                if not held:
                    held.append(True)
                    go.wait(20)
                on_answer(*args)
            return handle

        wrap_handlers(link.transport, {}, {MSG_CHANNEL_OPEN_SUCCESS: hold_answer})
        box: List[Any] = []

        def interrupter() -> None:
            def waiting() -> bool:  # in the event's acquire (its own, or ``_take``'s)
                frame = sys._current_frames().get(main.ident or 0)
                while frame is not None and frame.f_code is not _WAIT.__code__:
                    frame = frame.f_back
                return (frame is not None and frame.f_back is not None
                        and frame.f_back.f_code is SessionChannel.wait_open.__code__)
            try:
                wait_for(lambda: bool(held) and waiting(), "the wait for the answer",
                         timeout=10)
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)
                box.append(True)
            finally:
                go.set()

        thread = threading.Thread(target=interrupter, daemon=True)
        thread.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                ex.run_command("true", timeout=30)
        finally:
            go.set()
            thread.join(20)
        assert box, "the interrupt was not sent"
        _all_back(ex, 1, "after a Ctrl-C as the wait for the open's answer returned")
        assert ex.run_command("echo ok", timeout=10).stdout == "ok\n"


# A transfer's channel was closed only from inside `upload`/`download`'s SFTP session
# (``transfer._session``'s ``finally``) and with paramiko's ``Channel.close``, which
# marks the channel closed before it sends EOF and CLOSE. A Ctrl-C before that
# ``try`` (`SessionChannel.hand_over`'s entry) or between the mark and the CLOSE left
# the server's session open, and its slot taken for the connection's life. The
# transfer's attempt now closes the channel on every path (`close_soon`, which sends
# nothing for a closed one), and the SFTP session closes with `close_soon` too.


@pytest.mark.parametrize("timeout", [None, 30.0], ids=["no_timeout", "timeout"])
@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_as_a_transfers_channel_is_handed_over_closes_its_session(
        make_sshd: Any, shared_dir: str, timeout: Any) -> None:
    """MaxSessions 1: a Ctrl-C at the entry of ``session.hand_over()`` (a Python call:
    CPython checks for signals there) in ``_transfer``'s attempt, whose ``finally`` only
    lets the slot go to the server's CLOSE: the channel was never closed, the session
    stayed open on the server and its slot taken, every later command waited for it."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        hand_over = SessionChannel.hand_over
        with pytest.raises(KeyboardInterrupt):
            at_line(hand_over.__code__, _line(hand_over, "self.raw = True"), _interrupt,
                    lambda: ex.put(io.BytesIO(b"x"), f"{shared_dir}/f", timeout=timeout))()
        _all_back(ex, 1, "after a Ctrl-C as the transfer's channel was handed over")


@pytest.mark.hang_timeout(120)
def test_a_ctrl_c_in_a_transfers_close_still_closes_its_session(
        make_sshd: Any, shared_dir: str) -> None:
    """MaxSessions 1: a put without a time limit closed its channel with paramiko's
    ``Channel.close``, which marks it closed under the channel's lock and sends EOF and
    CLOSE after it. A Ctrl-C as the lock's release returned: the channel counted as
    closed, no CLOSE ever went out (close_soon finds nothing to send), the session
    stayed open on the server and its slot taken. It closes with `close_soon` now,
    whose interrupt leaves the messages to a thread: the interrupt may not come."""
    server = make_sshd(max_sessions=1)
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("true", timeout=30).exit_code == 0
        close = paramiko.Channel.close
        with contextlib.suppress(KeyboardInterrupt):
            at_line(close.__code__, _line(close, "for m in msgs:"), _interrupt,
                    lambda: ex.put(io.BytesIO(b"x"), f"{shared_dir}/f"))()
        _all_back(ex, 1, "after a Ctrl-C in the transfer's close")
        assert ex.run_command("true", timeout=30).exit_code == 0
