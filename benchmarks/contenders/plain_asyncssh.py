"""Plain asyncssh: one connection, an ``asyncio.Semaphore(10)``, ``conn.run`` per command."""

import asyncio
from typing import Any, Dict, Optional

import asyncssh

MAX_SESSIONS = 10


class Contender:
    is_async = True

    def __init__(self, params: Dict[str, Any]) -> None:
        self.params = params
        self.connection: Optional[asyncssh.SSHClientConnection] = None
        self.lock: Optional[asyncio.Lock] = None
        self.bound: Optional[asyncio.Semaphore] = None

    async def _connection(self) -> asyncssh.SSHClientConnection:
        if self.lock is None:  # created inside the running loop
            self.lock = asyncio.Lock()
            self.bound = asyncio.Semaphore(MAX_SESSIONS)
        async with self.lock:
            if self.connection is None:
                self.connection = await asyncssh.connect(**self.params)
        return self.connection

    async def run(self, command: str, stdin_input: Optional[str]) -> str:
        connection = await self._connection()
        async with self.bound:
            return (await connection.run(command, input=stdin_input, check=True)).stdout

    async def connect_probe(self) -> None:
        """Connect, authenticate, open sessions until the server refuses one, close."""
        async with asyncssh.connect(**self.params) as connection:
            processes = []
            try:
                for _ in range(64):
                    processes.append(await connection.create_process())
            except asyncssh.ChannelOpenError:
                pass
            for process in processes:
                process.close()
            for process in processes:
                await process.wait_closed()

    async def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            await self.connection.wait_closed()
