"""An in-process store (``memory://NAME``) for tests and for trying the pipeline
without a database. Every store of one process with the same NAME shares its tables; they
are gone when the process ends.

Writes are atomic (no await inside one), so a snapshot is a copy of the tables' maps.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from common.store.base import BucketWriter, Store, StoreUnavailable, StoreView
from common.store.rows import (
    COUNTER,
    TREND,
    BucketKey,
    CounterRow,
    Evaluation,
    Extent,
    Footprint,
    GeneratorInfo,
    MetricTotals,
    Policies,
    RunInfo,
    Series,
    StoredRow,
    TrendRow,
    Values,
)

if TYPE_CHECKING:
    from common.aggregate import Aggregator, Entry
    from common.generators import GeneratorRow


@dataclass(slots=True)
class _Row:
    bucket_seconds: int
    values: Values
    positions: dict[str, int]  # each writer's last log position the row holds
    sources: dict[str, int] = field(default_factory=dict)  # stream -> highest seq held

    @property
    def position(self) -> int:
        return max(self.positions.values(), default=0)


@dataclass
class MemoryDatabase:
    tables: dict[str, dict[BucketKey, _Row]] = field(
        default_factory=lambda: {TREND: {}, COUNTER: {}})
    generators: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    inputs: dict[tuple[str, str, str], tuple[str, float]] = field(default_factory=dict)
    evaluations: list[Evaluation] = field(default_factory=list)
    schema: bool = False


_DATABASES: dict[str, MemoryDatabase] = {}
log = logging.getLogger("tdagg.store")


def database(name: str) -> MemoryDatabase:
    """The named in-process database (created empty on first use)."""
    return _DATABASES.setdefault(name, MemoryDatabase())


def forget(name: str) -> None:
    """Drop the named database (tests start from nothing)."""
    _DATABASES.pop(name, None)


def _copy(values: Values) -> Values:
    if isinstance(values, CounterRow) and values.gauge_last is not None:
        return replace(values, gauge_last=copy.deepcopy(values.gauge_last))
    return replace(values)


def _table_of(role: str) -> str:
    return TREND if role == "td" else COUNTER


class MemoryWriter(BucketWriter):
    def __init__(self, db: MemoryDatabase, aggregator: Aggregator[Any, Any],
                 bucket_seconds: int, writer_id: str = "") -> None:
        super().__init__(aggregator, bucket_seconds, writer_id)
        self.rows = db.tables[_table_of(aggregator.role)]

    async def write(self, entries: Mapping[BucketKey, Entry[Any]]) -> int:
        agg = self.aggregator
        new: dict[BucketKey, _Row] = {}
        late = 0
        for key, entry in entries.items():  # everything is computed before anything is kept
            stored = self.rows.get(key)
            positions = {} if stored is None else dict(stored.positions)
            if stored is not None and positions.get(self.writer_id, 0) >= entry.last_position > 0:
                continue  # written by an attempt whose outcome was unknown
            added, sources = self.contribution(key, entry,
                                               {} if stored is None else stored.sources)
            if added is None:
                continue  # the row holds all of it already
            if stored is None:
                values = agg.values(added)
            else:
                merged = agg.from_stored(_copy(stored.values))
                agg.absorb(merged, added)
                values = agg.values(merged)
                late += 1
            positions[self.writer_id] = max(entry.last_position,
                                            positions.get(self.writer_id, 0))
            new[key] = _Row(self.bucket_seconds, _copy(values), positions, sources)
        self.rows.update(new)
        return late

    async def stored_positions(self, keys: Sequence[BucketKey]) -> dict[BucketKey, int]:
        return {key: self.rows[key].positions.get(self.writer_id, 0)
                for key in keys if key in self.rows}

    async def max_position(self) -> int:
        return max((row.position for row in self.rows.values()), default=0)


def _overlaps(bucket: int, seconds: int, start: datetime | None, end: datetime | None) -> bool:
    return ((start is None or bucket + seconds > start.timestamp())
            and (end is None or bucket < end.timestamp()))


def _last(row: dict[str, Any]) -> tuple[bool, float, bool, float, bool, str, str]:
    def later(value: float | None) -> tuple[bool, float]:
        return (value is None, value or 0.0)
    return (*later(row.get("started_at")), *later(row.get("first_sample")),
            row.get("host") is None, row.get("host") or "", row["producer"])


class MemoryView(StoreView):
    def __init__(self, db: MemoryDatabase) -> None:
        self.tables = {name: dict(rows) for name, rows in db.tables.items()}
        self.generator_rows = {key: dict(row) for key, row in db.generators.items()}
        self.evaluation_rows = list(db.evaluations)

    def _run(self, run_id: str, *tables: str) -> Iterator[tuple[str, BucketKey, _Row]]:
        for name in tables or (TREND, COUNTER):
            for key, row in self.tables[name].items():
                if key[0] == run_id:
                    yield name, key, row

    async def runs(self) -> list[RunInfo]:
        spans: dict[str, tuple[int, int]] = {}
        for name in (TREND, COUNTER):
            for key in self.tables[name]:
                first, last = spans.get(key[0], (key[3], key[3]))
                spans[key[0]] = (min(first, key[3]), max(last, key[3]))
        runs = [RunInfo(run, datetime.fromtimestamp(first, UTC),
                        datetime.fromtimestamp(last, UTC))
                for run, (first, last) in spans.items()]
        return sorted(runs, key=lambda r: (-r.last.timestamp(), r.run_id))

    async def series(self, run_id: str) -> list[Series]:
        kinds: dict[tuple[str, str, tuple[tuple[str, str], ...]], str] = {}
        for name, key, row in self._run(run_id):
            kind = "trend" if name == TREND else row.values.metric_type  # type: ignore[union-attr]
            known = kinds.get((name, key[1], key[2]))
            kinds[(name, key[1], key[2])] = kind if known is None else min(known, kind)
        return [Series(metric, kind, dict(tags))
                for (_, metric, tags), kind in kinds.items()]

    async def extent(self, run_id: str, start: datetime | None, end: datetime | None
                     ) -> Extent | None:
        spans = [(key[3], row.bucket_seconds) for _, key, row in self._run(run_id)
                 if _overlaps(key[3], row.bucket_seconds, start, end)]
        if not spans:
            return None
        return Extent(float(min(b for b, _ in spans)), float(max(b + s for b, s in spans)),
                      len({b for b, _ in spans}), tuple(sorted({s for _, s in spans})))

    async def last_sample(self, run_id: str) -> tuple[float, float] | None:
        buckets = [key[3] for _, key, _ in self._run(run_id)]
        if not buckets:
            return None
        last = max(buckets)
        ends, samples = [], []
        for _, key, row in self._run(run_id, COUNTER):
            values = row.values
            if (key[3] == last and isinstance(values, CounterRow)
                    and values.metric_type == "gauge" and values.gauge_last):
                ends.append(key[3] + row.bucket_seconds)
                samples += [seen[0] for seen in values.gauge_last.values()]
        if not samples:
            return None
        return float(max(ends)), max(samples) / 1e9

    async def gauge_producers(self, run_id: str, start: datetime | None,
                              end: datetime | None) -> set[str]:
        producers: set[str] = set()
        for _, key, row in self._run(run_id, COUNTER):
            values = row.values
            if (isinstance(values, CounterRow) and values.metric_type == "gauge"
                    and values.gauge_last and _overlaps(key[3], row.bucket_seconds, start, end)):
                producers.update(values.gauge_last)
        return producers

    async def generators(self, run_id: str) -> list[GeneratorInfo] | None:
        rows = [row for (run, _), row in self.generator_rows.items() if run == run_id]
        return [GeneratorInfo(**row) for row in sorted(rows, key=_last)]

    async def rows(self, table: str, run_id: str, start: datetime | None,
                   end: datetime | None, where: Mapping[str, str],
                   metrics: Sequence[str] | None = None) -> AsyncIterator[StoredRow]:
        wanted = None if metrics is None else set(metrics)
        selected = []
        for _, key, row in self._run(run_id, table):
            tags = dict(key[2])
            if ((wanted is None or key[1] in wanted)
                    and _overlaps(key[3], row.bucket_seconds, start, end)
                    and all(tags.get(k) == v for k, v in where.items())):
                selected.append(StoredRow(key[1], tags, float(key[3]), row.bucket_seconds,
                                          _copy(row.values)))
        selected.sort(key=lambda r: (r.metric, r.bucket))
        for found in selected:
            yield found

    async def row_keys(self, run_id: str) -> set[tuple[str, int]]:
        return {(key[1], key[3]) for _, key, _ in self._run(run_id)}

    async def totals(self, run_id: str) -> list[MetricTotals]:
        sums: dict[tuple[str, str], list[Any]] = {}
        for name, key, row in self._run(run_id):
            values = row.values
            if isinstance(values, TrendRow):
                kind, nonzero = "trend", values.count - values.zeros
            else:
                kind, nonzero = values.metric_type, values.nonzero
            acc = sums.setdefault((name, key[1]), [kind, 0, 0, 0.0, 0])
            acc[0] = min(acc[0], kind)
            acc[1] += 1
            acc[2] += values.count
            acc[3] += values.sum
            acc[4] += nonzero
        return [MetricTotals(metric, *acc) for (_, metric), acc in sums.items()]

    async def evaluations(self, run_id: str) -> list[Evaluation]:
        rows = [e for e in self.evaluation_rows if e.run_id == run_id]
        return sorted(rows, key=lambda e: (e.evaluated_at, e.role, e.threshold))


class MemoryStore(Store):
    def __init__(self, name: str) -> None:
        self.name = name or "default"
        self.label = f"memory://{self.name}"
        self.db: MemoryDatabase | None = None

    async def open(self, connections: int = 3) -> None:
        self.db = database(self.name)

    async def close(self) -> None:
        self.db = None

    def _db(self) -> MemoryDatabase:
        if self.db is None:
            raise StoreUnavailable(f"{self.label}: not open")
        return self.db

    async def ensure_schema(self, policies: Policies | None = None) -> None:
        db = self._db()
        if not db.schema:
            log.warning("%s keeps every row in this process only: they are gone when it "
                        "exits (pass --dsn postgresql://... to keep them)", self.label)
        db.schema = True  # retention and compression are TimescaleDB's

    async def ping(self) -> None:
        self._db()

    def writer(self, aggregator: Aggregator[Any, Any], bucket_seconds: int,
               writer_id: str = "") -> BucketWriter:
        return MemoryWriter(self._db(), aggregator, bucket_seconds, writer_id)

    async def record_generators(self, rows: Sequence[GeneratorRow]) -> None:
        db = self._db()
        for r in rows:
            fields = {"host": r.host, "k6_version": r.k6_version, "script": r.script,
                      "started_at": r.started_at, "ended_at": r.ended_at,
                      "exit_status": r.exit_status,
                      "first_sample": None if r.first_ns is None else r.first_ns / 1e9,
                      "last_sample": None if r.last_ns is None else r.last_ns / 1e9,
                      "samples": r.samples,
                      "units": None if r.units is None else dict(r.units)}
            row = db.generators.setdefault((r.run_id, r.producer), {"producer": r.producer})
            row.update({k: v for k, v in fields.items() if v is not None})

    async def mark_written(self, role: str, keys: Sequence[tuple[str, str]]) -> None:
        db = self._db()
        now = time.time()
        for run_id, producer in keys:
            row = db.generators.setdefault((run_id, producer), {"producer": producer})
            row.setdefault(f"{role}_written_at", now)

    async def claim_input(self, run_id: str, role: str, input_id: str,
                          producer: str) -> tuple[str, float]:
        return self._db().inputs.setdefault((run_id, role, input_id), (producer, time.time()))

    async def record_evaluations(self, rows: Sequence[Evaluation]) -> None:
        self._db().evaluations.extend(rows)

    async def footprint(self) -> Footprint:
        db = self._db()
        return Footprint(len(db.tables[TREND]), len(db.tables[COUNTER]), None)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[StoreView]:
        yield MemoryView(self._db())
