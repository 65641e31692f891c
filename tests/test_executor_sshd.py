"""SSHExecutor against a real OpenSSH sshd started by the tests on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import wait_for

from paramiko_executor import (
    SAFE_WRAPPER,
    CommandExecutionFailure,
    CommandTimeout,
    DupingSSHExecutor,
    ExecutorFailure,
    SSHExecutor,
    probe_max_session,
)


class OpenCounter(logging.Handler):
    """Counts the channel opens sshd refused (paramiko logs each one)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.refused = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "open FAILED" in record.getMessage():
            self.refused += 1


def test_output_exit_codes_and_decoding(sshd):
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        result = ex.run_command("echo out; echo err >&2")
        assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)
        assert ex.run_command("printf 'a\\377b'").stdout == "a\ufffdb"
        assert ex.run_command("printf '  padded  '").stdout == "  padded  "
        with pytest.raises(CommandExecutionFailure) as failure:
            ex.run_command("echo partial; echo bad >&2; exit 7", stdin_input="given")
        err = failure.value
        assert (err.exit_code, err.stdout, err.stderr) == (7, "partial\n", "bad\n")
        assert err.stdin == "given"
        assert not isinstance(err, ExecutorFailure)


def test_stdin_then_eof_always(sshd):
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        # A command reading stdin gets EOF at once, with or without input.
        assert ex.run_command("cat", timeout=20).stdout == ""
        assert ex.run_command("cat", "text in", timeout=20).stdout == "text in"
        assert ex.run_command("cat", b"\x00\xffbytes", timeout=20).stdout == "\x00\ufffdbytes"
        assert ex.run_command("wc -l", "a\nb\n", timeout=20).stdout.strip() == "2"


def test_probe_max_session_matches_sshd_config(sshd, sshd3):
    for server, expected in ((sshd, 10), (sshd3, 3)):
        with SSHExecutor(**server.executor_parameters(max_sessions=1)) as ex:
            with ex.bounded_connection as transport:
                # A reserved slot is not an open channel: the probe sees them all.
                assert probe_max_session(transport, limit=64) == expected
        with SSHExecutor(**server.executor_parameters()) as ex:
            ex.run_command("true")
            assert ex.session_limit == expected


def test_probe_limit_bounds_the_probe(sshd):
    with SSHExecutor(**sshd.executor_parameters(max_sessions=1)) as ex:
        with ex.bounded_connection as transport:
            assert probe_max_session(transport, limit=4) == 4
            with pytest.raises(ValueError, match="limit"):
                probe_max_session(transport, limit=0)


def test_200_threads_2000_commands_one_connection(sshd):
    counter = OpenCounter()
    paramiko_log = logging.getLogger("paramiko.transport")
    paramiko_log.addHandler(counter)
    old_level = paramiko_log.level
    paramiko_log.setLevel(logging.DEBUG)
    try:
        with SSHExecutor(**sshd.executor_parameters()) as ex:
            ex.run_command("true")
            transport = ex.state.transport

            def run(i: int) -> str:
                return ex.run_command(f"echo {i}").stdout

            with ThreadPoolExecutor(200) as pool:
                outputs = list(pool.map(run, range(2000)))
            assert outputs == [f"{i}\n" for i in range(2000)]
            assert ex.state.transport is transport
            assert len(sshd.serving_pids()) == 1
    finally:
        paramiko_log.removeHandler(counter)
        paramiko_log.setLevel(old_level)
    # Refusals at MaxSessions are retried on the same connection, never lost.
    print(f"sshd refused {counter.refused} channel opens (each retried)")


def test_max_sessions_makes_the_fourth_command_wait(sshd3, shared_dir):
    gate = os.path.join(shared_dir, "gate")
    # Each holder waits (bounded: 60 s) for the gate file the test creates.
    hold = f"for i in $(seq 1200); do [ -e {gate} ] && break; sleep 0.05; done; echo done"
    with SSHExecutor(**sshd3.executor_parameters()) as ex:
        ex.run_command("true")
        bound = ex.state.bound
        with ThreadPoolExecutor(4) as pool:
            try:
                holders = [pool.submit(ex.run_command, hold) for _ in range(3)]
                wait_for(lambda: bound.available == 0, "three commands holding all slots")
                fourth = pool.submit(ex.run_command, "echo fourth")
                wait_for(lambda: len(bound._waiters) == 1, "the fourth command to queue")
                assert not fourth.done()
            finally:
                open(gate, "w").close()
            assert fourth.result(timeout=30).stdout == "fourth\n"
            assert [f.result(timeout=30).stdout for f in holders] == ["done\n"] * 3


def test_large_streams_do_not_deadlock(sshd):
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        out = ex.run_command("head -c 64M /dev/zero", timeout=120).stdout
        assert len(out) == 64 << 20
        data = os.urandom(8 << 20).hex()  # 16 MiB of text
        assert ex.run_command("wc -c", data, timeout=120).stdout.strip() == str(len(data))
        # cat echoes 16 MiB back while stdin is still being fed.
        assert ex.run_command("cat", data, timeout=120).stdout == data
        both = ex.run_command(
            "head -c 8M /dev/zero | tr '\\0' o & head -c 8M /dev/zero | tr '\\0' e >&2; wait",
            timeout=120,
        )
        assert (len(both.stdout), len(both.stderr)) == (8 << 20, 8 << 20)
        assert set(both.stdout) == {"o"} and set(both.stderr) == {"e"}


def test_timeout_terminates_the_command_and_keeps_the_connection(sshd):
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        transport = ex.state.transport
        with pytest.raises(CommandTimeout) as timeout:
            ex.run_command("echo started; sleep 59.125; echo never", timeout=1)
        assert timeout.value.exit_code is None
        assert timeout.value.stdout == "started\n"
        assert ex.run_command("echo still here").stdout == "still here\n"
        assert ex.state.transport is transport
        # sshd delivered the TERM: no `sleep 60` of ours is left.
        wait_for(
            lambda: ex.run_command("pgrep -f 'slee[p] 59.125' || true").stdout == "",
            "the timed-out command to end",
        )


def _kill_connection_when_running(server, marker):
    def kill() -> None:
        wait_for(lambda: os.path.exists(marker), "the command to start")
        for pid in server.serving_pids():
            os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_lost_connection_is_retried_on_a_new_one(make_sshd, shared_dir):
    server = make_sshd(max_sessions=10)
    marker = os.path.join(shared_dir, "started")
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true")
        first = ex.state.transport
        killer = _kill_connection_when_running(server, marker)
        # The first run is killed mid-sleep; the retry finds the marker and ends at once.
        result = ex.run_command(
            f"test -e {marker} && echo retried && exit 0; touch {marker}; sleep 2"
        )
        killer.join(30)
        assert result.stdout == "retried\n"
        assert ex.state.transport is not first
        assert not first.is_active()


def test_lost_connection_without_retry_raises(make_sshd, shared_dir):
    server = make_sshd(max_sessions=10)
    marker = os.path.join(shared_dir, "started")
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        killer = _kill_connection_when_running(server, marker)
        with pytest.raises(ExecutorFailure) as failure:
            ex.run_command(f"touch {marker}; sleep 2; echo done")
        killer.join(30)
        assert failure.value.executor is ex
        assert "lost" in str(failure.value)
        assert ex.run_command("echo reconnected").stdout == "reconnected\n"


def test_host_down_costs_one_retry_cycle_for_all_waiters(make_sshd, caplog):
    server = make_sshd(max_sessions=10)
    ex = SSHExecutor(**server.executor_parameters(connect_retries=3, connect_backoff=0.05))
    ex.run_command("true")
    server.stop()
    ex.close()
    caplog.set_level(logging.INFO, logger="paramiko_executor")
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(ex.run_command, "true") for _ in range(20)]
        errors = [f.exception(timeout=60) for f in futures]
    assert all(isinstance(e, ExecutorFailure) for e in errors), errors
    assert all("after 4 attempts" in str(e) for e in errors)
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 3  # one cycle, shared, not one per thread


def test_connect_gives_up_after_retries_on_a_closed_port(caplog):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ex = SSHExecutor(host="127.0.0.1", port=port, username="nobody", known_hosts=None,
                     config=(), connect_retries=2, connect_backoff=0.01)
    caplog.set_level(logging.INFO, logger="paramiko_executor")
    with pytest.raises(ExecutorFailure, match="after 3 attempts"):
        ex.run_command("true")
    assert len([r for r in caplog.records if "retrying in" in r.getMessage()]) == 2


def test_duping_executor_with_forced_command_key(sshd):
    params = sshd.executor_parameters(client_keys=[sshd.forced_key_path])
    with DupingSSHExecutor(**params) as ex:
        assert ex.run_command("echo $((6 * 7))").stdout == "42\n"
        assert ex.run_command("cat", stdin_input="fed through").stdout == "fed through\n"
        with pytest.raises(CommandExecutionFailure) as failure:
            ex.run_command("exit 3", stdin_input="kept")
        assert failure.value.exit_code == 3 and failure.value.stdin == "kept"
    # The same key cannot run anything else: the forced command (bash) reads stdin.
    with SSHExecutor(**params) as plain:
        assert plain.run_command("ignored", stdin_input="echo forced\n").stdout == "forced\n"


def test_duping_executor_feeds_a_command_of_several_lines_as_it_is(sshd):
    """The wrapper is fed ``f"{command}\\n"``, newlines and all: bash (on the command
    key) runs every line; a wrapper that runs only its first line leaves the rest to
    that command's stdin. NUL is refused, as for SSHExecutor."""
    params = sshd.executor_parameters(client_keys=[sshd.forced_key_path])
    with DupingSSHExecutor(**params) as ex:
        assert ex.run_command("echo a\necho b").stdout == "a\nb\n"
        # One input: a line reading stdin reads the lines after it, then stdin_input.
        assert ex.run_command("cat\necho done", stdin_input="payload\n").stdout == \
            "echo done\npayload\n\n"
        with pytest.raises(ValueError, match="NUL"):
            ex.run_command("echo a\0b")
    with DupingSSHExecutor(**sshd.executor_parameters(), wrapper=SAFE_WRAPPER) as safe:
        assert safe.run_command("cat\necho never run").stdout == "echo never run\n"


def test_close_mid_command_fails_promptly_then_reconnects(sshd):
    ex = SSHExecutor(**sshd.executor_parameters())
    ex.run_command("true")
    with ThreadPoolExecutor(5) as pool:
        running = [pool.submit(ex.run_command, "sleep 30") for _ in range(5)]
        bound = ex.state.bound
        # 10 - 5 in use (the spare may hold one more)
        wait_for(lambda: bound.available <= 5, "five commands running")
        ex.close()
        errors = [f.exception(timeout=20) for f in running]
    assert all(isinstance(e, ExecutorFailure) and "closed" in str(e) for e in errors), errors
    assert ex.run_command("echo again").stdout == "again\n"
    ex.close()

