#!/usr/bin/env python3
"""Accuracy of mergeable t-digests on a real k6 recording, per library and setting.

The recording is taken ``--copies`` times, each copy's timestamps shifted by the
recording's span (rounded up to a whole second), as a longer run would look. Trend
samples are grouped as the forwarder groups them: per (metric, tags name / method /
status / scenario / group, 10 s bucket). Each series-bucket with at least 1000 samples
is split into k contiguous parts (arrival order; k = 1, 3, 10, as k partials from k
generators or stragglers would be), one digest is built per part, the parts are merged,
and p50 / p90 / p95 / p99 of the merged digest are held against numpy's exact quantiles.
A check passes when the relative error is <= 1 % or the rank error is <= 0.2 percentage
points (the estimate's rank interval in the exact sorted samples is within 0.2 pp of q).

Settings: pytdigest at compression 100 / 500 / 1000, fastdigest at max_centroids 100 /
150 / 300 (each library's own merge and quantiles, unclamped), and the project's own
``common.digest`` (fastdigest 150 via from_values + merge + quantiles clamped to the
exact min / max that the servers keep beside every digest).

Also: the import time of each library in a fresh interpreter, and the whole-run p95 of
copy 1 alone (one generator), merged from its per-bucket digests, against k6's own
``--summary-export`` p(95).

    python scripts/digest_accuracy.py [--copies 8] [--input FILE] [--summary FILE] [--json]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastdigest
import numpy as np
import numpy.typing as npt
import orjson
from pytdigest import TDigest as PyTDigest

from common import digest
from common.config import ForwarderConfig
from common.timebucket import NS_PER_S, parse_epoch_ns

DEFAULT_INPUT = Path("/work/shared/k6/k6-mixed.json.gz")
DEFAULT_SUMMARY = Path("/work/shared/k6/k6-mixed.summary.json")
QS = (0.5, 0.9, 0.95, 0.99)
KS = (1, 3, 10)
MIN_SAMPLES = 1000
REL_TOL = 0.01
RANK_TOL = 0.002  # 0.2 percentage points
BUCKET_SECONDS = 10
TAG_KEYS = tuple(k.strip() for k in ForwarderConfig().tags.split(",") if k.strip())
Floats = npt.NDArray[np.float64]


# --- the settings under test --------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    label: str
    library: str
    build: Callable[[Floats], Any]
    merge: Callable[[list[Any]], Any]
    quantiles: Callable[[Any, Sequence[float], float, float], list[float]]
    centroids: Callable[[Any], int]


def _pytdigest(compression: int) -> Setting:
    def merge(parts: list[Any]) -> Any:
        result = PyTDigest(compression)
        for part in parts:
            result += part
        return result

    return Setting(
        f"pytdigest compression={compression}", "pytdigest",
        lambda values: PyTDigest.compute(values, compression=compression),
        merge,
        lambda d, qs, lo, hi: [float(v) for v in d.inverse_cdf(np.array(qs, dtype=float))],
        lambda d: int(d.get_centroids().shape[0]))


def _fastdigest(max_centroids: int) -> Setting:
    def build(values: Any) -> fastdigest.TDigest:  # numpy arrays are accepted
        return fastdigest.TDigest.from_values(values, max_centroids=max_centroids)

    return Setting(
        f"fastdigest max_centroids={max_centroids}", "fastdigest", build,
        lambda parts: functools.reduce(lambda a, b: a.merge(b), parts),
        lambda d, qs, lo, hi: list(d.quantile_vec(list(qs))),
        lambda d: int(d.n_centroids))


def _project(max_centroids: int | None = None) -> Setting:
    """common.digest as the forwarder and td-server use it; with max_centroids, the same
    code with its MAX_CENTROIDS swapped for the call (what changing the constant gives)."""
    if max_centroids is None:
        return Setting(
            f"common.digest (fastdigest {digest.MAX_CENTROIDS}, clamped)", "common.digest",
            digest.from_values, digest.merge, digest.quantiles, len)

    def under(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            saved = digest.MAX_CENTROIDS
            digest.MAX_CENTROIDS = max_centroids
            try:
                return fn(*args)
            finally:
                digest.MAX_CENTROIDS = saved
        return call

    return Setting(
        f"common.digest with MAX_CENTROIDS={max_centroids} (what-if)", "common.digest",
        under(digest.from_values), under(digest.merge), under(digest.quantiles), len)


# How queries read stored digests: the parts' centroids stacked, not recompressed.
STACKED = Setting(
    f"common.digest (fastdigest {digest.MAX_CENTROIDS}), parts read stacked", "common.digest",
    digest.from_values, digest.stack, digest.quantiles, len)

SETTINGS = [_pytdigest(100), _pytdigest(500), _pytdigest(1000),
            _fastdigest(100), _fastdigest(150), _fastdigest(300), _project(),
            _project(150), STACKED]
PROJECT = SETTINGS[6].label


# --- the samples --------------------------------------------------------------------


@dataclass
class Samples:
    """Trend samples of one copy of the recording, in arrival order."""

    series: list[tuple[str, tuple[str | None, ...]]]  # series id -> (metric, tag values)
    sid: npt.NDArray[np.int64]
    second: npt.NDArray[np.int64]
    value: Floats
    shift_seconds: int
    span_seconds: float


def load_samples(path: Path) -> Samples:
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        lines = f.read().split(b"\n")
    kinds: dict[str, str] = {}
    index: dict[tuple[str, tuple[str | None, ...]], int] = {}
    sids: list[int] = []
    nanos: list[int] = []
    values: list[float] = []
    first, last = math.inf, -math.inf
    for line in lines:
        if not line:
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
    span_ns = int(last - first)
    return Samples(list(index), np.array(sids, dtype=np.int64),
                   np.array(nanos, dtype=np.int64) // NS_PER_S,
                   np.array(values, dtype=np.float64),
                   math.ceil(span_ns / NS_PER_S), span_ns / NS_PER_S)


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


@dataclass
class Tally:
    checks: int = 0
    failed: int = 0
    worst_rel: float = 0.0
    worst_rank: float = 0.0
    failed_by_metric: dict[str, int] = field(default_factory=dict)
    failed_by_q: dict[float, int] = field(default_factory=lambda: dict.fromkeys(QS, 0))
    failed_by_k: dict[int, int] = field(default_factory=lambda: dict.fromkeys(KS, 0))

    def add(self, metric: str, q: float, k: int, rel: float, rank: float) -> None:
        self.checks += 1
        self.worst_rel = max(self.worst_rel, rel)
        self.worst_rank = max(self.worst_rank, rank)
        if rel > REL_TOL and rank > RANK_TOL:
            self.failed += 1
            self.failed_by_metric[metric] = self.failed_by_metric.get(metric, 0) + 1
            self.failed_by_q[q] += 1
            self.failed_by_k[k] += 1


def accuracy(samples: Samples, groups: list[tuple[int, int, Floats]]) -> list[dict[str, Any]]:
    eligible = [(sid, values) for sid, _, values in groups if len(values) >= MIN_SAMPLES]
    exact = [(np.sort(v), np.quantile(v, QS)) for _, v in eligible]
    rows = []
    for setting in SETTINGS:
        tally = Tally()
        sizes: list[int] = []
        for (sid, values), (ordered, truth) in zip(eligible, exact, strict=True):
            metric = samples.series[sid][0]
            lo, hi = float(ordered[0]), float(ordered[-1])
            for k in KS:
                merged = setting.merge([setting.build(p) for p in np.array_split(values, k)])
                sizes.append(setting.centroids(merged))
                estimates = setting.quantiles(merged, QS, lo, hi)
                for q, est, ex in zip(QS, estimates, truth, strict=True):
                    tally.add(metric, q, k, relative_error(est, float(ex)),
                              rank_error(ordered, est, q))
        median = statistics.median(sizes)
        rows.append({
            "setting": setting.label, "median_centroids": median,
            "bytes_per_digest": int(16 * median), "max_centroids_seen": max(sizes),
            "series_buckets": len(eligible), "checks": tally.checks, "failed": tally.failed,
            "worst_relative_error": tally.worst_rel,
            "worst_rank_error_pp": 100 * tally.worst_rank,
            "failed_by_metric": tally.failed_by_metric,
            "failed_by_quantile": {f"p{round(100 * q)}": n for q, n in tally.failed_by_q.items()},
            "failed_by_parts": {f"k={k}": n for k, n in tally.failed_by_k.items()},
        })
    return rows


# --- whole run against k6's summary -------------------------------------------------


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
    raise ValueError(f"cannot filter on tag {key!r}")


def whole_run(samples: Samples, summary_path: Path) -> dict[str, Any]:
    summary = json.loads(summary_path.read_text())["metrics"]
    groups = series_buckets(samples, 1)  # copy 1 only: one generator, as k6 saw it
    rows: list[dict[str, Any]] = []
    per_setting: dict[str, dict[str, float]] = {
        s.label: {"worst_rel_vs_k6": 0.0, "worst_rank_pp": 0.0} for s in SETTINGS}
    for name in sorted(summary):
        k6_p95 = summary[name].get("p(95)")
        if k6_p95 is None:
            continue
        found = _SUBMETRIC.match(name)
        metric, key, want = (found.groups() if found else (name, None, None))
        picked = [(values) for sid, _, values in groups
                  if samples.series[sid][0] == metric
                  and _matches(samples.series[sid][1], key, want)]
        if not picked:
            continue
        everything = np.sort(np.concatenate(picked))
        lo, hi = float(everything[0]), float(everything[-1])
        exact = float(np.quantile(everything, 0.95))
        row: dict[str, Any] = {"metric": name, "samples": len(everything), "k6_p95": k6_p95,
                               "numpy_p95": exact, "estimates": {}}
        for setting in SETTINGS:
            merged = setting.merge([setting.build(v) for v in picked])
            est = float(setting.quantiles(merged, [0.95], lo, hi)[0])
            rel = relative_error(est, float(k6_p95))
            rank = 100 * rank_error(everything, est, 0.95)
            row["estimates"][setting.label] = {"p95": est, "rel_vs_k6": rel, "rank_pp": rank}
            worst = per_setting[setting.label]
            worst["worst_rel_vs_k6"] = max(worst["worst_rel_vs_k6"], rel)
            worst["worst_rank_pp"] = max(worst["worst_rank_pp"], rank)
        rows.append(row)
    return {"rows": rows, "per_setting": per_setting}


# --- import times -------------------------------------------------------------------


def _fresh(code: str, runs: int) -> float:
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.perf_counter() - start)
    return best


def _importtime(module: str) -> float:
    """Cumulative import time of ``module`` as python -X importtime reports it, in ms."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          check=True, capture_output=True, text=True)
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == module:
            return int(parts[1]) / 1000
    return math.nan


def import_times(runs: int = 7) -> list[dict[str, Any]]:
    baseline = _fresh("pass", runs)
    rows = [{"module": "(python -c pass)", "fresh_ms": 1000 * baseline,
             "over_baseline_ms": 0.0, "importtime_ms": math.nan}]
    for module in ("numpy", "pytdigest", "fastdigest", "common.digest"):
        fresh = _fresh(f"import {module}", runs)
        rows.append({"module": module, "fresh_ms": 1000 * fresh,
                     "over_baseline_ms": 1000 * (fresh - baseline),
                     "importtime_ms": _importtime(module)})
    return rows


# --- report -------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "inf" if math.isinf(x) else f"{100 * x:.2f} %"


def print_markdown(result: dict[str, Any]) -> None:
    m, inp = result["machine"], result["input"]
    print(f"Machine: {m['cores']} cores, Python {m['python']}, {m['platform']}")
    print(f"Input: {inp['source']} x {inp['copies']} copies, each shifted by the recording's "
          f"span ({inp['span_s']:.3f} s, rounded up to {inp['shift_s']} s); "
          f"{inp['trend_samples']} trend samples per copy, {inp['series_buckets']} "
          f"series-buckets, {inp['eligible']} with >= {MIN_SAMPLES} samples.")
    print(f"Check: p50/p90/p95/p99 after splitting into k = {', '.join(map(str, KS))} parts "
          f"and merging; passes if relative error <= {100 * REL_TOL:g} % or rank error <= "
          f"{100 * RANK_TOL:g} pp.")
    print()
    print("| setting | median centroids | bytes/digest | checks | failed | worst rel. err | "
          "worst rank err | failed at p50/p90/p95/p99 | failed at k=1/3/10 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["accuracy"]:
        by_q = "/".join(str(n) for n in r["failed_by_quantile"].values())
        by_k = "/".join(str(n) for n in r["failed_by_parts"].values())
        print(f"| {r['setting']} | {r['median_centroids']:g} | {r['bytes_per_digest']} | "
              f"{r['checks']} | {r['failed']} | {_pct(r['worst_relative_error'])} | "
              f"{r['worst_rank_error_pp']:.3f} pp | {by_q} | {by_k} |")
    print()
    print("Failed checks by metric:")
    print()
    print("| setting | failures by metric |")
    print("|---|---|")
    for r in result["accuracy"]:
        fails = ", ".join(f"{k} {v}" for k, v in sorted(r["failed_by_metric"].items())) or "-"
        print(f"| {r['setting']} | {fails} |")
    print()
    print("Import time in a fresh interpreter (best of 7; `-X importtime` cumulative for the "
          "module itself):")
    print()
    print("| module | fresh process ms | over `python -c pass` ms | -X importtime ms |")
    print("|---|---:|---:|---:|")
    for r in result["import_times"]:
        it = "-" if math.isnan(r["importtime_ms"]) else f"{r['importtime_ms']:.1f}"
        print(f"| {r['module']} | {r['fresh_ms']:.1f} | {r['over_baseline_ms']:.1f} | {it} |")
    print()
    project = PROJECT
    print(f"Whole-run p95 of copy 1 (one generator), merged from its per-bucket digests with "
          f"{project}, against k6's summary p(95):")
    print()
    print("| metric | samples | k6 p(95) | numpy exact | merged digest | rel. err vs k6 | "
          "rank err |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in result["whole_run"]["rows"]:
        e = r["estimates"][project]
        print(f"| {r['metric']} | {r['samples']} | {r['k6_p95']:.6g} | {r['numpy_p95']:.6g} | "
              f"{e['p95']:.6g} | {_pct(e['rel_vs_k6'])} | {e['rank_pp']:.3f} pp |")
    print()
    print("Whole-run p95, worst over those metrics, per setting:")
    print()
    print("| setting | worst rel. err vs k6 | worst rank err |")
    print("|---|---:|---:|")
    for label, w in result["whole_run"]["per_setting"].items():
        print(f"| {label} | {_pct(w['worst_rel_vs_k6'])} | {w['worst_rank_pp']:.3f} pp |")


def _finite(obj: Any) -> Any:
    """JSON has no infinity: write it as the string 'inf'."""
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8,
                        help="how many time-shifted copies of the recording (default 8)")
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT,
                        help=f"k6 --out json recording, .gz accepted (default {DEFAULT_INPUT})")
    parser.add_argument("--summary", type=Path, default=DEFAULT_SUMMARY,
                        help=f"k6 --summary-export of that run (default {DEFAULT_SUMMARY})")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    if args.copies < 1:
        parser.error("--copies must be >= 1")
    samples = load_samples(args.input)
    groups = series_buckets(samples, args.copies)
    result = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "input": {"source": str(args.input), "copies": args.copies,
                  "span_s": samples.span_seconds, "shift_s": samples.shift_seconds,
                  "trend_samples": len(samples.value), "series_buckets": len(groups),
                  "eligible": sum(1 for g in groups if len(g[2]) >= MIN_SAMPLES)},
        "criteria": {"quantiles": QS, "parts": KS, "relative": REL_TOL, "rank": RANK_TOL,
                     "min_samples": MIN_SAMPLES},
        "accuracy": accuracy(samples, groups),
        "import_times": import_times(),
        "whole_run": whole_run(samples, args.summary),
    }
    if args.json:
        print(json.dumps(_finite(result), indent=2))
    else:
        print_markdown(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
