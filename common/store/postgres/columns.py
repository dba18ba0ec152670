"""Typed rows to and from the PostgreSQL tables' columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from common.store.rows import COUNTER, TREND, CounterRow, TrendRow, Values

TABLES = {TREND: "trend_buckets", COUNTER: "counter_buckets"}

# Written, in order, after the key columns and bucket_seconds.
WRITTEN = {
    TREND: ("count", "sum", "min", "max", "mean", "p50", "p90", "p95", "p99", "digest",
            "zeros", "sum_rest"),
    COUNTER: ("metric_type", "value", "count", "nonzero", "min", "max", "state"),
}
# The SQL types of the written columns (the bulk load's staging table).
TYPES = {
    "count": "bigint", "sum": "float8", "min": "float8", "max": "float8", "mean": "float8",
    "p50": "float8", "p90": "float8", "p95": "float8", "p99": "float8", "digest": "bytea",
    "zeros": "bigint", "sum_rest": "float8[]", "metric_type": "text", "value": "float8",
    "nonzero": "bigint", "state": "text",
}

# Read back to rebuild a row's values.
READ = {
    TREND: ("count", "sum", "min", "max", "zeros", "digest", "sum_rest", "p50", "p90", "p95",
            "p99"),
    COUNTER: ("metric_type", "value", "count", "nonzero", "min", "max", "state::text"),
}


def table_of(role: str) -> str:
    return TREND if role == "td" else COUNTER


def written(values: Values) -> tuple[Any, ...]:
    if isinstance(values, TrendRow):
        v = values
        return (v.count, v.sum, v.min, v.max, v.mean, v.p50, v.p90, v.p95, v.p99, v.digest,
                v.zeros, list(v.sum_rest) or None)
    extra: dict[str, Any] = {"sum": values.sum}
    if values.sum_rest:
        extra["sum_rest"] = list(values.sum_rest)
    if values.gauge_last is not None:
        extra["gauge_last"] = values.gauge_last
    return (values.metric_type, values.value, values.count, values.nonzero, values.min,
            values.max, orjson.dumps(extra).decode())


def trend_values(count: int, total: float, lo: float, hi: float, zeros: int, blob: bytes,
                 rest: Sequence[float] | None, p50: float | None = None,
                 p90: float | None = None, p95: float | None = None,
                 p99: float | None = None) -> TrendRow:
    return TrendRow(count, total, lo, hi, zeros, bytes(blob), tuple(rest or ()), p50, p90,
                    p95, p99)


def counter_values(kind: str, value: float, count: int, nonzero: int, lo: float, hi: float,
                   state: str | None) -> CounterRow:
    extra = orjson.loads(state) if state else {}
    gauge_last = extra.get("gauge_last")
    # Rows before the exact sum was kept in state hold only value (a counter's sum).
    return CounterRow(kind, value, count, nonzero, lo, hi, extra.get("sum", value),
                      tuple(extra.get("sum_rest", ())),
                      gauge_last if isinstance(gauge_last, dict) else None)


def read(table: str, columns: Sequence[Any]) -> Values:
    if table == TREND:
        return trend_values(*columns)
    return counter_values(*columns)
