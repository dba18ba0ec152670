"""tdagg's rows in PostgreSQL and in ClickHouse against raw samples in ClickHouse.

    python scripts/bench_clickhouse.py [--duration 30s] [--copies 20] [--repeats 5]

Records a real k6 run (common.harness: the HTTP target, load.js, ``k6 run --out json``),
takes every Trend sample of it (``--copies`` times, each copy shifted by the recording's
span, as a longer run), and stores them three ways, in one process, one after another:

* tdagg rows in PostgreSQL (embedded): one row per (metric, name tag, 10 s bucket), its
  sketch built as the forwarder builds it, written by the servers' store writer;
* the same rows in ClickHouse 18.16 (clickhouse-server, started here), by the ClickHouse
  store's writer;
* every raw sample in ClickHouse 18.16: ``raw_samples (metric, name, time, value)``,
  MergeTree ordered by (metric, time), inserted in blocks of 100,000 (columnar).

It reports rows, bytes on disk (after OPTIMIZE FINAL / VACUUM) and ingest seconds; then
the query time (median of --repeats) of p95 of http_req_duration per 10 s bucket and per
minute across all tag sets: tdagg's SQL over the sketches (docs/CLICKHOUSE.md) against
quantileExact over the raw samples in the same ClickHouse, and PostgreSQL's
tdagg_percentile; ratios against the first. Every tdagg figure is checked against
numpy's quantile of the raw samples. Prints Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import digest  # noqa: E402
from common.aggregate import Entry  # noqa: E402
from common.harness import http_target, record, temporary_postgres  # noqa: E402
from common.protocol import TrendPartial  # noqa: E402
from common.store import Store, open_store  # noqa: E402
from common.store.clickhouse import ClickHouseStore  # noqa: E402
from common.store.clickhouse.percentiles import percentile_sql  # noqa: E402
from common.timebucket import parse_epoch_ns  # noqa: E402
from td_server.aggregator import TrendAggregator  # noqa: E402
from tests.clickhouse_server import clickhouse  # noqa: E402

RUN = "bench-ch"
METRIC = "http_req_duration"
BATCH = 2000  # rows per store write, as a server's flush of a busy run

Sample = tuple[str, str, float, float]  # metric, name tag, epoch seconds, value


def load(path: Path, copies: int) -> list[Sample]:
    kinds: dict[str, str] = {}
    samples: list[Sample] = []
    for line in path.read_bytes().splitlines():
        if not line.startswith(b"{"):
            continue
        obj = orjson.loads(line)
        if obj["type"] == "Metric":
            kinds[obj["data"]["name"]] = obj["data"]["type"]
        elif kinds.get(obj["metric"]) == "trend":
            data = obj["data"]
            samples.append((obj["metric"], (data.get("tags") or {}).get("name", ""),
                            parse_epoch_ns(data["time"]) / 1e9, float(data["value"])))
    first = min(s[2] for s in samples)
    span = float(np.ceil(max(s[2] for s in samples) - first)) + 10.0
    return [(m, n, t + copy * span, v) for copy in range(copies) for m, n, t, v in samples]


def entries(samples: list[Sample]) -> dict[Any, Entry[Any]]:
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for metric, name, t, value in samples:
        groups[(metric, name, int(t) // 10 * 10)].append(value)
    aggregator = TrendAggregator()
    out = {}
    for position, ((metric, name, bucket), values) in enumerate(sorted(groups.items()), 1):
        array = np.array(values)
        centroids, zeros = digest.split_zeros(array)
        partial = TrendPartial(metric, (("name", name),), bucket, 10, len(array),
                               float(np.sum(array)), float(array.min()), float(array.max()),
                               centroids, zeros)
        out[(RUN, metric, partial.tags, bucket)] = Entry(
            aggregator.new_state(partial, "bench"), 0, position)
    return out


async def ingest(store: Store, batch: dict[Any, Entry[Any]]) -> float:
    await store.ensure_schema()
    writer = store.writer(TrendAggregator(), 10)
    items = list(batch.items())
    began = time.perf_counter()
    for i in range(0, len(items), BATCH):
        await writer.write(dict(items[i:i + BATCH]))
    return time.perf_counter() - began


async def timed(repeats: int, call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = await call()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


RAW_DDL = ("CREATE TABLE IF NOT EXISTS {db}.raw_samples (metric String, name String, "
           "time DateTime('UTC'), ns UInt32, value Float64) ENGINE = MergeTree "
           "ORDER BY (metric, time)")
PG_SQL = ("SELECT {group} AS t, tdagg_percentile(0.95, array_agg(digest), sum(zeros), "
          "min(min), max(max)) FROM trend_buckets WHERE run_id = $1 AND metric = $2 "
          "GROUP BY 1 ORDER BY 1")


async def measure(samples: list[Sample], repeats: int) -> list[str]:
    batch = entries(samples)
    lines: list[str] = []
    ingest_rows: list[tuple[str, int, int | None, float]] = []
    with tempfile.TemporaryDirectory(prefix="tdagg-bench-ch-") as tmp, \
            temporary_postgres("tdagg-bench-pg-") as postgres, clickhouse() as server:
        pg_dsn = await postgres.create_database("bench")
        ch_dsn = server.dsn("bench")
        pg = open_store(pg_dsn)
        ch = open_store(ch_dsn)
        await pg.open(2)
        await ch.open(2)
        assert isinstance(ch, ClickHouseStore)
        try:
            seconds = await ingest(pg, batch)
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute("VACUUM ANALYZE")
            finally:
                await conn.close()
            footprint = await pg.footprint()
            ingest_rows.append(("tdagg rows in PostgreSQL 17 (embedded)", footprint.rows,
                                footprint.bytes, seconds))

            seconds = await ingest(ch, batch)
            await ch.engine.execute(f"OPTIMIZE TABLE {ch.table('trend_buckets')} FINAL")
            footprint = await ch.footprint()
            ingest_rows.append(("tdagg rows in ClickHouse 18.16", footprint.rows,
                                footprint.bytes, seconds))

            await ch.engine.execute(RAW_DDL.format(db="bench"))
            ordered = sorted(samples, key=lambda s: (s[0], s[2]))
            began = time.perf_counter()
            for i in range(0, len(ordered), 100_000):
                chunk = ordered[i:i + 100_000]
                await ch.engine.insert("bench.raw_samples",
                                       ("metric", "name", "time", "ns", "value"),
                                       [(m, n, int(t), int((t % 1) * 1e9), v)
                                        for m, n, t, v in chunk])
            seconds = time.perf_counter() - began
            await ch.engine.execute("OPTIMIZE TABLE bench.raw_samples FINAL")
            ((raw_bytes,),) = await ch.engine.query(
                "SELECT sum(bytes_on_disk) FROM system.parts WHERE active AND "
                "database = 'bench' AND table = 'raw_samples'")
            ingest_rows.append(("raw samples in ClickHouse 18.16", len(samples),
                                int(raw_bytes), seconds))

            lines += [f"{len(samples):,} Trend samples ({len({s[0] for s in samples})} "
                      f"metrics), {len(batch):,} tdagg rows.", "",
                      "| store | rows | bytes on disk | ingest, s |", "|---|---:|---:|---:|"]
            for name, rows, size, took in ingest_rows:
                lines.append(f"| {name} | {rows:,} | {size or 0:,} | {took:.2f} |")
            lines += ["", f"Raw samples against tdagg rows in ClickHouse: "
                          f"{ingest_rows[2][2] / (ingest_rows[1][2] or 1):.1f}x the bytes, "
                          f"{ingest_rows[2][3] / ingest_rows[1][3]:.2f}x the ingest time; "
                          f"tdagg in ClickHouse against PostgreSQL: "
                          f"{(ingest_rows[1][2] or 0) / (ingest_rows[0][2] or 1):.2f}x the "
                          f"bytes, {ingest_rows[1][3] / ingest_rows[0][3]:.2f}x the time.", ""]
            lines += await queries(ch, pg_dsn, samples, repeats)
        finally:
            await pg.close()
            await ch.close()
        del tmp
    return lines


async def queries(ch: ClickHouseStore, pg_dsn: str, samples: list[Sample],
                  repeats: int) -> list[str]:
    table = ch.table("trend_buckets")
    where = f"run_id = '{RUN}' AND metric = '{METRIC}'"
    raw = {10: defaultdict(list), 60: defaultdict(list)}
    for metric, _, t, value in samples:
        if metric == METRIC:
            for width, groups in raw.items():
                groups[int(t) // width * width].append(value)
    lines = [f"p95 of {METRIC} across all tag sets, median of {repeats} (seconds):", "",
             "| per | tdagg SQL, ClickHouse | quantileExact over raw samples, ClickHouse | "
             "ratio raw / tdagg | tdagg_percentile, PostgreSQL | ratio PostgreSQL / "
             "ClickHouse | worst difference to numpy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    conn = await asyncpg.connect(pg_dsn)
    try:
        for width, label in ((10, "10 s bucket"), (60, "minute")):
            group = ("toUInt32(bucket)" if width == 10
                     else "toUInt32(toStartOfMinute(bucket))")
            sketch_time, rows = await timed(repeats, lambda g=group: ch.engine.query(
                percentile_sql(table, 0.95, where, g)))
            raw_sql = (f"SELECT intDiv(toUInt32(time), {width}) * {width} AS t, "
                       f"quantileExact(0.95)(value) FROM bench.raw_samples WHERE metric = "
                       f"'{METRIC}' GROUP BY t ORDER BY t")
            raw_time, _ = await timed(repeats, lambda s=raw_sql: ch.engine.query(s))
            pg_group = ("extract(epoch FROM bucket)::bigint" if width == 10 else
                        "extract(epoch FROM date_trunc('minute', bucket))::bigint")
            pg_time, pg_rows = await timed(repeats, lambda g=pg_group: conn.fetch(
                PG_SQL.format(group=g), RUN, METRIC))
            worst = 0.0
            for t, value in rows:
                exact = float(np.quantile(raw[width][int(t)], 0.95))
                worst = max(worst, abs(float(value) - exact) / abs(exact))
            same = all(abs(float(a[1]) - b[1]) <= 1e-9 * abs(b[1])
                       for a, b in zip(rows, pg_rows, strict=True))
            assert same, "ClickHouse and PostgreSQL disagree"
            lines.append(f"| {label} ({len(rows)} groups) | {sketch_time:.4f} | "
                         f"{raw_time:.4f} | {raw_time / sketch_time:.2f} | {pg_time:.4f} | "
                         f"{pg_time / sketch_time:.2f} | {100 * worst:.3f} % |")
    finally:
        await conn.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", default="30s", help="k6 run length (default 30s)")
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    async def run() -> list[str]:
        with tempfile.TemporaryDirectory(prefix="tdagg-bench-rec-") as tmp:
            out = Path(tmp) / "run.json"
            async with http_target() as base:
                code, err = await record("load.js", out, base, args.duration)
            if code != 0:
                raise SystemExit(f"k6 failed ({code}): {err}")
            samples = load(out, args.copies)
        return await measure(samples, args.repeats)

    print("\n".join(asyncio.run(run())))


if __name__ == "__main__":
    main()
