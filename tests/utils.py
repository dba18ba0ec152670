"""Test helpers: in-process servers on loopback port 0 and a minimal protocol client."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from common import protocol
from common.aggregate import Aggregator
from common.config import ServerConfig
from common.server import AggregatorServer
from common.store import open_store
from non_td_server.aggregator import CounterAggregator
from td_server.aggregator import TrendAggregator


@contextlib.asynccontextmanager
async def run_server(dsn: str, state_dir: Path, role: str = protocol.ROLE_TD,
                     **settings: Any) -> AsyncIterator[AggregatorServer]:
    """A real server on 127.0.0.1:0 in this event loop; ordered shutdown on exit."""
    aggregator: Aggregator[Any, Any] = (
        TrendAggregator() if role == protocol.ROLE_TD else CounterAggregator())
    settings.setdefault("flush_interval", 0.05)
    settings.setdefault("metrics_listen", None)
    config = ServerConfig(listen=("127.0.0.1", 0), dsn=dsn, state_dir=state_dir / role,
                          **settings)
    server = AggregatorServer(config, aggregator, open_store(dsn))
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


class Client:
    """Speaks the wire protocol directly, for tests of the servers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = protocol.FrameDecoder()
        self.pending: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, address: tuple[str, int], role: str = protocol.ROLE_TD,
                      run_id: str = "run", producer: str | None = None) -> Client:
        reader, writer = await asyncio.open_connection(*address)
        client = cls(reader, writer)
        writer.write(protocol.hello(producer or uuid.uuid4().hex, run_id, role))
        welcome = await client.receive()
        assert welcome["type"] == "welcome", welcome
        return client

    async def receive(self, within: float = 10.0) -> dict[str, Any]:
        while not self.pending:
            chunk = await asyncio.wait_for(self.reader.read(65536), within)
            if not chunk:
                raise ConnectionResetError("server closed the connection")
            self.pending.extend(protocol.unpack(b) for b in self.decoder.feed(chunk))
        return self.pending.pop(0)

    async def send(self, seq: int, items: list[list[Any]]) -> dict[str, Any]:
        """Send one data frame and return the server's answer (ack or error)."""
        self.writer.write(protocol.data(seq, items))
        return await self.receive()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def wait_until(predicate: Any, within: float = 10.0, every: float = 0.05) -> None:
    """Poll ``predicate`` (a plain or an async function) until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within

    async def holds() -> bool:
        result = predicate()
        return bool(await result if inspect.isawaitable(result) else result)

    while not await holds():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(every)


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """Rows of one query on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def quantile_ok(samples: np.ndarray, q: float, estimate: float) -> bool:
    """The accuracy criterion: within 1 % relative, or 0.2 percentage points of rank, of
    the exact quantile (ties: q may fall anywhere in the estimate's rank interval)."""
    exact = float(np.quantile(samples, q))
    if abs(estimate - exact) <= 0.01 * abs(exact):
        return True
    below = np.count_nonzero(samples < estimate) / len(samples)
    at_or_below = np.count_nonzero(samples <= estimate) / len(samples)
    return below - 0.002 <= q <= at_or_below + 0.002
