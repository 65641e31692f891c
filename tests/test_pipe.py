"""The pipe of one forwarded connection against a server that ignores the window it was granted.

Each test runs a `Pipe` over a real ``direct-tcpip`` channel between two
paramiko transports on a socket pair, with a real TCP connection on the local
side; the server's side sends raw channel messages, as no honest server would.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Iterator, Tuple

import pytest
from helpers import HostileForward, wait_for
from paramiko.common import cMSG_CHANNEL_DATA, cMSG_CHANNEL_EXTENDED_DATA

from paramiko_executor.pipe import Pipe

#: The receive window the client grants each test's channel.
WINDOW = 256 * 1024


class Forward(HostileForward):
    """A hostile forwarded channel and a local TCP connection for its pipe."""

    def __init__(self) -> None:
        super().__init__(WINDOW)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            # Small kernel buffers: a peer that does not read stops the pipe soon.
            self.peer = socket.socket()
            self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            self.peer.settimeout(10)
            self.peer.connect(listener.getsockname())
            self.local, _ = listener.accept()
            self.local.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        self.pipe: Pipe = None  # type: ignore[assignment]  # started by `start`
        self.thread: threading.Thread = None  # type: ignore[assignment]

    def start(self) -> None:
        self.pipe = Pipe(self.local, self.chan, "test")
        self.thread = threading.Thread(target=self.pipe.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.peer.close()
        super().close()
        if self.thread is not None:
            self.thread.join(10)
            assert not self.thread.is_alive()


@pytest.fixture
def forward() -> Iterator[Forward]:
    made = Forward()
    yield made
    made.close()


def read_until_reset(sock: socket.socket, limit: int) -> Tuple[int, bool]:
    """(bytes read, whether the connection was reset) once it ended or ``limit`` bytes came."""
    total = 0
    while total < limit:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return total, True
        if not data:
            return total, False
        total += len(data)
    return total, False


def test_data_past_the_window_resets_the_forwarded_connection(forward: Forward, caplog: Any
                                                              ) -> None:
    """Was: paramiko buffered whatever the server sent, window or not (memory without bound)."""
    forward.start()
    blob = b"x" * 32768
    with caplog.at_level(logging.WARNING, logger="paramiko_executor.tunnels"):
        # The peer reads nothing yet: the pipe gives back only what the kernel took.
        for _ in range(8 * WINDOW // len(blob)):
            forward.send(cMSG_CHANNEL_DATA, blob)
        forward.thread.join(10)
        total, was_reset = read_until_reset(forward.peer, 16 * WINDOW)
    assert was_reset, f"{total} bytes arrived and no reset"
    assert total <= 8 * WINDOW
    assert "the server broke the protocol" in caplog.text
    assert "bytes of window left" in caplog.text
    assert forward.pipe.held <= WINDOW


def test_extended_data_on_a_forwarded_channel_is_dropped(forward: Forward) -> None:
    """Was: kept in a buffer nothing reads, whatever the window (memory without bound)."""
    forward.start()
    for _ in range(8):
        forward.send(cMSG_CHANNEL_EXTENDED_DATA, b"e" * WINDOW, 1)
    forward.send(cMSG_CHANNEL_DATA, b"end")
    assert forward.peer.recv(3) == b"end"  # everything before it was handled
    assert len(forward.chan.in_stderr_buffer) == 0
    assert forward.thread.is_alive()


def test_what_arrived_before_the_pipe_started_comes_first(forward: Forward) -> None:
    """The pipe takes over a channel that may have received data already: nothing is lost
    and the order holds (a target that greets its client speaks before the pipe starts)."""
    forward.far.sendall(b"hello, ")
    wait_for(lambda: len(forward.chan.in_buffer) == 7, "the greeting to arrive")
    forward.start()
    forward.far.sendall(b"world")
    forward.far.shutdown_write()
    forward.peer.settimeout(10)
    received = b""
    while True:
        data = forward.peer.recv(100)
        if not data:
            break
        received += data
    assert received == b"hello, world"


@pytest.mark.parametrize("reply", ["none", "unread"])
def test_an_abort_resets_the_local_peer_while_a_send_on_the_channel_is_stuck(
        forward: Forward, reply: str) -> None:
    """Was: the local socket was closed only once both of the pipe's threads had ended, and
    one stuck sending on the channel (here: behind another message stuck on TCP, which holds
    the transport's send lock) held the peer's connection open. With ``reply`` "unread" the
    other thread is inside a write to the socket at the abort: the close is left to it."""
    if reply == "unread":
        # More than the kernel's buffers hold, taken by the pipe in one piece at its start:
        # its writing thread waits on the socket until the abort.
        forward.far.sendall(b"r" * (WINDOW // 2))
        wait_for(lambda: len(forward.chan.in_buffer) == WINDOW // 2, "the reply to arrive")
    forward.peer.settimeout(10)
    with forward.client.clear_to_send_lock:
        forward.start()
        forward.peer.sendall(b"request")
        gate = forward.pipe._inbox.gate
        wait_for(lambda: bool(gate._sending), "the pipe's send to be stuck inside the gate")
        forward.pipe.abort()
        total, was_reset = read_until_reset(forward.peer, WINDOW)
        assert was_reset, f"{total} bytes arrived and no reset"
        assert forward.thread.is_alive()  # the stuck send, which ends with the lock below
    forward.thread.join(10)
    assert not forward.thread.is_alive()
    assert forward.local.fileno() == -1
