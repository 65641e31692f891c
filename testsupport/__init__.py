"""Test support that is not part of the installed package.

`openssh.OpenSSHServer` runs a private real OpenSSH ``sshd`` for the tests and
benchmarks: it needs root (``useradd``, ``/etc/pam.d``), so it ships with the
repository only. The package's own test server, ``paramiko_executor.testing.SSHTestServer``,
stays public.
"""
