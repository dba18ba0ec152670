"""Percentiles over any set of stored rows in SQL (tdagg_percentile, in
common/store/postgres/schema.sql), against td-report's own read of the same rows and
against numpy on the raw samples."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from common import digest, protocol
from common.protocol import TrendPartial
from common.store.postgres import create_schema
from td_report.summary import TrendAccumulator
from tests.test_server_db import OLD_BUCKET
from tests.utils import Client, fetch, quantile_ok, run_server, wait_until

QS = (0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)
SQL = ("SELECT tdagg_percentile($1, array_agg(digest), sum(zeros), min(min), max(max)) "
       "FROM trend_buckets WHERE run_id = $2 AND metric = 'm' AND {where}")


def shape(rng: np.random.Generator, kind: int, n: int) -> np.ndarray:
    if kind == 0:
        return rng.lognormal(np.log(120.0), 0.8, n)
    if kind == 1:  # a gap at the median, exact zeros, negative values
        values = np.concatenate([rng.normal(1.65, 0.01, n // 2), 2.14 + rng.exponential(1, n)])
        values[rng.random(len(values)) < 0.2] = 0.0
        return values
    return rng.normal(-50.0, 20.0, n)


def item(values: np.ndarray, bucket: int, name: str) -> list[object]:
    centroids, zeros = digest.split_zeros(values)
    return protocol.trend_item(TrendPartial(
        "m", (("name", name),), bucket, 10, len(values), math.fsum(values.tolist()),
        float(values.min()), float(values.max()), centroids, zeros))


@pytest.mark.parametrize("kind", [0, 1, 2])
async def test_sql_percentiles_equal_td_reports_for_any_window_and_tags(
        dsn: str, tmp_path: Path, kind: int) -> None:
    rng = np.random.default_rng(kind)
    raw: dict[tuple[int, str], list[np.ndarray]] = {}
    run_id = f"sql-{kind}"
    async with run_server(dsn, tmp_path, grace=0.0) as server:
        clients = [await Client.connect(server.address, run_id=run_id) for _ in range(2)]
        for b in range(6):
            bucket = OLD_BUCKET + 10 * b
            for name in ("a", "b", "c"):
                for seq_client, client in enumerate(clients):
                    values = shape(rng, kind, int(rng.integers(200, 1500)))
                    raw.setdefault((bucket, name), []).append(values)
                    answer = await client.send(b * 3 + "abc".index(name) + 1,
                                               [item(values, bucket, name)])
                    assert answer["type"] == "ack", (seq_client, answer)

        async def written() -> bool:
            rows = await fetch(dsn, "SELECT sum(count) AS n FROM trend_buckets WHERE "
                                    "run_id = $1", run_id)
            return rows[0]["n"] == sum(len(v) for vs in raw.values() for v in vs)

        await asyncio.wait_for(wait_until(written, within=30), 40)
        for client in clients:
            await client.close()
    conn = await asyncpg.connect(dsn)
    try:
        windows = [(0, 6, ("a", "b", "c")), (2, 3, ("a",)), (1, 5, ("b", "c")),
                   (5, 6, ("c",)), (0, 6, ("a",))]
        for first, last, names in windows:
            rows = await conn.fetch(
                "SELECT digest, zeros, min, max, count, sum FROM trend_buckets WHERE "
                "run_id = $1 AND metric = 'm' AND bucket >= to_timestamp($2) AND "
                "bucket < to_timestamp($3) AND tags->>'name' = ANY($4)", run_id,
                OLD_BUCKET + 10 * first, OLD_BUCKET + 10 * last, list(names))
            accumulator = TrendAccumulator()  # td-report's read of the same rows
            for row in rows:
                accumulator.add(row["count"], row["sum"], row["min"], row["max"],
                                row["zeros"], digest.decode(row["digest"]))
            theirs = accumulator.quantiles(QS)
            samples = np.concatenate([v for (bucket, name), vs in raw.items()
                                      for v in vs if name in names
                                      and OLD_BUCKET + 10 * first <= bucket
                                      < OLD_BUCKET + 10 * last])
            where = ("bucket >= to_timestamp($3) AND bucket < to_timestamp($4) AND "
                     "tags->>'name' = ANY($5)")
            for q, expected in zip(QS, theirs, strict=True):
                ours = await conn.fetchval(SQL.format(where=where), q, run_id,
                                           OLD_BUCKET + 10 * first, OLD_BUCKET + 10 * last,
                                           list(names))
                assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12), (first, q)
                assert quantile_ok(samples, q, ours), (first, last, names, q)
    finally:
        await conn.close()


async def test_sql_reads_every_bucket_of_a_sketch(dsn: str) -> None:
    """tdagg_sketch against digest.decode: both signs, zeros, uint64 counts."""
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.lognormal(0, 3, 2000), -rng.lognormal(0, 2, 500)])
    sketch = digest.from_values(values)
    heavy = sketch.copy()
    heavy[:, 1] *= 2**33
    conn = await asyncpg.connect(dsn)
    try:
        await create_schema(conn)
        for centroids in (sketch, heavy):
            rows = await conn.fetch("SELECT value, count FROM tdagg_sketch($1) ORDER BY value",
                                    digest.encode(centroids))
            got = np.array([[r["value"], r["count"]] for r in rows])
            np.testing.assert_allclose(got, centroids, rtol=1e-12)
        assert await conn.fetch("SELECT * FROM tdagg_sketch($1)", b"") == []
        # A t-digest of an earlier release: the percentile says it cannot read it.
        legacy = np.array([[1.0, 2.0], [5.0, 1.0]], dtype="<f8").tobytes()
        assert await conn.fetchval(
            "SELECT tdagg_percentile(0.5, ARRAY[$1::bytea], 0, 1.0, 5.0)", legacy) is None
        assert await conn.fetchval(
            "SELECT tdagg_percentile(1.5, ARRAY[$1::bytea], 0, 1.0, 5.0)",
            digest.encode(sketch)) is None
        only_zeros = await conn.fetchval(
            "SELECT tdagg_percentile(0.5, ARRAY[]::bytea[], 7, 0.0, 0.0)")
        assert only_zeros == 0.0
    finally:
        await conn.close()
