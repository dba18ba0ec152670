"""Servers over real loopback sockets writing to a real PostgreSQL."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from common import digest, protocol
from common.protocol import CounterPartial, TrendPartial
from tests.utils import Client, fetch, quantile_ok, run_server, wait_until

OLD_BUCKET = (int(time.time()) - 3600) // 10 * 10  # past, so the flush loop closes it at once


def trend_item(values: np.ndarray, bucket: int = OLD_BUCKET, metric: str = "http_req_duration",
               tags: tuple[tuple[str, str], ...] = (("name", "a"),)) -> list[object]:
    return protocol.trend_item(TrendPartial(
        metric, tags, bucket, 10, len(values), math.fsum(values), float(values.min()),
        float(values.max()), digest.from_values(values)))


def counter_item(kind: str, values: list[float], last_ns: int, bucket: int = OLD_BUCKET,
                 metric: str = "m") -> list[object]:
    return protocol.counter_item(CounterPartial(
        metric, kind, (), bucket, 10, math.fsum(values), len(values),
        sum(1 for v in values if v), min(values), max(values), last_ns, values[-1]))


async def test_two_producers_merge_into_one_row(dsn: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    parts = [rng.lognormal(2, 1, 3000), rng.lognormal(2.5, 0.5, 2000)]
    async with run_server(dsn, tmp_path, grace=0) as server:
        for part in parts:
            client = await Client.connect(server.address, run_id="r1")
            answer = await client.send(1, [trend_item(part)])
            assert answer == {"type": "ack", "seq": 1}
            await client.close()

        async def written() -> bool:
            return server.stats.buckets_written >= 1 and not server.open.entries

        await wait_until(written)
    rows = await fetch(dsn, "SELECT * FROM trend_buckets")
    assert len(rows) == 1
    row = rows[0]
    everything = np.concatenate(parts)
    assert row["count"] == len(everything)
    assert row["min"] == everything.min()
    assert row["max"] == everything.max()
    assert row["sum"] == pytest.approx(everything.sum(), rel=1e-12)
    assert row["run_id"] == "r1"
    assert row["bucket"].timestamp() == OLD_BUCKET
    for q, column in ((0.5, "p50"), (0.9, "p90"), (0.95, "p95"), (0.99, "p99")):
        assert quantile_ok(everything, q, row[column]), (q, row[column])
    stored = digest.decode(row["digest"])
    assert stored[:, 1].sum() == pytest.approx(len(everything))


async def test_late_data_merges_into_stored_row(dsn: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    first, late = rng.normal(100, 10, 2000), rng.normal(300, 10, 2000)
    async with run_server(dsn, tmp_path, grace=0) as server:
        client = await Client.connect(server.address)
        await client.send(1, [trend_item(first)])

        async def first_written() -> bool:
            return server.stats.buckets_written == 1

        await wait_until(first_written)
        await client.send(2, [trend_item(late)])

        async def late_written() -> bool:
            return server.stats.late_rows == 1

        await wait_until(late_written)
        await client.close()
    rows = await fetch(dsn, "SELECT count, min, max, p50, p90 FROM trend_buckets")
    assert len(rows) == 1
    both = np.concatenate([first, late])
    assert rows[0]["count"] == 4000
    assert rows[0]["min"] == both.min()
    assert rows[0]["max"] == both.max()
    assert quantile_ok(both, 0.9, rows[0]["p90"])


async def test_counters_gauges_rates(dsn: str, tmp_path: Path) -> None:
    base_ns = OLD_BUCKET * 10**9
    async with run_server(dsn, tmp_path, role=protocol.ROLE_NON_TD, grace=0) as server:
        a = await Client.connect(server.address, role=protocol.ROLE_NON_TD, producer="gen-a")
        b = await Client.connect(server.address, role=protocol.ROLE_NON_TD, producer="gen-b")
        await a.send(1, [counter_item("counter", [1, 1, 1], base_ns, metric="reqs"),
                         counter_item("rate", [1, 0, 1, 1], base_ns, metric="ok"),
                         counter_item("gauge", [3, 9, 5], base_ns + 5, metric="vus")])
        await b.send(1, [counter_item("counter", [1, 1], base_ns, metric="reqs"),
                         counter_item("rate", [0, 0], base_ns, metric="ok"),
                         counter_item("gauge", [7, 2], base_ns + 7, metric="vus")])
        # An older gauge sample from gen-a arrives later: it must not replace 5.
        await a.send(2, [counter_item("gauge", [40], base_ns + 1, metric="vus")])

        async def done() -> bool:
            return server.stats.buckets_written + server.stats.late_rows >= 3 and \
                not server.open.entries and not server.closing

        await wait_until(done)
        await a.close()
        await b.close()
    rows = {r["metric"]: r for r in await fetch(dsn, "SELECT * FROM counter_buckets")}
    assert rows["reqs"]["value"] == 5
    assert rows["reqs"]["count"] == 5
    assert rows["ok"]["nonzero"] == 3
    assert rows["ok"]["count"] == 6
    assert rows["ok"]["value"] == pytest.approx(3 / 6)
    assert rows["vus"]["value"] == 5 + 2
    assert rows["vus"]["min"] == 2
    assert rows["vus"]["max"] == 40
    assert rows["vus"]["metric_type"] == "gauge"


async def test_duplicate_sequence_is_counted_once(dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, role=protocol.ROLE_NON_TD, grace=0) as server:
        client = await Client.connect(server.address, role=protocol.ROLE_NON_TD, producer="p")
        item = counter_item("counter", [2, 3], OLD_BUCKET * 10**9)
        assert (await client.send(1, [item]))["seq"] == 1
        assert (await client.send(1, [item]))["seq"] == 1
        await client.close()
        again = await Client.connect(server.address, role=protocol.ROLE_NON_TD, producer="p")
        assert (await again.send(1, [item]))["seq"] == 1
        await again.close()
        assert server.stats.duplicate_frames == 2
    rows = await fetch(dsn, "SELECT value, count FROM counter_buckets")
    assert [(r["value"], r["count"]) for r in rows] == [(5.0, 2)]


async def test_bad_frames_are_refused_and_others_unharmed(dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, grace=0) as server:
        good = await Client.connect(server.address, run_id="good")
        bad = await Client.connect(server.address, run_id="bad")
        answer = await bad.send(1, [["m", {}, OLD_BUCKET, 10, 1, 1.0, 1.0, 1.0, b"\x00" * 15, 0]])
        assert answer["type"] == "error"
        assert answer["reason"] == "bad_digest"
        assert await bad.receive() == {"type": "ack", "seq": 1}  # the rest (nothing) is kept
        answer = await bad.send(2, [["m", {}, OLD_BUCKET + 3, 10, 1, 1.0, 1.0, 1.0,
                                     digest.encode(digest.from_values([1.0])), 0]])
        assert answer["reason"] == "unaligned_bucket"
        assert await bad.receive() == {"type": "ack", "seq": 2}
        # Garbage that cannot be framed closes only that connection.
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"\xff\xff\xff\xff" + b"x" * 100)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) != b""  # an error frame, then EOF
        writer.close()
        values = np.arange(1.0, 101.0)
        assert (await good.send(1, [trend_item(values)]))["type"] == "ack"

        async def written() -> bool:
            return server.stats.buckets_written >= 1

        await wait_until(written)
        assert server.stats.refused_items == {"bad_digest": 1, "unaligned_bucket": 1}
        assert server.stats.refused["bad_framing"] == 1
        await good.close()
        await bad.close()
    rows = await fetch(dsn, "SELECT run_id, count, min, max FROM trend_buckets")
    assert [tuple(r) for r in rows] == [("good", 100, 1.0, 100.0)]


async def test_shutdown_writes_open_buckets(dsn: str, tmp_path: Path) -> None:
    now_bucket = int(time.time()) // 10 * 10
    async with run_server(dsn, tmp_path, grace=3600) as server:
        client = await Client.connect(server.address)
        await client.send(1, [trend_item(np.arange(10.0), bucket=now_bucket)])
        await client.close()
        assert len(server.open) == 1
    rows = await fetch(dsn, "SELECT count FROM trend_buckets")
    assert [r["count"] for r in rows] == [10]


async def test_schema_is_idempotent(dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path):
        pass
    async with run_server(dsn, tmp_path, role=protocol.ROLE_NON_TD):
        pass
    rows = await fetch(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                            "ORDER BY 1")
    assert [r[0] for r in rows] == ["counter_buckets", "generators", "run_inputs",
                                    "threshold_evaluations", "trend_buckets"]


async def test_log_is_bounded_by_unwritten_buckets(dsn: str, tmp_path: Path) -> None:
    """Over a run of many buckets the log keeps only segments of unwritten buckets."""
    values = np.arange(1.0, 2001.0)
    async with run_server(dsn, tmp_path, grace=0, bucket_seconds=1) as server:
        client = await Client.connect(server.address)
        sizes = []
        start = int(time.time()) - 30
        for seq in range(1, 41):
            item = protocol.trend_item(TrendPartial(
                "m", (), start + seq // 2, 1, len(values), math.fsum(values), 1.0, 2000.0,
                digest.from_values(values)))
            assert (await client.send(seq, [item]))["type"] == "ack"
            await asyncio.sleep(0.1)
            sizes.append(server.wal.size_bytes())
        await client.close()
        written_all = server.wal.size_bytes()
        frame_bytes = len(protocol.data(1, [item]))
        # 40 frames were logged in all; at most a few seconds' worth is ever kept.
        assert max(sizes) < 15 * frame_bytes, (max(sizes) // frame_bytes, sizes[-5:])
        assert sizes[-1] < 15 * frame_bytes
        assert written_all < 40 * frame_bytes
    rows = await fetch(dsn, "SELECT sum(count) AS n FROM trend_buckets")
    assert rows[0]["n"] == 40 * 2000


async def test_shutdown_during_a_write_loses_nothing(dsn: str, tmp_path: Path) -> None:
    """SIGTERM while the flush loop waits on the database: that batch is still written."""
    first, second = np.arange(1.0, 101.0), np.arange(101.0, 151.0)
    locker = await asyncpg.connect(dsn)
    try:
        server_cm = run_server(dsn, tmp_path, grace=0)
        server = await server_cm.__aenter__()
        client = await Client.connect(server.address)
        await client.send(1, [trend_item(first)])

        async def written() -> bool:
            return server.stats.buckets_written == 1

        await wait_until(written)
        # Hold the row so that the next write (late data) blocks inside its transaction.
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("SELECT * FROM trend_buckets FOR UPDATE")
        await client.send(2, [trend_item(second)])
        await client.close()

        async def writing() -> bool:
            return not server.open.entries and server.stats.buckets_written == 1

        await wait_until(writing)
        await asyncio.sleep(0.3)  # the flush loop is now waiting on the lock
        stopping = asyncio.create_task(server_cm.__aexit__(None, None, None))
        await asyncio.sleep(0.5)
        assert not stopping.done()  # shutdown waits for the write in progress
        await transaction.commit()
        await asyncio.wait_for(stopping, 30)
    finally:
        await locker.close()
    rows = await fetch(dsn, "SELECT count, max FROM trend_buckets")
    assert [tuple(r) for r in rows] == [(150, 150.0)]


async def test_schema_upgrades_tables_of_an_older_release(dsn: str, tmp_path: Path) -> None:
    """Tables made before zeros and wal_pos existed gain them at start."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE trend_buckets (bucket timestamptz NOT NULL, bucket_seconds integer "
            "NOT NULL, run_id text NOT NULL, metric text NOT NULL, tags jsonb NOT NULL DEFAULT "
            "'{}', count bigint NOT NULL, sum double precision NOT NULL, min double precision "
            "NOT NULL, max double precision NOT NULL, mean double precision NOT NULL, p50 "
            "double precision NOT NULL, p90 double precision NOT NULL, p95 double precision "
            "NOT NULL, p99 double precision NOT NULL, digest bytea NOT NULL, "
            "UNIQUE (run_id, metric, tags, bucket))")
    finally:
        await conn.close()
    async with run_server(dsn, tmp_path, grace=0) as server:
        client = await Client.connect(server.address)
        assert (await client.send(1, [trend_item(np.arange(1.0, 11.0))]))["type"] == "ack"
        await client.close()
    rows = await fetch(dsn, "SELECT count, zeros, wal_pos > 0 AS logged FROM trend_buckets")
    assert [tuple(r) for r in rows] == [(10, 0, True)]


async def test_retrying_a_write_whose_commit_went_through_counts_once(dsn: str,
                                                                     tmp_path: Path) -> None:
    """A write can fail after its commit (e.g. returning the connection); the retry of the
    same batch must find its rows by wal_pos and not add them again."""
    async with run_server(dsn, tmp_path, grace=3600) as server:
        client = await Client.connect(server.address)
        await client.send(1, [trend_item(np.arange(1.0, 101.0))])
        await client.close()
        batch = server.open.take_all()
        assert server._writer is not None
        assert await server._writer.write(batch) == 0
        assert await server._writer.write(batch) == 0  # the "retry"
    rows = await fetch(dsn, "SELECT count, sum FROM trend_buckets")
    assert [tuple(r) for r in rows] == [(100, 5050.0)]
