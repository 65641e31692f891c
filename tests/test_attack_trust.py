"""Issue 19 attacked by someone who did not write it: hostile servers and local attackers.

Each test reproduces one thing the attack found broken (it failed on the main of the
time); the hostile servers are small paramiko servers on 127.0.0.1, the SFTP one is
`test_files_trust.HostileSFTPServer` with a behaviour of its own where a scenario of
replies cannot say it.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import socket
import stat
import struct
import threading
import time
from contextlib import suppress
from typing import Any, Callable, Dict, Iterator, List

import paramiko
import pytest
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_SUCCEEDED,
    cMSG_CHANNEL_DATA,
    cMSG_CHANNEL_SUCCESS,
)
from paramiko.message import Message
from test_files_trust import FXP, HostileSFTPServer, good_reply, packet, read_packet, status, string
from test_origin import HostileServer, finish, send_raw

from paramiko_executor import (
    AuthenticationFailure,
    ExecutorFailure,
    ShellExecutor,
    SSHExecutor,
    TransferTimeout,
)
from paramiko_executor import transfer as transfer_module
from paramiko_executor.errors import AuthenticationInterrupted
from paramiko_executor.output import LineSplitter
from paramiko_executor.totp import TOTPLedger

_U32 = struct.Struct(">I")
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e"


def raw_controls(text: str) -> List[str]:
    """The characters of ``text`` that would drive a terminal (C0, DEL, C1, bidi overrides)."""
    return [c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c == "\u202e"]


class AttackSFTPServer(HostileSFTPServer):
    """A `HostileSFTPServer` whose subsystem is ``behaviour(server, channel)`` after INIT."""

    def __init__(self, directory: Any, behaviour: Callable[[Any, paramiko.Channel], None]
                 ) -> None:
        self.behaviour = behaviour
        self.done = threading.Event()
        super().__init__(directory, {})

    def serve(self, chan: paramiko.Channel) -> None:
        chan.settimeout(30)
        try:
            read_packet(chan)  # INIT
            self.behaviour(self, chan)
        except (EOFError, OSError, paramiko.SSHException):
            pass
        finally:
            self.done.set()


@pytest.fixture
def attack(tmp_path: Any) -> Iterator[Callable[..., AttackSFTPServer]]:
    servers: List[AttackSFTPServer] = []

    def make(behaviour: Callable[[Any, paramiko.Channel], None]) -> AttackSFTPServer:
        directory = tmp_path / f"attack-{len(servers)}"
        directory.mkdir()
        servers.append(AttackSFTPServer(directory, behaviour))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def send_data_unchecked(chan: paramiko.Channel, data: bytes) -> None:
    """Channel data sent whatever window the client granted (paramiko's sendall waits for it)."""
    m = Message()
    m.add_byte(cMSG_CHANNEL_DATA)
    m.add_int(chan.remote_chanid)
    m.add_string(data)
    chan.transport._send_user_message(m)  # type: ignore[union-attr]


# --- SFTP: a limits@openssh.com request never answered ----------------------------------------


def version_then_silence(server: Any, chan: paramiko.Channel) -> None:
    chan.sendall(packet(FXP["VERSION"], _U32.pack(3), string(b"limits@openssh.com"),
                        string(b"1")))
    while True:  # reads every request, answers none
        read_packet(chan)


@pytest.mark.parametrize("timeout", [None, 20.0])
def test_a_server_silent_after_its_version_is_an_executor_failure(attack, tmp_path, monkeypatch,
                                                                  timeout):
    """Was: with no timeout, `TypeError: unsupported format string passed to NoneType`."""
    monkeypatch.setattr(transfer_module, "NEGOTIATION_TIMEOUT", 1.0)
    server = attack(version_then_silence)
    with SSHExecutor(**server.executor_parameters()) as ex:
        for call in (lambda: ex.get("/file", str(tmp_path / "copy"), timeout=timeout),
                     lambda: ex.put(io.BytesIO(b"data"), "/file", timeout=timeout)):
            with pytest.raises(ExecutorFailure, match="did not start SFTP"):
                call()
        assert ex.statistics().reconnects == 0


# --- SFTP: a version the client never offered --------------------------------------------------


@pytest.fixture
def hostile_sftp(tmp_path: Any) -> Iterator[Callable[[Dict[str, Any]], HostileSFTPServer]]:
    servers: List[HostileSFTPServer] = []

    def make(scenario: Dict[str, Any]) -> HostileSFTPServer:
        directory = tmp_path / f"hostile-{len(servers)}"
        directory.mkdir()
        servers.append(HostileSFTPServer(directory, scenario))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.mark.parametrize("version", [4, 6, 0xFFFFFFFF])
def test_a_version_above_the_clients_is_a_protocol_error(hostile_sftp, tmp_path, version):
    """Was: taken as version 3, whose ATTRS (the modes `get` gives) read differently."""
    server = hostile_sftp({"version": packet(FXP["VERSION"], _U32.pack(version))})
    with SSHExecutor(**server.executor_parameters()) as ex:
        with pytest.raises(ExecutorFailure, match=f"SFTP protocol error.*version {version}"):
            ex.get("/file", str(tmp_path / "copy"), timeout=30)
    assert not (tmp_path / "copy").exists()


# --- SFTP: data past the window -----------------------------------------------------------------


def overrun_while_the_client_sends(server: Any, chan: paramiko.Channel) -> None:
    """Take the upload's first requests, stop reading (the client's send window runs out),
    and send the client three windows' worth of data it never granted."""
    chan.sendall(packet(FXP["VERSION"], _U32.pack(3)))
    for _ in range(5):  # STAT and OPEN, and the probe's OPEN, LSTAT and REMOVE, sent at once
        chan.sendall(good_reply(*read_packet(chan)))
    # Unread, the client's WRITEs fill this side's window: the client blocks in its send.
    for _ in range(3000):
        if len(chan.in_buffer) + chan.in_window_sofar >= chan.in_window_size:
            break
        threading.Event().wait(0.01)
    granted = chan.out_window_size
    # A reply's length first: a client that reads it waits for a whole MiB that never comes.
    send_data_unchecked(chan, _U32.pack(1 << 20))
    server.overrun = 4
    blob = b"\0" * 32768
    while server.overrun < 3 * granted and chan.transport.is_active():  # type: ignore[union-attr]
        send_data_unchecked(chan, blob)
        server.overrun += len(blob)
    server.done.wait(60)


@pytest.mark.hang_timeout(120)
def test_an_sftp_server_overrunning_the_window_ends_the_transfer(attack):
    """Was: paramiko buffered all of it (the client grew by whatever the server sent) and the
    upload ended only at its timeout, as a `TransferTimeout`."""
    server = attack(overrun_while_the_client_sends)
    with SSHExecutor(**server.executor_parameters()) as ex:
        with pytest.raises(ExecutorFailure, match="SFTP protocol error.*window") as caught:
            ex.put(io.BytesIO(b"x" * (16 << 20)), "/file", timeout=60)
        assert "timed out" not in str(caught.value)
        assert ex.statistics().reconnects == 0


# --- SFTP: a download whose first block never comes ---------------------------------------------


def withhold_the_first_block(server: Any, chan: paramiko.Channel) -> None:
    """A file of 1 TiB whose every block is served, but the first: the client can write
    nothing, and whatever it reads ahead it must hold. Ends the READ of block 0 with an
    error once the client asked past 64 MiB, or asked nothing more for 2 s."""
    chan.sendall(packet(FXP["VERSION"], _U32.pack(3)))
    first = None
    server.furthest = 0
    chan.settimeout(2)
    while True:
        try:
            kind, request_id, payload = read_packet(chan)
        except socket.timeout:
            break
        rid = _U32.pack(request_id)
        if kind == FXP["OPEN"]:
            chan.sendall(packet(FXP["HANDLE"], rid, string(b"h")))
        elif kind == FXP["FSTAT"]:
            chan.sendall(packet(FXP["ATTRS"], rid, _U32.pack(0x5), struct.pack(">QI", 1 << 40,
                                                                                0o100644)))
        elif kind == FXP["READ"]:
            offset, length = struct.unpack(">QI", payload[-12:])
            server.furthest = max(server.furthest, offset + length)
            if offset == 0:
                first = request_id
            else:
                chan.sendall(packet(FXP["DATA"], rid, string(b"x" * length)))
            if server.furthest > 64 << 20:
                break
        else:
            chan.sendall(status(request_id, 0))
    if first is not None:
        chan.sendall(status(first, 4, b"enough"))
    server.done.wait(30)


@pytest.mark.hang_timeout(120)
def test_a_download_reads_ahead_of_what_it_wrote_by_a_bounded_amount(attack, tmp_path):
    """Was: it asked for block after block while block 0 was missing, holding them all: a
    server withholding one reply made the client hold the whole file in memory."""
    server = attack(withhold_the_first_block)
    with SSHExecutor(**server.executor_parameters()) as ex:
        with pytest.raises(ExecutorFailure, match="enough"):
            ex.get("/file", str(tmp_path / "copy"), timeout=60)
    assert 0 < server.furthest <= transfer_module.IN_FLIGHT + transfer_module.MAX_BLOCK
    assert not (tmp_path / "copy").exists()


# --- authentication: the server's list of methods -----------------------------------------------


class _MethodsInterface(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "password," + ESCAPES

    def check_auth_password(self, username: str, password: str) -> int:
        return AUTH_FAILED


@pytest.fixture
def methods_server() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    transports: List[paramiko.Transport] = []
    host_key = paramiko.ECDSAKey.generate()

    def serve() -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        transport = paramiko.Transport(sock)
        transport.local_version = "SSH-2.0-" + ESCAPES  # what paramiko logs as it connects
        transport.add_server_key(host_key)
        transports.append(transport)
        with suppress(paramiko.SSHException, EOFError, OSError):  # the client may go first
            transport.start_server(server=_MethodsInterface())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    thread.join(15)
    for transport in transports:
        transport.close()


def test_the_servers_method_names_are_escaped_in_an_authentication_failure(methods_server):
    """Was: "server allows: password, <ESC>]0;pwned<BEL>..." raw in the exception text."""
    parameters: Dict[str, Any] = dict(
        host="127.0.0.1", port=methods_server, username="u", password="p", known_hosts=None,
        config=(), allow_agent=False, look_for_keys=False, connect_retries=0)
    with SSHExecutor(**parameters) as ex:
        with pytest.raises(AuthenticationFailure) as caught:
            ex.run_command("true", timeout=30)
    text = str(caught.value)
    assert "server allows" in text and "\\x1b]0;pwned" in text
    assert raw_controls(text) == []


def test_paramikos_records_on_the_executors_transports_are_escaped(methods_server, caplog):
    """Was: "Remote version/idstring: SSH-2.0-<ESC>]0;pwned..." raw to the application's
    handlers (before the host key is even checked)."""
    caplog.set_level(logging.DEBUG)
    with SSHExecutor(host="127.0.0.1", port=methods_server, username="u", password="p",
                     known_hosts=None, config=(), allow_agent=False, look_for_keys=False,
                     connect_retries=0) as ex:
        with pytest.raises(AuthenticationFailure):
            ex.run_command("true", timeout=30)
    ours = [r.getMessage() for r in caplog.records
            if r.name.startswith(("paramiko_executor", "paramiko.transport.paramiko_executor"))]
    assert any("Remote version" in message and "\\x1b]0;pwned" in message for message in ours)
    assert [message for message in ours if raw_controls(message)] == []


# --- a command's channel: replies to requests never sent --------------------------------------

UNSOLICITED = 20000


@pytest.fixture
def command_server() -> Iterator[Callable[..., HostileServer]]:
    """`test_origin.HostileServer`: each exec'd command answered as its behaviour says."""
    servers: List[HostileServer] = []

    def make(behaviours: Dict[bytes, Callable[[paramiko.Channel], None]]) -> HostileServer:
        servers.append(HostileServer(behaviours))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def test_replies_to_requests_never_sent_are_not_kept(command_server: Any) -> None:
    """Was: each one kept for the life of the command (a server grew the client's memory at
    the rate it sent them). OpenSSH's client drops them too."""
    looked = threading.Event()

    def unsolicited_replies(chan: paramiko.Channel) -> None:
        for _ in range(UNSOLICITED):
            send_raw(chan, cMSG_CHANNEL_SUCCESS)
        chan.sendall(b"marker\n")
        looked.wait(30)  # the channel (and its record of replies) lives until then
        finish(chan)

    server = command_server({b"replies": unsolicited_replies})
    kept: List[int] = []
    with SSHExecutor(**server.parameters()) as ex:

        def on_output(stream: str, line: Any) -> None:
            # The transport thread handles a channel's messages in order: every reply is in.
            sessions = ex._connection.link.sessions.values()  # type: ignore[union-attr]
            kept.append(max(len(session.replies) for session in sessions))
            looked.set()

        result = ex.run_command("replies", on_output=on_output, timeout=60)
        assert result.stdout == "marker\n"
        assert ex.statistics().reconnects == 0
    assert kept and kept[0] <= 1, kept



# --- live output: a line that never ends -------------------------------------------------------


class CountingChunk(bytes):
    """A chunk of output that counts the bytes copied in front of it (``earlier + chunk``)."""

    copied = 0

    def __radd__(self, earlier: bytes) -> bytes:
        CountingChunk.copied += len(earlier)
        return bytes(earlier) + bytes(self)


def test_a_line_that_never_ends_is_not_copied_again_per_chunk(monkeypatch):
    """Was: each chunk copied the whole unterminated piece again, quadratic in the line's
    length: a progress bar drawn with \r for hours (or 40 MB of a binary in 32 KiB chunks:
    94 s) grew slower with every chunk. Now the pieces are joined once, when the line ends."""
    monkeypatch.setattr(CountingChunk, "copied", 0)
    lines: List[bytes] = []
    splitter = LineSplitter("stdout", lambda stream, line: lines.append(line), None)
    chunks = 2000
    for _ in range(chunks):
        splitter.feed(CountingChunk(b"\r 42% [====>    ]"))
    splitter.feed(CountingChunk(b"\rdone\nnext"))
    splitter.finish()
    assert lines == [b"\r 42% [====>    ]" * chunks + b"\rdone\n", b"next"]
    assert CountingChunk.copied <= 2 * len(lines[0])


# --- the TOTP ledger: directories it makes ---------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_the_ledgers_missing_parent_directories_are_made_owner_only(tmp_path, umask):
    """Was: only the ledger's own directory was 0700; its missing parents (``~/.cache`` on
    a fresh account) got 0777 less the umask: writable by every local user under umask 0.
    The XDG base directory specification asks for 0700."""
    path = tmp_path / "home" / ".cache" / "paramiko_executor" / "totp-ledger"
    ledger = TOTPLedger(clock=lambda: 1_000_040.0, wait=lambda delay: None, path=str(path))
    previous = os.umask(umask)
    try:
        ledger.issue("JBSWY3DPEHPK3PXP")
    finally:
        os.umask(previous)
    for directory in (tmp_path / "home", tmp_path / "home" / ".cache", path.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert path.exists()


# --- ShellExecutor's files: the timeout ------------------------------------------------------


class SlowSource(io.RawIOBase):
    """A pipe-like source: one byte every 0.2 s, 100 of them (20 s in all)."""

    def __init__(self) -> None:
        self.left = 100

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.left:
            return 0
        threading.Event().wait(0.2)
        self.left -= 1
        buffer[0] = 0x78
        return 1


def test_shell_executor_put_ends_at_its_timeout(tmp_path):
    """Was: ``timeout`` checked and then ignored: a slow (or endless: /dev/zero) source
    copied for as long as it gave data, past any timeout."""
    target = tmp_path / "copy"
    source = SlowSource()
    with pytest.raises(TransferTimeout, match="timed out after 1 s"):
        ShellExecutor().put(source, str(target), timeout=1)
    assert source.left > 0  # it stopped reading the source at the timeout
    assert list(tmp_path.iterdir()) == []


class SlowSink(io.RawIOBase):
    """A pipe-like target: each write takes 0.2 s."""

    def __init__(self) -> None:
        self.writes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        threading.Event().wait(0.2)
        self.writes += 1
        return len(data)


def test_shell_executor_get_ends_at_its_timeout(tmp_path):
    source = tmp_path / "sparse"
    with open(source, "wb") as file:
        file.truncate(100 * transfer_module.LOCAL_BLOCK)  # 100 writes: 20 s
    sink = SlowSink()
    with pytest.raises(TransferTimeout, match="timed out after 1 s"):
        ShellExecutor().get(str(source), sink, timeout=1)
    assert 0 < sink.writes < 100


def test_ssh_executor_put_from_a_slow_source_ends_at_its_timeout(hostile_sftp):
    """Was: a block was filled from the source whatever the time (255 KiB from a pipe that
    gives a byte a second: three days), the timeout looked at only once it was sent."""
    server = hostile_sftp({})
    with SSHExecutor(**server.executor_parameters()) as ex:
        source = SlowSource()
        with pytest.raises(TransferTimeout, match="timed out after 1 s"):
            ex.put(source, "/file", timeout=1)
    assert source.left > 0  # it stopped reading the source at the timeout


# --- remote forwards: the address a forwarded connection names -------------------------------


class _ForwardingInterface(paramiko.ServerInterface):
    def __init__(self) -> None:
        self.forwarded = threading.Event()

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED

    def check_port_forward_request(self, address: str, port: int) -> int:
        self.forwarded.set()
        return port or 40000


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_address_of_a_forwarded_connection_is_escaped_in_the_log(caplog):
    """Was: "a forwarded connection to <ESC>]0;pwned... matches no open remote forward", the
    server's text raw in the library's own INFO record. (And the thread closing that
    channel died with the connection's error when the executor closed first.)"""
    caplog.set_level(logging.INFO, logger="paramiko_executor")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    interface = _ForwardingInterface()
    transports: List[paramiko.Transport] = []

    def serve() -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        transport = paramiko.Transport(sock)
        transport.add_server_key(paramiko.ECDSAKey.generate())
        transports.append(transport)
        with suppress(paramiko.SSHException, EOFError, OSError):  # the client may go first
            transport.start_server(server=interface)
        if interface.forwarded.wait(30):
            with suppress(paramiko.SSHException):  # the client closes it: it matches nothing
                transport.open_forwarded_tcpip_channel(("127.0.0.1", 1), (ESCAPES, 40001))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with SSHExecutor(host="127.0.0.1", port=listener.getsockname()[1], username="u",
                     password="p", known_hosts=None, config=(), allow_agent=False,
                     look_for_keys=False, connect_retries=0, max_sessions=4) as ex:
        with ex.forward_remote(40000, 9):
            for _ in range(300):  # 30 s at most
                if any("matches no open remote forward" in r.getMessage()
                       for r in caplog.records):
                    break
                threading.Event().wait(0.1)
    thread.join(30)
    listener.close()
    for transport in transports:
        transport.close()
    messages = [r.getMessage() for r in caplog.records if "matches no open" in r.getMessage()]
    assert messages and "\\x1b]0;pwned" in messages[0]
    assert raw_controls(messages[0]) == []


# --- the TOTP ledger: a lock another process holds -------------------------------------------


@pytest.mark.parametrize("how", ["deadline", "abandoned"])
def test_a_login_waiting_for_the_ledgers_lock_ends_at_its_deadline_or_close(tmp_path, how):
    """Was: up to 10 s for the lock (a stopped process of the user holding it), whatever the
    login's deadline and whether its connection was closed; then the login went on."""
    path = tmp_path / "ledger" / "totp-ledger"
    ledger = TOTPLedger(path=str(path))
    ledger.issue("JBSWY3DPEHPK3PXP")  # makes the file
    holder = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: as another process's lock
        with pytest.raises(AuthenticationInterrupted, match="lock"):
            if how == "deadline":
                ledger.wait_until_fresh("GEZDGNBVGY3TQOJQ", deadline=time.monotonic() + 0.5)
            else:
                ledger.wait_until_fresh("GEZDGNBVGY3TQOJQ", abandoned=lambda: True)
    finally:
        os.close(holder)
