"""Many hosts at once: `HostGroup` runs a command (or a transfer) on every host of a list.

One executor per host, each with its own connection; a thread pool of at most
``max_workers`` threads, owned by the group, drives them. A host's failure is
an entry of the `GroupResult`, never an exception of the call, and a host that
is down or slow holds up only its own entry.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import (
    Any,
    Callable,
    Collection,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
    Type,
    TypeVar,
    Union,
    cast,
)

from .checks import check_int, check_timeout
from .command import StdinInput, check_command, stdin_bytes
from .errors import CallerError, callers_own
from .executors import Executor, SSHExecutor
from .hostnames import check_hostname
from .results import CommandExecutionFailure, CommandResult, ExecutorFailure
from .stats import ExecutorStatistics
from .text import one_line
from .transfer import NotARegularFile, check_replaceable

__all__ = ["GroupFailure", "GroupResult", "HostGroup", "Outcome"]

#: What one host's entry of a `GroupResult` of `HostGroup.run_command` holds.
Outcome = Union[CommandResult[str], CommandExecutionFailure, ExecutorFailure]

#: What a `GroupResult`'s succeeded entries hold.
R = TypeVar("R", covariant=True)

# The failures that belong to one host (its entry), not to the call: a command's
# exit status, its executor's failure, and for transfers the remote file missing
# or refused (FileNotFoundError, PermissionError: OSErrors). Anything else (a
# TypeError from a bug, KeyboardInterrupt) is raised by the call.
_COMMAND_FAILURES: Tuple[Type[BaseException], ...] = (CommandExecutionFailure, ExecutorFailure)
_TRANSFER_FAILURES: Tuple[Type[BaseException], ...] = _COMMAND_FAILURES + (OSError,)
# How many failed hosts GroupFailure's message names before it says "and N more".
_NAMED_IN_MESSAGE = 5


class GroupFailure(ExecutorFailure):
    """Some hosts of a group failed; ``failed`` maps each of their names to its exception."""

    def __init__(
        self,
        description: str,
        failed: Optional[Mapping[str, BaseException]] = None,
        executor: Optional[Executor] = None,
    ) -> None:
        super().__init__(description, executor)
        self.failed: Mapping[str, BaseException] = MappingProxyType(dict(failed or {}))

    def __reduce__(self) -> Any:  # MappingProxyType does not pickle: carry a plain dict
        return (type(self), (self.description, dict(self.failed)))


class GroupResult(Mapping[str, Union[R, Exception]]):
    """Each host's outcome, keyed by host name, in the order the hosts were given.

    ``GroupResult[CommandResult[str]]`` from `HostGroup.run_command`,
    ``GroupResult[int]`` from ``put``/``get``.

    An outcome is the host's result (a `CommandResult`; for transfers the byte
    count) or its failure (`CommandExecutionFailure`, `ExecutorFailure`, and
    for transfers ``FileNotFoundError``/``PermissionError``): an entry is failed
    exactly when it is an exception. Immutable.
    """

    def __init__(self, outcomes: Iterable[Tuple[str, Union[R, Exception]]]) -> None:
        self._outcomes: Dict[str, Union[R, Exception]] = dict(outcomes)

    def __getitem__(self, name: str) -> Union[R, Exception]:
        return self._outcomes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outcomes)

    def __len__(self) -> int:
        return len(self._outcomes)

    @property
    def succeeded(self) -> Mapping[str, R]:
        """The hosts that succeeded and their results, in the given order (read-only)."""
        outcomes = self._outcomes.items()
        return MappingProxyType(
            {name: out for name, out in outcomes if not isinstance(out, BaseException)}
        )

    @property
    def failed(self) -> Mapping[str, Exception]:
        """The hosts that failed and their exceptions, in the given order (read-only)."""
        outcomes = self._outcomes.items()
        return MappingProxyType(  # mypy cannot narrow R by isinstance: out is the exception
            {name: out for name, out in outcomes if isinstance(out, BaseException)}  # type: ignore[misc]
        )

    def raise_for_failures(self) -> GroupResult[R]:
        """Raise `GroupFailure` naming the failed hosts if there are any; else return self."""
        failed = self.failed
        if not failed:
            return self
        named = [
            f"{name}: {type(exc).__name__}: {one_line(str(exc))}"
            for name, exc in list(failed.items())[:_NAMED_IN_MESSAGE]
        ]
        more = len(failed) - len(named)
        text = "; ".join(named) + (f"; and {more} more" if more else "")
        raise GroupFailure(f"{len(failed)} of {len(self)} hosts failed: {text}", failed)

    def __repr__(self) -> str:
        failed = list(self.failed)
        return (
            f"<GroupResult {len(self)} hosts: {len(self) - len(failed)} succeeded, "
            f"{len(failed)} failed{' ' + repr(failed) if failed else ''}>"
        )


def _host_entry(host: Any, index: int) -> Tuple[str, Dict[str, Any]]:
    """The name of ``hosts[index]`` and the executor parameters it sets."""
    where = f"hosts[{index}]"
    if isinstance(host, str):
        if not host:
            raise ValueError(f"{where} must not be an empty string")
        return host, {"host": host}
    if not isinstance(host, Mapping):
        raise TypeError(f"{where} must be a host name or a mapping, not {type(host).__name__}")
    params = dict(host)
    for key in params:
        if not isinstance(key, str):
            raise TypeError(f"{where} has a key that is not a string: {key!r}")
    name = params.pop("name", None)
    if "host" in params and "hostname" in params:
        raise TypeError(f"{where}: 'host' and 'hostname' are the same parameter: give only one")
    address = params.get("host", params.get("hostname"))
    if address is None:
        raise TypeError(f"{where} must give 'host' (or 'hostname')")
    if not isinstance(address, str) or not address:
        raise TypeError(f"{where}['host'] must be a non-empty string")
    if name is None:
        port = params.get("port")
        name = address if port is None else f"{address}:{port}"
    elif not isinstance(name, str) or not name:
        raise TypeError(f"{where}['name'] must be a non-empty string")
    return name, params


# One host's share of a group call: (name, executor) -> its result.
_HostCall = Callable[[str, Executor], Any]


def _outcome(
    call: _HostCall, name: str, executor: Executor, failures: Tuple[Type[BaseException], ...]
) -> Any:
    """``call(name, executor)``, with a host's own failure returned as its outcome, not raised."""
    try:
        return call(name, executor)
    except failures as failure:
        return failure


# What a worker posts for one host: (name, outcome, whether the call must raise it).
_Posted = Tuple[str, Any, bool]
# Posted by `HostGroup.close` instead: the call ends now.
_CLOSED = object()


class _GroupCall:
    """One group call in progress: the hosts not started yet, and the outcomes posted so far.

    A fixed number of workers (pool tasks) take hosts one after another until
    none is left or the call is stopped, and post each outcome to one queue,
    which the calling thread reads: a host costs a lock and a queue entry, not
    a `Future` of its own with a waiter on each. ``_lock`` guards the hosts
    not started yet, how many have not posted, and ``stopped``.
    """

    def __init__(self, hosts: Iterable[Tuple[str, Executor]], call: _HostCall,
                 failures: Tuple[Type[BaseException], ...]) -> None:
        self._lock = threading.Lock()
        listed = list(hosts)
        self._hosts = iter(listed)
        self._unposted = len(listed)
        self._call = call
        self._failures = failures
        self.stopped = False
        self.posted: queue.SimpleQueue[Union[_Posted, object]] = queue.SimpleQueue()
        #: Set once every host posted, a host posted what the call must raise, or
        #: the group closed: a caller that needs every outcome wakes once, not
        #: once per host (each wake-up a thread switch among the busy workers).
        self.settled = threading.Event()
        if not listed:
            self.settled.set()

    def work(self) -> None:
        """A worker: run hosts until none is left or the call stopped; post every outcome."""
        while True:
            with self._lock:
                item = None if self.stopped else next(self._hosts, None)
            if item is None:
                return
            name, executor = item
            try:
                posted: _Posted = (name, _outcome(self._call, name, executor, self._failures),
                                   False)
            except BaseException as exc:  # not a host's failure: the call raises it
                posted = (name, exc, True)
            self.posted.put(posted)
            with self._lock:
                self._unposted -= 1
                last = self._unposted == 0
            if last or posted[2]:
                self.settled.set()

    def stop(self) -> None:
        """Start no more hosts; those running finish (on the workers' threads)."""
        with self._lock:
            self.stopped = True

    def close(self) -> None:
        """Stop, and make the caller stop waiting: the group was closed."""
        self.stop()
        self.posted.put(_CLOSED)
        self.settled.set()


class _CallersProgress:
    """A group transfer's ``progress`` callback, remembering what it raised.

    What the caller's own callback raises is the call's error, not one host's
    outcome, whatever its type (an ``OSError`` too): the call raises it, as a
    single executor's ``put``/``get`` does.
    """

    def __init__(self, progress: Optional[Callable[[int, int], object]]) -> None:
        self._progress = progress
        self._raised: List[BaseException] = []  # appended from the pool's threads

    @classmethod
    def of(cls, options: Dict[str, Any]) -> _CallersProgress:
        """Watch ``options["progress"]``, replacing it in ``options`` with the watcher."""
        watcher = cls(options.get("progress"))
        if watcher._progress is not None:
            options["progress"] = watcher
        return watcher

    def __call__(self, done: int, total: int) -> None:
        assert self._progress is not None
        try:
            self._progress(done, total)
        except BaseException as exc:
            self._raised.append(exc)
            raise

    def owned(self, call: _HostCall) -> _HostCall:
        """``call``, with what the callback raised carried out of the host as a `CallerError`."""
        def host_call(name: str, executor: Executor) -> Any:
            try:
                return call(name, executor)
            except BaseException as exc:
                if any(exc is raised for raised in self._raised):
                    raise CallerError(exc) from None
                raise
        return host_call


_groups: weakref.WeakSet[HostGroup] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for group in list(_groups):
        group._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


#: The group's own type, for ``with HostGroup(...) as group``.
GroupT = TypeVar("GroupT", bound="HostGroup")


class HostGroup:
    """Runs commands and transfers on many hosts at once, one executor per host.

    ``hosts``: host names (or ssh_config ``Host`` aliases) and mappings of
    executor parameters for one host (``{"host": "n1", "port": 2222,
    "username": ...}``, optional ``"name"``). Each host's executor is
    ``executor_class(**common_parameters)`` updated by its own mapping (or
    ``host=name``). A host is known by its name: the string as given, or the
    mapping's ``"name"``, else its ``"host"`` (or ``"hostname"``), as
    ``"host:port"`` when it gives a port. Two hosts with one name are a
    `ValueError`; ``common_parameters`` may not name a host (`TypeError`).

    Executors are built on first use (the first `run_command`, `put`, `get`
    or `statistics`), all at once and in the calling thread before anything
    runs, so that a host's bad parameters (a `TypeError`/`ValueError` from its
    executor's constructor, prefixed with the host's name) are raised by that
    call before any command starts. Building one reads the ssh_config files,
    so a group of thousands of hosts is cheap to make and pays that only when
    used. Nothing connects until a command needs it.

    A pool of at most ``max_workers`` threads, owned by the group and started
    on first use, runs the hosts' calls: hosts past that wait their turn.
    paramiko adds one thread per open connection. `close` closes every
    executor and ends the pool (a later call starts a new one); the group is a
    context manager.
    """

    def __init__(
        self,
        # Collection[str]: what mypy makes of a list mixing names and mappings (the
        # README's); anything but a str or a mapping is a TypeError here, at construction.
        hosts: Iterable[Union[str, Mapping[str, Any], Collection[str]]],
        *,
        max_workers: int = 64,
        executor_class: Callable[..., Executor] = SSHExecutor,
        **common_parameters: Any,
    ) -> None:
        if isinstance(hosts, (str, bytes, Mapping)):
            raise TypeError(
                f"hosts must be an iterable of host names or mappings, not {type(hosts).__name__}"
            )
        checked = check_int("max_workers", max_workers, minimum=1)
        assert checked is not None  # not optional
        self._max_workers = checked
        if not callable(executor_class):
            raise TypeError("executor_class must be callable")
        for key in ("host", "hostname"):
            if key in common_parameters:
                raise TypeError(f"{key!r} cannot be a common parameter: each host gives its own")
        self._executor_class = executor_class
        self._parameters: Dict[str, Dict[str, Any]] = {}
        for index, host in enumerate(hosts):
            name, own = _host_entry(host, index)
            if name in self._parameters:
                raise ValueError(f"hosts[{index}]: duplicate host {name!r}")
            parameters = dict(common_parameters)
            parameters.update(own)
            # Names an executor would refuse are refused here, before anything runs.
            target = parameters.get("host", parameters.get("hostname"))
            if isinstance(target, str):
                check_hostname(target)
            self._parameters[name] = parameters
        self._executors: Dict[str, Executor] = {}
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None
        # The calls in progress, ended by close(): the lock guards the set.
        self._calls: Set[_GroupCall] = set()
        _groups.add(self)

    def _reset_after_fork(self) -> None:
        # The child has none of the parent's threads: the pool's workers and the
        # calls in flight are the parent's, and one of its threads may have held
        # the lock. The executors forget their connections by themselves.
        self._lock = threading.Lock()
        self._pool = None
        self._calls = set()

    def __repr__(self) -> str:
        return f"<HostGroup {len(self._parameters)} hosts, max_workers={self._max_workers}>"

    @property
    def names(self) -> Tuple[str, ...]:
        """The hosts' names, in the order given."""
        return tuple(self._parameters)

    @property
    def max_workers(self) -> int:
        """The most threads the group runs its hosts' calls on."""
        return self._max_workers

    def executor(self, name: str) -> Executor:
        """The executor of the host ``name`` (built now if it was not yet); `KeyError` if none."""
        if name not in self._parameters:
            raise KeyError(name)
        return self._build()[name]

    def _build(self) -> Dict[str, Executor]:
        """Every host's executor, building those not built yet, in the given order."""
        with self._lock:
            return self._build_locked()

    def _build_locked(self) -> Dict[str, Executor]:
        for name, parameters in self._parameters.items():
            if name not in self._executors:
                try:
                    self._executors[name] = self._executor_class(**parameters)
                except (TypeError, ValueError) as exc:
                    if type(exc) not in (TypeError, ValueError):
                        raise  # a subclass may not take one message: pass it on as it is
                    raise type(exc)(f"host {name!r}: {exc}") from exc
        return dict(self._executors)

    def _start(self, call: _HostCall, failures: Tuple[Type[BaseException], ...]) -> _GroupCall:
        """Start ``call`` on every host: at most ``max_workers`` workers share the hosts.

        Under the group's lock, so `close` sees either none of this call or all
        of it: never a pool shut down between its creation and a submit.
        """
        with self._lock:
            executors = self._build_locked()
            workers = min(self._max_workers, len(executors))
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=max(1, min(self._max_workers, len(self._parameters))),
                    thread_name_prefix="HostGroup",
                )
            group_call = _GroupCall(executors.items(), call, failures)
            for _ in range(workers):
                self._pool.submit(group_call.work)
            self._calls.add(group_call)
        return group_call

    def _as_completed(
        self, call: _HostCall, failures: Tuple[Type[BaseException], ...], *,
        settled_first: bool = False,
    ) -> Iterator[Tuple[str, Any]]:
        """``(name, outcome)`` of ``call`` on every host, as each one finishes.

        Once `close` runs, every host not finished yet comes out at once as
        `ExecutorFailure` ("the group was closed"). Leaving early (``break``,
        an exception) cancels the hosts not started yet; those already running
        finish on the pool's threads. ``settled_first``: the first pair comes
        only once every host finished (or one raised, or `close` ran).
        """
        group_call = self._start(call, failures)
        waiting = dict.fromkeys(self._parameters)  # the hosts without an outcome yet
        closed = False
        try:
            if settled_first:
                group_call.settled.wait()
            while waiting:
                if closed:
                    try:  # what finished before close() keeps its outcome
                        posted = group_call.posted.get_nowait()
                    except queue.Empty:
                        break
                else:
                    posted = group_call.posted.get()
                if posted is _CLOSED:
                    closed = True
                    continue
                name, outcome, raise_it = cast(_Posted, posted)
                del waiting[name]
                if raise_it:
                    raise outcome
                yield name, outcome
            for name in list(waiting):  # close() came first
                yield name, ExecutorFailure("the group was closed")
        finally:
            group_call.stop()
            with self._lock:
                self._calls.discard(group_call)

    def _collect(self, call: _HostCall,
                 failures: Tuple[Type[BaseException], ...]) -> GroupResult[Any]:
        """Every host's outcome of ``call``, once all are in, in the given order."""
        outcomes = dict(self._as_completed(call, failures, settled_first=True))
        return GroupResult((name, outcomes[name]) for name in self._parameters)

    @staticmethod
    def _command_call(command: str, stdin_input: StdinInput, timeout: Optional[float]) -> _HostCall:
        """The per-host call of a command, its arguments checked once, here, for all hosts."""
        check_command(command)
        stdin_bytes(stdin_input)
        check_timeout("timeout", timeout)
        return lambda _name, executor: executor.run_command(command, stdin_input, timeout=timeout)

    def run_command(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None
    ) -> GroupResult[CommandResult[str]]:
        """Run ``command`` on every host at once; return when every host has an outcome.

        Each host gets its executor's ``run_command(command, stdin_input,
        timeout=timeout)``. Never raises for a host's failure: its
        `CommandExecutionFailure` or `ExecutorFailure` is its entry of the
        `GroupResult` (`GroupResult.raise_for_failures` turns those into one
        `GroupFailure`). Bad arguments are a `TypeError`/`ValueError` before
        anything runs. ``timeout`` applies to each host's command.
        """
        return self._collect(self._command_call(command, stdin_input, timeout), _COMMAND_FAILURES)

    def run_command_as_completed(
        self, command: str, stdin_input: StdinInput = None, *, timeout: Optional[float] = None
    ) -> Iterator[Tuple[str, Outcome]]:
        """Like `run_command`, but yield ``(name, outcome)`` pairs as hosts finish.

        The arguments are checked at the call, before anything runs; leaving
        the loop early cancels the hosts not started yet.
        """
        return self._as_completed(self._command_call(command, stdin_input, timeout),
                                  _COMMAND_FAILURES)

    def put(self, local: Union[str, os.PathLike[str]], remote: str,
            **options: Any) -> GroupResult[int]:
        """Copy the local file ``local`` to ``remote`` on every host; entries are bytes sent.

        ``options`` (``mode``, ``timeout``, ``progress``) go to each executor's
        ``put``; ``progress`` is then called from the group's threads, for
        every host. ``local`` must name an existing file (else
        `FileNotFoundError` before anything runs); every host reads it.
        A host's failure (including a refused or missing remote directory) is
        its entry.
        """
        local = os.fspath(local)
        if not os.path.isfile(local):
            raise FileNotFoundError(f"put: no such local file: {local!r}")
        if not isinstance(remote, str):
            raise TypeError(f"remote must be a str, not {type(remote).__name__}")
        progress = _CallersProgress.of(options)
        return callers_own(lambda: self._collect(
            # put, get and statistics are the executors' own (SSHExecutor's,
            # ShellExecutor's put and get), not Executor's.
            progress.owned(lambda _name, executor: executor.put(local, remote, **options)),  # type: ignore[attr-defined]
            _TRANSFER_FAILURES))

    def get(self, remote: str, local_dir: Union[str, os.PathLike[str]],
            **options: Any) -> GroupResult[int]:
        """Copy ``remote`` from every host into ``local_dir``, as a file named after the host.

        Entries are the bytes received. ``local_dir`` must be an existing
        directory (else `NotADirectoryError` before anything runs), and every
        host's name must be usable as a file name there (no ``/``, not ``.``
        or ``..``: give such a host a ``"name"``), else `ValueError`.
        A host's local file that a download must not replace (a directory:
        `IsADirectoryError`; a device, FIFO or socket: `ValueError`) is also
        refused before anything runs (one made there later is that host's
        entry). ``options`` go to each executor's ``get``. A host's failure
        (its file missing: `FileNotFoundError`) is its entry.
        """
        local_dir = os.fspath(local_dir)
        if not os.path.isdir(local_dir):
            raise NotADirectoryError(f"get: not a directory: {local_dir!r}")
        if not isinstance(remote, str):
            raise TypeError(f"remote must be a str, not {type(remote).__name__}")
        for name in self._parameters:
            if "/" in name or "\0" in name or name in (".", ".."):
                raise ValueError(f"host name {name!r} cannot name a file: give the host a 'name'")
            check_replaceable(os.path.join(local_dir, name))
        progress = _CallersProgress.of(options)
        # A host's local file that became a FIFO after the check is that host's failure.
        return callers_own(lambda: self._collect(
            progress.owned(lambda name, executor: executor.get(  # type: ignore[attr-defined]
                remote, os.path.join(local_dir, name), **options)),
            _TRANSFER_FAILURES + (NotARegularFile,)))

    def statistics(self) -> Dict[str, ExecutorStatistics]:
        """Each host's ``executor.statistics()`` (an `ExecutorStatistics`), in the given order."""
        return {name: executor.statistics() for name, executor in self._build().items()}  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close every executor built so far, then end the thread pool; safe at any moment.

        A call in progress in another thread (`run_command`, `put`, `get`, or
        the loop of `run_command_as_completed`) returns at once with every host
        that had not finished ending as `ExecutorFailure` ("the group was
        closed"); hosts that had finished keep their outcomes, and hosts not
        started yet never start. close() itself waits for the hosts' calls still
        running on the pool (closing their executors first makes commands on
        open connections fail at once). The group stays usable: a later call
        reconnects and starts a new pool.
        """
        with self._lock:
            executors = list(self._executors.values())
            pool, self._pool = self._pool, None
            calls, self._calls = self._calls, set()
        for group_call in calls:
            group_call.close()
        for executor in executors:
            executor.close()
        if pool is not None:
            pool.shutdown(wait=True)  # workers not started yet find their call stopped
            # A host's call that had not connected yet when its executor was
            # closed above connects again (a closed executor reconnects on its
            # next command): close what it opened, or it stays open for good.
            for executor in executors:
                executor.close()

    def __enter__(self: GroupT) -> GroupT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
