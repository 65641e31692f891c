"""The process-wide registry of connections shared by executors unpickled in one process.

A task framework unpickles a copy of an executor for every task and drops it
afterwards; copies with the same configuration find one `Connection` here, so
a worker process holds one connection per host, not one per task.

"The same configuration" is the *resolved* connection: the `Target` that
ssh_config and the environment of this process made of the arguments (user,
host name, port, jump hosts, host-key policy and files, identity and options),
plus the home directory (where a login looks for the default keys), the connect
retries and the session cap. Copies that resolve differently (another ``HOME``,
an edited ssh_config) get connections of their own.

A shared connection that nothing used for `IDLE_CLOSE` seconds is closed (the
next command reconnects). Idleness is judged at every lookup and by one timer
for the whole process, never a thread per entry. An entry outlives its
connection's closing (it is small without one): a copy still holding the
connection may reconnect it at any time, and the registry must keep judging it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import paramiko

from .connection import Connection, Link

__all__ = ["IDLE_CLOSE", "connection_key", "shared_connection"]

log = logging.getLogger("paramiko_executor.registry")

#: Seconds a shared connection may go unused before it is closed. Read at every
#: check, so a test may lower it.
IDLE_CLOSE = 600.0


def connection_key(connection: Connection) -> bytes:
    """The identity of ``connection``'s resolved configuration: equal exactly when it is the same.

    A digest: the credentials inside count, but never leave this process's memory.
    """
    target = connection.target
    agent = (os.environ.get("SSH_AUTH_SOCK")
             if getattr(target.credentials, "allow_agent", False) else None)
    # The home directory too: a login looks for keys there at connect time
    # (``look_for_keys``: ``~/.ssh/id_*``), which the target does not record.
    home = os.path.expanduser("~")
    identity = (_canonical(target), agent, home, _canonical(connection.retry),
                connection.max_sessions)
    return hashlib.sha256(pickle.dumps(identity, protocol=4)).digest()


def _canonical(value: Any) -> Any:
    """``value`` as plain, picklable data that is equal exactly when the values are the same."""
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(item) for item in value)
    if isinstance(value, dict) or hasattr(value, "items") and callable(value.items):
        return tuple(sorted((str(k), _canonical(v)) for k, v in value.items()))
    if isinstance(value, paramiko.PKey):
        # The public half: a key's private text differs between picklings.
        return ("pkey", value.get_name(), value.asbytes())
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if dataclasses.is_dataclass(value):
        return (kind,) + tuple((f.name, _canonical(getattr(value, f.name)))
                               for f in dataclasses.fields(value))
    # Anything else (a host-key policy, an auth_strategy, a transport factory) by its
    # pickle, as copies arrive; never by walking its attributes, which may reach loggers,
    # locks or cycles. What does not pickle (a socket, a lambda) is itself in this process:
    # its identity is the object.
    try:
        return ("pickled", kind, pickle.dumps(value, protocol=4))
    except Exception:
        return ("object", kind, id(value))


class _Entry:
    """One shared connection and when it was last seen in use."""

    __slots__ = ("connection", "seen", "used")

    def __init__(self, connection: Connection, now: float) -> None:
        self.connection = connection
        self.seen: Tuple[int, Optional[int]] = _use_mark(connection)
        self.used = now


class _Registry:
    """The entries, by key; ``lock`` guards them and the timer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: Dict[bytes, _Entry] = {}
        self.timer: Optional[threading.Timer] = None
        self.swept = time.monotonic()

    def lookup(self, key: bytes, make: Callable[[], Connection]) -> Connection:
        now = time.monotonic()
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = _Entry(make(), now)
            else:
                entry.used = now
            # A task framework looks up once per task: the entries are walked at most
            # as often as the timer would.
            idle = self._sweep_locked(now) if now - self.swept >= IDLE_CLOSE / 4 else []
            self._schedule_locked()
        _close_idle(idle)
        return entry.connection

    def sweep(self) -> None:
        """The timer's turn: close what went idle, and look again later."""
        now = time.monotonic()
        with self.lock:
            self.timer = None
            idle = self._sweep_locked(now)
            self._schedule_locked()
        _close_idle(idle)

    def _sweep_locked(self, now: float) -> List[Connection]:
        """Refresh every entry's last use; the connected ones idle for `IDLE_CLOSE` seconds.

        A use is seen as a change of the connection's command count or of
        its link, or a session held or awaited.
        """
        self.swept = now
        idle = []
        for entry in self.entries.values():
            connection = entry.connection
            mark = _use_mark(connection)
            if mark != entry.seen or _busy(connection.link):
                entry.seen, entry.used = mark, now
            elif connection.link is not None and now - entry.used >= IDLE_CLOSE:
                idle.append(connection)
        return idle

    def _schedule_locked(self) -> None:
        """One timer for the process while it has shared connections.

        It runs even while none is connected: a copy may connect (or
        reconnect) its connection at any time without a lookup.
        """
        if self.timer is not None or not self.entries:
            return
        # A quarter of the idle time: a connection closes at most that late.
        self.timer = threading.Timer(IDLE_CLOSE / 4, self.sweep)
        self.timer.name = "paramiko_executor idle connections"
        self.timer.daemon = True
        self.timer.start()

    def reset_after_fork(self) -> None:
        # The parent's timer thread does not exist here (the next lookup
        # starts one), and another of its threads may have held the lock.
        self.lock = threading.Lock()
        self.timer = None


def _use_mark(connection: Connection) -> Tuple[int, Optional[int]]:
    """What changes whenever a command or transfer starts, or the connection is replaced."""
    started = connection.counters.snapshot(open_channels=0, waiting=0,
                                           max_sessions=None).commands_started
    link = connection.link
    return started, None if link is None else id(link)


def _busy(link: Optional[Link]) -> bool:
    """Whether ``link`` holds a session or has a thread waiting for one (a spare aside)."""
    if link is None or link.slots is None:
        return False
    slots = link.slots
    spare = 1 if link.spare is not None and link.spare.held else 0
    return slots.waiting > 0 or slots.limit - slots.available > spare


def _close_idle(connections: List[Connection]) -> None:
    for connection in connections:
        # Judged again under the connection's lock: a command that started
        # since counts itself started before it asks for the link.
        if connection.drop_unused(functools.partial(_quiet, connection)):
            log.info("closed the connection to %s: unused for %g s",
                     connection.target, IDLE_CLOSE)


def _quiet(connection: Connection, link: Link) -> bool:
    """No command of ``connection`` in flight, and no session held on ``link``."""
    counts = connection.counters.snapshot(open_channels=0, waiting=0, max_sessions=None)
    in_flight = counts.commands_started - counts.commands_succeeded - counts.commands_failed
    return in_flight == 0 and not _busy(link)


_REGISTRY = _Registry()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_REGISTRY.reset_after_fork)


def shared_connection(key: bytes, make: Callable[[], Connection]) -> Connection:
    """The connection registered under ``key``, registering ``make()`` if there is none."""
    return _REGISTRY.lookup(key, make)
