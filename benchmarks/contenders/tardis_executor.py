"""The asyncio executor this library mirrors: cobald-tardis' ``SSHExecutor``.

cobald-tardis pins ``pydantic<2``, so it often lives in its own virtual
environment (see ``run.py --tardis-python``).
"""

from typing import Any, Dict, Optional

from tardis.utilities.executors.sshexecutor import SSHExecutor


class Contender:
    is_async = True

    def __init__(self, params: Dict[str, Any]) -> None:
        self.params = params
        self.executor = SSHExecutor(**params)

    async def run(self, command: str, stdin_input: Optional[str]) -> str:
        return (await self.executor.run_command(command, stdin_input=stdin_input)).stdout

    async def connect_probe(self) -> None:
        """A fresh executor: connect, authenticate and probe MaxSessions, then close."""
        executor = SSHExecutor(**self.params)
        async with executor.bounded_connection as connection:
            pass
        connection.close()
        await connection.wait_closed()

    async def close(self) -> None:
        state = self.executor._connection_state
        if state is not None:
            state.connection.close()
            await state.connection.wait_closed()
