"""The read side on one PostgreSQL connection inside a repeatable-read transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from common.store.base import StoreView
from common.store.postgres import columns
from common.store.postgres.errors import translated
from common.store.rows import (
    TREND,
    Evaluation,
    Extent,
    GeneratorInfo,
    MergedTrend,
    MetricTotals,
    RunInfo,
    Series,
    StoredRow,
)

_SERIES = """
SELECT metric, 'trend' AS kind, tags::text AS tags
FROM trend_buckets WHERE run_id = $1 GROUP BY metric, tags
UNION ALL
SELECT metric, min(metric_type), tags::text
FROM counter_buckets WHERE run_id = $1 GROUP BY metric, tags
"""

_RUNS = """
SELECT run_id, min(first) AS first, max(last) AS last FROM (
    SELECT run_id, min(bucket) AS first, max(bucket) AS last FROM trend_buckets GROUP BY run_id
    UNION ALL
    SELECT run_id, min(bucket), max(bucket) FROM counter_buckets GROUP BY run_id
) AS runs GROUP BY run_id ORDER BY last DESC, run_id
"""


def _epoch(column: str) -> str:
    return f"extract(epoch FROM {column})::float8 AS {column}"


_GENERATORS = (
    "SELECT producer, host, k6_version, script, "
    + ", ".join(_epoch(c) for c in ("started_at", "ended_at"))
    + ", exit_status, "
    + ", ".join(_epoch(c) for c in ("first_sample", "last_sample"))
    + ", samples, "
    + ", ".join(_epoch(c) for c in ("td_written_at", "non_td_written_at"))
    + ", units::text AS units FROM generators WHERE run_id = $1"
    " ORDER BY started_at NULLS LAST, first_sample NULLS LAST, host NULLS LAST, producer")

_ROW_KEYS = """
SELECT metric, extract(epoch FROM bucket)::bigint AS bucket FROM trend_buckets
 WHERE run_id = $1
UNION
SELECT metric, extract(epoch FROM bucket)::bigint FROM counter_buckets WHERE run_id = $1
"""
# state->>'sum' is the exact sample sum for every kind (value is nonzero/count for rates
# and the sum of last values for gauges).
_TOTALS = """
SELECT metric, 'trend' AS kind, count(*) AS rows, sum(count)::bigint AS count,
       sum(sum) AS total, sum(count - zeros)::bigint AS nonzero
  FROM trend_buckets WHERE run_id = $1 GROUP BY metric
UNION ALL
SELECT metric, min(metric_type), count(*), sum(count)::bigint,
       sum(coalesce((state->>'sum')::float8, value)), sum(nonzero)::bigint
  FROM counter_buckets WHERE run_id = $1 GROUP BY metric
"""
_EVALUATIONS = """
SELECT run_id, role, threshold, evaluated_at, through, final, verdict, ok, decided,
       observed, samples, rank_low, rank_high, abort_on_fail, note
  FROM threshold_evaluations WHERE run_id = $1 ORDER BY evaluated_at, role, threshold
"""


def _conditions(run_id: str, start: datetime | None, end: datetime | None,
                where: Mapping[str, str]) -> tuple[str, list[Any]]:
    conditions = ["run_id = $1"]
    args: list[Any] = [run_id]
    if start is not None:
        args.append(start)
        conditions.append(f"bucket + bucket_seconds * interval '1 second' > ${len(args)}")
    if end is not None:
        args.append(end)
        conditions.append(f"bucket < ${len(args)}")
    if where:
        args.append(orjson.dumps(dict(where)).decode())
        conditions.append(f"tags @> ${len(args)}::jsonb")
    return " AND ".join(conditions), args


class PgView(StoreView):
    """Queries on one connection, in the caller's transaction."""

    def __init__(self, conn: asyncpg.Connection, label: str) -> None:
        self.conn = conn
        self.label = label

    async def series(self, run_id: str) -> list[Series]:
        with translated(self.label):
            rows = await self.conn.fetch(_SERIES, run_id)
        return [Series(r["metric"], r["kind"], orjson.loads(r["tags"])) for r in rows]

    async def runs(self) -> list[RunInfo]:
        with translated(self.label):
            rows = await self.conn.fetch(_RUNS)
        return [RunInfo(r["run_id"], r["first"], r["last"]) for r in rows]

    async def extent(self, run_id: str, start: datetime | None, end: datetime | None
                     ) -> Extent | None:
        condition, args = _conditions(run_id, start, end, {})
        with translated(self.label):
            row = await self.conn.fetchrow(
                "SELECT extract(epoch FROM min(bucket))::float8 AS first,"
                " extract(epoch FROM max(bucket + bucket_seconds * interval '1 second'))"
                "::float8 AS last, count(DISTINCT bucket) AS buckets,"
                " array_agg(DISTINCT bucket_seconds) AS widths FROM ("
                f" SELECT bucket, bucket_seconds FROM trend_buckets WHERE {condition} UNION ALL"
                f" SELECT bucket, bucket_seconds FROM counter_buckets WHERE {condition}) AS b",
                *args)
        if row is None or row["first"] is None:
            return None
        return Extent(row["first"], row["last"], row["buckets"], tuple(sorted(row["widths"])))

    async def last_sample(self, run_id: str) -> tuple[float, float] | None:
        with translated(self.label):
            row = await self.conn.fetchrow(
                "WITH last AS (SELECT max(bucket) AS bucket FROM ("
                " SELECT max(bucket) AS bucket FROM trend_buckets WHERE run_id = $1 UNION ALL"
                " SELECT max(bucket) FROM counter_buckets WHERE run_id = $1) AS b)"
                " SELECT extract(epoch FROM max(c.bucket + c.bucket_seconds"
                " * interval '1 second'))::float8 AS bucket_end,"
                " max((g.value->>0)::float8) / 1e9 AS sample"
                " FROM counter_buckets c JOIN last ON c.bucket = last.bucket,"
                " jsonb_each(c.state->'gauge_last') AS g"
                " WHERE c.run_id = $1 AND c.metric_type = 'gauge'"
                " AND jsonb_typeof(c.state->'gauge_last') = 'object'", run_id)
        if row is None or row["sample"] is None:
            return None
        return row["bucket_end"], row["sample"]

    async def gauge_producers(self, run_id: str, start: datetime | None,
                              end: datetime | None) -> set[str]:
        condition, args = _conditions(run_id, start, end, {})
        with translated(self.label):
            rows = await self.conn.fetch(
                "SELECT DISTINCT g.producer FROM counter_buckets,"
                " jsonb_object_keys(CASE WHEN jsonb_typeof(state->'gauge_last') = 'object'"
                " THEN state->'gauge_last' ELSE '{}'::jsonb END) AS g(producer)"
                f" WHERE metric_type = 'gauge' AND {condition}", *args)
        return {r["producer"] for r in rows}

    async def generators(self, run_id: str) -> list[GeneratorInfo] | None:
        with translated(self.label):
            if await self.conn.fetchval("SELECT to_regclass('generators') IS NULL"):
                return None
            rows = await self.conn.fetch(_GENERATORS, run_id)
        infos = []
        for r in rows:
            fields = dict(r)
            units = fields.pop("units")
            infos.append(GeneratorInfo(**fields,
                                       units=orjson.loads(units) if units else None))
        return infos

    async def rows(self, table: str, run_id: str, start: datetime | None,
                   end: datetime | None, where: Mapping[str, str],
                   metrics: Sequence[str] | None = None) -> AsyncIterator[StoredRow]:
        condition, args = _conditions(run_id, start, end, where)
        if metrics is not None:
            args.append(list(metrics))
            condition += f" AND metric = ANY(${len(args)}::text[])"
        sql = (f"SELECT metric, tags::text AS tags,"
               f" extract(epoch FROM bucket)::float8 AS bucket, bucket_seconds,"
               f" {', '.join(columns.READ[table])} FROM {columns.TABLES[table]}"
               f" WHERE {condition} ORDER BY metric, bucket")
        read = columns.trend_values if table == TREND else columns.counter_values
        tag_cache: dict[str, dict[str, str]] = {}
        with translated(self.label):
            async for row in self.conn.cursor(sql, *args, prefetch=2000):
                text = row[1]
                tags = tag_cache.get(text)
                if tags is None:
                    tags = tag_cache[text] = orjson.loads(text)
                yield StoredRow(row[0], tags, row[2], row[3], read(*tuple(row)[4:]))

    async def merged_trends(self, run_id: str, metric: str, start: datetime | None,
                            end: datetime | None, where: Mapping[str, str],
                            per_seconds: int | None = None) -> list[MergedTrend]:
        """One grouped query: each group's digests gathered by PostgreSQL."""
        condition, args = _conditions(run_id, start, end, where)
        args.append(metric)
        condition += f" AND metric = ${len(args)}"
        epoch = "extract(epoch FROM bucket)::float8"
        if per_seconds is None:
            group, at = "", f"min({epoch})"
        else:
            args.append(float(per_seconds))
            at = f"floor({epoch} / ${len(args)}) * ${len(args)}"
            group = " GROUP BY 1 ORDER BY 1"
        sql = (f"SELECT {at}, sum(count)::bigint, min(min), max(max), sum(zeros)::bigint, "
               f"array_agg(digest) FROM trend_buckets WHERE {condition}{group}")
        with translated(self.label):
            rows = await self.conn.fetch(sql, *args)
        return [MergedTrend(float(r[0]), int(r[1]), r[2], r[3], int(r[4]),
                            tuple(bytes(b) for b in r[5]))
                for r in rows if r[0] is not None]

    async def row_keys(self, run_id: str) -> set[tuple[str, int]]:
        with translated(self.label):
            rows = await self.conn.fetch(_ROW_KEYS, run_id)
        return {(r[0], int(r[1])) for r in rows}

    async def totals(self, run_id: str) -> list[MetricTotals]:
        with translated(self.label):
            rows = await self.conn.fetch(_TOTALS, run_id)
        return [MetricTotals(r["metric"], r["kind"], r["rows"], r["count"] or 0,
                             r["total"] or 0.0, r["nonzero"] or 0) for r in rows]

    async def evaluations(self, run_id: str) -> list[Evaluation]:
        with translated(self.label):
            rows = await self.conn.fetch(_EVALUATIONS, run_id)
        return [Evaluation(**dict(r)) for r in rows]
