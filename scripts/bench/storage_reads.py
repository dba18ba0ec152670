"""Every read the storage benchmark makes of what tdagg stored, in one place, through the
store (common.store). The raw-sample baseline it is held against is plain SQL in
storage.py."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

from common.store import Store, open_store
from common.store.rows import TREND, Footprint, StoredRow, TrendRow

Series = list[tuple[dt.datetime, float]]  # (bucket start, value) in bucket order

__all__ = ["Footprint", "Series", "TdaggReads"]


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


class TdaggReads:
    """A run's stored rows, read through the store."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    @classmethod
    async def connect(cls, dsn: str, run_id: str) -> TdaggReads:
        store = open_store(dsn)
        await store.open(connections=1)
        return cls(store, run_id)

    async def close(self) -> None:
        await self.store.close()

    async def _rows(self, metric: str) -> list[StoredRow]:
        async with self.store.snapshot() as view:
            return [row async for row in view.rows(TREND, self.run_id, None, None, {},
                                                   [metric])]

    async def footprint(self) -> Footprint:
        return await self.store.footprint()

    async def busiest_series(self, metric: str) -> dict[str, str] | None:
        """The tag set of ``metric`` with the most samples over the run."""
        counts: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        for row in await self._rows(metric):
            tags: tuple[tuple[str, str], ...] = tuple(sorted(row.tags.items()))
            counts[tags] += row.values.count
        if not counts:
            return None
        busiest = max(counts.items(), key=lambda item: item[1])[0]
        return dict(busiest)

    async def tag_sets(self, metric: str) -> int:
        return len({tuple(sorted(row.tags.items())) for row in await self._rows(metric)})

    async def stored_p95(self, metric: str, tags: dict[str, Any]) -> Series:
        """One series' p95 per bucket: the stored figure."""
        series = []
        async with self.store.snapshot() as view:
            async for row in view.rows(TREND, self.run_id, None, None, tags, [metric]):
                if row.tags == tags and isinstance(row.values, TrendRow):
                    assert row.values.p95 is not None
                    series.append((_utc(row.bucket), row.values.p95))
        return series

    async def merged_p95(self, metric: str, width: int = 10) -> Series:
        """p95 per bucket over every tag set: each bucket's sketches read together."""
        async with self.store.snapshot() as view:
            groups = await view.merged_trends(self.run_id, metric, None, None, {}, width)
        return [(_utc(group.start), group.quantiles([0.95])[0]) for group in groups]
