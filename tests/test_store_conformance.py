"""What every store must do, run against each backend: the in-process memory store, a
real PostgreSQL, a real ClickHouse 18.16 server and chdb (today's ClickHouse in process).

TimescaleDB is the PostgreSQL backend on the same SQL; it is verified on its own in
tests/test_timescaledb.py (hypertables, a run written and read back, every dashboard
query, the policies), not here: its test build (PGlite) serves one connection at a time,
and these tests run two servers, each with its own connection, at once.

The servers run in this process (the memory store lives here), over loopback sockets;
the last test pipes two real k6 processes through real k6-forward processes into them.
Everything is read back through the store's own read side and compared with values
computed independently from what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import digest, protocol
from common.aggregate import Entry
from common.server import AggregatorServer
from common.store import Store, open_store
from common.store.memory import forget
from common.store.rows import COUNTER, TREND, CounterRow, StoredRow, TrendRow
from non_td_server.aggregator import CounterAggregator, CounterState
from td_report.query import Selection, build
from td_server.aggregator import TrendAggregator, TrendState
from tests.conftest import create_database
from tests.test_server_db import OLD_BUCKET, counter_item, trend_item
from tests.utils import Client, quantile_ok, run_server, wait_until

BACKENDS = ["memory", "postgresql", "clickhouse", "chdb"]
QUANTILES = (0.5, 0.9, 0.95, 0.99)
TAGS = (("name", "a"),)


@pytest.fixture(params=BACKENDS)
async def store_dsn(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A DSN of an empty store of each backend."""
    if request.param == "memory":
        name = f"memory://{uuid.uuid4().hex}"
        yield name
        forget(name.removeprefix("memory://"))
    elif request.param == "postgresql":
        yield await create_database(request.getfixturevalue("pg_server"))
    elif request.param in ("clickhouse", "chdb"):
        from tests import clickhouse_server  # noqa: PLC0415

        yield clickhouse_server.fresh_dsn(request.param)
    else:
        raise AssertionError(f"no store for backend {request.param!r}")


@contextlib.asynccontextmanager
async def opened(dsn: str) -> AsyncIterator[Store]:
    store = open_store(dsn)
    await store.open(connections=1)
    try:
        yield store
    finally:
        await store.close()


async def all_rows(dsn: str, table: str, run_id: str = "run") -> list[StoredRow]:
    async with opened(dsn) as store, store.snapshot() as view:
        return [row async for row in view.rows(table, run_id, None, None, {})]


def samples_of(row: TrendRow) -> float:
    return float(digest.decode(row.digest)[:, 1].sum()) + row.zeros


async def written(server: AggregatorServer, rows: int) -> None:
    await wait_until(lambda: server.stats.buckets_written >= rows and not server.open.entries
                     and not server.closing, within=30)


# --- the write side ------------------------------------------------------------------


async def test_late_data_merges_into_the_stored_row(store_dsn: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    first, late = rng.lognormal(3, 1, 4000), rng.lognormal(4, 0.5, 1000)
    async with run_server(store_dsn, tmp_path, grace=0) as server:
        for part in (first, late):
            client = await Client.connect(server.address)
            assert await client.send(1, [trend_item(part)]) == {"type": "ack", "seq": 1}
            await client.close()
            await written(server, 1 if part is first else 2)
        assert server.stats.late_rows == 1
    (row,) = await all_rows(store_dsn, TREND)
    values = row.values
    assert isinstance(values, TrendRow)
    both = np.concatenate([first, late])
    assert values.count == len(both)
    assert samples_of(values) == pytest.approx(len(both))
    assert (values.min, values.max) == (both.min(), both.max())
    # Each partial carries its correctly rounded sum; the row holds their exact sum.
    assert sum(map(Fraction, (values.sum, *values.sum_rest))) == sum(
        Fraction(math.fsum(part)) for part in (first, late))
    for q, stored in zip(QUANTILES, (values.p50, values.p90, values.p95, values.p99),
                         strict=True):
        assert stored is not None
        assert quantile_ok(both, q, stored), (q, stored)


async def test_a_retried_write_that_had_committed_counts_once(store_dsn: str) -> None:
    key = ("run", "http_req_duration", TAGS, OLD_BUCKET)
    values = np.arange(1.0, 101.0)
    state = TrendState(100, float(values.sum()), 1.0, 100.0, [digest.from_values(values)], 0)
    counter_key = ("run", "http_reqs", TAGS, OLD_BUCKET)
    async with opened(store_dsn) as store:
        await store.ensure_schema()
        trends = store.writer(TrendAggregator(), 10)
        counters = store.writer(CounterAggregator(), 10)
        for attempt in range(2):  # the second is the retry of a write whose commit went through
            assert await trends.write({key: Entry(state, 0, 7)}) == 0, attempt
            counter = CounterState("counter", 5.0, 5, 5, 1.0, 1.0, {})
            assert await counters.write({counter_key: Entry(counter, 0, 9)}) == 0, attempt
        assert await trends.stored_positions([key, key[:3] + (0,)]) == {key: 7}
        assert await trends.max_position() == 7
        assert await counters.max_position() == 9
    (row,) = await all_rows(store_dsn, TREND)
    assert isinstance(row.values, TrendRow)
    assert row.values.count == 100
    (row,) = await all_rows(store_dsn, COUNTER)
    assert isinstance(row.values, CounterRow)
    assert row.values.value == 5.0


def crash(server: AggregatorServer) -> None:
    """kill -9 of an in-process server: nothing more is written, the log's descriptors
    (and its lock) go."""
    assert server._listener is not None
    server._listener.close()
    for task in (*server._connections, server._flush_task, server.live._task):
        if task is not None:
            task.cancel()
    server.group_commit.close()
    for name in ("_fd", "_lock_fd"):
        descriptor = getattr(server.wal, name)
        if descriptor is not None:
            os.close(descriptor)
            setattr(server.wal, name, None)


async def test_replay_after_a_crash_skips_what_rows_hold(store_dsn: str,
                                                        tmp_path: Path) -> None:
    now_bucket = int(time.time()) // 10 * 10
    written_part = np.arange(1.0, 301.0)
    logged_part = np.arange(1000.0, 1200.0)
    server = AggregatorServer(*_server_parts(store_dsn, tmp_path, grace=0))
    await server.start()
    client = await Client.connect(server.address)
    assert (await client.send(1, [trend_item(written_part)]))["type"] == "ack"
    await written(server, 1)
    # Acknowledged (logged), not written: its bucket is still open.
    answer = await client.send(2, [trend_item(logged_part, bucket=now_bucket + 60)])
    assert answer["type"] == "ack"
    await client.close()
    crash(server)
    await server.store.close()

    async with run_server(store_dsn, tmp_path, grace=3600) as again:
        assert again.stats.replayed_frames >= 1
    rows = {row.bucket: row.values for row in await all_rows(store_dsn, TREND)}
    assert set(rows) == {OLD_BUCKET, now_bucket + 60}
    counts = {bucket: values.count for bucket, values in rows.items()}
    assert counts == {OLD_BUCKET: len(written_part), now_bucket + 60: len(logged_part)}


def _server_parts(dsn: str, tmp_path: Path, **settings: Any) -> tuple[Any, Any, Store]:
    from common.config import ServerConfig  # noqa: PLC0415

    config = ServerConfig(listen=("127.0.0.1", 0), dsn=dsn, state_dir=tmp_path / "td",
                          flush_interval=0.05, metrics_listen=None, **settings)
    return config, TrendAggregator(), open_store(dsn)


# --- the four metric types, read back ----------------------------------------------


async def test_all_four_metric_types_read_back_exactly(store_dsn: str,
                                                       tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    durations = [rng.lognormal(2, 0.7, 2500), rng.lognormal(2.2, 0.6, 1500)]
    base_ns = OLD_BUCKET * 10**9
    counters = [[1.0] * 40, [1.0] * 25]
    rates = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    gauges = [([3.0, 5.0, 4.0], base_ns + 9 * 10**9), ([2.0, 7.0], base_ns + 8 * 10**9)]
    async with (run_server(store_dsn, tmp_path, grace=0) as td,
                run_server(store_dsn, tmp_path, role=protocol.ROLE_NON_TD, grace=0) as non_td):
        for producer in range(2):
            client = await Client.connect(td.address, producer=f"p{producer}")
            assert (await client.send(1, [trend_item(durations[producer])]))["type"] == "ack"
            await client.close()
            client = await Client.connect(non_td.address, role=protocol.ROLE_NON_TD,
                                          producer=f"p{producer}")
            gauge, last_ns = gauges[producer]
            answer = await client.send(1, [
                counter_item("counter", counters[producer], base_ns, metric="http_reqs"),
                counter_item("rate", rates[producer], base_ns, metric="checks"),
                counter_item("gauge", gauge, last_ns, metric="vus")])
            assert answer["type"] == "ack", answer
            await client.close()
        await written(td, 1)
        await written(non_td, 3)
    trend_rows = await all_rows(store_dsn, TREND)
    assert [r.metric for r in trend_rows] == ["http_req_duration"]
    everything = np.concatenate(durations)
    values = trend_rows[0].values
    assert isinstance(values, TrendRow)
    assert values.count == len(everything)
    counter_rows = {r.metric: r.values for r in await all_rows(store_dsn, COUNTER)}
    assert set(counter_rows) == {"http_reqs", "checks", "vus"}
    reqs, checks, vus = (counter_rows[m] for m in ("http_reqs", "checks", "vus"))
    assert isinstance(reqs, CounterRow)
    assert (reqs.metric_type, reqs.value, reqs.count) == (
        "counter", 65.0, 65)
    assert isinstance(checks, CounterRow)
    assert (checks.metric_type, checks.nonzero,
                                               checks.count) == ("rate", 4, 7)
    assert checks.value == pytest.approx(4 / 7)
    # A gauge: the sum over generators of each one's last value; min and max of all.
    assert isinstance(vus, CounterRow)
    assert (vus.metric_type, vus.value, vus.min, vus.max) == (
        "gauge", 4.0 + 7.0, 2.0, 7.0)

    async with opened(store_dsn) as store:
        report = await build(store, Selection(run_id="run", quantiles=QUANTILES))
        async with store.snapshot() as view:
            totals = {t.metric: t for t in await view.totals("run")}
            series = await view.series("run")
            extent = await view.extent("run", None, None)
            assert await view.gauge_producers("run", None, None) == {"p0", "p1"}
            assert [r.run_id for r in await view.runs()] == ["run"]
            assert await view.row_keys("run") == {(m, OLD_BUCKET) for m in (
                "http_req_duration", "http_reqs", "checks", "vus")}
    assert {(s.metric, s.kind) for s in series} == {
        ("http_req_duration", "trend"), ("http_reqs", "counter"), ("checks", "rate"),
        ("vus", "gauge")}
    assert extent is not None
    assert (extent.first, extent.last) == (OLD_BUCKET, OLD_BUCKET + 10)
    assert totals["http_reqs"].total == 65.0
    assert totals["http_req_duration"].count == 4000
    trend = report.metrics["http_req_duration"].trend
    assert trend is not None
    assert trend.count == len(everything)
    for q, estimate in zip(QUANTILES, trend.quantiles(QUANTILES), strict=True):
        assert quantile_ok(everything, q, estimate), (q, estimate)


async def test_generators_inputs_and_evaluations_round_trip(store_dsn: str) -> None:
    from datetime import UTC, datetime  # noqa: PLC0415

    from common.generators import GeneratorRow  # noqa: PLC0415
    from common.store.rows import Evaluation  # noqa: PLC0415

    async with opened(store_dsn) as store:
        await store.ensure_schema()
        await store.record_generators([GeneratorRow("run", "p1", host="h", started_at=100.0,
                                                    units={"d": "time"})])
        await store.record_generators([GeneratorRow("run", "p1", ended_at=200.0,
                                                    exit_status=0)])
        await store.mark_written("td", [("run", "p1")])
        assert (await store.claim_input("run", "td", "in", "p1"))[0] == "p1"
        assert (await store.claim_input("run", "td", "in", "p2"))[0] == "p1"  # a rerun
        at = datetime.fromtimestamp(1_700_000_000, UTC)
        await store.record_evaluations([Evaluation(
            "run", "td", "p(95)<100", at, None, True, "pass", True, True, 42.0, 10, None,
            None, False, None)])
        async with store.snapshot() as view:
            (generator,) = await view.generators("run") or []
            (evaluation,) = await view.evaluations("run")
    assert (generator.host, generator.started_at, generator.ended_at, generator.exit_status,
            generator.units) == ("h", 100.0, 200.0, 0, {"d": "time"})
    assert generator.written_by("td")
    assert not generator.written_by("non_td")
    assert (evaluation.threshold, evaluation.observed, evaluation.evaluated_at) == (
        "p(95)<100", 42.0, at)


# --- accuracy and the real pipeline -------------------------------------------------


async def test_merged_percentiles_meet_the_accuracy_criterion(store_dsn: str,
                                                              tmp_path: Path) -> None:
    """Ten producers' partials over three buckets, merged by the server and again by the
    report: every percentile within the criterion against numpy over the raw samples."""
    rng = np.random.default_rng(11)
    parts = [np.concatenate([rng.lognormal(3, 0.4, 900), rng.normal(500, 30, 100).clip(1)])
             for _ in range(30)]
    async with run_server(store_dsn, tmp_path, grace=0) as server:
        for index, part in enumerate(parts):
            client = await Client.connect(server.address, producer=f"p{index % 10}")
            bucket = OLD_BUCKET - 10 * (index % 3)
            answer = await client.send(index // 10 + 1, [trend_item(part, bucket=bucket)])
            assert answer == {"type": "ack", "seq": index // 10 + 1}
            await client.close()
        # Leaving writes every bucket: some rows are written, then merged into as late data.
    for bucket_row in await all_rows(store_dsn, TREND):
        raw = np.concatenate([p for i, p in enumerate(parts)
                              if OLD_BUCKET - 10 * (i % 3) == bucket_row.bucket])
        values = bucket_row.values
        assert isinstance(values, TrendRow)
        assert values.count == len(raw)
        for q, stored in zip(QUANTILES, (values.p50, values.p90, values.p95, values.p99),
                             strict=True):
            assert stored is not None
            assert quantile_ok(raw, q, stored), (q, stored)
    everything = np.concatenate(parts)
    async with opened(store_dsn) as store:
        report = await build(store, Selection(run_id="run", quantiles=QUANTILES))
        async with store.snapshot() as view:
            whole = await view.merged_trends("run", "http_req_duration", None, None, {})
            per_bucket = await view.merged_trends("run", "http_req_duration", None, None,
                                                  {"name": "a"}, per_seconds=10)
            per_minute = await view.merged_trends("run", "http_req_duration", None, None,
                                                  {}, per_seconds=60)
            none = await view.merged_trends("run", "http_req_duration", None, None,
                                            {"name": "b"})
    # Merged digests of a window and a tag filter, as the store reads them.
    assert none == []
    (group,) = whole
    assert (group.start, group.count, group.zeros) == (OLD_BUCKET - 20, len(everything), 0)
    assert (group.min, group.max) == (everything.min(), everything.max())
    for q, estimate in zip(QUANTILES, group.quantiles(QUANTILES), strict=True):
        assert quantile_ok(everything, q, estimate), (q, estimate)
    assert [g.start for g in per_bucket] == [OLD_BUCKET - 20, OLD_BUCKET - 10, OLD_BUCKET]
    for g in per_bucket:
        raw = np.concatenate([p for i, p in enumerate(parts)
                              if OLD_BUCKET - 10 * (i % 3) == g.start])
        assert g.count == len(raw)
        assert all(quantile_ok(raw, q, v) for q, v in zip(
            QUANTILES, g.quantiles(QUANTILES), strict=True))
    minutes = {b // 60 * 60 for b in (OLD_BUCKET - 20, OLD_BUCKET - 10, OLD_BUCKET)}
    assert [g.start for g in per_minute] == sorted(minutes)
    assert sum(g.count for g in per_minute) == len(everything)
    trend = report.metrics["http_req_duration"].trend
    assert trend is not None
    for q, estimate in zip(QUANTILES, trend.quantiles(QUANTILES), strict=True):
        assert quantile_ok(everything, q, estimate), (q, estimate)


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_two_real_k6_generators_end_to_end(store_dsn: str, tmp_path: Path) -> None:
    from common.harness import http_target, k6_pipeline  # noqa: PLC0415
    from tests.test_e2e_k6 import check_two_generators  # noqa: PLC0415

    async with (
        http_target() as base,
        run_server(store_dsn, tmp_path, grace=1) as td,
        run_server(store_dsn, tmp_path, role=protocol.ROLE_NON_TD, grace=1) as non_td,
    ):
        raws = [tmp_path / f"raw{i}.json" for i in range(2)]
        results = await asyncio.gather(*(
            k6_pipeline(base, raw, td.address, non_td.address, "two-gen", "22s")
            for raw in raws))
        for code, err in results:
            assert code == 0, err
            assert "acknowledged" in err, err
    async with opened(store_dsn) as store:
        await check_two_generators(store, "two-gen", raws)

