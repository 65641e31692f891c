"""attack9f: attacks on attack9d's and 6a8f66b/42aabbc's fixes, against real servers.

One regression test per defect (or a strict xfail naming what is left).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from paramiko_executor import CommandTimeout, SSHExecutor

UPLOAD = 24 * 1024 * 1024


@pytest.mark.hang_timeout(120)
@pytest.mark.skipif(os.name != "posix", reason="socket buffers filled on a frozen peer")
def test_a_timeout_returns_while_another_commands_upload_holds_the_socket(make_test_server):
    """The caller's TERM after its timeout waited on the socket another thread writes to.

    The server stops reading (frozen, no keepalive): a second command's upload fills the
    socket buffers and holds the transport's send locks. The timed-out caller sent its
    TERM from its own thread, and so hung until the server read again (for good here);
    the TERM must go out from the background then, and the caller return at its deadline.
    """
    from helpers import call_in_thread, wait_for

    server = make_test_server(max_sessions=10)
    with SSHExecutor(**server.executor_parameters()) as ex:
        ex.run_command("true", timeout=20)
        transport = ex._connection.link.transport
        timed = call_in_thread(lambda: ex.run_command("sleep 60", timeout=10))
        wait_for(lambda: "sleep 60" in server.commands, "the sleep to start")
        # Each upload may send its channel's window (2 MiB) past the freeze: together,
        # more than the socket buffers hold.
        uploads = [call_in_thread(lambda: ex.run_command("wc -c", b"u" * UPLOAD))
                   for _ in range(8)]
        wait_for(lambda: server.commands.count("wc -c") == 8, "the uploads to start")
        server.freeze()
        try:
            # Bounded: until the upload is stuck writing (its bytes stop moving).
            before, end = -1, time.monotonic() + 20
            while time.monotonic() < end:
                sent = transport.packetizer._Packetizer__sent_bytes
                if sent == before:
                    break
                before = sent
                time.sleep(0.5)
            assert timed["thread"].is_alive(), "timed out before the uploads filled the socket"
            write_lock = transport.packetizer._Packetizer__write_lock
            held = not write_lock.acquire(blocking=False)
            if not held:
                write_lock.release()
            assert held, "no upload is stuck writing: the socket buffers took it all"
            timed["thread"].join(20)
            returned = not timed["thread"].is_alive()
        finally:
            server.thaw()
        timed["thread"].join(60)
        for upload in uploads:
            upload["thread"].join(60)
        assert returned, "the timed-out call hung on the socket another command filled"
        assert isinstance(timed.get("error"), CommandTimeout), timed


@pytest.mark.hang_timeout(60)
@pytest.mark.parametrize("kind", ["plain", "duping"])
@pytest.mark.parametrize("call, name", [
    (dict(command="sudo -S true", stdin_input="hunter2\udc80\n"), "stdin_input"),
    (dict(command="true", env={"LC_TOKEN": "hunter2\udc80"}), "env['LC_TOKEN']"),
    (dict(command="mysql -phunter2\udc80"), "command"),
])
def test_text_utf8_cannot_encode_is_refused_without_quoting_it(sshd, kind, call, name):
    """42aabbc kept a password UTF-8 cannot encode out of the error; stdin, where
    ``sudo -S`` passwords go, an env value and the command were not: run_command raised
    the codec's UnicodeEncodeError, whose args and repr hold the whole text."""
    from paramiko_executor import SAFE_WRAPPER, DupingSSHExecutor

    make = (SSHExecutor if kind == "plain"
            else lambda **kw: DupingSSHExecutor(wrapper=SAFE_WRAPPER, **kw))
    with make(**sshd.executor_parameters()) as ex:
        with pytest.raises(ValueError) as caught:
            ex.run_command(**call, timeout=20)
        assert "hunter2" not in repr(caught.value) and "hunter2" not in str(caught.value.args)
        assert name in str(caught.value) and "UTF-8" in str(caught.value)
        assert ex.run_command("echo ok", timeout=20).stdout == "ok\n"


@pytest.mark.hang_timeout(60)
def test_a_login_the_server_breaks_counts_as_failed_when_no_caller_waits_any_more(
        make_test_server, monkeypatch):
    """6a8f66b left out of ``connect_failures`` every interrupted login nobody waited for.

    Meant for the logins the executor stops itself (a TOTP wait nobody wants), it also
    hid the server breaking the connection mid-login once the caller's timeout had
    passed: a real failed attempt, counted before.
    """
    from helpers import wait_for

    import paramiko_executor.testing.server as testing_server

    broken = []

    def break_login(self: Any, username: str, key: Any) -> int:
        time.sleep(1.5)  # past the caller's timeout: nobody waits for the login then
        broken.append(username)
        raise EOFError("the server breaks the connection mid-login")

    monkeypatch.setattr(testing_server._Connection, "check_auth_publickey", break_login)
    server = make_test_server()
    with SSHExecutor(**server.executor_parameters(), connect_retries=0) as ex:
        with pytest.raises(CommandTimeout):
            ex.run_command("true", timeout=0.3)
        wait_for(lambda: bool(broken), "the server to break the login")
        wait_for(lambda: ex.statistics().connect_failures == 1,
                 "the broken login to be counted", timeout=10)
