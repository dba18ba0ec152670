"""The real forwarder fed every kind of bad line mixed with good ones, over real sockets.

The good lines must all be stored exactly; every bad one is reported with its line
number, counted by reason, and summed up in the forwarder's last line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from common import protocol
from tests.faults import k6_time, metric_lines, point_line
from tests.utils import run_server

NOW_NS = (int(time.time()) - 120) * 10**9


def good_points() -> list[str]:
    lines = []
    for i in range(300):
        ns = NOW_NS + i * 10_000_000
        tags = {"name": "a"}
        lines += [point_line("http_reqs", ns, 1, tags),
                  point_line("http_req_duration", ns, float(i % 50) + 0.5, tags),
                  point_line("vus", ns, 5, {})]
    return lines


BAD_LINES = {
    "bad_json": ['{"type":"Point","metric":"http_reqs","data":{"value":NaN}}',
                 '"value":1,"tags":{}}}'],
    # The start of a JSON line whose rest never comes: it is held (k6's progress output
    # may have cut it), and counted lost once the next such start arrives or input ends.
    "cut_line": ['{"type":"Point","metric":"http_reqs",'],
    "point_before_metric": [point_line("late_metric", NOW_NS, 1, {})],
    "unknown_metric_type": [json.dumps({"type": "Metric", "metric": "odd",
                                        "data": {"name": "odd", "type": "histogram"}})],
    "huge_value": [point_line("http_reqs", NOW_NS, 1e300, {"name": "a"})],
    "bad_value": [point_line("http_reqs", NOW_NS, 1, {"name": "a"}).replace(
        '"value": 1', '"value": "1"')],
    "bad_time": [point_line("http_reqs", NOW_NS, 1, {"name": "a"}).replace(
        k6_time(NOW_NS), "yesterday")],
    "bad_shape": ["[1, 2, 3]", '{"type": "Point"}'],
}


async def test_bad_stdin_lines_are_reported_and_good_ones_all_stored(dsn: str,
                                                                     tmp_path: Path) -> None:
    good = good_points()
    lines = metric_lines()
    expected_reports: list[tuple[int, str]] = []
    bad = [(reason, line) for reason, group in BAD_LINES.items() for line in group]
    for i, line in enumerate(good):
        lines.append(line)
        if i % 40 == 0 and bad:
            reason, bad_line = bad.pop()
            lines.append(bad_line)
            expected_reports.append((len(lines), reason))
    # k6's own text is harmless: counted, not reported, not a loss.
    lines[len(lines) // 2:len(lines) // 2] = ["", "running (06.0s), 08/18 VUs, 941 complete",
                                              "     ✓ items 200"]
    expected_reports = [(n + 3 if n > len(lines) // 2 - 3 else n, r)
                        for n, r in expected_reports]
    # k6 killed mid-line: the stream ends without a newline.
    stream = "\n".join(lines) + "\n" + point_line("http_reqs", NOW_NS, 1, {})[:40]
    expected_reports.append((len(lines) + 1, "truncated_line"))
    assert not bad
    async with (
        run_server(dsn, tmp_path, protocol.ROLE_TD, grace=0) as td,
        run_server(dsn, tmp_path, protocol.ROLE_NON_TD, grace=0) as non_td,
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "k6_forward", "--run-id", "bad-input",
            "--td", f"127.0.0.1:{td.address[1]}", "--non-td", f"127.0.0.1:{non_td.address[1]}",
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(process.communicate(stream.encode()), 60)
        assert process.returncode == 3, err.decode()  # lines were lost
    report = err.decode()
    for number, reason in expected_reports:
        assert f"line {number}: skipped ({reason})" in report, (number, reason, report)
    summary, last = report.strip().splitlines()[-2:]
    assert last.startswith("k6-forward: error: not every sample read was stored")
    counts = dict(re.findall(r"(\w+)=(\d+)", summary))
    assert {k: int(v) for k, v in counts.items()} == {
        **{reason: len(group) for reason, group in BAD_LINES.items()}, "truncated_line": 1}
    assert f"{len(expected_reports)} lines lost" in summary
    assert f"{len(good)} samples read, {len(good)} stored, 0 refused" in summary
    assert "3 lines of k6 text ignored" in summary

    conn = await asyncpg.connect(dsn)
    try:
        reqs = await conn.fetchval("SELECT sum(value) FROM counter_buckets "
                                   "WHERE run_id = 'bad-input' AND metric = 'http_reqs'")
        trend = await conn.fetchrow("SELECT sum(count) AS n, sum(sum) AS total, min(min) AS lo "
                                    "FROM trend_buckets WHERE run_id = 'bad-input'")
        vus = await conn.fetchval("SELECT sum(count) FROM counter_buckets "
                                  "WHERE run_id = 'bad-input' AND metric = 'vus'")
    finally:
        await conn.close()
    assert reqs == 300
    assert trend["n"] == 300
    assert trend["total"] == sum(float(i % 50) + 0.5 for i in range(300))
    assert trend["lo"] == 0.5
    assert vus == 300


@pytest.mark.parametrize(("tags", "message"), [
    (",".join(f"k{i}" for i in range(33)), "33 keys, the servers accept 32"),
    ("name," + "k" * 257, "is longer than 256 chars"),
])
async def test_tag_keys_the_servers_would_refuse_are_a_config_error(
        tags: str, message: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "k6_forward", "--tags", tags, os.devnull,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert message in err.decode()
