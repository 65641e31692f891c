"""attack9b: attacks on commands, output, tunnels and error classes that broke something.

One regression test per defect, against the project's test server (fault injection) or a
hostile paramiko server (tests/test_origin.py's `HostileServer`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict

import pytest
import test_attack_origin
from helpers import wait_for

from paramiko_executor import CommandExecutionFailure, CommandTimeout, ExecutorFailure, SSHExecutor

hostile = test_attack_origin.hostile  # a HostileServer per test, stopped after it

# --- a key exchange the server stalls -------------------------------------------------------


def _stall_a_key_exchange(server: Any, executor: SSHExecutor) -> None:
    """Freeze ``server`` and start a key exchange from the client that it never answers."""
    with executor.bounded_connection as transport:
        pass
    server.freeze()
    transport._send_kex_init()  # type: ignore[attr-defined]


def _times_out_in_a_stall(server: Any, executor: SSHExecutor, command: str) -> None:
    """``command`` with ``timeout=2``, run while a key exchange stalls, raises
    `CommandTimeout` well before paramiko's 30 s (the server thawed again after it)."""
    try:
        _stall_a_key_exchange(server, executor)
        begun = time.monotonic()
        with pytest.raises(Exception) as raised:
            executor.run_command(command, timeout=2)
        took = time.monotonic() - begun
    finally:
        server.thaw()
    assert isinstance(raised.value, CommandTimeout), repr(raised.value)
    assert took < 15, took


@pytest.mark.hang_timeout(120)
def test_a_timeout_during_a_stalled_key_exchange_returns_at_the_deadline(make_test_server):
    """The TERM after a timeout waited for the key exchange in the caller's thread.

    paramiko holds every send while a key exchange runs, up to its
    ``clear_to_send_timeout`` (30 s): a command with ``timeout=2`` on a server that
    froze mid-exchange raised `CommandTimeout` after 32 s.
    """
    server = make_test_server(max_sessions=4)
    with SSHExecutor(**server.executor_parameters()) as executor:
        executor.run_command("true", timeout=20)
        ended: Dict[str, Any] = {}
        started = threading.Event()

        def run() -> None:
            begun = time.monotonic()
            started.set()
            try:
                executor.run_command("sleep 30", timeout=3)
            except BaseException as exc:  # noqa: B036 (recorded, judged below)
                ended["error"] = exc
            ended["took"] = time.monotonic() - begun

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert started.wait(10)
        wait_for(lambda: "sleep 30" in server.commands, "the command to start")
        try:
            _stall_a_key_exchange(server, executor)
            thread.join(60)
        finally:
            server.thaw()
        assert not thread.is_alive()
        assert isinstance(ended["error"], CommandTimeout)
        # The deadline was 3 s; the stalled exchange would hold a send for 30 s.
        assert ended["took"] < 15, ended["took"]


@pytest.mark.hang_timeout(120)
def test_a_command_started_during_a_stalled_key_exchange_times_out_at_its_deadline(
        make_test_server):
    """``timeout`` covers everything, opening the channel too.

    A command asked for while the server stalled a key exchange raised
    ``ExecutorFailure("... key exchange timed out ...")`` after 30 s, not `CommandTimeout`
    after its 2 s: its exec (on the channel opened ahead) waited paramiko's
    ``clear_to_send_timeout``. The OPEN, stdin, EOF, window adjusts and the CLOSE of a
    command and a spare's open after the exec waited the same way, in the caller's
    thread (``tests/test_kex_deadline.py`` covers the OPEN and a send after the exec).
    """
    server = make_test_server(max_sessions=4)
    with SSHExecutor(**server.executor_parameters()) as executor:
        executor.run_command("true", timeout=20)
        _times_out_in_a_stall(server, executor, "true")


@pytest.mark.hang_timeout(120)
def test_a_forwarded_sockets_send_in_a_stalled_key_exchange_keeps_its_timeout(
        make_test_server, make_backend):
    """A send held by a key exchange is a timeout after the socket's timeout, not a reset.

    It waited paramiko's 30 s and raised ``ConnectionResetError("... was cut")``, yet the
    connection was fine: once the server went on, the same socket still carried data.
    """
    server = make_test_server(max_sessions=4)
    backend = make_backend("echo")
    with SSHExecutor(**server.executor_parameters()) as executor:
        with executor.open_connection("127.0.0.1", backend.port, timeout=2) as sock:
            sock.sendall(b"before")
            assert sock.recv(100) == b"before"
            try:
                _stall_a_key_exchange(server, executor)
                begun = time.monotonic()
                with pytest.raises(OSError) as raised:
                    sock.sendall(b"held")
                took = time.monotonic() - begun
            finally:
                server.thaw()
            assert isinstance(raised.value, TimeoutError), repr(raised.value)
            assert took < 15, took
            sock.settimeout(30)
            sock.sendall(b"after")
            assert sock.recv(100) == b"after"


# --- a server's contradictory ending -----------------------------------------------------------


@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("order", ["signal-first", "status-first"])
def test_a_command_killed_by_a_signal_is_never_a_success(hostile, order):
    """A server sending both exit-signal and exit-status 0 got a success with ``exit_signal``.

    The result said ``exit_code=0, exit_signal='KILL'``: a command killed by a signal
    is a `CommandExecutionFailure` with ``exit_code`` -1, whatever status came with it.
    """
    from paramiko.common import cMSG_CHANNEL_REQUEST
    from test_origin import finish, send_raw

    def both(chan) -> None:
        if order == "status-first":
            chan.send_exit_status(0)
        send_raw(chan, cMSG_CHANNEL_REQUEST, "exit-signal", False, "KILL", False, "", "")
        finish(chan, 0)

    server = hostile({b"both": both})
    with SSHExecutor(**server.parameters()) as executor:
        with pytest.raises(CommandExecutionFailure) as raised:
            executor.run_command("both", timeout=30)
        assert raised.value.exit_code == -1
        assert raised.value.exit_signal == "KILL"
        result = executor.run_command("both", timeout=30, check=False)
        assert (result.exit_code, result.exit_signal) == (-1, "KILL")


@pytest.mark.hang_timeout(90)
def test_a_failure_reply_to_no_request_is_dropped_not_a_closed_channel(hostile):
    """A CHANNEL_FAILURE answering no request of ours is dropped, as OpenSSH's client does.

    It reached paramiko's handler, which closed the channel: a command that then exited
    0 with all its output failed with "closed the channel without an exit status".
    """
    from paramiko.common import cMSG_CHANNEL_FAILURE
    from test_origin import finish, send_raw

    def stray(chan) -> None:
        chan.sendall(b"one\n")
        send_raw(chan, cMSG_CHANNEL_FAILURE)
        # Answered after the client handled the stray reply (and sent any CLOSE it made).
        chan.transport.global_request("sync@attack9b", wait=True)
        chan.sendall(b"two\n")
        finish(chan, 0)

    server = hostile({b"stray": stray})
    with SSHExecutor(**server.parameters()) as executor:
        for _ in range(3):
            assert executor.run_command("stray", timeout=30).stdout == "one\ntwo\n"
        assert executor.statistics().reconnects == 0


# --- a command's end sent before the command -----------------------------------------------------


def _forge_on_the_spare(chan) -> None:
    """Finish ``chan``'s command after sending output and exit 0 on every other channel.

    The other channel is the spare the client opened ahead after this exec: no command
    was sent on it yet.
    """
    from test_origin import finish

    transport = chan.transport
    wait_for(lambda: any(other is not chan and other.active
                         for other in list(transport._channels.values())), "the spare's open")
    for other in list(transport._channels.values()):
        if other is not chan:
            other.sendall(b"forged\n")
            other.send_exit_status(0)
    finish(chan, 0)


@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("then", ["refused", "real"])
def test_an_exit_status_before_the_exec_is_not_the_commands(hostile, then):
    """Output and an exit status a server sends on a channel before its exec are not a result.

    They were taken as the next command's: a command the server then refused was a
    success with the forged output. Now the channel is given up before its exec (the
    command never ran there) and the command runs on another.
    """
    from test_origin import finish

    def real(chan) -> None:
        chan.sendall(b"real\n")
        finish(chan, 0)

    server = hostile({b"forge": _forge_on_the_spare, b"real": real})
    with SSHExecutor(**server.parameters()) as executor:
        assert executor.run_command("forge", timeout=30).stdout == ""
        if then == "refused":  # the server runs no command of that name
            with pytest.raises(ExecutorFailure):
                executor.run_command("refused", timeout=30)
        else:
            assert executor.run_command("real", timeout=30).stdout == "real\n"
        assert executor.statistics().reconnects == 0


def _eof_on_the_spare(chan) -> None:
    """Finish ``chan``'s command after sending EOF on every other channel (the spare)."""
    from test_origin import finish

    transport = chan.transport
    wait_for(lambda: any(other is not chan and other.active
                         for other in list(transport._channels.values())), "the spare's open")
    for other in list(transport._channels.values()):
        if other is not chan:
            other.shutdown_write()
    finish(chan, 0)


@pytest.mark.hang_timeout(90)
def test_an_eof_before_the_exec_does_not_end_the_next_commands_output(hostile):
    """An EOF a server sent on the spare before its exec was taken as the next command's:
    that command's real output came after it and was dropped (an empty stdout, exit 0)."""
    from test_origin import finish

    def real(chan) -> None:
        chan.sendall(b"real\n")
        finish(chan, 0)

    server = hostile({b"eof": _eof_on_the_spare, b"real": real})
    with SSHExecutor(**server.parameters()) as executor:
        assert executor.run_command("eof", timeout=30).exit_code == 0
        assert executor.run_command("real", timeout=30).stdout == "real\n"
        statistics = executor.statistics()
        assert statistics.reconnects == 0 and statistics.commands_retried == 0


# --- an answer to an open already answered -------------------------------------------------------


@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("answer", ["refusal", "confirmation"])
def test_a_second_answer_to_an_open_ends_only_that_channel(hostile, answer):
    """An OPEN_FAILURE (or a second confirmation) for a channel already open is a protocol error.

    paramiko took the refusal's word and forgot the open channel: its command waited for
    its timeout (for good without one), and its slot never came back, so with
    ``max_sessions=1`` every later command waited too. A second confirmation re-pointed
    the channel at the far end it named: what the command sent next (stdin, EOF, CLOSE)
    went to that channel.
    """
    from paramiko.common import cMSG_CHANNEL_OPEN_FAILURE, cMSG_CHANNEL_OPEN_SUCCESS
    from paramiko.message import Message
    from test_origin import finish

    def again(chan) -> None:
        m = Message()
        if answer == "refusal":
            m.add_byte(cMSG_CHANNEL_OPEN_FAILURE)
            m.add_int(chan.remote_chanid)
            m.add_int(2)
            m.add_string("refused after all")
            m.add_string("")
        else:  # naming another channel of the server's as this one's far end
            m.add_byte(cMSG_CHANNEL_OPEN_SUCCESS)
            m.add_int(chan.remote_chanid)
            m.add_int(chan.chanid + 1000)
            m.add_int(1 << 20)
            m.add_int(1 << 15)
        chan.transport._send_user_message(m)
        chan.sendall(b"after\n")
        finish(chan, 0)

    server = hostile({b"again": again})
    with SSHExecutor(**server.parameters(max_sessions=1)) as executor:
        with pytest.raises(ExecutorFailure) as raised:
            executor.run_command("again", stdin_input="x" * 100, timeout=10)
        assert "already confirmed" in str(raised.value)
        assert executor.run_command("sync", timeout=10).exit_code == 0
        assert executor.statistics().reconnects == 0


# --- a command holding a NUL -------------------------------------------------------------------


@pytest.mark.hang_timeout(120)
def test_a_command_holding_a_nul_is_refused_at_the_call_and_cuts_nobody(sshd):
    """sshd ends the whole connection on an exec request holding a NUL.

    The command went out as it was: the connection dropped under every other command on
    it, and the executor took that for a lost connection and sent the command again,
    four times (``ExecutorFailure("... lost ... (4 attempts)")``).
    """
    with SSHExecutor(**sshd.executor_parameters()) as executor:
        executor.run_command("true", timeout=30)
        with pytest.raises(ValueError, match="command"):
            executor.run_command("echo a\0; echo b", timeout=30)
        assert executor.run_command("echo after", timeout=30).stdout == "after\n"
        assert executor.statistics().reconnects == 0


@pytest.mark.hang_timeout(120)
@pytest.mark.parametrize("direction", ["put", "get"])
def test_a_remote_path_holding_a_nul_is_refused_at_the_call(sshd, shared_dir, direction):
    """It went to sftp-server, which ended the session: ``ExecutorFailure("... the
    connection was lost during the SFTP session ...")`` for a bad argument."""
    import io

    with SSHExecutor(**sshd.executor_parameters()) as executor:
        remote = f"{shared_dir}/a\0b"
        with pytest.raises(ValueError, match="remote"):
            if direction == "put":
                executor.put(io.BytesIO(b"x"), remote, timeout=30)
            else:
                executor.get(remote, io.BytesIO(), timeout=30)


@pytest.mark.hang_timeout(120)
@pytest.mark.parametrize("where", ["command", "env"])
def test_a_request_past_the_servers_packet_limit_is_refused_at_the_call(sshd, where):
    """sshd ends the whole connection on a packet over 256 KiB.

    A 270 kB command (or variable) went out as it was: the connection dropped under
    every command on it, and the executor re-sent it three times more, reconnecting each
    time (``ExecutorFailure("... lost ... (4 attempts)")``).
    """
    big = "x" * 270_000
    with SSHExecutor(**sshd.executor_parameters()) as executor:
        executor.run_command("true", timeout=30)
        with pytest.raises(ValueError, match=where):
            if where == "command":
                executor.run_command(": " + big, timeout=30)
            else:
                executor.run_command("true", env={"LC_BIG": big}, timeout=30)
        assert executor.run_command("echo after", timeout=30).stdout == "after\n"
        assert executor.statistics().reconnects == 0


@pytest.mark.hang_timeout(120)
def test_a_forward_target_past_the_servers_packet_limit_is_refused_at_the_call(sshd):
    """A 300 kB host name went out in the open: sshd ended the connection, and the open
    was sent again on each new one (``on_disconnect_retry`` reconnects)."""
    with SSHExecutor(**sshd.executor_parameters()) as executor:
        executor.run_command("true", timeout=30)
        with pytest.raises(ValueError, match="host"):
            executor.open_connection("h" * 300_000, 80, timeout=30)
        assert executor.statistics().reconnects == 0


# --- a request whose text is not UTF-8 -----------------------------------------------------------


@pytest.mark.hang_timeout(90)
def test_a_request_with_text_not_utf8_ends_its_channel_not_the_connection(hostile):
    """paramiko's own handler of a request wanting a reply decodes its texts strictly.

    An x11-req whose texts are not UTF-8 raised UnicodeDecodeError in paramiko's thread:
    the whole connection ended, and the command was sent again on each new one (four
    runs, ``ExecutorFailure("... lost ... (4 attempts)")``).
    """
    from paramiko.common import cMSG_CHANNEL_REQUEST
    from test_origin import finish, send_raw

    def bad(chan) -> None:
        send_raw(chan, cMSG_CHANNEL_REQUEST, "x11-req", True, b"\xff\xfe", b"\xff")
        finish(chan, 0)

    server = hostile({b"bad": bad})
    with SSHExecutor(**server.parameters()) as executor:
        with pytest.raises(ExecutorFailure, match="malformed channel request"):
            executor.run_command("bad", timeout=30)
        assert executor.run_command("sync", timeout=30).exit_code == 0
        assert executor.statistics().reconnects == 0
    assert server.connections == 1


@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("message", ["global request", "channel open"])
def test_a_servers_request_with_text_not_utf8_is_refused_not_the_connections_end(
        hostile, message):
    """A global request or channel open from the server whose name is not UTF-8 is refused.

    paramiko decoded it in its thread: the UnicodeDecodeError ended the whole
    connection, and the command on it was sent again on each new one (four runs).
    """
    from paramiko.common import cMSG_CHANNEL_OPEN, cMSG_GLOBAL_REQUEST
    from paramiko.message import Message
    from test_origin import finish

    def bad(chan) -> None:
        m = Message()
        if message == "global request":
            m.add_byte(cMSG_GLOBAL_REQUEST)
            m.add_string(b"\xff\xfe")
            m.add_boolean(True)
        else:
            m.add_byte(cMSG_CHANNEL_OPEN)
            m.add_string(b"\xff\xfe")
            m.add_int(77)
            m.add_int(1 << 20)
            m.add_int(1 << 15)
        chan.transport._send_user_message(m)
        finish(chan, 0)

    server = hostile({b"bad": bad})
    with SSHExecutor(**server.parameters()) as executor:
        for _ in range(2):
            assert executor.run_command("bad", timeout=30).exit_code == 0
        assert executor.statistics().reconnects == 0
    assert server.connections == 1


@pytest.mark.hang_timeout(90)
def test_a_refused_open_with_a_reason_not_utf8_is_a_refusal_not_the_connections_end(hostile):
    """A server refusing a session with a reason in Latin-1 refuses that channel only.

    paramiko decoded the reason in its thread: the UnicodeDecodeError ended the whole
    connection under every command on it.
    """
    from paramiko.common import MSG_CHANNEL_OPEN, cMSG_CHANNEL_OPEN_FAILURE
    from paramiko.message import Message

    server = hostile({})
    with SSHExecutor(**server.parameters()) as executor:
        assert executor.run_command("sync", timeout=30).exit_code == 0
        transport = server.transports[0]
        table = transport._handler_table
        accept = table[MSG_CHANNEL_OPEN]
        refusals = [2]  # the next two session opens

        def refuse(m: Message) -> None:
            if not refusals[0]:
                accept(m)
                return
            refusals[0] -= 1
            m.get_string()
            answer = Message()
            answer.add_byte(cMSG_CHANNEL_OPEN_FAILURE)
            answer.add_int(m.get_int())
            answer.add_int(4)  # resource shortage
            answer.add_string("accès refusé".encode("latin-1"))
            answer.add_string(b"fr\xe9")
            transport._send_user_message(answer)

        table[MSG_CHANNEL_OPEN] = refuse
        for _ in range(3):
            assert executor.run_command("sync", timeout=30).exit_code == 0
        assert executor.statistics().reconnects == 0
        assert refusals == [0]
        assert executor.statistics().refused_opens >= 1
    assert server.connections == 1
