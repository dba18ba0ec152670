"""PostgreSQL / TimescaleDB sink: schema, batch upsert, and merging late data into rows.

A batch is written in one transaction: the rows that already exist for the batch's keys
are read FOR UPDATE and merged into the closing states (that is late data), then every
row is upserted. Only after COMMIT does the caller evict the states.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

import asyncpg
import orjson

from common.aggregate import Aggregator, BucketKey, Entry

log = logging.getLogger(__name__)
_SCHEMA_LOCK = 0x7464_6167  # "tdag": serialises schema creation between the two servers


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


class PgSink:
    """Writes closed buckets of one aggregator's table."""

    def __init__(self, pool: asyncpg.Pool, aggregator: Aggregator[Any, Any],
                 bucket_seconds: int) -> None:
        self.pool = pool
        self.aggregator = aggregator
        self.bucket_seconds = bucket_seconds
        agg = aggregator
        table = agg.table
        columns = ("bucket", "bucket_seconds", "run_id", "metric", "tags", *agg.value_columns,
                   "wal_pos")
        params = ["to_timestamp($1)", "$2", "$3", "$4", "$5::jsonb"]
        params += [f"${i}" for i in range(6, len(columns) + 1)]
        if "state" in agg.value_columns:
            params[columns.index("state")] += "::jsonb"
        updates = ", ".join(f"{c} = EXCLUDED.{c}"
                            for c in ("bucket_seconds", *agg.value_columns, "wal_pos"))
        self._upsert = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(params)}) "
            f"ON CONFLICT (run_id, metric, tags, bucket) DO UPDATE SET {updates}"
        )
        stored = ", ".join(f"t.{c}" for c in agg.stored_columns)
        join = (
            f"FROM {table} t "
            "JOIN unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) "
            "WITH ORDINALITY AS k(run_id, metric, tags, bucket, ord) "
            "ON t.run_id = k.run_id AND t.metric = k.metric AND t.tags = k.tags::jsonb "
            "AND t.bucket = to_timestamp(k.bucket)"
        )
        self._select_stored = f"SELECT k.ord, t.wal_pos, {stored} {join} FOR UPDATE OF t"
        self._select_positions = f"SELECT k.ord, t.wal_pos {join}"
        self._max_position = f"SELECT coalesce(max(wal_pos), 0) FROM {table}"

    @staticmethod
    def _key_arrays(keys: list[BucketKey]) -> tuple[list[str], list[str], list[str], list[int]]:
        return ([k[0] for k in keys], [k[1] for k in keys], [tags_json(k[2]) for k in keys],
                [k[3] for k in keys])

    async def stored_positions(self, keys: list[BucketKey]) -> dict[BucketKey, int]:
        """The write-ahead-log position each existing row already contains."""
        if not keys:
            return {}
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(self._select_positions, *self._key_arrays(keys))
        return {keys[row[0] - 1]: row[1] for row in rows}

    async def max_position(self) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(self._max_position))

    async def write(self, entries: dict[BucketKey, Entry[Any]]) -> int:
        """Write a batch in one transaction; return how many rows held late data.

        Idempotent, so that any failure may be retried with the same entries: a stored
        row whose wal_pos already reaches an entry's last log position holds that entry
        (the commit of an earlier attempt went through), and the entry is skipped.
        """
        keys = list(entries)
        arrays = self._key_arrays(keys)
        agg = self.aggregator
        conn = await self.pool.acquire()
        try:
            async with conn.transaction():
                stored_rows = await conn.fetch(self._select_stored, *arrays)
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
                    self._upsert,
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
