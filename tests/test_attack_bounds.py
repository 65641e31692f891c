"""Attacks on bounded waits (open_connection's timeout, a connect's deadline), ForwardedSocket.

Each test is a way to break them, against a real sshd (stopped and started
again: a server that is down, then back) or the project's test server
(frozen: a server that answers late), kept as a regression test.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import threading
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Set, Tuple

import pytest
from helpers import call_in_thread, outcome_within, reap, thread_stacks, wait_for
from test_tunnels import read_all

from paramiko_executor import ExecutorFailure, SSHExecutor
from paramiko_executor.tunnels import JOIN_TIMEOUT

#: A connect cycle lasting minutes (backoff 0.5, 1, 2, 4 ... s), so that one
#: reconnect shows as few failures and parallel cycles as many.
RETRIES: Dict[str, Any] = {"connect_retries": 9, "connect_backoff": 0.5}

#: The timeouts the bounded callers use: from far below one connect try to past it.
TIMEOUTS = (0.001, 0.01, 0.05, 0.2, 0.5, 1.0, 2.0)


#: The threads alive as the current test began: another test's, whatever they do.
_EARLIER: Set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _earlier_threads() -> Iterator[None]:
    _EARLIER.clear()
    _EARLIER.update(threading.enumerate())
    yield


def our_threads() -> List[threading.Thread]:
    """This test's threads of the library (another test's left over are not judged here)."""
    return [t for t in threading.enumerate()
            if t.name.startswith("paramiko_executor") and t not in _EARLIER]


def open_sockets() -> int:
    """This process's sockets (a restarted sshd's log pipe is no leak of ours)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # the listing's own descriptor, closed meanwhile
    return count


class Snapshot:
    """The threads and sockets of this process now, to see that a close left none behind."""

    def __init__(self) -> None:
        self.threads = set(threading.enumerate())
        self.sockets = open_sockets()

    def settled(self) -> bool:
        """Every thread started since has ended (paramiko's transports too), no socket left."""
        # paramiko's handshake timer (a Timer that only sets a flag) outlives a
        # transport closed mid-handshake by up to its timeout: not ours to end.
        new = [t for t in set(threading.enumerate()) - self.threads
               if not isinstance(t, threading.Timer)]
        return not new and open_sockets() <= self.sockets

    def left(self) -> str:
        """What keeps this snapshot from being settled, for a failure's message."""
        new = [t for t in set(threading.enumerate()) - self.threads
               if not isinstance(t, threading.Timer)]
        return f"sockets {open_sockets()} (were {self.sockets})\n" + thread_stacks(new)


def echo(sock: Any, payload: bytes) -> bytes:
    with sock:
        sock.settimeout(30)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


@pytest.fixture
def down(make_sshd: Any) -> Iterator[Tuple[Any, SSHExecutor]]:
    """An executor connected once to a real sshd, which is then stopped."""
    server = make_sshd(max_sessions=10)
    ex = SSHExecutor(**RETRIES, **server.executor_parameters())
    try:
        assert ex.run_command("echo up").stdout == "up\n"
        server.stop()
        yield server, ex
    finally:
        ex.close()


def bounded(ex: SSHExecutor, port: int, count: int, payload: bytes = b"",
            timeouts: Tuple[float, ...] = TIMEOUTS) -> List[Callable[[], Any]]:
    """``count`` opens with the ``timeouts`` in turn; each echoes ``payload`` if given."""
    def call(timeout: float) -> Callable[[], Any]:
        def open_one() -> Any:
            sock = ex.open_connection("127.0.0.1", port, timeout=timeout)
            return echo(sock, payload) if payload else sock
        return open_one
    return [call(timeouts[i % len(timeouts)]) for i in range(count)]


def start_all(calls: List[Callable[[], Any]]) -> List[Dict[str, Any]]:
    return [call_in_thread(call) for call in calls]


def join_all(outcomes: List[Dict[str, Any]], bound: float) -> None:
    deadline = time.monotonic() + bound
    for outcome in outcomes:
        outcome["thread"].join(max(0.0, deadline - time.monotonic()))
    stuck = sum(outcome["thread"].is_alive() for outcome in outcomes)
    assert not stuck, f"{stuck} callers still waiting after {bound} s"


# --- many threads, one reconnect ---------------------------------------------------------


def test_a_hundred_callers_with_and_without_deadlines_share_one_reconnect(
        down: Any, make_backend: Any) -> None:
    """Callers without a deadline get the real outcome; the bounded ones time out or share it.

    The connect is never abandoned while an unbounded caller waits: one
    connect cycle (a few failures while the server is down, then one login),
    not one per caller that gave up.
    """
    server, ex = down
    backend = make_backend("echo")
    before = Snapshot()
    unbounded = start_all(
        [lambda: echo(ex.open_connection("127.0.0.1", backend.port), b"u") for _ in range(20)]
        + [lambda: ex.run_command("echo c").stdout for _ in range(10)])
    wait_for(lambda: ex.statistics().connect_failures >= 1, "the reconnect to begin")
    opens = start_all(bounded(ex, backend.port, 100, b"b"))
    wait_for(lambda: ex.statistics().connect_failures >= 2, "a retry")
    server.start()
    join_all(unbounded + opens, 60)
    for outcome in unbounded:
        assert outcome.get("result") in (b"u", "c\n"), outcome
    timed_out = 0
    for outcome in opens:
        if "error" in outcome:
            error = outcome["error"]
            assert isinstance(error, ExecutorFailure) and "timed out" in str(error), outcome
            timed_out += 1
        else:
            assert outcome["result"] == b"b"
    assert timed_out >= 100 * 3 // len(TIMEOUTS)  # those far below the first retry's backoff
    stats = ex.statistics()
    assert (stats.connects, stats.reconnects) == (2, 1), stats
    # One cycle: the failures until the server came back, at most one more.
    assert stats.connect_failures <= 4, stats
    ex.close()
    wait_for(before.settled, "threads and descriptors to be back", timeout=15, explain=before.left)


def test_bounded_callers_alone_leave_no_connect_behind_and_a_later_caller_connects(
        down: Any, make_backend: Any) -> None:
    """Every caller gave up: the connect ends before its next retry; the next one starts anew."""
    server, ex = down
    backend = make_backend("echo")
    opens = start_all(bounded(ex, backend.port, 100, timeouts=TIMEOUTS[:4]))
    join_all(opens, 30)
    assert all(isinstance(o.get("error"), ExecutorFailure) for o in opens)
    wait_for(lambda: not our_threads(), "the abandoned connect to end", timeout=10,
             explain=lambda: thread_stacks(our_threads()))
    failures = ex.statistics().connect_failures
    # A few cycles at most: each ends at its first failure once nobody waits.
    assert 1 <= failures <= 20, failures
    server.start()
    assert echo(ex.open_connection("127.0.0.1", backend.port, timeout=30), b"x") == b"x"
    assert ex.statistics().reconnects == 1


def test_refused_authentication_reaches_every_caller_and_is_not_retried(
        make_sshd: Any, make_backend: Any) -> None:
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    params = server.executor_parameters(username="nobody-here")
    with SSHExecutor(**RETRIES, **params) as ex:
        outcomes = start_all(
            [lambda: ex.open_connection("127.0.0.1", backend.port) for _ in range(10)]
            + bounded(ex, backend.port, 50))
        join_all(outcomes, 60)
        kinds = {type(o.get("error")).__name__ for o in outcomes[:10]}
        assert kinds == {"AuthenticationFailure"}, outcomes[:10]
        for outcome in outcomes[10:]:
            error = outcome.get("error")
            assert isinstance(error, ExecutorFailure), outcome
            assert type(error).__name__ == "AuthenticationFailure" or "timed out" in str(error)
        stats = ex.statistics()
        assert stats.connects == 0 and 1 <= stats.connect_failures <= 60, stats


# --- a server that answers late ------------------------------------------------------------


def test_a_frozen_server_bounded_callers_time_out_unbounded_ones_get_the_login(
        make_test_server: Any, make_backend: Any) -> None:
    server = make_test_server()
    backend = make_backend("echo")
    server.freeze()
    with SSHExecutor(**RETRIES, **server.executor_parameters()) as ex:
        unbounded = start_all([lambda: ex.run_command("echo c").stdout for _ in range(5)])
        opens = start_all(bounded(ex, backend.port, 50, timeouts=TIMEOUTS[:5]))
        join_all(opens, 30)
        assert all("timed out" in str(o.get("error")) for o in opens), opens
        server.thaw()
        join_all(unbounded, 60)
        assert all(o.get("result") == "c\n" for o in unbounded), unbounded
        stats = ex.statistics()
        assert (stats.connects, stats.connect_failures) == (1, 0), stats
        assert server.logins == 1


# --- close at any moment ------------------------------------------------------------------------


@pytest.mark.parametrize("moment", [0.0, 0.001, 0.05, 0.3, 0.7, 1.6])
def test_close_at_any_moment_of_a_reconnect_ends_every_caller(
        down: Any, make_backend: Any, moment: float) -> None:
    """Whenever close() comes (during a try, in a backoff), every caller ends at once."""
    _, ex = down
    backend = make_backend("echo")
    before = Snapshot()
    tunnel = ex.forward_local(backend.port, "127.0.0.1")
    clients = [socket.create_connection(tunnel.local_address, timeout=30) for _ in range(3)]
    outcomes = start_all(
        [lambda: ex.run_command("echo c") for _ in range(5)]
        + [lambda: ex.open_connection("127.0.0.1", backend.port) for _ in range(5)]
        + bounded(ex, backend.port, 30))
    time.sleep(moment)  # where the close lands; every moment must give the same outcome
    # The tunnel first, alone: its clients' opens wait for the connect, which goes on.
    outcome_within(JOIN_TIMEOUT / 2, tunnel.close)
    for client in clients:
        with pytest.raises(OSError):  # reset, never an empty answer
            read_all(client)
        client.close()
    closing = [call_in_thread(tunnel.close), call_in_thread(ex.close)]  # and both again
    join_all(outcomes, 10)
    join_all(closing, 15)
    for outcome in outcomes:
        assert isinstance(outcome.get("error"), ExecutorFailure), outcome
    wait_for(before.settled, "threads and descriptors to be back", timeout=15, explain=before.left)


# --- run_command beside bounded opens ---------------------------------------------------------


def test_commands_keep_their_retries_beside_bounded_opens_on_a_dropping_server(
        make_test_server: Any, make_backend: Any) -> None:
    server = make_test_server()
    backend = make_backend("echo")
    with SSHExecutor(**RETRIES, **server.executor_parameters()) as ex:
        assert ex.run_command("echo up").stdout == "up\n"
        # Long enough to be running still when the drop comes after the 30 opens started,
        # however loaded the machine: each one is then retried.
        commands = start_all([lambda: ex.run_command("sleep 2; echo c").stdout
                              for _ in range(8)])
        wait_for(lambda: len(server.commands) >= 9, "the commands to run")
        opens = start_all(bounded(ex, backend.port, 30, b"o"))
        server.drop_connections()
        join_all(commands + opens, 60)
        assert all(o.get("result") == "c\n" for o in commands), commands
        for outcome in opens:
            # Done, timed out, or cut by the drop (a reset, never a short answer).
            assert outcome.get("result") == b"o" or isinstance(
                outcome.get("error"), (ExecutorFailure, ConnectionResetError)), outcome
        stats = ex.statistics()
        assert stats.commands_retried == 8 and stats.reconnects == 1, stats


# --- fork while a connect runs in the background ------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_connects_itself_while_the_parents_connect_thread_backs_off(
        down: Any, make_backend: Any) -> None:
    """The child must not join (and wait for ever on) the parent's attempt: no thread runs it."""
    server, ex = down
    backend = make_backend("echo")
    # A bounded caller leads: the connect runs in a thread of its own ...
    bounded = call_in_thread(lambda: ex.open_connection("127.0.0.1", backend.port, timeout=1))
    wait_for(lambda: ex.statistics().connect_failures >= 1, "the connect to begin")
    # ... which an unbounded caller keeps going after the bounded one gave up.
    keeper = call_in_thread(lambda: ex.run_command("echo parent").stdout)
    bounded["thread"].join(10)
    assert "timed out" in str(bounded.get("error")), bounded
    assert any(t.name.startswith("paramiko_executor connect") for t in our_threads())
    server.start()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with ex.open_connection("127.0.0.1", backend.port, timeout=20) as sock:
                code = 0 if echo(sock, b"child") == b"child" else 2
        finally:
            os._exit(code)
    assert reap(pid, 30, "the child waited on the parent's connect") == 0
    keeper["thread"].join(30)
    assert keeper.get("result") == "parent\n", keeper


# --- ForwardedSocket against socket.socket -----------------------------------------------------


class _Model:
    """What an echo peer has yet to send back; decides which calls are safe to make."""

    def __init__(self) -> None:
        self.pending = 0
        self.shut = False
        self.closed = False
        self.timeout: Any = None


def _apply(sock: Any, op: str, model: _Model) -> str:
    """Run ``op`` on ``sock``; its outcome as a word: a result's kind or the exception's type."""
    try:
        if op in ("recv", "recv_into") and not model.closed and (model.pending or model.shut):
            # Wait until the echo came back (or its EOF): then the outcome is certain.
            assert select.select([sock], [], [], 10)[0], "no echo within 10 s"
        if op == "send":
            return f"sent {sock.send(b'abc')}"
        if op == "sendall":
            return repr(sock.sendall(b"abcd"))
        if op == "recv":
            data = sock.recv(2)
            return "eof" if data == b"" else f"data {len(data)}"
        if op == "recv_into":
            return f"into {sock.recv_into(bytearray(2))}"
        if op == "timeout 0":
            return repr(sock.settimeout(0))
        if op == "timeout 0.2":
            return repr(sock.settimeout(0.2))
        if op == "nonblocking":
            return repr(sock.setblocking(False))
        if op == "shut_wr":
            return repr(sock.shutdown(socket.SHUT_WR))
        if op == "close":
            return repr(sock.close())
        if op == "fileno":
            return "fd" if sock.fileno() >= 0 else "-1"
        if op == "gettimeout":
            return repr(sock.gettimeout()) if not model.closed else "skip"
        raise AssertionError(op)
    except Exception as exc:  # the outcome compared
        return type(exc).__name__


def _advance(model: _Model, op: str, outcome: str) -> None:
    if outcome.startswith("sent "):
        model.pending += int(outcome.split()[1])
    elif outcome == "None" and op == "sendall":
        model.pending += 4
    elif outcome.startswith(("data ", "into ")):
        model.pending -= int(outcome.split()[1])
    elif op == "shut_wr" and outcome == "None":
        model.shut = True
    elif op == "close":
        model.closed = True


OPS = ("send", "sendall", "recv", "recv_into", "timeout 0", "timeout 0.2", "nonblocking",
       "shut_wr", "close", "fileno", "gettimeout")


def _sequences(count: int, length: int) -> Iterator[List[str]]:
    import random
    rng = random.Random(20261207)
    fixed = [["shut_wr", "send"], ["shut_wr", "sendall"], ["shut_wr", "recv", "recv"],
             ["sendall", "shut_wr", "recv", "recv", "recv"], ["close", "close", "recv"],
             ["close", "fileno", "send"], ["timeout 0", "recv"], ["nonblocking", "recv_into"],
             ["timeout 0.2", "recv"], ["send", "timeout 0", "recv", "recv", "recv"]]
    yield from fixed
    for _ in range(count - len(fixed)):
        yield [rng.choice(OPS) for _ in range(length)]


def test_a_forwarded_socket_answers_as_a_socket_for_the_same_calls(sshd: Any,
                                                                   make_backend: Any) -> None:
    """Differential: each sequence of calls on a real socket and on a forwarded one to the same
    echo server gives the same results and the same exception types."""
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        for ops in _sequences(60, 8):
            real = socket.create_connection(("127.0.0.1", backend.port), timeout=None)
            ours = ex.open_connection("127.0.0.1", backend.port)
            models = (_Model(), _Model())
            theirs: List[str] = []
            mine: List[str] = []
            try:
                for op in ops:
                    if op in ("recv", "recv_into") and any(
                            not m.closed and not (m.pending or m.shut) and m.timeout is None
                            for m in models):
                        op = "timeout 0.2"  # a blocking read of nothing would never end
                    if op == "shut_wr" and models[0].shut:
                        continue  # a socket's answer depends on whether the peer closed yet
                    for sock, model, seen in ((real, models[0], theirs), (ours, models[1], mine)):
                        outcome = _apply(sock, op, model)
                        _advance(model, op, outcome)
                        # How much a read returns depends on how the echo came back.
                        seen.append(outcome.split()[0])
                        if op.startswith("timeout") or op == "nonblocking":
                            model.timeout = sock.gettimeout()
                    assert mine == theirs, (ops, theirs, mine)
            finally:
                real.close()
                ours.close()


def test_sending_on_a_lost_connection_raises_a_reset_not_eoferror(
        make_test_server: Any, make_backend: Any) -> None:
    """paramiko's EOFError used to escape sendall: http.client and the like catch OSError."""
    server = make_test_server()
    backend = make_backend("echo")
    with SSHExecutor(**server.executor_parameters()) as ex:
        with ex.open_connection("127.0.0.1", backend.port, timeout=10) as sock:
            assert echo_some(sock, b"x") == b"x"
            # The connection breaks under the write, before paramiko's thread notices.
            sock.channel.get_transport().sock.shutdown(socket.SHUT_WR)
            with pytest.raises(ConnectionResetError):
                sock.sendall(b"y")
        with ex.open_connection("127.0.0.1", backend.port, timeout=10) as sock:
            server.drop_connections()
            wait_for(lambda: not sock.channel.get_transport().is_active(), "the loss")
            with pytest.raises(ConnectionResetError):  # was a bare OSError
                sock.sendall(b"y")
            with pytest.raises(ConnectionResetError):
                sock.send(b"y")


def echo_some(sock: Any, payload: bytes) -> bytes:
    sock.sendall(payload)
    return bytes(sock.recv(len(payload)))


def test_a_forwarded_socket_shut_for_writing_raises_broken_pipe_not_a_silent_zero(
        sshd: Any, make_backend: Any) -> None:
    """send returned 0 for ever: a makefile writer's flush spun at full CPU."""
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        with ex.open_connection("127.0.0.1", backend.port, timeout=10) as sock, \
                sock.makefile("wb") as stream:
            sock.shutdown(socket.SHUT_WR)
            with pytest.raises(BrokenPipeError):
                sock.send(b"x")
            stream.write(b"x")
            outcome = outcome_within(10, stream.flush)
            assert isinstance(outcome.get("error"), BrokenPipeError), outcome
            stream.close = lambda: None  # type: ignore[method-assign]  # its buffer can't go


def test_shut_for_reading_a_forwarded_socket_reads_the_end_at_once(sshd: Any,
                                                                   make_backend: Any) -> None:
    """As a socket's: b"" at once, where it waited for data (for ever without a timeout)."""
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        with ex.open_connection("127.0.0.1", backend.port) as sock:
            sock.shutdown(socket.SHUT_RD)
            assert outcome_within(5, lambda: sock.recv(1)) == {"result": b""}
            assert select.select([sock], [], [], 5)[0] == [sock]


def test_recv_into_a_read_only_buffer_is_refused_before_reading(sshd: Any,
                                                                make_backend: Any) -> None:
    """It read (waiting for data, for ever without a timeout), then lost what it read."""
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        with ex.open_connection("127.0.0.1", backend.port) as sock:
            sock.sendall(b"ab")
            outcome = outcome_within(5, lambda: sock.recv_into(b"xx"))
            assert isinstance(outcome.get("error"), TypeError), outcome
            assert "buffer" in str(outcome["error"])
            assert select.select([sock], [], [], 10)[0]
            assert sock.recv(2) == b"ab"  # nothing lost


# --- opens their callers left, under a small max_forwarded ------------------------------------


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("max_forwarded", [1, 2])
def test_opens_left_on_a_late_server_give_their_places_back_once(
        make_test_server: Any, make_backend: Any, max_forwarded: int) -> None:
    server = make_test_server()
    backend = make_backend("echo")
    with SSHExecutor(max_forwarded=max_forwarded, **server.executor_parameters()) as ex:
        assert ex.run_command("echo up").stdout == "up\n"
        limit = ex._forwarding.limit
        server.freeze()
        try:
            opens = start_all(bounded(ex, backend.port, 40, timeouts=TIMEOUTS[:5]))
            join_all(opens, 30)
            assert all("timed out" in str(o.get("error")) for o in opens), opens
            # Each open sent holds its place while the server may still answer it.
            assert limit.used == max_forwarded
        finally:
            server.thaw()
        wait_for(lambda: limit.used == 0, "the late opens to give their places back")
        wait_for(lambda: backend.connected == 0, "the late channels to be closed")
        assert backend.accepted == max_forwarded  # no open past the cap reached the server
        # Not starved: every place serves again, all at once.
        held = [ex.open_connection("127.0.0.1", backend.port, timeout=10)
                for _ in range(max_forwarded)]
        assert limit.used == max_forwarded
        for sock in held:
            assert echo(sock, b"again") == b"again"
        assert limit.used == 0


def test_closing_the_executor_frees_the_places_of_opens_left_on_a_frozen_server(
        make_test_server: Any, make_backend: Any) -> None:
    server = make_test_server()
    backend = make_backend("echo")
    before = Snapshot()
    ex = SSHExecutor(max_forwarded=1, **server.executor_parameters())
    try:
        assert ex.run_command("echo up").stdout == "up\n"
        server.freeze()
        with pytest.raises(ExecutorFailure, match="timed out"):
            ex.open_connection("127.0.0.1", backend.port, timeout=0.05)
        assert any(t.name == "paramiko_executor tunnel open" for t in our_threads())
        outcome_within(15, ex.close)
        wait_for(lambda: not our_threads(), "the open's thread to end", timeout=15,
             explain=lambda: thread_stacks(our_threads()))
        assert ex._forwarding.limit.used == 0
    finally:
        server.thaw()
        ex.close()
    # The test server's end of the connection goes once it runs again.
    wait_for(before.settled, "the connection's sockets to be closed", timeout=15,
             explain=before.left)


# --- a bounded caller interrupted ----------------------------------------------------------------


def test_a_bounded_caller_interrupted_while_waiting_no_longer_keeps_the_connect_going(
        down: Any, make_backend: Any) -> None:
    """Ctrl-C in open_connection left it counted as waiting: minutes of retries for no one."""
    _, ex = down
    backend = make_backend("echo")
    assert threading.current_thread() is threading.main_thread()

    def interrupt() -> None:
        wait_for(lambda: ex.statistics().connect_failures >= 1, "the connect to fail once")
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt)
    # Python's own handler, even when the suite was started with SIGINT ignored (as a
    # background job of a non-interactive shell is): the signal must become the interrupt.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            ex.open_connection("127.0.0.1", backend.port, timeout=60)
    finally:
        interrupter.join(30)
        signal.signal(signal.SIGINT, previous)
    # Its next retry would be 1 s later, then 2, 4 ...: it ends at the next one at the latest.
    wait_for(lambda: not our_threads(), "the connect nobody waits for to end", timeout=5,
             explain=lambda: thread_stacks(our_threads()))
    assert ex._forwarding.limit.used == 0



# --- a forwarded socket dropped unclosed ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_socket_dropped_unclosed_frees_its_place_when_resource_warnings_are_errors(
        sshd: Any, make_backend: Any) -> None:
    """With ``-W error`` the finalizer's warning raised before the close: place lost for good."""
    backend = make_backend("echo")
    with SSHExecutor(max_forwarded=1, **sshd.executor_parameters()) as ex:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            sock = ex.open_connection("127.0.0.1", backend.port, timeout=10)
            sock.fileno()  # paramiko's pipe: two more descriptors to give back
            del sock
            gc.collect()
        assert ex._forwarding.limit.used == 0
        wait_for(lambda: backend.connected == 0, "the dropped channel to be closed")
        assert echo(ex.open_connection("127.0.0.1", backend.port, timeout=10), b"x") == b"x"


@pytest.mark.parametrize("moment", [0.0, 0.05, 0.5])
def test_close_during_a_login_to_a_frozen_server_ends_every_caller_at_once(
        make_test_server: Any, make_backend: Any, moment: float) -> None:
    """The connect thread a bounded caller left is cut mid-handshake, not waited for."""
    server = make_test_server()
    backend = make_backend("echo")
    before = Snapshot()
    server.freeze()
    ex = SSHExecutor(**RETRIES, **server.executor_parameters())
    try:
        opens = start_all(bounded(ex, backend.port, 20, timeouts=TIMEOUTS[:3]))
        join_all(opens, 10)
        unbounded = start_all([lambda: ex.run_command("echo c") for _ in range(3)])
        time.sleep(moment)  # where the close lands; every moment must give the same outcome
        outcome_within(5, ex.close)
        join_all(unbounded, 5)
        for outcome in opens + unbounded:
            assert isinstance(outcome.get("error"), ExecutorFailure), outcome
        wait_for(lambda: not our_threads(), "the connect thread to end", timeout=5,
             explain=lambda: thread_stacks(our_threads()))
        assert ex.statistics().connects == 0
    finally:
        server.thaw()
        ex.close()
    wait_for(before.settled, "the sockets to be closed", timeout=15, explain=before.left)


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_an_open_whose_write_finds_the_connection_broken_reconnects(
        make_test_server: Any, make_backend: Any, timeout: Any) -> None:
    """paramiko's EOFError on the open's write, before its thread has seen the loss: the
    transport still looked alive, and the open failed instead of going to a new connection."""
    server = make_test_server()
    backend = make_backend("echo")
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("echo up").stdout == "up\n"
        link = ex._connection.link
        assert link is not None
        link.transport.sock.shutdown(socket.SHUT_WR)  # the next write fails
        sock = ex.open_connection("127.0.0.1", backend.port, timeout=timeout)
        assert echo(sock, b"through") == b"through"
        assert ex.statistics().reconnects == 1


def test_a_host_down_for_a_whole_cycle_costs_one_cycle_shared_by_every_unbounded_caller(
        make_sshd: Any, make_backend: Any) -> None:
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    ex = SSHExecutor(connect_retries=2, connect_backoff=0.3, **server.executor_parameters())
    with ex:
        assert ex.run_command("echo up").stdout == "up\n"
        server.stop()
        unbounded = start_all(
            [lambda: ex.open_connection("127.0.0.1", backend.port) for _ in range(10)]
            + [lambda: ex.run_command("echo c") for _ in range(10)])
        wait_for(lambda: ex.statistics().connect_failures >= 1, "the reconnect to begin")
        opens = start_all(bounded(ex, backend.port, 50, timeouts=TIMEOUTS[:3]))
        join_all(unbounded + opens, 30)
        texts = {str(o.get("error")) for o in unbounded}
        assert len(texts) == 1 and "after 3 attempts" in texts.pop(), unbounded
        assert all("timed out" in str(o.get("error")) for o in opens), opens
        assert ex.statistics().connect_failures == 3  # one cycle: 1 + 2 retries
