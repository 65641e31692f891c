"""A local SSH server for tests: the project's own, and its users'.

`SSHTestServer` is a paramiko-based server with MaxSessions enforcement,
public-key, password and keyboard-interactive TOTP authentication, a forced
command and fault injection. (The repository's own tests also run a private
real OpenSSH ``sshd``, from ``testsupport/openssh.py``: it needs root, so it
is not part of the installed package.)
"""

from paramiko_executor.testing.server import SSHTestServer

__all__ = ["SSHTestServer"]
