"""Attacks on the tunnels (issue 22): each test is a way they broke, kept as a regression test."""

from __future__ import annotations

import socket
import struct
from typing import Any, Callable, Iterator, List

import pytest
from helpers import wait_for
from test_tunnels import Backend, echo_once

from paramiko_executor import SSHExecutor


@pytest.fixture
def target() -> Iterator[Callable[..., Backend]]:
    """Factory of real TCP servers on 127.0.0.1 behind the tunnels (see `Backend`)."""
    made: List[Backend] = []

    def make(mode: str = "echo") -> Backend:
        made.append(Backend(mode))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (RST), as a crashed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_that_resets_frees_its_forward_while_the_target_is_idle(
        sshd: Any, target: Any) -> None:
    """A client reset ends the forwarded connection even when the target has nothing to say.

    The pipe used to stop only its upward direction on the reset, and the
    other kept waiting for the target, which (an echo server waiting for
    input) never speaks: thread, channel and place under max_forwarded held
    for good, so two such clients stopped a max_forwarded=2 tunnel forever.
    """
    backend = target("echo")
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
