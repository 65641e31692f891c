"""Local SSH servers for tests: the project's own, and its users'.

`SSHTestServer` is a paramiko-based server with MaxSessions enforcement,
public-key, password and keyboard-interactive TOTP authentication, a forced
command and fault injection. `OpenSSHServer` runs a private real OpenSSH
``sshd`` on 127.0.0.1; it is imported on first use, so this package imports
even where its module is absent.
"""

from typing import Any

from paramiko_executor.testing.server import SSHTestServer

__all__ = ["OpenSSHServer", "SSHTestServer"]


def __getattr__(name: str) -> Any:
    if name == "OpenSSHServer":
        from paramiko_executor.testing.openssh import OpenSSHServer

        return OpenSSHServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
