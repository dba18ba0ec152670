"""PostgreSQL and TimescaleDB (``postgresql://``, ``postgres://``, or the PG* variables)."""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from common.store.base import BucketWriter, Store, StoreError, StoreUnavailable, StoreView
from common.store.postgres.errors import translate, translated
from common.store.postgres.reader import PgView
from common.store.postgres.writer import PgBucketWriter
from common.store.rows import Evaluation, Footprint, Policies

if TYPE_CHECKING:
    from common.aggregate import Aggregator
    from common.generators import GeneratorRow

log = logging.getLogger(__name__)
_SCHEMA_LOCK = 0x7464_6167  # "tdag": serialises schema creation between the two servers
HYPERTABLES = ("trend_buckets", "counter_buckets")

_GENERATOR_COLUMNS = ("host", "k6_version", "script", "started_at", "ended_at",
                      "exit_status", "first_sample", "last_sample", "samples", "units")
_GENERATOR_UPSERT = (
    f"INSERT INTO generators (run_id, producer, {', '.join(_GENERATOR_COLUMNS)}) VALUES "
    "($1, $2, $3, $4, $5, to_timestamp($6), to_timestamp($7), $8, to_timestamp($9), "
    "to_timestamp($10), $11, $12::jsonb) ON CONFLICT (run_id, producer) DO UPDATE SET "
    + ", ".join(f"{c} = coalesce(EXCLUDED.{c}, generators.{c})" for c in _GENERATOR_COLUMNS))
_INSERT_EVALUATION = """
INSERT INTO threshold_evaluations (run_id, role, threshold, evaluated_at, through, final,
    verdict, ok, decided, observed, samples, rank_low, rank_high, abort_on_fail, note)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
"""
_CLAIM_INPUT = (
    "WITH claimed AS (INSERT INTO run_inputs (run_id, role, input, producer) "
    "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING producer, "
    "first_seen) SELECT producer, extract(epoch FROM first_seen) FROM claimed "
    "UNION ALL SELECT producer, extract(epoch FROM first_seen) FROM run_inputs "
    "WHERE run_id = $1 AND role = $2 AND input = $3 LIMIT 1")


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e9


def split_client_options(dsn: str) -> tuple[str, dict[str, Any]]:
    """(the DSN for asyncpg, client options taken out of its query string).

    ``statement_cache_size=0`` turns asyncpg's prepared-statement cache off, which a
    connection pooler in transaction mode (PgBouncer) or a shared single backend (PGlite)
    needs; other query parameters stay, and asyncpg sends unknown ones as server settings
    (``?search_path=public``)."""
    if "://" not in dsn or "?" not in dsn:
        return dsn, {}
    base, _, query = dsn.partition("?")
    kept, options = [], {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == "statement_cache_size":
            if not value.isdigit():
                raise StoreError(f"statement_cache_size={value!r} in the DSN: expected a "
                                 f"whole number (0 turns the cache off)")
            options["statement_cache_size"] = int(value)
        elif pair:
            kept.append(pair)
    return base + ("?" + "&".join(kept) if kept else ""), options


def _interval(days: float) -> datetime.timedelta:
    return datetime.timedelta(days=days)


async def create_schema(conn: asyncpg.Connection, policies: Policies | None = None,
                        label: str = "") -> bool:
    """Create the tables; make them hypertables where TimescaleDB is available (True
    then), with the policies asked for."""
    sql = resources.files("common.store.postgres").joinpath("schema.sql").read_text()
    policies = policies or Policies()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        await conn.execute(sql)
        available = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")
        if not available:
            for name, value in (("retention_days", policies.retention_days),
                                ("compress_after_days", policies.compress_after_days)):
                if value is not None:
                    raise StoreError(
                        f"{name} = {value:g} needs the TimescaleDB extension, which the "
                        f"database {label} does not have (no 'timescaledb' in "
                        f"pg_available_extensions): install TimescaleDB there, or unset "
                        f"{name}")
            return False
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        for table in HYPERTABLES:
            await conn.execute(
                "SELECT create_hypertable($1::regclass, 'bucket', if_not_exists => TRUE,"
                " migrate_data => TRUE)", table)
        await _policies(conn, policies)
    return True


async def _policies(conn: asyncpg.Connection, policies: Policies) -> None:
    """Retention and compression policies on both tables; an unset setting leaves the
    table's policy as it is."""
    for table in HYPERTABLES:
        if policies.retention_days is not None:
            await conn.execute(f"SELECT remove_retention_policy('{table}', if_exists => TRUE)")
            await conn.execute(f"SELECT add_retention_policy('{table}', $1::interval)",
                               _interval(policies.retention_days))
        if policies.compress_after_days is not None:
            await conn.execute(
                f"ALTER TABLE {table} SET (timescaledb.compress, "
                f"timescaledb.compress_segmentby = 'run_id, metric', "
                f"timescaledb.compress_orderby = 'bucket')")
            await conn.execute(
                f"SELECT remove_compression_policy('{table}', if_exists => TRUE)")
            await conn.execute(f"SELECT add_compression_policy('{table}', $1::interval)",
                               _interval(policies.compress_after_days))


async def create_database(admin_dsn: str, name: str) -> None:
    """CREATE DATABASE ``name`` (letters, digits and _ only) on the server of
    ``admin_dsn``: for tests and benchmarks that want a database of their own."""
    if not name.replace("_", "").isalnum() or not name.isascii():
        raise ValueError(f"database name {name!r}: letters, digits and _ only")
    with translated(admin_dsn):
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()


class PostgresStore(Store):
    """``dsn`` as asyncpg takes it ('' for the PG* variables); ``label`` for messages."""

    def __init__(self, dsn: str, label: str) -> None:
        self.dsn, self.options = split_client_options(dsn)
        self.label = label
        self.pool: asyncpg.Pool | None = None
        self.timescaledb = False
        self.copy_in = True  # COPY FROM STDIN works (not PGlite's WebAssembly build)

    async def open(self, connections: int = 3) -> None:
        try:
            self.pool = await asyncpg.create_pool(self.dsn or None, min_size=1,
                                                  max_size=connections, timeout=30,
                                                  **self.options)
        except Exception as exc:
            mapped = translate(exc, self.label)
            if isinstance(mapped, StoreError) or isinstance(exc, ValueError):
                raise StoreUnavailable(
                    f"cannot connect to the database {self.label}: {exc}; pass --dsn DSN "
                    f"(or TDAGG_DSN) to use another database") from None
            raise

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await pool.close()
            except Exception as exc:  # a connection already gone: nothing is left to save
                log.debug("closing the pool: %r", exc)
                pool.terminate()

    def _pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise StoreUnavailable(f"database {self.label}: not open")
        return self.pool

    async def ensure_schema(self, policies: Policies | None = None) -> None:
        with translated(self.label):
            async with self._pool().acquire() as conn:
                self.timescaledb = await create_schema(conn, policies, self.label)
                self.copy_in = "Emscripten" not in await conn.fetchval("SELECT version()")

    async def ping(self) -> None:
        with translated(self.label):
            async with self._pool().acquire() as conn:
                await conn.fetchval("SELECT 1")

    def writer(self, aggregator: Aggregator[Any, Any], bucket_seconds: int,
               writer_id: str = "") -> BucketWriter:
        return PgBucketWriter(self._pool(), self.label, aggregator, bucket_seconds, writer_id,
                              self.copy_in)

    async def record_generators(self, rows: Sequence[GeneratorRow]) -> None:
        with translated(self.label):
            async with self._pool().acquire() as conn:
                await conn.executemany(_GENERATOR_UPSERT, [
                    (r.run_id, r.producer, r.host, r.k6_version, r.script, r.started_at,
                     r.ended_at, r.exit_status, _seconds(r.first_ns), _seconds(r.last_ns),
                     r.samples, None if r.units is None else orjson.dumps(r.units).decode())
                    for r in rows])

    async def mark_written(self, role: str, keys: Sequence[tuple[str, str]]) -> None:
        column = f"{role}_written_at"
        with translated(self.label):
            async with self._pool().acquire() as conn:
                await conn.executemany(
                    f"INSERT INTO generators (run_id, producer, {column}) "
                    f"VALUES ($1, $2, now()) ON CONFLICT (run_id, producer) DO UPDATE SET "
                    f"{column} = coalesce(generators.{column}, EXCLUDED.{column})", keys)

    async def claim_input(self, run_id: str, role: str, input_id: str,
                          producer: str) -> tuple[str, float]:
        with translated(self.label):
            async with self._pool().acquire() as conn:
                row = await conn.fetchrow(_CLAIM_INPUT, run_id, role, input_id, producer)
        return str(row[0]), float(row[1])

    async def record_evaluations(self, rows: Sequence[Evaluation]) -> None:
        with translated(self.label):
            async with self._pool().acquire() as conn:
                await conn.executemany(_INSERT_EVALUATION, [
                    (e.run_id, e.role, e.threshold, e.evaluated_at, e.through, e.final,
                     e.verdict, e.ok, e.decided, e.observed, e.samples, e.rank_low,
                     e.rank_high, e.abort_on_fail, e.note) for e in rows])

    async def footprint(self) -> Footprint:
        with translated(self.label):
            async with self._pool().acquire() as conn:
                counts = [int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
                          for table in HYPERTABLES]
                timescaledb = await conn.fetchval(
                    "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'timescaledb')")
                # A hypertable's rows live in its chunks, which hypertable_size adds up.
                size_of = "hypertable_size" if timescaledb else "pg_total_relation_size"
                size = 0
                for table in HYPERTABLES:
                    size += int(await conn.fetchval(
                        f"SELECT {size_of}($1::regclass)", table) or 0)
        return Footprint(counts[0], counts[1], size)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[StoreView]:
        with translated(self.label):
            async with self._pool().acquire() as conn, conn.transaction(
                    isolation="repeatable_read", readonly=True):
                await conn.fetchval("SELECT 1")  # the snapshot is taken here
                yield PgView(conn, self.label)
