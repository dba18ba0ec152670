"""New rows per second that one PostgreSQL takes from a server's batch write, by batch
size, three ways taking turns in the same run: the writer's COPY into a staging table
and one INSERT from it; one INSERT ... SELECT FROM unnest(column arrays) (the writer
before it); an executemany of one upsert per row (the one before that). Each is timed
whole (the key lookup, the rows' values, the statements) and, for the first two, the
statements alone.

Every row holds a realistic http_req_duration sketch (lognormal latencies, a few hundred
buckets, about 1.5 KB), as received from one partial. Needs the `embedded` extra (a
PostgreSQL of its own, removed at the end).
Usage: python scripts/bench_bulk_write.py [--sizes 1000,10000,100000]
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
from common.store.postgres import (
    PostgresStore,  # noqa: E402
    )
from common.store.postgres.writer import PgBucketWriter  # noqa: E402
from td_server.aggregator import TrendAggregator, TrendState  # noqa: E402

RUN = "bench-bulk"
WIDTH = 10


class TimedWriter(PgBucketWriter):
    """The writer, timing what inserts the new rows (COPY into its staging table and the
    INSERT from it, or with copy_in off the INSERT of arrays): what the database takes,
    apart from building the rows in Python."""

    insert_seconds = 0.0

    async def _insert_new(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        started = time.perf_counter()
        await super()._insert_new(conn, rows)
        TimedWriter.insert_seconds += time.perf_counter() - started


class UpsertEach(PgBucketWriter):
    """The same writer, its new rows sent as one upsert each (executemany)."""

    async def _insert_new(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        await conn.executemany(self.upsert, rows)


def sketch() -> tuple[digest.Centroids, int]:
    values = np.random.default_rng(1).lognormal(np.log(80), 0.6, 5000)
    centroids = digest.from_values(values)
    return centroids, len(digest.encode(centroids))


def batch(count: int, bucket: int, centroids: digest.Centroids) -> dict[BucketKey, Entry[Any]]:
    """Rows of one partial each, as a server holds them: the sketch as received."""
    sketch = digest.encode(centroids)
    return {(RUN, "http_req_duration", (("method", "GET"),
                                        ("name", f"https://shop.example.com/api/items/{i}"),
                                        ("status", "200")), bucket):
            Entry(TrendState(5000, 4e5, 1.0, 1e3, [centroids], 0, sketch=sketch), 0, 1)
            for i in range(count)}


async def measure(sizes: list[int], repeat: int) -> list[str]:
    centroids, blob_bytes = sketch()
    lines = [f"Rows of {len(centroids)} sketch buckets ({blob_bytes:,} bytes of digest) each; "
             f"median of {repeat} runs, the three ways taking turns.", "",
             "| new rows per batch | executemany upserts (rows/s) | one INSERT of arrays "
             "(rows/s) | its INSERT alone | COPY to a staging table, one INSERT (rows/s) | "
             "COPY and INSERT alone | COPY / executemany |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    with temporary_postgres("tdagg-bench-bulk-") as postgres:
        store = PostgresStore(await postgres.create_database("bulk"), "bench")
        await store.open(connections=1)
        await store.ensure_schema()
        bucket = 1_700_000_000
        try:
            for size in sizes:
                rates: dict[str, list[float]] = {"executemany": [], "arrays": [], "copy": [],
                                                 "database": [], "copy_database": []}
                kinds = {"executemany": UpsertEach, "arrays": TimedWriter, "copy": TimedWriter}
                for attempt in range(repeat):
                    ways = list(kinds)
                    for way in ways if attempt % 2 == 0 else reversed(ways):
                        assert store.pool is not None
                        TimedWriter.insert_seconds = 0.0
                        write = kinds[way](store.pool, "bench", TrendAggregator(), WIDTH,
                                           copy_in=way == "copy").write
                        bucket += WIDTH
                        entries = batch(size, bucket, centroids)
                        started = time.perf_counter()
                        late = await write(entries)
                        rates[way].append(size / (time.perf_counter() - started))
                        if way == "arrays":
                            rates["database"].append(size / TimedWriter.insert_seconds)
                        if way == "copy":
                            rates["copy_database"].append(size / TimedWriter.insert_seconds)
                        assert late == 0
                slow, fast, copy = (statistics.median(rates[w]) for w in kinds)
                database = statistics.median(rates["database"])
                copy_database = statistics.median(rates["copy_database"])
                lines.append(f"| {size:,} | {slow:,.0f} | {fast:,.0f} | {database:,.0f} | "
                             f"{copy:,.0f} | {copy_database:,.0f} | {copy / slow:.2f}× |")
                print(lines[-1], file=sys.stderr, flush=True)
        finally:
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
