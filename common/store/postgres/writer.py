"""Batch writes of one server role's table, merging late data into stored rows.

A batch is written in one transaction: the rows that already exist for the batch's keys
are read FOR UPDATE and merged into the closing states (that is late data), then every
row is upserted. Only after COMMIT does the caller evict the states.

Rows are keyed on (run_id, metric, bucket, tags_hash), tags_hash being the md5 of the
tags' jsonb text computed by PostgreSQL (see schema.sql). Callers name rows by
BucketKey; the hash never leaves the database.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from common.store.base import BucketWriter, StoreError
from common.store.postgres import columns
from common.store.postgres.errors import translated
from common.store.rows import BucketKey

if TYPE_CHECKING:
    from common.aggregate import Aggregator, Entry

log = logging.getLogger(__name__)

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


# The log position of the writer named by $5 that a row holds; a row written before
# writers had identities (writer_pos empty) holds its one writer's at wal_pos.
WRITER_POSITION = ("CASE WHEN writer_pos = '{}'::jsonb THEN wal_pos "
                   "ELSE coalesce((writer_pos ->> $5::text)::bigint, 0) END")


def tags_json(tags: tuple[tuple[str, str], ...]) -> str:
    return orjson.dumps(dict(tags), option=orjson.OPT_SORT_KEYS).decode()


def key_arrays(keys: Sequence[BucketKey]) -> tuple[list[str], list[str], list[str], list[int]]:
    """The arguments of a key lookup (key_lookup_sql) for these keys."""
    return ([k[0] for k in keys], [k[1] for k in keys], [tags_json(k[2]) for k in keys],
            [k[3] for k in keys])


def key_lookup_sql(table: str, selected: Sequence[str], lock: bool,
                   writer_position: bool = False) -> str:
    """The stored rows of a batch of keys, each with the key's 1-based ordinal.

    The keys come as four arrays ($1 run ids, $2 metrics, $3 tags as JSON text, $4 bucket
    starts). Each key is looked up on its own by all four columns of the unique index;
    LIMIT 1 (a key has one row at most) keeps the lookup a subquery per key, which
    PostgreSQL does not flatten into a join for the statistics to plan. With
    ``writer_position``, the first column after the ordinal is the position that the
    writer named by $5 holds in the row (WRITER_POSITION).
    """
    if writer_position:
        selected = (f"{WRITER_POSITION} AS writer_position", *selected)
    names = [c.split(" AS ")[-1].split("::")[0] for c in selected]
    return (
        f"SELECT k.ord, {', '.join(f't.{c}' for c in names)} "
        "FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) "
        "WITH ORDINALITY AS k(run_id, metric, tags, bucket, ord) "
        f"CROSS JOIN LATERAL (SELECT {', '.join(selected)} FROM {table} "
        "WHERE run_id = k.run_id AND metric = k.metric "
        "AND bucket = to_timestamp(k.bucket) "
        f"AND tags_hash = {TAGS_HASH.format('k.tags::jsonb')} "
        f"LIMIT 1{' FOR UPDATE' if lock else ''}) AS t"
    )


def upsert_sql(table: str, value_columns: Sequence[str]) -> str:
    """Insert or replace one row: $1 bucket start, $2 bucket_seconds, $3 run_id, $4 metric,
    $5 tags as JSON text, then the value columns, wal_pos, writer_pos (JSON text: the
    writer's id and position, added to the positions of the row's other writers) and
    source_pos (JSON text: the row's streams after the write, read under the row lock)."""
    names = ("bucket", "bucket_seconds", "run_id", "metric", "tags", "tags_hash",
             *value_columns, "wal_pos", "writer_pos", "source_pos")
    params = ["to_timestamp($1)", "$2", "$3", "$4", "$5::jsonb", TAGS_HASH.format("$5::jsonb")]
    params += [f"${i}" for i in range(6, len(names))]
    if "state" in value_columns:
        params[names.index("state")] += "::jsonb"
    params[-2] += "::jsonb"
    params[-1] += "::jsonb"
    updates = ", ".join([f"{c} = EXCLUDED.{c}"
                         for c in ("bucket_seconds", *value_columns, "source_pos")]
                        + [f"wal_pos = GREATEST({table}.wal_pos, EXCLUDED.wal_pos)",
                           f"writer_pos = {table}.writer_pos || EXCLUDED.writer_pos"])
    return (
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(params)}) "
        f"ON CONFLICT (run_id, metric, bucket, tags_hash) DO UPDATE SET {updates}"
    )


def insert_new_sql(table: str, value_columns: Sequence[str]) -> str:
    """Insert a batch of new rows in one statement, each column as one array parameter
    ($1 bucket starts, $2 widths, $3 run ids, $4 metrics, $5 tags as JSON text, then the
    value columns and the log positions).

    A row another writer inserted since the lookup is skipped (ON CONFLICT DO NOTHING),
    never overwritten: the caller, seeing fewer rows inserted than sent, retries the
    batch, which then merges into that row. A row's sum_rest goes as the text of a
    float8[] (arrays of arrays must be rectangular)."""
    names = ("bucket", "bucket_seconds", "run_id", "metric", "tags", *value_columns,
             "wal_pos", "writer_pos", "source_pos")
    types = ["bigint", "integer", "text", "text", "text",
             *("text" if c in ("sum_rest", "state") else columns.TYPES[c]
               for c in value_columns), "bigint", "text", "text"]
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, 1))
    values = ["to_timestamp(n.bucket)", "n.bucket_seconds", "n.run_id", "n.metric",
              "n.tags::jsonb", TAGS_HASH.format("n.tags::jsonb")]
    for c in value_columns:
        values.append({"state": "n.state::jsonb", "sum_rest": "n.sum_rest::float8[]"}.get(
            c, f"n.{c}"))
    values += ["n.wal_pos", "n.writer_pos::jsonb", "n.source_pos::jsonb"]
    return (f"INSERT INTO {table} (bucket, bucket_seconds, run_id, metric, tags, tags_hash, "
            f"{', '.join(value_columns)}, wal_pos, writer_pos, source_pos) "
            f"SELECT {', '.join(values)} "
            f"FROM unnest({arrays}) AS n({', '.join(names)}) "
            f"ON CONFLICT (run_id, metric, bucket, tags_hash) DO NOTHING")




def _float8_array_text(values: Sequence[float] | None) -> str | None:
    return None if not values else "{" + ",".join(repr(float(v)) for v in values) + "}"


def staging_sql(table: str, value_columns: Sequence[str]) -> tuple[str, str, str]:
    """The bulk load of new rows: (the staging table's name, its CREATE, the INSERT from
    it). The rows are COPYed into a temporary table (emptied at every commit), then
    inserted in one statement with PostgreSQL computing tags_hash; a row another writer
    inserted since the lookup is skipped (ON CONFLICT DO NOTHING), as in insert_new_sql."""
    staged = f"staged_{table}"
    columns_sql = ["bucket bigint", "bucket_seconds integer", "run_id text", "metric text",
                   "tags text", *(f"{c} {columns.TYPES[c]}" for c in value_columns),
                   "wal_pos bigint", "writer_pos text", "source_pos text"]
    create = (f"CREATE TEMPORARY TABLE IF NOT EXISTS {staged} ({', '.join(columns_sql)}) "
              "ON COMMIT DELETE ROWS")
    values = ["to_timestamp(n.bucket)", "n.bucket_seconds", "n.run_id", "n.metric",
              "n.tags::jsonb", TAGS_HASH.format("n.tags::jsonb")]
    values += [{"state": "n.state::jsonb"}.get(c, f"n.{c}") for c in value_columns]
    values += ["n.wal_pos", "n.writer_pos::jsonb", "n.source_pos::jsonb"]
    insert = (f"INSERT INTO {table} (bucket, bucket_seconds, run_id, metric, tags, tags_hash, "
              f"{', '.join(value_columns)}, wal_pos, writer_pos, source_pos) "
              f"SELECT {', '.join(values)} FROM {staged} AS n "
              "ON CONFLICT (run_id, metric, bucket, tags_hash) DO NOTHING")
    return staged, create, insert


class PgBucketWriter(BucketWriter):
    def __init__(self, pool: asyncpg.Pool, label: str, aggregator: Aggregator[Any, Any],
                 bucket_seconds: int, writer_id: str = "", copy_in: bool = True) -> None:
        super().__init__(aggregator, bucket_seconds, writer_id)
        # COPY FROM STDIN, which PostgreSQL built to WebAssembly (PGlite) cannot take.
        self.copy_in = copy_in
        self.pool = pool
        self.label = label
        self.kind = columns.table_of(aggregator.role)
        table = columns.TABLES[self.kind]
        self.upsert = upsert_sql(table, columns.WRITTEN[self.kind])
        self.select_stored = key_lookup_sql(table, ("source_pos", *columns.READ[self.kind]),
                                            lock=True, writer_position=True)
        self.select_positions = key_lookup_sql(table, (), lock=False, writer_position=True)

        self._max_position = f"SELECT coalesce(max(wal_pos), 0) FROM {table}"
        self.staged, self.create_staging, self.insert_staged = staging_sql(
            table, columns.WRITTEN[self.kind])
        self.insert_arrays = insert_new_sql(table, columns.WRITTEN[self.kind])
        self.sum_rest_at = (5 + columns.WRITTEN[self.kind].index("sum_rest")
                            if "sum_rest" in columns.WRITTEN[self.kind] else None)

    async def stored_positions(self, keys: Sequence[BucketKey]) -> dict[BucketKey, int]:
        if not keys:
            return {}
        with translated(self.label):
            async with self.pool.acquire() as conn, conn.transaction(readonly=True):
                await conn.execute(KEY_LOOKUP_SETTINGS)
                rows = await conn.fetch(self.select_positions, *key_arrays(keys),
                                        self.writer_id)
        return {keys[row[0] - 1]: row[1] for row in rows}

    async def max_position(self) -> int:
        with translated(self.label):
            async with self.pool.acquire() as conn:
                return int(await conn.fetchval(self._max_position))

    async def write(self, entries: Mapping[BucketKey, Entry[Any]]) -> int:
        with translated(self.label):
            try:
                return await self._write(entries)
            except asyncpg.exceptions.FeatureNotSupportedError as exc:
                # TimescaleDB cannot lock rows in a compressed chunk: late data for one
                # decompresses it (its compression policy compresses it again later).
                if "compressed" not in str(exc):
                    raise
                await self._decompress([key[3] for key in entries])
                return await self._write(entries)

    async def _decompress(self, buckets: Sequence[int]) -> None:
        async with self.pool.acquire() as conn:
            chunks = await conn.fetch(
                "SELECT format('%I.%I', chunk_schema, chunk_name) FROM "
                "timescaledb_information.chunks WHERE hypertable_name = $1 AND is_compressed "
                "AND range_end > to_timestamp($2) AND range_start <= to_timestamp($3)",
                columns.TABLES[self.kind], min(buckets), max(buckets))
            for (chunk,) in chunks:
                log.warning("late data for %s: decompressing %s", columns.TABLES[self.kind],
                            chunk)
                await conn.execute("SELECT decompress_chunk($1::regclass, if_compressed => TRUE)",
                                   chunk)

    async def _write(self, entries: Mapping[BucketKey, Entry[Any]]) -> int:
        # One order of keys for every writer: two writers locking the same rows cannot
        # deadlock over the order they lock them in.
        tags = {key: tags_json(key[2]) for key in entries}
        keys = sorted(entries, key=lambda k: (k[3], k[0], k[1], tags[k]))
        arrays = ([k[0] for k in keys], [k[1] for k in keys], [tags[k] for k in keys],
                  [k[3] for k in keys])
        agg = self.aggregator
        conn = await self.pool.acquire()
        try:
            async with conn.transaction():
                await conn.execute(KEY_LOOKUP_SETTINGS)
                stored_rows = await conn.fetch(self.select_stored, *arrays, self.writer_id)
                # Late data: merge into a state rebuilt from the stored row, never into the
                # closing state itself, so that a failed attempt can be retried as is.
                stored_by_key = {keys[row[0] - 1]: row for row in stored_rows}
                new: list[tuple[Any, ...]] = []
                updated: list[tuple[Any, ...]] = []
                late = 0
                for key, tag in zip(keys, arrays[2], strict=True):
                    entry = entries[key]
                    row = stored_by_key.get(key)
                    position = entry.last_position
                    if row is not None and row[1] >= position > 0:
                        continue  # written by an attempt whose outcome was unknown
                    added, sources = self.contribution(
                        key, entry, {} if row is None else orjson.loads(row[2]))
                    if added is None:
                        continue  # the row holds all of it already
                    state = added
                    if row is not None:
                        state = agg.from_stored(columns.read(self.kind, tuple(row)[3:]))
                        agg.absorb(state, added)
                        position = max(position, row[1])
                        late += 1
                    values = (key[3], self.bucket_seconds, key[0], key[1], tag,
                              *columns.written(agg.values(state)), position,
                              orjson.dumps({self.writer_id: position}).decode(),
                              orjson.dumps(sources).decode())
                    (updated if row is not None else new).append(values)
                # Stored rows are locked (FOR UPDATE above): their upserts are updates.
                if updated:
                    await conn.executemany(self.upsert, updated)
                if new:
                    await self._insert_new(conn, new)
        finally:
            try:
                await self.pool.release(conn)
            except Exception as exc:  # the commit above stands; only the connection is bad
                log.warning("could not return a database connection to the pool: %r", exc)
                conn.terminate()
        return late

    async def _insert_new(self, conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
        """Rows no stored row had: COPYed into the staging table, then one INSERT (without
        COPY: one INSERT of column arrays)."""
        if self.copy_in:
            await conn.execute(self.create_staging)
            await conn.copy_records_to_table(self.staged, records=rows)
            status = await conn.execute(self.insert_staged)
        else:
            if self.sum_rest_at is not None:
                at = self.sum_rest_at
                rows = [(*row[:at], _float8_array_text(row[at]), *row[at + 1:]) for row in rows]
            status = await conn.execute(self.insert_arrays,
                                        *(list(c) for c in zip(*rows, strict=True)))
        inserted = int(status.rsplit(" ", 1)[-1])
        if inserted != len(rows):
            # Another writer inserted some of these rows since the lookup: roll back, and
            # let the retry merge into them (never overwrite what it wrote).
            raise StoreError(f"database {self.label}: {len(rows) - inserted} of {len(rows)} "
                             f"new rows were inserted by another writer meanwhile; retrying")
