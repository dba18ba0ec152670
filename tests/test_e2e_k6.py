"""End to end: the real k6 binary -> k6-forward -> td_server / non_td_server processes ->
PostgreSQL, and the row-by-row check of a run against k6's raw streams that the store
conformance suite runs on every backend (two generators, tests/test_store_conformance.py).

Expected figures come from the raw JSON that ``tee`` saved, never from the pipeline.
"""

from __future__ import annotations

import asyncio
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import digest
from common.harness import http_target, k6_pipeline, server_process
from common.store import Store, open_store
from common.store.rows import COUNTER, TREND, CounterRow, StoredRow, TrendRow
from td_report.query import Selection, build
from tests.rawstream import group, load_points
from tests.utils import quantile_ok

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

QUANTILES = (0.5, 0.9, 0.95, 0.99)


async def run_pipeline(dsn: str, tmp_path: Path, generators: int, run_id: str,
                       duration: str, *k6_args: str) -> list[Path]:
    async with (
        http_target() as base,
        server_process("td_server", dsn, tmp_path, "--grace", "1") as td,
        server_process("non_td_server", dsn, tmp_path, "--grace", "1") as non_td,
    ):
        raws = [tmp_path / f"raw{i}.json" for i in range(generators)]
        results = await asyncio.gather(*(
            k6_pipeline(base, raw, td.address, non_td.address, run_id, duration, *k6_args)
            for raw in raws))
        for code, err in results:
            assert code == 0, err
            assert "acknowledged" in err, err
        # SIGTERM: every open bucket is written before exit 0.
        assert await td.stop() == 0, b"".join(td.stderr_lines).decode()
        assert await non_td.stop() == 0, b"".join(non_td.stderr_lines).decode()
    return raws


async def check_two_generators(store: Store, run_id: str, raws: list[Path]
                               ) -> dict[str, int]:
    """Every stored row of the run against the raw k6 streams: one row per (metric,
    tags, bucket) sent, counts, min, max, sums and zeros exact, percentiles within the
    accuracy criterion, counters, rates and gauges exact. Returns what was checked: rows
    and samples of each table, and the merged series-buckets held to the criterion."""
    kinds: dict[str, str] = {}
    by_source = {}
    for raw in raws:
        found, points = load_points(raw)
        kinds.update(found)
        by_source[raw.name] = points
    expected = group(by_source)

    async with store.snapshot() as view:
        trend_rows = {row_key(r): r.values
                      async for r in view.rows(TREND, run_id, None, None, {})}
        counter_rows = {row_key(r): r.values
                        async for r in view.rows(COUNTER, run_id, None, None, {})}
    trend_keys = {k for k in expected if kinds[k[0]] == "trend"}
    assert set(trend_rows) == trend_keys
    assert set(counter_rows) == set(expected) - trend_keys

    checked_big = 0
    for key in trend_keys:
        sources = expected[key]
        values = np.array([v for pts in sources.values() for _, v in pts], dtype=float)
        row = trend_rows[key]
        assert isinstance(row, TrendRow)
        assert row.count == len(values), key
        assert row.min == values.min(), key
        assert row.max == values.max(), key
        # Exact: the correctly rounded sum of both generators' samples, and with
        # sum_rest the sum itself.
        assert row.sum == math.fsum(values.tolist()), key
        assert sum(map(Fraction, [row.sum, *row.sum_rest])) == sum(
            map(Fraction, values.tolist())), key
        assert row.zeros == np.count_nonzero(values == 0), key
        weights = digest.decode(row.digest)[:, 1].sum()
        assert weights + row.zeros == pytest.approx(len(values)), key
        if len(values) >= 1000:
            for q, stored in zip(QUANTILES, (row.p50, row.p90, row.p95, row.p99),
                                 strict=True):
                assert stored is not None
                assert quantile_ok(values, q, stored), (key, q, stored)
            if len(sources) == 2:
                checked_big += 1
    # The accuracy criterion is only meaningful if merged buckets were big enough.
    assert checked_big >= 6, f"only {checked_big} merged series-buckets had >= 1000 samples"

    for key, counter in counter_rows.items():
        sources = expected[key]
        values = [v for pts in sources.values() for _, v in pts]
        kind = kinds[key[0]]
        assert isinstance(counter, CounterRow)
        assert counter.metric_type == kind
        assert counter.count == len(values), key
        assert counter.min == min(values), key
        assert counter.max == max(values), key
        if kind == "counter":
            assert counter.value == math.fsum(values), key
            assert sum(map(Fraction, [counter.sum, *counter.sum_rest])) == sum(
                map(Fraction, values)), key
        elif kind == "rate":
            assert counter.nonzero == sum(1 for v in values if v), key
            assert counter.value == pytest.approx(counter.nonzero / len(values))
        else:
            last_per_generator = [max(pts)[1] for pts in sources.values()]
            assert counter.value == sum(last_per_generator), key
    assert {kinds[k[0]] for k in counter_rows} == {"counter", "gauge", "rate"}
    return {"trend_rows": len(trend_rows),
            "trend_samples": sum(r.count for r in trend_rows.values()),  # type: ignore[union-attr]
            "counter_rows": len(counter_rows),
            "counter_samples": sum(r.count for r in counter_rows.values()),  # type: ignore[union-attr]
            "quantile_checked_buckets": checked_big}


def row_key(row: StoredRow) -> tuple[Any, ...]:
    return (row.metric, tuple(sorted(row.tags.items())), int(row.bucket))


async def test_single_generator_whole_run_p95_matches_k6_summary(dsn: str,
                                                                 tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    (raw,) = await run_pipeline(dsn, tmp_path, 1, "one-gen", "12s", "--summary-export",
                                str(summary))
    k6_metrics = json.loads(summary.read_text())["metrics"]
    _, points = load_points(raw)
    metrics = ("http_req_duration", "http_req_waiting", "iteration_duration", "cart_value",
               "group_duration")
    store = open_store(dsn)
    await store.open(connections=1)
    try:
        # Read as td-report reads a whole run: every bucket's sketch, merged.
        report = await build(store, Selection(run_id="one-gen", quantiles=(0.95,)))
    finally:
        await store.close()
    for metric in metrics:
        trend = report.metrics[metric].trend
        assert trend is not None
        (p95,) = trend.quantiles([0.95])
        theirs = k6_metrics[metric]["p(95)"]
        samples = np.array([p["value"] for p in points if p["metric"] == metric])
        assert trend.count == len(samples) == k6_metrics[metric].get(
            "count", len(samples)), metric
        exact = float(np.quantile(samples, 0.95))
        assert p95 == pytest.approx(theirs, rel=0.01), (metric, p95, theirs, exact)
        assert trend.lo == pytest.approx(k6_metrics[metric]["min"], abs=1e-9)
        assert trend.hi == pytest.approx(k6_metrics[metric]["max"], abs=1e-9)
    for metric in ("http_reqs", "iterations"):
        counter = report.metrics[metric].counter
        assert counter is not None
        assert counter.total == k6_metrics[metric]["count"]
