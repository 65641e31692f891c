"""The connect retry policy, as a value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .checks import check_int, check_number

__all__ = ["ConnectRetry"]


@dataclass(frozen=True)
class ConnectRetry:
    """How often and how patiently to retry a connect that failed for a temporary reason.

    After a failed attempt the connector waits ``backoff`` seconds, doubling
    each time up to ``max_backoff``, for ``retries`` retries: ``retries + 1``
    attempts in all, the last one the "one last attempt" of the contract.
    """

    retries: int = 9
    backoff: float = 1.0
    max_backoff: float = 60.0

    def __post_init__(self) -> None:
        check_int("connect_retries", self.retries, minimum=0)
        check_number("connect_backoff", self.backoff, allow_zero=True, optional=False)

    def delays(self) -> Iterator[float]:
        """The waits before each retry, in order."""
        for attempt in range(self.retries):
            yield min(self.backoff * 2**attempt, self.max_backoff)
