"""Server-provided text never reaches a message, a log record or a terminal raw.

A small hostile server (paramiko's server side, started here on 127.0.0.1) puts ESC, other
C0 and C1 control characters into every text the SSH protocol lets it choose: its version
banner, a disconnect reason, a keyboard-interactive prompt, a channel open failure, an exit
signal's name and message, an SFTP status message. What the executor raises (and what its
CLI prints) must show them escaped by `paramiko_executor.text.printable`.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional

import paramiko
import pyotp
import pytest
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    MSG_CHANNEL_OPEN,
    OPEN_SUCCEEDED,
    cMSG_CHANNEL_OPEN_FAILURE,
    cMSG_CHANNEL_REQUEST,
    cMSG_DISCONNECT,
)
from paramiko.message import Message
from paramiko.server import InteractiveQuery

from paramiko_executor import CommandExecutionFailure, ExecutorFailure, SSHExecutor
from paramiko_executor.internals import wrap_handlers
from paramiko_executor.text import printable

#: Terminal escape sequences (OSC title, clear screen, colour), a bell, C0 and C1 controls.
HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31m\x00\x08\r\x9b31m\x85\u202e"
RAW = ("\x1b", "\x07", "\x00", "\x08", "\r", "\x9b", "\x85", "\u202e")


def assert_escaped(text: str) -> None:
    """No raw control character of HOSTILE in ``text``, and the escaped form present."""
    assert not [char for char in RAW if char in text], repr(text)
    assert "\\x1b]0;owned\\x07" in text, text


class Hostile(paramiko.ServerInterface):
    """Accepts a password login (or asks a hostile keyboard-interactive prompt)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.transport: Optional[paramiko.Transport] = None

    def get_allowed_auths(self, username: str) -> str:
        return "keyboard-interactive" if self.mode == "prompt" else "password"

    def check_auth_password(self, username: str, password: str) -> int:
        if self.mode == "disconnect":
            assert self.transport is not None
            message = Message()
            message.add_byte(cMSG_DISCONNECT)
            message.add_int(2)  # SSH_DISCONNECT_PROTOCOL_ERROR
            message.add_string(f"bye{HOSTILE}")
            message.add_string("")
            self.transport._send_message(message)  # type: ignore[attr-defined]
            return AUTH_FAILED
        return AUTH_SUCCESSFUL

    def check_auth_interactive(self, username: str, submethods: str) -> Any:
        return InteractiveQuery(f"name{HOSTILE}", f"instructions{HOSTILE}",
                                (f"Code{HOSTILE}:", False))

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        if self.mode == "signal":
            threading.Thread(target=_exit_signal, args=(channel,), daemon=True).start()
        return True

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        return super().check_channel_subsystem_request(channel, name)


def _exit_signal(channel: paramiko.Channel) -> None:
    """Report the command killed by a "signal" whose name and message are hostile."""
    message = Message()
    message.add_byte(cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("exit-signal")
    message.add_boolean(False)
    message.add_string(f"KILL{HOSTILE}")
    message.add_boolean(False)
    message.add_string(f"core{HOSTILE}")
    message.add_string("")
    channel.transport._send_user_message(message)  # type: ignore[union-attr]
    channel.shutdown_write()
    channel.close()


def _refuse_opens(transport: paramiko.Transport) -> None:
    """Answer every channel open with a refusal whose text is hostile."""

    def wrap(original: Callable[..., None]) -> Callable[..., None]:
        def handle(*args: Any) -> None:
            m = args[-1]
            m.get_text()  # kind
            chanid = m.get_int()
            reply = Message()
            reply.add_byte(cMSG_CHANNEL_OPEN_FAILURE)
            reply.add_int(chanid)
            reply.add_int(1)  # SSH_OPEN_ADMINISTRATIVELY_PROHIBITED
            reply.add_string(f"no{HOSTILE}")
            reply.add_string("en")
            transport._send_message(reply)  # type: ignore[attr-defined]
        return handle

    wrap_handlers(transport, {}, {MSG_CHANNEL_OPEN: wrap})


class _HostileSFTP(paramiko.SFTPServer):
    """An SFTP server whose every status reply carries a hostile message."""

    def _send_status(self, request_number: int, code: int, desc: Any = None) -> None:
        super()._send_status(request_number, code, f"gone{HOSTILE}")  # type: ignore[misc]


@pytest.fixture
def hostile_server() -> Iterator[Callable[[str], int]]:
    """``start(mode)``: a one-connection hostile SSH server on 127.0.0.1; returns its port."""
    listeners: List[socket.socket] = []
    transports: List[paramiko.Transport] = []
    host_key = paramiko.ECDSAKey.generate()

    def start(mode: str) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(30)
        listeners.append(listener)

        def serve() -> None:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(sock)
            transports.append(transport)
            transport.add_server_key(host_key)
            transport.set_subsystem_handler("sftp", _HostileSFTP, paramiko.SFTPServerInterface)
            if mode == "refuse":
                _refuse_opens(transport)
            server = Hostile(mode)
            server.transport = transport
            try:
                transport.start_server(server=server)
            except (paramiko.SSHException, EOFError, OSError):
                return

        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for transport in transports:
        transport.close()
    for listener in listeners:
        listener.close()


def executor(port: int, **kwargs: Any) -> SSHExecutor:
    options: Dict[str, Any]
    options = dict(host="127.0.0.1", port=port, username="u", password="p", known_hosts=None,
                   connect_retries=0, look_for_keys=False, allow_agent=False, max_sessions=2,
                   timeout=20, auth_timeout=20, banner_timeout=20)
    options.update(kwargs)
    return SSHExecutor(**options)


# -- the places ---------------------------------------------------------------------------------


def test_version_banner(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.sendall(f"{HOSTILE}\r\nSSH-2.0-evil{HOSTILE}\r\n".encode()
                         + b"\x00\x00\x00\x0c\x0a\x14" + b"\xff" * 64)
            conn.settimeout(10)
            try:
                conn.recv(65536)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(ExecutorFailure) as info:
            executor(listener.getsockname()[1]).run_command("true")
    finally:
        listener.close()
        thread.join(timeout=30)
    assert not [char for char in RAW if char in str(info.value)], repr(str(info.value))


def test_disconnect_reason(hostile_server):
    with pytest.raises(ExecutorFailure) as info:
        executor(hostile_server("disconnect")).run_command("true")
    assert_escaped(str(info.value))


def test_keyboard_interactive_prompt(hostile_server):
    with pytest.raises(ExecutorFailure) as info:
        # A secret of its own: no other login (another test, another run) spent its step.
        executor(hostile_server("prompt"), password=None,
                 mfa_config=[{"prompt": "Other:", "totp": pyotp.random_base32()}]
                 ).run_command("true")
    assert_escaped(str(info.value))


def test_exit_signal_name(hostile_server):
    # A signal name that is not printable US-ASCII is a protocol error (not quoted at all);
    # either way nothing of it reaches the message raw.
    with executor(hostile_server("signal")) as ex:
        with pytest.raises((CommandExecutionFailure, ExecutorFailure)) as info:
            ex.run_command("true")
    assert not [char for char in RAW if char in str(info.value)], repr(str(info.value))


def test_channel_open_failure_text(hostile_server, caplog):
    caplog.set_level(logging.DEBUG)
    with executor(hostile_server("refuse"), channel_timeout=2) as ex:
        with pytest.raises(ExecutorFailure) as info:
            ex.run_command("true")
    texts = [str(info.value)] + [record.getMessage() for record in caplog.records]
    assert any("owned" in text for text in texts)
    for text in texts:
        assert not [char for char in RAW if char in text], repr(text)


def test_sftp_status_message(hostile_server, tmp_path):
    with executor(hostile_server("sftp")) as ex:
        with pytest.raises((OSError, ExecutorFailure)) as info:
            ex.get("/no/such/file", str(tmp_path / "local"))
    assert_escaped(str(info.value))


# -- the escaping itself ------------------------------------------------------------------------


def test_printable_escapes_every_control_character():
    controls = [chr(code) for code in list(range(0x20)) + list(range(0x7f, 0xa0))]
    text = printable("".join(controls) + "\u202e\u200b\u2028\ufeff")
    assert text.isprintable() and "\\x1b" in text and "\\x9b" in text and "\\u202e" in text
    assert printable("plain: ünïcode, tabs? no") == "plain: ünïcode, tabs? no"


def test_cli_verbose_log_of_the_version_string(tmp_path):
    import subprocess
    import sys

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.sendall(f"SSH-2.0-evil{HOSTILE}\r\n".encode() + b"\x00\x00\x00\x0c\x0a\x14"
                         + b"\xff" * 64)
            conn.settimeout(10)
            try:
                conn.recv(65536)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "paramiko_executor", "probe", "-v", "--host", "127.0.0.1",
             "--port", str(listener.getsockname()[1]), "--known-hosts", str(tmp_path / "kh"),
             "-F", "none", "--connect-retries", "0"],
            capture_output=True, timeout=60, check=False)
    finally:
        listener.close()
        thread.join(timeout=30)
    err = done.stderr.decode("utf-8", "replace")
    assert "evil" in err  # the records are shown...
    assert not [char for char in RAW if char in err.replace("\n", "")], repr(err)  # ...escaped
