"""Counter, gauge and rate aggregation: exact sums, per-producer last gauge values."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson

from common.aggregate import BucketKey
from common.exactsum import ExactSum
from common.protocol import ROLE_NON_TD, CounterPartial, Limits, parse_counter_item


class CounterState:
    __slots__ = ("kind", "sum", "count", "nonzero", "lo", "hi", "gauge_last")

    def __init__(self, kind: str, total: float, count: int, nonzero: int, lo: float,
                 hi: float, gauge_last: dict[str, list[float]],
                 rest: Sequence[float] = ()) -> None:
        self.kind = kind
        self.sum = ExactSum.of_expansion((total, *rest))  # exact through every merge
        self.count = count
        self.nonzero = nonzero
        self.lo = lo
        self.hi = hi
        # producer -> [last sample time ns, last value]; a gauge reads as the sum over
        # producers of each one's latest value, so two generators' vus add up.
        self.gauge_last = gauge_last

    @property
    def total(self) -> float:
        """The exact sum of the samples, correctly rounded."""
        return self.sum.value()

    def take_last(self, producer: str, last_ns: float, value: float) -> None:
        seen = self.gauge_last.get(producer)
        if seen is None or last_ns >= seen[0]:
            self.gauge_last[producer] = [last_ns, value]


class CounterAggregator:
    role = ROLE_NON_TD
    table = "counter_buckets"
    value_columns = ("metric_type", "value", "count", "nonzero", "min", "max", "state")
    stored_columns = ("metric_type", "value", "count", "nonzero", "min", "max", "state")

    def parse_item(self, item: object, limits: Limits,
                   notes: Counter[str] | None = None) -> CounterPartial:
        return parse_counter_item(item, limits, notes)

    def key_of(self, run_id: str, partial: CounterPartial) -> BucketKey:
        return (run_id, partial.metric, partial.tags, partial.bucket)

    def state_samples(self, state: CounterState) -> int:
        return state.count

    def samples(self, partial: CounterPartial) -> int:
        return partial.samples

    def new_state(self, partial: CounterPartial, producer: str) -> CounterState:
        state = CounterState(partial.kind, partial.total, partial.samples, partial.nonzero,
                             partial.lo, partial.hi, {}, partial.rest)
        if partial.kind == "gauge":
            state.take_last(producer, partial.last_ns, partial.last_value)
        return state

    def add(self, state: CounterState, partial: CounterPartial, producer: str) -> None:
        state.sum.add(ExactSum.of_expansion((partial.total, *partial.rest)))
        state.count += partial.samples
        state.nonzero += partial.nonzero
        state.lo = min(state.lo, partial.lo)
        state.hi = max(state.hi, partial.hi)
        if state.kind == "gauge":
            state.take_last(producer, partial.last_ns, partial.last_value)

    def absorb(self, state: CounterState, other: CounterState) -> None:
        state.sum.add(other.sum)
        state.count += other.count
        state.nonzero += other.nonzero
        state.lo = min(state.lo, other.lo)
        state.hi = max(state.hi, other.hi)
        for producer, (last_ns, value) in other.gauge_last.items():
            state.take_last(producer, last_ns, value)

    def from_stored(self, stored: Any) -> CounterState:
        kind, value, count, nonzero, lo, hi, raw_state = stored
        extra = orjson.loads(raw_state) if raw_state else {}
        # The stored row keeps the exact sum of the samples in state: "sum", correctly
        # rounded, and "sum_rest", what rounding left out.
        return CounterState(kind, extra.get("sum", value), count, nonzero, lo, hi,
                            extra.get("gauge_last", {}), extra.get("sum_rest", ()))

    def values(self, state: CounterState) -> tuple[Any, ...]:
        total, *rest = state.sum.expansion()
        if state.kind == "counter":
            value = total
        elif state.kind == "rate":
            value = state.nonzero / state.count
        else:
            value = sum(v for _, v in state.gauge_last.values())
        extra: dict[str, Any] = {"sum": total}
        if rest:
            extra["sum_rest"] = rest
        if state.kind == "gauge":
            extra["gauge_last"] = state.gauge_last
        return (state.kind, value, state.count, state.nonzero, state.lo, state.hi,
                orjson.dumps(extra).decode())
