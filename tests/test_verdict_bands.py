"""The rank interval of a threshold's bound (td_report.band) against numpy.

The exact figures always come from numpy on the raw samples: ``searchsorted`` for the
number of samples below and at or below a bound, ``np.quantile`` (linear, as k6) for a
percentile. The digests are built with ``common.digest`` as the pipeline builds them:
one digest per part (``from_values``, or ``split_zeros``), parts merged as td-server
merges several generators' partials into one stored row (and again with a late partial),
and rows read one by one as td-report reads them (stacked).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import fastdigest
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import digest
from td_report import band
from td_report.summary import Selected, TrendAccumulator, judge
from td_report.thresholds import parse_expression
from td_server.aggregator import TrendState

Floats = npt.NDArray[np.float64]
Row = tuple[digest.Centroids, int, float, float, int]  # centroids, zeros, min, max, count


# --- corpus ---------------------------------------------------------------------------

def _lognormal(rng: np.random.Generator, n: int) -> Floats:
    return rng.lognormal(3, 1, n)


def _uniform(rng: np.random.Generator, n: int) -> Floats:
    return rng.uniform(0, 1, n)


def _bimodal_gap(rng: np.random.Generator, n: int) -> Floats:
    return np.concatenate([rng.normal(10, 1, n // 2), rng.normal(100, 1, n - n // 2)])


def _point_masses(rng: np.random.Generator, n: int) -> Floats:
    return rng.choice([1.0, 2.5, 7.0, 100.0], n, p=[0.5, 0.3, 0.15, 0.05])


def _negative(rng: np.random.Generator, n: int) -> Floats:
    return rng.normal(-50, 30, n)


def _huge_range(rng: np.random.Generator, n: int) -> Floats:
    return 10 ** rng.uniform(-6, 9, n)


def _constant(rng: np.random.Generator, n: int) -> Floats:
    return np.full(n, 42.0)


def _mostly_zeros(rng: np.random.Generator, n: int) -> Floats:
    return np.where(rng.random(n) < 0.9, 0.0, rng.exponential(1, n))


def _integers(rng: np.random.Generator, n: int) -> Floats:
    return rng.integers(0, 20, n).astype(np.float64)


def _many_integers(rng: np.random.Generator, n: int) -> Floats:
    return np.round(rng.lognormal(5, 1, n))


def _decimals(rng: np.random.Generator, n: int) -> Floats:
    return np.round(rng.lognormal(1, 0.5, n), 1)


def _pareto(rng: np.random.Generator, n: int) -> Floats:
    return rng.pareto(1.2, n) + 1


DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, int], Floats]] = {
    "lognormal": _lognormal, "uniform": _uniform, "bimodal_gap": _bimodal_gap,
    "point_masses": _point_masses, "negative": _negative, "huge_range": _huge_range,
    "constant": _constant, "mostly_zeros": _mostly_zeros, "integers": _integers,
    "many_integers": _many_integers, "decimals": _decimals, "pareto": _pareto,
}
CONTINUOUS = ("lognormal", "uniform", "bimodal_gap", "negative", "huge_range", "pareto")


def split(values: Floats, k: int, how: str, rng: np.random.Generator) -> list[Floats]:
    """k parts: in arrival order, at random, as disjoint ranges, or scaled apart (unlike
    generators)."""
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


def row_of(values: Floats, zeros_apart: bool) -> Row:
    if zeros_apart:
        centroids, zeros = digest.split_zeros(values)
    else:
        centroids, zeros = digest.from_values(values), 0
    return centroids, zeros, float(values.min()), float(values.max()), len(values)


def merged_row(rows: list[Row], late: bool = False) -> Row:
    """One stored row from several generators' partials, merged by td-server's
    TrendState; ``late``: the last partial merged into the stored digest afterwards."""
    held = TrendState(0, 0.0, 0.0, 0.0, [], 0)  # td-server's own deferred merging
    for centroids, *_ in rows[:-1] if late else rows:
        held.merge_digest(centroids)
    merged = digest.merge(held.parts)
    if late:
        merged = digest.merge([merged, rows[-1][0]])
    return (merged, sum(r[1] for r in rows), min(r[2] for r in rows),
            max(r[3] for r in rows), sum(r[4] for r in rows))


def layouts(parts: list[Floats], zeros_apart: bool) -> Iterator[tuple[str, list[Row]]]:
    """The rows td-report would read for these parts, as the pipeline may store them."""
    rows = [row_of(p, zeros_apart) for p in parts]
    yield "rows", rows  # e.g. buckets over time: stacked, one band per row
    if len(rows) > 1:
        yield "merged", [merged_row(rows)]  # generators of one bucket
        yield "late", [merged_row(rows, late=True)]
        half = len(rows) // 2
        yield "merged rows", [merged_row(rows[:half]), merged_row(rows[half:])]


def candidates(values: Floats, rows: list[Row], rng: np.random.Generator) -> Floats:
    """Bounds to try: exact quantiles, sample values, midpoints, centroid means and the
    floats next to them, the ends and 0."""
    distinct = np.unique(values)
    picks = [np.quantile(values, np.linspace(0, 1, 101)), [0.0, values.min() - 1.0,
                                                           values.max() + 1.0]]
    picks.append(distinct if len(distinct) <= 150 else rng.choice(distinct, 150))
    if len(distinct) > 1:
        middles = (distinct[:-1] + distinct[1:]) / 2
        picks.append(middles if len(middles) <= 100 else rng.choice(middles, 100))
    means = np.concatenate([r[0][:, 0] for r in rows])
    if len(means):
        means = means if len(means) <= 100 else rng.choice(means, 100)
        picks += [means, np.nextafter(means, np.inf), np.nextafter(means, -np.inf)]
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in picks])


def misses(values: Floats, rows: list[Row], bounds: Floats) -> list[str]:
    """Every bound whose exact counts fall outside the band, described."""
    total = np.zeros((4, len(bounds)))
    for centroids, zeros, lo, hi, count in rows:
        total += np.array(band.part_count_arrays(centroids, bounds, lo, hi, zeros, count))
    ordered = np.sort(values)
    below = np.searchsorted(ordered, bounds, "left")
    at_or_below = np.searchsorted(ordered, bounds, "right")
    inside = ((total[0] <= below) & (below <= total[1])
              & (total[2] <= at_or_below) & (at_or_below <= total[3]))
    return [f"B={bounds[i]!r}: below {below[i]} not in {total[0, i]:g}..{total[1, i]:g} or "
            f"at or below {at_or_below[i]} not in {total[2, i]:g}..{total[3, i]:g}"
            for i in np.flatnonzero(~inside)]


# --- soundness ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_band_holds_the_exact_rank(name: str) -> None:
    """For every bound tried, the exact number of samples below it and at or below it
    lie in the band: single digests, split zeros, merges of 3 and 10 parts in arrival
    order, at random, as disjoint ranges or scaled apart, late merges, stacked rows."""
    rng = np.random.default_rng(sorted(DISTRIBUTIONS).index(name))
    failures: list[str] = []
    tried = 0
    for n in (300, 3000, 20000):
        values = DISTRIBUTIONS[name](rng, n)
        for zeros_apart in (False, True):
            cases = [("one digest", [row_of(values, zeros_apart)], values)]
            for k in (3, 10):
                for how in ("arrival", "random", "ranges", "scaled"):
                    parts = split(values, k, how, rng)
                    everything = np.concatenate(parts)
                    for layout, rows in layouts(parts, zeros_apart):
                        cases.append((f"{k} parts {how}, {layout}", rows, everything))
            for label, rows, everything in cases:
                bounds = candidates(everything, rows, rng)
                tried += len(bounds)
                failures += [f"n={n} zeros apart={zeros_apart} {label}: {m}"
                             for m in misses(everything, rows, bounds)]
    assert tried > 10_000
    assert not failures, f"{len(failures)} of {tried}: " + "; ".join(failures[:5])


UNLIKE: dict[str, Callable[[np.random.Generator, int], list[Floats]]] = {
    # A dense part inside another's gap, point masses beside a continuous part, one part
    # inside another's tail, generators in three regions, a drifting latency, a tiny part.
    "gap filled": lambda rng, n: [np.concatenate([rng.uniform(0, 1, n), rng.uniform(9, 10, n)]),
                                  rng.uniform(4, 6, n)],
    "masses and lognormal": lambda rng, n: [rng.choice([1.0, 5.0, 20.0], n),
                                            rng.lognormal(2, 1, n)],
    "tail in body": lambda rng, n: [rng.lognormal(1, 1, 2 * n), rng.normal(50, 1, n)],
    "regions": lambda rng, n: [rng.lognormal(np.log(m), s, n)
                               for m, s in ((20, 0.3), (150, 0.2), (60, 0.5))],
    "drift": lambda rng, n: [rng.lognormal(np.log(10 + 10 * i), 0.4, n // 3)
                             for i in range(10)],
    "sizes": lambda rng, n: [rng.lognormal(2, 1, 50), rng.lognormal(2, 1, 3 * n),
                             rng.lognormal(2.5, 1, 7)],
}


@pytest.mark.parametrize("name", sorted(UNLIKE))
def test_band_holds_for_unlike_generators(name: str) -> None:
    """Parts from different distributions, merged into one row as td-server merges the
    partials of generators that see different latencies."""
    rng = np.random.default_rng(100 + sorted(UNLIKE).index(name))
    failures: list[str] = []
    for n in (200, 3000, 12000):
        parts = UNLIKE[name](rng, n)
        values = np.concatenate(parts)
        for zeros_apart in (False, True):
            for layout, rows in layouts(parts, zeros_apart):
                bounds = candidates(values, rows, rng)
                failures += [f"n={n} {layout}: {m}" for m in misses(values, rows, bounds)]
    assert not failures, f"{len(failures)}: " + "; ".join(failures[:5])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(DISTRIBUTIONS)), seed=st.integers(0, 2**32 - 1),
       n=st.integers(1, 6000), k=st.integers(1, 12),
       how=st.sampled_from(["arrival", "random", "ranges", "scaled"]),
       zeros_apart=st.booleans(), layout=st.sampled_from(["rows", "merged", "late",
                                                          "merged rows"]))
def test_band_holds_for_any_drawn_case(name: str, seed: int, n: int, k: int, how: str,
                                       zeros_apart: bool, layout: str) -> None:
    rng = np.random.default_rng(seed)
    parts = split(DISTRIBUTIONS[name](rng, n), min(k, n), how, rng)
    values = np.concatenate(parts)
    found = dict(layouts(parts, zeros_apart))
    rows = found.get(layout, found["rows"])
    assert not misses(values, rows, candidates(values, rows, rng))


# --- width ----------------------------------------------------------------------------

def _width_at_quantiles(rows: list[Row], values: Floats) -> Floats:
    """Width of the band (samples possibly but not certainly below) at the exact p50,
    p90, p95 and p99, as a share of the samples."""
    bounds = np.quantile(values, [0.5, 0.9, 0.95, 0.99])
    total = np.zeros((4, len(bounds)))
    for centroids, zeros, lo, hi, count in rows:
        total += np.array(band.part_count_arrays(centroids, bounds, lo, hi, zeros, count))
    width: Floats = (total[1] - total[0]) / len(values)
    return width


def test_bands_are_narrow_enough_to_decide() -> None:
    """Median band width at p50..p99 of continuous shapes: the share of the samples in
    the bound's bucket, about 1 % of them; a merged digest's band is the same (merging
    sketches loses nothing)."""
    rng = np.random.default_rng(7)
    one, merged = [], []
    for name in CONTINUOUS:
        for n in (5000, 50000):
            values = DISTRIBUTIONS[name](rng, n)
            one.extend(_width_at_quantiles([row_of(values, False)], values))
            parts = split(values, 3, "arrival", rng)
            merged.extend(_width_at_quantiles(
                [merged_row([row_of(p, False) for p in parts])], values))
    assert 0 < float(np.median(one)) < 0.012
    assert one == merged


# --- rows of the t-digest era ----------------------------------------------------------


def legacy_digest(values: Floats, weights: Floats | None = None) -> digest.Centroids:
    """A t-digest as rows stored before sketches hold it (fastdigest, 300 centroids)."""
    built = fastdigest.TDigest.from_values(values, weights,
                                           max_centroids=band.LEGACY_CENTROIDS)
    return np.asarray(built.centroids, dtype=np.float64).reshape(-1, 2)


@pytest.mark.parametrize("n", [1, 2, 17, 299, 300, 301, 1000, 4321, 65_536, 1_000_003])
def test_one_pass_weights_are_fastdigests(n: int) -> None:
    values = np.random.default_rng(n).lognormal(0, 1, n)
    weights = legacy_digest(values)[:, 1]
    assert list(band.one_pass_weights(n)) == list(weights)
    assert band.is_one_pass(weights)


def test_merged_digests_use_the_merged_rule() -> None:
    rng = np.random.default_rng(3)
    values = rng.lognormal(0, 1, 20000)
    parts = [legacy_digest(p) for p in np.array_split(values, 4)]
    stacked = np.concatenate(parts)
    assert not band.is_one_pass(legacy_digest(stacked[:, 0], stacked[:, 1])[:, 1])
    # Parts of single samples merge into exactly a one-pass digest of the samples.
    small = [legacy_digest(p) for p in np.array_split(values[:400], 4)]
    assert all((p[:, 1] == 1).all() for p in small)
    stacked = np.concatenate(small)
    assert band.is_one_pass(legacy_digest(stacked[:, 0], stacked[:, 1])[:, 1])


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_band_of_legacy_rows_holds_the_exact_rank(name: str) -> None:
    """Rows stored as t-digests keep their own rules (td_report.band's envelopes)."""
    rng = np.random.default_rng(17)
    values = DISTRIBUTIONS[name](rng, 20000)
    bounds = np.quantile(values, [0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999])
    ordered = np.sort(values)
    nonzero = values[values != 0.0]
    for parts in (1, 3):
        chunks = [c[c != 0.0] for c in np.array_split(values, parts)]
        built = [legacy_digest(c) for c in chunks if len(c)]
        if not built:
            continue
        stacked = np.concatenate(built)
        centroids = legacy_digest(stacked[:, 0], stacked[:, 1]) if parts > 1 else built[0]
        below_lo, below_hi, at_lo, at_hi = band.part_count_arrays(
            centroids, bounds, float(values.min()), float(values.max()),
            len(values) - len(nonzero), len(values))
        below = np.searchsorted(ordered, bounds, side="left")
        at = np.searchsorted(ordered, bounds, side="right")
        assert (below_lo <= below).all(), name
        assert (below <= below_hi).all(), name
        assert (at_lo <= at).all(), name
        assert (at <= at_hi).all(), name


# --- verdicts -------------------------------------------------------------------------

def _accumulator(rows: list[Row], bounds: list[float]) -> TrendAccumulator:
    acc = TrendAccumulator()
    for bound in bounds:
        acc.watch(bound)
    for centroids, zeros, lo, hi, count in rows:
        acc.add(count, 0.0, lo, hi, zeros, centroids)
    return acc


def _exact_holds(values: Floats, q: float, op: str, bound: float) -> bool:
    exact = float(np.quantile(values, q))
    return parse_expression(f"avg{op}{bound!r}").holds(exact)


@pytest.mark.parametrize("name", ["lognormal", "huge_range", "point_masses", "negative",
                                  "integers", "mostly_zeros"])
def test_decided_verdicts_match_numpy(name: str) -> None:
    """Thresholds near the exact p50..p99 with every operator: a decided verdict is the
    exact one; too close to call happens only near the exact value."""
    rng = np.random.default_rng(11)
    values = DISTRIBUTIONS[name](rng, 20000)
    rows = [row_of(p, True) for p in split(values, 5, "arrival", rng)]
    layouts_ = {"rows": rows, "merged": [merged_row(rows)]}
    decided = close = 0
    for label, chosen in layouts_.items():
        for q in (0.5, 0.9, 0.95, 0.99):
            exact = float(np.quantile(values, q))
            bounds = sorted({exact * f + s for f in (0.9, 0.99, 0.999, 1.0, 1.001, 1.01, 1.1)
                             for s in (-1.0, 0.0, 1.0)})
            acc = _accumulator(chosen, bounds)
            selected = Selected("m", "trend", trend=acc)
            for bound in bounds:
                for op in ("<", "<=", ">", ">=", "==", "!="):
                    expression = parse_expression(f"p({q * 100:g}){op}{bound!r}")
                    verdict = judge(expression, selected, 1.0)
                    assert verdict.counts is not None
                    if verdict.decided:
                        decided += 1
                        assert verdict.holds == _exact_holds(values, q, op, bound), (
                            label, expression.text, verdict)
                    else:
                        close += 1
    assert decided > 0
    assert close > 0


def test_exact_methods_are_always_decided() -> None:
    values = np.random.default_rng(1).lognormal(0, 1, 1000)
    acc = _accumulator([row_of(values, False)], [])
    selected = Selected("m", "trend", trend=acc)
    for text in ("avg<1", "min>0.01", f"max=={float(values.max())!r}"):
        verdict = judge(parse_expression(text), selected, 1.0)
        assert verdict.decided
        assert verdict.counts is None
    empty = Selected.new("m", "trend")
    assert judge(parse_expression("p(95)<1"), empty, 1.0).decided  # k6 reads 0


def test_the_reported_false_pass_is_flagged() -> None:
    """The issue's case: ``huge_range: p(95)<B`` with B 0.3 % under the exact p95 passed
    (a false pass). The estimate may still pass; the verdict must say it is too close to
    call, so that --strict-thresholds fails it."""
    rng = np.random.default_rng(2024)
    values = _huge_range(rng, 60000)
    rows = [merged_row([row_of(p, True) for p in split(bucket, 3, "random", rng)])
            for bucket in np.array_split(values, 6)]
    exact = float(np.quantile(values, 0.95))
    for factor in (0.997, 0.999, 1.001, 1.003):
        bound = exact * factor
        acc = _accumulator(rows, [bound])
        verdict = judge(parse_expression(f"p(95)<{bound!r}"), Selected("m", "trend",
                                                                        trend=acc), 1.0)
        assert not verdict.decided, (factor, verdict)
        assert verdict.counts is not None
        low, high = verdict.counts.share
        assert low <= 0.95 <= high


def test_accumulated_band_is_the_sum_of_rows() -> None:
    rng = np.random.default_rng(5)
    values = _lognormal(rng, 9000)
    rows = [row_of(p, False) for p in split(values, 9, "arrival", rng)]
    bound = float(np.quantile(values, 0.9))
    acc = _accumulator(rows, [bound])
    expected = band.NO_SAMPLES
    for centroids, zeros, lo, hi, count in rows:
        expected = expected + band.part_counts(centroids, [bound], lo, hi, zeros, count)[0]
    assert acc.counts(bound) == expected
    assert expected.n == len(values)
    with pytest.raises(RuntimeError, match="watch"):
        acc.watch(bound * 2)


@pytest.mark.parametrize(("op", "expected"), [
    ("<", (True, None, False)), ("<=", (True, None, False)), (">", (False, None, True)),
    (">=", (False, None, True)), ("==", (False, None, False)), ("!=", (True, None, True)),
])
def test_certain_reads_the_interval_as_k6_interpolates(op: str,
                                                       expected: tuple[bool | None, ...]
                                                       ) -> None:
    """n = 101 samples: p(50) sits exactly at position 50. Bounds with 60 samples below,
    with 45..55 below (position 50 inside: too close), with 30 below."""
    n = 101
    results = []
    for below in ((60.0, 60.0), (45.0, 55.0), (30.0, 30.0)):
        counts = band.Counts(n, below[0], below[1], below[0], below[1])
        results.append(band.certain(parse_expression(f"p(50){op}1"), counts))
    assert tuple(results) == expected


def test_certain_on_a_point_mass() -> None:
    """40 samples below B and 20 equal to it: p(50) (position 50) equals B exactly."""
    counts = band.Counts(101, 40.0, 40.0, 60.0, 60.0)
    assert band.certain(parse_expression("p(50)==1"), counts) is True
    assert band.certain(parse_expression("p(50)<1"), counts) is False
    assert band.certain(parse_expression("p(50)<=1"), counts) is True
    assert band.certain(parse_expression("p(50)!=1"), counts) is False
