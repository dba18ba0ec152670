"""What the benchmarks share: the plan, the limits they are held to, k6 recordings and
summaries, /proc readings and synthetic digests."""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import digest, harness

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
BUCKET_SECONDS = 10
QS = (0.5, 0.9, 0.95, 0.99)
TAG_KEYS = ("name", "method", "status", "scenario", "group")
FORWARDER_DONE = re.compile(
    r"done: (?P<lines>\d+) lines read; (?P<samples>\d+) samples read, .*?; "
    r"(?P<skipped>\d+) lines lost.*; (?P<partials>\d+) partials acknowledged")

# Targets, from the issue.
FORWARDER_TARGET = 0.5
K6_COMPLETED_TARGET = 0.99
K6_DROPPED_ALLOWANCE = 0.005  # of the scheduled iterations (rate x duration)
K6_TARGET_RATES = (5000, 10000)
TD_TCP_TARGET = 0.5
MEMORY_TARGET_BYTES = 16 * 1024
ROWS_TARGET = 1000.0
BYTES_TARGET = 100.0
QUERY_TARGET = 100.0
# td_server.aggregator's threshold (digest rows held) above which a bucket's parts are
# merged into one digest; read for the report.
COMPACT_SETTING = "_COMPACT_ABOVE_CENTROIDS"
MEMORY_PARTIALS = (1, 2, 3, 4, 8)
MERGE_WAYS = (1, 10, 100)


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says why."""


@dataclass(frozen=True)
class Plan:
    quick: bool
    forwarder_args: tuple[str, ...]
    k6_rates: tuple[int, ...]
    k6_seconds: int
    record_seconds: int
    sample_seconds: int  # the stream the forwarder and accuracy benchmarks read
    td_series: int
    td_buckets: int
    td_items_per_frame: int
    non_td_series: int
    non_td_buckets: int
    non_td_items_per_frame: int
    memory_series: int
    accuracy_copies: int
    producers: int = 4
    tcp_rounds: int = 3
    k6_repeats: int = 3  # at the target rates (5,000 and 10,000/s); once at the others
    query_runs: int = 15


FULL = Plan(quick=False, forwarder_args=(),
            k6_rates=(1000, 2500, 4000, 5000, 7500, 10000),
            k6_seconds=10, record_seconds=180, sample_seconds=35, td_series=2500,
            td_buckets=2, td_items_per_frame=250, non_td_series=12500, non_td_buckets=4,
            non_td_items_per_frame=1000, memory_series=10000, accuracy_copies=8)
QUICK = Plan(quick=True, forwarder_args=("--copies", "4", "--repeat", "1"),
             k6_rates=(5000, 10000), k6_seconds=10, record_seconds=20, sample_seconds=20,
             td_series=1500, td_buckets=2, td_items_per_frame=250, non_td_series=5000,
             non_td_buckets=2, non_td_items_per_frame=1000, memory_series=2500,
             accuracy_copies=2, k6_repeats=2)


def child_env(**extra: str) -> dict[str, str]:
    return harness.child_env(**extra)


# --- k6 summaries and recordings ----------------------------------------------------


@dataclass
class K6Summary:
    iterations: int
    dropped: int
    http_reqs: int
    http_reqs_per_s: float
    p95_ms: float


def read_summary(path: Path) -> K6Summary:
    metrics = json.loads(path.read_text())["metrics"]
    return K6Summary(
        iterations=int(metrics["iterations"]["count"]),
        dropped=int(metrics.get("dropped_iterations", {}).get("count", 0)),
        http_reqs=int(metrics["http_reqs"]["count"]),
        http_reqs_per_s=float(metrics["http_reqs"]["rate"]),
        p95_ms=float(metrics["http_req_duration"]["p(95)"]))


@dataclass
class Recording:
    """A k6 stream this run recorded (record.js against the harness's target)."""

    path: Path
    summary_path: Path
    seconds: int
    browse_rate: int
    checkout_rate: int
    bytes: int
    http_reqs: int
    http_reqs_per_s: float
    iterations: int
    dropped: int


async def record(workdir: Path, name: str, base: str, seconds: int, browse: int,
                 checkout: int) -> Recording:
    """``k6 run --out json=FILE record.js`` for ``seconds`` at these arrival rates."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.json"
    summary = workdir / f"{name}-summary.json"
    env = child_env(BROWSE=str(browse), CHECKOUT=str(checkout))
    code, err = await harness.record("record.js", path, base, f"{seconds}s",
                                     "--summary-export", str(summary), env=env)
    if code != 0:
        raise BenchError(f"k6 recording {name} exited {code}:\n{err[-2000:]}")
    s = read_summary(summary)
    return Recording(path, summary, seconds, browse, checkout, path.stat().st_size,
                     s.http_reqs, s.http_reqs_per_s, s.iterations, s.dropped)


def forwarder_done(log: str) -> dict[str, int]:
    found = FORWARDER_DONE.search(log)
    if found is None:
        raise BenchError(f"k6-forward did not finish cleanly:\n{log[-2000:]}")
    return {key: int(found.group(key)) for key in ("lines", "samples", "partials", "skipped")}


# --- /proc ----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (a zombie still reports its totals)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --- synthetic digests, for the servers' benchmarks ---------------------------------


@dataclass
class Digest300:
    blob: bytes
    count: int
    total: float
    lo: float
    hi: float


def digest_pool(size: int, centroids: int = 300, seed: int = 7) -> list[Digest300]:
    """Digests of 300 (value, weight) rows before bucketing: lognormal values (ms-like),
    integer weights, encoded as the forwarder sends them."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        means = np.sort(rng.lognormal(1.0, 0.6, centroids))
        weights = rng.integers(1, 40, centroids).astype(np.float64)
        pool.append(Digest300(digest.encode(np.column_stack([means, weights])),
                              int(weights.sum()), float(np.dot(means, weights)),
                              float(means[0]), float(means[-1])))
    return pool


def series_tags(index: int) -> dict[str, str]:
    return {"name": f"/api/{index}", "method": "GET", "status": "200", "scenario": "default",
            "group": ""}


def future_bucket() -> int:
    """Ten minutes ahead: inside --max-bucket-ahead, and nothing closes while measuring."""
    return (int(time.time()) // BUCKET_SECONDS + 60) * BUCKET_SECONDS
