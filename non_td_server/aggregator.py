"""Counter, gauge and rate aggregation: exact sums, per-producer last gauge values."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from common.aggregate import BucketKey
from common.exactsum import ExactSum
from common.protocol import ROLE_NON_TD, CounterPartial, Limits, parse_counter_item
from common.store.rows import CounterRow, Values


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

    def from_stored(self, stored: Values) -> CounterState:
        assert isinstance(stored, CounterRow)
        return CounterState(stored.metric_type, stored.sum, stored.count, stored.nonzero,
                            stored.min, stored.max, dict(stored.gauge_last or {}),
                            stored.sum_rest)

    def values(self, state: CounterState) -> CounterRow:
        total, *rest = state.sum.expansion()
        if state.kind == "counter":
            value = total
        elif state.kind == "rate":
            value = state.nonzero / state.count
        else:
            value = sum(v for _, v in state.gauge_last.values())
        return CounterRow(state.kind, value, state.count, state.nonzero, state.lo, state.hi,
                          total, tuple(rest),
                          state.gauge_last if state.kind == "gauge" else None)
