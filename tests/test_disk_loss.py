"""A server whose disk is lost loses nothing and doubles nothing.

Forwarders keep each frame until its server says every bucket it touched is in the
database (``committed``), and send the frames it had not confirmed again: to the same
server when it comes back with an empty state directory, or to the next server of the
role after a failover. Rows keep, per stream (a producer's frames to one server), the
highest frame seq they hold, so that a frame stored once is not merged again, whichever
server stores it. The end-to-end test with real k6 is in test_several_servers.py.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import digest, protocol
from common.aggregate import Entry
from common.harness import start_server
from common.protocol import TrendPartial
from common.store import open_store
from common.store.rows import TREND, TrendRow
from td_server.aggregator import TrendAggregator, TrendState
from tests.utils import Client, fetch, run_server

KEY = ("run", "http_req_duration", (("name", "a"),), 1_700_000_000)
STREAM = protocol.stream_key("producer-1", "10.0.0.1:7410")


def state_of(values: np.ndarray) -> TrendState:
    return TrendState(len(values), math.fsum(values), float(values.min()),
                      float(values.max()), [digest.from_values(values)], 0)


def partial(values: np.ndarray) -> TrendPartial:
    return TrendPartial(KEY[1], KEY[2], KEY[3], 10, len(values), math.fsum(values),
                        float(values.min()), float(values.max()), digest.from_values(values))


def trusted(values: np.ndarray, low: int, high: int, position: int) -> dict[Any, Entry[Any]]:
    """An entry merged from frames low..high of STREAM."""
    entry: Entry[Any] = Entry(state_of(values), 0, position)
    entry.add_source(STREAM, low)
    entry.add_source(STREAM, high)
    return {KEY: entry}


def doubtful(parts: dict[int, np.ndarray], position: int) -> dict[Any, Entry[Any]]:
    """An entry of items that may be stored already: frame seq -> its samples."""
    entry: Entry[Any] = Entry(None, 0, position)
    entry.doubtful = [(STREAM, seq, partial(values), "producer-1")
                      for seq, values in parts.items()]
    return {KEY: entry}


@pytest.fixture(params=["memory", "postgresql"])
def store_dsn(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return f"memory://disk-loss-{id(request)}"
    dsn: str = request.getfixturevalue("dsn")
    return dsn


async def test_rows_keep_their_streams_so_a_frame_sent_again_counts_once(
        store_dsn: str) -> None:
    rng = np.random.default_rng(15)
    first = rng.lognormal(3, 1, 700)  # frames 5..7, stored by the lost server
    again = {5: rng.lognormal(3, 1, 40), 6: rng.lognormal(3, 1, 50)}  # frames 5, 6 resent
    new = rng.lognormal(3, 1, 300)  # frame 8, never stored
    overlapping = rng.lognormal(3, 1, 20)  # frames 8..9: frame 8 is held already
    store = open_store(store_dsn)
    await store.open(connections=1)
    try:
        await store.ensure_schema()
        lost = store.writer(TrendAggregator(), 10, "a" * 32)
        other = store.writer(TrendAggregator(), 10, "b" * 32)
        await lost.write(trusted(first, 5, 7, 100))
        # The next server gets frames 5, 6 and 8 again, as doubtful items: 8 only counts.
        await other.write(doubtful({**again, 8: new}, 200))
        # The lost server's frames 5..7 again, merged (a replay elsewhere): all held.
        await other.write(trusted(first, 5, 7, 300))
        assert other.overlaps == 0
        # Frames 8..9 merged into one state, the row holding 8: said and counted.
        await other.write(trusted(overlapping, 8, 9, 400))
        assert other.overlaps == 1
        async with store.snapshot() as view:
            rows = [row async for row in view.rows(TREND, "run", None, None, {})]
    finally:
        await store.close()
    (row,) = rows
    assert isinstance(row.values, TrendRow)
    assert row.values.count == len(first) + len(new) + len(overlapping)
    assert row.values.max == max(first.max(), new.max(), overlapping.max())


def item(values: np.ndarray, metric: str, bucket: int) -> list[Any]:
    return protocol.trend_item(TrendPartial(
        metric, (("name", "a"),), bucket, 10, len(values), math.fsum(values),
        float(values.min()), float(values.max()), digest.from_values(values)))


async def connect(address: tuple[str, int], producer: str, sent_before: int = 0
                  ) -> tuple[Client, dict[str, Any]]:
    """A client that wants ``committed`` frames, as k6-forward is; and its welcome."""
    reader, writer = await asyncio.open_connection(*address)
    client = Client(reader, writer)
    writer.write(protocol.hello(producer, "run", protocol.ROLE_TD, confirm=True,
                                sent_before=sent_before))
    welcome = await client.receive()
    assert welcome["type"] == "welcome", welcome
    return client, welcome


async def send(client: Client, seq: int, items: list[list[Any]], source: str,
               source_seq: int | None = None) -> None:
    client.writer.write(protocol.data(seq, items, source, source_seq))
    assert await client.receive() == {"type": "ack", "seq": seq}


async def committed_through(client: Client, seq: int) -> None:
    """Wait for the server to say every frame up to ``seq`` is in the database."""
    while True:
        message = await client.receive(within=15)
        assert message["type"] == "committed", message
        if message["seq"] >= seq:
            return


async def stored_counts(dsn: str) -> dict[str, int]:
    rows = await fetch(dsn, "SELECT metric, count FROM trend_buckets WHERE run_id = 'run'")
    return {row["metric"]: row["count"] for row in rows}


async def test_a_server_that_lost_its_disk_takes_frames_again_without_doubling(
        dsn: str, tmp_path: Path) -> None:
    """Frames 1-3 are stored and confirmed; frame 4 is logged and acknowledged, not
    stored (its bucket has 10 minutes of grace left). The server is killed (kill -9) and
    its state directory deleted; a server with an empty one takes its place on the same
    database. The forwarder sends frames 1-4 again, saying it had sent up to 4 before:
    frame 4 is stored, 1-3 are not merged a second time. The same frames moved to it
    from the lost server by another connection (source_seq) count once too."""
    rng = np.random.default_rng(16)
    parts = [rng.lognormal(3, 1, n) for n in (100, 200, 300, 400)]
    now = int(time.time())
    old, recent = (now - 1800) // 10 * 10, (now - 60) // 10 * 10
    frames = {seq: [item(parts[seq - 1], f"m{seq}", old if seq < 4 else recent)]
              for seq in (1, 2, 3, 4)}
    source = "10.0.0.1:7410"
    lost = await start_server("td_server", dsn, tmp_path / "lost", "--grace", "600")
    try:
        client, welcome = await connect(lost.address, "p")
        assert (welcome["last_seq"], welcome["committed"]) == (0, 0)
        for seq in (1, 2, 3):
            await send(client, seq, frames[seq], source)
        await committed_through(client, 3)
        assert await stored_counts(dsn) == {"m1": 100, "m2": 200, "m3": 300}
        await send(client, 4, frames[4], source)
        await client.close()
        again, welcome = await connect(lost.address, "p")
        assert (welcome["last_seq"], welcome["committed"]) == (4, 3)
        await again.close()
    finally:
        lost.kill()
        await lost.close()
    shutil.rmtree(tmp_path / "lost")
    async with run_server(dsn, tmp_path / "new", grace=0) as wiped:
        client, welcome = await connect(wiped.address, "p", sent_before=4)
        assert (welcome["last_seq"], welcome["committed"]) == (0, 0)
        for seq in (1, 2, 3, 4):
            await send(client, seq, frames[seq], source)
        await committed_through(client, 4)
        await client.close()
        assert await stored_counts(dsn) == {"m1": 100, "m2": 200, "m3": 300, "m4": 400}
        # Frames 2 and 4 of the lost server's stream, moved here by a failover.
        moved, _ = await connect(wiped.address, "p")
        await send(moved, 5, frames[2], source, source_seq=2)
        await send(moved, 6, frames[4], source, source_seq=4)
        await committed_through(moved, 6)
        await moved.close()
    assert await stored_counts(dsn) == {"m1": 100, "m2": 200, "m3": 300, "m4": 400}
