"""Attacks on the coalesced wake-ups: a command's end, the dropped handshake timer, group calls.

Against a real OpenSSH sshd: commands ending at every moment relative to
each other, timeouts, signals, live output, rekeys mid-command, and group
calls over many hosts, each bounded in time so a lost wake-up fails rather
than hangs.
"""

from __future__ import annotations

import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

import paramiko

from paramiko_executor import SSHExecutor
from paramiko_executor.internals import drop_handshake_timer


class _TimerCheckedAcrossTheDrop:
    """paramiko's handshake timer, holding the transport thread inside ``complete_handshake``.

    ``complete_handshake`` reads the timer twice (``if self.__timer:`` then
    ``self.__timer.cancel()``); this one lets another thread run between the
    two reads, as a thread switch there would.
    """

    def __init__(self) -> None:
        self.checking = threading.Event()
        self.dropped = threading.Event()
        self._raced = False

    def __bool__(self) -> bool:
        if not self._raced and sys._getframe(1).f_code.co_name == "complete_handshake":
            self._raced = True
            self.checking.set()
            self.dropped.wait(5)
        return True

    def cancel(self) -> None:
        pass


def _logged_in_transport(server: Any) -> paramiko.Transport:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=10)
    key = paramiko.PKey.from_path(server.client_key_path)
    transport.auth_publickey(server.username, key)
    return transport


def test_dropping_the_handshake_timer_between_paramikos_two_reads_keeps_the_transport(
        sshd: Any) -> None:
    # The drop runs on the caller's thread right after login, while the
    # transport thread handles the server's messages (OpenSSH sends its host
    # keys then): a None between paramiko's check and its cancel() was an
    # AttributeError in the transport thread, which ended the connection.
    transport = _logged_in_transport(sshd)
    try:
        timer = _TimerCheckedAcrossTheDrop()
        transport.packetizer._Packetizer__timer = timer  # type: ignore[attr-defined]
        # Any message the server sends makes the transport thread check the timer.
        transport.global_request("keepalive@openssh.com", wait=False)
        assert timer.checking.wait(10)
        drop_handshake_timer(transport)
        timer.dropped.set()
        channel = transport.open_session(timeout=10)
        channel.exec_command("echo alive")
        channel.settimeout(10)
        assert channel.makefile("rb").read() == b"alive\n"
        assert transport.is_active()
    finally:
        transport.close()
