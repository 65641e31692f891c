"""What an executor did and why it waited: `ExecutorStatistics`, and the counters behind it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

__all__ = ["Counters", "ExecutorStatistics"]


@dataclass(frozen=True)
class ExecutorStatistics:
    """A consistent snapshot of one executor's counters (see ``SSHExecutor.statistics``).

    Each ``run_command``/``put``/``get`` call is started once (retries do not
    start it again) and ends as succeeded (exit 0, transfer done) or failed
    (anything else): ``commands_started == commands_succeeded +
    commands_failed`` + the calls in flight. ``connects`` counts successful
    logins, ``reconnects`` those after the first, ``connect_failures`` every
    failed attempt (not one the executor stopped itself: on ``close()``, or
    a TOTP wait nobody waits for any more); ``commands_retried`` every re-send after a lost
    connection; ``refused_opens`` channel opens a live server refused;
    ``open_channels`` the server sessions held now, ``waiting`` the threads
    queued for a slot; bytes are payload (stdin, output, file data), as sent
    over the connection: stdin as far as it went out (a command that timed
    out or ended before taking all of it counts less), output in bytes, not
    decoded characters, kept or not (``keep_output=False``).
    """

    connects: int = 0
    connect_failures: int = 0
    reconnects: int = 0
    commands_started: int = 0
    commands_succeeded: int = 0
    commands_failed: int = 0
    commands_retried: int = 0
    refused_opens: int = 0
    open_channels: int = 0
    waiting: int = 0
    max_sessions: Optional[int] = None
    queue_wait_seconds_total: float = 0.0
    queue_wait_seconds_max: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0


_COUNTED = tuple(f.name for f in fields(ExecutorStatistics)
                 if f.name not in ("open_channels", "waiting", "max_sessions"))


class Counters:
    """The counters of one connection, kept where the events happen, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # ExecutorStatistics' fields by name: int counts, and float seconds for the waits.
        self._values: Dict[str, Any] = dict.fromkeys(_COUNTED, 0)
        self._values["queue_wait_seconds_total"] = 0.0
        self._values["queue_wait_seconds_max"] = 0.0

    def add(self, **increments: int) -> None:
        """Add to the named counters at once."""
        with self._lock:
            values = self._values
            for name, amount in increments.items():
                values[name] += amount

    def waited(self, seconds: float) -> None:
        """A thread waited ``seconds`` for a slot."""
        with self._lock:
            values = self._values
            values["queue_wait_seconds_total"] += seconds
            if seconds > values["queue_wait_seconds_max"]:
                values["queue_wait_seconds_max"] = seconds

    def snapshot(self, *, open_channels: int, waiting: int,
                 max_sessions: Optional[int]) -> ExecutorStatistics:
        with self._lock:
            return ExecutorStatistics(open_channels=open_channels, waiting=waiting,
                                      max_sessions=max_sessions, **self._values)

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
