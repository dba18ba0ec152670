#!/usr/bin/env python3
"""The trend digest, before and after: t-digest (fastdigest, 300 centroids, as stored
until the sketch) against the log-bucket sketch (common.digest), on the same series.

    python scripts/sketch_comparison.py                          # synthetic shapes only
    python scripts/sketch_comparison.py --input run.json[.gz] ...  # and k6 recordings

Series: every (metric, name/method/status/scenario/group tags, 10 s bucket) of a Trend
in the recordings with at least --min-samples samples, and the synthetic shapes of
tests/test_digest.py (timer clusters with a gap at the median, multimodal, point masses,
negative, 1e-6..1e9, constant), 6,000 samples each. Each series is split round-robin
and by time into 3 and 10 parts; each part is compressed as the forwarder compresses it
(exact zeros apart), the parts are merged as td-server merges them, and p50, p90, p95 and
p99 are held against numpy's exact (linear) quantiles: a check passes within 1 %
relative or 0.2 percentage points of rank. Also: bytes per merged bucket (median, as
stored) and the time to compress and to merge. Prints Markdown.

Needs the test extra (fastdigest, for the t-digest side).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import fastdigest
import numpy as np
import numpy.typing as npt
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import digest  # noqa: E402
from tests.test_digest import HARD_SHAPES  # noqa: E402

Floats = npt.NDArray[np.float64]
QS = (0.5, 0.9, 0.95, 0.99)
TAG_KEYS = ("name", "method", "status", "scenario", "group")


def recorded_series(path: Path, min_samples: int) -> Iterator[tuple[str, Floats]]:
    opener = gzip.open if path.suffix == ".gz" else open
    trends: set[str] = set()
    series: dict[tuple[str, tuple[str | None, ...], int], list[float]] = defaultdict(list)
    with opener(path, "rb") as stream:
        for line in stream:
            try:
                sample = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if sample.get("type") == "Metric" and sample["data"].get("type") == "trend":
                trends.add(sample["metric"])
            elif sample.get("type") == "Point" and sample.get("metric") in trends:
                data = sample["data"]
                tags = data.get("tags") or {}
                second = int(data["time"][17:19]) + 60 * int(data["time"][14:16])
                key = (sample["metric"], tuple(tags.get(k) for k in TAG_KEYS), second // 10)
                series[key].append(float(data["value"]))
    for (metric, _, bucket), values in sorted(series.items(), key=lambda kv: str(kv[0])):
        if len(values) >= min_samples:
            yield f"{path.name}:{metric}:{bucket}", np.array(values)


def synthetic_series() -> Iterator[tuple[str, Floats]]:
    for name, make in HARD_SHAPES.items():
        for seed in range(3):
            yield f"synthetic:{name}:{seed}", make(np.random.default_rng([seed, 77]), 6000)


class Candidate:
    def __init__(self, name: str, build: Callable[[Floats], digest.Centroids],
                 merge: Callable[[list[digest.Centroids]], digest.Centroids],
                 read: Callable[..., list[float]], size: Callable[[digest.Centroids], int]
                 ) -> None:
        self.name, self.build, self.merge, self.read, self.size = name, build, merge, read, size
        self.failed = 0
        self.checks = 0
        self.worst_relative = 0.0  # over checks that the rank criterion alone fails
        self.sizes: list[int] = []
        self.build_seconds = 0.0
        self.merge_seconds = 0.0
        self.failures: list[str] = []


def tdigest_build(values: Floats) -> digest.Centroids:
    if not len(values):
        return digest.EMPTY
    built = fastdigest.TDigest.from_values(values, max_centroids=300)
    return np.asarray(built.centroids, dtype=np.float64).reshape(-1, 2)


def tdigest_merge(parts: list[digest.Centroids]) -> digest.Centroids:
    parts = [p for p in parts if len(p)]
    stacked = np.concatenate(parts)
    built = fastdigest.TDigest.from_values(stacked[:, 0], stacked[:, 1], max_centroids=300)
    return np.asarray(built.centroids, dtype=np.float64).reshape(-1, 2)


CANDIDATES = (
    lambda: Candidate("t-digest (fastdigest, 300 centroids): before", tdigest_build,
                      tdigest_merge, digest._legacy_quantiles, lambda c: 16 * len(c)),
    lambda: Candidate("log-bucket sketch, ALPHA 1 % (common.digest): now", digest.from_values,
                      digest.merge, digest.quantiles, lambda c: len(digest.encode(c))),
)


def rank_error(ordered: Floats, q: float, estimate: float) -> float:
    n = len(ordered)
    below = np.searchsorted(ordered, estimate, side="left") / n
    at = np.searchsorted(ordered, estimate, side="right") / n
    return float(max(below - q, q - at, 0.0))


def judge(candidate: Candidate, label: str, values: Floats) -> None:
    ordered = np.sort(values)
    exact = np.quantile(ordered, QS)
    lo, hi = float(ordered[0]), float(ordered[-1])
    for k in (3, 10):
        for how in ("round-robin", "time"):
            parts = ([values[i::k] for i in range(k)] if how == "round-robin"
                     else np.array_split(values, k))
            began = time.perf_counter()
            built = [(candidate.build(p[p != 0.0]), int(np.sum(p == 0.0))) for p in parts]
            candidate.build_seconds += time.perf_counter() - began
            began = time.perf_counter()
            merged = candidate.merge([b for b, _ in built if len(b)]) if any(
                len(b) for b, _ in built) else digest.EMPTY
            candidate.merge_seconds += time.perf_counter() - began
            zeros = sum(z for _, z in built)
            candidate.sizes.append(candidate.size(merged))
            estimates = candidate.read(merged, QS, lo, hi, zeros)
            for q, want, got in zip(QS, exact, estimates, strict=True):
                candidate.checks += 1
                error = rank_error(ordered, q, got)
                relative = abs(got - want) / abs(want) if want else abs(got - want)
                if error > 0.002:
                    candidate.worst_relative = max(candidate.worst_relative, relative)
                if relative <= 0.01 or error <= 0.002:
                    continue
                candidate.failed += 1
                if len(candidate.failures) < 12:
                    candidate.failures.append(
                        f"{label} k={k} {how} p{round(q * 100)}: {got:.6g} vs exact "
                        f"{want:.6g} (rank off {100 * error:.2f} pp)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, action="append", default=[],
                        help="a k6 --out json recording (.gz accepted); repeatable")
    parser.add_argument("--min-samples", type=int, default=1000)
    args = parser.parse_args()
    series = list(synthetic_series())
    for path in args.input:
        series += list(recorded_series(path, args.min_samples))
    candidates = [make() for make in CANDIDATES]
    for label, values in series:
        for candidate in candidates:
            judge(candidate, label, values)
    print(f"{len(series)} series ({sum(1 for s in series if s[0].startswith('synthetic'))} "
          f"synthetic), each split 3 and 10 ways, round-robin and by time\n")
    print("| digest | checks | failed | worst relative error where rank is off by more "
          "than 0.2 pp | bytes per merged bucket, median | compress, s | merge, s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in candidates:
        print(f"| {c.name} | {c.checks} | **{c.failed}** | {100 * c.worst_relative:.2f} % | "
              f"{statistics.median(c.sizes):,.0f} | {c.build_seconds:.2f} | "
              f"{c.merge_seconds:.2f} |")
    for c in candidates:
        if c.failures:
            print(f"\nFirst failures of {c.name}:\n")
            print("\n".join(f"- {f}" for f in c.failures))


if __name__ == "__main__":
    main()
