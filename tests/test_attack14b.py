"""attack14b: statistics' ``bytes_sent``, the bounded writes' Ctrl-Cs, and the locks
taken through ``threading.Condition.__enter__`` (Python: a Ctrl-C as it returned left
the lock held for good)."""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Iterator, Optional

import pytest
from paramiko.buffered_pipe import PipeTimeout
from test_interrupt_locks import _interrupting_condition_enter

from paramiko_executor import SAFE_WRAPPER, DupingSSHExecutor, SSHExecutor
from paramiko_executor.transfer import _Inbox, _ReceiveWindow


class _Channel:
    """What an SFTP inbox and its window take of their channel."""

    in_window_size = 1 << 21
    in_window_sofar = 0


def _sftp_inbox_users() -> Iterator[Any]:
    yield pytest.param(lambda inbox: inbox.read_ready(), id="read_ready")
    yield pytest.param(lambda inbox: inbox.peek(4), id="peek")
    yield pytest.param(lambda inbox: inbox.empty(), id="empty")
    yield pytest.param(lambda inbox: inbox.wait_for(4, 0.0, None), id="wait_for")
    yield pytest.param(lambda inbox: inbox.read(4, 0.001), id="read")
    yield pytest.param(lambda inbox: inbox.set_event(threading.Event()), id="set_event")
    yield pytest.param(lambda inbox: inbox.close(), id="close")
    yield pytest.param(lambda inbox: inbox.feed(b"data"), id="feed")


@pytest.mark.parametrize("use", list(_sftp_inbox_users()))
def test_a_ctrl_c_as_an_sftp_inbox_takes_its_lock_leaves_it_free(
        use: Callable[[Any], Any]) -> None:
    """The SFTP channel's inboxes (`transfer._Inbox`) took their condition with ``with
    self._cond`` after 754ee44 fixed the others: a Ctrl-C in the transfer's thread as
    ``Condition.__enter__`` returned left the lock held, and paramiko's transport
    thread, feeding the channel's next packet, waited on it for good: every call on
    the connection with it."""
    lock = threading.Lock()
    cond = threading.Condition(lock)
    inbox = _Inbox(lock, cond, want=1,
                   window=_ReceiveWindow(_Channel()))  # type: ignore[arg-type]
    interrupted: Optional[BaseException] = None
    sys.settrace(_interrupting_condition_enter())
    try:
        use(inbox)
    except KeyboardInterrupt as exc:
        interrupted = exc
    except PipeTimeout:
        pass  # read's, uninterrupted
    finally:
        sys.settrace(None)
    taken = lock.acquire(timeout=2)
    if taken:
        lock.release()
    assert taken, f"the lock stayed held after {interrupted!r}"


@pytest.mark.parametrize("pty", [False, True], ids=["pipe", "pty"])
def test_bytes_sent_counts_the_callers_stdin_only_on_a_duping_executor(
        sshd: Any, pty: bool) -> None:
    """`DupingSSHExecutor` sends the command line (and a newline after the stdin) on
    the wrapper's stdin: ``bytes_sent`` counted them as stdin, 8 for ``echo hi`` run
    without any (16 for ``cat`` fed 3 bytes), where `SSHExecutor` counts 0 (3): more
    than the caller's stdin. A timed-out command whose stdin never went past its
    command line counts none."""
    with DupingSSHExecutor(**sshd.executor_parameters(), wrapper=SAFE_WRAPPER) as ex, \
            SSHExecutor(**sshd.executor_parameters()) as plain:
        for executor in (ex, plain):
            executor.run_command("echo hi", pty=pty)
            assert executor.statistics().bytes_sent == 0
            out = executor.run_command("cat", stdin_input="abc", pty=pty).stdout
            assert "abc" in out  # a terminal echoes it as well
            stats = executor.statistics()
            assert stats.bytes_sent == 3, stats
            assert stats.commands_started == stats.commands_succeeded + stats.commands_failed == 2
