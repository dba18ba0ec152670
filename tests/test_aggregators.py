"""Server-side bucket states: TrendAggregator, CounterAggregator and OpenBuckets."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import orjson
import pytest

from common import digest
from common.aggregate import OpenBuckets
from common.exactsum import expansion_of
from common.protocol import CounterPartial, Limits, TrendPartial, parse_trend_item
from common.store.postgres import columns
from common.store.rows import COUNTER, TREND, CounterRow, TrendRow, Values
from non_td_server.aggregator import CounterAggregator, CounterState
from td_server.aggregator import TrendAggregator, TrendState
from tests.utils import quantile_ok

B = 1_700_000_000  # a bucket start, multiple of 10
W = 10
RUN = "run-1"


def trend(values: list[float] | np.ndarray, bucket: int = B, metric: str = "http_req_duration",
          tags: tuple[tuple[str, str], ...] = (("name", "home"),)) -> TrendPartial:
    """A partial as the forwarder builds it: exact zeros counted beside the digest, the
    exact sum as its correctly rounded value and the rest."""
    arr = np.asarray(values, dtype=np.float64)
    centroids, zeros = digest.split_zeros(arr)
    total, *rest = expansion_of(arr)
    return TrendPartial(metric, tags, bucket, W, len(arr), total, float(arr.min()),
                        float(arr.max()), centroids, zeros, tuple(rest))


def counter(kind: str, values: list[float], last_ns: int = 0, bucket: int = B,
            metric: str = "m", tags: tuple[tuple[str, str], ...] = ()) -> CounterPartial:
    """A partial as the forwarder would build it from raw samples; last = values[-1]."""
    total, *rest = expansion_of(np.asarray(values, dtype=np.float64))
    return CounterPartial(metric, kind, tags, bucket, W, total, len(values),
                          sum(1 for v in values if v != 0), min(values), max(values), last_ns,
                          values[-1], tuple(rest))


def columns_of(values: Values) -> dict[str, Any]:
    """A row as PostgreSQL stores it, by column name."""
    kind = TREND if isinstance(values, TrendRow) else COUNTER
    return dict(zip(columns.WRITTEN[kind], columns.written(values), strict=True))


def as_row(aggregator: Any, values: Values) -> Values:
    """A written row as the store reads it back: through PostgreSQL's columns."""
    kind = TREND if isinstance(values, TrendRow) else COUNTER
    by_name = columns_of(values)
    return columns.read(kind, [by_name[c.split("::")[0]] for c in columns.READ[kind]])


def trend_row(values: Values) -> dict[str, Any]:
    return columns_of(values)


# --- trends ----------------------------------------------------------------------


def test_trend_merge_exact_totals() -> None:
    a = [0.5, 1.25, 3.0]
    b = [0.25, 8.0]
    c = [2.0, 2.0, 2.0, 16.5]
    buckets: OpenBuckets[TrendPartial, TrendState] = OpenBuckets(TrendAggregator(), W)
    buckets.merge(RUN, "gen-a", trend(a))
    buckets.merge(RUN, "gen-b", trend(b))
    buckets.merge(RUN, "gen-a", trend(c))
    assert len(buckets) == 1
    (key,) = buckets.entries
    assert key == (RUN, "http_req_duration", (("name", "home"),), B)
    row = trend_row(TrendAggregator().values(buckets.entries[key].state))
    everything = a + b + c
    assert row["count"] == 9
    assert row["sum"] == 35.5  # every value is a binary fraction: the sum is exact
    assert row["min"] == 0.25
    assert row["max"] == 16.5
    assert row["mean"] == 35.5 / 9
    p50, p90, p95, p99 = row["p50"], row["p90"], row["p95"], row["p99"]
    assert 0.25 <= p50 <= p90 <= p95 <= p99 <= 16.5
    # Nine samples, each in a bucket of its own: the median is the middle sample's.
    assert quantile_ok(np.array(everything), 0.5, p50)
    assert row["zeros"] == 0
    stored = digest.decode(row["digest"])
    assert float(stored[:, 1].sum()) == 9.0
    # Each sample is stood for within ALPHA of itself.
    assert math.isclose(float(np.sum(stored[:, 0] * stored[:, 1])), 35.5, rel_tol=digest.ALPHA)


def test_trend_keys_split_series_buckets_and_runs() -> None:
    buckets: OpenBuckets[TrendPartial, TrendState] = OpenBuckets(TrendAggregator(), W)
    buckets.merge(RUN, "p", trend([1.0]))
    buckets.merge(RUN, "p", trend([2.0], tags=(("name", "other"),)))
    buckets.merge(RUN, "p", trend([3.0], metric="http_req_waiting"))
    buckets.merge(RUN, "p", trend([4.0], bucket=B + W))
    buckets.merge("run-2", "p", trend([5.0]))
    buckets.merge(RUN, "q", trend([6.0]))  # same key as the first, other producer
    assert len(buckets) == 5
    totals = {key: entry.state.total for key, entry in buckets.entries.items()}
    assert totals == {
        (RUN, "http_req_duration", (("name", "home"),), B): 7.0,
        (RUN, "http_req_duration", (("name", "other"),), B): 2.0,
        (RUN, "http_req_waiting", (("name", "home"),), B): 3.0,
        (RUN, "http_req_duration", (("name", "home"),), B + W): 4.0,
        ("run-2", "http_req_duration", (("name", "home"),), B): 5.0,
    }


def test_trend_many_partials_compact_without_losing_mass() -> None:
    rng = np.random.default_rng(8)
    chunks = [rng.lognormal(np.log(0.1), 0.7, 500) for _ in range(70)]
    aggregator = TrendAggregator()
    buckets: OpenBuckets[TrendPartial, TrendState] = OpenBuckets(aggregator, W)
    for i, chunk in enumerate(chunks):
        buckets.merge(RUN, f"gen-{i % 7}", trend(chunk))
    (state,) = [entry.state for entry in buckets.entries.values()]
    everything = np.concatenate(chunks)
    out = trend_row(aggregator.values(state))
    count, total, lo, hi, mean, blob, zeros, rest = (out[c] for c in (
        "count", "sum", "min", "max", "mean", "digest", "zeros", "sum_rest"))
    p50, p90, p95, p99 = out["p50"], out["p90"], out["p95"], out["p99"]
    assert count == 35_000
    assert zeros == 0
    # Exact through 70 partials: the correctly rounded sum, and with sum_rest the sum
    # itself (each partial's sum was rounded, their float sum would be off).
    assert total == math.fsum(everything)
    assert sum(map(Fraction, [total, *(rest or [])])) == sum(map(Fraction, everything.tolist()))
    assert (lo, hi) == (float(everything.min()), float(everything.max()))
    assert math.isclose(mean, float(np.mean(everything)), rel_tol=1e-12)
    stored = digest.decode(blob)
    assert len(stored) <= digest.MAX_CENTROIDS
    assert float(stored[:, 1].sum()) == 35_000.0
    exact = np.sort(everything)
    for q, estimate in zip((0.5, 0.9, 0.95, 0.99), (p50, p90, p95, p99), strict=True):
        assert quantile_ok(exact, q, estimate), q


def test_trend_values_is_repeatable() -> None:
    aggregator = TrendAggregator()
    state = aggregator.new_state(trend([1.0, 2.0, 3.0]), "p")
    aggregator.add(state, trend([4.0, 5.0]), "q")
    first = aggregator.values(state)
    second = aggregator.values(state)
    assert first == second


def test_trend_stored_round_trip_and_late_absorb() -> None:
    rng = np.random.default_rng(9)
    on_time = [rng.lognormal(0, 1, 4000) for _ in range(3)]
    late = [rng.lognormal(0, 1, 1500) for _ in range(2)]
    aggregator = TrendAggregator()

    written = aggregator.new_state(trend(on_time[0]), "a")
    for part in on_time[1:]:
        aggregator.add(written, trend(part), "b")
    row = as_row(aggregator, aggregator.values(written))
    assert isinstance(row, TrendRow)
    count, zeros, blob = row.count, row.zeros, row.digest
    assert isinstance(blob, bytes)
    assert (count, zeros) == (12_000, 0)

    # Re-reading the row alone reproduces the written values.
    reread = aggregator.from_stored(row)
    assert aggregator.values(reread) == aggregator.values(written)

    # Late data merged into the stored row.
    closing = aggregator.new_state(trend(late[0]), "c")
    aggregator.add(closing, trend(late[1]), "c")
    merged = aggregator.from_stored(row)
    aggregator.absorb(merged, closing)
    out = trend_row(aggregator.values(merged))
    everything = np.concatenate(on_time + late)
    assert out["count"] == 15_000
    assert math.isclose(out["sum"], math.fsum(everything), rel_tol=1e-12)
    assert out["min"] == float(everything.min())
    assert out["max"] == float(everything.max())
    assert math.isclose(out["mean"], float(np.mean(everything)), rel_tol=1e-12)
    assert out["zeros"] == 0
    assert float(digest.decode(out["digest"])[:, 1].sum()) == 15_000.0
    exact = np.sort(everything)
    for q in (0.5, 0.9, 0.95, 0.99):
        assert quantile_ok(exact, q, out[f"p{round(q * 100)}"]), q


def test_trend_absorb_extremes_from_either_side() -> None:
    aggregator = TrendAggregator()
    stored = aggregator.from_stored(as_row(aggregator, aggregator.values(
        aggregator.new_state(trend([5.0, 6.0]), "a"))))
    aggregator.absorb(stored, aggregator.new_state(trend([0.5, 100.0]), "b"))
    out = trend_row(aggregator.values(stored))
    assert tuple(out[c] for c in ("count", "sum", "min", "max", "mean")) == (
        4, 111.5, 0.5, 100.0, 111.5 / 4)


# --- trends with exact zeros ----------------------------------------------------------


def test_trend_partial_zeros_counted_by_new_state() -> None:
    aggregator = TrendAggregator()
    state = aggregator.new_state(trend([0.0, 0.5, 0.0, 2.0]), "a")
    assert (state.count, state.zeros) == (4, 2)
    out = trend_row(aggregator.values(state))
    assert (out["count"], out["zeros"], out["sum"], out["min"], out["max"]) == (
        4, 2, 2.5, 0.0, 2.0)
    assert float(digest.decode(out["digest"])[:, 1].sum()) == 2.0


def test_trend_zeros_summed_by_add() -> None:
    a = [0.0, 0.0, 0.0, 1.5]
    b = [0.25, 0.0]
    c = [4.0, 8.0]
    d = [0.0] * 5
    buckets: OpenBuckets[TrendPartial, TrendState] = OpenBuckets(TrendAggregator(), W)
    for producer, values in (("gen-a", a), ("gen-b", b), ("gen-a", c), ("gen-c", d)):
        buckets.merge(RUN, producer, trend(values))
    (state,) = [entry.state for entry in buckets.entries.values()]
    assert (state.count, state.zeros) == (13, 9)
    out = trend_row(TrendAggregator().values(state))
    assert (out["count"], out["zeros"]) == (13, 9)
    assert (out["sum"], out["min"], out["max"], out["mean"]) == (13.75, 0.0, 8.0, 13.75 / 13)
    stored = digest.decode(out["digest"])
    assert float(stored[:, 1].sum()) == 4.0  # the four non-zero samples
    assert sorted(np.repeat(stored[:, 0], stored[:, 1].astype(int)).tolist()) == \
        pytest.approx([0.25, 1.5, 4.0, 8.0], rel=digest.ALPHA)
    # 9 of 13 samples are zero: p50 is 0 exactly (rank 6.5); p90 and above are not.
    assert out["p50"] == 0.0
    assert 0.0 < out["p90"] <= out["p95"] <= out["p99"] <= 8.0


def test_trend_bucket_of_only_zeros() -> None:
    aggregator = TrendAggregator()
    state = aggregator.new_state(trend([0.0] * 40), "a")
    aggregator.add(state, trend([0.0] * 2), "b")
    out = trend_row(aggregator.values(state))
    assert (out["count"], out["zeros"], out["sum"], out["min"], out["max"], out["mean"]) == (
        42, 42, 0.0, 0.0, 0.0, 0.0)
    assert (out["p50"], out["p90"], out["p95"], out["p99"]) == (0.0, 0.0, 0.0, 0.0)
    assert out["digest"] == b""
    # Stored and read back, then late non-zero data arrives.
    stored = aggregator.from_stored(as_row(aggregator, aggregator.values(state)))
    assert (stored.count, stored.zeros) == (42, 42)
    aggregator.absorb(stored, aggregator.new_state(trend([3.0, 0.0]), "c"))
    out = trend_row(aggregator.values(stored))
    assert (out["count"], out["zeros"], out["sum"], out["max"]) == (44, 43, 3.0, 3.0)
    assert digest.decode(out["digest"]).tolist() == digest.from_values([3.0]).tolist()
    # Ranks 22 .. 41.8 of 44 are inside the 43 zeros; rank 43.56 is on the last zero or
    # the 3.0, both within the criterion.
    assert (out["p50"], out["p90"], out["p95"]) == (0.0, 0.0, 0.0)
    assert quantile_ok(np.array([0.0] * 43 + [3.0]), 0.99, out["p99"])


def test_trend_zeros_through_storage_absorb_and_late_merge() -> None:
    """zeros survive add, values -> stored row -> from_stored, absorb, and re-storage."""
    rng = np.random.default_rng(10)

    def connecting(n: int, share: float) -> np.ndarray:
        values = rng.lognormal(np.log(0.004), 1.0, n)
        values[rng.random(n) < share] = 0.0
        return values

    on_time = [connecting(4000, 0.8), connecting(3000, 0.6), connecting(5000, 0.95)]
    late = [connecting(1500, 0.7), connecting(500, 1.0)]
    aggregator = TrendAggregator()

    written = aggregator.new_state(trend(on_time[0]), "a")
    for part in on_time[1:]:
        aggregator.add(written, trend(part), "b")
    on_time_zeros = sum(int(np.count_nonzero(p == 0.0)) for p in on_time)
    assert written.zeros == on_time_zeros
    row = as_row(aggregator, aggregator.values(written))
    assert isinstance(row, TrendRow)
    assert row.count == 12_000
    assert row.zeros == on_time_zeros
    reread = aggregator.from_stored(row)
    assert (reread.count, reread.zeros) == (12_000, on_time_zeros)
    assert aggregator.values(reread) == aggregator.values(written)

    closing = aggregator.new_state(trend(late[0]), "c")
    aggregator.add(closing, trend(late[1]), "c")
    merged = aggregator.from_stored(row)
    aggregator.absorb(merged, closing)
    everything = np.concatenate(on_time + late)
    all_zeros = int(np.count_nonzero(everything == 0.0))
    out = trend_row(aggregator.values(merged))
    assert (out["count"], out["zeros"]) == (14_000, all_zeros)
    assert float(digest.decode(out["digest"])[:, 1].sum()) == 14_000 - all_zeros
    assert math.isclose(out["sum"], math.fsum(everything), rel_tol=1e-12)
    assert (out["min"], out["max"]) == (0.0, float(everything.max()))
    exact = np.sort(everything)
    for q in (0.5, 0.9, 0.95, 0.99):
        assert quantile_ok(exact, q, out[f"p{round(q * 100)}"]), q

    # Once more through storage: the summed count is what is read back.
    again = aggregator.from_stored(as_row(aggregator, aggregator.values(merged)))
    assert (again.count, again.zeros) == (14_000, all_zeros)
    aggregator.absorb(again, aggregator.new_state(trend([0.0, 0.0, 0.5]), "d"))
    assert (again.count, again.zeros) == (14_003, all_zeros + 2)


def test_trend_zeros_survive_compaction() -> None:
    """More partials than one compaction holds: compacting the digests must not touch zeros."""
    rng = np.random.default_rng(11)
    aggregator = TrendAggregator()
    chunks = []
    for _ in range(80):
        chunk = rng.lognormal(np.log(0.004), 1.0, 300)
        chunk[rng.random(300) < 0.75] = 0.0
        chunks.append(chunk)
    state = aggregator.new_state(trend(chunks[0]), "p0")
    other = aggregator.new_state(trend(chunks[40]), "q0")
    for i in range(1, 40):
        aggregator.add(state, trend(chunks[i]), f"p{i % 3}")
        aggregator.add(other, trend(chunks[40 + i]), f"q{i % 3}")
    aggregator.absorb(state, other)
    everything = np.concatenate(chunks)
    zeros = int(np.count_nonzero(everything == 0.0))
    out = trend_row(aggregator.values(state))
    assert (out["count"], out["zeros"]) == (24_000, zeros)
    stored = digest.decode(out["digest"])
    assert len(stored) <= digest.MAX_CENTROIDS
    assert float(stored[:, 1].sum()) == 24_000 - zeros
    exact = np.sort(everything)
    for q in (0.5, 0.9, 0.95, 0.99):
        assert quantile_ok(exact, q, out[f"p{round(q * 100)}"]), q


# --- counters, rates, gauges -------------------------------------------------------


def counter_values(state: CounterState) -> dict[str, Any]:
    aggregator = CounterAggregator()
    return columns_of(aggregator.values(state))


def test_counter_sum() -> None:
    buckets: OpenBuckets[CounterPartial, CounterState] = OpenBuckets(CounterAggregator(), W)
    buckets.merge(RUN, "a", counter("counter", [1.0, 1.0, 1.0]))
    buckets.merge(RUN, "b", counter("counter", [1.0, 1.0]))
    buckets.merge(RUN, "a", counter("counter", [2048.5, 0.0, 0.25]))
    (state,) = [entry.state for entry in buckets.entries.values()]
    out = counter_values(state)
    assert out["metric_type"] == "counter"
    assert out["value"] == 2053.75
    assert (out["count"], out["nonzero"], out["min"], out["max"]) == (8, 7, 0.0, 2048.5)
    assert orjson.loads(out["state"])["sum"] == 2053.75


def test_rate_value_is_nonzero_over_count() -> None:
    buckets: OpenBuckets[CounterPartial, CounterState] = OpenBuckets(CounterAggregator(), W)
    buckets.merge(RUN, "a", counter("rate", [1, 0, 0, 1, 0, 0, 0, 0, 1, 0]))  # 3 of 10
    buckets.merge(RUN, "b", counter("rate", [1, 1, 1, 1, 1]))  # 5 of 5
    (state,) = [entry.state for entry in buckets.entries.values()]
    out = counter_values(state)
    assert out["metric_type"] == "rate"
    assert out["value"] == 8 / 15
    assert (out["count"], out["nonzero"], out["min"], out["max"]) == (15, 8, 0, 1)
    # Any non-zero sample counts as one, whatever its size.
    buckets.merge(RUN, "c", counter("rate", [2.5, 0.0, -1.0, 0.0, 0.0]))  # 2 of 5
    out = counter_values(state)
    assert out["value"] == 10 / 20
    assert (out["count"], out["nonzero"], out["min"], out["max"]) == (20, 10, -1.0, 2.5)


def test_gauge_is_sum_of_each_producers_latest_value() -> None:
    buckets: OpenBuckets[CounterPartial, CounterState] = OpenBuckets(CounterAggregator(), W)
    t = B * 1_000_000_000
    buckets.merge(RUN, "gen-a", counter("gauge", [3.0, 7.0], last_ns=t + 5_000))
    buckets.merge(RUN, "gen-b", counter("gauge", [2.0, 4.0], last_ns=t + 1_000))
    (state,) = [entry.state for entry in buckets.entries.values()]
    assert counter_values(state)["value"] == 11.0

    # An older sample from gen-a arriving later must not replace its newer one.
    buckets.merge(RUN, "gen-a", counter("gauge", [50.0], last_ns=t + 4_999))
    assert counter_values(state)["value"] == 11.0

    # A newer one does.
    buckets.merge(RUN, "gen-a", counter("gauge", [1.0], last_ns=t + 9_000))
    assert counter_values(state)["value"] == 5.0

    # A third producer adds its own latest value.
    buckets.merge(RUN, "gen-c", counter("gauge", [10.0], last_ns=t))
    out = counter_values(state)
    assert out["value"] == 15.0
    # min/max/count/nonzero/sum are over every sample, regardless of time.
    assert (out["count"], out["nonzero"], out["min"], out["max"]) == (7, 7, 1.0, 50.0)
    assert orjson.loads(out["state"])["sum"] == 77.0


def test_gauge_first_partial_older_than_second() -> None:
    aggregator = CounterAggregator()
    state = aggregator.new_state(counter("gauge", [9.0], last_ns=200), "p")
    aggregator.add(state, counter("gauge", [4.0], last_ns=100), "p")
    assert counter_values(state)["value"] == 9.0


def test_counter_stored_round_trip_and_late_absorb() -> None:
    aggregator = CounterAggregator()
    written = aggregator.new_state(counter("counter", [1.0] * 40), "a")
    aggregator.add(written, counter("counter", [0.5, 0.0]), "b")
    row = as_row(aggregator, aggregator.values(written))
    reread = aggregator.from_stored(row)
    assert aggregator.values(reread) == aggregator.values(written)

    merged = aggregator.from_stored(row)
    aggregator.absorb(merged, aggregator.new_state(counter("counter", [3.0, -1.0]), "c"))
    out = counter_values(merged)
    assert out["value"] == 42.5
    assert (out["count"], out["nonzero"], out["min"], out["max"]) == (44, 43, -1.0, 3.0)


def test_rate_stored_round_trip_and_late_absorb() -> None:
    aggregator = CounterAggregator()
    written = aggregator.new_state(counter("rate", [1, 1, 0, 0]), "a")
    row = as_row(aggregator, aggregator.values(written))
    merged = aggregator.from_stored(row)
    aggregator.absorb(merged, aggregator.new_state(counter("rate", [1, 1, 1, 0, 0, 0]), "b"))
    out = counter_values(merged)
    assert out["value"] == 5 / 10
    assert (out["count"], out["nonzero"]) == (10, 5)


def test_gauge_stored_round_trip_and_late_absorb() -> None:
    aggregator = CounterAggregator()
    written = aggregator.new_state(counter("gauge", [5.0, 7.0], last_ns=1_000), "gen-a")
    aggregator.add(written, counter("gauge", [3.0], last_ns=2_000), "gen-b")
    row = as_row(aggregator, aggregator.values(written))
    assert isinstance(row, CounterRow)
    assert row.value == 10.0  # the stored value column: 7 + 3
    # The stored state must carry the exact sample sum (15), not the gauge value (10).
    reread = aggregator.from_stored(row)
    assert aggregator.values(reread) == aggregator.values(written)

    merged = aggregator.from_stored(row)
    late = aggregator.new_state(counter("gauge", [100.0], last_ns=999), "gen-a")  # older
    aggregator.add(late, counter("gauge", [6.0], last_ns=2_500), "gen-b")  # newer
    aggregator.add(late, counter("gauge", [1.0], last_ns=10), "gen-c")  # new producer
    aggregator.absorb(merged, late)
    out = counter_values(merged)
    assert out["value"] == 7.0 + 6.0 + 1.0
    assert (out["count"], out["min"], out["max"]) == (6, 1.0, 100.0)
    assert orjson.loads(out["state"])["sum"] == 15.0 + 107.0

    # And once more through storage: the per-producer times survive.
    again = aggregator.from_stored(as_row(aggregator, aggregator.values(merged)))
    aggregator.absorb(again, aggregator.new_state(counter("gauge", [0.0], last_ns=2_499),
                                                  "gen-b"))
    assert counter_values(again)["value"] == 14.0


def test_counter_state_json_is_stable_for_counters() -> None:
    aggregator = CounterAggregator()
    out = counter_values(aggregator.new_state(counter("counter", [2.0, 3.0]), "a"))
    assert orjson.loads(out["state"]) == {"sum": 5.0}


# --- closing ---------------------------------------------------------------------


@pytest.mark.parametrize(("width", "grace"), [(10, 5.0), (1, 0.0), (60, 2.5)])
def test_take_closable(width: int, grace: float) -> None:
    buckets: OpenBuckets[CounterPartial, CounterState] = OpenBuckets(CounterAggregator(), width)
    base = 1_699_999_980  # a multiple of 1, 10 and 60
    starts = [base + i * width for i in range(6)]
    for start in starts:
        buckets.merge(RUN, "p", counter("counter", [1.0], bucket=start)._replace(
            bucket_seconds=width))
    # Walk the clock forward in small steps; a bucket must leave exactly when
    # start + width + grace <= now, and never earlier.
    remaining = set(starts)
    now = base - 1.0
    while now < base + 8 * width + grace:
        closed = buckets.take_closable(now, grace)
        for key in closed:
            assert key[3] + width + grace <= now, (key[3], now)
            remaining.discard(key[3])
        for key in buckets.entries:
            assert key[3] + width + grace > now, (key[3], now)
        now += 0.25
    assert remaining == set()
    assert len(buckets) == 0


def test_take_closable_boundary_and_take_all() -> None:
    buckets: OpenBuckets[TrendPartial, TrendState] = OpenBuckets(TrendAggregator(), W)
    for offset in (0, 10, 20):
        buckets.merge(RUN, "p", trend([1.0], bucket=B + offset))
    assert buckets.take_closable(B + 14.999, 5.0) == {}
    closed = buckets.take_closable(B + 15.0, 5.0)
    assert [k[3] for k in closed] == [B]
    assert closed[(RUN, "http_req_duration", (("name", "home"),), B)].state.count == 1
    assert sorted(k[3] for k in buckets.entries) == [B + 10, B + 20]
    everything = buckets.take_all()
    assert sorted(k[3] for k in everything) == [B + 10, B + 20]
    assert len(buckets) == 0
    assert buckets.take_closable(B + 1_000_000, 0.0) == {}


def _item(values: np.ndarray, blob: bytes) -> list[Any]:
    return ["http_req_duration", {"name": "a"}, 1_700_000_000, 10, len(values),
            math.fsum(values), float(values.min()), float(values.max()), blob, 0]


def test_a_row_of_one_partial_stores_the_sketch_as_received() -> None:
    """A row made of one partial stores the received sketch bytes without encoding them
    again, even an encoding this release would not make (counts as 64-bit with small
    values); its figures are those of the decoded sketch. Merged rows are encoded anew,
    and a t-digest of an earlier release is bucketed."""
    agg = TrendAggregator()
    rng = np.random.default_rng(31)
    values = rng.lognormal(3, 1, 4000)
    canonical = digest.encode(digest.from_values(values))
    header = digest._HEADER
    _, version, _, n_neg, n_pos, zeros = header.unpack_from(canonical)
    n = n_neg + n_pos
    indices = canonical[header.size:header.size + 4 * n]
    counts = np.frombuffer(canonical, "<u4", n, header.size + 4 * n).astype("<u8").tobytes()
    wide = header.pack(b"\xd5\x6b", version, 1, n_neg, n_pos, zeros) + indices + counts
    wide += b"\0" if len(wide) % 16 == 0 else b""
    assert wide != canonical
    for blob in (canonical, wide):
        partial = parse_trend_item(_item(values, blob), Limits())
        row = agg.values(agg.new_state(partial, "p"))
        assert row.digest == blob
        assert np.array_equal(digest.decode(row.digest), digest.decode(canonical))
        assert row.count == len(values)
        assert quantile_ok(values, 0.95, row.p95)
    # Two partials merged: encoded anew, the same bytes as encoding the merged sketch.
    more = rng.lognormal(3, 1, 1000)
    state = agg.new_state(parse_trend_item(_item(values, wide), Limits()), "p")
    agg.add(state, parse_trend_item(_item(more, digest.encode(digest.from_values(more))),
                                    Limits()), "p")
    merged = agg.values(state)
    everything = np.concatenate([values, more])
    assert merged.digest == digest.encode(digest.from_values(everything))
    assert quantile_ok(everything, 0.99, merged.p99)
    # A t-digest (mean, weight) pairs of an earlier release: stored as a sketch.
    pairs = np.column_stack([np.sort(values)[::40], np.full(100, 40.0)])
    legacy = parse_trend_item(_item(values, pairs.astype("<f8").tobytes()), Limits())
    assert legacy.sketch == b""
    stored = agg.values(agg.new_state(legacy, "p")).digest
    assert digest.encodes_sketch(stored)
