"""Attacks on bounded waits (open_connection's timeout, a connect's deadline), ForwardedSocket.

Each test is a way to break them, against a real sshd (stopped and started
again: a server that is down, then back) or the project's test server
(frozen: a server that answers late), kept as a regression test.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from helpers import call_in_thread, wait_for
from test_tunnels import read_all

from paramiko_executor import ExecutorFailure, SSHExecutor

#: A connect cycle lasting minutes (backoff 0.5, 1, 2, 4 ... s), so that one
#: reconnect shows as few failures and parallel cycles as many.
RETRIES: Dict[str, Any] = {"connect_retries": 9, "connect_backoff": 0.5}

#: The timeouts the bounded callers use: from far below one connect try to past it.
TIMEOUTS = (0.001, 0.01, 0.05, 0.2, 0.5, 1.0, 2.0)


def our_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("paramiko_executor")]


def open_sockets() -> int:
    """This process's sockets (a restarted sshd's log pipe is no leak of ours)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # the listing's own descriptor, closed meanwhile
    return count


def settled(before: int) -> Callable[[], bool]:
    """No thread of the executor left, and the sockets back to ``before``."""
    return lambda: not our_threads() and open_sockets() <= before


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
    fds = open_sockets()
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
    wait_for(settled(fds), "threads and descriptors to be back", timeout=15)


def test_bounded_callers_alone_leave_no_connect_behind_and_a_later_caller_connects(
        down: Any, make_backend: Any) -> None:
    """Every caller gave up: the connect ends before its next retry; the next one starts anew."""
    server, ex = down
    backend = make_backend("echo")
    opens = start_all(bounded(ex, backend.port, 100, timeouts=TIMEOUTS[:4]))
    join_all(opens, 30)
    assert all(isinstance(o.get("error"), ExecutorFailure) for o in opens)
    wait_for(lambda: not our_threads(), "the abandoned connect to end", timeout=10)
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
    fds = open_sockets()
    tunnel = ex.forward_local(backend.port, "127.0.0.1")
    clients = [socket.create_connection(tunnel.local_address, timeout=30) for _ in range(3)]
    outcomes = start_all(
        [lambda: ex.run_command("echo c") for _ in range(5)]
        + [lambda: ex.open_connection("127.0.0.1", backend.port) for _ in range(5)]
        + bounded(ex, backend.port, 30))
    time.sleep(moment)  # where the close lands; every moment must give the same outcome
    closing = [call_in_thread(tunnel.close), call_in_thread(ex.close)]
    join_all(outcomes, 10)
    join_all(closing, 15)
    for outcome in outcomes:
        assert isinstance(outcome.get("error"), ExecutorFailure), outcome
    for client in clients:
        with pytest.raises(OSError):  # reset, never an empty answer
            read_all(client)
        client.close()
    wait_for(settled(fds), "threads and descriptors to be back", timeout=15)


# --- run_command beside bounded opens ---------------------------------------------------------


def test_commands_keep_their_retries_beside_bounded_opens_on_a_dropping_server(
        make_test_server: Any, make_backend: Any) -> None:
    server = make_test_server()
    backend = make_backend("echo")
    with SSHExecutor(**RETRIES, **server.executor_parameters()) as ex:
        assert ex.run_command("echo up").stdout == "up\n"
        commands = start_all([lambda: ex.run_command("sleep 0.3; echo c").stdout
                              for _ in range(8)])
        wait_for(lambda: ex.statistics().open_channels >= 8, "the commands to run")
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
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the child waited on the parent's connect")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    keeper["thread"].join(30)
    assert keeper.get("result") == "parent\n", keeper
