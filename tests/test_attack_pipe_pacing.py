"""Attacks on the forwarded channels' own inbox (`pipe`) and on the hold-back of opens (`slots`).

The pipe: byte-exactness under odd client and target patterns through a real
sshd, and a hostile paramiko server (as in ``test_pipe``) that breaks the
channel protocol in ways the inbox must survive. The hold-back: a slot taken
and then held back is the caller's until its open goes out, so an interrupt
in that wait must give it back, and the slot rules must hold at saturation
with every kind of user mixed in.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import paramiko
import pytest
from backends import TCPServer
from helpers import reap, run_threads, wait_for
from paramiko.common import cMSG_CHANNEL_CLOSE, cMSG_CHANNEL_DATA, cMSG_CHANNEL_EOF
from paramiko.message import Message
from test_pipe import WINDOW, Forward

from paramiko_executor import ExecutorError, ExecutorFailure, SSHExecutor
from paramiko_executor import slots as slots_module
from paramiko_executor.sendgate import SendGate
from paramiko_executor.slots import Slots

# --- a hostile server's channel messages ---------------------------------------------------


@pytest.fixture
def forward() -> Iterator[Forward]:
    made = Forward()
    yield made
    made.close()


def raw(forward: Forward, kind: bytes, data: bytes = b"") -> None:
    """A channel message with ``data`` (none for EOF and CLOSE), sent whatever the state."""
    m = Message()
    m.add_byte(kind)
    m.add_int(forward.far.remote_chanid)
    if kind == cMSG_CHANNEL_DATA:
        m.add_string(data)
    forward.server._send_user_message(m)  # type: ignore[attr-defined]


def read_to_end(sock: socket.socket, limit: int = 64 * 1024 * 1024) -> Tuple[bytes, bool]:
    """(what arrived, whether it ended with a reset rather than an EOF)."""
    chunks: List[bytes] = []
    total = 0
    while total < limit:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), False
        chunks.append(data)
        total += len(data)
    raise AssertionError(f"more than {limit} bytes")


def test_data_after_the_servers_eof_is_dropped_and_the_stream_ends_cleanly(forward: Forward
                                                                           ) -> None:
    forward.start()
    raw(forward, cMSG_CHANNEL_DATA, b"before")
    raw(forward, cMSG_CHANNEL_EOF)
    raw(forward, cMSG_CHANNEL_DATA, b"after the EOF")
    received, was_reset = read_to_end(forward.peer)
    assert (received, was_reset) == (b"before", False)
    # The client's direction still works after the server's EOF.
    forward.peer.sendall(b"still up")
    got = b""
    while len(got) < 8:
        got += forward.far.recv(8 - len(got))
    assert got == b"still up"
    assert forward.client.is_active()


def test_data_after_the_servers_close_leaves_the_connection_up(forward: Forward) -> None:
    forward.start()
    raw(forward, cMSG_CHANNEL_DATA, b"before")
    raw(forward, cMSG_CHANNEL_CLOSE)
    raw(forward, cMSG_CHANNEL_DATA, b"after the CLOSE")
    received, was_reset = read_to_end(forward.peer)
    # A CLOSE without an EOF cut the stream: the client sees a reset, never a clean end.
    assert was_reset and b"after" not in received
    forward.thread.join(10)
    assert not forward.thread.is_alive()
    # paramiko ignores a message for a channel it saw close; the connection lives on.
    chan = forward.client.open_channel("direct-tcpip", ("127.0.0.1", 1), ("127.0.0.1", 2),
                                       timeout=10)
    chan.close()
    assert forward.client.is_active()


def test_an_empty_data_message_on_a_window_used_to_the_last_byte_is_no_overrun(
        forward: Forward, caplog: Any) -> None:
    forward.start()
    blob = os.urandom(WINDOW)
    with caplog.at_level(logging.WARNING, logger="paramiko_executor.pipe"):
        # The peer reads nothing yet: the whole window is in use, to the last byte.
        for start in range(0, WINDOW, 32768):
            raw(forward, cMSG_CHANNEL_DATA, blob[start:start + 32768])
        raw(forward, cMSG_CHANNEL_DATA, b"")
        raw(forward, cMSG_CHANNEL_EOF)
        received, was_reset = read_to_end(forward.peer)
    assert not was_reset and received == blob
    assert "broke the protocol" not in caplog.text


def test_window_adjusts_that_overflow_32_bits_do_not_corrupt_the_upstream(forward: Forward
                                                                          ) -> None:
    forward.start()
    for _ in range(3):  # 3 * (2**32 - 1): far past what the protocol allows
        m = Message()
        m.add_byte(bytes([93]))  # MSG_CHANNEL_WINDOW_ADJUST
        m.add_int(forward.far.remote_chanid)
        m.add_int(2**32 - 1)
        forward.server._send_user_message(m)  # type: ignore[attr-defined]
    payload = os.urandom(4 * 1024 * 1024)
    digest = hashlib.sha256(payload).hexdigest()
    received = hashlib.sha256()
    size = [0]

    def drain() -> None:
        while True:
            data = forward.far.recv(1 << 20)
            if not data:
                return
            received.update(data)
            size[0] += len(data)

    forward.far.settimeout(30)
    reader = threading.Thread(target=drain)
    reader.start()
    forward.peer.sendall(payload)
    forward.peer.shutdown(socket.SHUT_WR)
    reader.join(30)
    assert not reader.is_alive()
    assert (size[0], received.hexdigest()) == (len(payload), digest)


def test_abort_ends_a_pipe_blocked_on_a_window_the_server_never_gives(forward: Forward) -> None:
    """Zero window: the server reads nothing, the client keeps writing; abort still ends both."""
    forward.start()
    sender_done = threading.Event()

    def flood() -> None:
        block = b"u" * 65536
        try:
            for _ in range(1024):  # 64 MiB: far more than the far side's 2 MiB window
                forward.peer.sendall(block)
        except OSError:
            pass
        sender_done.set()

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    # The server granted its window and took nothing back: the pipe waits for window.
    wait_for(lambda: forward.chan.out_window_size == 0, "the window to run out")
    started = time.monotonic()
    forward.pipe.abort()
    forward.thread.join(10)
    assert not forward.thread.is_alive()
    assert time.monotonic() - started < 5
    assert sender_done.wait(10)



def test_an_honest_server_filling_the_window_exactly_is_never_taken_for_an_overrun(
        forward: Forward, caplog: Any) -> None:
    """paramiko's server side keeps to the window to the byte; a reader taking odd sizes
    makes the window come back in odd steps, so the accounting is exercised at its edge."""
    forward.start()
    total = 48 * 1024 * 1024
    digest = hashlib.sha256()

    def send() -> None:
        data = pattern(1 << 20, 8)
        for _ in range(total // len(data)):
            forward.far.sendall(data)
        forward.far.shutdown_write()

    sender = threading.Thread(target=send, daemon=True)
    with caplog.at_level(logging.WARNING, logger="paramiko_executor.pipe"):
        sender.start()
        rng = random.Random(9)
        got = 0
        while True:
            data = forward.peer.recv(rng.choice([1, 100, 4095, 40000, 1 << 20]))
            if not data:
                break
            digest.update(data)
            got += len(data)
        sender.join(10)
    assert "broke the protocol" not in caplog.text
    assert got == total
    assert digest.digest() == hashlib.sha256(pattern(1 << 20, 8) * (total >> 20)).digest()


def test_an_overrun_on_one_channel_leaves_the_others_streaming(forward: Forward) -> None:
    forward.start()
    second = forward.client.open_channel("direct-tcpip", ("127.0.0.1", 1), ("127.0.0.1", 2),
                                         window_size=WINDOW, timeout=10)
    far_second = forward.server.accept(10)
    assert far_second is not None
    payload = pattern(8 * WINDOW, 10)
    got = bytearray()

    def read_second() -> None:
        while len(got) < len(payload):
            data = second.recv(65536)
            if not data:
                return
            got.extend(data)

    reader = threading.Thread(target=read_second)
    reader.start()
    for _ in range(8 * WINDOW // 32768):  # the first channel's peer reads nothing
        raw(forward, cMSG_CHANNEL_DATA, b"x" * 32768)
    far_second.sendall(payload)
    reader.join(30)
    assert bytes(got) == payload
    forward.thread.join(10)
    assert not forward.thread.is_alive()  # the overrun one was reset
    assert forward.client.is_active()



def test_one_byte_packets_mixed_with_large_ones_keep_their_order(forward: Forward) -> None:
    """Small packets are copied together, large ones kept as they came: the mix stays exact."""
    forward.start()
    rng = random.Random(11)
    sizes = [rng.choice([1, 1, 1, 1, 1, 2, 4095, 4096, 40000]) for _ in range(6000)]
    payload = pattern(sum(sizes), 12)

    def send() -> None:
        at = 0
        for size in sizes:
            forward.far.sendall(payload[at:at + size])  # one data message each
            at += size
        forward.far.shutdown_write()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received, was_reset = read_to_end(forward.peer)
    sender.join(30)
    assert not was_reset and received == payload


# --- a real sshd: odd clients and targets --------------------------------------------------


class Target(TCPServer):
    """A TCP target on 127.0.0.1 for one test: ``handler(sock)`` runs per connection, bounded."""

    JOIN = 30.0
    CUT = False  # a test may close it while its handlers still talk

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self._handler = handler
        self.errors: List[BaseException] = []
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        sock.settimeout(60)
        try:
            self._handler(sock)
        except Exception as exc:  # collected for the test to assert on
            self.errors.append(exc)


@pytest.fixture
def make_target() -> Iterator[Callable[[Callable[[socket.socket], None]], Target]]:
    targets: List[Target] = []

    def make(serve: Callable[[socket.socket], None]) -> Target:
        target = Target(serve)
        targets.append(target)
        return target

    yield make
    for target in targets:
        target.close()


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes no shift of which matches: a lost, repeated or swapped byte shows."""
    return random.Random(seed).randbytes(size)


def recv_exactly(sock: socket.socket, size: int, step: int = 1 << 20) -> bytes:
    chunks: List[bytes] = []
    got = 0
    while got < size:
        data = sock.recv(min(step, size - got))
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def echo(sock: socket.socket) -> None:
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return
        sock.sendall(data)


def test_many_tiny_writes_and_one_byte_reads_arrive_exactly(sshd: Any, make_target: Any) -> None:
    target = make_target(echo)
    payload = pattern(20_000, 1)
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(target.port, "127.0.0.1") as tunnel, \
            socket.create_connection(tunnel.local_address, timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        received = bytearray()

        def read() -> None:
            while len(received) < len(payload):
                data = sock.recv(1)  # a slow reader: one byte at a time
                if not data:
                    return
                received.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        for i in range(len(payload)):  # one byte per write, each its own segment
            sock.send(payload[i:i + 1])
        reader.join(60)
        assert not reader.is_alive()
    assert bytes(received) == payload
    assert not target.errors


FLOOD = 16 * 1024 * 1024


def test_the_clients_half_close_while_the_target_floods(sshd: Any, make_target: Any) -> None:
    """The client's EOF reaches the target mid-flood; the flood still arrives whole."""
    got: List[bytes] = []

    def serve(sock: socket.socket) -> None:
        sock.sendall(pattern(FLOOD // 2, 2))
        got.append(recv_exactly(sock, 1 << 30))  # to the client's EOF
        sock.sendall(pattern(FLOOD // 2, 3))

    target = make_target(serve)
    sent = pattern(3 * 1024 * 1024, 4)
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(target.port, "127.0.0.1") as tunnel, \
            socket.create_connection(tunnel.local_address, timeout=60) as sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        received, was_reset = read_to_end(sock)
    assert not was_reset and not target.errors
    assert got == [sent]
    assert received == pattern(FLOOD // 2, 2) + pattern(FLOOD // 2, 3)


def test_the_targets_half_close_while_the_client_sends(sshd: Any, make_target: Any) -> None:
    got: List[bytes] = []

    def serve(sock: socket.socket) -> None:
        sock.sendall(b"bye")
        sock.shutdown(socket.SHUT_WR)
        got.append(recv_exactly(sock, 1 << 30))

    target = make_target(serve)
    sent = pattern(FLOOD, 5)
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(target.port, "127.0.0.1") as tunnel, \
            socket.create_connection(tunnel.local_address, timeout=60) as sock:
        assert recv_exactly(sock, 3) == b"bye"
        assert sock.recv(1) == b""  # the target's EOF, while ...
        sock.sendall(sent)  # ... the client still sends
        sock.shutdown(socket.SHUT_WR)
        target.close()
    assert not target.errors
    assert got == [sent]


def test_a_client_reset_mid_burst_frees_its_forward_and_the_next_clients_work(
        sshd: Any, make_target: Any) -> None:
    def flood(sock: socket.socket) -> None:
        block = pattern(1 << 20, 6)
        try:
            for _ in range(4096):
                sock.sendall(block)
        except OSError:
            pass  # the forward ended: what the test waits for

    flooding = make_target(flood)
    echoing = make_target(echo)
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(flooding.port, "127.0.0.1") as tunnel, \
            ex.forward_local(echoing.port, "127.0.0.1") as other:
        for _ in range(5):
            sock = socket.create_connection(tunnel.local_address, timeout=60)
            assert len(recv_exactly(sock, 3 << 20)) == 3 << 20
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()  # a reset while data keeps coming
        wait_for(lambda: tunnel.connections == 0, "the reset forwards to end")
        payload = pattern(1 << 20, 7)
        with socket.create_connection(other.local_address, timeout=60) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert read_to_end(sock) == (payload, False)
        assert ex.run_command("echo ok").stdout == "ok\n"


def test_a_target_that_closes_without_reading(sshd: Any, make_target: Any) -> None:
    def rude(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")

    target = make_target(rude)
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(target.port, "127.0.0.1") as tunnel:
        for _ in range(5):
            with socket.create_connection(tunnel.local_address, timeout=60) as sock:
                try:
                    for _ in range(64):  # 64 MiB: more than every buffer on the way
                        sock.sendall(b"w" * (1 << 20))
                except OSError:
                    pass  # the forward was cut: what a client should see
                received, _ = read_to_end(sock)
                assert received == b""
        wait_for(lambda: tunnel.connections == 0, "the forwards to end")
        assert ex.run_command("echo ok").stdout == "ok\n"


def test_fifty_clients_of_mixed_speeds_both_ways(sshd: Any, make_target: Any) -> None:
    target = make_target(echo)
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(target.port, "127.0.0.1") as tunnel:
        def client(i: int) -> bool:
            rng = random.Random(i)
            payload = pattern(rng.choice([1, 100, 65536, 1 << 20, 3 << 20]), 100 + i)
            write_step = rng.choice([1, 7, 4096, 1 << 20])
            read_step = rng.choice([1, 13, 4096, 1 << 20])
            if len(payload) > 65536:  # keep one byte per syscall for the small ones only
                write_step, read_step = max(write_step, 4096), max(read_step, 4096)
            with socket.create_connection(tunnel.local_address, timeout=90) as sock:
                received = bytearray()

                def read() -> None:
                    while len(received) < len(payload):
                        data = sock.recv(read_step)
                        if not data:
                            return
                        received.extend(data)
                        if i % 5 == 0:
                            time.sleep(0.001)  # a slow reader

                reader = threading.Thread(target=read)
                reader.start()
                for start in range(0, len(payload), write_step):
                    sock.sendall(payload[start:start + write_step])
                if i % 2:
                    sock.shutdown(socket.SHUT_WR)
                reader.join(90)
                return not reader.is_alive() and hashlib.sha256(received).digest() == \
                    hashlib.sha256(payload).digest()

        results, errors = run_threads(client, 50, timeout=150)
    assert not errors, errors[:3]
    assert all(results[i] for i in range(50)), [i for i in range(50) if not results[i]]


# --- the hold-back: an interrupt in its wait ----------------------------------------------


def slots_of(executor: SSHExecutor) -> Slots:
    state = executor.state
    assert state is not None and isinstance(state.bound, Slots)
    return state.bound


class Interrupt(Exception):
    """Raised by the test's timer signal, as SIGINT raises KeyboardInterrupt."""


@pytest.mark.parametrize("opener", ["bounded_connection", "run_command"])
def test_an_interrupt_during_the_hold_back_gives_the_slot_back(
        sshd: Any, monkeypatch: pytest.MonkeyPatch, opener: str) -> None:
    """Was: the slot taken before the hold-back's sleep was never released (one lost per
    interrupt, until every caller waited forever)."""
    monkeypatch.setattr(slots_module, "PACE_SHARE", 1e6)
    monkeypatch.setattr(slots_module, "PACE_MAX", 2.0)  # a wait long enough to interrupt

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupt()

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with SSHExecutor(**sshd.executor_parameters(), max_sessions=2) as ex:
            with ex.bounded_connection:
                slots = slots_of(ex)
                slots.open_answered(1.0, refused=True)  # as after sshd's first refusal
                with ex.bounded_connection:
                    pass  # a session freed: the next open on its slot is held back
                signal.setitimer(signal.ITIMER_REAL, 0.2)
                with pytest.raises(Interrupt):
                    if opener == "bounded_connection":
                        with ex.bounded_connection:
                            pass
                    else:
                        ex.run_command("true")
            wait_for(lambda: slots.available == 2, "every slot to come back", timeout=10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- the hold-back at saturation, with every kind of user and chaos ------------------------

#: Counts, on the server, the commands running at once per SSH connection (the client's
#: port in SSH_CONNECTION names it: a reconnect or a forked child's connection is another).
COUNTED = ("c=$(echo $SSH_CONNECTION | cut -d' ' -f2); exec 9>>{d}/lock; flock 9; "
           "n=$(( $(cat {d}/n.$c 2>/dev/null || echo 0) + 1 )); echo $n > {d}/n.$c; "
           "echo $c $n >> {d}/seen; flock -u 9; sleep 0.01; flock 9; "
           "echo $(( $(cat {d}/n.$c) - 1 )) > {d}/n.$c; flock -u 9")


def prepare_counter(directory: str) -> str:
    for name in ("seen", "lock"):
        path = os.path.join(directory, name)
        with open(path, "w", encoding="ascii"):
            pass
        os.chmod(path, 0o666)  # written by the login user
    return COUNTED.format(d=directory)


def most_at_once(directory: str, after: str = "") -> int:
    """The most counted commands seen at once on one connection (after the line ``after``)."""
    peaks: Dict[str, int] = {}
    with open(os.path.join(directory, "seen"), encoding="ascii") as stream:
        lines = stream.read().splitlines()
    if after:
        lines = lines[lines.index(after) + 1:]
    for line in lines:
        port, count = line.split()
        peaks[port] = max(peaks.get(port, 0), int(count))
    return max(peaks.values(), default=0)


def mark(directory: str, text: str) -> None:
    """Append ``text`` to the counted commands' log, in turn with them (their flock)."""
    with open(os.path.join(directory, "lock"), "a", encoding="ascii") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(os.path.join(directory, "seen"), "a", encoding="ascii") as stream:
            stream.write(text + "\n")


#: What a user of a connection that ``close()`` dropped under it may see.
EXPECTED = (ExecutorError, paramiko.SSHException, EOFError, OSError)


def free_slots_back(ex: SSHExecutor) -> None:
    """Wait until every slot of the current connection is free (the spare's aside).

    The chaos may end with a close(): a command then makes the connection to check.
    """
    if ex._connection.link is None:
        ex.run_command("true", timeout=60)
    link = ex._connection.link
    assert link is not None and link.slots is not None and link.spare is not None
    slots, spare = link.slots, link.spare
    wait_for(lambda: slots.available + spare.held == slots.limit, "every slot to come back",
             timeout=30)


@pytest.mark.hang_timeout(400)
def test_the_slot_rule_holds_at_saturation_with_close_fork_tiny_timeouts_and_reservations(
        make_sshd: Callable[..., Any], shared_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server allows more than the executor's slots: only the slots keep
    # the executor to LIMIT sessions per connection.
    limit = 3
    server = make_sshd(max_sessions=2 * limit)
    counted = prepare_counter(shared_dir)
    monkeypatch.setattr(slots_module, "PACE_SHARE", 1e6)  # every hold-back the longest
    ex = SSHExecutor(**server.executor_parameters(), max_sessions=limit, connect_backoff=0.05)
    arm_lock = threading.Lock()

    def arm() -> None:
        # Every connection (close() makes new ones) holds back as after sshd's first refusal.
        with arm_lock:
            link = ex._connection.link
            if link is not None and link.slots is not None and not link.slots.pace:
                link.slots.open_answered(1.0, refused=True)

    unexpected: List[BaseException] = []

    def work(i: int) -> int:
        rng = random.Random(i)
        done = 0
        for _ in range(100):  # until the chaos ends, bounded
            if stop.is_set():
                break
            arm()
            kind = rng.choice(["counted", "counted", "tiny", "reserve"])
            try:
                if kind == "counted":
                    assert ex.run_command(counted, timeout=120).exit_code == 0
                elif kind == "tiny":
                    ex.run_command("true", timeout=0.001)
                else:
                    with ex.bounded_connection as transport:
                        chan = transport.open_session(timeout=30)
                        try:
                            chan.settimeout(60)
                            chan.exec_command(counted)
                            status = chan.recv_exit_status()
                            if status == -1 and not transport.is_active():
                                raise EOFError("close() dropped the connection under us")
                            assert status == 0
                        finally:
                            chan.close()
                done += 1
            except EXPECTED as exc:
                if kind == "counted" and not isinstance(exc, ExecutorError):
                    unexpected.append(exc)
        return done

    children: List[int] = []
    stop = threading.Event()

    def chaos() -> None:
        rng = random.Random(99)
        try:
            for step in range(6):
                time.sleep(rng.uniform(0.2, 1.0))
                if step % 2:
                    ex.close()
                    continue
                pid = os.fork()
                if pid == 0:  # the child: its own connection, its own slots
                    code = 1
                    try:
                        code = 0 if ex.run_command(counted, timeout=30).exit_code == 0 else 1
                    finally:
                        os._exit(code)
                children.append(pid)
        finally:
            stop.set()

    chaos_thread = threading.Thread(target=chaos)
    chaos_thread.start()
    try:
        results, errors = run_threads(work, 150, timeout=300)
    finally:
        chaos_thread.join(60)
    assert not chaos_thread.is_alive()
    for pid in children:
        assert reap(pid, 60, "a forked child never ended") == 0
    assert not errors, errors[:3]
    assert not unexpected, unexpected[:3]
    assert sum(results.values()) > 10  # work went on between the closes
    try:
        assert most_at_once(shared_dir) <= limit
        free_slots_back(ex)
        # No slot leaked: LIMIT reservations at once, none waits.
        with contextlib.ExitStack() as stack:
            for _ in range(limit):
                stack.enter_context(ex.bounded_connection)
            link = ex._connection.link
            assert link is not None and link.slots is not None
            assert link.slots.available == 0 and link.slots.waiting == 0
    finally:
        ex.close()


@pytest.mark.hang_timeout(300)
def test_lower_at_saturation_with_held_back_opens_keeps_the_new_limit(
        make_sshd: Callable[..., Any], shared_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_sshd(max_sessions=8)
    counted = prepare_counter(shared_dir)
    monkeypatch.setattr(slots_module, "PACE_SHARE", 1e6)
    with SSHExecutor(**server.executor_parameters(), max_sessions=5) as ex:
        ex.run_command("true")
        slots = slots_of(ex)
        slots.open_answered(1.0, refused=True)  # sshd's first refusal: held back from now
        stop = threading.Event()

        def work(i: int) -> int:
            done = 0
            for n in range(200):
                if stop.is_set() and n >= 3:
                    break
                try:
                    if i % 4:
                        ex.run_command(counted, timeout=120)
                    else:
                        ex.run_command("true", timeout=0.001)
                    done += 1
                except ExecutorError as exc:
                    if i % 4:
                        raise AssertionError(f"a counted command failed: {exc}") from exc
            return done

        outcome: Dict[str, Any] = {}

        def lower_at_saturation() -> None:
            try:
                wait_for(lambda: slots.available == 0 and slots.waiting > 20, "saturation")
                slots.lower(2)
                # The sessions held beyond the new limit end; their releases are kept back.
                wait_for(lambda: slots._kept_back == 0, "the held sessions over the limit to end")
                mark(shared_dir, "lowered")
                time.sleep(1.0)  # commands run under the new limit a while
            except BaseException as exc:  # reported by the test thread
                outcome["error"] = exc
            finally:
                stop.set()

        lowering = threading.Thread(target=lower_at_saturation)
        lowering.start()
        try:
            results, errors = run_threads(work, 80, timeout=240)
        finally:
            lowering.join(60)
        assert "error" not in outcome, outcome
        assert not errors, errors[:3]
        assert most_at_once(shared_dir, after="lowered") <= 2
        with open(os.path.join(shared_dir, "seen"), encoding="ascii") as stream:
            log_lines = stream.read().splitlines()
        assert len(log_lines) - log_lines.index("lowered") > 20  # work went on after it
        free_slots_back(ex)
        assert slots.limit == 2
        with ex.bounded_connection, ex.bounded_connection:
            assert slots.available == 0 and slots.waiting == 0


def test_refusals_on_loopback_hold_nothing_back(make_sshd: Callable[..., Any]) -> None:
    """The first refusal arms the hold-back, but loopback's round trip makes it zero:
    a server that refuses all the time cannot slow a fast path's opens."""
    server = make_sshd(max_sessions=2)
    with SSHExecutor(**server.executor_parameters(), max_sessions=4) as ex:
        def work(i: int) -> None:
            for _ in range(3):
                try:
                    ex.run_command("true", timeout=60)
                except ExecutorFailure:
                    pass  # refused too often: the server allows fewer than we were told

        _, errors = run_threads(work, 40, timeout=120)
        assert not errors, errors[:3]
        slots = slots_of(ex)
        assert ex.statistics().refused_opens > 0 and slots._refused
        assert slots.pace == 0.0


# --- races once lost: a CLOSE overtaking data, and data at a pipe's start ---


def closes_after_4_mib(sock: socket.socket) -> None:
    """A target that reads 4 MiB, then closes while its client still sends."""
    got = 0
    try:
        while got < 4 << 20:
            data = sock.recv(1 << 20)
            if not data:
                return
            got += len(data)
    except OSError:
        pass


def cut_during_uploads(ex: SSHExecutor, port: int, how: str, clients: int = 6) -> None:
    """Cut ``clients`` streams to ``port`` while each uploads: ``how`` is ``tunnel`` (its
    close), ``reset`` (each tunnel client resets), ``socket`` (each ``open_connection``
    socket is closed while another thread sends on it) or ``target`` (the target at
    ``port`` closes each connection while its client still sends)."""
    tunnel = ex.forward_local(port, "127.0.0.1")
    stop = threading.Event()
    sent = [0] * clients
    block = b"z" * (1 << 20)
    socks: List[Any] = []
    for _ in range(clients):
        if how == "socket":
            socks.append(ex.open_connection("127.0.0.1", port, timeout=30))
        else:
            socks.append(socket.create_connection(tunnel.local_address, timeout=30))

    def upload(i: int) -> None:
        try:
            while not stop.is_set():
                socks[i].sendall(block)
                sent[i] += 1
        except OSError:
            pass  # the cut: expected

    uploads = [threading.Thread(target=upload, args=(i,)) for i in range(clients)]
    for thread in uploads:
        thread.start()
    try:
        if how == "target":
            for thread in uploads:
                thread.join(60)
        else:
            wait_for(lambda: min(sent) >= 2, "every client to be uploading")
        if how == "tunnel":
            tunnel.close()
        for sock in socks:
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()
    finally:
        stop.set()
        for thread in uploads:
            thread.join(30)
        tunnel.close()
    assert not any(thread.is_alive() for thread in uploads)


@pytest.mark.parametrize("how", ["tunnel", "reset", "socket", "target"])
@pytest.mark.hang_timeout(300)
def test_cutting_a_stream_during_its_upload_leaves_the_connection_up(
        make_sshd: Callable[..., Any], make_target: Any, how: str) -> None:
    """Was not covered: only the connection's loss or an idle stream's cut were."""
    server = make_sshd(max_sessions=10)
    target = make_target(closes_after_4_mib if how == "target" else echo)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        for _ in range(15):  # a round drops the connection about every third time
            cut_during_uploads(ex, target.port, how)
            assert ex.run_command("echo ok").stdout == "ok\n"
            if ex.statistics().reconnects:
                break
        dropped = [line for line in server.read_log().splitlines() if "Disconnecting" in line]
        assert ex.statistics().reconnects == 0, dropped


def test_data_racing_the_pipes_start_keeps_its_order(forward: Forward) -> None:
    """paramiko's thread is inside the channel's own buffer's ``feed`` (it read the
    attribute before `install` swapped it) as the pipe starts; the test holds each
    thread at the moment that makes the interleaving happen."""
    old: Any = forward.chan.in_buffer  # its methods are replaced below
    inside, go, fed = threading.Event(), threading.Event(), threading.Event()
    feed, empty = old.feed, old.empty

    def slow_feed(data: Any) -> None:
        inside.set()
        assert go.wait(10)
        feed(data)

    def racing_empty() -> bytes:
        early = empty()  # nothing yet: paramiko's thread is held in slow_feed
        if not go.is_set() and threading.current_thread() is not threading.main_thread():
            # The pipe's own thread, between its look at the old buffer and at the
            # inbox: paramiko's thread appends "first" and feeds "second" to the inbox.
            go.set()
            wait_for(lambda: len(forward.chan.in_buffer) > 0, "the second packet in the inbox")
            fed.set()
        return early

    old.feed = slow_feed
    forward.far.sendall(b"first ")
    assert inside.wait(10)
    old.empty = racing_empty
    forward.far.sendall(b"second")
    forward.far.shutdown_write()
    forward.start()
    assert fed.wait(10)
    received, was_reset = read_to_end(forward.peer)
    assert (received, was_reset) == (b"first second", False)


def test_a_close_during_a_send_is_left_to_the_last_sender_out() -> None:
    """The gate under the test above: a close never waits, and never overtakes a send."""
    gate = SendGate(paramiko.Channel(0))
    ran: List[str] = []
    entered = threading.Semaphore(0)

    def sender(done: threading.Event) -> None:  # a sender leaves in its own thread
        assert gate.enter()
        entered.release()
        assert done.wait(10)
        gate.leave()

    first_done, last_done = threading.Event(), threading.Event()
    first = threading.Thread(target=sender, args=(first_done,), name="first sender")
    last = threading.Thread(target=sender, args=(last_done,), name="last sender")
    for thread in (first, last):
        thread.start()
    for _ in range(2):  # two data messages in flight
        assert entered.acquire(timeout=10)
    gate.close(lambda: ran.append(threading.current_thread().name))
    gate.close(lambda: ran.append("second close"))  # e.g. the server's CLOSE meanwhile
    assert ran == [] and not gate.enter()  # deferred; no new send starts
    gate.leave()  # this thread sends nothing: its leave changes nothing
    first_done.set()
    first.join(10)
    assert ran == []
    last_done.set()
    last.join(10)
    assert ran == ["last sender", "second close"]
    gate.close(lambda: ran.append("now"))  # nothing in flight: at once
    assert ran[-1] == "now"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("closing", ["tunnel", "executor"])
@pytest.mark.hang_timeout(300)
def test_closes_during_bursts_both_ways_leave_nothing_behind(
        make_sshd: Callable[..., Any], make_target: Any, closing: str) -> None:
    server = make_sshd(max_sessions=10)
    target = make_target(echo)
    threads_before, fds_before = threading.active_count(), open_fds()
    ex = SSHExecutor(**server.executor_parameters())
    tunnels = [ex.forward_local(target.port, "127.0.0.1") for _ in range(2)]
    moved = [0] * 10
    outcomes: List[Any] = []

    def burst(i: int) -> None:
        block = pattern(1 << 20, i)
        try:
            with socket.create_connection(tunnels[i % 2].local_address, timeout=30) as sock:
                for _ in range(1000):  # far more than passes before the close
                    sock.sendall(block)
                    if recv_exactly(sock, len(block), 65536) != block:
                        break
                    moved[i] += 1
            outcomes.append("ended")
        except OSError as exc:
            outcomes.append(exc)

    clients = [threading.Thread(target=burst, args=(i,)) for i in range(10)]
    for thread in clients:
        thread.start()
    wait_for(lambda: min(moved) >= 1, "every client to be bursting")
    if closing == "tunnel":
        for tunnel in tunnels:
            tunnel.close()
    ex.close()
    for thread in clients:
        thread.join(60)
    assert not any(thread.is_alive() for thread in clients)
    # Every client was cut, and saw a reset: never a hang, nor an end taken for a whole stream.
    assert len(outcomes) == 10 and all(isinstance(o, OSError) for o in outcomes), outcomes
    wait_for(lambda: threading.active_count() <= threads_before, "the threads to end")
    wait_for(lambda: open_fds() <= fds_before, "the sockets to close")
