"""End to end with values real k6 scripts produce: long URLs as k6's default `name`
tag, and a NUL in a tag. The real k6 binary -> k6-forward -> both servers -> PostgreSQL.

Every other sample must be stored exactly; the NUL samples are counted as lost, named
with their cause, and the forwarder's exit status says so.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from common.harness import http_target, k6_pipeline, server_process
from tests.rawstream import group, load_points
from tests.utils import fetch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def stored_name(value: str) -> str:
    """The documented rule (docs/PROTOCOL.md), written out here independently."""
    if len(value) <= 256:
        return value
    return value[:239] + "~" + hashlib.blake2b(value.encode(), digest_size=8).hexdigest()


async def test_long_urls_and_nul_tags_cost_only_themselves(dsn: str, tmp_path: Path) -> None:
    async with (
        http_target() as base,
        server_process("td_server", dsn, tmp_path, "--grace", "1") as td,
        server_process("non_td_server", dsn, tmp_path, "--grace", "1") as non_td,
    ):
        raw = tmp_path / "raw.json"
        code, err = await k6_pipeline(base, raw, td.address, non_td.address, "hostile", "8s",
                                      script="hostile.js")
        assert await td.stop() == 0
        assert await non_td.stop() == 0
    kinds, points = load_points(raw)
    nul = [p for p in points if any("\x00" in v for _, v in p["tags"])]
    good = [p for p in points if p not in nul]
    long_names = {v for p in good for k, v in p["tags"] if k == "name" and len(v) > 256}
    assert nul
    assert len(long_names) == 3  # three distinct long URLs
    # Lost samples change the exit status and are named with their cause.
    assert code == 3, err
    summary = err.strip().splitlines()[-2]
    print(summary)
    assert f"{len(points)} samples read" not in summary  # the NUL samples were not taken
    assert re.search(rf"{len(good)} stored, 0 refused by the servers; {len(nul)} lines lost "
                     rf"\(bad_character={len(nul)}\)", summary), summary
    assert "tag values longer than 256 characters shortened" in summary
    assert "k6-forward: error: not every sample read was stored" in err

    expected = group({"raw": [
        {**p, "tags": tuple((k, stored_name(v)) for k, v in p["tags"])} for p in good]})
    trend_rows = await fetch(dsn, "SELECT metric, tags::text AS tags, "
                                  "extract(epoch from bucket)::bigint AS b, count "
                                  "FROM trend_buckets WHERE run_id = 'hostile'")
    counter_rows = await fetch(dsn, "SELECT metric, tags::text AS tags, "
                                    "extract(epoch from bucket)::bigint AS b, count "
                                    "FROM counter_buckets WHERE run_id = 'hostile'")
    stored = {(r["metric"], tuple(sorted(json.loads(r["tags"]).items())), r["b"]): r["count"]
              for r in [*trend_rows, *counter_rows]}
    assert stored == {key: len(by["raw"]) for key, by in expected.items()}
    assert {kinds[key[0]] for key in stored} >= {"trend", "counter", "rate"}
    assert {stored_name(n) for n in long_names} <= {
        v for (_, tags, _) in stored for k, v in tags if k == "name"}


async def test_the_readme_pipe_without_quiet_loses_nothing(dsn: str, tmp_path: Path) -> None:
    """`k6 run --out json=- script.js | k6-forward`: k6's banner, progress blocks (which
    can land inside a JSON line) and summary share the pipe with the samples."""
    summary_path = tmp_path / "summary.json"
    async with (
        http_target() as base,
        server_process("td_server", dsn, tmp_path, "--grace", "1") as td,
        server_process("non_td_server", dsn, tmp_path, "--grace", "1") as non_td,
    ):
        raw = tmp_path / "raw.txt"
        code, err = await k6_pipeline(base, raw, td.address, non_td.address, "noisy", "12s",
                                      "--summary-export", str(summary_path), quiet=False)
        assert await td.stop() == 0
        assert await non_td.stop() == 0
    text = raw.read_text()
    assert text.count("running (") >= 10  # k6 really wrote its progress into the pipe
    assert code == 0, err
    summary = err.strip().splitlines()[-1]
    read = int(re.search(r"(\d+) samples read", summary).group(1))  # type: ignore[union-attr]
    assert f"{read} samples read, {read} stored, 0 refused by the servers; 0 lines lost" \
        in summary, summary
    k6 = json.loads(summary_path.read_text())["metrics"]
    rows = await fetch(dsn, "SELECT metric, sum(value) AS total, sum(count) AS n, "
                            "sum(nonzero) AS nonzero FROM counter_buckets "
                            "WHERE run_id = 'noisy' GROUP BY metric")
    counters = {r["metric"]: r for r in rows}
    trends = {r["metric"]: r["n"] for r in await fetch(
        dsn, "SELECT metric, sum(count) AS n FROM trend_buckets WHERE run_id = 'noisy' "
             "GROUP BY metric")}
    assert counters["http_reqs"]["total"] == k6["http_reqs"]["count"]
    assert counters["iterations"]["total"] == k6["iterations"]["count"]
    assert counters["data_received"]["total"] == k6["data_received"]["count"]
    assert counters["checks"]["nonzero"] == k6["checks"]["passes"]
    assert counters["checks"]["n"] == k6["checks"]["passes"] + k6["checks"]["fails"]
    assert counters["http_req_failed"]["nonzero"] == k6["http_req_failed"]["passes"]
    # One duration sample per request and per iteration: none lost to a cut line.
    assert trends["http_req_duration"] == k6["http_reqs"]["count"]
    assert trends["iteration_duration"] == k6["iterations"]["count"]
    print(f"pipe form: {summary}; http_reqs stored {counters['http_reqs']['total']:g} "
          f"of k6's {k6['http_reqs']['count']}")
