#!/usr/bin/env python3
"""How often td-report's percentile verdicts are right near the exact value.

For a corpus of distributions (synthetic shapes, and the trends of a real k6 recording
when it is at hand), each run is stored as the pipeline stores it: the samples, in
arrival order, fall into ``--buckets`` buckets; each bucket's samples are shared among
k generators (k = 1, 3, 10); each generator's partial is ``common.digest.split_zeros``;
each bucket's partials are merged into one row as td-server merges them. Thresholds are
set at the exact (numpy, as k6) p50 / p90 / p95 / p99 times 1 ± 0.001, 1 ± 0.003,
1 ± 0.01 and (for comparison) 1 ± 0.03, with ``<`` and ``>``, and judged by td-report's
own evaluation path (``TrendAccumulator.watch`` / ``add``, ``summary.judge``,
``query.ThresholdResult``), with and without ``--strict-thresholds``. Counted per
tolerance and generator count: right, wrong, too close to call, and wrong verdicts that
were not flagged (must be 0).

With ``--bands``: the soundness sweep behind td_report.band, on many more layouts
(disjoint ranges, parts scaled apart, late and cascaded merges, unlike generators):
how many bounds were tried, how many bands missed the exact rank (must be 0), and how
wide the bands are at the exact p50..p99.

    python scripts/verdict_accuracy.py [--seed 1] [--samples 20000] [--bands]
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson

from common import digest
from td_report import band
from td_report.query import ThresholdResult
from td_report.summary import Selected, TrendAccumulator, judge
from td_report.thresholds import parse_threshold
from td_server.aggregator import TrendState

Floats = npt.NDArray[np.float64]
Row = tuple[digest.Centroids, int, float, float, int]  # centroids, zeros, min, max, count

QUANTILES = (50, 90, 95, 99)
TOLERANCES = (0.001, 0.003, 0.01, 0.03)
GENERATORS = (1, 3, 10)
REAL_METRICS = ("http_req_duration", "http_req_waiting", "http_req_blocked",
                "http_req_receiving", "http_req_sending", "iteration_duration",
                "group_duration", "cart_value")

SHAPES: dict[str, Callable[[np.random.Generator, int], Floats]] = {
    "lognormal": lambda rng, n: rng.lognormal(3, 1, n),
    "uniform": lambda rng, n: rng.uniform(0, 1, n),
    "bimodal with a gap": lambda rng, n: np.concatenate(
        [rng.normal(10, 1, n // 2), rng.normal(100, 1, n - n // 2)]),
    "point masses": lambda rng, n: rng.choice([1.0, 2.5, 7.0, 100.0], n,
                                              p=[0.5, 0.3, 0.15, 0.05]),
    "negative": lambda rng, n: rng.normal(-50, 30, n),
    "1e-6..1e9 (huge_range)": lambda rng, n: 10 ** rng.uniform(-6, 9, n),
    "constant": lambda rng, n: np.full(n, 42.0),
    "90 % zeros": lambda rng, n: np.where(rng.random(n) < 0.9, 0.0, rng.exponential(1, n)),
    "integers 0..19": lambda rng, n: rng.integers(0, 20, n).astype(np.float64),
    "decimals": lambda rng, n: np.round(rng.lognormal(1, 0.5, n), 1),
    "pareto": lambda rng, n: rng.pareto(1.2, n) + 1,
}


# --- storing a run as the pipeline stores it ------------------------------------------

def partial(values: Floats) -> Row:
    centroids, zeros = digest.split_zeros(values)
    return centroids, zeros, float(values.min()), float(values.max()), len(values)


def merged_row(rows: list[Row], late: bool = False) -> Row:
    """Several generators' partials merged into one stored row by td-server's TrendState;
    ``late``: the last partial merged into the stored digest afterwards."""
    held = TrendState(0, 0.0, 0.0, 0.0, [], 0)  # td-server's own deferred merging
    for centroids, *_ in rows[:-1] if late else rows:
        held.merge_digest(centroids)
    merged = digest.merge(held.parts)
    if late:
        merged = digest.merge([merged, rows[-1][0]])
    return (merged, sum(r[1] for r in rows), min(r[2] for r in rows),
            max(r[3] for r in rows), sum(r[4] for r in rows))


def stored_rows(values: Floats, generators: int, buckets: int,
                rng: np.random.Generator) -> list[Row]:
    """One row per bucket (consecutive samples), each the merge of its generators'
    partials (samples shared at random among them)."""
    rows = []
    for bucket in np.array_split(values, buckets):
        owner = rng.integers(0, generators, len(bucket))
        parts = [bucket[owner == g] for g in range(generators)]
        partials = [partial(p) for p in parts if len(p)]
        rows.append(partials[0] if len(partials) == 1 else merged_row(partials))
    return rows


# --- verdicts ---------------------------------------------------------------------------

@dataclass
class Tally:
    thresholds: int = 0
    close: int = 0  # too close to call
    decided_right: int = 0
    decided_wrong: int = 0  # must be 0
    default_right: int = 0  # k6's verdict on the estimate, as td-report gives it
    default_wrong: int = 0
    default_wrong_unflagged: int = 0  # must be 0
    strict_right: int = 0
    strict_wrong: int = 0
    strict_wrong_unflagged: int = 0  # must be 0


def judge_run(values: Floats, rows: list[Row], tallies: dict[tuple[float, int], Tally],
              generators: int) -> None:
    """Judge every threshold near the exact percentiles of ``values`` on ``rows``."""
    cases = []
    for pct in QUANTILES:
        exact = float(np.quantile(values, pct / 100))
        for tolerance in TOLERANCES:
            for sign in (-1, 1):
                bound = exact * (1 + sign * tolerance)
                for op in ("<", ">"):
                    truth = exact < bound if op == "<" else exact > bound
                    cases.append((tolerance, f"m: p({pct}){op}{bound!r}", truth))
    thresholds = [parse_threshold(text) for _, text, _ in cases]
    acc = TrendAccumulator()
    for threshold in thresholds:
        acc.watch(threshold.expression.bound)
    for centroids, zeros, lo, hi, count in rows:
        acc.add(count, 0.0, lo, hi, zeros, centroids)
    selected = Selected("m", "trend", trend=acc)
    for (tolerance, _, truth), threshold in zip(cases, thresholds, strict=True):
        verdict = judge(threshold.expression, selected, 1.0)
        tally = tallies[(tolerance, generators)]
        tally.thresholds += 1
        tally.close += not verdict.decided
        if verdict.decided:
            tally.decided_right += verdict.holds is truth
            tally.decided_wrong += verdict.holds is not truth
        for strict in (False, True):
            result = ThresholdResult(threshold, "trend", verdict.value, acc.count,
                                     verdict.decided, verdict.counts, strict)
            right = result.ok is truth
            flagged = result.too_close
            if strict:
                tally.strict_right += right
                tally.strict_wrong += not right
                tally.strict_wrong_unflagged += not right and not flagged
            else:
                tally.default_right += right
                tally.default_wrong += not right
                tally.default_wrong_unflagged += not right and not flagged


def real_runs(path: Path | None) -> dict[str, Floats]:
    """The recording's trend samples per metric, in arrival order (none without one)."""
    if path is None:
        return {}
    wanted: dict[str, list[float]] = {m: [] for m in REAL_METRICS}
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for line in f:
            obj = orjson.loads(line)
            if obj.get("type") == "Point" and obj["metric"] in wanted:
                wanted[obj["metric"]].append(float(obj["data"]["value"]))
    return {f"k6 {m}": np.array(v) for m, v in wanted.items() if len(v) >= 1000}


def verdicts(seed: int, samples: int, buckets: int, recording: Path | None) -> None:
    rng = np.random.default_rng(seed)
    runs = {name: shape(rng, samples) for name, shape in SHAPES.items()}
    real = real_runs(recording)
    runs.update(real)
    tallies: dict[tuple[float, int], Tally] = defaultdict(Tally)
    per_run: dict[str, Counter[str]] = defaultdict(Counter)
    began = time.perf_counter()
    for name, values in runs.items():
        for generators in GENERATORS:
            rows = stored_rows(values, generators, buckets, rng)
            before = {key: Tally(**vars(t)) for key, t in tallies.items()}
            judge_run(values, rows, tallies, generators)
            for key, tally in tallies.items():
                old = before.get(key, Tally())
                per_run[name]["close"] += tally.close - old.close
                per_run[name]["thresholds"] += tally.thresholds - old.thresholds
                per_run[name]["wrong"] += tally.default_wrong - old.default_wrong
    seconds = time.perf_counter() - began
    print(f"{len(runs)} runs ({len(SHAPES)} synthetic shapes of {samples} samples"
          + (f", {len(real)} trends of {recording.name}" if real and recording else "")
          + f"), {buckets} buckets each, k generators per bucket; {seconds:.0f} s\n")
    print("| within | generators | thresholds | too close to call | decided: right | "
          "decided: wrong | default: right | default: wrong | of them not flagged | "
          "strict: right | strict: wrong | of them not flagged |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals = Tally()
    for tolerance in TOLERANCES:
        for generators in GENERATORS:
            t = tallies[(tolerance, generators)]
            for name, value in vars(t).items():
                setattr(totals, name, getattr(totals, name) + value)
            print(f"| ±{tolerance * 100:g} % | {generators} | {t.thresholds} | {t.close} | "
                  f"{t.decided_right} | {t.decided_wrong} | {t.default_right} | "
                  f"{t.default_wrong} | **{t.default_wrong_unflagged}** | {t.strict_right} | "
                  f"{t.strict_wrong} | **{t.strict_wrong_unflagged}** |")
    t = totals
    print(f"| all | all | {t.thresholds} | {t.close} | {t.decided_right} | "
          f"{t.decided_wrong} | {t.default_right} | {t.default_wrong} | "
          f"**{t.default_wrong_unflagged}** | {t.strict_right} | {t.strict_wrong} | "
          f"**{t.strict_wrong_unflagged}** |")
    print("\nToo close to call and wrong (default mode) per run, over all tolerances and "
          "generator counts:\n")
    print("| run | thresholds | too close to call | wrong (all flagged) |")
    print("|---|---:|---:|---:|")
    for name, counts in per_run.items():
        print(f"| {name} | {counts['thresholds']} | {counts['close']} | {counts['wrong']} |")


# --- soundness sweep ----------------------------------------------------------------------

def _split(values: Floats, k: int, how: str, rng: np.random.Generator) -> list[Floats]:
    if how == "random":
        order = rng.permutation(len(values))
        parts = [values[order[i::k]] for i in range(k)]
    elif how == "ranges":
        parts = np.array_split(np.sort(values), k)
    elif how == "scaled":
        parts = [p * (1 + 2 * i) for i, p in enumerate(np.array_split(values, k))]
    else:
        parts = np.array_split(values, k)
    return [p for p in parts if len(p)]


UNLIKE: dict[str, Callable[[np.random.Generator, int], list[Floats]]] = {
    "gap filled": lambda rng, n: [np.concatenate([rng.uniform(0, 1, n), rng.uniform(9, 10, n)]),
                                  rng.uniform(4, 6, n)],
    "masses and lognormal": lambda rng, n: [rng.choice([1.0, 5.0, 20.0], n),
                                            rng.lognormal(2, 1, n)],
    "tail in body": lambda rng, n: [rng.lognormal(1, 1, 2 * n), rng.normal(50, 1, n)],
    "regions": lambda rng, n: [rng.lognormal(np.log(m), s, n)
                               for m, s in ((20, 0.3), (150, 0.2), (60, 0.5))],
    "drift": lambda rng, n: [rng.lognormal(np.log(10 + 10 * i), 0.4, n // 3)
                             for i in range(10)],
}


def _layouts(parts: list[Floats]) -> Iterator[tuple[str, list[Row]]]:
    rows = [partial(p) for p in parts]
    if len(rows) == 1:
        yield "one digest", rows
        return
    yield "stacked rows", rows
    yield "merged row", [merged_row(rows)]
    yield "merged row, late partial", [merged_row(rows, late=True)]
    half = len(rows) // 2
    yield "stacked merged rows", [merged_row(rows[:half]), merged_row(rows[half:])]


def _bounds(values: Floats, rows: list[Row], rng: np.random.Generator) -> Floats:
    distinct = np.unique(values)
    picks = [np.quantile(values, [0.5, 0.9, 0.95, 0.99]),
             np.quantile(values, np.linspace(0, 1, 201)),
             [0.0, values.min() - 1.0, values.max() + 1.0],
             distinct if len(distinct) <= 300 else rng.choice(distinct, 300)]
    if len(distinct) > 1:
        middles = (distinct[:-1] + distinct[1:]) / 2
        picks.append(middles if len(middles) <= 150 else rng.choice(middles, 150))
    means = np.concatenate([r[0][:, 0] for r in rows])
    if len(means):
        means = means if len(means) <= 150 else rng.choice(means, 150)
        picks += [means, np.nextafter(means, np.inf), np.nextafter(means, -np.inf)]
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in picks])


def bands(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tried = 0
    missed: Counter[str] = Counter()
    widths: dict[tuple[str, str], list[Floats]] = defaultdict(list)
    cases: list[tuple[str, list[Floats]]] = []
    for n in (200, 3000, 30000):
        for name, shape in SHAPES.items():
            values = shape(rng, n)
            cases.append((name, [values]))
            for k in (3, 10, 25):
                for how in ("arrival", "random", "ranges", "scaled"):
                    cases.append((name, _split(values, k, how, rng)))
        for name, unlike in UNLIKE.items():
            cases.append((f"unlike: {name}", unlike(rng, n)))
    began = time.perf_counter()
    for name, parts in cases:
        values = np.sort(np.concatenate(parts))
        for layout, rows in _layouts(parts):
            bounds = _bounds(values, rows, rng)
            total = np.zeros((4, len(bounds)))
            for centroids, zeros, lo, hi, count in rows:
                total += np.array(band.part_count_arrays(centroids, bounds, lo, hi, zeros,
                                                         count))
            below = np.searchsorted(values, bounds, "left")
            at_or_below = np.searchsorted(values, bounds, "right")
            inside = ((total[0] <= below) & (below <= total[1])
                      & (total[2] <= at_or_below) & (at_or_below <= total[3]))
            tried += len(bounds)
            missed[f"{name}, {layout}"] += int((~inside).sum())
            if len(values) >= 3000:
                kind = "continuous" if name in CONTINUOUS else "discrete or unlike"
                widths[(kind, layout)].append((total[1, :4] - total[0, :4]) / len(values))
    seconds = time.perf_counter() - began
    misses = sum(missed.values())
    print(f"{len(cases)} cases, {tried} bounds tried, {misses} bands missed the exact "
          f"rank; {seconds:.0f} s")
    for what, count in missed.most_common():
        if count:
            print(f"  missed: {what}: {count}")
    print("\nBand width (samples possibly but not certainly below the bound) at the exact "
          "p50 / p90 / p95 / p99, in percentage points, runs of 3000 and 30000 samples:\n")
    print("| shapes | layout | median | p50 | p90 | p95 | p99 | largest |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (kind, layout), found in sorted(widths.items()):
        w = np.array(found) * 100
        per_q = np.median(w, axis=0)
        print(f"| {kind} | {layout} | {np.median(w):.3f} | "
              + " | ".join(f"{x:.3f}" for x in per_q) + f" | {w.max():.3f} |")


CONTINUOUS = ("lognormal", "uniform", "bimodal with a gap", "negative",
              "1e-6..1e9 (huge_range)", "pareto")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--samples", type=int, default=20000,
                        help="samples per synthetic run (default 20000)")
    parser.add_argument("--buckets", type=int, default=6,
                        help="buckets (stored rows) per run (default 6)")
    parser.add_argument("--recording", type=Path, default=None,
                        help="also the trends of a k6 --out json recording (plain or .gz; "
                             "k6 run --out json=FILE makes one)")
    parser.add_argument("--bands", action="store_true",
                        help="run the soundness sweep of the bands instead")
    args = parser.parse_args(argv)
    if args.bands:
        bands(args.seed)
    else:
        verdicts(args.seed, args.samples, args.buckets, args.recording)
    return 0


if __name__ == "__main__":
    sys.exit(main())
