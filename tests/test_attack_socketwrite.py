"""Attacks on the transport socket's write-first ``send`` (``os.write`` before
``socket.send``), on the live-output line pieces, and on the lock-backed network event.

Every socket here is TCP on 127.0.0.1; races are injected deterministically
(``sys.setprofile`` at the C call that matters), never hoped for with sleeps.
"""

import errno
import os
import random
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

import paramiko
import pytest

from paramiko_executor import output
from paramiko_executor.channel import _NetworkEvent, _Wakeup
from paramiko_executor.connection import _TransportSocket
from paramiko_executor.output import LineSplitter

posix_only = pytest.mark.skipif(os.name != "posix", reason="the write-first send is POSIX only")


def _pair(kind: type) -> Tuple[socket.socket, socket.socket]:
    """(ours, theirs): ``ours`` of class ``kind`` with paramiko's 0.1 s timeout."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        plain = socket.create_connection(listener.getsockname(), timeout=10)
        theirs, _ = listener.accept()
    ours = kind(plain.family, plain.type, plain.proto, fileno=plain.detach())
    ours.settimeout(0.1)
    return ours, theirs


@pytest.fixture(params=[socket.socket, _TransportSocket], ids=["socket", "transport"])
def pair(request: Any) -> Iterator[Tuple[socket.socket, socket.socket]]:
    ours, theirs = _pair(request.param)
    yield ours, theirs
    ours.close()
    theirs.close()


def _reset(theirs: socket.socket) -> None:
    """Close ``theirs`` with a RST (linger 0), as a peer that died."""
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    theirs.close()


def _send_error(sock: socket.socket, limit: float = 10.0) -> OSError:
    """Send until ``sock`` fails (bounded: ``limit`` seconds); the error."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            sock.send(b"x" * 1000)
        except socket.timeout:
            continue
        except OSError as exc:
            return exc
        time.sleep(0.01)  # the RST may still be on its way
    raise AssertionError("send never failed")


# -- the write-first send --------------------------------------------------------------------


@posix_only
def test_a_peer_that_died_fails_the_send_with_the_same_error_as_socket_send(pair):
    ours, theirs = pair
    _reset(theirs)
    first = _send_error(ours)
    second = _send_error(ours)
    # Linux: ECONNRESET first (the RST), EPIPE after: as socket.send gives them.
    assert isinstance(first, (ConnectionResetError, BrokenPipeError)), first
    assert isinstance(second, BrokenPipeError), second


@posix_only
def test_a_closed_socket_fails_the_send_with_ebadf_as_socket_send(pair):
    ours, _ = pair
    ours.close()
    with pytest.raises(OSError) as caught:
        ours.send(b"x")
    assert caught.value.errno == errno.EBADF


@posix_only
def test_a_full_buffer_gives_partial_writes_then_a_timeout_and_loses_nothing(pair):
    """The peer stops reading: sends shrink to partial writes, then time out after the
    socket's timeout (not at once with BlockingIOError, which paramiko would take for a
    dead link), and every byte a send counted arrives, in order, once the peer reads."""
    ours, theirs = pair
    sent = bytearray()
    timeouts = 0
    block = bytes(range(256)) * 256  # 64 KiB
    for n in range(2000):  # bounded: the buffers on 127.0.0.1 hold a few MiB at most
        try:
            count = ours.send(block[n % 256:] + block[:n % 256])
        except socket.timeout:
            timeouts += 1
            if timeouts == 3:
                break
            continue
        assert 0 < count <= len(block)
        sent += (block[n % 256:] + block[:n % 256])[:count]
    assert timeouts == 3
    got = bytearray()
    theirs.settimeout(10)
    while len(got) < len(sent):
        chunk = theirs.recv(1 << 20)
        assert chunk
        got += chunk
    assert got == sent


@posix_only
def test_paramiko_takes_a_dead_peer_under_the_write_first_send_for_eof(pair):
    """paramiko's packetizer turns any send error but EAGAIN into EOFError, the lost link."""
    ours, theirs = pair
    _reset(theirs)
    packetizer = paramiko.Packetizer(ours)
    deadline = time.monotonic() + 10
    with pytest.raises(EOFError):
        while time.monotonic() < deadline:  # bounded: the RST arrives at once on 127.0.0.1
            packetizer.write_all(b"y" * 1000)
            time.sleep(0.01)


SIGPIPE_SCRIPT = textwrap.dedent("""
    import signal, socket, sys, time
    sys.path.insert(0, {root!r})
    from paramiko_executor.connection import _TransportSocket
    kind = {{"socket": socket.socket, "transport": _TransportSocket}}[sys.argv[1]]
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as an application may set it
    with socket.create_server(("127.0.0.1", 0)) as listener:
        plain = socket.create_connection(listener.getsockname(), timeout=10)
        theirs, _ = listener.accept()
    ours = kind(plain.family, plain.type, plain.proto, fileno=plain.detach())
    ours.settimeout(0.1)
    theirs.close()
    for _ in range(200):
        try:
            ours.send(b"x" * 100)
        except OSError as exc:
            print(type(exc).__name__)
            break
        time.sleep(0.01)
""")


@posix_only
@pytest.mark.parametrize("sigpipe", ["SIG_DFL"])
def test_sigpipe_left_at_its_default_acts_on_write_as_on_send(sigpipe):
    """CPython's socket.send passes no MSG_NOSIGNAL, so with SIGPIPE at SIG_DFL a send to
    a closed peer kills the process; os.write does the same: neither is worse."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outcomes = {}
    for kind in ("socket", "transport"):
        done = subprocess.run([sys.executable, "-c", SIGPIPE_SCRIPT.format(root=root), kind],
                              capture_output=True, text=True, timeout=60)
        outcomes[kind] = (done.returncode, done.stdout.strip())
    assert outcomes["socket"] == outcomes["transport"]
    assert outcomes["socket"][0] == -signal.SIGPIPE


@posix_only
def test_sigpipe_ignored_by_python_gives_broken_pipe_on_write_as_on_send(pair):
    ours, theirs = pair
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    theirs.close()
    assert isinstance(_send_error(ours), (BrokenPipeError, ConnectionResetError))


@posix_only
def test_a_signal_while_the_send_waits_for_room_is_retried_not_raised(pair):
    """EINTR (a signal whose handler returns) in the wait for room: the send goes on."""
    ours, theirs = pair
    ours.settimeout(3)
    settled = False
    for _ in range(10000):  # fill the buffers: bounded by their size
        try:
            ours.setblocking(False)
            ours.send(b"z" * 65536)
        except BlockingIOError:
            if settled:
                break
            # Under load the kernel may still be moving sent data to the peer, which
            # makes room: wait until it has, then take that room too.
            select.select([], [ours], [], 0.3)
            settled = True
    ours.settimeout(3)
    fired: List[int] = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    theirs.settimeout(0.5)

    def drain() -> None:
        for _ in range(256):  # bounded: the buffers hold a few MiB
            try:
                theirs.recv(1 << 20)
            except OSError:
                return  # drained (timed out)

    reader = threading.Timer(0.5, drain)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        reader.start()
        assert ours.send(b"w" * 100) > 0  # in the main thread: the signal lands here
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        reader.join(10)
    assert fired


def _inject_at_send(sock: socket.socket,
                    act: Callable[[], None]) -> Callable[[Any, str, Any], None]:
    """A profiler for this thread running ``act`` once, where the send's descriptor is
    read (the write-first send's ``fileno``) or, for a plain socket, as its C ``send``
    starts: the last point before the system call at which another thread may run."""
    done: List[bool] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if done:
            return
        name = getattr(arg, "__name__", "")
        if (event == "c_return" and name == "fileno" and frame.f_code.co_name == "send") or (
                event == "c_call" and name == "send" and getattr(arg, "__self__", None) is sock):
            done.append(True)
            act()

    return profile


@posix_only
@pytest.mark.parametrize("kind", [socket.socket, _TransportSocket], ids=["socket", "transport"])
def test_a_descriptor_reused_after_a_close_during_the_send_gets_no_packet(kind):
    """Another thread closes the socket while a send is under way, and a descriptor opened
    meanwhile takes the freed number: the packet reaches the socket or fails, never that
    descriptor. (The write-first send read the number, then wrote to it: a close and an
    open between the two steps, where a GIL switch may land, sent an SSH packet into an
    unrelated file or connection; socket.send reads its descriptor in its C code.)"""
    ours, theirs = _pair(kind)
    read_end, write_end = os.pipe()
    number = ours.fileno()
    taken: List[int] = []

    def close_and_reuse() -> None:
        # Another thread closes the socket, and someone opens a descriptor, which takes
        # the lowest free number (made certain here with dup2).
        ours.close()
        taken.append(os.dup2(write_end, number))

    closer = threading.Thread(target=close_and_reuse)

    def run_closer() -> None:
        closer.start()
        closer.join(2.0)  # bounded: a close made to wait for the send is the fix at work

    sys.setprofile(_inject_at_send(ours, run_closer))
    try:
        try:
            ours.send(b"SSH-PACKET")
        except OSError as exc:
            assert exc.errno in (errno.EBADF, errno.EPIPE)  # closed, or shut down first
    finally:
        sys.setprofile(None)
        closer.join(10)
        for fd in taken:
            os.close(fd)
        os.close(write_end)
        theirs.close()
    assert taken == [number]
    os.set_blocking(read_end, False)
    try:
        leaked = os.read(read_end, 100)
    except BlockingIOError:
        leaked = b""
    finally:
        os.close(read_end)
    assert leaked == b""


# -- line pieces -------------------------------------------------------------------------------


def _pieces(encoding: Optional[str], chunks: List[bytes]) -> List[Any]:
    got: List[Any] = []
    splitter = LineSplitter("stdout", lambda _, piece: got.append(piece), encoding)
    for chunk in chunks:
        splitter.feed(chunk)
    splitter.finish()
    return got


def _chunked(data: bytes, rng: random.Random, most: int) -> List[bytes]:
    chunks, at = [], 0
    while at < len(data):
        size = rng.randint(1, most)
        chunks.append(data[at:at + size])
        at += size
    return chunks


@pytest.mark.parametrize("piece", [4, 5, 6, 9])
def test_bytes_pieces_of_random_utf8_and_garbage_join_exactly_and_cut_no_character(
        piece: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """4-byte characters, lone continuation bytes, invalid leads (0xF8-0xFF), overlong
    runs of continuations: pieces are never empty, join to the bytes, and where the
    bytes are valid UTF-8 each unterminated piece decodes on its own."""
    monkeypatch.setattr(output, "LINE_PIECE", piece)
    rng = random.Random(piece)
    alphabet = ["a", "\u00e9", "\u20ac", "\U0001F600", "\n"]
    for round_ in range(150):  # bounded
        valid = round_ % 2 == 0
        if valid:
            data = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))).encode()
        else:
            data = bytes(rng.choice([0x61, 0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0xF8, 0xFF, 0x0A])
                         for _ in range(rng.randint(0, 60)))
        got = _pieces(None, _chunked(data, rng, 12))
        assert b"".join(got) == data
        assert all(got)
        for part in got[:-1]:
            assert b"\n" not in part[:-1]
            if not part.endswith(b"\n"):
                assert abs(len(part) - piece) <= 3
                if valid:
                    part.decode("utf-8")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16-le", "gb18030"])
def test_str_pieces_are_exactly_line_piece_characters_with_no_surrogate_half(
        encoding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "LINE_PIECE", 3)
    rng = random.Random(encoding)
    text = "".join(rng.choice(["a", "\u00e9", "\U0001F600", "\u4e2d"]) for _ in range(200))
    data = text.encode(encoding)
    for _ in range(30):  # bounded
        got = _pieces(encoding, _chunked(data, rng, 7))
        assert "".join(got) == text
        assert all(len(part) == 3 for part in got[:-1])
        assert not any(0xD800 <= ord(c) <= 0xDFFF for part in got for c in part)


def test_a_piece_handed_on_keeps_memory_to_about_one_piece(monkeypatch: pytest.MonkeyPatch):
    """20 MiB of one unterminated line fed 64 KiB at a time: the splitter never holds
    more than a piece and a chunk."""
    splitter = LineSplitter("stdout", lambda _, piece: None, "utf-8")
    chunk = b"x" * 65536
    most = 0
    for _ in range(320):  # bounded: 20 MiB
        splitter.feed(chunk)
        most = max(most, splitter._pending)
    assert most < output.LINE_PIECE + len(chunk)


@pytest.mark.parametrize("encoding", ["utf-8", None])
def test_a_long_line_whose_end_comes_in_the_same_read_goes_out_in_pieces(
        encoding: Optional[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "LINE_PIECE", 4)
    data = b"x" * 12 + b"\n"
    later = _pieces(encoding, [data[:-1], data[-1:]])
    assert [len(part) for part in later] == [4, 4, 4, 1]  # the newline alone, last
    together = _pieces(encoding, [data])
    assert together == later


# -- the network event -------------------------------------------------------------------------


def test_no_wakeup_lost_between_an_owner_resetting_and_other_threads_setting():
    """The owner resets and waits (as a command's loop does); another thread sets once
    per round after the owner published the round: no wait runs to its bound."""
    event = _Wakeup(None)
    rounds = 2000
    asked = threading.Semaphore(0)
    stop = threading.Event()

    def setter() -> None:
        while not stop.is_set():
            if asked.acquire(timeout=0.5):
                event.set()

    thread = threading.Thread(target=setter)
    thread.start()
    try:
        for _ in range(rounds):  # bounded
            event.reset()
            assert not event.is_set()
            asked.release()
            assert event.wait(5.0)
            assert event.wait(0)  # waiting does not clear it
    finally:
        stop.set()
        thread.join(5)


def test_many_waiters_all_wake_on_one_set_and_a_set_event_stays_set():
    event = _NetworkEvent(None)
    woke: List[bool] = []
    threads = [threading.Thread(target=lambda: woke.append(event.wait(10))) for _ in range(16)]
    for thread in threads:
        thread.start()
    event.set()
    for thread in threads:
        thread.join(15)
    assert woke == [True] * 16
    assert event.is_set()
    event.clear()
    assert not event.is_set() and not event.wait(0.01)


def test_sets_racing_from_many_threads_never_raise_and_leave_it_set():
    for _ in range(50):  # bounded
        event = _NetworkEvent(None)
        barrier = threading.Barrier(8)
        errors: List[BaseException] = []

        def hit(event: _NetworkEvent = event, barrier: threading.Barrier = barrier,
                errors: List[BaseException] = errors) -> None:
            barrier.wait(5)
            try:
                for _ in range(100):
                    event.set()
            except BaseException as exc:  # pragma: no cover - the failure being looked for
                errors.append(exc)

        threads = [threading.Thread(target=hit) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert not errors and event.is_set()


# -- through real servers ----------------------------------------------------------------------

UPLOAD = 24 * 1024 * 1024


def _transport(ex: Any) -> Any:
    return ex._connection.link.transport


@posix_only
def test_a_connection_dropped_mid_upload_is_lost_and_the_upload_retried(make_test_server):
    """The server drops every connection while a command's stdin is being written: the
    failing write counts as a lost connection (EOFError from paramiko's packetizer), and
    the command runs again on a new connection, whole."""
    from helpers import outcome_within, wait_for

    from paramiko_executor import SSHExecutor

    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        first = _transport(ex)
        dropped = threading.Event()

        def drop_when_started() -> None:
            wait_for(lambda: "wc -c" in server.commands, "the upload to start")
            server.drop_connections()
            dropped.set()

        dropper = threading.Thread(target=drop_when_started)
        dropper.start()
        outcome = outcome_within(120, lambda: ex.run_command("wc -c", b"u" * UPLOAD))
        dropper.join(30)
        assert dropped.is_set()
        assert outcome["result"].stdout.strip() == str(UPLOAD)
        assert server.commands.count("wc -c") == 2
        assert _transport(ex) is not first


@posix_only
def test_the_keepalive_finds_a_frozen_peer_dead_while_an_upload_waits(make_test_server):
    """The server stops reading mid-upload (its socket buffers fill): the keepalive gives
    up on it, and the command runs again, whole, on a new connection."""
    from helpers import call_in_thread, wait_for

    from paramiko_executor import SSHExecutor

    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(keepalive_interval=0.3,
                                                  keepalive_count_max=3)) as ex:
        ex.run_command("true")
        first = _transport(ex)
        call = call_in_thread(lambda: ex.run_command("wc -c", b"k" * UPLOAD))
        wait_for(lambda: "wc -c" in server.commands, "the upload to start")
        server.freeze()
        try:
            wait_for(lambda: not first.is_active(), "the keepalive to give up")
        finally:
            server.thaw()
        call["thread"].join(120)
        assert not call["thread"].is_alive()
        assert call["result"].stdout.strip() == str(UPLOAD)
        assert server.commands.count("wc -c") == 2


@posix_only
def test_close_from_another_thread_mid_upload_ends_the_call_and_the_executor_reconnects(sshd):
    """``close()`` shuts the socket the command thread (and the transport thread) write
    to: the call fails as closed, never hangs, and the next command reconnects."""
    from helpers import call_in_thread

    from paramiko_executor import SSHExecutor
    from paramiko_executor.errors import ExecutorFailure

    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        first = _transport(ex)
        for _ in range(3):  # bounded: three closes, each mid-upload
            call = call_in_thread(
                lambda: ex.run_command("cat >/dev/null; echo ok", b"c" * (4 * UPLOAD)))
            deadline = time.monotonic() + 30
            while first.packetizer._Packetizer__sent_bytes < 4 * 1024 * 1024:  # bounded
                assert time.monotonic() < deadline
                time.sleep(0.005)
            ex.close()
            call["thread"].join(120)
            assert not call["thread"].is_alive()
            assert isinstance(call.get("error"), ExecutorFailure), call
            assert "closed" in str(call["error"])
            assert ex.run_command("echo again").stdout == "again\n"
            first = _transport(ex)


# -- Ctrl-C in the caller leading the connect --------------------------------------------------


def _interrupted(code: Any, call: Callable[[], Any], *, line: Optional[int] = None,
                 before: Callable[[], None] = lambda: None) -> Any:
    """``call`` in this thread, KeyboardInterrupt raised the first time ``code`` starts (or
    runs ``line``), after ``before``: Ctrl-C at that point, deterministically."""
    fired: List[bool] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if not fired and event == "line" and frame.f_lineno == line:
            fired.append(True)
            before()
            raise KeyboardInterrupt
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if fired or frame.f_code is not code:
            return None
        if line is None:
            fired.append(True)
            before()
            raise KeyboardInterrupt
        return local

    sys.settrace(tracer)
    try:
        return call()
    finally:
        sys.settrace(None)
        assert fired, "the interrupt never fired"


def test_ctrl_c_after_the_tcp_connect_and_ssh_handshake_leaves_no_transport_open(
        make_test_server) -> None:
    """Ctrl-C in a lone patient caller just as its connect made the transport (in
    ``Link(...)``, before ``_connect_once``'s cleanup covers it): the transport is closed,
    not left running with its thread and the server's connection."""
    from helpers import wait_for

    from paramiko_executor import SSHExecutor
    from paramiko_executor.connection import Link

    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        with pytest.raises(KeyboardInterrupt):
            _interrupted(Link.__init__.__code__, lambda: ex.run_command("true"))
        assert ex.statistics().connects == 0
        wait_for(lambda: server.active_connections == 0, "the interrupted try's connection "
                 "to be closed", timeout=10)
        assert ex.run_command("echo again").stdout == "again\n"
        assert ex.statistics().connects == 1


def test_ctrl_c_while_the_probe_is_claimed_leaves_no_claim_behind(make_test_server) -> None:
    """Ctrl-C in the caller leading the connect just after it claimed the MaxSessions probe
    of its server: the claim is released, so the next connect to that server (from any
    executor in the process) probes at once instead of waiting PROBE_TIMEOUT (30 s) for a
    probe nobody runs."""
    import inspect

    from helpers import outcome_within

    from paramiko_executor import SSHExecutor
    from paramiko_executor.connection import LIMITS, Connection

    code = Connection._connect_once.__code__
    lines, first = inspect.getsourcelines(code)
    line = first + next(n for n, text in enumerate(lines)
                        if text.strip() == "link.remembered = limit is not None")
    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        with pytest.raises(KeyboardInterrupt):
            _interrupted(code, lambda: ex.run_command("true"), line=line)
        try:
            assert not [key for key in LIMITS._probing if key[1] == server.port]
            outcome = outcome_within(60, lambda: ex.run_command("echo again"))
            assert outcome["result"].stdout == "again\n"
        finally:
            with LIMITS._lock:  # the other tests' servers must not wait for it either
                for key in [key for key in LIMITS._probing if key[1] == server.port]:
                    del LIMITS._probing[key]


def test_ctrl_c_in_the_leader_hands_the_connect_to_a_patient_caller_waiting(
        make_test_server) -> None:
    """The leader is interrupted after its transport came up; the patient caller that
    joined gets a connection made afresh, and only one connection stays (the interrupted
    try's is closed); statistics count one connect and no failure."""
    from helpers import call_in_thread, wait_for

    from paramiko_executor import SSHExecutor
    from paramiko_executor.connection import Link

    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        joined: List[Any] = []

        def when_joined() -> None:
            joined.append(call_in_thread(lambda: ex.run_command("echo joined")))
            wait_for(lambda: ex._connection._attempt is not None
                     and ex._connection._attempt.waiters == 2, "the second caller to join")

        with pytest.raises(KeyboardInterrupt):
            _interrupted(Link.__init__.__code__, lambda: ex.run_command("true"),
                         before=when_joined)
        other = joined[0]
        other["thread"].join(60)
        assert not other["thread"].is_alive()
        assert other["result"].stdout == "joined\n"
        stats = ex.statistics()
        assert (stats.connects, stats.connect_failures) == (1, 0)
        wait_for(lambda: server.active_connections == 1, "one connection left", timeout=10)
        assert server.connections_accepted == 2


def test_ctrl_c_as_the_probe_claim_is_registered_leaves_no_claim_behind(
        make_test_server) -> None:
    """Ctrl-C as get_or_claim's locked block that registered the claim lets go of the lock
    (CPython runs signal handlers after a C call such as that __exit__): the claim is
    released, not left for every later connect to that server to wait PROBE_TIMEOUT on."""
    from paramiko_executor import SSHExecutor
    from paramiko_executor.connection import LIMITS, ServerLimits

    code = ServerLimits.get_or_claim.__code__
    fired: List[bool] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if (not fired and event == "c_return" and frame.f_code is code
                and getattr(arg, "__name__", "") == "__exit__"
                and any(key[1] == server.port for key in LIMITS._probing)):
            fired.append(True)
            raise KeyboardInterrupt

    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        sys.setprofile(profile)
        try:
            with pytest.raises(KeyboardInterrupt):
                ex.run_command("true")
        finally:
            sys.setprofile(None)
        try:
            assert fired
            assert not [key for key in LIMITS._probing if key[1] == server.port]
        finally:
            with LIMITS._lock:
                for key in [key for key in LIMITS._probing if key[1] == server.port]:
                    del LIMITS._probing[key]


@posix_only
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_while_a_thread_holds_the_write_lock_leaves_the_child_free(make_test_server):
    """A thread of the parent is inside the write-first send (its lock held) when another
    forks: the child never touches the parent's socket, so it runs a command on a
    connection of its own, and closing the parent's socket object there (the write lock
    copied held, with no owner there) does not wait for it."""
    from helpers import reap

    from paramiko_executor import SSHExecutor

    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        sock = _transport(ex).sock
        assert isinstance(sock, _TransportSocket)
        inside, forked = threading.Event(), threading.Event()

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "c_call" and getattr(arg, "__name__", "") == "write" \
                    and frame.f_code is _TransportSocket.send.__code__:
                inside.set()
                forked.wait(30)

        def hold() -> None:
            sys.setprofile(profile)
            try:
                sock.send(b"")  # nothing written: the SSH stream is untouched
            finally:
                sys.setprofile(None)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert inside.wait(30)
            assert sock._write_lock.locked()
            pid = os.fork()
            if pid == 0:  # the child: only os._exit leaves it
                try:
                    ok = ex.run_command("echo child", timeout=20).stdout == "child\n"
                    sock.close()  # the parent's socket object, as a careless child might
                    os._exit(0 if ok else 1)
                except BaseException:
                    os._exit(2)
        finally:
            forked.set()
            holder.join(30)
        assert reap(pid, 60, "the child hung") == 0
        assert ex.run_command("echo parent").stdout == "parent\n"
