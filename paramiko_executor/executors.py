"""The executors: run a shell command and return its `CommandResult`.

`SSHExecutor` runs commands over one shared SSH connection from any number of
threads; `DupingSSHExecutor` feeds them to a fixed wrapper for command-restricted
keys; `ShellExecutor` runs them locally. All three share `Executor`'s contract.
"""

from __future__ import annotations

import abc
import contextlib
import io
import logging
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Union

import paramiko

from .channel import (
    ChannelOutcome,
    ConnectionLost,
    is_lost,
    open_command_channel,
    run_on_channel,
)
from .checks import check_int, check_number
from .connection import Connection, ConnectionState
from .options import DEFAULT, normalize_parameters, resolve_target
from .results import (
    CommandExecutionFailure,
    CommandResult,
    CommandTimeout,
    ExecutorFailure,
    decode_output,
)
from .retry import ConnectRetry
from .warm import warm_channel_of

__all__ = ["DupingSSHExecutor", "Executor", "SSHExecutor", "ShellExecutor"]

log = logging.getLogger("paramiko_executor.executors")

StdinInput = Union[str, bytes, None]

#: How often a command may find its connection already replaced before it
#: counts that as a failure of its own.
STALE_LIMIT = 16


def _check_command(command: Any) -> str:
    if not isinstance(command, str):
        raise TypeError(f"command must be a str, not {type(command).__name__}")
    return command


def _stdin_bytes(stdin_input: Any) -> bytes:
    if stdin_input is None:
        return b""
    if isinstance(stdin_input, str):
        return stdin_input.encode("utf-8")
    if isinstance(stdin_input, (bytes, bytearray, memoryview)):
        return bytes(stdin_input)
    raise TypeError(f"stdin_input must be str, bytes or None, not {type(stdin_input).__name__}")


def _result(
    command: str,
    stdin_input: StdinInput,
    exit_code: Optional[int],
    out: str,
    err: str,
    *,
    timeout: Optional[float] = None,
    signal_name: Optional[str] = None,
) -> CommandResult:
    """The result of a finished command, or the failure it raises."""
    if timeout is not None:
        raise CommandTimeout(
            f"command {command!r} timed out after {timeout:g} s", None, out, err, stdin_input
        )
    if exit_code == 0:
        return CommandResult(stdout=out, stderr=err, exit_code=0)
    if exit_code is None:
        how = f"was killed by signal {signal_name}" if signal_name else "ended without exit status"
        raise CommandExecutionFailure(f"command {command!r} {how}", -1, out, err, stdin_input)
    raise CommandExecutionFailure(
        f"command {command!r} failed with exit code {exit_code}", exit_code, out, err, stdin_input
    )


@dataclass(frozen=True, repr=False)
class _KeyText:
    """A ``paramiko.PKey`` as its private key text: the keys themselves do not pickle."""

    kind: type
    text: str

    @classmethod
    def of(cls, key: paramiko.PKey) -> _KeyText:
        out = io.StringIO()
        key.write_private_key(out)
        return cls(type(key), out.getvalue())

    def load(self) -> paramiko.PKey:
        return self.kind.from_private_key(io.StringIO(self.text))


class Executor(abc.ABC):
    """Runs shell commands; the common base of the three executors.

    Executors are context managers: leaving the ``with`` block calls `close`.
    """

    @abc.abstractmethod
    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None
    ) -> CommandResult:
        """Run ``command``; return its result on exit 0, else raise `CommandExecutionFailure`."""

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release whatever the executor holds; it stays usable."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_retries(value: Any) -> int:
    return int(value) if isinstance(value, bool) else check_int(
        "on_disconnect_retry", value, minimum=0)


class SSHExecutor(Executor):
    """Runs commands on one remote host over one shared, multiplexed SSH connection.

    Thread-safe: any number of threads may call `run_command` at once. Each
    command runs on its own session channel of the one ``paramiko.Transport``;
    at most MaxSessions channels are open at a time (probed on every connect
    unless ``max_sessions`` is given) and the commands past that wait for a
    slot, first come, first served. Nothing connects until the first command.

    A command whose connection breaks is retried on a new connection up to
    ``on_disconnect_retry`` times. **A retried command may already have run
    once on the server**: make commands that must not run twice idempotent,
    or pass ``on_disconnect_retry=0``.

    ``parameters`` are the keyword arguments of paramiko's
    ``SSHClient.connect`` (``hostname``, ``port``, ``username``, ``password``,
    ``pkey``, ``key_filename``, ...) or their asyncssh-style spellings
    ``host`` and ``client_keys``, plus ``known_hosts`` (a path, a list of
    paths, or None to switch host-key verification off). ``config`` names
    the ssh_config files to read (default ``~/.ssh/config``; ``()`` for none).
    """

    def __init__(
        self,
        *,
        on_disconnect_retry: Union[int, bool] = 3,
        max_sessions: Optional[int] = None,
        mfa_config: Optional[list] = None,
        connect_retries: int = 9,
        connect_backoff: float = 1.0,
        keepalive_interval: Optional[float] = DEFAULT,
        keepalive_count_max: int = DEFAULT,
        config: Any = DEFAULT,
        **parameters: Any,
    ) -> None:
        self._arguments: Dict[str, Any] = dict(
            parameters,
            on_disconnect_retry=on_disconnect_retry,
            max_sessions=max_sessions,
            mfa_config=mfa_config,
            connect_retries=connect_retries,
            connect_backoff=connect_backoff,
            keepalive_interval=keepalive_interval,
            keepalive_count_max=keepalive_count_max,
            config=config,
        )
        self._retries = _check_retries(on_disconnect_retry)
        target = resolve_target(
            normalize_parameters(parameters),
            mfa_config=mfa_config,
            config=config,
            keepalive_interval=keepalive_interval,
            keepalive_count_max=keepalive_count_max if keepalive_count_max is DEFAULT
            else check_int("keepalive_count_max", keepalive_count_max, minimum=1),
        )
        self._connection = Connection(
            target,
            retry=ConnectRetry(retries=connect_retries, backoff=connect_backoff),
            max_sessions=check_int("max_sessions", max_sessions, minimum=1, optional=True),
        )

    def __repr__(self) -> str:
        target = self._connection.target
        return (
            f"{type(self).__name__}(host={target.hostname!r}, port={target.port}, "
            f"username={target.credentials.username!r})"
        )

    # Pickling carries the configuration only; the copy connects on first use.
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self._arguments)
        if isinstance(state.get("pkey"), paramiko.PKey):
            state["pkey"] = _KeyText.of(state["pkey"])
        return state

    def __setstate__(self, arguments: Dict[str, Any]) -> None:
        if isinstance(arguments.get("pkey"), _KeyText):
            arguments = dict(arguments, pkey=arguments["pkey"].load())
        self.__init__(**{k: v for k, v in arguments.items() if v is not DEFAULT})

    @property
    def lock(self):
        """The `threading.Lock` that guards the connection state."""
        return self._connection.lock

    @property
    def session_limit(self) -> Optional[int]:
        """The channel cap of the current connection (probed or configured), None if unconnected."""
        state = self._connection.state
        return None if state is None else state.bound._initial_value

    @property
    def bounded_connection(self) -> contextlib.AbstractContextManager:
        """A context manager yielding the current ``paramiko.Transport`` with one slot reserved."""
        return self._bounded_connection()

    @contextlib.contextmanager
    def _bounded_connection(self) -> Iterator[paramiko.Transport]:
        state = self._get_state()
        with state.bound:
            yield state.transport

    def close(self) -> None:
        """Drop the connection; commands running on it fail, a later command reconnects."""
        self._connection.close()

    def _get_state(self):
        try:
            return self._connection.get()
        except ExecutorFailure as exc:
            exc.executor = self
            raise

    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None
    ) -> CommandResult:
        """Run ``command`` remotely, feeding it ``stdin_input`` and then end-of-file.

        Returns the `CommandResult` on exit 0; raises `CommandExecutionFailure`
        on a non-zero exit, `CommandTimeout` once ``timeout`` seconds passed
        (the remote command is sent TERM, the connection stays usable), and
        `ExecutorFailure` when the connection cannot be had or broke more
        than ``on_disconnect_retry`` times. ``timeout`` covers waiting for a
        slot, opening the channel and the command; after it, the channel's
        close is awaited up to 10 seconds more (`channel.CLOSE_GRACE`), so that its slot is
        reused only once the server has let go of it too.
        """
        _check_command(command)
        return self._execute(command, _stdin_bytes(stdin_input), check_number("timeout", timeout),
                             command, stdin_input)

    def _execute(
        self,
        command: str,
        stdin: bytes,
        timeout: Optional[float],
        shown_command: str,
        shown_stdin: StdinInput,
    ) -> CommandResult:
        encoded = command.encode("utf-8")
        # The timeout covers waiting for a slot, opening the channel and the
        # command itself, not connecting (which has its own retry policy).
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = stale = 0
        while True:
            epoch = self._connection.epoch
            state = self._get_state()
            try:
                outcome = self._run_once(state, encoded, stdin, deadline, shown_command)
            except ConnectionLost as lost:
                self._connection.drop(state)
                if epoch != self._connection.epoch:
                    raise ExecutorFailure("the executor was closed during the command",
                                          self) from None
                # A command that lost its connection before it was sent never
                # ran: trying it again costs no retry, up to a bound.
                if not lost.started and stale < STALE_LIMIT:
                    stale += 1
                    continue
                failures += 1
                if failures > self._retries:
                    raise ExecutorFailure(
                        f"{lost.description} (command {shown_command!r}, "
                        f"{failures} attempts)", self) from None
                log.info("connection lost during %r; retrying (%d of %d)",
                         shown_command, failures, self._retries)
                continue
            except ExecutorFailure as exc:
                exc.executor = self
                raise
            if outcome is None:
                return _result(shown_command, shown_stdin, None, "", "", timeout=timeout)
            return _result(
                shown_command, shown_stdin, outcome.exit_status, outcome.stdout, outcome.stderr,
                timeout=timeout if outcome.timed_out else None, signal_name=outcome.exit_signal,
            )

    @staticmethod
    def _run_once(
        state: ConnectionState, command: bytes, stdin: bytes, deadline: Optional[float],
        shown_command: str,
    ) -> Optional[ChannelOutcome]:
        """One try on one connection; None when the deadline passed before the command started."""
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        if not state.bound.acquire(timeout=remaining):
            return None
        started = False
        try:
            log.debug("running %r", shown_command)
            warm = warm_channel_of(state.transport)
            chan = warm.take(None if deadline is None else max(deadline - time.monotonic(), 0))
            if chan is None:
                chan = open_command_channel(state.transport, deadline)
                if chan is None:
                    return None
            started = True  # from here on the command may reach the server
            return run_on_channel(chan, command, stdin, deadline,
                                  after_exec=lambda: warm.replenish(state.bound))
        except ConnectionLost as lost:
            lost.started = started
            raise
        except (EOFError, OSError, paramiko.SSHException) as exc:
            if is_lost(exc, state.transport):
                raise ConnectionLost(f"the connection was lost: {exc!r}", started=started) \
                    from None
            raise ExecutorFailure(f"SSH error: {exc!r}") from None
        finally:
            state.bound.release()


class DupingSSHExecutor(SSHExecutor):
    """For keys that may run one fixed command only (``authorized_keys`` ``command=``).

    Every command runs ``wrapper`` on the server, fed ``f"{command}\\n{stdin_input}\\n"``
    (or ``f"{command}\\n"`` without stdin) on its standard input; the wrapper
    decides what to run. A wrapper that runs whatever it reads grants a full
    shell: restrict it to the commands you need. The wrapper must read its
    first line without reading ahead (bash does; dash, Debian's ``/bin/sh``,
    reads a pipe in blocks and leaves nothing for the command's own stdin).
    """

    def __init__(self, *, wrapper: str = "/bin/bash", **arguments: Any) -> None:
        if not isinstance(wrapper, str) or not wrapper:
            raise TypeError("wrapper must be a non-empty string")
        self._wrapper = wrapper
        super().__init__(**arguments)
        self._arguments["wrapper"] = wrapper

    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None
    ) -> CommandResult:
        """Run ``command`` through the wrapper; same results and failures as `SSHExecutor`."""
        payload = _check_command(command).encode("utf-8") + b"\n"
        data = _stdin_bytes(stdin_input)
        if data:
            payload += data + b"\n"
        timeout = check_number("timeout", timeout)
        return self._execute(self._wrapper, payload, timeout, command, stdin_input)


class ShellExecutor(Executor):
    """Runs commands locally with ``/bin/sh``, with the same contract as `SSHExecutor`."""

    def __init__(self) -> None:
        # Explicit, so that a stray keyword argument is a TypeError that names it.
        super().__init__()

    def __repr__(self) -> str:
        return "ShellExecutor()"

    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None
    ) -> CommandResult:
        """Run ``command`` in a local shell; on timeout it is sent TERM (then KILL)."""
        _check_command(command)
        data = _stdin_bytes(stdin_input)
        timeout = check_number("timeout", timeout)
        proc = subprocess.Popen(
            command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            stdout, stderr = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            return _result(command, stdin_input, None, decode_output(stdout),
                           decode_output(stderr), timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        code = proc.returncode
        signal_name = None
        if code < 0:
            signal_name = signal.Signals(-code).name[3:]
            code = None
        return _result(command, stdin_input, code, decode_output(stdout), decode_output(stderr),
                       signal_name=signal_name)
