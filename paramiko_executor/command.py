"""What every executor's ``run_command`` shares: its options, checked once, and its outcomes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Union

from .checks import check_bool, check_timeout, encode_text
from .errors import CommandExecutionFailure, CommandTimeout
from .results import CommandResult, Output, check_encoding
from .text import printable

__all__ = ["RunOptions", "StdinInput", "check_command", "outcome", "stdin_bytes",
           "with_terminal_eof"]

StdinInput = Union[str, bytes, None]
#: A live-output callback: ``(stream, line)``, the line str or bytes as the encoding says.
OnOutput = Callable[[str, Any], object]


def check_command(command: Any) -> str:
    """``command``, checked: a str without NUL.

    A shell cannot be given a NUL, and sshd ends the whole connection on an
    exec request holding one: every command sharing it would be cut, and
    this one retried to do it again.
    """
    if not isinstance(command, str):
        raise TypeError(f"command must be a str, not {type(command).__name__}")
    if "\0" in command:
        raise ValueError("command must not contain a NUL character")
    encode_text("command", command)
    return command


def stdin_bytes(stdin_input: Any) -> bytes:
    """``stdin_input`` as the bytes to send (UTF-8 for text)."""
    if stdin_input is None:
        return b""
    if isinstance(stdin_input, str):
        return encode_text("stdin_input", stdin_input)
    if isinstance(stdin_input, (bytes, bytearray, memoryview)):
        return bytes(stdin_input)
    raise TypeError(f"stdin_input must be str, bytes or None, not {type(stdin_input).__name__}")


def with_terminal_eof(data: bytes) -> bytes:
    """``data`` as typed at a terminal, then end-of-file.

    A terminal has no end-of-file of its own (an SSH EOF does not reach a
    command on a pty): end-of-file is Ctrl-D at a line's start, so a last
    line without its newline takes one Ctrl-D to end the line and one more.
    """
    return data + (b"\x04" if not data or data.endswith(b"\n") else b"\x04\x04")


def _check_env(env: Any) -> Optional[Dict[str, str]]:
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
    checked: Dict[str, str] = {}
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError("env must map str to str: "
                            f"{type(name).__name__} -> {type(value).__name__} given")
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ValueError(f"env: {name!r} is not a valid variable name (or its value holds NUL)")
        encode_text(f"env[{name!r}]", name + value)
        checked[name] = value
    return checked


@dataclass(frozen=True)
class RunOptions:
    """The keyword options of ``run_command``, checked at the call."""

    timeout: Optional[float] = None
    check: bool = True
    env: Optional[Dict[str, str]] = None
    encoding: Optional[str] = "utf-8"
    pty: bool = False
    on_output: Optional[OnOutput] = None
    keep_output: bool = True

    @classmethod
    def of(cls, *, timeout: Any = None, check: Any = True, env: Any = None,
           encoding: Any = "utf-8", pty: Any = False, on_output: Any = None,
           keep_output: Any = True) -> RunOptions:
        if on_output is not None and not callable(on_output):
            raise TypeError(f"on_output must be callable or None, not {type(on_output).__name__}")
        return cls(
            timeout=check_timeout("timeout", timeout),
            check=check_bool("check", check),
            env=_check_env(env),
            encoding=check_encoding(encoding),
            pty=check_bool("pty", pty),
            on_output=on_output,
            keep_output=check_bool("keep_output", keep_output),
        )


def outcome(
    command: str,
    stdin_input: StdinInput,
    options: RunOptions,
    exit_code: Optional[int],
    out: Output,
    err: Output,
    *,
    timed_out: bool = False,
    signal_name: Optional[str] = None,
) -> CommandResult[Output]:
    """The result of a finished command, or the failure it raises.

    A timeout always raises `CommandTimeout`; a non-zero exit or a signal
    raises `CommandExecutionFailure` unless ``options.check`` is False. A
    signal is the command's end (``exit_code`` -1) even with an exit status.
    """
    if timed_out:
        raise CommandTimeout(f"command {command!r} timed out after {options.timeout:g} s",
                             None, out, err, stdin_input)
    if signal_name is not None:
        exit_code = None  # killed: a status a server sent beside the signal decides nothing
    code = -1 if exit_code is None else exit_code
    if code == 0 or not options.check:
        return CommandResult(stdout=out, stderr=err, exit_code=code, exit_signal=signal_name)
    if exit_code is None:
        # The signal's name comes from the server: escaped before it is shown.
        how = (f"was killed by signal {printable(signal_name)}" if signal_name
               else "ended without exit status")
        raise CommandExecutionFailure(f"command {command!r} {how}", -1, out, err, stdin_input,
                                      signal_name)
    raise CommandExecutionFailure(f"command {command!r} failed with exit code {exit_code}",
                                  exit_code, out, err, stdin_input)
