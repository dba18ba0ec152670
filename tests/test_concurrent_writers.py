"""Two writers (two servers' stores) merging into the same (series, bucket) at the same
moment never lose an update, whether the row exists already or not yet; and each
writer's log positions are its own, so a retried write is recognised per writer, on
PostgreSQL and in the memory store."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import numpy as np
import pytest

from common import digest
from common.aggregate import Entry
from common.store import StoreError, open_store
from common.store.rows import TREND, TrendRow
from td_server.aggregator import TrendAggregator, TrendState

ROUNDS = 25
KEYS_PER_ROUND = 3


def entries(round_: int, values: np.ndarray, position: int) -> dict[Any, Entry[Any]]:
    state = TrendState(len(values), float(values.sum()), float(values.min()),
                       float(values.max()), [digest.from_values(values)], 0)
    return {("run", "m", (("k", str(k)),), 1_700_000_000 + 10 * round_):
            Entry(TrendState(state.count, state.total, state.lo, state.hi, list(state.parts),
                             0), 0, position)
            for k in range(KEYS_PER_ROUND)}


async def write_until_done(writer: Any, batch: dict[Any, Entry[Any]]) -> int:
    """As a server's flush loop does: a failed write is retried as a whole."""
    for _ in range(50):
        try:
            return int(await writer.write(batch))
        except StoreError:
            await asyncio.sleep(0.01)
    raise AssertionError("a write never went through")


async def test_two_writers_racing_on_the_same_rows_lose_nothing(dsn: str) -> None:
    stores = [open_store(dsn), open_store(dsn)]
    for store in stores:
        await store.open(connections=1)
    await stores[0].ensure_schema()
    # New rows go by COPY into a staging table and one INSERT ... ON CONFLICT DO NOTHING:
    # a row the other writer inserted meanwhile makes the batch retry and merge into it.
    assert all(getattr(store, "copy_in", None) is True for store in stores)
    try:
        writers = [store.writer(TrendAggregator(), 10) for store in stores]
        rng = np.random.default_rng(4)
        sent: dict[int, int] = {}
        for round_ in range(ROUNDS):
            parts = [rng.lognormal(3, 1, int(rng.integers(50, 300))) for _ in writers]
            sent[round_] = sum(len(p) for p in parts)
            # New rows on the first pass of each round; the second pass races on rows that
            # exist (late data into stored rows).
            for _ in range(2):
                await asyncio.gather(*(
                    write_until_done(w, entries(round_, part, 0))
                    for w, part in zip(writers, parts, strict=True)))
        async with stores[0].snapshot() as view:
            rows = [row async for row in view.rows(TREND, "run", None, None, {})]
    finally:
        for store in stores:
            await store.close()
    assert len(rows) == ROUNDS * KEYS_PER_ROUND
    for row in rows:
        round_ = (int(row.bucket) - 1_700_000_000) // 10
        assert isinstance(row.values, TrendRow)
        # Each writer's part, twice: nothing was overwritten by the other writer.
        assert row.values.count == 2 * sent[round_], (round_, row.tags)
        weights = digest.decode(row.values.digest)[:, 1].sum()
        assert weights == 2 * sent[round_]


@pytest.fixture(params=["postgresql", "memory"])
async def store_dsn(request: pytest.FixtureRequest, pg_server: object) -> str:
    if request.param == "memory":
        from common.store.memory import forget  # noqa: PLC0415

        name = f"writers-{id(request)}"
        forget(name)
        return f"memory://{name}"
    from tests.conftest import create_database  # noqa: PLC0415

    return await create_database(pg_server)


async def test_each_writer_keeps_its_own_positions(store_dsn: str) -> None:
    """Writer B's log positions are far below A's, as a second server's are. Each
    writer's batch is written twice (the retry after an unknown outcome): the retry is
    skipped, and B's merges are never mistaken for retries because A's positions are
    higher."""
    stores = [open_store(store_dsn), open_store(store_dsn)]
    for store in stores:
        await store.open(connections=1)
    await stores[0].ensure_schema()
    try:
        writers = [stores[0].writer(TrendAggregator(), 10, "a" * 32),
                   stores[1].writer(TrendAggregator(), 10, "b" * 32)]
        first_position = {0: 1 << 41, 1: 7}
        rng = np.random.default_rng(9)
        sent: dict[int, int] = {}
        for round_ in range(ROUNDS):
            parts = [rng.lognormal(3, 1, int(rng.integers(20, 200))) for _ in writers]
            sent[round_] = sum(len(p) for p in parts)
            batches = [entries(round_, part, first_position[i] + round_)
                       for i, part in enumerate(parts)]
            for _ in range(2):  # the second pass is each writer's retry
                await asyncio.gather(*(write_until_done(w, b)
                                       for w, b in zip(writers, batches, strict=True)))
        keys = list(entries(ROUNDS - 1, np.ones(1), 0))
        positions = [await w.stored_positions(keys) for w in writers]
        async with stores[0].snapshot() as view:
            rows = [row async for row in view.rows(TREND, "run", None, None, {})]
    finally:
        for store in stores:
            await store.close()
    assert positions == [{k: first_position[i] + ROUNDS - 1 for k in keys} for i in (0, 1)]
    assert len(rows) == ROUNDS * KEYS_PER_ROUND
    for row in rows:
        round_ = (int(row.bucket) - 1_700_000_000) // 10
        assert isinstance(row.values, TrendRow)
        assert row.values.count == sent[round_], (round_, row.tags)


async def test_a_row_from_before_writer_identities_holds_its_position(dsn: str) -> None:
    """A row written before writers had identities (writer_pos empty) holds wal_pos for
    whichever writer asks, so an upgraded server's replay skips what it had written."""
    store = open_store(dsn)
    await store.open(connections=1)
    try:
        await store.ensure_schema()
        writer = store.writer(TrendAggregator(), 10, "c" * 32)
        batch = entries(0, np.arange(1.0, 11.0), 500)
        await writer.write(batch)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE trend_buckets SET writer_pos = '{}'")
        finally:
            await conn.close()
        upgraded = store.writer(TrendAggregator(), 10, "d" * 32)
        assert await upgraded.stored_positions(list(batch)) == {k: 500 for k in batch}
        assert await upgraded.write(batch) == 0  # held already: skipped
        assert await upgraded.write(entries(0, np.arange(1.0, 11.0), 501)) == len(batch)
        async with store.snapshot() as view:
            rows = [row async for row in view.rows(TREND, "run", None, None, {})]
    finally:
        await store.close()
    assert sorted(r.values.count for r in rows) == [20] * len(batch)  # type: ignore[union-attr]
