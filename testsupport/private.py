"""What the private test servers (OpenSSH's sshd, Dropbear) share: how to log in, and their log."""

from __future__ import annotations

from typing import Any, Dict


class PrivateServer:
    """A private server on 127.0.0.1 that logs in one user with one client key.

    Subclasses provide ``host``, ``port``, ``username``, ``client_key_path``,
    ``known_hosts_path`` and ``log_path`` (which may raise `RuntimeError`
    before the server was first started).
    """

    host = "127.0.0.1"

    def executor_parameters(self, **overrides: Any) -> Dict[str, Any]:
        """Keyword arguments for ``SSHExecutor`` to log in here, updated with ``overrides``."""
        params: Dict[str, Any] = {
            "host": self.host,
            "port": self.port,  # type: ignore[attr-defined]
            "username": self.username,  # type: ignore[attr-defined]
            "client_keys": [self.client_key_path],  # type: ignore[attr-defined]
            "known_hosts": self.known_hosts_path,  # type: ignore[attr-defined]
            "config": (),
        }
        params.update(overrides)
        return params

    def read_log(self) -> str:
        """The server's log so far (empty before the first start)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:  # type: ignore[attr-defined]
                return log.read()
        except (OSError, RuntimeError):
            return ""
