"""What a command's end costs the transport thread: one deferred wake-up, no per-packet timer."""

from __future__ import annotations

import threading
from typing import Any, Callable, List

from paramiko_executor import SSHExecutor
from paramiko_executor.channel import _Wakeup
from paramiko_executor.internals import SPENT_TIMER


class _DeferringSocket:
    def __init__(self) -> None:
        self.deferred: List[Callable[[], None]] = []

    def defer(self, wake: Callable[[], None]) -> None:
        self.deferred.append(wake)


class _TransportThread(threading.Thread):
    """Stands in for a transport: the thread whose sets are deferred, over a deferring socket."""

    def __init__(self) -> None:
        super().__init__()
        self.sock = _DeferringSocket()


def _in_transport_thread(body: Callable[[Any], None]) -> _DeferringSocket:
    thread = _TransportThread()
    event = _Wakeup(thread)  # type: ignore[arg-type]  # a thread with a socket is all it uses
    errors: List[BaseException] = []

    def run() -> None:
        try:
            body(event)
        except BaseException as exc:
            errors.append(exc)

    thread.run = run  # type: ignore[method-assign]
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and errors == []
    return thread.sock


def test_a_burst_of_sets_defers_one_wake_up() -> None:
    def burst(event: _Wakeup) -> None:
        # EOF closes both buffers, the exit status, CLOSE closes both again, the close hook.
        for _ in range(6):
            event.set()
        sock = threading.current_thread().sock  # type: ignore[attr-defined]
        assert len(sock.deferred) == 1 and not event.is_set()
        sock.deferred.pop()()  # the read that may block fires it
        assert event.is_set()
        event.set()  # already set: nothing to defer
        assert sock.deferred == []
        event.reset()  # the command looked, and waits again
        event.set()
        assert len(sock.deferred) == 1

    _in_transport_thread(burst)


def test_a_set_from_another_thread_fires_at_once_even_with_one_deferred() -> None:
    holder: List[_Wakeup] = []

    def one_set(event: _Wakeup) -> None:
        event.set()
        holder.append(event)

    sock = _in_transport_thread(one_set)
    event, = holder
    assert len(sock.deferred) == 1 and not event.is_set()
    event.set()  # the owner's own thread (a close from our side): no waiting for the read
    assert event.is_set()
    sock.deferred.pop()()  # the late fire changes nothing
    assert event.is_set()


def test_a_logged_in_transport_checks_no_handshake_timer_per_packet(sshd: Any) -> None:
    with SSHExecutor(**sshd.executor_parameters()) as executor:
        executor.run_command("true")
        with executor.bounded_connection as transport:
            timer = transport.packetizer._Packetizer__timer  # type: ignore[attr-defined]
            assert timer is SPENT_TIMER
            assert not transport.packetizer.handshake_timed_out()
        assert executor.run_command("echo still").stdout == "still\n"


def test_the_wake_up_waits_as_an_event_does() -> None:
    event = _Wakeup(None)  # type: ignore[arg-type]  # no transport: every set fires at once
    assert not event.is_set()
    assert not event.wait(0.01) and not event.wait(-1)  # times out; a past deadline at once
    setter = threading.Timer(0.05, event.set)
    setter.start()
    try:
        assert event.wait(10)  # woken by another thread
    finally:
        setter.cancel()
    assert event.is_set() and event.wait(0)  # waiting does not clear it
    event.set()  # already set: no error, still set
    event.clear()  # paramiko's buffers clear it when read empty: only the owner does
    assert event.is_set()
    event.reset()
    assert not event.is_set() and not event.wait(0)
