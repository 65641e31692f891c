"""paramiko_executor: thread-safe remote commands over one multiplexed SSH connection.

See ``SSHExecutor`` for the contract; ``paramiko_executor.testing`` holds a
local SSH server for tests.
"""

from .connection import ConnectionState, probe_max_session
from .executors import DupingSSHExecutor, Executor, ShellExecutor, SSHExecutor
from .results import (
    AuthenticationFailure,
    CommandExecutionFailure,
    CommandResult,
    CommandTimeout,
    ExecutorFailure,
    HostKeyFailure,
)
from .retry import ConnectRetry

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailure",
    "CommandExecutionFailure",
    "CommandResult",
    "CommandTimeout",
    "ConnectRetry",
    "ConnectionState",
    "DupingSSHExecutor",
    "Executor",
    "ExecutorFailure",
    "HostKeyFailure",
    "SSHExecutor",
    "ShellExecutor",
    "probe_max_session",
]
