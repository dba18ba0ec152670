"""Two writers (two servers' stores) merging into the same (series, bucket) at the same
moment never lose an update, whether the row exists already or not yet.

The entries carry no log position (0): a row's position belongs to one writer, and
retries across writers are not what is tested here."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

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
