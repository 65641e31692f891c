"""Retry policies, as immutable values.

`Backoff` is the one backoff formula (doubling, capped). `ConnectRetry` says how
a connect that failed for a temporary reason is retried; `CommandRetry` how a
command (or transfer) is tried again: after a lost connection at most
``on_disconnect_retry`` times, and after the server turned it away before it
ran (never started) a bounded number of times free of charge. Like urllib3's
``Retry``, `CommandRetry.increment` returns a new value or raises. Only those
two are ever retried: the caller's own errors (`errors.CallerError`), timeouts
and protocol errors of the server end the call at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

from .checks import check_int, check_number
from .errors import ConnectionLost, ExecutorFailure

__all__ = ["Backoff", "CommandRetry", "ConnectRetry"]


@dataclass(frozen=True)
class Backoff:
    """Waits of ``initial`` seconds, doubling each time, at most ``maximum``."""

    initial: float
    maximum: float

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (0 for the first)."""
        growth: float = 2 ** attempt  # int ** int is Any to mypy (a negative power is a float)
        return min(self.initial * growth, self.maximum)


@dataclass(frozen=True)
class ConnectRetry:
    """How often and how patiently to retry a connect that failed for a temporary reason.

    After a failed attempt the connector waits ``backoff`` seconds, doubling
    each time up to ``max_backoff``, for ``retries`` retries: ``retries + 1``
    attempts in all (the retries guide's "then makes one last attempt").
    """

    retries: int = 9
    backoff: float = 1.0
    max_backoff: float = 60.0

    def __post_init__(self) -> None:
        check_int("connect_retries", self.retries, minimum=0)
        check_number("connect_backoff", self.backoff, allow_zero=True, optional=False)

    def delays(self) -> Iterator[float]:
        """The waits before each retry, in order."""
        backoff = Backoff(self.backoff, self.max_backoff)
        for attempt in range(self.retries):
            yield backoff.delay(attempt)


#: How often work the server turned away before it ran is tried again.
NEVER_STARTED_TRIES = 8


@dataclass(frozen=True)
class CommandRetry:
    """What is left of a command's retries.

    ``lost``: retries left after a lost connection (``on_disconnect_retry``);
    ``never_started``: free retries left after the work never reached the
    server (a connection lost before the exec, an open nobody answered, an
    exec or SFTP subsystem request refused or closed before its reply).
    """

    lost: int = 3
    never_started: int = NEVER_STARTED_TRIES

    def increment(self, error: ExecutorFailure) -> CommandRetry:
        """The retries left after ``error``; raises ``error`` once none are left for its kind.

        A `ConnectionLost` with ``started`` counts against ``lost``; one
        without, and any other error (a `NeverStarted`, a refused SFTP
        subsystem), against ``never_started``.
        """
        if isinstance(error, ConnectionLost) and error.started:
            if self.lost <= 0:
                raise error
            return replace(self, lost=self.lost - 1)
        if self.never_started <= 0:
            raise error
        return replace(self, never_started=self.never_started - 1)
