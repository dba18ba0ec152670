"""Digests merged per second by 1 and by 2 td-servers, measured in one run.

One bucket's burst of dense digests (300 centroids before bucketing): PRODUCERS
producers each send a partial of the same SERIES series, pre-encoded, over TCP at once,
for a bucket that has just ended. Two times are taken from the first frame sent: the
last acknowledgement (parsed, checked and logged), and the moment every row is in
PostgreSQL with every sample (merged, its percentiles computed, written: the burst's
freshness, less the forwarder's 2 s). The servers run with --grace 0. With two servers,
each producer's items are split by the forwarder's own routing (k6_forward.route), and
both servers are fed at the same time. The in-process loop (parse + merge + the row's
values, one core) is measured in the same run as the ceiling of one process.

    python -m scripts.bench_scaling [--producers 16] [--series 1500] [--rounds 3]
                                    [--distinct]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from common import harness, protocol
from common.aggregate import OpenBuckets
from k6_forward.route import rendezvous_order, series_of
from scripts.bench.base import BUCKET_SECONDS, child_env, cpu_seconds, digest_pool, series_tags
from scripts.bench.tcp import Client, frames_of
from td_server.aggregator import TrendAggregator

ITEMS_PER_FRAME = 500


def in_process(frames: list[list[bytes]]) -> float:
    """Seconds for the in-process loop over the frames, and each row's values."""
    aggregator = TrendAggregator()
    buckets: OpenBuckets[Any, Any] = OpenBuckets(aggregator, BUCKET_SECONDS)
    limits = protocol.Limits()
    started = time.perf_counter()
    for producer in frames:
        for frame in producer:
            for item in protocol.parse_data(protocol.unpack(frame[4:]), limits).items:
                buckets.merge("ceiling", "p", aggregator.parse_item(item, limits))
    for entry in buckets.take_all().values():
        aggregator.values(entry.state)
    return time.perf_counter() - started


def split(items: list[list[Any]], servers: list[str]) -> list[list[list[Any]]]:
    """Each item to its series' server, as k6-forward routes them."""
    shares: list[list[list[Any]]] = [[] for _ in servers]
    for item in items:
        shares[rendezvous_order(series_of(item), servers)[0]].append(item)
    return shares


def burst_items(producer: int, series: int, bucket: int, pool: list[Any],
                distinct: bool = False) -> list[list[Any]]:
    """The producer's partials of one bucket: the same series as every other producer's,
    or (``distinct``) series of its own."""
    first = producer * series if distinct else 0
    items = []
    for s in range(first, first + series):
        d = pool[(producer * 31 + s * 7) % len(pool)]
        items.append(["http_req_duration", series_tags(s), bucket, BUCKET_SECONDS, d.count,
                      d.total, d.lo, d.hi, d.blob, 0])
    return items


async def burst(addresses: list[tuple[str, int]], run_id: str,
                per_server: list[list[list[bytes]]], dsn: str, samples: int
                ) -> tuple[float, float]:
    """Seconds from the first frame to the last ack, and to every sample in the
    database; every producer to every server at once."""
    clients = []
    for address, producers in zip(addresses, per_server, strict=True):
        for p in range(len(producers)):
            clients.append((await Client.connect(address, f"{run_id}-p{p}", run_id,
                                                 protocol.ROLE_TD), producers[p]))
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await asyncio.gather(*(client.send_all(frames) for client, frames in clients))
        acked = time.perf_counter() - started
        while True:
            stored = await conn.fetchval("SELECT coalesce(sum(count), 0) FROM trend_buckets "
                                         "WHERE run_id = $1", run_id)
            if stored >= samples:
                return acked, time.perf_counter() - started
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
        for client, _ in clients:
            await client.close()


async def measure(servers: int, dsn: str, root: Path, producers: int, series: int,
                  rounds: int, distinct: bool) -> dict[str, Any]:
    started = [await harness.start_server("td_server", dsn, root / f"{servers}-{i}",
                                          "--grace", "0", "--flush-interval", "0.1",
                                          metrics_listen="", env=child_env())
               for i in range(servers)]
    try:
        addresses = [s.address for s in started]
        names = [f"{host}:{port}" for host, port in addresses]
        pool = digest_pool(64)
        acked, stored, cpu = [], [], []
        for r in range(rounds):
            run_id = f"scale-{servers}-{r}-{time.time_ns()}"
            bucket = (int(time.time()) // BUCKET_SECONDS - 1) * BUCKET_SECONDS
            items = [burst_items(p, series, bucket, pool, distinct) for p in range(producers)]
            samples = sum(item[4] for mine in items for item in mine)
            shares = [split(mine, names) for mine in items]
            per_server = [[frames_of(shares[p][s], ITEMS_PER_FRAME) for p in range(producers)]
                          for s in range(servers)]
            before = [cpu_seconds(s.pid) for s in started]
            ack_s, stored_s = await burst(addresses, run_id, per_server, dsn, samples)
            acked.append(ack_s)
            stored.append(stored_s)
            cpu.append([cpu_seconds(s.pid) - b for s, b in zip(started, before, strict=True)])
        share = [sum(len(shares[p][s]) for p in range(producers)) for s in range(servers)]
    finally:
        for server in started:
            await server.stop(180)
    total = producers * series
    best = min(stored)
    return {"servers": servers, "digests": total, "share": share, "acked": acked,
            "stored": stored, "per_s": total / best,
            "median_per_s": total / statistics.median(stored),
            "server_cpu": cpu[stored.index(best)]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--producers", type=int, default=16)
    parser.add_argument("--series", type=int, default=1500, help="series per producer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--distinct", action="store_true",
                        help="each producer's series are its own (a row per partial)")
    args = parser.parse_args()
    pool = digest_pool(64)
    bucket = (int(time.time()) // BUCKET_SECONDS - 1) * BUCKET_SECONDS
    sample = [burst_items(p, args.series, bucket, pool, args.distinct)
              for p in range(args.producers)]
    frames = [frames_of(items, ITEMS_PER_FRAME) for items in sample]
    ceiling = args.producers * args.series / min(
        in_process(frames) for _ in range(2))
    with tempfile.TemporaryDirectory(prefix="tdagg-scaling-") as tmp, \
            harness.temporary_postgres() as postgres:
        dsn = await postgres.create_database("scaling")
        results = [await measure(n, dsn, Path(tmp), args.producers, args.series, args.rounds,
                                 args.distinct) for n in (1, 2, 1, 2)]
    print(f"in-process loop (one core, parse + merge + row values): {ceiling:,.0f} digests/s")
    for n in (1, 2):
        runs = [r for r in results if r["servers"] == n]
        best = max(runs, key=lambda r: r["per_s"])
        print(f"{n} td-server(s): {best['per_s']:,.0f} digests/s into the database (best), "
              f"{statistics.median([r['median_per_s'] for r in runs]):,.0f} (median of "
              f"runs' medians); burst of {best['digests']:,} stored in "
              f"{min(best['stored']):.2f} s, acknowledged in "
              f"{best['acked'][best['stored'].index(min(best['stored']))]:.2f} s; items per "
              f"server {best['share']}; server CPU "
              f"{[round(c, 2) for c in best['server_cpu']]} s")
    one = max(r["per_s"] for r in results if r["servers"] == 1)
    two = max(r["per_s"] for r in results if r["servers"] == 2)
    print(f"2 servers / 1 server: {two / one:.2f}x; 1 server / in-process loop: "
          f"{one / ceiling:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
