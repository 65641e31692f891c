"""Errors by their origin: the caller's exceptions are the caller's, the server's malformations
are protocol errors, and only evidence about the transport makes a connection "lost".

Real OpenSSH sshd for the caller's side; a tiny hostile paramiko server, started
here, for what a server may send that no honest one does.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import socket
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import reap, wait_for
from paramiko.common import (
    AUTH_SUCCESSFUL,
    OPEN_SUCCEEDED,
    cMSG_CHANNEL_DATA,
    cMSG_CHANNEL_REQUEST,
)
from paramiko.message import Message

from paramiko_executor import ExecutorFailure, SSHExecutor
from paramiko_executor import channel as channel_module
from paramiko_executor.errors import ConnectionLost, mapped

# --- the caller's exceptions ------------------------------------------------------------------


def lines_in(path: str) -> int:
    with open(path) as file:
        return len(file.readlines())


def raising(exc: BaseException) -> Callable[[str, Any], None]:
    def on_output(stream: str, line: Any) -> None:
        raise exc
    return on_output


@pytest.mark.hang_timeout(90)
def test_on_output_raising_broken_pipe_touches_nothing_else(sshd, shared_dir):
    runs_a = os.path.join(shared_dir, "a")
    runs_b = os.path.join(shared_dir, "b")
    go = os.path.join(shared_dir, "go")
    # B runs while A's callback raises, and finishes only once told to (bounded: 60 s).
    command_b = (f"echo run >> {runs_b}; i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; "
                 f"do sleep 0.05; i=$((i+1)); done; echo done")
    broken = BrokenPipeError(errno.EPIPE, "Broken pipe")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        with ThreadPoolExecutor(1) as pool:
            b = pool.submit(ex.run_command, command_b, timeout=90)
            wait_for(lambda: os.path.exists(runs_b), "B to start")
            with pytest.raises(BrokenPipeError) as caught:
                ex.run_command(f"echo run >> {runs_a}; echo line; exec sleep 30",
                               on_output=raising(broken), timeout=60)
            assert caught.value is broken
            assert broken.__context__ is None
            open(go, "w").close()
            assert b.result(timeout=60).stdout == "done\n"
        statistics = ex.statistics()
    assert lines_in(runs_a) == 1
    assert lines_in(runs_b) == 1
    assert statistics.reconnects == 0
    assert statistics.commands_retried == 0
    assert statistics.commands_failed == 1


def every_exception_a_connection_could_raise() -> List[BaseException]:
    """One of each OSError subclass, EOFError and paramiko's exceptions, as a callback may raise."""
    found: List[BaseException] = []
    pending = [OSError]
    while pending:
        kind = pending.pop()
        pending.extend(kind.__subclasses__())
        if kind.__module__ == "builtins":
            found.append(kind(errno.EIO, f"{kind.__name__} from the callback"))
    return found + [
        EOFError("the caller's own end of file"),
        paramiko.SSHException("the caller uses paramiko too"),
        paramiko.ChannelException(2, "a channel of the caller's"),
        paramiko.ProxyCommandFailure("the caller's proxy", "gone"),
        ValueError("a plain bug in the callback"),
    ]


@pytest.mark.hang_timeout(300)
def test_whatever_a_callback_raises_is_the_callers_and_its_slot_comes_back(sshd):
    raised = every_exception_a_connection_could_raise()
    assert len(raised) > 15
    with SSHExecutor(**sshd.executor_parameters(max_sessions=1)) as ex:
        for exc in raised:
            with pytest.raises(type(exc)) as caught:
                ex.run_command("echo line; exec sleep 30", on_output=raising(exc), timeout=60)
            assert caught.value is exc
            # The only slot comes back once sshd closed the TERMed command's channel.
            assert ex.run_command("echo after", timeout=30).stdout == "after\n"
        statistics = ex.statistics()
    assert statistics.reconnects == 0
    assert statistics.commands_failed == len(raised)
    assert statistics.commands_succeeded == len(raised)


def test_a_callback_raising_on_the_last_partial_line_is_the_callers(sshd):
    exc = BrokenPipeError(errno.EPIPE, "Broken pipe")
    with SSHExecutor(**sshd.executor_parameters(max_sessions=1)) as ex:
        with pytest.raises(BrokenPipeError) as caught:
            ex.run_command("printf partial", on_output=raising(exc), timeout=30)
        assert caught.value is exc
        assert ex.run_command("echo after", timeout=30).stdout == "after\n"
        assert ex.statistics().reconnects == 0


# --- "lost" needs evidence about the transport -----------------------------------------------


def test_lost_is_decided_from_the_transport_not_the_exception_class(sshd):
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        transport = ex.state.transport
        for exc in (BrokenPipeError(errno.EPIPE, "Broken pipe"), EOFError(), OSError("local")):
            assert not isinstance(mapped(exc, transport, True, "x"), ConnectionLost)
        # The same class coming up through a packetizer is a socket's failure.
        ours, theirs = socket.socketpair()
        theirs.close()
        with ours, pytest.raises((OSError, EOFError)) as raised:
            paramiko.Packetizer(ours).write_all(b"\0" * 65536)
        assert isinstance(mapped(raised.value, transport, True, "x"), ConnectionLost)
        ex.close()
        wait_for(lambda: not transport.is_active(), "the transport to end")
        assert isinstance(mapped(OSError("local"), transport, True, "x"), ConnectionLost)


# --- a hostile server ------------------------------------------------------------------------


class HostileServer:
    """A paramiko server on 127.0.0.1 that answers each exec with what ``behaviours`` says.

    ``behaviours`` maps a command to a function of the server's channel, run in
    a thread of its own once the client's stdin ended (the exec's reply is out
    by then).
    """

    def __init__(self, behaviours: Dict[bytes, Callable[[paramiko.Channel], None]]) -> None:
        self.behaviours = behaviours
        self.host_key = paramiko.ECDSAKey.generate()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.transports: List[paramiko.Transport] = []
        self.threads: List[threading.Thread] = []
        self.stopped = threading.Event()
        self.connections = 0
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self.threads.append(accept)

    def parameters(self, **overrides: Any) -> Dict[str, Any]:
        params = dict(host="127.0.0.1", port=self.port, username="u", password="p",
                      known_hosts=None, config=(), max_sessions=4, allow_agent=False,
                      look_for_keys=False, connect_retries=0)
        params.update(overrides)
        return params

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            transport = paramiko.Transport(sock)
            transport.add_server_key(self.host_key)
            self.transports.append(transport)
            transport.start_server(server=_Interface(self))

    def run(self, chan: paramiko.Channel, command: bytes) -> None:
        def act() -> None:
            chan.settimeout(30)
            try:
                while chan.recv(65536):
                    pass
                self.behaviours[command](chan)
            except (OSError, EOFError, paramiko.SSHException):
                pass  # the client went away first
        thread = threading.Thread(target=act, daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        for transport in self.transports:
            transport.close()
        for thread in self.threads:
            thread.join(10)


class _Interface(paramiko.ServerInterface):
    def __init__(self, server: HostileServer) -> None:
        self.server = server

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        if command not in self.server.behaviours:
            return False
        self.server.run(channel, command)
        return True


class Raw(bytes):
    """Bytes sent as they are, with no length in front."""


def send_raw(chan: paramiko.Channel, kind: bytes, *fields: Any) -> None:
    """A channel message built field by field, as no honest server would send it."""
    m = Message()
    m.add_byte(kind)
    m.add_int(chan.remote_chanid)
    for field in fields:
        if isinstance(field, Raw):
            m.add_bytes(field)
        elif isinstance(field, bool):
            m.add_boolean(field)
        elif isinstance(field, int):
            m.add_int(field)
        else:
            m.add_string(field)
    chan.transport._send_user_message(m)  # type: ignore[union-attr]


def finish(chan: paramiko.Channel, status: int = 0) -> None:
    chan.send_exit_status(status)
    chan.shutdown_write()
    chan.close()


@pytest.fixture
def hostile() -> Any:
    servers: List[HostileServer] = []

    def make(behaviours: Dict[bytes, Callable[[paramiko.Channel], None]]) -> HostileServer:
        behaviours = {**behaviours, b"sync": finish}
        server = HostileServer(behaviours)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def test_a_server_overrunning_the_window_ends_the_channel(hostile):
    entered = threading.Event()
    blasted = threading.Event()
    sent: List[int] = []

    def overrun(chan: paramiko.Channel) -> None:
        chan.sendall(b"first\n")
        assert entered.wait(30)
        granted = chan.out_window_size  # what the client still allows, after the line
        size = 0
        while size <= granted:
            send_raw(chan, cMSG_CHANNEL_DATA, b"y" * 32768)  # a string: length, then bytes
            size += 32768
        sent.append(size - granted)
        blasted.set()
        finish(chan)

    server = hostile({b"overrun": overrun})
    with SSHExecutor(**server.parameters()) as ex:
        held: List[bool] = []

        def on_output(stream: str, line: Any) -> None:
            if not held:
                held.append(True)
                entered.set()
                # The client gives no window back while the first line is held here.
                assert blasted.wait(30)
                # Answered after the blast on the same connection: the blast is in.
                ex.run_command("sync", timeout=30)

        with pytest.raises(ExecutorFailure, match="protocol error.*window"):
            ex.run_command("overrun", on_output=on_output, keep_output=False, timeout=60)
        assert sent and sent[0] > 0
        assert ex.run_command("sync", timeout=30).exit_code == 0
        assert ex.statistics().reconnects == 0


def short_exit_status(chan: paramiko.Channel) -> None:
    send_raw(chan, cMSG_CHANNEL_REQUEST, "exit-status", False, Raw(b"\x00\x00"))
    chan.shutdown_write()
    chan.close()


def data_past_its_packet(chan: paramiko.Channel) -> None:
    send_raw(chan, cMSG_CHANNEL_DATA, 100, Raw(b"only ten b"))
    finish(chan)


def request_name_not_utf8(chan: paramiko.Channel) -> None:
    send_raw(chan, cMSG_CHANNEL_REQUEST, b"\xff\xfe\xfd", False)
    finish(chan)


def signal_name_not_text(chan: paramiko.Channel) -> None:
    send_raw(chan, cMSG_CHANNEL_REQUEST, "exit-signal", False, b"\x1b[2J", False, "", "")
    chan.shutdown_write()
    chan.close()


@pytest.mark.parametrize("behaviour", [short_exit_status, data_past_its_packet,
                                       request_name_not_utf8, signal_name_not_text],
                         ids=lambda f: f.__name__)
def test_a_malformed_message_on_a_command_channel_is_a_protocol_error(hostile, behaviour):
    server = hostile({b"bad": behaviour})
    with SSHExecutor(**server.parameters(on_disconnect_retry=3)) as ex:
        with pytest.raises(ExecutorFailure, match="protocol error") as caught:
            ex.run_command("bad", timeout=30)
        assert not isinstance(caught.value, ConnectionLost)
        assert "\x1b" not in str(caught.value)
        assert ex.run_command("sync", timeout=30).exit_code == 0
        assert ex.statistics().reconnects == 0
    assert server.connections == 1


# --- fork and jump hosts ----------------------------------------------------------------------


def in_child(check: Callable[[], bool]) -> bool:
    """Whether ``check()`` holds in a forked child (which exits at once, bounded wait)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if check() else 1)
        finally:
            os._exit(2)
    try:
        return reap(pid, 15) == 0
    except AssertionError:
        return False  # it hung


def test_the_slot_release_lock_is_free_in_a_forked_child():
    with channel_module._RELEASE_LOCK:
        assert in_child(lambda: channel_module._RELEASE_LOCK.acquire(timeout=5))


def test_a_failing_transport_over_a_jump_host_closes_the_jump_connection(make_sshd, tmp_path):
    server = make_sshd(max_sessions=10)
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host hop\n  HostName 127.0.0.1\n  Port {server.port}\n  User {server.username}\n"
        f"  IdentityFile {server.client_key_path}\n"
        f"  UserKnownHostsFile {server.known_hosts_path}\n"
        f"Host target\n  HostName 127.0.0.1\n  Port {server.port}\n  ProxyJump hop\n")

    def refuse(sock: Any, **kwargs: Any) -> paramiko.Transport:
        raise ValueError("no transport over this socket")

    ex = SSHExecutor(host="target", config=str(config), transport_factory=refuse,
                     connect_retries=0)
    try:
        with pytest.raises(ExecutorFailure, match="no transport"):
            ex.run_command("true")
        wait_for(lambda: not server.serving_pids(), "the jump host's connection to end",
                 timeout=20)
    finally:
        ex.close()


# --- pickling keys ----------------------------------------------------------------------------


def ed25519_key() -> paramiko.PKey:
    text = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()).decode()
    return paramiko.Ed25519Key.from_private_key(io.StringIO(text))


@pytest.mark.parametrize("make_key", [
    lambda: paramiko.RSAKey.generate(2048),
    lambda: paramiko.ECDSAKey.generate(),
    ed25519_key,
], ids=["rsa", "ecdsa", "ed25519"])
@pytest.mark.parametrize("passphrase", [None, "a passphrase"])
def test_an_executor_with_a_pkey_pickles_round_trip(make_key, passphrase):
    key = make_key()
    ex = SSHExecutor(host="127.0.0.1", pkey=key, passphrase=passphrase, known_hosts=None,
                     config=())
    copy = pickle.loads(pickle.dumps(ex))
    loaded: Optional[paramiko.PKey] = copy._arguments["pkey"]
    assert type(loaded) is type(key)
    assert loaded.asbytes() == key.asbytes()
    signature = loaded.sign_ssh_data(b"proof of the private half")
    public = type(key)(data=key.asbytes())
    assert public.verify_ssh_sig(b"proof of the private half", Message(signature.asbytes()))
