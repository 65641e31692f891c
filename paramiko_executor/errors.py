"""Every error of the library, and the one place where low-level errors are translated.

The public tree::

    ExecutorError                      common root: catch everything the library raises
     +-- CommandExecutionFailure       the command ran and failed (non-zero exit, signal)
     |    +-- CommandTimeout           the command outran its timeout
     +-- ExecutorFailure               the executor failed: connection, channel, host
          +-- AuthenticationFailure    credentials or prompt refused; never retried
          +-- HostKeyFailure           host key unknown, changed or revoked; never retried
          +-- TransferTimeout          a put or get outran its timeout (also a TimeoutError)
          +-- ForwardTimeout           an open_connection outran its timeout (also a TimeoutError)
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

Where an error comes from
-------------------------
An error is classified by where it came from, never by its type alone.

*The caller's own code and local I/O* (an ``on_output`` or ``progress``
callback, a file object's ``read``/``write``, a local path that is a
directory, a full disk) run inside `callers_code()`, which wraps what they
raise in a `CallerError`. A `CallerError` is neither an `ExecutorError` nor
one of `TRANSPORT_ERRORS`, so no handler of the connection's failures can
catch it: the channel of that call is ended as for a timeout, nothing else is
touched (no drop of the connection, no retry), and the public method raises
the original exception, the same object. A callback's ``BrokenPipeError`` is
the caller's, never a broken connection.

*Everything else* inside `translate` was raised by paramiko or by the code of
this library around it, and `is_lost` decides whether it means the connection
broke. It does from evidence about the transport only:

1. the transport is no longer active (closed by us, by the keepalive that
   found the peer dead, or by paramiko after a failure);
2. the transport's thread has left its read loop (the server's DISCONNECT,
   end of stream or a socket error in the reader): paramiko unlinks the
   channels a moment before it marks itself inactive, and a thread woken by
   that unlink must not mistake the connection's end for its channel's;
3. the exception was raised by the transport's own packetizer (its socket,
   proxy command or jump channel failed under a send from this thread).

Anything else is an `ExecutorFailure` naming what failed, on a connection
that stays up: an SFTP status, a channel the server closed, a request it
refused, a key exchange that timed out. The class of an exception is only a
filter (`TRANSPORT_ERRORS`: what paramiko and the socket may raise); it never
decides "lost" by itself.

Anything malformed that a server sends (a packet too short, a length past
the end, text that is not UTF-8, more data than the window granted) ends the
affected channel with an `ExecutorFailure` naming the protocol error;
``struct.error``, ``IndexError`` and ``UnicodeError`` never reach the caller.

`TRANSPORT_ERRORS` is the tuple of what paramiko and the socket raise on a
broken connection, and `translate` the one context manager that maps them, given
that evidence, to `ConnectionLost` or `ExecutorFailure`.
"""

from __future__ import annotations

import contextlib
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
)

import paramiko
import paramiko.packet

from .internals import WriteAbandoned, transport_reading

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
    "callers_own",
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
        self.message: str = message
        self.exit_code: Optional[int] = exit_code
        # str, or bytes with encoding=None: Any, as subprocess.CalledProcessError's output,
        # since an ``except`` clause cannot say which (a Union would refuse ``.strip()``).
        self.stdout: Any = stdout
        self.stderr: Any = stderr
        self.stdin: Union[str, bytes, None] = stdin
        self.exit_signal: Optional[str] = exit_signal

    def __reduce__(self) -> Any:
        # Without stdin: an unpickled failure has stdin None.
        return (type(self), (self.message, self.exit_code, self.stdout, self.stderr, None,
                             self.exit_signal))

    def __str__(self) -> str:
        return self.message


class CommandTimeout(CommandExecutionFailure):
    """The command outran its ``timeout``: ``exit_code`` is None, output is what arrived
    (none with ``keep_output=False``)."""


class ExecutorFailure(ExecutorError):
    """The executor itself failed: connection lost, channel refused, host unreachable.

    ``executor`` is the executor that failed; an unpickled failure has None
    there (a pickle never carries the executor, nor so its credentials).
    """

    def __init__(self, description: str, executor: Optional[Executor] = None) -> None:
        super().__init__(description)
        self.description: str = description
        self.executor: Optional[Executor] = executor

    def __reduce__(self) -> Any:
        return (type(self), (self.description,), self._picklable_state())

    def _picklable_state(self) -> Optional[Dict[str, Any]]:
        """Attributes a subclass adds that a pickle may carry (never the executor)."""
        return None

    def __setstate__(self, state: Optional[Dict[str, Any]]) -> None:
        if state:
            self.__dict__.update(state)

    def __str__(self) -> str:
        return self.description


class TransferTimeout(ExecutorFailure, TimeoutError):
    """A ``put`` or ``get`` outran its ``timeout``; no partial file is left under the final name."""

    def __str__(self) -> str:
        return self.description


class ForwardTimeout(ExecutorFailure, TimeoutError):
    """``open_connection`` did not open within its ``timeout``, as ``socket.create_connection``."""

    def __str__(self) -> str:
        return self.description


class AuthenticationFailure(ExecutorFailure):
    """The server refused the credentials, or asked a prompt no answer matches. Never retried."""


class HostKeyFailure(ExecutorFailure):
    """The server's host key is unknown, changed or revoked. Never retried."""


class ConnectionLost(ExecutorFailure):
    """The connection broke under a command; the executor may retry it on a new one.

    ``started`` is False when the work cannot have reached the server.
    ``timed_out``: the call's own packet write outran its deadline and was
    given up, which broke the connection (`internals.WriteAbandoned`): the
    call ends as timed out, never tried again.
    """

    def __init__(self, description: str, executor: Optional[Executor] = None, *,
                 started: bool = True, timed_out: bool = False) -> None:
        super().__init__(description, executor)
        self.started: bool = started
        self.timed_out: bool = timed_out


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
    """An exception of the caller's code or of local I/O, carried past the connection's handling.

    Never an `ExecutorError` and never one of `TRANSPORT_ERRORS`, so no handler
    of the connection's failures can catch it. The public method that made
    the call ends its channel as for a timeout and raises ``original``.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original: BaseException = original


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


R = TypeVar("R")


def callers_own(call: Callable[[], R]) -> R:
    """``call()``, at a public method's boundary: a `CallerError` out of it becomes the original.

    The caller gets its own exception, the same object, raised outside any
    handler so that its context stays what it was.
    """
    try:
        return call()
    except CallerError as exc:
        original = exc.original
    raise original


def is_lost(exc: BaseException, transport: paramiko.Transport) -> bool:
    """Whether ``exc``, raised by paramiko inside `translate`, means the connection broke.

    Decided from evidence about ``transport`` (see the module's docstring):
    it is no longer active, its thread has left its read loop, or ``exc``
    came through its packetizer. ``exc``'s class alone decides nothing.
    """
    return not transport_reading(transport) or _through_packetizer(exc)


#: The module of paramiko's packetizer: the only code that touches the transport's socket.
_PACKETIZER = paramiko.packet.__name__


def _through_packetizer(exc: BaseException) -> bool:
    """Whether ``exc`` came from below the transport's packetizer (its socket, proxy or channel)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == _PACKETIZER:
            return True
        tb = tb.tb_next
    return False


@contextlib.contextmanager
def translate(transport: paramiko.Transport, *,
              started: Union[bool, Callable[[], bool]] = True,
              what: str = "the connection") -> Iterator[None]:
    """Map the low-level errors raised inside the block to the library's own.

    A `TRANSPORT_ERRORS` exception becomes `ConnectionLost` (with ``started``,
    or what ``started()`` says at that moment) when `is_lost` finds evidence
    that the connection broke, else `ExecutorFailure` naming ``what``. The
    library's own errors and a `CallerError` pass unchanged: the caller's code
    never runs inside this decision.
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
    if isinstance(exc, WriteAbandoned):
        return ConnectionLost(f"{what} was given up: {exc}", started=started, timed_out=True)
    if is_lost(exc, transport):
        return ConnectionLost(f"{what} was lost: {exc!r}", started=started)
    return ExecutorFailure(f"SSH error on {what}: {exc!r}")


E = TypeVar("E", bound=BaseException)


def for_executor(exc: E, executor: Any) -> E:
    """``exc`` with ``executor`` attached when it is an `ExecutorFailure` that has none yet."""
    if isinstance(exc, ExecutorFailure) and exc.executor is None:
        exc.executor = executor
    return exc
