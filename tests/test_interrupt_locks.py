"""An interrupt (Ctrl-C) as a lock is taken leaves it free.

``threading.Condition.__enter__`` is Python: a KeyboardInterrupt raised as it returns,
after its lock was taken, escapes the ``with`` before the block begins, and nothing
releases that lock. Every later use of the tunnel limit, the inbox of a forwarded
socket or the TOTP ledger then waited for good. The classes take the condition's lock
itself (``with self._lock``), whose ``__enter__`` is C and leaves no such moment.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any, Callable, Iterator, List, Optional

import pytest

from paramiko_executor.inbox import Inbox
from paramiko_executor.totp import TOTPLedger
from paramiko_executor.tunnels import ForwardLimit

SECRET = "JBSWY3DPEHPK3PXP"


def _interrupting_condition_enter() -> Callable[[types.FrameType, str, Any], Any]:
    """A tracer raising KeyboardInterrupt as ``Condition.__enter__`` returns (lock taken)."""
    enter = threading.Condition.__enter__.__code__

    def tracer(frame: types.FrameType, event: str, arg: Any) -> Any:
        if frame.f_code is not enter:
            return None
        def local(frame: types.FrameType, event: str, arg: Any) -> Any:
            if event == "return":
                raise KeyboardInterrupt
            return local
        return local
    return tracer


class _Channel:
    """What an inbox takes of its channel as it is made."""

    def get_transport(self) -> Any:
        return types.SimpleNamespace(sock=None)


def _users() -> Iterator[Any]:
    limit = ForwardLimit(2)
    yield pytest.param(lambda: limit.used, lambda: limit._cond, id="ForwardLimit.used")
    yield pytest.param(lambda: limit.wake(), lambda: limit._cond, id="ForwardLimit.wake")
    inbox = Inbox(_Channel(), "stdout")  # type: ignore[arg-type]
    yield pytest.param(lambda: inbox.read_ready(), lambda: inbox._cond, id="Inbox.read_ready")
    yield pytest.param(lambda: inbox.close(), lambda: inbox._cond, id="Inbox.close")
    ledger = TOTPLedger(clock=lambda: 1_000_000.0)
    yield pytest.param(lambda: ledger.issue(SECRET), lambda: ledger._cond, id="TOTPLedger.issue")


@pytest.mark.parametrize("use, lock", list(_users()))
def test_an_interrupt_as_the_lock_is_taken_leaves_it_free(
        use: Callable[[], Any], lock: Callable[[], Any]) -> None:
    interrupted: Optional[BaseException] = None
    sys.settrace(_interrupting_condition_enter())
    try:
        use()
    except KeyboardInterrupt as exc:
        interrupted = exc
    finally:
        sys.settrace(None)
    # From another thread: the ledger's lock is reentrant, this thread would get it anyway.
    taken: List[bool] = []

    def take() -> None:
        got = lock().acquire(timeout=2)
        taken.append(got)
        if got:
            lock().release()

    other = threading.Thread(target=take, daemon=True)
    other.start()
    other.join(10)
    assert taken == [True], f"the lock stayed held after {interrupted!r}"
