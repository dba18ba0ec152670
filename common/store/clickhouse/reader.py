"""The read side on ClickHouse: every bucket-table read takes the current version of each
row (FINAL); filters are on key columns only (run_id, metric, bucket, tags and what is
derived from them), which every version of a row shares.

ClickHouse has no snapshots: each query sees every insert completed before it began, so
a view is consistent per query, not across queries (a server writing meanwhile may add
rows between two of them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from common.store.base import SchemaMissing, StoreView
from common.store.clickhouse import tables
from common.store.rows import (
    COUNTER,
    TREND,
    Evaluation,
    Extent,
    GeneratorInfo,
    MetricTotals,
    RunInfo,
    Series,
    StoredRow,
)

if TYPE_CHECKING:
    from common.store.clickhouse import ClickHouseStore


def _when(seconds: Any) -> datetime:
    return datetime.fromtimestamp(int(seconds), UTC)


def _window(run_id: str, start: datetime | None, end: datetime | None) -> str:
    condition = f"run_id = {tables.string(run_id)}"
    if start is not None:
        condition += f" AND toUInt32(bucket) + bucket_seconds > {tables.number(start.timestamp())}"
    if end is not None:
        condition += f" AND toUInt32(bucket) < {tables.number(end.timestamp())}"
    return condition


def _optional(value: Any, kind: type) -> Any:
    return None if value is None else kind(value)


class ChView(StoreView):
    def __init__(self, store: ClickHouseStore) -> None:
        self.store = store
        self.engine = store.engine
        self.trend = store.table("trend_buckets")
        self.counter = store.table("counter_buckets")

    async def _query(self, sql: str) -> list[tuple[Any, ...]]:
        return await self.engine.query(sql)

    async def runs(self) -> list[RunInfo]:
        rows = await self._query(
            "SELECT run_id, min(first), max(last) FROM ("
            f" SELECT run_id, toUInt32(min(bucket)) AS first, toUInt32(max(bucket)) AS last"
            f" FROM {self.trend} GROUP BY run_id UNION ALL"
            f" SELECT run_id, toUInt32(min(bucket)) AS first, toUInt32(max(bucket)) AS last"
            f" FROM {self.counter} GROUP BY run_id) GROUP BY run_id")
        runs = [RunInfo(r[0], _when(r[1]), _when(r[2])) for r in rows]
        return sorted(runs, key=lambda r: (-r.last.timestamp(), r.run_id))

    async def series(self, run_id: str) -> list[Series]:
        run = tables.string(run_id)
        rows = await self._query(
            f"SELECT metric, 'trend', tags FROM {self.trend} WHERE run_id = {run}"
            " GROUP BY metric, tags UNION ALL"
            f" SELECT metric, min(metric_type), tags FROM {self.counter} WHERE run_id = {run}"
            " GROUP BY metric, tags")
        return [Series(r[0], r[1], orjson.loads(r[2])) for r in rows]

    async def extent(self, run_id: str, start: datetime | None, end: datetime | None
                     ) -> Extent | None:
        where = _window(run_id, start, end)
        rows = await self._query(
            "SELECT count(), min(b), max(b + s), uniqExact(b), groupUniqArray(s) FROM ("
            f" SELECT toUInt32(bucket) AS b, bucket_seconds AS s FROM {self.trend}"
            f" WHERE {where} UNION ALL"
            f" SELECT toUInt32(bucket) AS b, bucket_seconds AS s FROM {self.counter}"
            f" WHERE {where})")
        if not rows or not int(rows[0][0]):
            return None
        _, first, last, buckets, widths = rows[0]
        return Extent(float(first), float(last), int(buckets),
                      tuple(sorted(int(w) for w in widths)))

    async def _gauges(self, where: str) -> list[tuple[Any, ...]]:
        return await self._query(
            f"SELECT toUInt32(bucket), bucket_seconds, gauge_last FROM {self.counter} FINAL"
            f" WHERE {where} AND metric_type = 'gauge'")

    async def last_sample(self, run_id: str) -> tuple[float, float] | None:
        run = tables.string(run_id)
        rows = await self._query(
            "SELECT count(), max(b) FROM ("
            f" SELECT toUInt32(bucket) AS b FROM {self.trend} WHERE run_id = {run} UNION ALL"
            f" SELECT toUInt32(bucket) AS b FROM {self.counter} WHERE run_id = {run})")
        if not rows or not int(rows[0][0]):
            return None
        last = int(rows[0][1])
        ends, samples = [], []
        for bucket, seconds, gauge in await self._gauges(
                f"run_id = {run} AND bucket = toDateTime({last})"):
            found = orjson.loads(gauge) if gauge else None
            if isinstance(found, dict) and found:
                ends.append(int(bucket) + int(seconds))
                samples += [float(seen[0]) for seen in found.values()]
        if not samples:
            return None
        return float(max(ends)), max(samples) / 1e9

    async def gauge_producers(self, run_id: str, start: datetime | None,
                              end: datetime | None) -> set[str]:
        producers: set[str] = set()
        for _, _, gauge in await self._gauges(_window(run_id, start, end)):
            found = orjson.loads(gauge) if gauge else None
            if isinstance(found, dict):
                producers.update(found)
        return producers

    async def generators(self, run_id: str) -> list[GeneratorInfo] | None:
        try:
            rows = await self._query(
                f"SELECT producer, {', '.join(tables.GENERATOR_FIELDS)}, td_written_at,"
                f" non_td_written_at FROM {self.store.table('generators')}"
                f" WHERE run_id = {tables.string(run_id)} ORDER BY version")
        except SchemaMissing:
            return None
        merged: dict[str, dict[str, Any]] = {}
        names = (*tables.GENERATOR_FIELDS, "td_written_at", "non_td_written_at")
        for row in rows:
            fields = merged.setdefault(row[0], {"producer": row[0]})
            for name, value in zip(names, row[1:], strict=True):
                if value is None:
                    continue
                if name.endswith("written_at"):  # the first time is kept
                    fields.setdefault(name, float(value))
                else:  # the latest value known
                    fields[name] = value
        infos = []
        for fields in merged.values():
            for name in ("started_at", "ended_at", "first_sample", "last_sample"):
                fields[name] = _optional(fields.get(name), float)
            for name in ("exit_status", "samples"):
                fields[name] = _optional(fields.get(name), int)
            units = fields.pop("units", None)
            infos.append(GeneratorInfo(**fields, units=orjson.loads(units) if units else None))

        def order(g: GeneratorInfo) -> tuple[Any, ...]:
            return (g.started_at is None, g.started_at or 0.0, g.first_sample is None,
                    g.first_sample or 0.0, g.host is None, g.host or "", g.producer)
        return sorted(infos, key=order)

    async def rows(self, table: str, run_id: str, start: datetime | None,
                   end: datetime | None, where: Mapping[str, str],
                   metrics: Sequence[str] | None = None) -> AsyncIterator[StoredRow]:
        name = self.trend if table == TREND else self.counter
        condition = _window(run_id, start, end) + tables.tag_filter(sorted(where.items()))
        if metrics is None:
            found = await self._query(
                f"SELECT DISTINCT metric FROM {name} WHERE {condition} ORDER BY metric")
            selected = [str(r[0]) for r in found]
        else:
            selected = sorted(set(metrics))
        columns = ", ".join(tables.VALUE_COLUMNS[TREND if table == TREND else COUNTER])
        tag_cache: dict[str, dict[str, str]] = {}
        for metric in selected:  # one metric at a time: memory stays one metric's rows
            rows = await self._query(
                f"SELECT tags, toUInt32(bucket), bucket_seconds, {columns} FROM {name} FINAL"
                f" WHERE {condition} AND metric = {tables.string(metric)} ORDER BY bucket")
            for row in rows:
                tags = tag_cache.get(row[0])
                if tags is None:
                    tags = tag_cache[row[0]] = orjson.loads(row[0])
                yield StoredRow(metric, tags, float(row[1]), int(row[2]),
                                tables.read_values(table, row[3:]))

    async def row_keys(self, run_id: str) -> set[tuple[str, int]]:
        run = tables.string(run_id)
        rows = await self._query(
            f"SELECT DISTINCT metric, toUInt32(bucket) FROM {self.trend} WHERE run_id = {run}"
            f" UNION ALL SELECT DISTINCT metric, toUInt32(bucket) FROM {self.counter}"
            f" WHERE run_id = {run}")
        return {(str(r[0]), int(r[1])) for r in rows}

    async def totals(self, run_id: str) -> list[MetricTotals]:
        run = tables.string(run_id)
        rows = await self._query(
            "SELECT metric, 'trend', count(), sum(count), sum(sum), toInt64(sum(count - zeros))"
            f" FROM {self.trend} FINAL WHERE run_id = {run} GROUP BY metric UNION ALL"
            " SELECT metric, min(metric_type), count(), sum(count), sum(sum), toInt64(sum(nonzero))"
            f" FROM {self.counter} FINAL WHERE run_id = {run} GROUP BY metric")
        return [MetricTotals(str(r[0]), str(r[1]), int(r[2]), int(r[3] or 0),
                             float(r[4] or 0.0), int(r[5] or 0)) for r in rows]

    async def evaluations(self, run_id: str) -> list[Evaluation]:
        rows = await self._query(
            f"SELECT {', '.join(tables.EVALUATION_COLUMNS)} FROM"
            f" {self.store.table('threshold_evaluations')}"
            f" WHERE run_id = {tables.string(run_id)}")
        found = []
        for r in rows:
            (run, role, threshold, evaluated, through, final, verdict, ok, decided, observed,
             samples, rank_low, rank_high, abort_on_fail, note) = r
            found.append(Evaluation(
                run, role, threshold, tables.from_micros(evaluated),
                None if through is None else tables.from_micros(through), bool(int(final)),
                verdict, bool(int(ok)), bool(int(decided)), _optional(observed, float),
                _optional(samples, int), _optional(rank_low, float),
                _optional(rank_high, float), bool(int(abort_on_fail)), note))
        return sorted(found, key=lambda e: (e.evaluated_at, e.role, e.threshold))

