"""Results and errors: what a command gives back, and how it fails."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from .executors import Executor

__all__ = [
    "CommandResult",
    "CommandExecutionFailure",
    "CommandTimeout",
    "ExecutorFailure",
    "AuthenticationFailure",
    "HostKeyFailure",
    "decode_output",
]


def decode_output(data: Union[bytes, bytearray, memoryview]) -> str:
    """Decode command output as UTF-8; invalid bytes become U+FFFD, never an error."""
    return str(data, "utf-8", "replace")


@dataclass(frozen=True)
class CommandResult:
    """The outcome of a command that exited 0. Output is decoded, not stripped."""

    stdout: str
    stderr: str
    exit_code: int


class CommandExecutionFailure(Exception):
    """The command ran and exited non-zero (or was killed by a signal: ``exit_code`` -1).

    ``stdin`` is the ``stdin_input`` the caller gave, unchanged.
    """

    def __init__(
        self,
        message: str,
        exit_code: Optional[int],
        stdout: str,
        stderr: str,
        stdin: Union[str, bytes, None] = None,
    ) -> None:
        super().__init__(message, exit_code, stdout, stderr, stdin)
        self.message = message
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin

    def __str__(self) -> str:
        return self.message


class CommandTimeout(CommandExecutionFailure):
    """The command outran its ``timeout``: ``exit_code`` is None, output is what arrived."""


class ExecutorFailure(Exception):
    """The executor itself failed: connection lost, channel refused, host unreachable."""

    def __init__(self, description: str, executor: Optional[Executor] = None) -> None:
        super().__init__(description)
        self.description = description
        self.executor = executor

    def __reduce__(self):  # keep pickling (e.g. across process pools) lossless
        return (type(self), (self.description, self.executor))

    def __str__(self) -> str:
        return self.description


class AuthenticationFailure(ExecutorFailure):
    """The server refused the credentials, or asked a prompt no answer matches. Never retried."""


class HostKeyFailure(ExecutorFailure):
    """The server's host key is unknown or does not match. Never retried."""
