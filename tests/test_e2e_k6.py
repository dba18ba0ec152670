"""End to end: the real k6 binary -> k6-forward -> td_server / non_td_server -> PostgreSQL.

Expected figures come from the raw JSON that ``tee`` saved, never from the pipeline.
"""

from __future__ import annotations

import asyncio
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from common import digest
from tests.processes import http_target, k6_pipeline, server_process
from tests.rawstream import group, load_points
from tests.utils import fetch, quantile_ok

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

QUANTILE_COLUMNS = ((0.5, "p50"), (0.9, "p90"), (0.95, "p95"), (0.99, "p99"))


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


def row_key(row: asyncpg.Record) -> tuple[Any, ...]:
    tags = tuple(sorted(json.loads(row["tags"]).items()))
    return (row["metric"], tags, int(row["bucket"].timestamp()))


async def test_two_generators_accurate_and_exact(dsn: str, tmp_path: Path) -> None:
    raws = await run_pipeline(dsn, tmp_path, 2, "two-gen", "22s")
    kinds: dict[str, str] = {}
    by_source = {}
    for raw in raws:
        found, points = load_points(raw)
        kinds.update(found)
        by_source[raw.name] = points
    expected = group(by_source)

    trend_rows = {row_key(r): r for r in await fetch(
        dsn, "SELECT * FROM trend_buckets WHERE run_id = 'two-gen'")}
    counter_rows = {row_key(r): r for r in await fetch(
        dsn, "SELECT * FROM counter_buckets WHERE run_id = 'two-gen'")}
    trend_keys = {k for k in expected if kinds[k[0]] == "trend"}
    assert set(trend_rows) == trend_keys
    assert set(counter_rows) == set(expected) - trend_keys

    checked_big = 0
    for key in trend_keys:
        sources = expected[key]
        values = np.array([v for pts in sources.values() for _, v in pts], dtype=float)
        row = trend_rows[key]
        assert row["count"] == len(values), key
        assert row["min"] == values.min(), key
        assert row["max"] == values.max(), key
        # Exact: the correctly rounded sum of both generators' samples, and with
        # sum_rest the sum itself.
        assert row["sum"] == math.fsum(values.tolist()), key
        assert sum(map(Fraction, [row["sum"], *(row["sum_rest"] or [])])) == sum(
            map(Fraction, values.tolist())), key
        assert row["zeros"] == np.count_nonzero(values == 0), key
        weights = digest.decode(row["digest"])[:, 1].sum()
        assert weights + row["zeros"] == pytest.approx(len(values)), key
        if len(values) >= 1000:
            for q, column in QUANTILE_COLUMNS:
                assert quantile_ok(values, q, row[column]), (key, q, row[column])
            if len(sources) == 2:
                checked_big += 1
    # The accuracy criterion is only meaningful if merged buckets were big enough.
    assert checked_big >= 6, f"only {checked_big} merged series-buckets had >= 1000 samples"

    for key, row in counter_rows.items():
        sources = expected[key]
        values = [v for pts in sources.values() for _, v in pts]
        kind = kinds[key[0]]
        assert row["metric_type"] == kind
        assert row["count"] == len(values), key
        assert row["min"] == min(values), key
        assert row["max"] == max(values), key
        if kind == "counter":
            assert row["value"] == math.fsum(values), key
            state = json.loads(row["state"])
            assert sum(map(Fraction, [state["sum"], *state.get("sum_rest", [])])) == sum(
                map(Fraction, values)), key
        elif kind == "rate":
            assert row["nonzero"] == sum(1 for v in values if v), key
            assert row["value"] == pytest.approx(row["nonzero"] / len(values))
        else:
            last_per_generator = [max(pts)[1] for pts in sources.values()]
            assert row["value"] == sum(last_per_generator), key
    assert {kinds[k[0]] for k in counter_rows} == {"counter", "gauge", "rate"}


async def test_single_generator_whole_run_p95_matches_k6_summary(dsn: str,
                                                                 tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    (raw,) = await run_pipeline(dsn, tmp_path, 1, "one-gen", "12s", "--summary-export",
                                str(summary))
    k6_metrics = json.loads(summary.read_text())["metrics"]
    _, points = load_points(raw)
    rows = await fetch(dsn, "SELECT metric, count, min, max, digest, zeros FROM trend_buckets "
                            "WHERE run_id = 'one-gen'")
    compared = 0
    for metric in ("http_req_duration", "http_req_waiting", "iteration_duration",
                   "cart_value", "group_duration"):
        mine = [r for r in rows if r["metric"] == metric]
        # Read as td-report reads a whole run: every bucket's digest, stacked.
        merged = digest.stack([digest.decode(r["digest"]) for r in mine])
        lo = min(r["min"] for r in mine)
        hi = max(r["max"] for r in mine)
        zeros = sum(r["zeros"] for r in mine)
        (p95,) = digest.quantiles(merged, [0.95], lo, hi, zeros)
        theirs = k6_metrics[metric]["p(95)"]
        samples = np.array([p["value"] for p in points if p["metric"] == metric])
        assert sum(r["count"] for r in mine) == len(samples) == k6_metrics[metric].get(
            "count", len(samples)), metric
        exact = float(np.quantile(samples, 0.95))
        assert p95 == pytest.approx(theirs, rel=0.01), (metric, p95, theirs, exact)
        assert lo == pytest.approx(k6_metrics[metric]["min"], abs=1e-9)
        assert hi == pytest.approx(k6_metrics[metric]["max"], abs=1e-9)
        compared += 1
    counts = {r["metric"]: r for r in await fetch(
        dsn, "SELECT metric, sum(value) AS total FROM counter_buckets "
             "WHERE run_id = 'one-gen' AND metric_type = 'counter' GROUP BY metric")}
    assert counts["http_reqs"]["total"] == k6_metrics["http_reqs"]["count"]
    assert counts["iterations"]["total"] == k6_metrics["iterations"]["count"]
    assert compared == 5
