"""p95 per minute over a whole k6 run, across all tag sets, three ways, as ratios.

    python scripts/bench_sql_percentiles.py --input RUN.json [--copies 2] [--repeats 3]

The Trend samples of the recording (``--copies`` times, each copy shifted by the
recording's span, as a longer run) are stored twice in one embedded PostgreSQL:

* as tdagg stores them: one row per (metric, name tag, 10 s bucket), its sketch built as
  the forwarder builds it and written by the servers' own store writer;
* raw: every sample in a ``raw_samples`` table (the baseline a user without tdagg has).

Then p95 of ``http_req_duration`` per minute across all tag sets is computed by
``tdagg_percentile`` in SQL, by ``percentile_cont`` over the raw samples, and by
td-report's numpy read of the same rows (fetch, decode, ``TrendAccumulator``); each the
median of --repeats, and the two alternatives as ratios against the SQL function. The
figures are checked against numpy on the raw samples (the accuracy criterion). Prints
Markdown. Needs the ``embedded`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import statistics
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_late_read import embedded_postgres  # noqa: E402

from common import digest  # noqa: E402
from common.aggregate import Entry  # noqa: E402
from common.protocol import TrendPartial  # noqa: E402
from common.store.postgres import PostgresStore  # noqa: E402
from common.timebucket import parse_epoch_ns  # noqa: E402
from td_report.summary import TrendAccumulator  # noqa: E402
from td_server.aggregator import TrendAggregator  # noqa: E402

METRIC = "http_req_duration"
RUN = "bench-sql"


def load(path: Path, copies: int) -> list[tuple[float, str, float]]:
    """(epoch seconds, name tag, value) of every METRIC sample, ``copies`` times."""
    opener = gzip.open if path.suffix == ".gz" else open
    samples = []
    with opener(path, "rb") as stream:
        for line in stream:
            if METRIC.encode() not in line:
                continue
            sample = orjson.loads(line)
            if sample.get("type") != "Point" or sample.get("metric") != METRIC:
                continue
            data = sample["data"]
            seconds = parse_epoch_ns(data["time"]) / 1e9
            samples.append((seconds, (data.get("tags") or {}).get("name", ""),
                            float(data["value"])))
    first = min(s[0] for s in samples)
    span = float(np.ceil(max(s[0] for s in samples) - first))
    return [(t + copy * span, name, v) for copy in range(copies) for t, name, v in samples]


async def store(dsn: str, samples: list[tuple[float, str, float]]) -> None:
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for t, name, value in samples:
        groups[(name, int(t) // 10 * 10)].append(value)
    aggregator = TrendAggregator()
    entries = {}
    for (name, bucket), values in groups.items():
        array = np.array(values)
        centroids, zeros = digest.split_zeros(array)
        partial = TrendPartial(METRIC, (("name", name),), bucket, 10, len(array),
                               float(np.sum(array)), float(array.min()), float(array.max()),
                               centroids, zeros)
        entries[(RUN, METRIC, partial.tags, bucket)] = Entry(
            aggregator.new_state(partial, "bench"), 0, 1)
    store = PostgresStore(dsn, "bench")
    await store.open(connections=2)
    try:
        await store.ensure_schema()
        assert store.pool is not None
        async with store.pool.acquire() as conn:
            await conn.execute("CREATE TABLE raw_samples (time timestamptz, name text, "
                               "value float8)")
            await conn.copy_records_to_table(
                "raw_samples", records=[(datetime.fromtimestamp(t, UTC), n, v)
                                        for t, n, v in samples],
                columns=("time", "name", "value"))
            await conn.execute("ANALYZE")
        await store.writer(aggregator, 10).write(entries)
    finally:
        await store.close()


SQL_FUNCTION = (
    "SELECT date_trunc('minute', bucket) AS minute, tdagg_percentile(0.95, array_agg(digest), "
    "sum(zeros), min(min), max(max)) AS p95 FROM trend_buckets WHERE run_id = $1 AND "
    "metric = $2 GROUP BY 1 ORDER BY 1")
RAW = ("SELECT date_trunc('minute', time) AS minute, percentile_cont(0.95) WITHIN GROUP "
       "(ORDER BY value) AS p95 FROM raw_samples GROUP BY 1 ORDER BY 1")
ROWS = ("SELECT date_trunc('minute', bucket) AS minute, count, sum, min, max, zeros, digest "
        "FROM trend_buckets WHERE run_id = $1 AND metric = $2 ORDER BY 1")


async def numpy_read(conn: asyncpg.Connection) -> list[tuple[object, float]]:
    minutes: dict[object, TrendAccumulator] = {}
    for row in await conn.fetch(ROWS, RUN, METRIC):
        acc = minutes.setdefault(row["minute"], TrendAccumulator())
        acc.add(row["count"], row["sum"], row["min"], row["max"], row["zeros"],
                digest.decode(row["digest"]))
    return [(m, acc.quantiles([0.95])[0]) for m, acc in minutes.items()]


async def measure(dsn: str, samples: list[tuple[float, str, float]], repeats: int
                  ) -> list[str]:
    await store(dsn, samples)
    conn = await asyncpg.connect(dsn)
    timings: dict[str, list[float]] = defaultdict(list)
    results = {}
    try:
        for _ in range(repeats):
            for name, run in (
                    ("tdagg_percentile (SQL, merged sketches)",
                     lambda: conn.fetch(SQL_FUNCTION, RUN, METRIC)),
                    ("percentile_cont over raw samples", lambda: conn.fetch(RAW)),
                    ("td-report's numpy read of the rows", lambda: numpy_read(conn))):
                began = time.perf_counter()
                results[name] = [tuple(r) for r in await run()]
                timings[name].append(time.perf_counter() - began)
        rows = await conn.fetchval("SELECT count(*) FROM trend_buckets")
    finally:
        await conn.close()
    # The figures: tdagg's two reads agree, and meet the criterion against the raw p95.
    by_minute: dict[object, list[float]] = defaultdict(list)
    for t, _, v in samples:
        by_minute[np.datetime64(int(t) // 60 * 60, "s")].append(v)
    sql = results["tdagg_percentile (SQL, merged sketches)"]
    numpy_figures = results["td-report's numpy read of the rows"]
    worst = max(abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(sql, numpy_figures, strict=True))
    raw = results["percentile_cont over raw samples"]
    worst_raw = max(abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(sql, raw, strict=True))
    base = statistics.median(timings["tdagg_percentile (SQL, merged sketches)"])
    lines = [f"{len(samples):,} samples of {METRIC}, {rows:,} stored rows, "
             f"{len(sql)} minutes; median of {repeats}.", "",
             "| way | seconds | ratio to the SQL function |", "|---|---:|---:|"]
    for name, values in timings.items():
        lines.append(f"| {name} | {statistics.median(values):.3f} | "
                     f"{statistics.median(values) / base:.2f} |")
    lines += ["", f"SQL against the numpy read: worst relative difference {worst:.2e}; "
                  f"against percentile_cont on the raw samples: {100 * worst_raw:.3f} %."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, required=True, help="a k6 --out json file")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    samples = load(args.input, args.copies)
    with embedded_postgres() as server:
        lines = asyncio.run(measure(str(server.get_uri()), samples, args.repeats))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
