"""Every error of the library, and the one place where low-level errors are translated.

The public tree::

    ExecutorError                      common root: catch everything the library raises
     +-- CommandExecutionFailure       the command ran and failed (non-zero exit, signal)
     |    +-- CommandTimeout           the command outran its timeout
     +-- ExecutorFailure               the executor failed: connection, channel, host
          +-- AuthenticationFailure    credentials or prompt refused; never retried
          +-- HostKeyFailure           host key unknown, changed or revoked; never retried
          +-- TransferTimeout          a put or get outran its timeout (also a TimeoutError)
          +-- GroupFailure             (``group``) some hosts of a HostGroup failed

The internal signals, never seen by a caller (the executors turn them into the
public errors above):

- `ConnectionLost` (an `ExecutorFailure`): the connection broke under a command
  or transfer; ``started`` says whether the work may have reached the server.
- `NeverStarted` (an `ExecutorFailure`): the server turned the work away before
  it ran (an open nobody answered, an exec refused or closed before its reply);
  tried again on the same connection, free of charge, a bounded number of times.
- `TemporaryFailure`: a connect attempt failed for a reason that retrying may cure.
- `AuthenticationInterrupted` (a ``paramiko.SSHException``): the connection broke
  or stopped answering during authentication: temporary, like any such error
  while connecting.
- `CallerError`: carries an exception raised by the caller's own code (a
  callback, a file object) or by local I/O past the connection's error
  handling; the public method re-raises the original, unchanged.

Where an error comes from decides what it means, never its type alone. Code
the caller owns and local I/O run inside `callers_code()`, which wraps what
they raise in a `CallerError`; nothing inside `translate` ever looks at such
an exception, so a callback's ``BrokenPipeError`` can never pass for a broken
connection. What remains inside `translate` was raised by paramiko or its
socket, and counts as a lost connection only with evidence about the transport
(`is_lost`).

`TRANSPORT_ERRORS` is the tuple of what paramiko and the socket raise on a
broken connection, and `translate` the one context manager that maps them, given
the transport's state, to `ConnectionLost` or `ExecutorFailure`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Tuple, Type, TypeVar, Union

import paramiko

if TYPE_CHECKING:
    from .executors import Executor

__all__ = [
    "AuthenticationFailure",
    "AuthenticationInterrupted",
    "CallerError",
    "CommandExecutionFailure",
    "CommandTimeout",
    "ConnectionLost",
    "ExecutorError",
    "ExecutorFailure",
    "HostKeyFailure",
    "NeverStarted",
    "TRANSPORT_ERRORS",
    "TemporaryFailure",
    "TransferTimeout",
    "callers_code",
    "for_executor",
    "mapped",
    "translate",
]

#: What paramiko and the socket layer raise when a connection breaks under a call.
TRANSPORT_ERRORS: Tuple[Type[BaseException], ...] = (EOFError, OSError, paramiko.SSHException)

Output = Union[str, bytes]


class ExecutorError(Exception):
    """The common root of every error this library raises on purpose."""


class CommandExecutionFailure(ExecutorError):
    """The command ran and exited non-zero, or was killed by a signal (``exit_code`` -1).

    ``stdin`` is the ``stdin_input`` the caller gave, unchanged. It is an
    attribute only: it is not part of ``args``, the repr or a pickle, since
    stdin is where ``sudo -S`` and ``--password-stdin`` secrets go.
    ``exit_signal`` names the signal of a killed command (``"TERM"``), else None.
    """

    def __init__(
        self,
        message: str,
        exit_code: Optional[int],
        stdout: Output,
        stderr: Output,
        stdin: Union[str, bytes, None] = None,
        exit_signal: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin
        self.exit_signal = exit_signal

    def __reduce__(self) -> Any:
        # Without stdin: an unpickled failure has stdin None.
        return (type(self), (self.message, self.exit_code, self.stdout, self.stderr, None,
                             self.exit_signal))

    def __str__(self) -> str:
        return self.message


class CommandTimeout(CommandExecutionFailure):
    """The command outran its ``timeout``: ``exit_code`` is None, output is what arrived."""


class ExecutorFailure(ExecutorError):
    """The executor itself failed: connection lost, channel refused, host unreachable.

    ``executor`` is the executor that failed; an unpickled failure has None
    there (a pickle never carries the executor, nor so its credentials).
    """

    def __init__(self, description: str, executor: Optional[Executor] = None) -> None:
        super().__init__(description)
        self.description = description
        self.executor = executor

    def __reduce__(self) -> Any:
        return (type(self), (self.description,), self._picklable_state())

    def _picklable_state(self) -> Optional[dict]:
        """Attributes a subclass adds that a pickle may carry (never the executor)."""
        return None

    def __setstate__(self, state: Optional[dict]) -> None:
        if state:
            self.__dict__.update(state)

    def __str__(self) -> str:
        return self.description


class TransferTimeout(ExecutorFailure, TimeoutError):
    """A ``put`` or ``get`` outran its ``timeout``; no partial file is left under the final name."""

    def __str__(self) -> str:
        return self.description


class AuthenticationFailure(ExecutorFailure):
    """The server refused the credentials, or asked a prompt no answer matches. Never retried."""


class HostKeyFailure(ExecutorFailure):
    """The server's host key is unknown, changed or revoked. Never retried."""


class ConnectionLost(ExecutorFailure):
    """The connection broke under a command; the executor may retry it on a new one.

    ``started`` is False when the work cannot have reached the server.
    """

    def __init__(self, description: str, executor: Optional[Executor] = None, *,
                 started: bool = True) -> None:
        super().__init__(description, executor)
        self.started = started


class NeverStarted(ExecutorFailure):
    """The server turned the work away before it ran: safe to try again on the same connection."""


class TemporaryFailure(Exception):
    """A connect attempt failed for a reason that retrying may cure."""


class AuthenticationInterrupted(paramiko.SSHException):
    """The connection broke, or the server stopped answering, during authentication.

    Not a refusal of the credentials: a temporary connection failure, like any other
    ``paramiko.SSHException`` while connecting, which the caller may retry.
    """


class CallerError(Exception):
    """An exception of the caller's own code or of local I/O, carried past the connection's handling.

    Never an `ExecutorError` and never one of `TRANSPORT_ERRORS`, so no handler
    of the connection's failures can catch it. The public method that made
    the call ends its channel as for a timeout and raises ``original``.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


@contextlib.contextmanager
def callers_code() -> Iterator[None]:
    """Run the caller's code (a callback, a file object) or local I/O: what it raises is theirs.

    Any `Exception` raised inside becomes a `CallerError` carrying it (one
    already carried passes unchanged). ``KeyboardInterrupt`` and other
    ``BaseException``s pass as they are.
    """
    try:
        yield
    except CallerError:
        raise
    except Exception as exc:
        raise CallerError(exc) from exc


def is_lost(exc: BaseException, transport: paramiko.Transport) -> bool:
    """Whether ``exc``, raised by paramiko while using ``transport``, means the connection broke.

    paramiko raises EOFError or OSError (ProxyCommandFailure for a dead proxy
    command) from a send on a broken connection, sometimes before the
    transport has marked itself inactive; anything else counts as lost only
    once it has.
    """
    return (isinstance(exc, (EOFError, OSError, paramiko.ProxyCommandFailure))
            or not transport.is_active())


@contextlib.contextmanager
def translate(transport: paramiko.Transport, *,
              started: Union[bool, Callable[[], bool]] = True,
              what: str = "the connection") -> Iterator[None]:
    """Map the low-level errors raised inside the block to the library's own.

    A `TRANSPORT_ERRORS` exception becomes `ConnectionLost` (with ``started``,
    or what ``started()`` says at that moment) when it means the connection
    broke, else `ExecutorFailure` naming ``what``. The library's own errors pass
    unchanged.
    """
    try:
        yield
    except ExecutorError:
        raise
    except TRANSPORT_ERRORS as exc:
        raise mapped(exc, transport, started() if callable(started) else started, what) from None


def mapped(exc: BaseException, transport: paramiko.Transport, started: bool,
           what: str) -> ExecutorFailure:
    """The library's error for ``exc`` (one of `TRANSPORT_ERRORS`), given the transport's state."""
    if is_lost(exc, transport):
        return ConnectionLost(f"{what} was lost: {exc!r}", started=started)
    return ExecutorFailure(f"SSH error on {what}: {exc!r}")


E = TypeVar("E", bound=BaseException)


def for_executor(exc: E, executor: Any) -> E:
    """``exc`` with ``executor`` attached when it is an `ExecutorFailure` that has none yet."""
    if isinstance(exc, ExecutorFailure) and exc.executor is None:
        exc.executor = executor
    return exc
