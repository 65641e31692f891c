"""`ShellExecutor`: the executors' contract, run locally in a subprocess."""

from __future__ import annotations

import errno
import os
import selectors
import signal
import subprocess
import threading
import time
from typing import Callable, Dict, Mapping, Optional, Tuple, overload

from .command import (
    OnOutput,
    RunOptions,
    StdinInput,
    check_command,
    outcome,
    stdin_bytes,
    with_terminal_eof,
)
from .errors import TransferTimeout
from .executors import Executor, check_transfer_arguments
from .output import line_splitters
from .results import CommandResult, Output, decode_output
from .transfer import Progress, Source, callers_own, local_get, local_put

__all__ = ["ShellExecutor"]

#: After a timeout the command's process group is sent TERM, and KILL this much later.
KILL_GRACE = 5.0

#: Bytes written to the command's stdin per write.
PIPE_CHUNK = 64 * 1024


class ShellExecutor(Executor):
    """Runs commands locally with ``/bin/sh``, with the same contract as `SSHExecutor`.

    Each command runs in a process group of its own: a timeout (or a raising
    ``on_output`` callback) sends TERM to the whole group, grandchildren
    included, and KILL after a grace period, and returns at once.
    """

    def __init__(self) -> None:
        # Explicit, so that a stray keyword argument is a TypeError that names it.
        super().__init__()

    def __repr__(self) -> str:
        return "ShellExecutor()"

    @overload
    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None,
        check: bool = True, env: Optional[Mapping[str, str]] = None, encoding: str = "utf-8",
        pty: bool = False, on_output: Optional[Callable[[str, str], object]] = None,
        keep_output: bool = True,
    ) -> CommandResult[str]: ...
    @overload
    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None,
        check: bool = True, env: Optional[Mapping[str, str]] = None, encoding: None,
        pty: bool = False, on_output: Optional[Callable[[str, bytes], object]] = None,
        keep_output: bool = True,
    ) -> CommandResult[bytes]: ...
    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None,
        check: bool = True, env: Optional[Mapping[str, str]] = None,
        encoding: Optional[str] = "utf-8", pty: bool = False,
        on_output: Optional[OnOutput] = None, keep_output: bool = True,
    ) -> CommandResult[Output]:
        """Run ``command`` in a local shell; same results and failures as `SSHExecutor`.

        ``env`` is added to this process's environment for the command;
        ``pty=True`` runs it on a pseudo-terminal (stdout and stderr merged).
        A command or ``env`` larger than the system's ``exec`` takes (``E2BIG``)
        is a `ValueError` at the call.
        """
        check_command(command)
        options = RunOptions.of(timeout=timeout, check=check, env=env, encoding=encoding,
                                pty=pty, on_output=on_output, keep_output=keep_output)
        data = stdin_bytes(stdin_input)
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        environment = None if options.env is None else {**os.environ, **options.env}
        if options.pty:
            return self._run_on_pty(command, data, options, deadline, environment, stdin_input)
        proc = _start(command, environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
        streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}  # type: ignore[union-attr]
        collected, timed_out = _communicate(proc, data, streams, options, deadline)
        return self._finish(proc, command, stdin_input, options, collected, timed_out)

    def put(self, local: Source, remote: str, *, mode: Optional[int] = None,
            timeout: Optional[float] = None, progress: Optional[Progress] = None) -> int:
        """`SSHExecutor.put`'s contract here: copy ``local`` to path ``remote``, atomically."""
        timeout = check_transfer_arguments(local, remote, put=True, mode=mode, timeout=timeout,
                                           progress=progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._bounded(lambda: local_put(local, remote, mode=mode, progress=progress,
                                               deadline=deadline), timeout)

    def get(self, remote: str, local: Source, *, timeout: Optional[float] = None,
            progress: Optional[Progress] = None) -> int:
        """`SSHExecutor.get`'s contract on this machine: copy path ``remote`` to ``local``."""
        timeout = check_transfer_arguments(local, remote, put=False, timeout=timeout,
                                           progress=progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._bounded(lambda: local_get(remote, local, progress=progress,
                                               deadline=deadline), timeout)

    def _bounded(self, copy: Callable[[], int], timeout: Optional[float]) -> int:
        """``copy()``, its `TimeoutError` a `TransferTimeout`; the caller's errors its own."""

        def timed() -> int:
            try:
                return copy()
            except TimeoutError:  # ours: the caller's come wrapped (`callers_code`)
                raise TransferTimeout(f"the transfer timed out after {timeout:g} s",
                                      self) from None

        return callers_own(timed)

    def _run_on_pty(self, command: str, data: bytes, options: RunOptions,
                    deadline: Optional[float], environment: Optional[Dict[str, str]],
                    stdin_input: StdinInput) -> CommandResult[Output]:
        import pty as pty_module

        controller, terminal = pty_module.openpty()
        try:
            proc = _start(command, environment, stdin=terminal, stdout=terminal,
                          stderr=terminal)
        except BaseException:
            os.close(controller)
            raise
        finally:
            os.close(terminal)
        try:
            collected, timed_out = _communicate(proc, with_terminal_eof(data),
                                                {controller: "stdout"}, options, deadline,
                                                stdin_fd=controller)
        finally:
            os.close(controller)
        return self._finish(proc, command, stdin_input, options, collected, timed_out)

    @staticmethod
    def _finish(proc: subprocess.Popen[bytes], command: str, stdin_input: StdinInput,
                options: RunOptions, collected: Dict[str, bytearray],
                timed_out: bool) -> CommandResult[Output]:
        out = decode_output(collected["stdout"], options.encoding)
        err = decode_output(collected["stderr"], options.encoding)
        if timed_out:
            return outcome(command, stdin_input, options, None, out, err, timed_out=True)
        code = proc.returncode  # _communicate returns untimed-out only once the process ended
        signal_name = None
        if code < 0:
            signal_name = signal.Signals(-code).name[3:]
            code = None
        return outcome(command, stdin_input, options, code, out, err, signal_name=signal_name)


def _start(command: str, environment: Optional[Dict[str, str]], *, stdin: int, stdout: int,
           stderr: int) -> subprocess.Popen[bytes]:
    """``/bin/sh -c command`` started in a process group of its own.

    A command or environment larger than the system lets ``exec`` take (on Linux, 128 KiB
    for one string) is the caller's ``ValueError``, not the kernel's bare ``E2BIG``.
    """
    try:
        return subprocess.Popen(command, shell=True, stdin=stdin, stdout=stdout, stderr=stderr,
                                env=environment, start_new_session=True)
    except OSError as error:
        if error.errno != errno.E2BIG:
            raise
    raise ValueError("command and env are too large for this system's exec (E2BIG): "
                     f"{len(command.encode())} bytes of command")


def _communicate(proc: subprocess.Popen[bytes], data: bytes, streams: Dict[int, str],
                 options: RunOptions, deadline: Optional[float],
                 stdin_fd: Optional[int] = None) -> Tuple[Dict[str, bytearray], bool]:
    """Feed stdin, collect (and hand on) output, then reap the process, all by the deadline.

    Writes and reads interleave on non-blocking descriptors, so a command
    that reads nothing, or writes more than a pipe holds before reading,
    never stalls the loop; and the wait for the exit after both streams
    closed has the same deadline (a command that closed its output can still
    run). ``stdin_fd`` is where ``data`` goes (a pty's controller, which is
    also its output stream); by default the process's stdin pipe, closed
    once ``data`` is written. Returns the output kept per stream (none with
    ``keep_output=False``) and whether the deadline passed. On a timeout or
    an exception (a raising callback) the process group is ended.
    """
    collected = {"stdout": bytearray(), "stderr": bytearray()}
    splitters = line_splitters(options.on_output, options.encoding)
    pending = memoryview(data)
    stdin_pipe = proc.stdin
    if stdin_fd is None and stdin_pipe is not None:
        stdin_fd = stdin_pipe.fileno()
    try:
        with selectors.DefaultSelector() as selector:
            events: Dict[int, int] = {fd: selectors.EVENT_READ for fd in streams}
            if stdin_fd is not None and pending:
                os.set_blocking(stdin_fd, False)
                events[stdin_fd] = events.get(stdin_fd, 0) | selectors.EVENT_WRITE
            elif stdin_pipe is not None:
                stdin_pipe.close()
            for fd, mask in events.items():
                selector.register(fd, mask)

            def drop(fd: int, mask: int) -> None:
                """Stop watching ``fd`` for the events in ``mask``."""
                events[fd] &= ~mask
                if events[fd]:
                    selector.modify(fd, events[fd])
                else:
                    del events[fd]
                    selector.unregister(fd)

            while events:
                remaining = _remaining(deadline)
                if remaining == 0.0:
                    _end_group(proc)
                    return collected, True
                for key, ready in selector.select(remaining):
                    fd = key.fd
                    if ready & selectors.EVENT_WRITE and fd in events:
                        try:
                            pending = pending[os.write(fd, pending[:PIPE_CHUNK]):]
                        except BlockingIOError:
                            pass
                        except OSError:  # the reader is gone: the rest has nowhere to go
                            pending = pending[len(pending):]
                        if not pending:
                            drop(fd, selectors.EVENT_WRITE)
                            if stdin_pipe is not None:
                                stdin_pipe.close()
                    if not ready & selectors.EVENT_READ or fd not in events:
                        continue
                    try:
                        chunk = os.read(fd, PIPE_CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError:  # a pty reads EIO once the terminal's last holder closed it
                        chunk = b""
                    name = streams[fd]
                    if not chunk:
                        # Whatever stdin was still pending for this descriptor goes too.
                        drop(fd, events[fd])
                        if splitters is not None:
                            splitters[name].finish()
                        continue
                    if options.keep_output:
                        collected[name] += chunk
                    if splitters is not None:
                        splitters[name].feed(chunk)
        try:
            proc.wait(_remaining(deadline))
        except subprocess.TimeoutExpired:
            _end_group(proc)
            return collected, True
    except BaseException:
        _end_group(proc)
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return collected, False


def _remaining(deadline: Optional[float]) -> Optional[float]:
    """Seconds left until ``deadline`` (0.0 once passed), None without one."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """TERM to the command's process group now, KILL after `KILL_GRACE`; never waits for it."""
    _signal_group(proc, signal.SIGTERM)

    def escalate() -> None:
        try:
            proc.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)  # grandchildren that ignored TERM too
        proc.wait()

    threading.Thread(target=escalate, name="paramiko_executor escalate", daemon=True).start()


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass  # the group is gone already
