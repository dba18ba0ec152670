"""5. A real k6 recording at >= 1000 requests/s, recorded by this run, ingested through
tdagg against every raw sample COPYed into one table: rows, bytes, ingest seconds; then
p95 per 10 s bucket read from tdagg's rows against percentile_cont over the raw table."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncpg
import orjson

from common import harness
from common.timebucket import parse_epoch_ns
from scripts.bench.base import (
    TAG_KEYS,
    BenchError,
    Plan,
    Recording,
    child_env,
    forwarder_done,
    record,
)
from scripts.bench.storage_reads import Footprint, Series, TdaggReads

RUN_ID = "recorded"
METRIC = "http_req_duration"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
RawRecord = tuple[dt.datetime, str, str, float]
T = TypeVar("T")


@dataclass
class TdaggIngest:
    footprint: Footprint
    seconds: float  # from the forwarder's start until both servers wrote and exited
    forwarder_seconds: float
    forwarder: dict[str, int]


@dataclass
class RawIngest:
    rows: int
    copied: int
    seconds: float
    bytes: int
    bytes_with_index: int
    index_seconds: float


@dataclass
class QueryResult:
    metric: str
    series: dict[str, str]
    series_samples: int
    all_samples: int
    tag_sets: int
    buckets: int
    runs: int
    stored_series_s: float
    raw_series_s: float
    merged_all_s: float
    raw_all_s: float
    series_worst_rel_vs_raw: float
    all_worst_rel_vs_raw: float

    @property
    def series_ratio(self) -> float:
        return self.raw_series_s / self.stored_series_s

    @property
    def all_ratio(self) -> float:
        return self.raw_all_s / self.merged_all_s


@dataclass
class StorageResult:
    recording: Recording
    tdagg: TdaggIngest
    raw: RawIngest
    query: QueryResult

    @property
    def rows_ratio(self) -> float:
        return self.raw.rows / self.tdagg.footprint.rows

    @property
    def bytes_ratio(self) -> float:
        assert self.tdagg.footprint.bytes, "the store reports no bytes on disk"
        return self.raw.bytes / self.tdagg.footprint.bytes

    @property
    def ingest_ratio(self) -> float:
        return self.raw.seconds / self.tdagg.seconds


# --- tdagg ----------------------------------------------------------------------------


async def tdagg_ingest(workdir: Path, dsn: str, recording: Path) -> TdaggIngest:
    """k6-forward on the recording into fresh td-server and non-td-server; the seconds run
    from the forwarder's start until both servers have written every bucket and exited."""
    env = child_env()
    td = await harness.start_server("td_server", dsn, workdir, metrics_listen="", env=env)
    non_td = await harness.start_server("non_td_server", dsn, workdir, metrics_listen="",
                                        env=env)
    fwd_log = workdir / "ingest-forwarder.log"
    try:
        started = time.perf_counter()
        with open(fwd_log, "wb") as err:
            forwarder = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "k6_forward", "--run-id", RUN_ID,
                "--td", f"{td.address[0]}:{td.address[1]}",
                "--non-td", f"{non_td.address[0]}:{non_td.address[1]}",
                "--spool-dir", str(workdir / "spool"), str(recording), env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=err)
            try:
                code = await asyncio.wait_for(forwarder.wait(), 600)
            except TimeoutError:
                forwarder.kill()
                await forwarder.wait()
                raise BenchError("k6-forward did not finish within 600 s") from None
        forwarder_seconds = time.perf_counter() - started
        if code != 0:
            raise BenchError(f"k6-forward exited {code}:\n{fwd_log.read_text()[-2000:]}")
    finally:
        codes = [await server.stop(120) for server in (td, non_td)]
    seconds = time.perf_counter() - started
    for server, exit_code in zip((td, non_td), codes, strict=True):
        if exit_code != 0:
            raise BenchError(f"{server.name} exited {exit_code}:\n{server.log_tail()}")
    reads = await TdaggReads.connect(dsn, RUN_ID)
    try:
        footprint = await reads.footprint()
    finally:
        await reads.close()
    return TdaggIngest(footprint, seconds, forwarder_seconds,
                       forwarder_done(fwd_log.read_text()))


# --- the raw-sample baseline (plain SQL) -------------------------------------------


def raw_batches(recording: Path, size: int = 100_000) -> Iterator[list[RawRecord]]:
    """(ts, metric, tags as JSON text, value) of every Point line, ``size`` at a time."""
    loads, dumps = orjson.loads, orjson.dumps
    batch: list[RawRecord] = []
    with open(recording, "rb") as f:
        for line in f:
            obj = loads(line)
            if obj.get("type") != "Point":
                continue
            data = obj["data"]
            ts = _EPOCH + dt.timedelta(microseconds=parse_epoch_ns(data["time"]) // 1000)
            batch.append((ts, obj["metric"], dumps(data.get("tags") or {}).decode(),
                          float(data["value"])))
            if len(batch) >= size:
                yield batch
                batch = []
    if batch:
        yield batch


async def _table_bytes(conn: asyncpg.Connection, table: str) -> int:
    return int(await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table))


async def raw_ingest(dsn: str, recording: Path) -> RawIngest:
    """Every Point sample COPYed into samples(ts, metric, tags, value): parse + COPY."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE samples (ts timestamptz, metric text, tags jsonb, "
                           "value double precision)")
        columns = ("ts", "metric", "tags", "value")
        rows = 0
        started = time.perf_counter()
        for batch in raw_batches(recording):
            await conn.copy_records_to_table("samples", records=batch, columns=columns)
            rows += len(batch)
        seconds = time.perf_counter() - started
        await conn.execute("ANALYZE samples")
        table_bytes = await _table_bytes(conn, "samples")
        started = time.perf_counter()
        await conn.execute("CREATE INDEX samples_metric_ts ON samples (metric, ts)")
        await conn.execute("ANALYZE samples")
        index_seconds = time.perf_counter() - started
        with_index = await _table_bytes(conn, "samples")
        count = int(await conn.fetchval("SELECT count(*) FROM samples"))
    finally:
        await conn.close()
    return RawIngest(count, rows, seconds, table_bytes, with_index, index_seconds)


def _tag_predicate(tags: dict[str, str], first_param: int) -> tuple[str, list[str]]:
    """SQL over samples.tags selecting exactly the series tdagg groups as ``tags``."""
    clauses, params = [], []
    for key in TAG_KEYS:
        if key in tags:
            params.append(tags[key])
            clauses.append(f"tags->>'{key}' = ${first_param + len(params) - 1}")
        else:
            clauses.append(f"NOT tags ? '{key}'")
    return " AND ".join(clauses), params


async def _median_seconds(runs: int, query: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    result = await query()  # warm-up: caches and plans, not timed
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = await query()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def _worst_relative(ours: Series, exact: Series) -> float:
    truth = dict(exact)
    errors = [abs(v - truth[b]) / abs(truth[b]) for b, v in ours if truth.get(b)]
    return max(errors, default=math.nan)


async def queries(dsn: str, runs: int) -> QueryResult:
    reads = await TdaggReads.connect(dsn, RUN_ID)
    conn = await asyncpg.connect(dsn)
    try:
        series = await reads.busiest_series(METRIC)
        if series is None:
            raise BenchError(f"no {METRIC} rows were stored")
        predicate, params = _tag_predicate(series, 2)
        bin_sql = "date_bin('10 seconds', ts, timestamptz 'epoch')"

        async def raw_series() -> Series:
            rows = await conn.fetch(
                f"SELECT {bin_sql} AS b, percentile_cont(0.95) WITHIN GROUP (ORDER BY value) "
                f"FROM samples WHERE metric = $1 AND {predicate} GROUP BY b ORDER BY b",
                METRIC, *params)
            return [(r[0], r[1]) for r in rows]

        async def raw_all() -> Series:
            rows = await conn.fetch(
                f"SELECT {bin_sql} AS b, percentile_cont(0.95) WITHIN GROUP (ORDER BY value) "
                "FROM samples WHERE metric = $1 GROUP BY b ORDER BY b", METRIC)
            return [(r[0], r[1]) for r in rows]

        t_stored, stored = await _median_seconds(
            runs, lambda: reads.stored_p95(METRIC, series))
        t_raw_series, exact_series = await _median_seconds(runs, raw_series)
        t_merged, merged = await _median_seconds(runs, lambda: reads.merged_p95(METRIC))
        t_raw_all, exact_all = await _median_seconds(runs, raw_all)
        samples_series = int(await conn.fetchval(
            f"SELECT count(*) FROM samples WHERE metric = $1 AND {predicate}", METRIC,
            *params))
        samples_all = int(await conn.fetchval(
            "SELECT count(*) FROM samples WHERE metric = $1", METRIC))
        tag_sets = await reads.tag_sets(METRIC)
    finally:
        await conn.close()
        await reads.close()
    return QueryResult(
        metric=METRIC, series=series, series_samples=samples_series, all_samples=samples_all,
        tag_sets=tag_sets, buckets=len(stored), runs=runs, stored_series_s=t_stored,
        raw_series_s=t_raw_series, merged_all_s=t_merged, raw_all_s=t_raw_all,
        series_worst_rel_vs_raw=_worst_relative(stored, exact_series),
        all_worst_rel_vs_raw=_worst_relative(merged, exact_all))


async def run(plan: Plan, postgres: harness.Postgres, target: harness.HttpTarget,
              workdir: Path, log: Callable[[str], None]) -> StorageResult:
    workdir.mkdir()
    recorded = await record(workdir, "storage", target.base, plan.record_seconds, 500, 150)
    log(f"  recorded {recorded.http_reqs} requests at {recorded.http_reqs_per_s:.0f}/s, "
        f"{recorded.bytes / 1e6:.0f} MB")
    dsn = await postgres.create_database("bench_storage")
    tdagg = await tdagg_ingest(workdir, dsn, recorded.path)
    log(f"  tdagg: {tdagg.footprint.rows} rows, {tdagg.footprint.bytes} bytes, "
        f"{tdagg.seconds:.1f} s")
    raw = await raw_ingest(dsn, recorded.path)
    log(f"  raw: {raw.rows} rows, {raw.bytes} bytes, {raw.seconds:.1f} s")
    query = await queries(dsn, plan.query_runs)
    recorded.path.unlink()
    return StorageResult(recorded, tdagg, raw, query)


