"""probe_max_session: pipelined opens, the same count as opening one by one, remembered per server.

Real servers: a private OpenSSH sshd (MaxSessions 10 and 3), Dropbear, and the
project's own test server (any MaxSessions, and a frozen server to see what is
sent before any answer).
"""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List

import paramiko
import pytest

from paramiko_executor import SSHExecutor, connection, probe_max_session
from paramiko_executor.errors import ConnectionLost


def sequential_count(transport: paramiko.Transport, limit: int = 64) -> int:
    """The reference: paramiko's own open_session, one after another, until a refusal."""
    channels: List[paramiko.Channel] = []
    try:
        while len(channels) < limit:
            try:
                channels.append(transport.open_session(timeout=10))
            except paramiko.ChannelException:
                break
        return len(channels)
    finally:
        for chan in channels:
            chan.close()
        # The server has handled those CLOSEs once it answers a later request.
        transport.global_request("keepalive@openssh.com", wait=True)


def both_probes(params: dict) -> tuple:
    """(pipelined, sequential, pipelined) counts on one connection to the server of ``params``."""
    with SSHExecutor(**params, max_sessions=1) as ex:
        with ex.bounded_connection as transport:
            first = probe_max_session(transport)
            transport.global_request("keepalive@openssh.com", wait=True)
            reference = sequential_count(transport)
            again = probe_max_session(transport)
    return first, reference, again


def test_pipelined_probe_counts_as_the_sequential_one_on_openssh(sshd: Any, sshd3: Any) -> None:
    assert both_probes(sshd.executor_parameters()) == (10, 10, 10)
    assert both_probes(sshd3.executor_parameters()) == (3, 3, 3)


def test_pipelined_probe_counts_as_the_sequential_one_on_dropbear(dropbear: Any) -> None:
    first, reference, again = both_probes(dropbear.executor_parameters())
    assert first == reference == again


@pytest.mark.parametrize("max_sessions", [1, 4, 10, 16, 17, 70])
def test_pipelined_probe_counts_as_the_sequential_one_on_the_test_server(
        make_test_server: Any, max_sessions: int) -> None:
    server = make_test_server(max_sessions=max_sessions)
    expected = min(max_sessions, 64)
    assert both_probes(server.executor_parameters()) == (expected, expected, expected)


def test_the_probe_sends_every_open_before_any_answer(
        make_test_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A frozen server answers nothing: a probe that waits for each answer
    # sends one open, the pipelined one sends them all.
    sent: List[int] = []

    class Counting(connection.SessionChannel):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            sent.append(self.chan.chanid)

    monkeypatch.setattr(connection, "SessionChannel", Counting)
    monkeypatch.setattr(connection, "PROBE_TIMEOUT", 1.0)
    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(), max_sessions=1) as ex:
        with ex.bounded_connection as transport:
            server.freeze()
            try:
                with pytest.raises(ConnectionLost, match="no answer"):
                    probe_max_session(transport, limit=12)
            finally:
                server.thaw()
    assert len(sent) == 12


def test_the_limit_is_remembered_per_server(make_test_server: Any) -> None:
    server = make_test_server(max_sessions=4)
    other = make_test_server(max_sessions=6)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        assert ex.statistics().max_sessions == 4
    refused = server.channels_refused
    assert refused >= 1  # the first connect probed
    # A new executor, a reconnect and a copy start with the remembered limit: no probe.
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        server.drop_connections()
        ex.run_command("true")
        assert ex.statistics().max_sessions == 4
        with pickle.loads(pickle.dumps(ex)) as twin:
            twin.run_command("true")
            assert twin.statistics().max_sessions == 4
    assert server.connections_accepted == 4
    assert server.channels_refused == refused
    # Another server is probed for itself.
    with SSHExecutor(**other.executor_parameters()) as ex:
        ex.run_command("true")
        assert ex.statistics().max_sessions == 6
    assert other.channels_refused >= 1


def test_a_new_server_on_the_same_address_is_probed_anew(make_test_server: Any) -> None:
    first = make_test_server(max_sessions=5)
    port = first.port
    with SSHExecutor(**first.executor_parameters()) as ex:
        ex.run_command("true")
        assert ex.statistics().max_sessions == 5
    first.stop()
    second = make_test_server(max_sessions=2, port=port)
    params = second.executor_parameters()
    with SSHExecutor(**params) as ex:
        ex.run_command("true")
        assert ex.statistics().max_sessions == 2
    assert second.channels_refused >= 1


def test_commands_right_after_a_probe_run(make_sshd: Any) -> None:
    server = make_sshd(max_sessions=3)
    with SSHExecutor(**server.executor_parameters()) as ex:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: ex.run_command(f"echo {i}").stdout, range(6)))
        assert results == [f"{i}\n" for i in range(6)]
        assert ex.statistics().max_sessions == 3


def test_the_probe_channels_hold_the_connections_slots_until_their_close() -> None:
    # Handed over while 3 probe channels still await the server's CLOSE (one
    # refused already gave its slot back): the connection's slots are taken
    # until each CLOSE comes, so no command opens a session the server still counts.
    probe = connection._ProbeSlots(5)
    for _ in range(4):
        probe.acquire()
    probe.release()  # the refused one, before the hand-over: owes nothing
    slots = connection.Slots(3)
    probe.hand_over(slots)
    assert slots.available == 0
    probe.release()
    assert slots.available == 1
    probe.release()
    probe.release()
    assert slots.available == 3


def test_a_refusal_below_the_remembered_limit_makes_the_next_connect_probe(
        make_test_server: Any) -> None:
    # The same server (same address, same host key) comes back allowing fewer sessions.
    first = make_test_server(max_sessions=3)
    port, host_key = first.port, first.host_key
    with SSHExecutor(**first.executor_parameters()) as ex:
        ex.run_command("true")
        assert ex.statistics().max_sessions == 3
    first.stop()
    second = make_test_server(max_sessions=1, port=port, host_key=host_key)
    params = second.executor_parameters()
    with SSHExecutor(**params) as ex:
        # Remembered 3: the second of two concurrent commands is refused while one is held.
        with ThreadPoolExecutor(2) as pool:
            outputs = list(pool.map(lambda i: ex.run_command(f"sleep 1; echo {i}").stdout,
                                    range(2)))
        assert outputs == ["0\n", "1\n"]
        # Refused past the quick retries: this connection's limit came down too.
        assert ex.statistics().max_sessions == 1
        assert ex.statistics().refused_opens >= 1
    with SSHExecutor(**params) as ex:
        ex.run_command("true")
        assert ex.statistics().max_sessions == 1


def test_the_first_command_runs_on_a_channel_the_probe_kept(test_server: Any) -> None:
    with SSHExecutor(**test_server.executor_parameters()) as ex:
        link = ex._connection.get()
        kept = link.spare._pending  # type: ignore[union-attr]
        assert kept is not None and kept.wait_open(10) and kept.opened
        assert test_server.channels_opened == 10  # the probe's, nothing else
        assert ex.run_command("echo first").stdout == "first\n"
        assert kept.chan.closed and test_server.commands == ["echo first"]


def test_an_idle_connection_reads_with_a_long_timeout_and_closes_at_once(
        test_server: Any) -> None:
    # paramiko's 0.1 s read timeout wakes every idle connection ten times a
    # second; the longer one must not make close() wait for it.
    with SSHExecutor(**test_server.executor_parameters()) as ex:
        ex.run_command("true")
        transport = ex.state.transport  # type: ignore[union-attr]
        assert transport.sock.gettimeout() == connection.IDLE_READ_TIMEOUT >= 5
        test_server.freeze()  # a server that answers nothing does not end the read either
    try:
        # Closed: the transport's thread ends long before a read would time out.
        transport.join(1.0)
        assert not transport.is_alive()
    finally:
        test_server.thaw()


def test_connects_to_one_server_at_once_probe_it_once(
        make_test_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hosts of a HostGroup behind one server connect at once: the first
    # probes (held here until all four have met the server), the others wait
    # for its result instead of probing too.
    import threading

    server = make_test_server(max_sessions=4)
    connects = 4
    keyed: List[Any] = []
    all_keyed = threading.Event()
    probes: List[Any] = []
    key, probe = connection.LIMITS.key, connection._probe

    def counting_key(target: Any, transport: Any) -> Any:
        keyed.append(target)
        if len(keyed) == connects:
            all_keyed.set()
        return key(target, transport)

    def held_probe(*args: Any, **kwargs: Any) -> Any:
        probes.append(args)
        assert all_keyed.wait(10)
        return probe(*args, **kwargs)

    monkeypatch.setattr(connection.LIMITS, "key", counting_key)
    monkeypatch.setattr(connection, "_probe", held_probe)
    executors = [SSHExecutor(**server.executor_parameters()) for _ in range(connects)]
    try:
        with ThreadPoolExecutor(connects) as pool:
            outputs = list(pool.map(lambda ex: ex.run_command("echo ok").stdout, executors))
        assert outputs == ["ok\n"] * connects
        assert len(probes) == 1
        assert [ex.statistics().max_sessions for ex in executors] == [4] * connects
    finally:
        for ex in executors:
            ex.close()


def test_close_ends_a_connect_that_waits_for_another_probe(
        make_test_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from paramiko_executor.errors import ExecutorFailure

    server = make_test_server(max_sessions=4)
    probing, release = threading.Event(), threading.Event()
    waiting = threading.Event()
    probe, get_or_claim = connection._probe, connection.LIMITS.get_or_claim

    def held_probe(*args: Any, **kwargs: Any) -> Any:
        probing.set()
        assert release.wait(20)
        return probe(*args, **kwargs)

    def noted_get_or_claim(*args: Any) -> Any:
        if probing.is_set():
            waiting.set()
        return get_or_claim(*args)

    monkeypatch.setattr(connection, "_probe", held_probe)
    monkeypatch.setattr(connection.LIMITS, "get_or_claim", noted_get_or_claim)
    first, second = (SSHExecutor(**server.executor_parameters()) for _ in range(2))
    with ThreadPoolExecutor(2) as pool:
        try:
            done = pool.submit(first.run_command, "true")
            assert probing.wait(10)
            waiter = pool.submit(second.run_command, "true")
            assert waiting.wait(10)
            started = time.monotonic()
            second.close()
            with pytest.raises(ExecutorFailure, match="closed"):
                waiter.result(10)
            assert time.monotonic() - started < 5  # not the 20 s the probe is held
        finally:
            release.set()
        assert done.result(10).exit_code == 0
    first.close()
