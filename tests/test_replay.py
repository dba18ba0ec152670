"""td-replay against the real servers and PostgreSQL: its verification passes on a clean
replay and fails, naming the metric, when a data frame is deliberately dropped."""

from __future__ import annotations

import asyncio
import calendar
import gzip
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from common.harness import server_process
from td_replay.recording import Shifter, bucket_offset, load

pytestmark = pytest.mark.timeout(110)

# A 10 s boundary, so the replay's buckets are [now, now + 10), ... [now + 20, now + 30).
START = 1_790_000_000
SPAN_SECONDS = 25.0
METRICS = {
    "http_reqs": "counter", "data_sent": "counter", "http_req_duration": "trend",
    "http_req_connecting": "trend", "http_req_failed": "rate", "checks": "rate",
    "vus": "gauge",
}


def k6_time(ns: int, style: int) -> str:
    """k6's RFC 3339 forms: trimmed nanoseconds with Z, a +02:00 offset, no fraction."""
    seconds, fraction = divmod(ns, 10**9)
    digits = f".{fraction:09d}".rstrip("0").rstrip(".")
    if style == 1:
        seconds += 7200
        suffix = "+02:00"
    else:
        suffix = "Z"
    if style == 2:
        digits = ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + digits + suffix


def write_recording(path: Path, iterations: int = 3_300) -> Counter[str]:
    """A synthetic k6 --out json stream of about 20k lines over 25 s: Metric lines, then
    Points of all four types. Returns the number of Points per metric."""
    rng = random.Random(7)
    counts: Counter[str] = Counter()
    declared: set[str] = set()
    out = []

    def point(metric: str, ns: int, value: float, tags: dict[str, str], style: int) -> None:
        if metric not in declared:
            declared.add(metric)
            out.append(json.dumps({"type": "Metric", "data": {
                "name": metric, "type": METRICS[metric], "contains": "default",
                "thresholds": [], "submetrics": None}, "metric": metric},
                separators=(",", ":")))
        out.append(json.dumps({"metric": metric, "type": "Point", "data": {
            "time": k6_time(ns, style), "value": value, "tags": tags}}, separators=(",", ":")))
        counts[metric] += 1

    step = int(SPAN_SECONDS * 10**9 / iterations)
    next_vus = 0
    for i in range(iterations):
        ns = START * 10**9 + i * step + rng.randrange(1000)
        style = 1 if i % 7 == 0 else 2 if i % 97 == 0 else 0
        if ns >= next_vus:
            point("vus", ns, rng.randint(5, 9), {}, style)
            next_vus = ns + 10**9
        failed = rng.random() < 0.05
        tags = {"name": rng.choice("abc"), "method": rng.choice(["GET", "POST"]),
                "status": "500" if failed else "200", "scenario": "s1", "url": "x"}
        point("http_reqs", ns, 1, tags, style)
        point("http_req_duration", ns, round(rng.lognormvariate(3, 1), 6), tags, style)
        point("http_req_connecting", ns, 0 if rng.random() < 0.9 else rng.random(), tags,
              style)
        point("http_req_failed", ns, int(failed), tags, style)
        point("data_sent", ns, round(rng.uniform(50, 500), 3), tags, style)
        point("checks", ns, int(not failed), {"check": "ok", "scenario": "s1"}, style)
    with gzip.open(path, "wt") as f:
        f.write("\n".join(out) + "\n")
    return counts


def point_line(time_text: str, metric: str = "m", value: float = 1.0) -> str:
    return json.dumps({"metric": metric, "type": "Point", "data": {
        "time": time_text, "value": value, "tags": {"name": "a"}}}, separators=(",", ":"))


def metric_line(name: str, kind: str) -> str:
    return json.dumps({"type": "Metric", "data": {"name": name, "type": kind}, "metric": name},
                      separators=(",", ":"))


@pytest.mark.parametrize(("shift_ns", "before", "after"), [
    # Whole seconds: the fraction's text (all nine digits) and the offset are kept.
    (12_050 * 10**9, "2026-11-23T15:26:21.227868137Z", "2026-11-23T18:47:11.227868137Z"),
    (12_050 * 10**9, "2026-11-23T17:26:21.2278+02:00", "2026-11-23T20:47:11.2278+02:00"),
    (-86_400 * 10**9, "2026-03-01t00:00:00z", "2026-02-28t00:00:00z"),
    (3_600 * 10**9, "2026-12-31 23:30:05.100-05:00", "2027-01-01 00:30:05.100-05:00"),
    # A fraction of a second: the fraction is rewritten as k6 writes it.
    (137_000_000, "2026-11-23T15:26:21.999999999Z", "2026-11-23T15:26:22.136999999Z"),
    (863_000_000, "2026-11-23T15:26:21.137Z", "2026-11-23T15:26:22Z"),
    (10**9 + 5, "2026-11-23T15:26:21+02:00", "2026-11-23T15:26:22.000000005+02:00"),
])
def test_shift_rewrites_only_the_time(tmp_path: Path, shift_ns: int, before: str,
                                      after: str) -> None:
    path = tmp_path / "r.json"
    path.write_text(metric_line("m", "counter") + "\n" + point_line(before) + "\n")
    recording = load(path)
    (chunk,) = recording.chunks
    shifted = Shifter(shift_ns).apply(chunk).decode().splitlines()
    assert shifted == [metric_line("m", "counter"), point_line(after)]


def test_shift_of_many_seconds_in_one_chunk(tmp_path: Path) -> None:
    """Consecutive seconds in one block: each line moves exactly once."""
    path = tmp_path / "r.json"
    times = [f"2026-11-23T15:26:{s:02d}.5Z" for s in range(10, 20)]
    path.write_text("\n".join([metric_line("m", "counter")] + [point_line(t) for t in times])
                    + "\n")
    (chunk,) = load(path).chunks
    for seconds in (1, 3, -1, -3):
        shifted = Shifter(seconds * 10**9).apply(chunk).decode().splitlines()[1:]
        assert shifted == [point_line(f"2026-11-23T15:26:{s + seconds:02d}.5Z")
                           for s in range(10, 20)]


def test_expected_figures_follow_the_forwarders_rules(tmp_path: Path) -> None:
    path = tmp_path / "r.json.gz"
    lines = [
        point_line("2026-11-23T15:26:21Z", "early"),  # before its Metric line: skipped
        metric_line("early", "counter"), metric_line("t", "trend"), metric_line("r", "rate"),
        point_line("2026-11-23T15:26:21Z", "early", 2.5),
        point_line("2026-11-23T15:26:22Z", "early", 0.5),
        point_line("2026-11-23T15:26:23Z", "r", 0), point_line("2026-11-23T15:26:24Z", "r", 1),
        point_line("2026-11-23T15:26:25.5Z", "t", 7),
        point_line("not a time", "t", 1), point_line("2026-11-23T15:26:25Z", "t", True),
        point_line("2026-11-23T15:26:25Z", "unknown", 1), "not json", "",
        # Not k6's layout: rewritten into it so that its time can be shifted.
        json.dumps({"type": "Point", "data": {"value": 3, "time": "2026-11-23T15:26:26Z"},
                    "metric": "t"}),
    ]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    recording = load(path, max_lines=4)
    figures = {name: (f.kind, f.count, f.total, f.nonzero)
               for name, f in recording.figures.items()}
    assert figures == {"early": ("counter", 2, 3.0, 2), "r": ("rate", 2, 1.0, 1),
                       "t": ("trend", 2, 10.0, 2)}
    assert recording.samples == 6
    assert recording.normalized == 1
    assert recording.lines == len(lines) == sum(c.lines for c in recording.chunks)
    assert recording.span_seconds == 5.0
    assert b'"data":{"time":"2026-11-23T15:26:26Z","value":3}' in recording.chunks[-1].block
    first_bucket = calendar.timegm((2026, 11, 23, 15, 26, 20))  # of 15:26:21
    assert bucket_offset(recording.first_ns, 10, 1_800_000_007.5) == (
        1_800_000_000 - first_bucket)


async def replay(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "td_replay", *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_replay_verifies_and_catches_a_dropped_frame(dsn: str, tmp_path: Path) -> None:
    recording = tmp_path / "recording.json.gz"
    counts = write_recording(recording)
    assert 19_000 <= sum(counts.values()) + len(counts) <= 21_000
    summary = tmp_path / "summary.json"
    common = [str(recording), "--generators", "2", "--max", "--dsn", dsn, "--grace", "1",
              "--settle", "3", "--progress", "lines"]
    async with (
        server_process("td_server", dsn, tmp_path, "--grace", "1") as td,
        server_process("non_td_server", dsn, tmp_path, "--grace", "1") as non_td,
    ):
        # Both at once, to keep the test short: a clean replay against these servers
        # (their pids found from the listening ports), and one that starts servers of its
        # own and drops generator 0's second data frame.
        (code, out, err), (bad_code, bad_out, bad_err) = await asyncio.gather(
            replay(*common, "--td", f"{td.address[0]}:{td.address[1]}",
                   "--non-td", f"{non_td.address[0]}:{non_td.address[1]}",
                   "--run-id", "replay-clean", "--summary-json", str(summary)),
            replay(*common, "--start-servers", "--run-id", "replay-drop",
                   "--drop-frame", "2"))

    assert code == 0, out + err
    assert "verification: OK" in out, out
    assert "MISMATCH" not in out
    result = json.loads(summary.read_text())
    assert result["ok"] is True
    assert result["sent"]["samples"] == 2 * sum(counts.values())
    for metric, n in counts.items():
        assert result["stored"][metric]["count"] == 2 * n, metric
    pids = {s["name"]: s["pid"] for s in result["servers"]}
    assert pids == {"td-server": td.process.pid, "non-td-server": non_td.process.pid}
    assert all(s["cpu_seconds"] is not None and s["peak_rss_bytes"] for s in result["servers"])
    freshness = result["freshness_seconds"]
    assert freshness is not None
    assert 0 <= freshness["p50"] <= freshness["p99"] < 15, freshness
    assert re.search(r"freshness .* p50 [\d.]+ s, p99 [\d.]+ s", out), out

    assert bad_code == 1, bad_out + bad_err
    dropped = re.search(r"discarded data frame 2 \(.*samples of metrics ([^)]*)\)", bad_err)
    assert dropped, bad_err
    metrics = dropped.group(1).split(", ")
    mismatches = [line for line in bad_out.splitlines() if line.startswith("MISMATCH")]
    assert mismatches, bad_out
    assert any(f"metric {m} " in line for m in metrics for line in mismatches), bad_out
    assert "verification: FAILED" in bad_out
    assert "started by td-replay" in bad_out
