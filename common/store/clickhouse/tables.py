"""The ClickHouse tables and SQL, shared by the server backend (``clickhouse://``) and the
in-process engine (``chdb://``): the DDL, literals, and typed rows to and from columns.

Bucket rows are never updated in place. Each write inserts a new version of a row, and
the tables are ReplacingMergeTree(wal_pos) ordered by the row key (run_id, metric,
bucket, tags): a merge, and every read with FINAL, keeps one version per key, the one
with the highest write-ahead-log position (the last inserted among equal ones). A write
reads the stored version of the batch's keys first, so that late data is merged into it
and a retried write whose first attempt went through is skipped (common/store/base.py).

Tags are stored three ways: ``tags``, the canonical JSON text (sorted keys, as the
PostgreSQL backend's), which is the key column; and ``tag_keys`` / ``tag_values``, the
same pairs as arrays, for filters in SQL on any ClickHouse version
(``tag_values[indexOf(tag_keys, 'name')] = 'checkout'``).

A trend row's sketch is stored decoded: ``sketch_values`` (each bucket's representative
value, negative buckets first, increasing, exactly the doubles common/digest.py uses)
and ``sketch_counts``, so that SQL merges sketches with sumMap and reads percentiles from
them (docs/CLICKHOUSE.md). The binary digest is rebuilt from them on read
(digest.encode, which gives back the same bytes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from common import digest
from common.store.base import RowsRefused
from common.store.rows import COUNTER, TREND, BucketKey, CounterRow, TrendRow, Values

TABLES = {TREND: "trend_buckets", COUNTER: "counter_buckets"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Key text beyond these is refused (RowsRefused: the server quarantines only that row).
# The servers already shorten tag values to 256 characters and names to 200; the limits
# keep the primary index, which holds key values, small whatever a client sends.
MAX_TEXT = 4096  # characters of a run id, metric, tag key or tag value
MAX_TAGS_JSON = 65536  # characters of a row's tags as JSON

_KEY_COLUMNS = ("run_id", "metric", "bucket", "tags", "tag_keys", "tag_values",
                "bucket_seconds")
# The value columns each table writes and reads back, in order.
VALUE_COLUMNS = {
    TREND: ("count", "sum", "sum_rest", "min", "max", "mean", "zeros", "p50", "p90", "p95",
            "p99", "sketch_values", "sketch_counts"),
    COUNTER: ("metric_type", "value", "count", "nonzero", "min", "max", "sum", "sum_rest",
              "gauge_last"),
}
INSERT_COLUMNS = {kind: (*_KEY_COLUMNS, *VALUE_COLUMNS[kind], "wal_pos") for kind in TABLES}

_BUCKET_TABLE = """
CREATE TABLE IF NOT EXISTS {db}.{table} (
    run_id          String,
    metric          String,
    bucket          DateTime('UTC'),
    tags            String,
    tag_keys        Array(String),
    tag_values      Array(String),
    bucket_seconds  UInt32,
    {columns},
    wal_pos         UInt64
) ENGINE = ReplacingMergeTree(wal_pos)
PARTITION BY toYYYYMM(bucket)
ORDER BY (run_id, metric, bucket, tags)
"""
_TREND_COLUMNS = """count UInt64,
    sum Float64,
    sum_rest Array(Float64),
    min Float64,
    max Float64,
    mean Float64,
    zeros UInt64,
    p50 Nullable(Float64),
    p90 Nullable(Float64),
    p95 Nullable(Float64),
    p99 Nullable(Float64),
    sketch_values Array(Float64),
    sketch_counts Array(UInt64)"""
_COUNTER_COLUMNS = """metric_type String,
    value Float64,
    count UInt64,
    nonzero UInt64,
    min Float64,
    max Float64,
    sum Float64,
    sum_rest Array(Float64),
    gauge_last String"""

# Append-only: each record_generators / mark_written call adds a row; readers take per
# field the latest value that is not NULL (written_at fields: the first).
GENERATOR_FIELDS = ("host", "k6_version", "script", "started_at", "ended_at", "exit_status",
                    "first_sample", "last_sample", "samples", "units")
_GENERATORS = """
CREATE TABLE IF NOT EXISTS {db}.generators (
    run_id             String,
    producer           String,
    version            UInt64,
    host               Nullable(String),
    k6_version         Nullable(String),
    script             Nullable(String),
    started_at         Nullable(Float64),
    ended_at           Nullable(Float64),
    exit_status        Nullable(Int64),
    first_sample       Nullable(Float64),
    last_sample        Nullable(Float64),
    samples            Nullable(Int64),
    units              Nullable(String),
    td_written_at      Nullable(Float64),
    non_td_written_at  Nullable(Float64)
) ENGINE = MergeTree ORDER BY (run_id, producer, version)
"""
_RUN_INPUTS = """
CREATE TABLE IF NOT EXISTS {db}.run_inputs (
    run_id      String,
    role        String,
    input       String,
    producer    String,
    first_seen  Float64
) ENGINE = MergeTree ORDER BY (run_id, role, input, first_seen)
"""
EVALUATION_COLUMNS = ("run_id", "role", "threshold", "evaluated_at_us", "through_us", "final",
                      "verdict", "ok", "decided", "observed", "samples", "rank_low",
                      "rank_high", "abort_on_fail", "note")
_EVALUATIONS = """
CREATE TABLE IF NOT EXISTS {db}.threshold_evaluations (
    run_id           String,
    role             String,
    threshold        String,
    evaluated_at_us  Int64,
    through_us       Nullable(Int64),
    final            UInt8,
    verdict          String,
    ok               UInt8,
    decided          UInt8,
    observed         Nullable(Float64),
    samples          Nullable(Int64),
    rank_low         Nullable(Float64),
    rank_high        Nullable(Float64),
    abort_on_fail    UInt8,
    note             Nullable(String)
) ENGINE = MergeTree ORDER BY (run_id, evaluated_at_us)
"""


def schema(db: str) -> list[str]:
    """The statements that create the database and its tables (idempotent)."""
    name = identifier(db)
    return [
        f"CREATE DATABASE IF NOT EXISTS {name}",
        _BUCKET_TABLE.format(db=name, table="trend_buckets", columns=_TREND_COLUMNS),
        _BUCKET_TABLE.format(db=name, table="counter_buckets", columns=_COUNTER_COLUMNS),
        _GENERATORS.format(db=name),
        _RUN_INPUTS.format(db=name),
        _EVALUATIONS.format(db=name),
    ]


# --- literals --------------------------------------------------------------------------


def identifier(name: str) -> str:
    """A database name as SQL: letters, digits and _ only, so it needs no quoting."""
    if not name or not name.replace("_", "").isalnum() or not name.isascii():
        raise ValueError(f"ClickHouse database name {name!r}: letters, digits and _ only")
    return name


def string(text: str) -> str:
    """A ClickHouse string literal (any text without NUL)."""
    out = ["'"]
    for char in text:
        if char in "\\'":
            out.append("\\" + char)
        elif ord(char) < 0x20:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    out.append("'")
    return "".join(out)


def number(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(float(value))


def literal(value: Any) -> str:
    """Any value of a row as a ClickHouse literal (VALUES of the in-process engine)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return number(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    raise TypeError(f"no ClickHouse literal for {type(value).__name__}")


def strings(values: Iterable[str]) -> str:
    return "(" + ", ".join(string(v) for v in values) + ")"


def tags_json(tags: tuple[tuple[str, str], ...]) -> str:
    return orjson.dumps(dict(tags), option=orjson.OPT_SORT_KEYS).decode()


def tag_filter(where: Iterable[tuple[str, str]]) -> str:
    """Conditions for rows whose tags include every (key, value) pair."""
    return "".join(f" AND has(tag_keys, {string(k)})"
                   f" AND tag_values[indexOf(tag_keys, {string(k)})] = {string(v)}"
                   for k, v in where)


# --- rows to and from columns ---------------------------------------------------------


def check_key(key: BucketKey) -> None:
    """RowsRefused for a key the tables must not hold: text with a NUL character (which
    the PostgreSQL backend cannot store either, and which the servers refuse already), or
    text longer than the limits above."""
    run_id, metric, tags, _ = key
    texts = [("run id", run_id), ("metric", metric)]
    texts += [(f"tag {k!r}", v) for k, v in tags] + [("tag name", k) for k, _ in tags]
    for what, text in texts:
        if "\x00" in text:
            raise RowsRefused(f"{what} {text[:60]!r} holds a NUL character (U+0000)")
        if len(text) > MAX_TEXT:
            raise RowsRefused(f"{what} of {len(text)} characters is over the limit of "
                              f"{MAX_TEXT}: {text[:60]!r}...")
    if sum(len(k) + len(v) for k, v in tags) > MAX_TAGS_JSON:
        raise RowsRefused(f"tags of {len(tags)} pairs are over {MAX_TAGS_JSON} characters")


def _sketch_columns(blob: bytes) -> tuple[list[float], list[int]]:
    centroids = digest.decode(blob)
    if len(centroids) and not digest.is_sketch(centroids):
        centroids = digest.decode(digest.encode(centroids))  # a t-digest: bucket it
    return centroids[:, 0].tolist(), np.rint(centroids[:, 1]).astype(np.uint64).tolist()


def _optional(value: float | None) -> float | None:
    return None if value is None else float(value)


def value_columns(values: Values) -> tuple[Any, ...]:
    """A row's value columns (VALUE_COLUMNS order)."""
    if isinstance(values, TrendRow):
        v = values
        sketch_values, sketch_counts = _sketch_columns(v.digest)
        return (int(v.count), float(v.sum), [float(x) for x in v.sum_rest], float(v.min),
                float(v.max), float(v.mean), int(v.zeros), _optional(v.p50),
                _optional(v.p90), _optional(v.p95), _optional(v.p99), sketch_values,
                sketch_counts)
    gauge = "" if values.gauge_last is None else orjson.dumps(values.gauge_last).decode()
    return (values.metric_type, float(values.value), int(values.count), int(values.nonzero),
            float(values.min), float(values.max), float(values.sum),
            [float(x) for x in values.sum_rest], gauge)


def row_columns(key: BucketKey, bucket_seconds: int, values: Values,
                wal_pos: int) -> tuple[Any, ...]:
    """A whole row to insert (INSERT_COLUMNS order)."""
    run_id, metric, tags, bucket = key
    return (run_id, metric, bucket, tags_json(tags), [k for k, _ in tags],
            [v for _, v in tags], bucket_seconds, *value_columns(values), wal_pos)


def _maybe(value: Any) -> float | None:
    return None if value is None else float(value)


def read_values(kind: str, columns: Sequence[Any]) -> Values:
    """A row's values from its value columns as read (VALUE_COLUMNS order); floats and
    ints may come as the engine's JSON gives them ("inf", "nan" as text)."""
    if kind == TREND:
        (count, total, rest, lo, hi, _mean, zeros, p50, p90, p95, p99, sketch_values,
         sketch_counts) = columns
        centroids = np.column_stack([np.asarray(sketch_values, dtype=np.float64),
                                     np.asarray(sketch_counts, dtype=np.float64)])
        return TrendRow(int(count), float(total), float(lo), float(hi), int(zeros),
                        digest.encode(centroids) if len(centroids) else b"",
                        tuple(float(x) for x in rest), _maybe(p50), _maybe(p90),
                        _maybe(p95), _maybe(p99))
    metric_type, value, count, nonzero, lo, hi, total, rest, gauge = columns
    gauge_last = orjson.loads(gauge) if gauge else None
    return CounterRow(str(metric_type), float(value), int(count), int(nonzero), float(lo),
                      float(hi), float(total), tuple(float(x) for x in rest),
                      gauge_last if isinstance(gauge_last, dict) else None)


def tags_key(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(orjson.loads(text).items()))


def micros(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // _MICROSECOND


def from_micros(value: Any) -> datetime:
    return EPOCH + int(value) * _MICROSECOND


_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - EPOCH


def json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
