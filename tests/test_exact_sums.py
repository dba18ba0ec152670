"""Sums are exact: each partial's sum travels as its correctly rounded value and the
rest (common.exactsum), servers add them exactly, and rows and reports give the
correctly rounded sum of every sample, checked against Fraction arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from common.exactsum import ExactSum, expansion_of
from non_td_server.aggregator import CounterAggregator
from td_report.summary import CounterAccumulator, TrendAccumulator
from td_server.aggregator import TrendAggregator
from tests.test_aggregators import counter, trend

FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


def exact(values: list[float]) -> Fraction:
    return sum((Fraction(v) for v in values), Fraction(0))


@settings(max_examples=300, deadline=None)
@given(st.lists(FINITE, min_size=0, max_size=600))
def test_expansion_is_exact_and_starts_correctly_rounded(values: list[float]) -> None:
    for terms in (expansion_of(np.array(values, dtype=np.float64)),
                  ExactSum.of_array(np.array(values, dtype=np.float64)).expansion(),
                  ExactSum.of_floats(values).expansion()):
        assert exact(terms) == exact(values)
        assert terms[0] == math.fsum(values)
        assert all(abs(b) < abs(a) for a, b in zip(terms, terms[1:], strict=False))


def test_large_arrays_take_the_numpy_path() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.lognormal(0, 4, 5000), -rng.lognormal(0, 4, 3000),
                             [5e-324, 1e-310, 1e300]])
    terms = expansion_of(values)
    assert exact(terms) == exact(values.tolist())
    assert terms[0] == math.fsum(values.tolist())


def test_a_sum_beyond_the_largest_double_is_infinite_not_an_error() -> None:
    total = ExactSum.of_floats([1.7e308, 1.7e308])
    assert total.value() == math.inf


def test_report_sums_over_rows_are_correctly_rounded() -> None:
    """Rows merged from many partials, read by td-report's accumulators: the whole-run
    sum is math.fsum of every sample, where adding the rows' rounded sums is not."""
    rng = np.random.default_rng(9)
    parts = [rng.lognormal(-3, 1.5, int(rng.integers(50, 400))) for _ in range(120)]
    accumulator = TrendAccumulator()
    aggregator = TrendAggregator()
    for row_parts in (parts[i:i + 6] for i in range(0, len(parts), 6)):
        state = aggregator.new_state(trend(row_parts[0]), "a")
        for part in row_parts[1:]:
            aggregator.add(state, trend(part), "b")
        accumulator.add_row(aggregator.values(state))
    everything = np.concatenate(parts).tolist()
    assert accumulator.total == math.fsum(everything)
    assert exact(accumulator.sum.expansion()) == exact(everything)


def test_counter_rows_and_report_totals_are_exact() -> None:
    rng = np.random.default_rng(10)
    parts = [list(rng.uniform(0, 1, 40) * 1e-3) for _ in range(50)]
    aggregator = CounterAggregator()
    accumulator = CounterAccumulator("counter")
    for row_parts in (parts[i:i + 5] for i in range(0, len(parts), 5)):
        state = aggregator.new_state(counter("counter", row_parts[0]), "a")
        for part in row_parts[1:]:
            aggregator.add(state, counter("counter", part), "b")
        row = aggregator.values(state)
        row_values = [v for p in row_parts for v in p]
        assert row.value == math.fsum(row_values)
        assert exact([row.sum, *row.sum_rest]) == exact(row_values)
        accumulator.add_row(0.0, row)
    everything = [v for p in parts for v in p]
    assert accumulator.total == math.fsum(everything)
