"""The socket under each transport: read-ahead and deferred wake-ups, over real TCP on 127.0.0.1."""

import functools
import socket
import threading

import pytest

from paramiko_executor.connection import READ_AHEAD, _TransportSocket


@pytest.fixture
def pair():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname(), timeout=10)
        theirs, _ = listener.accept()
    sock = _TransportSocket(ours.family, ours.type, ours.proto, fileno=ours.detach())
    sock.settimeout(0.1)  # as paramiko does
    yield sock, theirs
    sock.close()
    theirs.close()


def test_a_burst_is_served_in_pieces_from_one_read(pair):
    sock, theirs = pair
    theirs.sendall(b"header-1" + b"body-one" + b"header-2")
    assert sock.recv(8) == b"header-1"
    theirs.sendall(b"late")  # arrives while the first burst is still buffered
    assert sock.recv(8) == b"body-one"
    assert sock.recv(100) == b"header-2"  # no more than the buffered burst
    assert sock.recv(100) == b"late"


def test_a_read_that_times_out_leaves_nothing_to_replay(pair):
    sock, theirs = pair
    theirs.sendall(b"abc")
    assert sock.recv(100) == b"abc"
    with pytest.raises(socket.timeout):
        sock.recv(100)
    theirs.sendall(b"xyz")
    assert sock.recv(100) == b"xyz"


def test_reads_larger_than_the_read_ahead_arrive_whole(pair):
    sock, theirs = pair
    data = bytes(range(256)) * (3 * READ_AHEAD // 256)
    sender = threading.Thread(target=theirs.sendall, args=(data,))
    sender.start()
    got = bytearray()
    while len(got) < len(data):
        got += sock.recv(len(data) - len(got))
    sender.join(10)
    assert bytes(got) == data


def test_the_end_of_the_stream_reads_empty(pair):
    sock, theirs = pair
    theirs.sendall(b"last")
    theirs.shutdown(socket.SHUT_WR)
    assert sock.recv(100) == b"last"
    assert sock.recv(100) == b""


def test_deferred_wakes_fire_before_a_read_that_may_block(pair):
    sock, theirs = pair
    fired = []
    theirs.sendall(b"onetwo")
    assert sock.recv(3) == b"one"
    sock.defer(lambda: fired.append("a"))
    assert sock.recv(3) == b"two"  # served from the buffer: still deferred
    assert fired == []
    with pytest.raises(socket.timeout):
        sock.recv(3)  # the buffer is empty: fires first, then waits
    assert fired == ["a"]


def test_deferred_wakes_fire_at_close_and_at_once_after_it(pair):
    sock, _ = pair
    fired = []
    sock.defer(lambda: fired.append("before"))
    sock.close()
    assert fired == ["before"]
    sock.defer(lambda: fired.append("after"))
    assert fired == ["before", "after"]


def test_a_close_from_another_thread_loses_no_deferred_wake():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for _ in range(100):
            plain = socket.create_connection(listener.getsockname(), timeout=10)
            peer, _ = listener.accept()
            sock = _TransportSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
            fired = []
            closer = threading.Thread(target=sock.close)
            closer.start()
            for n in range(50):  # the transport thread deferring while the socket closes
                sock.defer(functools.partial(fired.append, n))
            closer.join(10)
            assert sorted(fired) == list(range(50))
            peer.close()


def test_the_large_buffer_is_held_only_while_data_flows(pair):
    sock, theirs = pair
    theirs.sendall(b"x" * 300)  # a command's end: a few packets
    assert sock.recv(1000) == b"x" * 300
    assert sock._large is None
    data = b"y" * (2 * READ_AHEAD)  # bulk output fills the small buffer: read ahead
    sender = threading.Thread(target=theirs.sendall, args=(data,))
    sender.start()
    got = bytearray()
    for _ in range(10_000):
        if len(got) == len(data):
            break
        got += sock.recv(READ_AHEAD)
    sender.join(10)
    assert bytes(got) == data and sock._large is not None
    with pytest.raises(socket.timeout):  # idle: the memory goes back
        sock.recv(100)
    assert sock._large is None
