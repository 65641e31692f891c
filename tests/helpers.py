"""Small helpers shared by the test modules."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import paramiko
from paramiko.common import AUTH_SUCCESSFUL, OPEN_SUCCEEDED
from paramiko.message import Message

#: Connect retries whose backoff alone (1 + 2 + 4 + ... s, at most 60 s each) lasts minutes.
SLOW_RETRIES: Dict[str, Any] = {"connect_retries": 9, "connect_backoff": 1.0}


def at_line(code: Any, line: int, act: Callable[[], None],
            call: Callable[[], Any], after: bool = False) -> Callable[[], Any]:
    """``call``, with ``act()`` run (once) when the function of ``code`` reaches ``line``
    in the calling thread: a thread held up, or interrupted, at one chosen moment.

    With ``after``, ``act()`` runs at the first other line the function reaches once it
    reached ``line``: as the call on ``line`` returns.
    """
    seen: List[bool] = []
    done: List[bool] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and not done:
            if frame.f_lineno == line:
                seen.append(True)
            if seen and (frame.f_lineno != line) == after:
                done.append(True)
                act()
        return local

    return traced_in(code, local, done, call)


def traced_in(code: Any, local: Callable[..., Any], done: List[bool],
              call: Callable[[], Any], opcodes: bool = False) -> Callable[[], Any]:
    """``call``, with ``local`` tracing each frame of the function of ``code`` (or of
    those of a set of codes) in the calling thread (each opcode too, with ``opcodes``)
    until ``done`` is not empty."""
    codes = code if isinstance(code, (set, frozenset)) else {code}

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code not in codes or done:
            return None
        frame.f_trace_opcodes = opcodes
        return local

    def traced() -> Any:
        sys.settrace(tracer)
        try:
            return call()
        finally:
            sys.settrace(None)
    return traced


def source_file(shared_dir: str, size: int = 512 * 1024) -> Path:
    """``shared_dir``/source: ``size`` random bytes, readable by everyone (the server's user)."""
    source = Path(shared_dir, "source")
    source.write_bytes(os.urandom(size))
    source.chmod(0o644)
    return source


def sftp(server: Any, command: str) -> None:
    """OpenSSH's sftp client (the reference) runs the one ``command`` (say ``put a b``)
    on ``server``."""
    subprocess.run(
        ["sftp", "-F", "/dev/null", "-i", server.client_key_path,
         "-o", f"UserKnownHostsFile={server.known_hosts_path}", "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", "-P", str(server.port), "-b", "-",
         f"{server.username}@{server.host}"],
        input=f"{command}\n".encode(), check=True, timeout=60,
        stdout=subprocess.DEVNULL)


def reap(pid: int, bound: float, what: str = "the child still ran") -> int:
    """The exit code of forked child ``pid`` once it ended; killed (and AssertionError
    saying ``what``) if it still runs after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"{what} after {bound} s")


def interrupting(original: Callable[..., Any], fired: List[bool],
                 caller: Optional[str] = None) -> Callable[..., Any]:
    """``original``, raising KeyboardInterrupt at its entry the first time it is called
    (from a function named ``caller``, if given) instead; ``fired`` records that it did."""

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if not fired and (caller is None or sys._getframe(1).f_code.co_name == caller):
            fired.append(True)
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    return interrupted


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0,
             explain: Optional[Callable[[], str]] = None) -> None:
    """Wait, bounded, for a condition that another thread or process makes true.

    On a timeout, ``explain()`` (if given) says what still stands in the way.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = f":\n{explain()}" if explain is not None else ""
            raise AssertionError(f"timed out waiting for {what}{detail}")
        time.sleep(0.01)


def thread_stacks(threads: Iterable[threading.Thread]) -> str:
    """Each thread's name and where it is now, for a failure's message."""
    frames = sys._current_frames()
    parts = []
    for thread in threads:
        frame = frames.get(thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)[-6:]) if frame is not None else "(ended)\n"
        parts.append(f"--- {thread.name}\n{stack}")
    return "".join(parts)


def run_threads(
    work: Callable[[int], Any], count: int, timeout: float
) -> Tuple[Dict[int, Any], List[BaseException]]:
    """Run ``work(i)`` in ``count`` threads released together; return results and errors.

    Every thread must end within ``timeout`` seconds (else AssertionError), so a
    hang fails the test instead of stalling it.
    """
    barrier = threading.Barrier(count)
    results: Dict[int, Any] = {}
    errors: List[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=timeout)
            results[i] = work(i)
        except BaseException as e:  # collected for the caller to assert on
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "threads still running"
    return results, errors


def drain_terminal(controller: int, proc: subprocess.Popen, timeout: float) -> bytes:
    """Read a pty's controller end until the program closes it or exits (bounded by ``timeout``).

    Reading meanwhile keeps the program from blocking on a full terminal.
    """
    drawn = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the program closed its end
                break
            if not chunk:
                break
            drawn += chunk
        elif proc.poll() is not None:
            break
    return drawn


def call_in_thread(call: Callable[[], Any]) -> Dict[str, Any]:
    """Start ``call`` in a thread; the dict gets its "result" or "error", and the "thread"."""
    outcome: Dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    outcome["thread"] = threading.Thread(target=run, daemon=True)
    outcome["thread"].start()
    return outcome


def outcome_within(bound: float, call: Callable[[], Any]) -> Dict[str, Any]:
    """What ``call`` returned or raised, run in a thread; fails if it outlives ``bound``."""
    outcome = call_in_thread(call)
    thread = outcome.pop("thread")
    thread.join(bound)
    assert not thread.is_alive(), f"the call was still running after {bound} s"
    return outcome


def carried_pipe(tunnel: Any) -> Tuple[Any, int]:
    """The pipe of ``tunnel``'s one forwarded connection, once it is carried, and the
    window its channel grants."""
    wait_for(lambda: tunnel.connections == 1, "the forwarded connection")
    (pipe,) = tunnel._pipes
    return pipe, pipe.chan.get_transport().default_window_size


def flood_stopped(ex: Any, flood: Any) -> bool:
    """Whether the ``"flood"`` backend ``flood`` sent nothing during a round trip of ``ex``."""
    before = flood.sent
    assert ex.run_command("echo ok").stdout == "ok\n"
    return bool(flood.sent == before)


class _ForwardingInterface(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        return AUTH_SUCCESSFUL

    def check_channel_direct_tcpip_request(self, chanid: int, origin: Any,
                                           destination: Any) -> int:
        return OPEN_SUCCEEDED


class HostileForward:
    """A ``direct-tcpip`` channel between two paramiko transports on a socket pair.

    ``chan`` is the client's side (granting ``window`` bytes), ``far`` the
    server's; `send` sends raw channel messages from the server's side, as
    no honest server would. `close` ends both transports.
    """

    def __init__(self, window: int) -> None:
        near, far = socket.socketpair()
        self.server = paramiko.Transport(far)
        self.server.add_server_key(paramiko.ECDSAKey.generate())
        self.server.start_server(event=threading.Event(), server=_ForwardingInterface())
        self.client = paramiko.Transport(near)
        self.client.connect(username="u", password="p")
        self.chan = self.client.open_channel("direct-tcpip", ("127.0.0.1", 1), ("127.0.0.1", 2),
                                             window_size=window, timeout=10)
        far_chan = self.server.accept(10)
        assert far_chan is not None
        self.far: paramiko.Channel = far_chan

    def send(self, kind: bytes, data: bytes, *code: int) -> None:
        """Channel data (or extended data, with its ``code``) sent whatever window was granted."""
        m = Message()
        m.add_byte(kind)
        m.add_int(self.far.remote_chanid)
        for value in code:
            m.add_int(value)
        m.add_string(data)
        self.server._send_user_message(m)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.client.close()
        self.server.close()


def make_spare(executor: Any) -> Any:
    """``executor``'s connection (its ``Link``), once it holds a spare channel: one is
    made after a command's exec, unless the server refused it (a session it was still
    freeing), then after the next command's."""
    for _ in range(20):
        executor.run_command("true", timeout=30)
        link = executor._connection.link
        if link is not None and link.spare.held:
            return link
    raise AssertionError("no spare channel after 20 commands")


def connected_transport(executor: Any, clear_to_send_timeout: Optional[float] = None) -> Any:
    """``executor``'s transport once a first command connected it; with paramiko's
    ``clear_to_send_timeout`` (30 s) shortened to the one given, for a test."""
    executor.run_command("true", timeout=20)
    with executor.bounded_connection as transport:
        pass
    if clear_to_send_timeout is not None:
        transport.clear_to_send_timeout = clear_to_send_timeout
    return transport
