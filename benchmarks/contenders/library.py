"""This library: ``paramiko_executor.SSHExecutor``, as its users call it."""

from typing import Any, Dict, Optional

from paramiko_executor import SSHExecutor


class Contender:
    is_async = False

    def __init__(self, params: Dict[str, Any]) -> None:
        self.params = params
        self.executor = SSHExecutor(**params)

    def run(self, command: str, stdin_input: Optional[str]) -> str:
        return self.executor.run_command(command, stdin_input).stdout

    def connect_probe(self) -> None:
        """A fresh executor: connect, authenticate and probe MaxSessions, then close."""
        executor = SSHExecutor(**self.params)
        try:
            with executor.bounded_connection:
                pass
        finally:
            executor.close()

    def close(self) -> None:
        self.executor.close()
