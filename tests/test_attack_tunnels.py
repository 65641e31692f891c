"""Attacks on the tunnels (issue 22): each test is a way they broke, kept as a regression test."""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import socket
import struct
import threading
import time
from typing import Any, List

import pytest
from helpers import wait_for
from test_tunnels import echo_once

from paramiko_executor import ExecutorFailure, SSHExecutor
from paramiko_executor.tunnels import JOIN_TIMEOUT, RECONNECT_PAUSE


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (RST), as a crashed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_that_resets_frees_its_forward_while_the_target_is_idle(
        sshd: Any, make_backend: Any) -> None:
    """A client reset ends the forwarded connection even when the target has nothing to say.

    The pipe used to stop only its upward direction on the reset, and the
    other kept waiting for the target, which (an echo server waiting for
    input) never speaks: thread, channel and place under max_forwarded held
    for good, so two such clients stopped a max_forwarded=2 tunnel forever.
    """
    backend = make_backend("echo")
    with SSHExecutor(max_forwarded=2, **sshd.executor_parameters()) as ex, \
            ex.forward_local(backend.port, "127.0.0.1") as tunnel:
        for _ in range(2):
            client = socket.create_connection(tunnel.local_address, timeout=30)
            client.sendall(b"x")
            assert client.recv(1) == b"x"
            reset(client)
        wait_for(lambda: tunnel.connections == 0, "the reset connections to end", timeout=10)
        wait_for(lambda: backend.connected == 0, "the target to see the end", timeout=10)
        assert echo_once(tunnel.local_address, b"next", timeout=10) == b"next"



def test_a_forwarded_socket_used_after_close_raises(sshd: Any, make_backend: Any) -> None:
    """As a closed socket: recv, send and shutdown raise, never an empty read that looks done."""
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        sock = ex.open_connection("127.0.0.1", backend.port, timeout=10)
        sock.close()
        for use in (lambda: sock.recv(1), lambda: sock.sendall(b"x"),
                    lambda: sock.shutdown(socket.SHUT_WR)):
            with pytest.raises(OSError, match="closed"):
                use()


def test_a_recv_cut_by_the_executors_close_is_an_error_not_an_end(sshd: Any, make_backend: Any
                                                                   ) -> None:
    """A reader blocked in recv when the executor closes hears an error, not b"" (an EOF)."""
    backend = make_backend("echo")
    ex = SSHExecutor(**sshd.executor_parameters())
    sock = ex.open_connection("127.0.0.1", backend.port, timeout=10)
    outcome: List[Any] = []

    def read() -> None:
        try:
            outcome.append(sock.recv(1))
        except OSError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        # The reader may reach recv after close (an error too): no wait needed for it.
        ex.close()
    finally:
        reader.join(10)
    assert not reader.is_alive()
    assert isinstance(outcome[0], OSError), outcome


def test_a_forked_child_closing_its_executor_leaves_the_parents_tunnel(
        sshd: Any, make_backend: Any) -> None:
    """The child's close() used to wake the parent's listening thread (a shared socketpair)."""
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(backend.port, "127.0.0.1") as tunnel:
        assert echo_once(tunnel.local_address, b"before", timeout=10) == b"before"
        pid = os.fork()
        if pid == 0:  # the child: nothing but the close, then out
            try:
                tunnel.close()
                ex.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert echo_once(tunnel.local_address, b"after", timeout=10) == b"after"


def test_a_forked_child_holds_none_of_the_parents_tunnel_sockets(sshd: Any, make_backend: Any
                                                                 ) -> None:
    """While a child lives, closing the tunnel still resets its clients and frees its port.

    The child's copies of the listener and of the clients' sockets kept both
    open: a client waited for an end that never came, and a new client was
    accepted into a backlog nobody served.
    """
    backend = make_backend("echo")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        tunnel = ex.forward_local(backend.port, "127.0.0.1")
        client = socket.create_connection(tunnel.local_address, timeout=10)
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        read_end, write_end = os.pipe()
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child says it runs (past the fork hooks), and lives on till told
            os.write(ready_write, b"r")
            os.read(read_end, 1)
            os._exit(0)
        try:
            assert os.read(ready_read, 1) == b"r"
            tunnel.close()
            client.settimeout(10)
            with pytest.raises(ConnectionResetError):
                client.recv(1)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(tunnel.local_address, timeout=10)
        finally:
            client.close()
            os.write(write_end, b"x")
            os.waitpid(pid, 0)
            for fd in (read_end, write_end, ready_read, ready_write):
                os.close(fd)



def test_a_listener_out_of_descriptors_waits_instead_of_ending(sshd: Any, make_backend: Any,
                                                               caplog: Any) -> None:
    """EMFILE from accept is a passing shortage: the client waits, the tunnel goes on.

    It used to end the listening thread and close the listener for good,
    while the tunnel still said it was open.
    """
    backend = make_backend("echo")
    caplog.set_level(logging.WARNING, logger="paramiko_executor.tunnels")
    with SSHExecutor(**sshd.executor_parameters()) as ex, \
            ex.forward_local(backend.port, "127.0.0.1") as tunnel:
        assert echo_once(tunnel.local_address, b"a", timeout=10) == b"a"
        client = socket.socket()
        client.settimeout(10)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.dup(0)
        os.close(lowest_free)
        # No descriptor left for the process, until the listener said it met the shortage.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            client.connect(tunnel.local_address)
            wait_for(lambda: any("cannot accept" in r.getMessage() or "no longer" in
                                 r.getMessage() for r in caplog.records),
                     "the listener to meet the shortage", timeout=10)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        with client:
            client.sendall(b"b")
            assert client.recv(1) == b"b"
        assert echo_once(tunnel.local_address, b"c", timeout=10) == b"c"



def test_an_open_connection_waiting_under_the_cap_fails_with_the_executors_close(
        sshd: Any, make_backend: Any) -> None:
    """close() ends a wait for a place under max_forwarded; it used to take the freed place
    and connect again, handing back a socket on a connection opened after close()."""
    backend = make_backend("echo")
    ex = SSHExecutor(max_forwarded=1, **sshd.executor_parameters())
    first = ex.open_connection("127.0.0.1", backend.port, timeout=10)
    outcome: List[Any] = []

    def wait() -> None:
        try:
            outcome.append(ex.open_connection("127.0.0.1", backend.port))
        except ExecutorFailure as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        wait_for(lambda: len(ex._forwarding.limit._queue) == 1, "the open to wait its turn")
        ex.close()
    finally:
        waiter.join(10)
    assert not waiter.is_alive()
    assert isinstance(outcome[0], ExecutorFailure), outcome
    assert "closed" in str(outcome[0])
    assert ex.statistics().connects == 1
    assert first.closed


def test_close_during_a_forward_open_does_not_connect_again(make_test_server: Any,
                                                            make_backend: Any) -> None:
    """A client's open in flight at the executor's close() is not retried on a new connection.

    The open failed with the closed connection and was retried as for a lost
    one: a thread connected again after close() returned (here to a server
    that does not answer, so it outlived close() and its join).
    """
    server = make_test_server()
    backend = make_backend("echo")
    ex = SSHExecutor(connect_retries=0, **server.executor_parameters())
    tunnel = ex.forward_local(backend.port, "127.0.0.1")
    assert echo_once(tunnel.local_address, b"a", timeout=10) == b"a"
    wait_for(lambda: not tunnel._threads, "the first client's threads to end")
    threads = threading.active_count()
    server.freeze()
    try:
        client = socket.create_connection(tunnel.local_address, timeout=10)
        wait_for(lambda: len(tunnel._threads) == 1, "the client's open")
        started = time.monotonic()
        ex.close()
        took = time.monotonic() - started
        client.close()
    finally:
        server.thaw()
    assert took < JOIN_TIMEOUT / 2, f"close() waited {took:.1f} s for a reconnect"
    wait_for(lambda: threading.active_count() <= threads, "the tunnel's threads to end", 10)
    assert ex.statistics().connects == 1



def test_clients_waiting_under_the_cap_are_reset_by_close(sshd: Any, make_backend: Any) -> None:
    """A client still waiting for its place when the tunnel closes sees a reset, not an EOF.

    Its request (here an empty one, ended by its EOF) went nowhere: an orderly
    end would pass for an empty answer (a refused forward and a cut one
    already reset their clients). A request left unread resets by itself.
    """
    backend = make_backend("echo")
    with SSHExecutor(max_forwarded=1, **sshd.executor_parameters()) as ex:
        held = ex.open_connection("127.0.0.1", backend.port, timeout=10)
        tunnel = ex.forward_local(backend.port, "127.0.0.1")
        client = socket.create_connection(tunnel.local_address, timeout=10)
        client.shutdown(socket.SHUT_WR)
        wait_for(lambda: len(ex._forwarding.limit._queue) == 1, "the client to wait its turn")
        tunnel.close()
        with client, pytest.raises(ConnectionResetError):
            client.recv(1)
        held.close()


def answers(port: int) -> bool:
    """Whether a connection to 127.0.0.1:``port`` reaches the echo server behind it."""
    try:
        return echo_once(("127.0.0.1", port), b"are you there", timeout=5) == b"are you there"
    except OSError:
        return False


def test_a_remote_port_refused_on_a_live_connection_is_asked_for_again(
        make_sshd: Any, make_backend: Any, caplog: Any) -> None:
    """After a blip the server's stale session may hold the port: asking once is not enough.

    It used to be asked for again only after the next reconnect, which a
    healthy connection never brings: the forward stayed dead while open.
    """
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    caplog.set_level(logging.WARNING, logger="paramiko_executor.tunnels")
    with SSHExecutor(connect_backoff=0.1, **server.executor_parameters()) as ex, \
            ex.forward_remote(port, backend.port, remote_host="127.0.0.1"):
        assert answers(port)
        (stale,) = server.serving_pids()
        os.kill(stale, signal.SIGSTOP)  # the server's side of a blip: its session holds on
        try:
            ex._connection.link.transport.close()  # type: ignore[union-attr]  # our side of the blip
            wait_for(lambda: any("refused" in r.getMessage() for r in caplog.records),
                     "the reconnected connection to refuse the port", timeout=20)
        finally:
            os.kill(stale, signal.SIGKILL)  # the server notices at last: the port is free
        wait_for(lambda: answers(port), "the port to be asked for again",
                 timeout=RECONNECT_PAUSE + 10)


def first_clients_of_a_remote_forward(ex: SSHExecutor, backend_port: int, clients: int
                                      ) -> List[Any]:
    """What each of ``clients`` clients, all trying the port until it opens, got back for b"x"."""
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    outcomes: List[Any] = []
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError:
                continue  # not forwarded yet: try again at once, to be among the first
            with sock:
                try:
                    sock.sendall(b"x")
                    outcomes.append(sock.recv(1))
                except OSError as exc:
                    outcomes.append(exc)
            return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        with ex.forward_remote(port, backend_port, remote_host="127.0.0.1"):
            for thread in threads:
                thread.join(20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    return outcomes


@pytest.mark.parametrize("server_kind", ["sshd", "test server"])
def test_the_first_clients_of_a_named_remote_port_are_forwarded(
        server_kind: str, sshd: Any, make_test_server: Any, make_backend: Any) -> None:
    """A client the server forwards before our thread has seen its reply is ours already.

    Such clients (say, retrying the port until it opens) used to be closed as
    matching no forward: a clean end for a request never forwarded.
    """
    backend = make_backend("echo")
    server = sshd if server_kind == "sshd" else make_test_server()
    with SSHExecutor(**server.executor_parameters()) as ex:
        for _ in range(6):  # the window is short: a few rounds of eight clients
            assert first_clients_of_a_remote_forward(ex, backend.port, 8) == [b"x"] * 8


def test_a_forwarded_socket_dropped_unclosed_gives_its_place_back(sshd: Any, make_backend: Any
                                                                   ) -> None:
    """Collected unclosed, it closes its channel (with a ResourceWarning), as a socket does.

    The executor held every socket it handed out: one dropped unclosed kept
    its channel and its place under max_forwarded for the executor's life.
    """
    backend = make_backend("echo")
    with SSHExecutor(max_forwarded=1, **sshd.executor_parameters()) as ex:
        sock = ex.open_connection("127.0.0.1", backend.port, timeout=10)
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        with pytest.warns(ResourceWarning, match=f"127.0.0.1:{backend.port}"):
            del sock
            gc.collect()
        wait_for(lambda: backend.connected == 0, "the channel to be closed", timeout=10)
        with ex.open_connection("127.0.0.1", backend.port, timeout=10) as again:
            again.sendall(b"y")
            assert again.recv(1) == b"y"


def test_a_tunnel_that_cannot_have_its_descriptors_is_an_executor_failure(sshd: Any) -> None:
    """Out of descriptors at forward_local: ExecutorFailure, and nothing held (the port free).

    The listener was bound before the rest was had: a raw OSError came out
    and the bound listener was left to the garbage collector.
    """
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        lowest_free = os.dup(0)
        os.close(lowest_free)
        fds = open_fds()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, hard))  # the listener only
        try:
            with pytest.raises(ExecutorFailure, match="cannot listen"):
                ex.forward_local(5432, local_port=0)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert open_fds() == fds


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_remote_forward_closed_while_its_port_is_asked_for_gives_the_port_back(
        make_test_server: Any, make_backend: Any) -> None:
    """close() during a request for the port (the supervisor's after a reconnect, or here
    the first one) cancels it once granted; the server used to keep listening for good."""
    server = make_test_server()
    backend = make_backend("echo")
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("echo ok").stdout == "ok\n"
        asking = threading.Thread(
            target=lambda: ex.forward_remote(port, backend.port, remote_host="127.0.0.1"))
        server.freeze()  # the request waits for its answer
        try:
            asking.start()
            wait_for(lambda: any(t._asking for t in list(ex._forwarding._tunnels)),  # type: ignore[attr-defined]
                     "the request for the port")
            (tunnel,) = list(ex._forwarding._tunnels)
            tunnel.close()
        finally:
            server.thaw()
        asking.join(10)
        assert not asking.is_alive()

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except ConnectionRefusedError:
                return True
            except OSError:  # accepted, then reset: still listening
                return False
            return False

        wait_for(refused, "the server to stop listening on the port", timeout=10)
