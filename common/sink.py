"""PostgreSQL / TimescaleDB sink: schema, batch upsert, and merging late data into rows.

A batch is written in one transaction: the rows that already exist for the batch's keys
are read FOR UPDATE and merged into the closing states (that is late data), then every
row is upserted. Only after COMMIT does the caller evict the states.

Rows are keyed on (run_id, metric, bucket, tags_hash), tags_hash being the md5 of the
tags' jsonb text computed by PostgreSQL (see schema.sql). Callers still name rows by
BucketKey; the hash never leaves the database.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import resources
from typing import Any

import asyncpg
import orjson

from common.aggregate import Aggregator, BucketKey, Entry
from common.generators import GeneratorRow

log = logging.getLogger(__name__)
_SCHEMA_LOCK = 0x7464_6167  # "tdag": serialises schema creation between the two servers

# The row key's stand-in for the tags, in SQL with {} for a jsonb expression. Computed by
# PostgreSQL from the jsonb in every statement that writes or looks up a row (and by
# schema.sql when it fills older tables), so that it cannot differ between two writers.
TAGS_HASH = "decode(md5(({})::text), 'hex')"

# Run first in every transaction that looks rows up by key. Each key must be one probe of
# the unique index whatever the table's statistics say (none, before ANALYZE): a hash,
# merge or sequential plan reads every row of the bucket for a batch, and a nested loop
# over another index filtering on the jsonb read 90,000 rows per key (over 90 s a batch).
KEY_LOOKUP_SETTINGS = (
    "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; "
    "SET LOCAL enable_mergejoin = off"
)

# Errors of a write that retrying the same batch cannot cure: the database refuses the
# data itself (class 22: bad characters, numbers or times; 23: a constraint; 54: a limit
# such as an index row too big). Anything else (connection lost, server shutting down,
# disk full, lock or serialization conflicts, timeouts, a schema another release changed)
# may pass later and is retried as is.
_PERMANENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.ProgramLimitExceededError,
)


def is_permanent(exc: BaseException) -> bool:
    """Whether a failed batch write can never succeed by retrying that same batch.

    True for data the database refuses and for Python errors raised while encoding a row
    (ValueError, TypeError, ArithmeticError: the same entries raise them again). A batch
    that fails permanently holds at least one entry that cannot be written: split it to
    find which (PgSink.write_each). False for everything else, unknown errors included,
    since dropping data on a passing fault is worse than retrying.
    """
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError):
        # asyncpg raises its DataError (class 22) for an argument it cannot encode too;
        # its InterfaceErrors that are ValueErrors are about connection settings.
        return isinstance(exc, _PERMANENT_DB_ERRORS)
    return isinstance(exc, ValueError | TypeError | ArithmeticError)


def tags_json(tags: tuple[tuple[str, str], ...]) -> str:
    return orjson.dumps(dict(tags), option=orjson.OPT_SORT_KEYS).decode()


async def ensure_schema(conn: asyncpg.Connection) -> bool:
    """Create the tables; make them hypertables where TimescaleDB is available."""
    sql = resources.files("common").joinpath("schema.sql").read_text()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        await conn.execute(sql)
        available = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        if not available:
            return False
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        for table in ("trend_buckets", "counter_buckets"):
            await conn.execute(
                "SELECT create_hypertable($1::regclass, 'bucket', if_not_exists => TRUE,"
                " migrate_data => TRUE)", table,
            )
    return True


_GENERATOR_COLUMNS = ("host", "k6_version", "script", "started_at", "ended_at",
                      "exit_status", "first_sample", "last_sample", "samples", "units")
_GENERATOR_UPSERT = (
    f"INSERT INTO generators (run_id, producer, {', '.join(_GENERATOR_COLUMNS)}) VALUES "
    "($1, $2, $3, $4, $5, to_timestamp($6), to_timestamp($7), $8, to_timestamp($9), "
    "to_timestamp($10), $11, $12::jsonb) ON CONFLICT (run_id, producer) DO UPDATE SET "
    + ", ".join(f"{c} = coalesce(EXCLUDED.{c}, generators.{c})" for c in _GENERATOR_COLUMNS))


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e9


def key_lookup_sql(table: str, columns: Sequence[str], lock: bool) -> str:
    """The stored rows of a batch of keys, each with the key's 1-based ordinal.

    The keys come as four arrays ($1 run ids, $2 metrics, $3 tags as JSON text, $4 bucket
    starts). Each key is looked up on its own by all four columns of the unique index;
    LIMIT 1 (a key has one row at most) keeps the lookup a subquery per key, which
    PostgreSQL does not flatten into a join for the statistics to plan.
    """
    selected = ", ".join(columns)
    return (
        f"SELECT k.ord, {', '.join(f't.{c}' for c in columns)} "
        "FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) "
        "WITH ORDINALITY AS k(run_id, metric, tags, bucket, ord) "
        f"CROSS JOIN LATERAL (SELECT {selected} FROM {table} "
        "WHERE run_id = k.run_id AND metric = k.metric "
        "AND bucket = to_timestamp(k.bucket) "
        f"AND tags_hash = {TAGS_HASH.format('k.tags::jsonb')} "
        f"LIMIT 1{' FOR UPDATE' if lock else ''}) AS t"
    )


def upsert_sql(table: str, value_columns: Sequence[str]) -> str:
    """Insert or replace one row: $1 bucket start, $2 bucket_seconds, $3 run_id, $4 metric,
    $5 tags as JSON text, then the value columns and wal_pos."""
    columns = ("bucket", "bucket_seconds", "run_id", "metric", "tags", "tags_hash",
               *value_columns, "wal_pos")
    params = ["to_timestamp($1)", "$2", "$3", "$4", "$5::jsonb", TAGS_HASH.format("$5::jsonb")]
    params += [f"${i}" for i in range(6, len(columns))]
    if "state" in value_columns:
        params[columns.index("state")] += "::jsonb"
    updates = ", ".join(f"{c} = EXCLUDED.{c}"
                        for c in ("bucket_seconds", *value_columns, "wal_pos"))
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(params)}) "
        f"ON CONFLICT (run_id, metric, bucket, tags_hash) DO UPDATE SET {updates}"
    )


class PgSink:
    """Writes closed buckets of one aggregator's table."""

    def __init__(self, pool: asyncpg.Pool, aggregator: Aggregator[Any, Any],
                 bucket_seconds: int) -> None:
        self.pool = pool
        self.aggregator = aggregator
        self.bucket_seconds = bucket_seconds
        table = aggregator.table
        self.upsert = upsert_sql(table, aggregator.value_columns)
        self.select_stored = key_lookup_sql(
            table, ("wal_pos", *aggregator.stored_columns), lock=True)
        self.select_positions = key_lookup_sql(table, ("wal_pos",), lock=False)
        self._max_position = f"SELECT coalesce(max(wal_pos), 0) FROM {table}"

    @staticmethod
    def key_arrays(keys: list[BucketKey]) -> tuple[list[str], list[str], list[str], list[int]]:
        """The arguments of a key lookup (key_lookup_sql) for these keys."""
        return ([k[0] for k in keys], [k[1] for k in keys], [tags_json(k[2]) for k in keys],
                [k[3] for k in keys])

    async def stored_positions(self, keys: list[BucketKey]) -> dict[BucketKey, int]:
        """The write-ahead-log position each existing row already contains."""
        if not keys:
            return {}
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute(KEY_LOOKUP_SETTINGS)
            rows = await conn.fetch(self.select_positions, *self.key_arrays(keys))
        return {keys[row[0] - 1]: row[1] for row in rows}

    async def max_position(self) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(self._max_position))

    async def record_generators(self, rows: list[GeneratorRow]) -> None:
        """Upsert generator rows; a column the row does not know keeps its stored value."""
        async with self.pool.acquire() as conn:
            await conn.executemany(_GENERATOR_UPSERT, [
                (r.run_id, r.producer, r.host, r.k6_version, r.script, r.started_at,
                 r.ended_at, r.exit_status, _seconds(r.first_ns), _seconds(r.last_ns),
                 r.samples, None if r.units is None else orjson.dumps(r.units).decode())
                for r in rows])

    async def mark_written(self, keys: list[tuple[str, str]]) -> None:
        """Every bucket of these generators that this server holds is in the database."""
        column = f"{self.aggregator.role}_written_at"
        async with self.pool.acquire() as conn:
            await conn.executemany(
                f"INSERT INTO generators (run_id, producer, {column}) VALUES ($1, $2, now()) "
                f"ON CONFLICT (run_id, producer) DO UPDATE SET {column} = "
                f"coalesce(generators.{column}, EXCLUDED.{column})", keys)

    async def claim_input(self, run_id: str, input_id: str,
                          producer: str) -> tuple[str, float]:
        """Record that ``producer`` sends ``input_id`` in ``run_id``; return the producer
        that sent it first and when (epoch seconds): another one means a rerun."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "WITH claimed AS (INSERT INTO run_inputs (run_id, role, input, producer) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING producer, "
                "first_seen) SELECT producer, extract(epoch FROM first_seen) FROM claimed "
                "UNION ALL SELECT producer, extract(epoch FROM first_seen) FROM run_inputs "
                "WHERE run_id = $1 AND role = $2 AND input = $3 LIMIT 1",
                run_id, self.aggregator.role, input_id, producer)
        return str(row[0]), float(row[1])

    async def write(self, entries: dict[BucketKey, Entry[Any]]) -> int:
        """Write a batch in one transaction; return how many rows held late data.

        Idempotent, so that any failure may be retried with the same entries: a stored
        row whose wal_pos already reaches an entry's last log position holds that entry
        (the commit of an earlier attempt went through), and the entry is skipped. Any
        part of a batch may be written on its own, in any order (write_each relies on it).
        """
        keys = list(entries)
        arrays = self.key_arrays(keys)
        agg = self.aggregator
        conn = await self.pool.acquire()
        try:
            async with conn.transaction():
                await conn.execute(KEY_LOOKUP_SETTINGS)
                stored_rows = await conn.fetch(self.select_stored, *arrays)
                # Late data: merge into a state rebuilt from the stored row, never into the
                # closing state itself, so that a failed attempt can be retried as is.
                to_write = {key: entry.state for key, entry in entries.items()}
                positions = {key: entry.last_position for key, entry in entries.items()}
                late = 0
                for row in stored_rows:
                    key = keys[row[0] - 1]
                    if row[1] >= entries[key].last_position > 0:
                        del to_write[key]  # written by an attempt whose outcome was unknown
                        continue
                    merged = agg.from_stored(tuple(row)[2:])
                    agg.absorb(merged, entries[key].state)
                    to_write[key] = merged
                    positions[key] = max(positions[key], row[1])
                    late += 1
                await conn.executemany(
                    self.upsert,
                    [
                        (key[3], self.bucket_seconds, key[0], key[1], tag,
                         *agg.values(to_write[key]), positions[key])
                        for key, tag in zip(keys, arrays[2], strict=True) if key in to_write
                    ],
                )
        finally:
            try:
                await self.pool.release(conn)
            except Exception as exc:  # the commit above stands; only the connection is bad
                log.warning("could not return a database connection to the pool: %r", exc)
                conn.terminate()
        return late

    async def write_each(self, entries: dict[BucketKey, Entry[Any]]
                         ) -> tuple[int, dict[BucketKey, BaseException]]:
        """Write a batch, setting aside the entries that can never be written.

        Returns (rows that held late data, {key: error} of the entries set aside); every
        other entry is written. A batch that fails permanently (is_permanent) is split in
        halves, each written on its own, down to single entries: k bad entries among n
        cost about 2·k·log2(n) extra writes. Any other failure is raised as is, and the
        whole batch may be retried (halves written before it are skipped then: write is
        idempotent).
        """
        try:
            return await self.write(entries), {}
        except Exception as exc:
            if not is_permanent(exc):
                raise
            if len(entries) <= 1:
                return 0, {key: exc for key in entries}
        items = list(entries.items())
        middle = len(items) // 2
        late_first, failed_first = await self.write_each(dict(items[:middle]))
        late_second, failed_second = await self.write_each(dict(items[middle:]))
        return late_first + late_second, failed_first | failed_second
