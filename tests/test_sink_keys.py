"""PgSink against a real PostgreSQL: rows keyed on a hash of the tags, key lookups that
always probe the unique index, the upgrade of older tables, and which write errors are
permanent."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import numpy as np
import orjson
import pytest

from common import digest
from common.aggregate import BucketKey, Entry
from common.store import StoreError, is_permanent
from common.store.postgres import create_schema
from common.store.postgres.errors import translate
from common.store.postgres.writer import KEY_LOOKUP_SETTINGS, PgBucketWriter, key_arrays
from non_td_server.aggregator import CounterAggregator, CounterState
from td_server.aggregator import TrendAggregator, TrendState
from tests.utils import wait_until

BUCKET = 1_700_000_000
WIDTH = 10
TABLES = ("trend_buckets", "counter_buckets")
CENTROIDS = digest.from_values(np.arange(1.0, 11.0))

Tags = tuple[tuple[str, str], ...]


# --- helpers -----------------------------------------------------------------------


def aggregator_of(table: str) -> Any:
    return TrendAggregator() if table == "trend_buckets" else CounterAggregator()


def state_of(table: str) -> Any:
    """A small state of ten samples, 1 to 10."""
    if table == "trend_buckets":
        return TrendState(10, 55.0, 1.0, 10.0, [CENTROIDS], 0)
    return CounterState("counter", 55.0, 10, 10, 1.0, 10.0, {})


def entries_of(table: str, keys: list[BucketKey], position: int) -> dict[BucketKey, Entry[Any]]:
    return {key: Entry(state_of(table), 0, position) for key in keys}


def key(name: str = "a", metric: str = "http_req_duration", run_id: str = "run",
        bucket: int = BUCKET, tags: Tags | None = None) -> BucketKey:
    return (run_id, metric, tags if tags is not None else (("name", name),), bucket)


def wide_characters(rng: np.random.Generator, length: int) -> str:
    """Random characters of 4 bytes each in UTF-8: nothing for PostgreSQL to compress."""
    return "".join(map(chr, rng.integers(0x10000, 0x110000, length)))


def wide_tags(count: int, key_length: int, value_length: int, seed: int = 0) -> Tags:
    rng = np.random.default_rng(seed)
    return tuple(sorted((f"{i:02}" + wide_characters(rng, key_length - 2),
                         wide_characters(rng, value_length)) for i in range(count)))


@contextlib.asynccontextmanager
async def sink_for(dsn: str, table: str, **server_settings: str) -> AsyncIterator[PgBucketWriter]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2,
                                     server_settings=server_settings or None)
    try:
        async with pool.acquire() as conn:
            await create_schema(conn)
        yield PgBucketWriter(pool, "test", aggregator_of(table), WIDTH)
    finally:
        await pool.close()


async def failure_of(write: Any) -> BaseException:
    """The exception an awaitable raises (it must raise one)."""
    with pytest.raises(Exception) as caught:  # noqa: PT011 - any failure, classified below
        await write
    return caught.value


async def index_names(conn: asyncpg.Connection, table: str) -> set[str]:
    rows = await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = $1", table)
    return {row[0] for row in rows}


# --- A. tags of any documented size --------------------------------------------------


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize(("count", "key_length", "value_length"), [
    (5, 2, 256),  # 5.2 KB of tags: the "index row size 5224 exceeds btree maximum"
    (32, 256, 256),  # every documented limit at once: 64 KB of tags
])
async def test_tags_at_the_documented_limits_are_stored_and_found(
        dsn: str, table: str, count: int, key_length: int, value_length: int) -> None:
    tags = wide_tags(count, key_length, value_length)
    # The longest run id and metric name too: 200 characters of 4 bytes each.
    rng = np.random.default_rng(2)
    metric = wide_characters(rng, 200)
    wide = key(tags=tags, run_id=wide_characters(rng, 200), metric=metric)
    async with sink_for(dsn, table) as sink:
        assert await sink.write(entries_of(table, [wide, key("small")], 1)) == 0
        assert await sink.stored_positions([wide, key("absent")]) == {wide: 1}
        assert await sink.write(entries_of(table, [wide], 2)) == 1  # late data merges in
        async with sink.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT tags::text, count, wal_pos FROM {table} "
                                    "WHERE metric = $1", metric)
    assert [(orjson.loads(r[0]), r[1], r[2]) for r in rows] == [(dict(tags), 20, 2)]


@pytest.mark.parametrize("table", TABLES)
async def test_tags_hash_is_the_md5_of_the_stored_jsonb(dsn: str, table: str) -> None:
    keys = [key("a"), key("b"), key(tags=()), key(tags=(("x", "é\t\"'"), ("y", "2")))]
    async with sink_for(dsn, table) as sink:
        await sink.write(entries_of(table, keys, 1))
        async with sink.pool.acquire() as conn:
            mismatched = await conn.fetchval(
                f"SELECT count(*) FROM {table} "
                "WHERE tags_hash <> decode(md5(tags::text), 'hex') OR length(tags_hash) <> 16")
            stored = await conn.fetchval(f"SELECT count(*) FROM {table}")
    assert (mismatched, stored) == (0, 4)


@pytest.mark.parametrize("table", TABLES)
async def test_fresh_tables_have_the_key_index_only(dsn: str, table: str) -> None:
    async with sink_for(dsn, table) as sink, sink.pool.acquire() as conn:
        assert await index_names(conn, table) == {f"{table}_key"}
        definition = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = $1", f"{table}_key")
    assert definition.endswith("USING btree (run_id, metric, bucket, tags_hash)")
    assert "UNIQUE" in definition


# The schema of the release keyed on (run_id, metric, tags, bucket), as it was at commit
# 1766e0c (git show 1766e0c:common/schema.sql).
OLD_SCHEMA = """
CREATE TABLE trend_buckets (
    bucket timestamptz NOT NULL, bucket_seconds integer NOT NULL, run_id text NOT NULL,
    metric text NOT NULL, tags jsonb NOT NULL DEFAULT '{}', count bigint NOT NULL,
    sum double precision NOT NULL, min double precision NOT NULL,
    max double precision NOT NULL, mean double precision NOT NULL,
    p50 double precision NOT NULL, p90 double precision NOT NULL,
    p95 double precision NOT NULL, p99 double precision NOT NULL, digest bytea NOT NULL,
    zeros bigint NOT NULL DEFAULT 0, wal_pos bigint NOT NULL DEFAULT 0,
    UNIQUE (run_id, metric, tags, bucket));
CREATE INDEX trend_buckets_run_metric_bucket ON trend_buckets (run_id, metric, bucket);
CREATE TABLE counter_buckets (
    bucket timestamptz NOT NULL, bucket_seconds integer NOT NULL, run_id text NOT NULL,
    metric text NOT NULL,
    metric_type text NOT NULL CHECK (metric_type IN ('counter', 'gauge', 'rate')),
    tags jsonb NOT NULL DEFAULT '{}', value double precision NOT NULL,
    count bigint NOT NULL, nonzero bigint NOT NULL, min double precision NOT NULL,
    max double precision NOT NULL, state jsonb, wal_pos bigint NOT NULL DEFAULT 0,
    UNIQUE (run_id, metric, tags, bucket));
CREATE INDEX counter_buckets_run_metric_bucket ON counter_buckets (run_id, metric, bucket);
"""

OLD_ROWS = {
    "trend_buckets": (
        "INSERT INTO trend_buckets (bucket, bucket_seconds, run_id, metric, tags, count, sum,"
        " min, max, mean, p50, p90, p95, p99, digest, wal_pos) VALUES (to_timestamp($1), 10,"
        " 'run', 'http_req_duration', $2::jsonb, 10, 55, 1, 10, 5.5, 5, 9, 10, 10, $3, 7)"),
    "counter_buckets": (
        "INSERT INTO counter_buckets (bucket, bucket_seconds, run_id, metric, metric_type,"
        " tags, value, count, nonzero, min, max, state, wal_pos) VALUES (to_timestamp($1),"
        " 10, 'run', 'http_req_duration', 'counter', $2::jsonb, 55, 10, 10, 1, 10,"
        " '{\"sum\": 55}', 7)"),
}


async def create_old_tables(dsn: str) -> list[Tags]:
    """Tables of the older release with rows in them; returns the rows' tags."""
    tags: list[Tags] = [(), (("name", "a"),), (("name", "b"), ("status", "200")),
                        (("group", "::ünï"),)]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(OLD_SCHEMA)
        for some in tags:
            for bucket in (BUCKET, BUCKET + WIDTH):
                await conn.execute(OLD_ROWS["trend_buckets"], bucket, orjson.dumps(dict(some))
                                   .decode(), digest.encode(CENTROIDS))
                await conn.execute(OLD_ROWS["counter_buckets"], bucket,
                                   orjson.dumps(dict(some)).decode())
    finally:
        await conn.close()
    return tags


async def table_contents(conn: asyncpg.Connection, table: str) -> list[tuple[Any, ...]]:
    """Every row but tags_hash, in a stable order, with each row's version (xmin)."""
    rows = await conn.fetch(f"SELECT xmin::text::bigint AS version, * FROM {table} "
                            "ORDER BY tags::text, bucket")
    # sum_rest, writer_pos and source_pos: columns an upgrade adds (NULL: the stored sums
    # are taken as exact; '{}': the row's wal_pos is its one writer's, and it holds no
    # forwarder streams, so that frames sent again are merged as they always were).
    added = ("tags_hash", "sum_rest", "writer_pos", "source_pos")
    return [tuple(v for k, v in row.items() if k not in added) for row in rows]


@pytest.mark.parametrize("table", TABLES)
async def test_tables_keyed_on_tags_are_upgraded_in_place(dsn: str, table: str) -> None:
    tags = await create_old_tables(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        before = await table_contents(conn, table)
        await create_schema(conn)
        upgraded = await table_contents(conn, table)
        await create_schema(conn)  # a second start finds nothing to do and rewrites nothing
        assert await table_contents(conn, table) == upgraded
        assert [row[1:] for row in upgraded] == [row[1:] for row in before]  # data kept
        assert await conn.fetchval(  # each row's wal_pos stays its one writer's
            f"SELECT count(*) FROM {table} WHERE writer_pos = '{{}}' "
            "AND source_pos = '{}'") == len(before)
        assert await index_names(conn, table) == {f"{table}_key"}
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = $1::regclass "
            "AND contype = 'u'", table) == 0
        assert await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE tags_hash = decode(md5(tags::text), 'hex')"
        ) == len(before)
    finally:
        await conn.close()
    async with sink_for(dsn, table) as sink:
        # The stored rows are found by the new key: late data merges into them ...
        stored = [key(tags=some) for some in tags]
        assert await sink.stored_positions(stored) == dict.fromkeys(stored, 7)
        assert await sink.write(entries_of(table, stored, 8)) == len(stored)
        # ... and tags too large for the old key are written beside them.
        assert await sink.write(entries_of(table, [key(tags=wide_tags(5, 2, 256))], 8)) == 0
        async with sink.pool.acquire() as conn:
            counts = await conn.fetch(f"SELECT count FROM {table} WHERE bucket = "
                                      "to_timestamp($1) ORDER BY count", BUCKET)
    assert [row[0] for row in counts] == [10] + [20] * len(tags)


# --- B. key lookups probe the unique index, whatever the statistics --------------------


FILL = {
    "trend_buckets": (
        "INSERT INTO trend_buckets (bucket, bucket_seconds, run_id, metric, tags, tags_hash,"
        " count, sum, min, max, mean, p50, p90, p95, p99, digest)"
        " SELECT to_timestamp($1), 10, 'run', 'http_req_duration', t,"
        " decode(md5(t::text), 'hex'), 1, 1, 1, 1, 1, 1, 1, 1, 1, '\\x'::bytea"
        " FROM generate_series(1, $2) AS i, jsonb_build_object('name', 's' || i) AS t"),
    "counter_buckets": (
        "INSERT INTO counter_buckets (bucket, bucket_seconds, run_id, metric, metric_type,"
        " tags, tags_hash, value, count, nonzero, min, max)"
        " SELECT to_timestamp($1), 10, 'run', 'http_req_duration', 'counter', t,"
        " decode(md5(t::text), 'hex'), 1, 1, 1, 1, 1"
        " FROM generate_series(1, $2) AS i, jsonb_build_object('name', 's' || i) AS t"),
}
SERIES_PER_BUCKET = 90_000  # the bucket


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)


def assert_probes_the_key(plan: dict[str, Any], table: str) -> None:
    """A nested loop over the keys, each key one scan of the unique index by all four
    key columns; nothing that reads the whole bucket."""
    nodes = list(plan_nodes(plan))
    types = {node["Node Type"] for node in nodes}
    assert not types & {"Seq Scan", "Hash Join", "Merge Join", "Bitmap Heap Scan"}, types
    assert "Nested Loop" in types
    scans = [node for node in nodes if node.get("Relation Name") == table]
    assert [(s["Node Type"], s["Index Name"]) for s in scans] == [("Index Scan", f"{table}_key")]
    condition = scans[0]["Index Cond"]
    for column in ("run_id", "metric", "bucket", "tags_hash"):
        assert f"({column} = " in condition, condition
    assert "Filter" not in scans[0]


async def lookup_plans(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...]
                       ) -> list[dict[str, Any]]:
    """The custom plan and the generic plan (the one a prepared statement switches to
    after five runs) of a key lookup, under the planner settings of the sink's
    transactions."""
    async with conn.transaction():
        await conn.execute(KEY_LOOKUP_SETTINGS)
        custom = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
        await conn.execute(f"PREPARE lookup AS {sql}")
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        # EXECUTE takes no parameters of its own: its arguments go in as quoted literals.
        execute = await conn.fetchval(
            "SELECT format('EXECUTE lookup(%L, %L, %L, %L, %L)', $1::text[], $2::text[],"
            " $3::text[], $4::bigint[], $5::text)", *args)
        generic = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {execute}")
        await conn.execute("DEALLOCATE lookup")
    return [orjson.loads(custom)[0]["Plan"], orjson.loads(generic)[0]["Plan"]]


@pytest.mark.parametrize("table", TABLES)
async def test_key_lookups_probe_the_unique_index_whatever_the_statistics(
        dsn: str, table: str) -> None:
    async with sink_for(dsn, table) as sink, sink.pool.acquire() as conn:
        await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        await conn.execute(FILL[table], BUCKET, SERIES_PER_BUCKET)
        # A late batch: half of its keys stored, half not.
        batch = [key(f"s{i}") for i in range(SERIES_PER_BUCKET - 500, SERIES_PER_BUCKET + 500)]
        args = (*key_arrays(batch), "writer-1")  # the keys, then the writer's id

        async def check(statistics: str) -> None:
            for sql in (sink.select_stored, sink.select_positions):
                for plan in await lookup_plans(conn, sql, args):
                    try:
                        assert_probes_the_key(plan, table)
                    except AssertionError:
                        print(statistics, orjson.dumps(plan, option=orjson.OPT_INDENT_2))
                        raise

        await check("never analysed")
        await conn.execute(f"ANALYZE {table}")
        await check("analysed")
        # Statistics that know nothing of the bucket a batch goes to.
        await conn.execute(FILL[table], BUCKET + WIDTH, SERIES_PER_BUCKET)
        args = (*key_arrays([k[:3] + (BUCKET + WIDTH,) for k in batch]), "writer-1")
        await check("stale")


@pytest.mark.parametrize("table", TABLES)
async def test_key_lookups_find_exactly_the_stored_rows(dsn: str, table: str) -> None:
    stored = [key(f"s{i}") for i in range(1500)]
    stored += [key("s1", bucket=BUCKET + WIDTH), key("s1", run_id="other"),
               key("s1", metric="other")]
    absent = [key(f"s{i}") for i in range(1500, 2000)]
    absent += [key("s1", bucket=BUCKET + 2 * WIDTH), key(tags=(("name", "s1"), ("x", "1")))]
    async with sink_for(dsn, table) as sink:
        assert await sink.write(entries_of(table, stored, 3)) == 0
        assert await sink.stored_positions(absent + stored) == dict.fromkeys(stored, 3)
        assert await sink.write(entries_of(table, absent + stored, 4)) == len(stored)
        async with sink.pool.acquire() as conn:
            counts = await conn.fetch(f"SELECT count, count(*) FROM {table} GROUP BY count")
    assert sorted(tuple(r) for r in counts) == [(10, len(absent)), (20, len(stored))]


# --- D. which failures are permanent ------------------------------------------------


def bad_entries(table: str) -> dict[str, BucketKey]:
    """Keys PostgreSQL refuses, each for a reason of its own."""
    return {
        "nul in a tag": key(tags=(("name", "a\x00b"),)),
        "nul in a text column": key(metric="a\x00b"),
        "key beyond a btree entry": key(metric=wide_characters(np.random.default_rng(1), 700)),
        "bucket out of range": key(bucket=10**15),
    }


@pytest.mark.parametrize("table", TABLES)
async def test_data_errors_of_the_database_are_permanent(dsn: str, table: str) -> None:
    expected = {
        "nul in a tag": asyncpg.UntranslatableCharacterError,
        "nul in a text column": asyncpg.CharacterNotInRepertoireError,
        "key beyond a btree entry": asyncpg.ProgramLimitExceededError,
        "bucket out of range": asyncpg.DatetimeFieldOverflowError,
    }
    async with sink_for(dsn, table) as sink:
        for reason, bad in bad_entries(table).items():
            error = await failure_of(sink.write(entries_of(table, [key("good"), bad], 1)))
            assert isinstance(error.__cause__, expected[reason]), (reason, error)
            assert is_permanent(error), (reason, error)
        async with sink.pool.acquire() as conn:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0  # all or nothing


async def test_data_that_cannot_be_encoded_is_permanent(dsn: str) -> None:
    table = "counter_buckets"
    async with sink_for(dsn, table) as sink:
        # A rate of no samples: the value divides by zero in Python.
        empty_rate = {key(): Entry(CounterState("rate", 0.0, 0, 0, 0.0, 0.0, {}), 0, 1)}
        assert is_permanent(await failure_of(sink.write(empty_rate)))
        # A run id that is not text: asyncpg refuses to encode it.
        not_text: Any = {(7, "m", (), BUCKET): Entry(state_of(table), 0, 1)}
        assert is_permanent(await failure_of(sink.write(not_text)))
        # A metric type the table's CHECK refuses.
        odd_kind = {key(): Entry(CounterState("odd", 1.0, 1, 1, 1.0, 1.0, {}), 0, 1)}
        odd_kind_error = await failure_of(sink.write(odd_kind))
        assert isinstance(odd_kind_error.__cause__, asyncpg.CheckViolationError)
        assert is_permanent(odd_kind_error)
        async with sink.pool.acquire() as conn:
            for sql in ("SELECT 'x'::integer", "INSERT INTO counter_buckets (bucket) "
                        "VALUES (now())", "SELECT 1e300::float8::integer"):
                assert is_permanent(translate(await failure_of(conn.fetch(sql)), "")), sql


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_write_cut_off_by_the_server_is_retryable(dsn: str) -> None:
    table = "trend_buckets"
    async with sink_for(dsn, table) as sink:
        await sink.write(entries_of(table, [key()], 1))
        killer = await asyncpg.connect(dsn)
        try:
            async with killer.transaction():
                await killer.execute(f"SELECT * FROM {table} FOR UPDATE")
                # The write waits on the row lock; its connection is terminated meanwhile.
                writing = asyncio.create_task(sink.write(entries_of(table, [key()], 2)))
                waiting = "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"

                async def blocked() -> bool:
                    return bool(await killer.fetchval(waiting))

                await wait_until(blocked)
                await killer.execute(f"SELECT pg_terminate_backend(({waiting}))")
                killed = await failure_of(writing)
        finally:
            await killer.close()
        assert not is_permanent(killed), killed
        assert await sink.write(entries_of(table, [key()], 2)) == 1  # the retry passes


async def test_a_write_that_waits_too_long_for_a_lock_is_retryable(dsn: str) -> None:
    table = "trend_buckets"
    async with sink_for(dsn, table, lock_timeout="100ms") as sink:
        await sink.write(entries_of(table, [key()], 1))
        locker = await asyncpg.connect(dsn)
        try:
            async with locker.transaction():
                await locker.execute(f"SELECT * FROM {table} FOR UPDATE")
                locked = await failure_of(sink.write(entries_of(table, [key()], 2)))
        finally:
            await locker.close()
        assert isinstance(locked.__cause__, asyncpg.LockNotAvailableError)
        assert not is_permanent(locked)
        assert await sink.write(entries_of(table, [key()], 2)) == 1  # the retry passes


async def test_other_failures_of_the_moment_are_retryable(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET statement_timeout = '50ms'")
        cancelled = await failure_of(conn.fetch("SELECT pg_sleep(1)"))
        assert isinstance(cancelled, asyncpg.QueryCanceledError)
        assert not is_permanent(translate(cancelled, ""))
        # A table another release changed or dropped: not the entries' fault.
        assert not is_permanent(translate(
            await failure_of(conn.fetch("SELECT * FROM no_such_table")), ""))
    finally:
        await conn.close()
    assert not is_permanent(translate(await failure_of(conn.fetch("SELECT 1")), ""))  # closed
    assert not is_permanent(translate(await failure_of(serialization_failure(dsn)), ""))
    async with sink_for(dsn, "trend_buckets") as sink:
        pass
    closed_pool = await failure_of(sink.write(entries_of("trend_buckets", [key()], 1)))
    assert not is_permanent(closed_pool)
    refused = await failure_of(asyncpg.connect(host="127.0.0.1", port=free_port(),
                                               user="postgres", timeout=5))
    assert isinstance(refused, OSError)
    assert not is_permanent(translate(refused, ""))


async def serialization_failure(dsn: str) -> None:
    """Two repeatable-read transactions updating the same row: the later one fails."""
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await first.execute("CREATE TABLE IF NOT EXISTS contended (n int);"
                            "INSERT INTO contended VALUES (0)")
        for conn in (first, second):
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            await conn.fetch("SELECT * FROM contended")  # takes the snapshot
        await first.execute("UPDATE contended SET n = 1; COMMIT")
        await second.execute("UPDATE contended SET n = 2")
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize("error", [
    asyncpg.DiskFullError("could not extend file"), asyncpg.OutOfMemoryError("out of memory"),
    asyncpg.TooManyConnectionsError("too many clients"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection"),
    asyncpg.DeadlockDetectedError("deadlock detected"),
    asyncpg.PostgresConnectionError("connection failure"),
    asyncpg.ConnectionDoesNotExistError("connection was closed"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    asyncpg.InternalServerError("internal error"), ConnectionResetError(), TimeoutError(),
    RuntimeError("unforeseen"), KeyError("unforeseen"),
])
def test_errors_that_cannot_be_produced_here_are_retryable(error: BaseException) -> None:
    assert not is_permanent(error)


# --- D. setting aside the entries that can never be written ----------------------------


@pytest.mark.parametrize("table", TABLES)
async def test_write_each_sets_aside_only_the_bad_entries(dsn: str, table: str) -> None:
    bad = bad_entries(table)
    good = [key(f"s{i}") for i in range(40)]
    batch = good[:15] + [bad["nul in a tag"]] + good[15:30] + list(bad.values())[1:] + good[30:]
    async with sink_for(dsn, table) as sink:
        await sink.write(entries_of(table, good[:5], 1))  # stored before: late data
        late, failed = await sink.write_each(entries_of(table, batch, 2))
        assert late == 5
        assert set(failed) == set(bad.values())
        assert all(is_permanent(error) for error in failed.values())
        assert await sink.stored_positions(good) == dict.fromkeys(good, 2)
        assert await sink.write_each(entries_of(table, good, 3)) == (len(good), {})


async def test_write_each_raises_a_retryable_failure(dsn: str) -> None:
    table = "trend_buckets"
    async with sink_for(dsn, table, lock_timeout="100ms") as sink:
        await sink.write(entries_of(table, [key()], 1))
        locker = await asyncpg.connect(dsn)
        try:
            async with locker.transaction():
                await locker.execute(f"SELECT * FROM {table} FOR UPDATE")
                with pytest.raises(StoreError) as raised:
                    await sink.write_each(entries_of(table, [key(), key("b")], 2))
        finally:
            await locker.close()
        assert isinstance(raised.value.__cause__, asyncpg.LockNotAvailableError)
        assert not is_permanent(raised.value)
        assert await sink.stored_positions([key(), key("b")]) == {key(): 1}
