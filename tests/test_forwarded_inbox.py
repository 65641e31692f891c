"""`open_connection`'s socket against a server that ignores the window it was granted.

The socket reads through the same inbox as a tunnel's pipe (``test_pipe``):
the server's data past the window resets the connection, extended data is
dropped, and the window is given back only as the caller reads. The first
tests run a `ForwardedSocket` over a real ``direct-tcpip`` channel between two
paramiko transports (`helpers.HostileForward`); the last one floods a socket of
`SSHExecutor.open_connection` from the project's test server.
"""

from __future__ import annotations

import logging
import select
from typing import Any, Iterator, List

import paramiko
import pytest
from helpers import HostileForward, call_in_thread, outcome_within, wait_for
from paramiko.common import cMSG_CHANNEL_DATA, cMSG_CHANNEL_EXTENDED_DATA
from paramiko.message import Message

from paramiko_executor import ForwardedSocket, SSHExecutor

#: The receive window the client grants each test's channel.
WINDOW = 256 * 1024

#: The size of each message a flood sends.
PACKET = 32768


class Hostile(HostileForward):
    """A hostile forwarded channel, read through a `ForwardedSocket`."""

    def __init__(self) -> None:
        super().__init__(WINDOW)
        self.released: List[bool] = []
        self.sock = ForwardedSocket(self.chan, lambda: self.released.append(True), "test")

    def handled(self) -> None:
        """Return once the client has handled every message sent so far (a round trip)."""
        outcome = outcome_within(30, lambda: self.server.global_request("sync@test", wait=True))
        assert "error" not in outcome, outcome

    def close(self) -> None:
        self.sock.close()
        super().close()


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    made = Hostile()
    yield made
    made.close()


def test_data_past_the_window_resets_the_forwarded_socket(hostile: Hostile, caplog: Any) -> None:
    """Was: paramiko buffered whatever the server sent (memory without bound), and recv
    returned it as if the stream were sound."""
    blob = b"x" * PACKET
    with caplog.at_level(logging.WARNING, logger="paramiko_executor.tunnels"):
        for _ in range(8 * WINDOW // PACKET):  # the caller reads nothing meanwhile
            hostile.send(cMSG_CHANNEL_DATA, blob)
        hostile.handled()
    assert len(hostile.chan.in_buffer) <= WINDOW
    assert "the server broke the protocol" in caplog.text
    assert "bytes of window left" in caplog.text
    assert select.select([hostile.sock], [], [], 10)[0] == [hostile.sock]  # recv won't block
    with pytest.raises(ConnectionResetError, match="window"):
        hostile.sock.recv(PACKET)
    with pytest.raises(ConnectionResetError):  # again: a reset socket stays reset
        hostile.sock.recv_into(bytearray(10))
    with pytest.raises(ConnectionResetError):
        hostile.sock.sendall(b"more")
    hostile.sock.close()
    assert hostile.released == [True]
    assert hostile.chan.closed


def test_extended_data_on_a_forwarded_socket_is_dropped(hostile: Hostile) -> None:
    """Was: kept in a buffer nothing reads, whatever the window (memory without bound)."""
    for _ in range(8):
        hostile.send(cMSG_CHANNEL_EXTENDED_DATA, b"e" * WINDOW, 1)
    hostile.send(cMSG_CHANNEL_DATA, b"end")
    hostile.sock.settimeout(10)
    assert hostile.sock.recv(3) == b"end"  # everything before it was handled
    assert len(hostile.chan.in_stderr_buffer) == 0


def test_the_window_comes_back_as_the_caller_reads_and_the_stream_is_whole(hostile: Hostile
                                                                           ) -> None:
    """An honest server's stream, many times the window, read in pieces of every size (also
    through paramiko's own ``Channel.recv``): in order, nothing lost, never over the window."""
    stream = bytes(range(256)) * (6 * WINDOW // 256)

    def send() -> None:
        hostile.far.settimeout(30)
        hostile.far.sendall(stream)
        hostile.far.shutdown_write()

    sending = call_in_thread(send)
    sock = hostile.sock
    sock.settimeout(10)
    received = bytearray()
    sizes = [1, 7, 4096, PACKET + 5, 3 * PACKET, WINDOW]
    for reads in range(10_000):
        assert len(sock.channel.in_buffer) <= WINDOW
        size = sizes[reads % len(sizes)]
        data = sock.channel.recv(size) if reads % 5 == 4 else sock.recv(size)
        if not data:
            break
        assert len(data) <= size
        received += data
    sending["thread"].join(30)
    assert "error" not in sending, sending
    assert bytes(received) == stream
    assert sock.recv(1) == b""  # the far end's EOF, again


def test_fileno_is_readable_exactly_while_recv_would_not_block(hostile: Hostile) -> None:
    """Data no longer waits in paramiko's buffer: the inbox sets and clears fileno's event."""
    sock = hostile.sock
    sock.settimeout(0)
    assert select.select([sock], [], [], 0)[0] == []
    with pytest.raises(BlockingIOError):
        sock.recv(1)
    hostile.far.sendall(b"abc")
    assert select.select([sock], [], [], 10)[0] == [sock]
    assert sock.recv(2) == b"ab"
    assert select.select([sock], [], [], 0)[0] == [sock]  # one byte left
    assert sock.recv(2) == b"c"
    assert select.select([sock], [], [], 0)[0] == []
    hostile.far.shutdown_write()
    assert select.select([sock], [], [], 10)[0] == [sock]
    assert sock.recv(1) == b""


def test_what_arrived_before_the_socket_was_made_comes_first() -> None:
    """A target that greets its client may speak before `open_connection` returns."""
    forward = HostileForward(WINDOW)
    try:
        forward.far.sendall(b"hello, ")
        wait_for(lambda: len(forward.chan.in_buffer) == 7, "the greeting to arrive")
        with ForwardedSocket(forward.chan, lambda: None, "test") as sock:
            assert len(forward.chan.in_buffer) == 7  # counted against the window at once
            forward.far.sendall(b"world")
            forward.far.shutdown_write()
            sock.settimeout(10)
            with sock.makefile("rb") as stream:
                assert stream.read() == b"hello, world"
    finally:
        forward.close()


# --- through the executor -------------------------------------------------------------------


def server_transport(server: Any, chan: paramiko.Channel) -> paramiko.Transport:
    """The test server's side of the connection that carries ``chan``."""
    with server._lock:
        connections = list(server._connections)
    for connection in connections:
        transport: paramiko.Transport = connection.transport
        far = transport._channels.get(chan.remote_chanid)  # type: ignore[attr-defined]
        if far is not None and far.remote_chanid == chan.chanid and transport.is_active():
            return transport
    raise AssertionError("no server connection carries the channel")


def test_a_flood_past_the_window_resets_only_its_own_open_connection(
        make_test_server: Any, make_backend: Any, caplog: Any) -> None:
    """The caller's next recv raises ConnectionResetError; what the socket holds stays within
    its window; the connection, its commands and its other forwarded sockets carry on."""
    server = make_test_server()
    backend = make_backend("echo")
    with SSHExecutor(**server.executor_parameters()) as ex:
        flooded = ex.open_connection("127.0.0.1", backend.port, timeout=10)
        other = ex.open_connection("127.0.0.1", backend.port, timeout=10)
        chan = flooded.channel
        window = chan.in_window_size
        transport = server_transport(server, chan)
        blob = b"x" * PACKET
        with caplog.at_level(logging.WARNING, logger="paramiko_executor.tunnels"):
            for _ in range(window // PACKET + 8):
                m = Message()
                m.add_byte(cMSG_CHANNEL_DATA)
                m.add_int(chan.chanid)
                m.add_string(blob)
                transport._send_user_message(m)  # type: ignore[attr-defined]
            outcome = outcome_within(30, lambda: transport.global_request("sync@test",
                                                                          wait=True))
            assert "error" not in outcome, outcome
        assert len(chan.in_buffer) <= window
        assert "the server broke the protocol" in caplog.text
        flooded.settimeout(10)
        with pytest.raises(ConnectionResetError):
            flooded.recv(65536)
        assert ex._forwarding.limit.used == 2
        flooded.close()
        assert ex._forwarding.limit.used == 1
        other.settimeout(10)
        other.sendall(b"still here")
        received = b""
        while len(received) < 10:
            received += other.recv(10)
        assert received == b"still here"
        assert ex.run_command("echo ok").stdout == "ok\n"
        other.close()
        with ex.open_connection("127.0.0.1", backend.port, timeout=10) as again:
            again.sendall(b"x")
            again.settimeout(10)
            assert again.recv(1) == b"x"

