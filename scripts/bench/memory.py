"""4. Memory per open (series, bucket) in td-server (tracemalloc; section 3 cross-checks it
by RSS)."""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import dataclass
from typing import Any

from common import protocol
from common.aggregate import OpenBuckets
from scripts.bench.base import (
    BUCKET_SECONDS,
    COMPACT_SETTING,
    MEMORY_PARTIALS,
    MEMORY_TARGET_BYTES,
    Plan,
    digest_pool,
    future_bucket,
    series_tags,
)
from td_server import aggregator as td_aggregator
from td_server.aggregator import TrendAggregator


@dataclass
class MemoryRow:
    partials_per_key: int
    keys: int
    bytes_per_key: float
    centroid_bytes_per_key: int

    @property
    def meets_target(self) -> bool:
        return self.bytes_per_key <= MEMORY_TARGET_BYTES


@dataclass
class MemoryResult:
    series: int
    buckets_per_series: int
    rows: list[MemoryRow]
    target_bytes: int
    compact_above_centroids: int | None


def run(plan: Plan) -> MemoryResult:
    """tracemalloc delta of td-server's open-bucket map (and its per-run series set) after
    feeding series x 2 buckets, each with MEMORY_PARTIALS parsed partials. Beyond 3
    partials a tenth of the series: merging allocates many small objects, which
    tracemalloc makes slow."""
    pool = digest_pool(64)
    limits = protocol.Limits()
    aggregator: Any = TrendAggregator()
    first = future_bucket()
    rows = []
    for parts in MEMORY_PARTIALS:
        series_count = plan.memory_series if parts <= 3 else plan.memory_series // 10
        keys = series_count * 2
        items = [[["http_req_duration", series_tags(s), first + b * BUCKET_SECONDS,
                   BUCKET_SECONDS, d.count, d.total, d.lo, d.hi, d.blob, 0]
                  for s in range(series_count) for b in range(2)
                  for d in (pool[(s * 7 + b * 3 + j) % len(pool)],)]
                 for j in range(parts)]
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        buckets: OpenBuckets[Any, Any] = OpenBuckets(aggregator, BUCKET_SECONDS)
        series: set[tuple[str, Any]] = set()
        for j, batch in enumerate(items):
            for item in batch:
                partial = protocol.parse_trend_item(item, limits)
                series.add((partial.metric, partial.tags))
                buckets.merge("memory", f"p{j}", partial)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert len(buckets) == keys
        rows.append(MemoryRow(parts, keys, used / keys, parts * 300 * 16))
        del buckets, series, items
        gc.collect()
    threshold = getattr(td_aggregator, COMPACT_SETTING, None)
    return MemoryResult(plan.memory_series, 2, rows, MEMORY_TARGET_BYTES,
                        threshold if isinstance(threshold, int) else None)
