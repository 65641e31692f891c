"""paramiko_executor: thread-safe remote commands over one multiplexed SSH connection.

`SSHExecutor` runs commands on one host (its docstring says what a command
gets, raises and retries), `HostGroup` on many hosts at once, `ShellExecutor`
on this machine with the same ``run_command``; ``paramiko_executor.testing``
holds a local SSH server for tests.
"""

from .connection import ConnectionState, probe_max_session
from .errors import (
    AuthenticationFailure,
    CommandExecutionFailure,
    CommandTimeout,
    ExecutorError,
    ExecutorFailure,
    ForwardTimeout,
    HostKeyFailure,
    TransferTimeout,
)
from .executors import SAFE_WRAPPER, DupingSSHExecutor, Executor, SSHExecutor
from .forwarded import ForwardedSocket
from .group import GroupFailure, GroupResult, HostGroup
from .results import CommandResult
from .shell import ShellExecutor
from .stats import ExecutorStatistics
from .tunnels import LocalTunnel, RemoteTunnel, Tunnel

__version__ = "0.2.2"

__all__ = [
    "SAFE_WRAPPER",
    "AuthenticationFailure",
    "CommandExecutionFailure",
    "CommandResult",
    "CommandTimeout",
    "ConnectionState",
    "DupingSSHExecutor",
    "Executor",
    "ExecutorError",
    "ExecutorFailure",
    "ExecutorStatistics",
    "ForwardTimeout",
    "ForwardedSocket",
    "GroupFailure",
    "GroupResult",
    "HostGroup",
    "HostKeyFailure",
    "LocalTunnel",
    "RemoteTunnel",
    "SSHExecutor",
    "ShellExecutor",
    "TransferTimeout",
    "Tunnel",
    "probe_max_session",
]
