"""Attacks on `sendgate.SendGate`: a forwarded channel's CLOSE deferred to its last sender.

Against a real sshd: a sender stuck on a window the server never opens, many
threads sending on one connection while another closes it, closes racing a
key exchange, and an interrupt landing as a sender passes the gate. The
promise under attack: every CLOSE goes out (the far end sees the stream end),
none goes out before data sent on the channel (sshd never drops the whole
connection), and nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import types
from typing import Any, Callable, Iterator, List, Optional

import pytest
from backends import TCPServer
from helpers import wait_for

from paramiko_executor import SSHExecutor
from paramiko_executor.sendgate import SendGate

BLOCK = b"x" * 65536
POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)  # Linux


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def our_threads() -> int:
    """Threads but the targets' (a target that never reads holds its connection to the end)."""
    return sum(1 for thread in threading.enumerate() if thread.name != "sink")


class Sink(TCPServer):
    """A TCP target on 127.0.0.1 that reads (``reading``) or never reads, and notes each end."""

    thread_name = "sink"

    def __init__(self, reading: bool) -> None:
        self._reading = reading
        self._stop = threading.Event()
        self.ended = 0  # connections whose far end was seen to close
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.2)
        while not self._stop.is_set():
            if not self._reading:
                # The far end's close shows, with the data still unread.
                poller = select.poll()
                poller.register(sock, POLLRDHUP)
                if poller.poll(200):
                    break
                continue
            try:
                if not sock.recv(1 << 20):
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        with self._lock:
            self.ended += 1

    def close(self) -> None:
        self._stop.set()
        super().close()


@pytest.fixture
def make_sink() -> Iterator[Callable[[bool], Sink]]:
    sinks: List[Sink] = []

    def make(reading: bool) -> Sink:
        sink = Sink(reading)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


def gate_enter_raises(exc: BaseException) -> Callable[[], None]:
    """Trace this thread so the next `SendGate.enter` raises ``exc`` as it returns.

    That is where an asynchronous exception (SIGINT's KeyboardInterrupt) lands
    when the signal arrives while ``enter`` holds its lock: Python runs the
    handler right after the lock's release, the count already taken. Returns
    the function that stops the tracing.
    """
    code = SendGate.enter.__code__
    fired: List[bool] = []

    def local(frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "return" and not fired:
            fired.append(True)
            raise exc
        return local

    def tracer(frame: types.FrameType, event: str, arg: Any) -> Optional[Callable[..., Any]]:
        return local if frame.f_code is code else None

    sys.settrace(tracer)
    return lambda: sys.settrace(None)


@pytest.mark.hang_timeout(120)
def test_an_interrupt_as_a_sender_passes_the_gate_still_lets_the_close_go_out(
        sshd: Any, make_sink: Callable[[bool], Sink]) -> None:
    sink = make_sink(True)
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        sock = ex.open_connection("127.0.0.1", sink.port, timeout=30)
        sock.sendall(b"before")
        stop = gate_enter_raises(KeyboardInterrupt())
        try:
            with pytest.raises(KeyboardInterrupt):
                sock.sendall(BLOCK)
        finally:
            stop()
        sock.close()
        # The CLOSE must reach sshd, which then closes the target's side.
        wait_for(lambda: sink.ended == 1, "the target to see the stream end", 15)
        assert ex.run_command("echo ok").stdout == "ok\n"
        assert ex.statistics().reconnects == 0


def test_an_interrupt_in_one_deferred_close_does_not_lose_the_others() -> None:
    """The last sender out runs our CLOSE and then paramiko's reply to the server's; an
    interrupt in the first (it may wait out a key exchange) must not drop the second."""
    gate = SendGate(object())  # type: ignore[arg-type]  # the actions below never use it
    ran: List[str] = []

    def interrupted() -> None:
        raise KeyboardInterrupt

    assert gate.enter()
    gate.close(interrupted)
    gate.close(lambda: ran.append("the reply to the server's CLOSE"))
    with pytest.raises(KeyboardInterrupt):
        gate.leave()
    assert ran == ["the reply to the server's CLOSE"]


def upload_until_stuck(send: Callable[[bytes], Any], moved: List[int]) -> Callable[[], None]:
    """A thread's body: send blocks until the sender is cut (its error ends it quietly)."""
    def run() -> None:
        try:
            for _ in range(100_000):  # bounded: far more than any window holds
                send(BLOCK)
                moved[0] += 1
        except (OSError, EOFError):
            pass  # the cut under test
    return run


def wait_stuck(moved: List[int]) -> None:
    """Wait until ``moved`` stops growing for a second (the window is spent), bounded."""
    last = -1
    for _ in range(60):
        if moved[0] == last and last > 0:
            return
        last = moved[0]
        threading.Event().wait(1.0)
    raise AssertionError("the upload never stalled")


@pytest.mark.parametrize("closing", ["socket", "executor"])
@pytest.mark.hang_timeout(180)
def test_a_sender_stuck_on_a_window_never_opened_ends_at_close(
        make_sshd: Callable[..., Any], make_sink: Callable[[bool], Sink], closing: str) -> None:
    server = make_sshd(max_sessions=10)
    sink = make_sink(False)  # never reads: sshd stops adjusting the window
    threads_before, fds_before = our_threads(), open_fds()
    ex = SSHExecutor(**server.executor_parameters())
    sock = ex.open_connection("127.0.0.1", sink.port, timeout=30)
    sock.settimeout(None)
    moved = [0]
    senders = [threading.Thread(target=upload_until_stuck(sock.sendall, moved)) for _ in range(3)]
    for thread in senders:
        thread.start()
    wait_stuck(moved)
    if closing == "socket":
        sock.close()
    else:
        ex.close()
    for thread in senders:
        thread.join(15)
    assert not any(thread.is_alive() for thread in senders)
    if closing == "socket":
        # Our CLOSE went out (sshd itself holds the target's end until it drains, never).
        assert sock._chan.closed  # type: ignore[attr-defined]
        assert ex.run_command("echo ok").stdout == "ok\n"
        assert ex.statistics().reconnects == 0
        ex.close()
    wait_for(lambda: our_threads() <= threads_before, "the threads to end")
    # The target's end of each connection stays open until the test ends: 1 fd each.
    wait_for(lambda: open_fds() <= fds_before + sink.accepted, "the sockets to close")


@pytest.mark.parametrize("closing", ["tunnel", "executor"])
@pytest.mark.hang_timeout(180)
def test_a_tunnel_stuck_on_a_window_never_opened_ends_at_close(
        make_sshd: Callable[..., Any], make_sink: Callable[[bool], Sink], closing: str) -> None:
    server = make_sshd(max_sessions=10)
    sink = make_sink(False)
    threads_before, fds_before = our_threads(), open_fds()
    ex = SSHExecutor(**server.executor_parameters())
    tunnel = ex.forward_local(sink.port, "127.0.0.1")
    clients = [socket.create_connection(tunnel.local_address, timeout=60) for _ in range(3)]
    moved = [0]
    senders = [threading.Thread(target=upload_until_stuck(c.sendall, moved)) for c in clients]
    for thread in senders:
        thread.start()
    wait_stuck(moved)
    if closing == "tunnel":
        tunnel.close()
    ex.close()
    for thread in senders:
        thread.join(30)
    assert not any(thread.is_alive() for thread in senders)
    for client in clients:
        client.close()
    wait_for(lambda: our_threads() <= threads_before, "the threads to end")
    # The target's end of each connection stays open until the test ends: 1 fd each.
    wait_for(lambda: open_fds() <= fds_before + sink.accepted, "the sockets to close")


def shrink_send_buffer(ex: SSHExecutor) -> None:
    """Less in TCP's buffers than a window holds: senders on a frozen sshd wait on TCP."""
    transport: Any = ex._connection.link.transport  # type: ignore[union-attr]
    transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def senders_against_closers(ex: SSHExecutor, port: int) -> None:
    """6 threads send on one connection while 3 others close it at once."""
    sock = ex.open_connection("127.0.0.1", port, timeout=30)
    moved = [0]
    started = threading.Barrier(10, timeout=30)

    def send(small: bool) -> None:
        started.wait()
        try:
            for _ in range(2000):  # bounded; the close cuts it long before
                if small:
                    sock.send(BLOCK[:1000])
                else:
                    sock.sendall(BLOCK)
                moved[0] += 1
        except OSError:
            pass  # the close under test

    def close() -> None:
        started.wait()
        wait_for(lambda: moved[0] >= 20, "the senders to be sending")
        sock.close()

    threads = [threading.Thread(target=send, args=(i % 2 == 0,)) for i in range(6)]
    threads += [threading.Thread(target=close) for _ in range(3)]
    for thread in threads:
        thread.start()
    started.wait()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    sock.close()  # again: nothing
    assert sock._chan.closed  # type: ignore[attr-defined]


@pytest.mark.parametrize("rekey", [False, True])
@pytest.mark.hang_timeout(300)
def test_many_senders_and_closers_on_one_connection_never_drop_the_connection(
        make_sshd: Callable[..., Any], make_sink: Callable[[bool], Sink], rekey: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """No data after CLOSE: sshd would say "nonexistent channel" and drop everything."""
    caplog.set_level(logging.DEBUG, logger="paramiko.transport")
    extra = ["RekeyLimit 256K"] if rekey else []
    server = make_sshd(max_sessions=10, extra_config=extra)
    sink = make_sink(True)
    threads_before, fds_before = our_threads(), open_fds()
    with SSHExecutor(**server.executor_parameters()) as ex:
        for _ in range(8):
            senders_against_closers(ex, sink.port)
        assert ex.run_command("echo ok").stdout == "ok\n"
        log = server.read_log()
        assert ex.statistics().reconnects == 0, [
            line for line in log.splitlines() if "isconnect" in line or "nonexistent" in line]
        assert "nonexistent channel" not in log
        if rekey:
            switched = [r for r in caplog.records if r.getMessage() == "Switch to new keys ..."]
            assert len(switched) >= 3, "the key exchanges did not happen"
    wait_for(lambda: sink.ended == sink.accepted == 8, "every target connection to end")
    wait_for(lambda: our_threads() <= threads_before, "the threads to end")
    wait_for(lambda: open_fds() <= fds_before, "the sockets to close")


@pytest.mark.parametrize("ending", ["executor", "lost"])
@pytest.mark.hang_timeout(180)
def test_closes_deferred_behind_senders_stuck_on_a_frozen_sshd_end_with_the_connection(
        make_sshd: Callable[..., Any], make_sink: Callable[[bool], Sink], ending: str) -> None:
    """sshd stops reading: senders wait inside the gate (on TCP), so the closes are deferred
    to them; neither close may wait, and the connection's end must free everything."""
    server = make_sshd(max_sessions=10)
    sink = make_sink(True)
    threads_before, fds_before = our_threads(), open_fds()
    ex = SSHExecutor(**server.executor_parameters())
    sock = ex.open_connection("127.0.0.1", sink.port, timeout=30)
    sock.settimeout(None)
    shrink_send_buffer(ex)
    moved = [0]
    senders = [threading.Thread(target=upload_until_stuck(sock.sendall, moved)) for _ in range(4)]
    frozen = server.serving_pids()
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        for thread in senders:
            thread.start()
        gate = sock._inbox.gate  # type: ignore[attr-defined]
        wait_for(lambda: sum(gate._sending.values()) == 4,
                 "every sender to be inside the gate, on TCP")
        closers = [threading.Thread(target=sock.close) for _ in range(3)]
        for thread in closers:
            thread.start()
        for thread in closers:
            thread.join(10)
        assert not any(thread.is_alive() for thread in closers), "a close waited for a sender"
        assert len(gate._deferred) == 1  # the close is the last sender's to send
        if ending == "lost":
            for pid in frozen:
                os.kill(pid, signal.SIGKILL)
            for thread in senders:
                thread.join(30)
            assert not any(thread.is_alive() for thread in senders)
            assert ex.run_command("echo ok").stdout == "ok\n"
        ex.close()
        for thread in senders:
            thread.join(30)
        assert not any(thread.is_alive() for thread in senders)
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        ex.close()
    wait_for(lambda: our_threads() <= threads_before, "the threads to end")
    wait_for(lambda: open_fds() <= fds_before, "the sockets to close")


@pytest.mark.hang_timeout(180)
def test_a_tunnel_closes_while_its_pipes_are_stuck_on_a_frozen_sshd(
        make_sshd: Callable[..., Any], make_sink: Callable[[bool], Sink]) -> None:
    """The pipes' closes are deferred to their upload threads, stuck on TCP: the tunnel's
    close must still end its clients' connections, without waiting for sshd."""
    server = make_sshd(max_sessions=10)
    sink = make_sink(True)
    threads_before, fds_before = our_threads(), open_fds()
    ex = SSHExecutor(**server.executor_parameters())
    tunnel = ex.forward_local(sink.port, "127.0.0.1")
    clients = [socket.create_connection(tunnel.local_address, timeout=60) for _ in range(3)]
    for client in clients:
        client.sendall(b"open")
    wait_for(lambda: sink.accepted == 3, "every client's stream to open")
    shrink_send_buffer(ex)
    moved = [0]
    senders = [threading.Thread(target=upload_until_stuck(c.sendall, moved)) for c in clients]
    frozen = server.serving_pids()
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        for thread in senders:
            thread.start()
        wait_stuck(moved)
        closing = threading.Thread(target=tunnel.close)
        closing.start()
        closing.join(20)
        assert not closing.is_alive(), "the tunnel's close waited for the frozen sshd"
        # One deadline for all, well inside the clients' own timeout, which cuts them too.
        deadline = time.monotonic() + 10
        for thread in senders:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in senders), "a client was never cut"
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        frozen = []
        assert ex.run_command("echo ok").stdout == "ok\n"
        assert ex.statistics().reconnects == 0
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        ex.close()
        for thread in senders:
            thread.join(30)
        for client in clients:
            client.close()
    wait_for(lambda: our_threads() <= threads_before, "the threads to end")
    wait_for(lambda: open_fds() <= fds_before, "the sockets to close")
