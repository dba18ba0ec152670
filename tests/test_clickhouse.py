"""The ClickHouse store against a real clickhouse-server 18.16 (started here, on free
ports) and today's engine in process (chdb): percentiles in SQL equal to td-report's,
td-report equal to PostgreSQL's for the same rows, bad input, credentials, outages.

The conformance suite (tests/test_store_conformance.py) runs its tests on both engines
too; these are what only ClickHouse needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import digest, protocol
from common.aggregate import Aggregator, Entry
from common.generators import GeneratorRow
from common.harness import server_process
from common.protocol import CounterPartial, Limits, TrendPartial
from common.store import RowsRefused, SchemaMissing, Store, StoreUnavailable, open_store
from common.store.clickhouse import ClickHouseStore
from common.store.clickhouse.percentiles import percentile_sql
from common.store.clickhouse.tables import MAX_TEXT
from common.store.rows import COUNTER, TREND, BucketKey, CounterRow, TrendRow
from non_td_server.aggregator import CounterAggregator
from td_report.query import Selection, build
from td_report.render import json_text
from td_report.summary import TrendAccumulator
from td_server.aggregator import TrendAggregator
from tests import clickhouse_server
from tests.clickhouse_server import PASSWORD, USER, ClickHouseServer
from tests.faults import free_port
from tests.rawstream import group, load_points
from tests.test_faults import FORWARD_ONE_SECOND, ONE_SECOND, run_forwarder
from tests.utils import quantile_ok, run_server

ENGINES = ["clickhouse", "chdb"]
BASE = 1_700_000_000  # bucket starts: any fixed past time
QS = (0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)


@pytest.fixture(params=ENGINES)
def ch_dsn(request: pytest.FixtureRequest) -> str:
    """A fresh database on the shared clickhouse-server 18.16, or in chdb."""
    return clickhouse_server.fresh_dsn(request.param)


@contextlib.asynccontextmanager
async def opened(dsn: str, schema: bool = True) -> AsyncIterator[Store]:
    store = open_store(dsn)
    await store.open(connections=2)
    try:
        if schema:
            await store.ensure_schema()
        yield store
    finally:
        await store.close()


def trend_partial(values: np.ndarray, bucket: int, name: str,
                  metric: str = "m") -> TrendPartial:
    centroids, zeros = digest.split_zeros(values)
    return TrendPartial(metric, (("name", name),), bucket, 10, len(values),
                        math.fsum(values.tolist()), float(values.min()), float(values.max()),
                        centroids, zeros)


def entries_of(aggregator: Aggregator[Any, Any], run_id: str, partials: list[Any],
               start_position: int = 1) -> dict[BucketKey, Entry[Any]]:
    """Partials merged into bucket states as a server merges them (producer p1)."""
    out: dict[BucketKey, Entry[Any]] = {}
    for position, partial in enumerate(partials, start_position):
        key = aggregator.key_of(run_id, partial)
        if key in out:
            aggregator.add(out[key].state, partial, "p1")
            out[key].last_position = position
        else:
            out[key] = Entry(aggregator.new_state(partial, "p1"), 0, position)
    return out


def shape(rng: np.random.Generator, kind: int, n: int) -> np.ndarray:
    if kind == 0:
        return rng.lognormal(np.log(120.0), 0.8, n)
    if kind == 1:  # a gap at the median, exact zeros, negative values
        values = np.concatenate([rng.normal(1.65, 0.01, n // 2), 2.14 + rng.exponential(1, n),
                                 -rng.lognormal(0, 1, n // 10)])
        values[rng.random(len(values)) < 0.2] = 0.0
        return values
    return rng.normal(-50.0, 20.0, n)


# --- percentiles in SQL ---------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 1, 2])
async def test_sql_percentiles_equal_td_reports(ch_dsn: str, kind: int) -> None:
    """Over whole runs, windows, tag subsets, per bucket: the SQL of docs/CLICKHOUSE.md
    equals td-report's read of the same rows (1e-9 relative) and meets the accuracy
    criterion against numpy on the raw samples."""
    rng = np.random.default_rng(kind)
    raw: dict[tuple[int, str], list[np.ndarray]] = {}
    partials: list[list[TrendPartial]] = [[], []]  # two producers'
    for b in range(6):
        for name in ("a", "b", "c"):
            for producer in range(2):
                values = shape(rng, kind, int(rng.integers(200, 1200)))
                raw.setdefault((BASE + 10 * b, name), []).append(values)
                partials[producer].append(trend_partial(values, BASE + 10 * b, name))
    agg = TrendAggregator()
    async with opened(ch_dsn) as store:
        assert isinstance(store, ClickHouseStore)
        writer = store.writer(agg, 10)
        # One producer's partials written first, the other's merged in as late data.
        await writer.write(entries_of(agg, "r", partials[0]))
        assert await writer.write(entries_of(agg, "r", partials[1], 100)) == 18
        table = store.table("trend_buckets")
        windows = [(0, 6, ("a", "b", "c")), (2, 3, ("a",)), (1, 5, ("b", "c")),
                   (5, 6, ("c",)), (0, 6, ("a",))]
        async with store.snapshot() as view:
            for first, last, names in windows:
                accumulator = TrendAccumulator()  # td-report's read of the same rows
                async for row in view.rows(TREND, "r", None, None, {}, ["m"]):
                    if (row.tags["name"] in names
                            and BASE + 10 * first <= row.bucket < BASE + 10 * last):
                        assert isinstance(row.values, TrendRow)
                        accumulator.add_row(row.values)
                theirs = accumulator.quantiles(QS)
                samples = np.concatenate([v for (bucket, name), vs in raw.items() for v in vs
                                          if name in names
                                          and BASE + 10 * first <= bucket < BASE + 10 * last])
                names_sql = ", ".join(f"'{n}'" for n in names)
                where = (f"run_id = 'r' AND metric = 'm' AND bucket >= toDateTime("
                         f"{BASE + 10 * first}) AND bucket < toDateTime({BASE + 10 * last}) "
                         f"AND tag_values[indexOf(tag_keys, 'name')] IN ({names_sql})")
                for q, expected in zip(QS, theirs, strict=True):
                    ((_, ours),) = await store.engine.query(percentile_sql(table, q, where))
                    assert float(ours) == pytest.approx(expected, rel=1e-9, abs=1e-12), (
                        first, last, names, q)
                    assert quantile_ok(samples, q, float(ours)), (first, last, names, q)
        # Per 10 s bucket and per minute over every tag set: one value per group.
        per_bucket = await store.engine.query(percentile_sql(
            table, 0.95, "run_id = 'r' AND metric = 'm'", "toUInt32(bucket)"))
        assert [int(t) for t, _ in per_bucket] == [BASE + 10 * b for b in range(6)]
        for t, value in per_bucket:
            samples = np.concatenate([v for (bucket, _), vs in raw.items() for v in vs
                                      if bucket == int(t)])
            assert quantile_ok(samples, 0.95, float(value))
        per_minute = await store.engine.query(percentile_sql(
            table, 0.95, "run_id = 'r' AND metric = 'm'", "toUInt32(toStartOfMinute(bucket))"))
        assert len(per_minute) == len({(BASE + 10 * b) // 60 for b in range(6)})


async def test_sql_percentiles_of_heavy_counts_and_zeros_only(ch_dsn: str) -> None:
    """Counts beyond 32 bits (uint64 in the sketch) and a bucket of zeros alone."""
    values = np.random.default_rng(4).lognormal(0, 2, 3000)
    heavy = digest.from_values(values)
    heavy[:, 1] *= 2**33
    n = int(heavy[:, 1].sum())
    partial = TrendPartial("m", (), BASE, 10, n, float((heavy[:, 0] * heavy[:, 1]).sum()),
                           float(values.min()), float(values.max()), heavy, 0)
    zeros = TrendPartial("z", (), BASE, 10, 5, 0.0, 0.0, 0.0, digest.EMPTY, 5)
    agg = TrendAggregator()
    async with opened(ch_dsn) as store:
        assert isinstance(store, ClickHouseStore)
        await store.writer(agg, 10).write(entries_of(agg, "r", [partial, zeros]))
        table = store.table("trend_buckets")
        accumulator = TrendAccumulator()
        async with store.snapshot() as view:
            async for row in view.rows(TREND, "r", None, None, {}, ["m"]):
                assert isinstance(row.values, TrendRow)
                np.testing.assert_array_equal(digest.decode(row.values.digest), heavy)
                accumulator.add_row(row.values)
        for q, expected in zip(QS, accumulator.quantiles(QS), strict=True):
            ((_, ours),) = await store.engine.query(
                percentile_sql(table, q, "run_id = 'r' AND metric = 'm'"))
            assert float(ours) == pytest.approx(expected, rel=1e-9), q
        ((_, only_zeros),) = await store.engine.query(
            percentile_sql(table, 0.5, "run_id = 'r' AND metric = 'z'"))
        assert float(only_zeros) == 0.0


# --- td-report through ClickHouse and through PostgreSQL -------------------------------


async def write_run(store: Store, run_id: str) -> None:
    rng = np.random.default_rng(8)
    trends, counters = TrendAggregator(), CounterAggregator()
    trend_partials, counter_partials = [], []
    for b in range(4):
        bucket = BASE + 10 * b
        for name in ("a", "b"):
            trend_partials.append(trend_partial(shape(rng, 1, 600), bucket, name,
                                                "http_req_duration"))
        base_ns = bucket * 10**9
        counter_partials += [
            CounterPartial("http_reqs", "counter", (("name", "a"),), bucket, 10, 40.0, 40, 40,
                           1.0, 1.0, base_ns + 5 * 10**9, 1.0),
            CounterPartial("http_req_failed", "rate", (("name", "a"),), bucket, 10, 3.0, 40,
                           3, 0.0, 1.0, base_ns + 5 * 10**9, 0.0),
            CounterPartial("vus", "gauge", (), bucket, 10, 12.0, 4, 4, 2.0, 4.0,
                           base_ns + 9 * 10**9, 4.0)]
    await store.ensure_schema()
    await store.writer(trends, 10).write(entries_of(trends, run_id, trend_partials[:5]))
    await store.writer(trends, 10).write(entries_of(trends, run_id, trend_partials[5:], 6))
    await store.writer(counters, 10).write(entries_of(counters, run_id, counter_partials))
    await store.record_generators([GeneratorRow(
        run_id, "p1", host="gen-1", k6_version="1.1.0", started_at=BASE - 1.0,
        first_ns=BASE * 10**9, last_ns=(BASE + 39) * 10**9, samples=12345,
        units={"http_req_duration": "time"})])
    await store.record_generators([GeneratorRow(run_id, "p1", ended_at=BASE + 41.0,
                                                exit_status=0)])
    await store.mark_written("td", [(run_id, "p1")])
    await store.mark_written("non_td", [(run_id, "p1")])


async def test_td_report_through_clickhouse_equals_postgresqls(ch_dsn: str, dsn: str) -> None:
    """The same rows written through each store: td-report's JSON is the same, for the
    whole run, by tag, over a window and per bucket."""
    selections = [
        Selection(run_id="same"),
        Selection(run_id="same", by=("name",), per_bucket=True),
        Selection(run_id="same", where=(("name", "a"),), quantiles=(0.5, 0.999)),
        Selection(run_id="same", start=_at(BASE + 10), end=_at(BASE + 30)),
    ]
    texts: dict[str, list[str]] = {}
    for label, target in (("postgresql", dsn), ("clickhouse", ch_dsn)):
        async with opened(target, schema=False) as store:
            await write_run(store, "same")
            texts[label] = [_stable(json_text(await build(store, s))) for s in selections]
    for ours, theirs in zip(texts["clickhouse"], texts["postgresql"], strict=True):
        assert ours == theirs


def _at(seconds: int) -> Any:
    from datetime import UTC, datetime  # noqa: PLC0415

    return datetime.fromtimestamp(seconds, UTC)


def _stable(text: str) -> str:
    """The report without the moments the servers recorded (written_at: now)."""
    report = json.loads(text)

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items() if "written" not in k}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node
    return json.dumps(scrub(report), sort_keys=True)


# --- bad input and errors --------------------------------------------------------------


async def test_nul_and_over_long_tags_are_refused_alone(ch_dsn: str) -> None:
    values = np.arange(1.0, 101.0)
    good = trend_partial(values, BASE, "fine")
    nul = trend_partial(values, BASE, "bad\x00value")
    long = trend_partial(values, BASE, "x" * (MAX_TEXT + 1))
    agg = TrendAggregator()
    async with opened(ch_dsn) as store:
        writer = store.writer(agg, 10)
        entries = entries_of(agg, "r", [good, nul, long])
        late, failed = await writer.write_each(entries)
        assert late == 0
        assert set(failed) == {agg.key_of("r", nul), agg.key_of("r", long)}
        assert all(isinstance(exc, RowsRefused) for exc in failed.values())
        assert "NUL" in str(failed[agg.key_of("r", nul)])
        assert "limit" in str(failed[agg.key_of("r", long)])
        async with store.snapshot() as view:
            rows = [row async for row in view.rows(TREND, "r", None, None, {})]
    assert [(row.tags, row.values.count) for row in rows] == [({"name": "fine"}, 100)]


async def test_quotes_backslashes_and_unicode_in_tags_round_trip(ch_dsn: str) -> None:
    names = ["it's", "back\\slash", "new\nline\ttab", "ünï€ode 🚀", "", "{\"json\": 1}"]
    agg = CounterAggregator()
    partials = [CounterPartial("c", "counter", (("name", n),), BASE, 10, 2.0, 2, 2, 1.0, 1.0,
                               BASE * 10**9, 1.0) for n in names]
    async with opened(ch_dsn) as store:
        await store.writer(agg, 10).write(entries_of(agg, "r'\\", partials))
        async with store.snapshot() as view:
            rows = [row async for row in view.rows(COUNTER, "r'\\", None, None, {})]
            for name in names:
                (one,) = [r async for r in view.rows(COUNTER, "r'\\", None, None,
                                                     {"name": name})]
                assert one.tags == {"name": name}
    assert sorted(row.tags["name"] for row in rows) == sorted(names)
    assert all(isinstance(r.values, CounterRow) and r.values.value == 2.0 for r in rows)


async def test_missing_tables_are_schema_missing(ch_dsn: str) -> None:
    async with opened(ch_dsn, schema=False) as store:
        with pytest.raises(SchemaMissing, match="no td-server or non-td-server"):
            await build(store, Selection(run_id="nothing"))


async def test_unreachable_server_names_host_and_port_not_the_password() -> None:
    port = free_port()
    store = open_store(f"clickhouse://someone:hunter2pw@127.0.0.1:{port}/db")
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "hunter2pw" not in message
    assert "refused" in message.lower() or "connect" in message.lower()


async def test_td_server_refuses_to_start_on_an_unreachable_clickhouse(tmp_path: Path) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "td_server", "--listen", "127.0.0.1:0", "--state-dir",
        str(tmp_path / "td"), "--metrics-listen", "", env={
            **_env(), "TDAGG_DSN": f"clickhouse://u:topsecretpw@127.0.0.1:{port}/db"},
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    text = err.decode()
    assert process.returncode not in (0, None), text
    assert f"127.0.0.1:{port}" in text
    assert "topsecretpw" not in text


def _env() -> dict[str, str]:
    import os  # noqa: PLC0415

    return {k: v for k, v in os.environ.items() if not k.startswith(("TDAGG_", "PG"))}


async def test_credentials_right_and_wrong() -> None:
    server = clickhouse_server.shared()
    database = clickhouse_server.new_database()
    async with opened(server.dsn(database, USER, PASSWORD)) as store:
        await store.ping()
    store = open_store(server.dsn(database, USER, "not-the-pw"))
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    message = str(caught.value)
    assert "wrong password" in message or "refused the user" in message, message
    assert repr(USER) in message
    assert "not-the-pw" not in message


async def test_policies_are_refused_with_what_to_do_instead(ch_dsn: str) -> None:
    from common.store import Policies, StoreError  # noqa: PLC0415

    async with opened(ch_dsn, schema=False) as store:
        with pytest.raises(StoreError, match="retention_days = 7 is a TimescaleDB policy"):
            await store.ensure_schema(Policies(retention_days=7))


# --- faults: kill -9 of a server, ClickHouse stopped mid-run ---------------------------


async def verify(dsn: str, raw: Path, run_id: str) -> dict[str, int]:
    """Every stored row against the raw stream (one-second buckets): counts, min, max and
    exact totals; returns the sent / stored / duplicate figures."""
    kinds, points = load_points(raw, width=1)
    expected = group({"raw": points})
    stored: dict[tuple[Any, ...], Any] = {}
    async with opened(dsn, schema=False) as store, store.snapshot() as view:
        for table in (TREND, COUNTER):
            async for row in view.rows(table, run_id, None, None, {}):
                key = (row.metric, tuple(sorted(row.tags.items())), int(row.bucket))
                assert key not in stored, key
                stored[key] = row.values
    sent = sum(len(p["raw"]) for p in expected.values())
    kept = sum(v.count for v in stored.values())
    assert set(stored) == set(expected)
    for key, sources in expected.items():
        values = np.array([v for _, v in sources["raw"]], dtype=float)
        row = stored[key]
        assert (row.count, row.min, row.max) == (len(values), values.min(), values.max()), key
        kind = kinds[key[0]]
        if kind == "counter":
            assert row.value == values.sum(), key
        elif kind == "rate":
            assert row.nonzero == np.count_nonzero(values), key
    return {"samples_sent": sent, "samples_stored": kept, "duplicates": max(0, kept - sent)}


@contextlib.contextmanager
def own_clickhouse() -> Iterator[ClickHouseServer]:
    with clickhouse_server.clickhouse() as server:
        yield server


@pytest.mark.timeout(120)
async def test_kill_9_of_td_server_loses_and_doubles_nothing(tmp_path: Path) -> None:
    dsn = clickhouse_server.create_database(clickhouse_server.shared())
    ports = {"td_server": free_port(), "non_td_server": free_port()}
    async with contextlib.AsyncExitStack() as stack:
        procs = {}
        for module, port in ports.items():
            procs[module] = await stack.enter_async_context(server_process(
                module, dsn, tmp_path, *ONE_SECOND, listen=f"127.0.0.1:{port}"))
        address = {m: ("127.0.0.1", p) for m, p in ports.items()}

        async def kill_and_restart() -> float:
            await asyncio.sleep(3)
            procs["td_server"].process.kill()  # SIGKILL: no flush, no goodbye
            await procs["td_server"].process.wait()
            await asyncio.sleep(2)
            procs["td_server"] = await stack.enter_async_context(server_process(
                "td_server", dsn, tmp_path, *ONE_SECOND,
                listen=f"127.0.0.1:{ports['td_server']}"))
            return time.monotonic()

        raw = tmp_path / "raw.json"
        lines, restarted = await run_forwarder(
            address["td_server"], address["non_td_server"], "kill9", raw, 8, 200,
            kill_and_restart, *FORWARD_ONE_SECOND)
        for proc in procs.values():
            assert await proc.stop() == 0
    assert lines.first_after(restarted, "connected after") is not None, lines.text()
    figures = await verify(dsn, raw, "kill9")
    assert figures["samples_stored"] == figures["samples_sent"]
    assert figures["duplicates"] == 0


@pytest.mark.timeout(120)
async def test_clickhouse_stopped_mid_run_loses_nothing(tmp_path: Path) -> None:
    with own_clickhouse() as server:
        dsn = server.dsn(clickhouse_server.new_database())
        async with (
            run_server(dsn, tmp_path, protocol.ROLE_TD, grace=0.5, bucket_seconds=1) as td,
            run_server(dsn, tmp_path, protocol.ROLE_NON_TD, grace=0.5,
                       bucket_seconds=1) as non_td,
        ):
            async def outage() -> None:
                await asyncio.sleep(2)
                await asyncio.to_thread(server.stop)
                await asyncio.sleep(5)
                await asyncio.to_thread(server.start)

            raw = tmp_path / "raw.json"
            await run_forwarder(td.address, non_td.address, "ch-outage", raw, 10, 200,
                                outage, *FORWARD_ONE_SECOND)
            assert td.stats.write_failures > 0, "the outage did not hit a write"
            assert non_td.stats.write_failures > 0, "the outage did not hit a write"
            deadline = time.monotonic() + 30
            while td.closing or non_td.closing:
                assert time.monotonic() < deadline, "queued buckets were never written"
                await asyncio.sleep(0.05)
        figures = await verify(dsn, raw, "ch-outage")
    assert figures["samples_stored"] == figures["samples_sent"]
    assert figures["duplicates"] == 0


def test_limits_hold() -> None:
    assert Limits().max_tag_length < MAX_TEXT  # the servers' shortened tags always fit
