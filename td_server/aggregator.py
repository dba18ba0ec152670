"""Trend aggregation: merge digests, keep count, sum, min and max exact beside them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from common import digest
from common.aggregate import BucketKey
from common.exactsum import ExactSum
from common.protocol import ROLE_TD, Limits, TrendPartial, parse_trend_item
from common.store.rows import TrendRow, Values

QUANTILES = (0.5, 0.9, 0.95, 0.99)
# Merging is deferred: parts pile up and are merged in one pass until they hold this many
# rows (16 bytes each, 12 KiB), which keeps an open (series, bucket) under 16 KiB however
# many generators feed it, unless its merged sketch alone has more buckets.
_COMPACT_ABOVE_CENTROIDS = 768


class TrendState:
    # ``sketch``: the encoding of ``parts`` while they are one sketch as received (a
    # partial, or a stored row); written as it is, since encoding it again gives the
    # same bytes. Any merge drops it.
    __slots__ = ("count", "sum", "lo", "hi", "parts", "zeros", "held", "sketch")

    def __init__(self, count: int, total: float, lo: float, hi: float,
                 parts: list[digest.Centroids], zeros: int,
                 rest: Sequence[float] = (), sketch: bytes = b"") -> None:
        self.count = count
        self.zeros = zeros
        self.sum = ExactSum.of_expansion((total, *rest))  # exact through every merge
        self.lo = lo
        self.hi = hi
        self.parts = parts
        self.held = sum(len(p) for p in parts)
        self.sketch = sketch if len(parts) == 1 else b""

    @property
    def total(self) -> float:
        """The exact sum, correctly rounded."""
        return self.sum.value()

    def merge_digest(self, centroids: digest.Centroids) -> None:
        self.sketch = b""
        self.parts.append(centroids)
        self.held += len(centroids)
        if self.held > _COMPACT_ABOVE_CENTROIDS:
            self.parts = [digest.merge(self.parts)]
            self.held = len(self.parts[0])


class TrendAggregator:
    role = ROLE_TD

    def parse_item(self, item: object, limits: Limits,
                   notes: Counter[str] | None = None) -> TrendPartial:
        return parse_trend_item(item, limits, notes)

    def key_of(self, run_id: str, partial: TrendPartial) -> BucketKey:
        return (run_id, partial.metric, partial.tags, partial.bucket)

    def state_samples(self, state: TrendState) -> int:
        return state.count

    def samples(self, partial: TrendPartial) -> int:
        return partial.samples

    def new_state(self, partial: TrendPartial, producer: str) -> TrendState:
        return TrendState(partial.samples, partial.total, partial.lo, partial.hi,
                          [partial.centroids], partial.zeros, partial.rest, partial.sketch)

    def add(self, state: TrendState, partial: TrendPartial, producer: str) -> None:
        state.count += partial.samples
        state.zeros += partial.zeros
        state.sum.add(ExactSum.of_expansion((partial.total, *partial.rest)))
        state.lo = min(state.lo, partial.lo)
        state.hi = max(state.hi, partial.hi)
        state.merge_digest(partial.centroids)

    def absorb(self, state: TrendState, other: TrendState) -> None:
        state.count += other.count
        state.zeros += other.zeros
        state.sum.add(other.sum)
        state.lo = min(state.lo, other.lo)
        state.hi = max(state.hi, other.hi)
        for part in other.parts:
            state.merge_digest(part)

    def from_stored(self, stored: Values) -> TrendState:
        assert isinstance(stored, TrendRow)
        sketch = stored.digest if digest.encodes_sketch(stored.digest) else b""
        return TrendState(stored.count, stored.sum, stored.min, stored.max,
                          [digest.decode(stored.digest)], stored.zeros, stored.sum_rest,
                          sketch)

    def values(self, state: TrendState) -> TrendRow:
        if state.sketch:
            merged, encoded = state.parts[0], state.sketch
        else:
            merged = digest.merge(state.parts)
            state.parts = [merged]
            state.held = len(merged)
            encoded = b""
        # merge returns a sketch: neither reader checks for a legacy digest again.
        p50, p90, p95, p99 = digest.quantiles(merged, QUANTILES, state.lo, state.hi,
                                              state.zeros, known_sketch=True)
        total, *rest = state.sum.expansion()
        return TrendRow(state.count, total, state.lo, state.hi, state.zeros,
                        encoded or digest.encode(merged, known_sketch=True), tuple(rest),
                        p50, p90, p95, p99)
