"""The connect retry policy, as a value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

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
        if isinstance(self.retries, bool) or not isinstance(self.retries, int):
            kind = type(self.retries).__name__
            raise TypeError(f"connect_retries must be an integer, not {kind}")
        if self.retries < 0:
            raise ValueError(f"connect_retries must be 0 or more, not {self.retries}")
        if isinstance(self.backoff, bool) or not isinstance(self.backoff, (int, float)):
            raise TypeError(f"connect_backoff must be a number, not {type(self.backoff).__name__}")
        if self.backoff < 0:
            raise ValueError(f"connect_backoff must be 0 or more, not {self.backoff}")

    def delays(self) -> Iterator[float]:
        """The waits before each retry, in order."""
        for attempt in range(self.retries):
            yield min(self.backoff * 2**attempt, self.max_backoff)
