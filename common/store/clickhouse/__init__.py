"""ClickHouse: a server (``clickhouse://[user[:password]@]host[:port]/database``, the
native protocol, port 9000 by default; ``?secure=1`` for TLS) or the in-process engine
(``chdb://PATH?database=NAME``: ``chdb://`` alone keeps the data in a temporary
directory of the process). Both run the same tables and SQL (tables.py); see
docs/CLICKHOUSE.md.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from common.store.base import BucketWriter, Store, StoreError, StoreView
from common.store.clickhouse import tables
from common.store.clickhouse.engine import ChdbEngine, Engine, ServerEngine
from common.store.clickhouse.reader import ChView
from common.store.clickhouse.writer import ChBucketWriter
from common.store.rows import Evaluation, Footprint, Policies

if TYPE_CHECKING:
    from common.aggregate import Aggregator
    from common.generators import GeneratorRow

DEFAULT_PORT = 9000
CHDB_DATABASE = "tdagg"
_counter = itertools.count()


def _version() -> int:
    """Increasing within a process: orders the rows one process appends."""
    return time.time_ns() + next(_counter) % 1000


def parse_dsn(dsn: str, label: str) -> tuple[Engine, str]:
    """(the engine, the database) of a clickhouse:// or chdb:// DSN."""
    scheme, _, rest = dsn.partition("://")
    query = urllib.parse.parse_qs(rest.partition("?")[2])
    if scheme.lower() == "chdb":
        path = urllib.parse.unquote(rest.partition("?")[0])
        database = query.get("database", [CHDB_DATABASE])[0]
        engine: Engine = ChdbEngine(path, label)
    else:
        url = urllib.parse.urlsplit(dsn)
        try:
            port = url.port or DEFAULT_PORT
        except ValueError as exc:
            raise StoreError(f"ClickHouse DSN {label}: {exc}") from None
        if not url.hostname:
            raise StoreError(f"ClickHouse DSN {label}: no host (expected "
                             f"clickhouse://[user[:password]@]host[:port]/database)")
        database = urllib.parse.unquote(url.path.strip("/")) or "default"
        engine = ServerEngine(url.hostname, port, urllib.parse.unquote(url.username or "default"),
                              urllib.parse.unquote(url.password or ""), label,
                              secure=query.get("secure", ["0"])[0] in ("1", "true"))
    try:
        tables.identifier(database)
    except ValueError as exc:
        raise StoreError(f"{label}: {exc}") from None
    return engine, database


class ClickHouseStore(Store):
    def __init__(self, dsn: str, label: str) -> None:
        self.engine, self.database = parse_dsn(dsn, label)
        self.label = label

    def table(self, name: str) -> str:
        return f"{self.database}.{name}"

    async def open(self, connections: int = 3) -> None:
        await self.engine.open(connections)

    async def close(self) -> None:
        await self.engine.close()

    async def ensure_schema(self, policies: Policies | None = None) -> None:
        policies = policies or Policies()
        for name, value in (("retention_days", policies.retention_days),
                            ("compress_after_days", policies.compress_after_days)):
            if value is not None:
                raise StoreError(
                    f"{name} = {value:g} is a TimescaleDB policy, which the ClickHouse "
                    f"store {self.label} does not apply: unset {name} (ClickHouse "
                    f"compresses every part; drop old months with ALTER TABLE ... DROP "
                    f"PARTITION, see docs/CLICKHOUSE.md)")
        for statement in tables.schema(self.database):
            await self.engine.execute(statement)

    async def ping(self) -> None:
        await self.engine.query("SELECT 1")

    def writer(self, aggregator: Aggregator[Any, Any], bucket_seconds: int,
               writer_id: str = "") -> BucketWriter:
        return ChBucketWriter(self, aggregator, bucket_seconds, writer_id)

    async def record_generators(self, rows: Sequence[GeneratorRow]) -> None:
        def seconds(ns: int | None) -> float | None:
            return None if ns is None else ns / 1e9

        def optional(value: Any, kind: type) -> Any:
            return None if value is None else kind(value)

        inserted = [
            (r.run_id, r.producer, _version(), r.host, r.k6_version, r.script,
             optional(r.started_at, float), optional(r.ended_at, float),
             optional(r.exit_status, int), seconds(r.first_ns), seconds(r.last_ns),
             optional(r.samples, int),
             None if r.units is None else tables.json_text(dict(r.units)), None, None)
            for r in rows]
        await self.engine.insert(
            self.table("generators"),
            ("run_id", "producer", "version", *tables.GENERATOR_FIELDS, "td_written_at",
             "non_td_written_at"), inserted)

    async def mark_written(self, role: str, keys: Sequence[tuple[str, str]]) -> None:
        now = time.time()
        await self.engine.insert(self.table("generators"),
                                 ("run_id", "producer", "version", f"{role}_written_at"),
                                 [(run_id, producer, _version(), now)
                                  for run_id, producer in keys])

    async def claim_input(self, run_id: str, role: str, input_id: str,
                          producer: str) -> tuple[str, float]:
        where = (f"run_id = {tables.string(run_id)} AND role = {tables.string(role)} "
                 f"AND input = {tables.string(input_id)}")
        sql = (f"SELECT producer, first_seen FROM {self.table('run_inputs')} WHERE {where} "
               f"ORDER BY first_seen, producer LIMIT 1")
        rows = await self.engine.query(sql)
        if not rows:
            # Two claims at once both insert, then both read the earlier one back.
            await self.engine.insert(self.table("run_inputs"),
                                     ("run_id", "role", "input", "producer", "first_seen"),
                                     [(run_id, role, input_id, producer, time.time())])
            rows = await self.engine.query(sql)
        return str(rows[0][0]), float(rows[0][1])

    async def record_evaluations(self, rows: Sequence[Evaluation]) -> None:
        await self.engine.insert(self.table("threshold_evaluations"), tables.EVALUATION_COLUMNS, [
            (e.run_id, e.role, e.threshold, tables.micros(e.evaluated_at),
             None if e.through is None else tables.micros(e.through), int(e.final),
             e.verdict, int(e.ok), int(e.decided),
             None if e.observed is None else float(e.observed),
             None if e.samples is None else int(e.samples),
             None if e.rank_low is None else float(e.rank_low),
             None if e.rank_high is None else float(e.rank_high), int(e.abort_on_fail),
             e.note) for e in rows])

    async def footprint(self) -> Footprint:
        counts = []
        for name in ("trend_buckets", "counter_buckets"):
            rows = await self.engine.query(f"SELECT count() FROM {self.table(name)} FINAL")
            counts.append(int(rows[0][0]))
        rows = await self.engine.query(
            "SELECT sum(bytes_on_disk) FROM system.parts WHERE active AND database = "
            f"{tables.string(self.database)} AND table IN ('trend_buckets', 'counter_buckets')")
        size = rows[0][0] if rows else None
        return Footprint(counts[0], counts[1], None if size is None else int(size))

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[StoreView]:
        yield ChView(self)
