"""What a command gives back: `CommandResult`, and how its output is decoded.

The errors live in `errors`; they are importable from here too.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Generic, Optional, TypeVar, Union

from .errors import (
    AuthenticationFailure,
    CommandExecutionFailure,
    CommandTimeout,
    ExecutorError,
    ExecutorFailure,
    HostKeyFailure,
)

__all__ = [
    "AuthenticationFailure",
    "CommandExecutionFailure",
    "CommandResult",
    "CommandTimeout",
    "ExecutorError",
    "ExecutorFailure",
    "HostKeyFailure",
    "check_encoding",
    "decode_output",
]

Output = Union[str, bytes]

#: What a result's output is: str (decoded) or bytes (``encoding=None``).
OutputT = TypeVar("OutputT", bound=Output, covariant=True)


def check_encoding(encoding: object) -> Optional[str]:
    """``encoding`` if it names a codec Python knows (or is None), else `TypeError`/`ValueError`."""
    if encoding is None:
        return None
    if not isinstance(encoding, str):
        raise TypeError(f"encoding must be a codec name or None, not {type(encoding).__name__}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"encoding names no known codec: {encoding!r}") from None
    return encoding


def decode_output(data: Union[bytes, bytearray, memoryview], encoding: Optional[str] = "utf-8"
                  ) -> Output:
    """Decode output; invalid bytes become U+FFFD, never an error. None: bytes, unchanged."""
    if encoding is None:
        return bytes(data)
    return str(data, encoding, "replace")


@dataclass(frozen=True)
class CommandResult(Generic[OutputT]):
    """The outcome of a command that ran to its end. Output is decoded, not stripped.

    ``CommandResult[str]`` by default, ``CommandResult[bytes]`` with ``encoding=None``.

    ``exit_signal`` names the signal that killed the command (``exit_code``
    is then -1), else None; only ``check=False`` returns such a result.
    """

    stdout: OutputT
    stderr: OutputT
    exit_code: int
    exit_signal: Optional[str] = None
