"""Attacks on `pipe.Pipe`'s socket gate: an abort cuts (reset) and closes the local socket at
once, or as the last call in flight on it returns.

Against a real sshd and real TCP targets on 127.0.0.1. The promises under attack: no call on
a forwarded connection's local socket runs on a closed (or reused) descriptor, and none is
closed while a call is inside; a client whose stream was cut sees a reset, never a clean
end; a complete stream is never reported as cut; nothing (thread, descriptor) is left.
"""

from __future__ import annotations

import errno
import functools
import os
import pickle
import random
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from backends import Backend
from helpers import wait_for

from paramiko_executor import SSHExecutor, pipe, tunnels
from paramiko_executor.errors import ExecutorFailure, ForwardTimeout

Result = Tuple[str, int]  # how the client's stream ended, and how many bytes it read


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class CheckedSocket(socket.socket):
    """A pipe's local socket that notes every call made on it while it was closed, and
    every close made while another thread was inside a call on it."""

    violations: List[str] = []
    closes: List[int] = []
    #: Called, once each, inside the named call (before the call itself), with the socket.
    hooks: Dict[str, Callable[[CheckedSocket], None]] = {}
    _guard = threading.Lock()

    def __init__(self, sock: socket.socket) -> None:
        family, kind, proto = sock.family, sock.type, sock.proto
        super().__init__(family, kind, proto, fileno=sock.detach())
        self._inside: Dict[int, int] = {}
        self.pipe: Optional[pipe.Pipe] = None

    def _call(self, name: str, call: Callable[..., Any], *args: Any) -> Any:
        me = threading.get_ident()
        with self._guard:
            if self.fileno() == -1:
                self.violations.append(f"{name} on a closed socket")
            self._inside[me] = self._inside.get(me, 0) + 1
            hook = self.hooks.pop(name if name != "shutdown" else f"shutdown {args[0]}", None)
        try:
            if hook is not None:
                hook(self)
            return call(*args)
        finally:
            with self._guard:
                self._inside[me] -= 1

    def recv_into(self, *args: Any) -> Any:  # type: ignore[override]
        return self._call("recv_into", super().recv_into, *args)

    def sendmsg(self, *args: Any) -> Any:  # type: ignore[override]
        return self._call("sendmsg", super().sendmsg, *args)

    def send(self, *args: Any) -> Any:  # type: ignore[override]
        return self._call("send", super().send, *args)

    def shutdown(self, *args: Any) -> Any:  # type: ignore[override]
        return self._call("shutdown", super().shutdown, *args)

    def setsockopt(self, *args: Any) -> Any:  # type: ignore[override]
        return self._call("setsockopt", super().setsockopt, *args)

    def close(self) -> None:
        me = threading.get_ident()
        with self._guard:
            others = [n for t, n in self._inside.items() if t != me and n]
            if others:
                self.violations.append("a close while another thread was inside a call")
            number = self.fileno()
            if number != -1:
                self.closes.append(number)
            super().close()


@pytest.fixture
def checked_pipes(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[str]]:
    """Every pipe of a tunnel gets a `CheckedSocket`; yields the violations seen."""
    CheckedSocket.violations = []
    CheckedSocket.closes = []
    CheckedSocket.hooks = {}

    class CheckedPipe(pipe.Pipe):
        def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
            checked = CheckedSocket(sock)
            super().__init__(checked, *args, **kwargs)
            checked.pipe = self

    monkeypatch.setattr(tunnels, "Pipe", CheckedPipe)
    yield CheckedSocket.violations


def echo_client(address: Tuple[str, int], request: bytes, half_close: bool,
                timeout: float = 30) -> Result:
    """Send ``request`` (then an EOF if ``half_close``), read the echo: how it ended.

    ("eof", n): a clean end after n bytes; ("reset", n): a reset after n bytes;
    ("refused", 0): no connection; ("timeout", n): nothing for ``timeout`` s.
    """
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except ConnectionRefusedError:
        return "refused", 0
    except ConnectionResetError:
        return "reset", 0  # the listener closed while the connection waited in its queue
    with sock:
        got = 0
        try:
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    return "eof", got
                got += len(data)
                if got >= len(request) and not half_close:
                    return "eof", got  # all of it, and no EOF asked for
        except socket.timeout:
            return "timeout", got
        except OSError as exc:
            # A reset before the shutdown: the socket is no longer connected.
            assert exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN), exc
            return "reset", got


def start_clients(address: Tuple[str, int], requests: List[bytes], count: int
                  ) -> Tuple[List[Tuple[Result, int]], List[threading.Thread]]:
    """``count`` `echo_client` threads, every other one half-closing, each sending one of
    ``requests`` in turn; their results, with the length of what each sent."""
    results: List[Tuple[Result, int]] = []

    def client(i: int) -> None:
        request = requests[i % len(requests)]
        results.append((echo_client(address, request, i % 2 == 0), len(request)))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in clients:
        thread.start()
    return results, clients


def join_all(threads: List[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a client never ended"


def all_results(results: List[Tuple[Result, int]], count: int) -> List[Tuple[Result, int]]:
    assert len(results) == count, "a client failed (see the thread's exception)"
    return results


def churn(stop: threading.Event) -> None:
    """Open and close files and sockets as fast as it can: any number a pipe closes while
    a call of its is inside would soon name one of these."""
    for _ in range(1_000_000):
        if stop.is_set():
            return
        fd = os.open("/dev/null", os.O_RDONLY)
        pair = socket.socketpair()
        for end in pair:
            end.close()
        os.close(fd)


@pytest.mark.hang_timeout(300)
def test_tunnels_closing_under_their_clients_never_touch_a_closed_descriptor(
        make_sshd: Callable[..., Any], make_backend: Callable[..., Backend],
        checked_pipes: List[str]) -> None:
    """Rounds of 12 clients each, the tunnel closed at a random moment of their transfers,
    while other threads open and close descriptors: no call on a closed socket, no close
    under a call, every cut client reset, every whole echo whole, nothing left."""
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    rng = random.Random(5)
    outcomes: List[Result] = []
    stop = threading.Event()
    churners = [threading.Thread(target=churn, args=(stop,)) for _ in range(2)]
    threads_before, fds_before = threading.active_count(), open_fds()
    with SSHExecutor(**server.executor_parameters()) as ex:
        for thread in churners:
            thread.start()
        try:
            for _ in range(12):
                tunnel = ex.forward_local(backend.port, "127.0.0.1")
                size = rng.choice([1, 1000, 200_000, 3_000_000])
                request = os.urandom(size)
                results, clients = start_clients(tunnel.local_address, [request], 12)
                time.sleep(rng.uniform(0, 0.3))  # the moment of the close, at random
                tunnel.close()
                join_all(clients, 40)
                for (how, got), size in all_results(results, 12):
                    assert how != "timeout", "a client was never cut"
                    assert how != "eof" or got == size, f"a clean end after {got} of {size}"
                    outcomes.append((how, got))
        finally:
            stop.set()
            for thread in churners:
                thread.join(30)
    assert checked_pipes == []
    assert len(CheckedSocket.closes) > 50  # pipes ran, and closed their sockets
    assert {how for how, _ in outcomes} >= {"eof", "reset"}, outcomes
    wait_for(lambda: threading.active_count() <= threads_before, "the threads to end")
    wait_for(lambda: open_fds() <= fds_before, "the descriptors to close")


def kill_connection(server: Any) -> None:
    """SIGKILL sshd's process that serves the executor's connection: the connection is lost."""
    pids = server.serving_pids()
    assert pids, "no connection to kill"
    for pid in pids:
        os.kill(pid, 9)


@pytest.mark.parametrize("ending", ["lost", "executor", "tunnel"])
@pytest.mark.hang_timeout(300)
def test_fifty_clients_mid_transfer_end_cleanly_or_reset_at_any_moment(
        make_sshd: Callable[..., Any], make_backend: Callable[..., Backend],
        checked_pipes: List[str], ending: str) -> None:
    """50 clients echo through one tunnel; at a random moment the connection is lost (sshd's
    process killed), the executor closes, or the tunnel closes. Each client's stream is
    whole with a clean end, or reset: never cut short with a clean end, never left hanging."""
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    rng = random.Random(ending)
    requests = [os.urandom(size) for size in (100, 50_000, 500_000, 4_000_000)]
    threads_before, fds_before = threading.active_count(), open_fds()
    outcomes: List[Result] = []
    for _ in range(4):
        wait_for(lambda: not server.serving_pids(), "the last round's sshd to exit")
        ex = SSHExecutor(**server.executor_parameters())
        try:
            tunnel = ex.forward_local(backend.port, "127.0.0.1")
            results, clients = start_clients(tunnel.local_address, requests, 50)
            wait_for(lambda: bool(server.serving_pids()), "the connection")
            time.sleep(rng.uniform(0.0, 0.5))
            if ending == "lost":
                kill_connection(server)
            elif ending == "executor":
                ex.close()
            else:
                tunnel.close()
            join_all(clients, 60)
            if ending == "lost":
                # The tunnel stays, and carries new clients on a new connection.
                assert echo_client(tunnel.local_address, b"again", True) == ("eof", 5)
        finally:
            ex.close()
        for (how, got), size in all_results(results, 50):
            assert how in ("eof", "reset"), (how, got)
            assert how != "eof" or got == size, f"a clean end after {got} of {size} bytes"
            outcomes.append((how, got))
    assert checked_pipes == []
    assert {how for how, _ in outcomes} == {"eof", "reset"}, "the ending never cut a stream"
    wait_for(lambda: threading.active_count() <= threads_before, "the threads to end")
    wait_for(lambda: open_fds() <= fds_before, "the descriptors to close")


class Replier:
    """A TCP target on 127.0.0.1: reads its client to EOF, then sends ``reply`` and closes."""

    def __init__(self, reply: bytes) -> None:
        self._reply = reply
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.replied = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with self._listener:
            self._listener.settimeout(60)
            sock, _ = self._listener.accept()
        with sock:
            sock.settimeout(60)
            while sock.recv(1 << 16):
                pass
            sock.sendall(self._reply)
        self.replied.set()

    def close(self) -> None:
        self._thread.join(70)


def read_all(sock: socket.socket) -> Tuple[str, int]:
    got = 0
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return "eof", got
            got += len(data)
    except ConnectionResetError:
        return "reset", got


@pytest.mark.hang_timeout(120)
def test_a_complete_reply_still_being_written_survives_a_later_connection_loss(
        make_sshd: Callable[..., Any]) -> None:
    """The target replied in full and closed, sshd sent the EOF and the CLOSE: the stream is
    complete. The client reads slowly, so the pipe is still writing when the connection is
    lost. The client must read the whole reply and a clean end."""
    server = make_sshd(max_sessions=10)
    reply = os.urandom(6_000_000)  # more than the kernel's buffers, less than the window
    target = Replier(reply)
    with SSHExecutor(**server.executor_parameters()) as ex:
        tunnel = ex.forward_local(target.port, "127.0.0.1")
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(30)
        with client:
            client.connect(tunnel.local_address)
            client.shutdown(socket.SHUT_WR)  # the request: nothing
            assert target.replied.wait(30)
            wait_for(lambda: tunnel.connections == 1 and all(
                p.chan.closed for p in tunnel._pipes), "sshd's EOF and CLOSE")
            (running,) = tunnel._pipes
            assert running.held > 0, "the reply was written already: no race"
            kill_connection(server)
            wait_for(lambda: not ex._connection.link.alive(),  # type: ignore[union-attr]
                     "the loss to be seen")
            assert read_all(client) == ("eof", len(reply))
        target.close()


# --- ForwardTimeout ---------------------------------------------------------------------

SECRET = "hunter2-pipegate-secret"


def outcome_of(call: Callable[[], Any], limit: float) -> Tuple[Optional[BaseException], float]:
    """What ``call()`` raised (None if it returned), and how long it took; bounded."""
    outcome: Dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            result = call()
            if hasattr(result, "close"):
                result.close()
        except BaseException as exc:  # what is under test
            outcome["error"] = exc
        outcome["took"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still waiting after {limit} s"
    return outcome.get("error"), outcome["took"]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener.getsockname()[1]
    listener.close()


def test_a_forward_timeout_is_both_kinds_of_error_and_carries_no_secret(
        silent_port: int) -> None:
    """From a real open that timed out while connecting (the server never answers)."""
    with SSHExecutor(host="127.0.0.1", port=silent_port, username="someone", password=SECRET,
                     banner_timeout=30) as ex:
        error, took = outcome_of(lambda: ex.open_connection("127.0.0.1", 9, timeout=0.5), 20)
        assert type(error) is ForwardTimeout, repr(error)
        assert took < 10
        for kind in (TimeoutError, ExecutorFailure, OSError):
            try:
                raise error
            except kind as caught:  # noqa: PERF203  (each kind must catch it)
                assert caught is error
        assert error.executor is ex
        for text in (str(error), repr(error), str(error.args)):
            assert SECRET not in text
            assert "timed out" in text and "127.0.0.1:9" in text
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is ForwardTimeout and str(copy) == str(error)
        assert copy.executor is None and copy.args == error.args
        assert SECRET.encode() not in pickle.dumps(error)
        assert isinstance(copy, TimeoutError) and isinstance(copy, ExecutorFailure)


@pytest.mark.parametrize("stage", ["connecting", "place", "open"])
def test_a_close_during_a_timed_open_is_no_timeout(
        silent_port: int, make_test_server: Callable[..., Any],
        make_backend: Callable[..., Backend], stage: str) -> None:
    """executor.close() while open_connection waits (for the connect, for a place under
    max_forwarded, for the server's answer): an ExecutorFailure at once, not a ForwardTimeout
    after the whole timeout."""
    backend = make_backend("echo")
    server = make_test_server(max_sessions=10)
    parameters = server.executor_parameters()
    if stage == "connecting":
        parameters.update(port=silent_port, banner_timeout=60)
    ex = SSHExecutor(max_forwarded=1, **parameters)
    held = None
    try:
        if stage == "place":
            held = ex.open_connection("127.0.0.1", backend.port, timeout=30)
        elif stage == "open":
            assert ex.run_command("echo up").stdout == "up\n"
            server.freeze()
        closing = threading.Timer(1.0, ex.close)
        closing.start()
        error, took = outcome_of(
            lambda: ex.open_connection("127.0.0.1", backend.port, timeout=30), 40)
        closing.join(30)
    finally:
        if stage == "open":
            server.thaw()
        if held is not None:
            held.close()
        ex.close()
    assert isinstance(error, ExecutorFailure), repr(error)
    assert not isinstance(error, TimeoutError), repr(error)
    assert took < 20, f"the close was seen after {took:.1f} s"


def test_a_refused_forward_with_a_timeout_is_no_timeout(
        make_sshd: Callable[..., Any]) -> None:
    server = make_sshd(max_sessions=10)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nobody listens there: sshd's connect is refused
    with SSHExecutor(**server.executor_parameters()) as ex:
        error, _ = outcome_of(lambda: ex.open_connection("127.0.0.1", port, timeout=20), 40)
    assert type(error) is ExecutorFailure, repr(error)
    assert "refused to forward" in str(error)


# --- fork -----------------------------------------------------------------------------------


def fork_waiting_child() -> Tuple[int, int]:
    """A forked child that waits (20 s at most) until the returned descriptor is closed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(write_end)
            signal.alarm(20)
            os.read(read_end, 1)
        finally:
            os._exit(0)
    os.close(read_end)
    return pid, write_end


def end_child(pid: int, write_end: int) -> None:
    os.close(write_end)
    os.waitpid(pid, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.hang_timeout(120)
def test_a_fork_with_clients_mid_transfer_leaves_the_parents_streams_whole_and_closable(
        make_sshd: Callable[..., Any], make_backend: Callable[..., Backend]) -> None:
    """A child forked while 8 clients stream through a tunnel: their streams go on whole in
    the parent, and the parent's close of the tunnel still resets the ones it cuts while
    the child lives (the child closed its copies of their sockets)."""
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    request = os.urandom(3_000_000)
    with SSHExecutor(**server.executor_parameters()) as ex:
        tunnel = ex.forward_local(backend.port, "127.0.0.1")
        results, clients = start_clients(tunnel.local_address, [request], 8)
        wait_for(lambda: tunnel.connections >= 4, "clients to be streaming")
        pid, write_end = fork_waiting_child()
        try:
            join_all(clients, 60)
            assert all(how == ("eof", len(request)) for how, _ in all_results(results, 8))
            # Now streams the child has copies of only if it failed to close them.
            stuck = socket.create_connection(tunnel.local_address, timeout=30)
            stuck.sendall(b"hello")
            assert stuck.recv(5) == b"hello"
            streaming = socket.create_connection(tunnel.local_address, timeout=30)
            wait_for(lambda: tunnel.connections == 2, "both to be forwarded")
            pid2, write_end2 = fork_waiting_child()
            try:
                tunnel.close()
                for sock in (stuck, streaming):
                    with sock, pytest.raises(ConnectionResetError):
                        sock.settimeout(15)
                        sock.recv(10)
            finally:
                end_child(pid2, write_end2)
        finally:
            end_child(pid, write_end)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.hang_timeout(120)
def test_a_fork_while_a_clients_channel_is_being_opened_leaves_the_close_to_the_parent(
        make_test_server: Callable[..., Any], make_backend: Callable[..., Backend]) -> None:
    """Was: a client accepted but not yet carried by a pipe (its channel being opened) was in
    no list a forked child closes: the child kept a copy of its socket, and the parent's
    reset never reached the client while the child lived."""
    server = make_test_server(max_sessions=10)
    backend = make_backend("echo")
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.run_command("echo up").stdout == "up\n"
        tunnel = ex.forward_local(backend.port, "127.0.0.1")
        server.freeze()  # the client's open waits for an answer
        try:
            client = socket.create_connection(tunnel.local_address, timeout=30)
            wait_for(lambda: len(tunnel._threads) == 1, "the client to be accepted")
            pid, write_end = fork_waiting_child()
            try:
                tunnel.close()
                with client, pytest.raises(ConnectionResetError):
                    client.settimeout(10)
                    client.recv(10)
            finally:
                end_child(pid, write_end)
        finally:
            server.thaw()


# --- an abort landing inside each call of the pump ---------------------------------------------


def abort_from_elsewhere(seen: Dict[str, Any], sock: CheckedSocket) -> None:
    """Abort the socket's pipe from another thread, while this thread is inside a call on it:
    the abort must return without waiting for the call, and leave the socket open to it."""
    assert sock.pipe is not None
    aborting = threading.Thread(target=sock.pipe.abort)
    aborting.start()
    aborting.join(10)
    seen["abort returned"] = not aborting.is_alive()
    seen["open after the abort"] = sock.fileno() != -1


@pytest.mark.parametrize("call", ["recv_into", "sendmsg", "shutdown 1"])
@pytest.mark.hang_timeout(120)
def test_an_abort_inside_each_pump_call_is_left_to_it_and_resets_the_client(
        make_sshd: Callable[..., Any], make_backend: Callable[..., Backend],
        checked_pipes: List[str], call: str) -> None:
    """recv_into (waiting for the client), sendmsg (the reply), shutdown(SHUT_WR) (the
    target's EOF passed on): an abort from another thread lands inside the call. The close
    is left to the call; the client sees a reset, or for the EOF, the whole reply and a
    clean end (the stream was complete before the abort)."""
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    seen: Dict[str, Any] = {}
    CheckedSocket.hooks[call] = functools.partial(abort_from_elsewhere, seen)
    with SSHExecutor(**server.executor_parameters()) as ex:
        tunnel = ex.forward_local(backend.port, "127.0.0.1")
        with socket.create_connection(tunnel.local_address, timeout=30) as client:
            if call != "recv_into":
                client.sendall(b"ping")
            if call == "shutdown 1":
                client.shutdown(socket.SHUT_WR)
            wait_for(lambda: bool(seen), "the abort inside the call")
            got, ended = b"", "eof"
            try:
                for _ in range(100):
                    data = client.recv(1024)
                    if not data:
                        break
                    got += data
            except ConnectionResetError:
                ended = "reset"
        wait_for(lambda: tunnel.connections == 0, "the pipe to end")
        assert ex.run_command("echo ok").stdout == "ok\n"
    assert seen == {"abort returned": True, "open after the abort": True}
    if call == "shutdown 1":
        assert (got, ended) == (b"ping", "eof")
    else:
        assert ended == "reset", got
    assert checked_pipes == []
    assert len(CheckedSocket.closes) == 1


class Recorder:
    """A TCP target on 127.0.0.1: reads each connection to its end, notes how it ended (a
    clean end or a reset) after how many bytes, then answers b"ok"."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.ends: List[Result] = []
        self._threads: List[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        for _ in range(10_000):
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        got = 0
        with sock:
            sock.settimeout(60)
            try:
                while True:
                    data = sock.recv(1 << 20)
                    if not data:
                        break
                    got += len(data)
                sock.sendall(b"ok")
            except OSError:
                self.ends.append(("reset", got))
                return
            self.ends.append(("eof", got))

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._accepting.join(10)
        self._listener.close()
        for thread in self._threads:
            thread.join(70)


def upload(address: Tuple[str, int], request: bytes) -> None:
    """Send ``request`` and an EOF, then wait for the end; any error is the cut under test."""
    try:
        with socket.create_connection(address, timeout=30) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            for _ in range(10):
                if not sock.recv(10):
                    return
    except OSError:
        pass


def stream(address: Tuple[str, int]) -> None:
    """Send without end (at most 30 s): an upload every ending of the forward must cut."""
    deadline = time.monotonic() + 30
    try:
        with socket.create_connection(address, timeout=30) as sock:
            while time.monotonic() < deadline:
                sock.sendall(bytes(65536))
    except OSError:
        pass


@pytest.mark.parametrize("ending", ["lost", "executor", "tunnel"])
@pytest.mark.hang_timeout(300)
def test_remote_forward_targets_see_a_whole_upload_or_a_reset_at_any_moment(
        make_sshd: Callable[..., Any], checked_pipes: List[str], ending: str) -> None:
    """The other side of a pipe: 30 clients of sshd's remote port upload through a remote
    forward to a local target, and the forward ends at a random moment. The target must see
    each upload whole with a clean end, or a reset: never a cut upload with a clean end."""
    server = make_sshd(max_sessions=10)
    target = Recorder()
    rng = random.Random(ending)
    requests = [os.urandom(size) for size in (1000, 300_000, 3_000_000, 8_000_000)]
    threads_before, fds_before = threading.active_count(), open_fds()
    try:
        for _ in range(3):
            wait_for(lambda: not server.serving_pids(), "the last round's sshd to exit")
            with SSHExecutor(**server.executor_parameters()) as ex:
                tunnel = ex.forward_remote(0, target.port, remote_host="127.0.0.1")
                address = ("127.0.0.1", tunnel.remote_address[1])
                clients = [threading.Thread(target=upload, args=(address, requests[i % 4]))
                           for i in range(30)]
                # On a fast machine every upload may end before the cut: this one cannot.
                clients.append(threading.Thread(target=stream, args=(address,)))
                for thread in clients:
                    thread.start()
                time.sleep(rng.uniform(0.0, 0.3))
                if ending == "lost":
                    kill_connection(server)
                elif ending == "executor":
                    ex.close()
                else:
                    tunnel.close()
                ex.close()
                join_all(clients, 60)
        wait_for(lambda: threading.active_count() <= threads_before + len(target._threads)
                 and all(not t.is_alive() for t in target._threads), "the targets to end")
    finally:
        target.close()
    sizes = {len(request) for request in requests}
    for how, got in target.ends:
        assert how == "reset" or got in sizes, f"a clean end after {got} bytes"
    assert {how for how, _ in target.ends} == {"eof", "reset"}, target.ends
    assert checked_pipes == []
    wait_for(lambda: threading.active_count() <= threads_before, "the threads to end")
    wait_for(lambda: open_fds() <= fds_before, "the descriptors to close")


def test_a_connect_that_fails_within_the_timeout_is_no_timeout() -> None:
    """Nobody listens on the port: the connect fails (without retries) well inside the
    open's timeout, and that failure, not a ForwardTimeout, is what the caller gets."""
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with SSHExecutor(host="127.0.0.1", port=port, username="someone", password=SECRET,
                     connect_retries=0) as ex:
        error, took = outcome_of(lambda: ex.open_connection("127.0.0.1", 9, timeout=20), 40)
    assert isinstance(error, ExecutorFailure), repr(error)
    assert not isinstance(error, TimeoutError), repr(error)
    assert took < 15
    assert SECRET not in str(error) and SECRET not in repr(error)


# --- an interrupt inside Tunnel.close --------------------------------------------------------


@pytest.mark.hang_timeout(120)
def test_a_close_after_an_interrupted_close_still_cuts_the_clients(
        make_sshd: Callable[..., Any], make_backend: Callable[..., Backend],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnels, "JOIN_TIMEOUT", 1.0)  # the closes below wait for threads
    server = make_sshd(max_sessions=10)
    backend = make_backend("echo")
    with SSHExecutor(**server.executor_parameters()) as ex:
        tunnel = ex.forward_local(backend.port, "127.0.0.1")
        with socket.create_connection(tunnel.local_address, timeout=30) as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
            stop_listening = tunnel._stop_listening

            def interrupted() -> None:
                # Where Ctrl-C lands while close() joins the listening thread.
                monkeypatch.setattr(tunnel, "_stop_listening", stop_listening)
                raise KeyboardInterrupt

            monkeypatch.setattr(tunnel, "_stop_listening", interrupted)
            with pytest.raises(KeyboardInterrupt):
                tunnel.close()
            tunnel.close()  # the caller's second try
            # It stops the listening the first left undone: that thread lived on, for good.
            assert not tunnel._accepting.is_alive()
            with pytest.raises(OSError):
                socket.create_connection(tunnel.local_address, timeout=5).close()
            client.settimeout(10)
            try:
                ended = client.recv(10)
            except ConnectionResetError:
                ended = None
            except socket.timeout:
                ended = b"still open"
            assert ended is None, "a client of a closed tunnel was never cut"
