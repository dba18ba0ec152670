"""6. The project's digest against numpy's exact quantiles, on the k6 stream this run
recorded: per (series, 10 s bucket) merged from k parts as td-server merges them, read
stacked as td-report reads several rows, and whole-run p95 against k6's own summary.

The recording is taken ``copies`` times, each copy's timestamps shifted by the
recording's span (rounded up to a whole second), as a longer run would look. Trend
samples are grouped as the forwarder groups them. A check passes when the relative error
is <= 1 % or the rank error is <= 0.2 percentage points.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson

from common import digest, protocol
from common.timebucket import NS_PER_S, parse_epoch_ns
from scripts.bench.base import BUCKET_SECONDS, MERGE_WAYS, QS, TAG_KEYS, Plan, Recording
from td_server.aggregator import TrendAggregator

MIN_SAMPLES = 1000
REL_TOL = 0.01
RANK_TOL = 0.002  # 0.2 percentage points
Floats = npt.NDArray[np.float64]


# --- the samples --------------------------------------------------------------------


@dataclass
class Samples:
    """Trend samples of one copy of the recording, in arrival order."""

    series: list[tuple[str, tuple[str | None, ...]]]  # series id -> (metric, tag values)
    sid: npt.NDArray[np.int64]
    second: npt.NDArray[np.int64]
    value: Floats
    shift_seconds: int


def load_samples(path: Path) -> Samples:
    kinds: dict[str, str] = {}
    index: dict[tuple[str, tuple[str | None, ...]], int] = {}
    sids: list[int] = []
    nanos: list[int] = []
    values: list[float] = []
    first, last = math.inf, -math.inf
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            obj = orjson.loads(line)
            if obj["type"] == "Metric":
                kinds[obj["data"]["name"]] = obj["data"]["type"]
                continue
            data = obj["data"]
            ns = parse_epoch_ns(data["time"])
            first, last = min(first, ns), max(last, ns)
            if kinds.get(obj["metric"]) != "trend":
                continue
            tags = data.get("tags") or {}
            key = (obj["metric"], tuple(map(tags.get, TAG_KEYS)))
            sids.append(index.setdefault(key, len(index)))
            nanos.append(ns)
            values.append(float(data["value"]))
    return Samples(list(index), np.array(sids, dtype=np.int64),
                   np.array(nanos, dtype=np.int64) // NS_PER_S,
                   np.array(values, dtype=np.float64),
                   math.ceil(int(last - first) / NS_PER_S))


def series_buckets(samples: Samples, copies: int) -> list[tuple[int, int, Floats]]:
    """(series id, bucket start, values in arrival order) over all shifted copies."""
    n = len(samples.value)
    sid = np.tile(samples.sid, copies)
    offsets = np.repeat(np.arange(copies, dtype=np.int64) * samples.shift_seconds, n)
    second = np.tile(samples.second, copies) + offsets
    bucket = second // BUCKET_SECONDS * BUCKET_SECONDS
    value = np.tile(samples.value, copies)
    order = np.lexsort((np.arange(len(value)), bucket, sid))  # stable: arrival order kept
    sid, bucket, value = sid[order], bucket[order], value[order]
    cuts = np.flatnonzero((np.diff(sid) != 0) | (np.diff(bucket) != 0)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [len(value)]))
    return [(int(sid[s]), int(bucket[s]), value[s:e]) for s, e in zip(starts, ends, strict=True)]


# --- errors -------------------------------------------------------------------------


def relative_error(estimate: float, exact: float) -> float:
    if exact == 0:
        return 0.0 if estimate == 0 else math.inf
    return abs(estimate - exact) / abs(exact)


def rank_error(sorted_values: Floats, estimate: float, q: float) -> float:
    """Distance from q to the estimate's rank interval [#(< est), #(<= est)] / n."""
    n = len(sorted_values)
    low = np.searchsorted(sorted_values, estimate, side="left") / n
    high = np.searchsorted(sorted_values, estimate, side="right") / n
    if low <= q <= high:
        return 0.0
    return float(min(abs(q - low), abs(q - high)))


# --- results --------------------------------------------------------------------------


@dataclass
class AccuracyRow:
    read: str  # "merged" (td-server's row) or "stacked" (the parts read as td-report does)
    ways: int
    checks: int
    failed: int
    worst_rel: dict[str, float]  # by quantile label, p50 .. p99
    worst_rank_pp: dict[str, float]
    worst_score: dict[str, float]  # min(rel / REL_TOL, rank / RANK_TOL): <= 1 passes
    failed_by_q: dict[str, int]
    median_buckets: float
    median_bytes: float
    seconds: float


@dataclass
class WholeRunRow:
    metric: str  # k6's summary name, with a tag filter if any
    samples: int
    k6_p95: float
    numpy_p95: float
    digest_p95: float
    rel_vs_numpy: float
    rank_pp: float


@dataclass
class AccuracyResult:
    source: str
    recording_seconds: int
    copies: int
    series_buckets: int
    eligible: int
    min_samples: int
    rel_tol: float
    rank_tol: float
    rows: list[AccuracyRow]
    whole_run: list[WholeRunRow]


class _Tally:
    def __init__(self) -> None:
        self.rel = dict.fromkeys(QS, 0.0)
        self.rank = dict.fromkeys(QS, 0.0)
        self.score = dict.fromkeys(QS, 0.0)
        self.failed = dict.fromkeys(QS, 0)
        self.checks = 0

    def add(self, q: float, estimate: float, ordered: Floats, exact: float) -> None:
        rel = relative_error(estimate, exact)
        rank = rank_error(ordered, estimate, q)
        self.checks += 1
        self.rel[q] = max(self.rel[q], rel)
        self.rank[q] = max(self.rank[q], rank)
        self.score[q] = max(self.score[q], min(rel / REL_TOL, rank / RANK_TOL))
        if rel > REL_TOL and rank > RANK_TOL:
            self.failed[q] += 1

    def row(self, read: str, ways: int, buckets: list[int], sizes: list[int],
            seconds: float) -> AccuracyRow:
        def label(q: float) -> str:
            return f"p{round(100 * q)}"
        return AccuracyRow(
            read, ways, self.checks, sum(self.failed.values()),
            {label(q): v for q, v in self.rel.items()},
            {label(q): 100 * v for q, v in self.rank.items()},
            {label(q): v for q, v in self.score.items()},
            {label(q): v for q, v in self.failed.items()},
            statistics.median(buckets), statistics.median(sizes), seconds)


def _merged(metric: str, values: Floats, ways: int) -> tuple[list[digest.Centroids], Floats,
                                                                digest.Centroids, int]:
    """Each of ``ways`` parts made a partial as the forwarder makes it (split_zeros), the
    partials merged by td-server's TrendAggregator (deferred merging, then one merge as
    its ``values`` does). Returns (the parts' digests, their extremes, merged, zeros)."""
    aggregator = TrendAggregator()
    state = None
    parts = []
    for i, part in enumerate(np.array_split(values, ways)):
        centroids, zeros = digest.split_zeros(part)
        parts.append(centroids)
        partial = protocol.TrendPartial(metric, (), 0, BUCKET_SECONDS, len(part),
                                        math.fsum(part), float(part.min()), float(part.max()),
                                        centroids, zeros)
        if state is None:
            state = aggregator.new_state(partial, str(i))
        else:
            aggregator.add(state, partial, str(i))
    assert state is not None
    return parts, np.array([state.lo, state.hi]), digest.merge(state.parts), state.zeros


_SUBMETRIC = re.compile(r"^([^{]+)\{([^:}]+):([^}]*)\}$")


def _matches(tag_values: tuple[str | None, ...], key: str | None, want: str | None) -> bool:
    if key is None:
        return True
    if key in TAG_KEYS:
        return tag_values[TAG_KEYS.index(key)] == want
    if key == "expected_response":  # not a series tag: k6's default is status 200..399
        status = tag_values[TAG_KEYS.index("status")]
        expected = status is not None and status.isdigit() and 200 <= int(status) <= 399
        return expected == (want == "true")
    return False


def whole_run(samples: Samples, summary_path: Path) -> list[WholeRunRow]:
    """Whole-run p95 of copy 1 alone (one generator, as k6 saw it), merged from its
    per-bucket digests, against numpy's and k6's own ``--summary-export`` p(95)."""
    summary = json.loads(summary_path.read_text())["metrics"]
    groups = series_buckets(samples, 1)
    rows = []
    for name in sorted(summary):
        k6_p95 = summary[name].get("p(95)")
        if k6_p95 is None:
            continue
        found = _SUBMETRIC.match(name)
        metric, key, want = (found.groups() if found else (name, None, None))
        picked = [values for sid, _, values in groups
                  if samples.series[sid][0] == metric
                  and _matches(samples.series[sid][1], key, want)]
        if not picked:
            continue
        everything = np.sort(np.concatenate(picked))
        parts = [digest.split_zeros(v) for v in picked]
        merged = digest.merge([c for c, _ in parts])
        estimate = float(digest.quantiles(merged, [0.95], float(everything[0]),
                                          float(everything[-1]),
                                          sum(z for _, z in parts))[0])
        exact = float(np.quantile(everything, 0.95))
        rows.append(WholeRunRow(name, len(everything), float(k6_p95), exact, estimate,
                                relative_error(estimate, exact),
                                100 * rank_error(everything, estimate, 0.95)))
    return rows


def run(plan: Plan, recording: Recording) -> AccuracyResult:
    samples = load_samples(recording.path)
    groups = series_buckets(samples, plan.accuracy_copies)
    eligible = [(samples.series[sid][0], values) for sid, _, values in groups
                if len(values) >= MIN_SAMPLES]
    exact = [(np.sort(v), np.quantile(v, QS)) for _, v in eligible]
    rows = []
    for ways in MERGE_WAYS:
        merged_tally, stacked_tally = _Tally(), _Tally()
        buckets: list[int] = []
        sizes: list[int] = []
        started = time.perf_counter()
        stacked_seconds = 0.0
        for (metric, values), (ordered, truth) in zip(eligible, exact, strict=True):
            parts, (lo, hi), merged, zeros = _merged(metric, values, ways)
            estimates = digest.quantiles(merged, QS, float(lo), float(hi), zeros)
            buckets.append(len(merged))
            sizes.append(len(digest.encode(merged)))
            t0 = time.perf_counter()
            stacked = digest.quantiles(digest.stack(parts), QS, float(lo), float(hi), zeros)
            stacked_seconds += time.perf_counter() - t0
            for q, merged_q, stacked_q, true in zip(QS, estimates, stacked, truth,
                                                    strict=True):
                merged_tally.add(q, float(merged_q), ordered, float(true))
                stacked_tally.add(q, float(stacked_q), ordered, float(true))
        seconds = time.perf_counter() - started - stacked_seconds
        rows.append(merged_tally.row("merged", ways, buckets, sizes, seconds))
        rows.append(stacked_tally.row("stacked", ways, buckets, sizes, stacked_seconds))
    return AccuracyResult(
        source=f"{recording.seconds} s of common/harness/record.js recorded by this run",
        recording_seconds=recording.seconds, copies=plan.accuracy_copies,
        series_buckets=len(groups), eligible=len(eligible), min_samples=MIN_SAMPLES,
        rel_tol=REL_TOL, rank_tol=RANK_TOL, rows=rows,
        whole_run=whole_run(samples, recording.summary_path))
