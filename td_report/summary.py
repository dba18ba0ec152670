"""Merging stored bucket rows into whole-selection figures. No I/O.

A trend is merged from its rows' exact count, sum, min, max and zero count and from
their digests (``common.digest``); a counter, rate or gauge from its exact sums. The
accumulators take rows one at a time, so that a long run is never held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common import digest
from common.exactsum import ExactSum
from common.store.rows import CounterRow, TrendRow
from td_report import band
from td_report.thresholds import Expression

# Stored digests are compressed together once this many centroids are pending, so that
# memory stays bounded; below it (every run of ordinary size) they are read stacked.
_MERGE_AFTER_CENTROIDS = 200_000


def quantile_label(q: float) -> str:
    """0.95 -> 'p(95)', 0.999 -> 'p(99.9)', as k6 names them."""
    return f"p({round(q * 100, 8):.10g})"


@dataclass(frozen=True)
class TrendStats:
    count: int
    sum: float
    min: float
    max: float
    mean: float
    zeros: int
    quantiles: dict[float, float]


@dataclass(frozen=True)
class CounterStats:
    kind: str  # counter, rate or gauge
    total: float  # counter: sum of the values
    samples: int
    nonzero: int
    min: float
    max: float
    last: float  # gauge: the value of the latest bucket (0 when empty)
    rate: float  # counter: total per second of the span; rate: nonzero / samples


class TrendAccumulator:
    __slots__ = ("count", "sum", "lo", "hi", "zeros", "parts", "pending", "_merged",
                 "bounds", "_counts")

    def __init__(self) -> None:
        self.count = 0
        self.sum = ExactSum()  # rows' sums and their sum_rest: exact, however many rows
        self.lo = math.inf
        self.hi = -math.inf
        self.zeros = 0
        self.parts: list[digest.Centroids] = []
        self.pending = 0
        self._merged: digest.Centroids | None = None
        # Threshold bounds whose rank interval is summed row by row (td_report.band),
        # before any compression; rows: below least/most, at or below least/most.
        self.bounds: list[float] = []
        self._counts = np.zeros((4, 0))

    def watch(self, bound: float) -> None:
        """Keep the rank interval of ``bound`` (call before the first row)."""
        if self.count:
            raise RuntimeError("watch() after rows were added")
        if bound not in self.bounds:
            self.bounds.append(bound)
            self._counts = np.zeros((4, len(self.bounds)))

    def counts(self, bound: float) -> band.Counts:
        """How many samples are below and at or below a watched bound, as far as the
        rows' digests, zeros, min and max tell."""
        if bound not in self.bounds:
            raise KeyError(f"the bound {bound!r} was not watched before the rows were added")
        column = self._counts[:, self.bounds.index(bound)]
        return band.Counts(self.count, *(float(x) for x in column))

    @property
    def total(self) -> float:
        return self.sum.value()

    def add_row(self, row: TrendRow, centroids: digest.Centroids | None = None) -> None:
        """A stored or written row; ``centroids`` when its sketch is decoded already."""
        self.add(row.count, row.sum, row.min, row.max, row.zeros,
                 digest.decode(row.digest) if centroids is None else centroids, row.sum_rest)

    def add(self, count: int, total: float, lo: float, hi: float, zeros: int,
            centroids: digest.Centroids, rest: Sequence[float] | None = None) -> None:
        self.count += count
        self.sum.add(ExactSum.of_expansion((total, *(rest or ()))))
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)
        self.zeros += zeros
        if self.bounds:
            self._counts += np.array(band.part_count_arrays(centroids, self.bounds, lo, hi,
                                                            zeros, count))
        if len(centroids):
            self.parts.append(centroids)
            self.pending += len(centroids)
            self._merged = None
            if self.pending > _MERGE_AFTER_CENTROIDS:
                self.parts = [digest.merge(self.parts)]
                self.pending = len(self.parts[0])

    def merged(self) -> digest.Centroids:
        """Every part's centroids, read as one digest (not compressed: more detail)."""
        if self._merged is None:
            self._merged = digest.stack(self.parts)
            self.parts = [self._merged] if len(self._merged) else []
        return self._merged

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """k6 reports 0 for every figure of an empty trend; so do we."""
        if not self.count:
            return [0.0] * len(qs)
        return digest.quantiles(self.merged(), qs, self.lo, self.hi, self.zeros)

    def stats(self, qs: Sequence[float]) -> TrendStats:
        if not self.count:
            return TrendStats(0, 0.0, 0.0, 0.0, 0.0, 0, {q: 0.0 for q in qs})
        values = self.quantiles(qs)
        total = self.total
        return TrendStats(self.count, total, self.lo, self.hi, total / self.count,
                          self.zeros, dict(zip(qs, values, strict=True)))


class CounterAccumulator:
    """Sums of counter, rate or gauge rows; for gauges also the latest bucket's value."""

    __slots__ = ("kind", "sum", "samples", "nonzero", "lo", "hi", "last_bucket",
                 "last_by_producer", "last_stateless")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.sum = ExactSum()  # counters: the rows' exact sums
        self.samples = 0
        self.nonzero = 0
        self.lo = math.inf
        self.hi = -math.inf
        self.last_bucket = -math.inf
        # producer -> (time ns, value) of its latest sample in the latest bucket
        self.last_by_producer: dict[str, tuple[float, float]] = {}
        self.last_stateless = 0.0  # summed values of latest-bucket rows without state

    def add_row(self, bucket: float, row: CounterRow) -> None:
        """A stored or written row (bucket start in epoch seconds)."""
        self._add(bucket, row.value, row.count, row.nonzero, row.min, row.max,
                  (row.sum, *row.sum_rest), row.gauge_last)

    def add(self, bucket: float, value: float, count: int, nonzero: int, lo: float, hi: float,
            state: Mapping[str, Any] | None) -> None:
        """A row's columns, ``state`` in its stored JSON form ({"sum", "sum_rest",
        "gauge_last"}, each optional)."""
        exact = ((state["sum"], *state.get("sum_rest", ())) if state and "sum" in state
                 else None)
        self._add(bucket, value, count, nonzero, lo, hi, exact, (state or {}).get("gauge_last"))

    def _add(self, bucket: float, value: float, count: int, nonzero: int, lo: float,
             hi: float, exact: Sequence[float] | None, last: Any) -> None:
        if self.kind == "counter":
            if exact is not None:  # the exact sum: rounded, and what was left out
                self.sum.add(ExactSum.of_expansion(exact))
            else:
                self.sum.add_float(value)
        self.samples += count
        self.nonzero += nonzero
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)
        if self.kind != "gauge" or bucket < self.last_bucket:
            return
        if bucket > self.last_bucket:
            self.last_bucket = bucket
            self.last_by_producer = {}
            self.last_stateless = 0.0
        if not isinstance(last, dict) or not last:
            self.last_stateless += value
            return
        # One k6 instance's gauge has one value at a time, whatever its tags: per
        # producer the latest sample wins; the producers' values add up (as vus do).
        for producer, (ns, sample) in last.items():
            seen = self.last_by_producer.get(producer)
            if seen is None or ns >= seen[0]:
                self.last_by_producer[producer] = (ns, sample)

    @property
    def total(self) -> float:
        return self.sum.value()

    def stats(self, span_seconds: float) -> CounterStats:
        if not self.samples:
            return CounterStats(self.kind, 0.0, 0, 0, 0.0, 0.0, 0.0, 0.0)
        last = sum(v for _, v in self.last_by_producer.values()) + self.last_stateless
        if self.kind == "counter":
            rate = self.total / span_seconds if span_seconds > 0 else 0.0
        elif self.kind == "rate":
            rate = self.nonzero / self.samples
        else:
            rate = 0.0
        return CounterStats(self.kind, self.total, self.samples, self.nonzero, self.lo,
                            self.hi, last if self.kind == "gauge" else 0.0, rate)


@dataclass
class Selected:
    """Whatever was merged for one selection: a whole metric, a --by group, a submetric."""

    metric: str
    kind: str
    tags: tuple[tuple[str, str | None], ...] = ()
    trend: TrendAccumulator | None = None
    counter: CounterAccumulator | None = None

    @classmethod
    def new(cls, metric: str, kind: str, tags: tuple[tuple[str, str | None], ...] = ()
            ) -> Selected:
        if kind == "trend":
            return cls(metric, kind, tags, trend=TrendAccumulator())
        return cls(metric, kind, tags, counter=CounterAccumulator(kind))

    @property
    def samples(self) -> int:
        if self.trend is not None:
            return self.trend.count
        assert self.counter is not None
        return self.counter.samples


@dataclass(frozen=True)
class Verdict:
    """A threshold judged on the merged figures.

    ``value`` is the observed figure and ``holds`` whether it satisfies the threshold,
    as k6 judges it. ``decided``: the exact figure is certainly on the same side (always
    for exact methods; for a percentile, when the rank interval of the bound in
    ``counts`` leaves no doubt and agrees with the estimate); otherwise the verdict is
    too close to call.
    """

    value: float
    holds: bool
    decided: bool
    counts: band.Counts | None = None  # percentiles of a non-empty trend


def judge(expression: Expression, selected: Selected, span_seconds: float) -> Verdict:
    """Observe the figure and say how sure the verdict is (``watch`` the bound first)."""
    value = observe(expression, selected, span_seconds)
    holds = expression.holds(value)
    acc = selected.trend
    if acc is None or expression.method not in band.APPROXIMATE_METHODS or not acc.count:
        return Verdict(value, holds, True)
    counts = acc.counts(expression.bound)
    return Verdict(value, holds, band.certain(expression, counts) == holds, counts)


def observe(expression: Expression, selected: Selected, span_seconds: float) -> float:
    """The figure a k6 threshold compares: p(95) of a trend, rate of a counter, ..."""
    method = expression.method
    if selected.trend is not None:
        acc = selected.trend
        if method == "p":
            return acc.quantiles([(expression.percentile or 0.0) / 100.0])[0]
        if method == "med":
            return acc.quantiles([0.5])[0]
        if not acc.count:
            return 0.0
        return {"avg": acc.total / acc.count, "min": acc.lo, "max": acc.hi}[method]
    assert selected.counter is not None
    stats = selected.counter.stats(span_seconds)
    if method == "count":
        return stats.total
    if method == "value":
        return stats.last
    return stats.rate  # counters: per second; rates: the fraction

