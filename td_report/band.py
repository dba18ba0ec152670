"""How sure a percentile verdict is: the rank interval of a threshold's bound. No I/O.

A t-digest keeps centroids (mean, weight), not samples, so the exact number of samples
below a bound B is known only within an interval. This module computes that interval
from the stored digests themselves, and says whether a threshold on a percentile is
decided by it (the exact percentile is certainly on one side of B) or too close to call.

**Envelopes.** The samples of each centroid lie in an interval, its envelope:

- A digest built in one pass (``common.digest.from_values``, ``split_zeros``: fastdigest
  sorts the values and groups them consecutively) has the samples of centroid i between
  the last sample of centroid i-1 and the first of centroid i+1, hence between their
  means. This is proven, and such a digest is recognised exactly: its weights are the
  ones fastdigest's scale function gives its sample count (``one_pass_weights``). Rule
  ``ONE_PASS``.
- A digest merged from several (td-server merges the partials of a bucket's generators,
  in one pass or in several) groups *centroids* consecutively, and a centroid of one
  part may spread past the means of its new neighbours, which come from other parts. No
  envelope is then provable from means and weights alone; the rules ``MERGED`` (the 3rd
  distinct mean away, counting only centroids of more than one sample, which other
  parts' single samples do not push closer; the refinement below over the 4th) and
  ``MERGED_MASSES`` (the 3rd, and on to a nearby point mass, without the refinement; for
  digests in which heavy centroids share a mean) are wide enough for every case
  ``tests/test_verdict_bands.py`` and ``scripts/verdict_accuracy.py --bands`` try:
  unlike generators, disjoint ranges, point masses, late and cascaded merges.

Every envelope is cut to the row's exact min and max; a centroid of weight 1 is one
sample, exactly at its mean; means are sums divided by weights, so envelopes and means
are widened by a relative 1e-9.

**Counts.** A centroid whose envelope lies below B counts wholly below it, one above B
not at all. For one whose envelope [a, b] holds B, the number l of its w samples below
B obeys ``w*m >= l*a + (w-l)*B`` and ``w*m <= l*B + (w-l)*b`` (m its mean), so
``w(B-m)/(B-a) <= l <= w(b-m)/(b-B)`` (the refinement); and at least one sample lies
below B when m < B, at least one above when m > B. The same holds for the number at or
below B. The exact zeros kept beside a digest count exactly; the row's exact min and max
settle B outside [min, max] and give one sample on each side inside it. td-report adds
these counts **row by row** as it reads the stored rows (``TrendAccumulator.watch``), so
reading many rows at once (stacked, or compressed past 200,000 centroids) loses nothing.

**The verdict.** k6's (and numpy's default) percentile p(q) of n sorted samples x is
interpolated at position h = q (n - 1) between x[floor h] and x[ceil h]. With L = #(x < B)
and E = #(x <= B), ``x[i] < B`` exactly when ``i < L`` and ``x[i] <= B`` when ``i < E``.
So ``p(q) < B`` is certainly true when ``ceil h < L`` for every L the interval allows,
certainly false when ``floor h >= L``; likewise for the other operators (``certain``).
Anything else is too close to call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common import digest
from td_report.thresholds import Expression

# Relative widening of every envelope and mean against rounding in the digest's sums.
_RELATIVE_SLACK = 1e-9
# Slack of the count bounds computed in floating point (they are whole numbers).
_COUNT_SLACK = 1e-6
# Methods read from a digest; every other method reads exact figures.
APPROXIMATE_METHODS = frozenset({"p", "med"})

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Rule:
    """How far a centroid's samples may spread: to the mean ``reach`` centroids away on
    each side (``distinct``: counting distinct means of centroids of more than one
    sample), further to the nearest point mass (a mean several such centroids share)
    within ``mass_reach`` of them; ``refine``: bound the counts with the centroid's mean
    (over the envelope ``refine_reach`` away, if wider)."""

    reach: int
    mass_reach: int
    refine: bool
    distinct: bool
    refine_reach: int = 0  # envelope of the refinement, if wider than ``reach``


# Built in one pass: proven (module doc).
ONE_PASS = Rule(reach=1, mass_reach=0, refine=True, distinct=False)
# Merged from several digests: measured (tests/test_verdict_bands.py), not proven; wider
# where the digest shows point masses (a mean that several heavy centroids share).
MERGED = Rule(reach=3, mass_reach=0, refine=True, distinct=True, refine_reach=4)
MERGED_MASSES = Rule(reach=3, mass_reach=8, refine=False, distinct=True)


@dataclass(frozen=True)
class Counts:
    """Bounds on #(x < B) and #(x <= B) over ``n`` samples."""

    n: int
    below_lo: float
    below_hi: float
    at_or_below_lo: float
    at_or_below_hi: float

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.n + other.n, self.below_lo + other.below_lo,
                      self.below_hi + other.below_hi,
                      self.at_or_below_lo + other.at_or_below_lo,
                      self.at_or_below_hi + other.at_or_below_hi)

    @property
    def share(self) -> tuple[float, float]:
        """(fraction of samples certainly below B, fraction possibly at or below B)."""
        if not self.n:
            return (0.0, 0.0)
        return (self.below_lo / self.n, self.at_or_below_hi / self.n)


NO_SAMPLES = Counts(0, 0.0, 0.0, 0.0, 0.0)
# The t-digests of rows stored before sketches had at most this many centroids.
LEGACY_CENTROIDS = 300


def _k_to_q(k: Floats, d: float) -> Floats:
    """fastdigest's scale function: the quantile limit of the k-th centroid."""
    ratio = k / d
    base = 1.0 - ratio
    result: Floats = np.where(ratio >= 0.5, 1.0 - 2.0 * base * base, 2.0 * ratio * ratio)
    return result


@functools.lru_cache(maxsize=1024)
def one_pass_weights(n: int, size: int = LEGACY_CENTROIDS) -> Floats:
    """The weights fastdigest gives ``n`` samples compressed in one pass.

    It closes the k-th centroid at the last sample whose running count is within
    ``k_to_q(k) * n`` (each centroid taking at least one sample), so its end is
    ``max(previous end + 1, floor(k_to_q(k) * n))``.
    """
    k = np.arange(1, size + 1, dtype=np.float64)
    limits = np.concatenate([[0.0], np.floor(_k_to_q(k, float(size)) * float(n))])
    steps = np.arange(size + 1, dtype=np.float64)
    ends = (steps + np.maximum.accumulate(limits - steps))[1:]
    last = int(np.searchsorted(ends, n))
    ends = np.minimum(ends[:last + 1], n)
    result: Floats = np.diff(ends, prepend=0.0)
    result.flags.writeable = False  # cached
    return result


def is_one_pass(weights: Floats) -> bool:
    """Whether a digest's weights are those of one pass over its samples (a merge of
    digests whose centroids were all single samples is one too)."""
    total = float(weights.sum())
    if total != int(total) or total < 1:
        return False
    expected = one_pass_weights(int(total))
    return len(expected) == len(weights) and bool((expected == weights).all())


def has_masses(means: Floats, weights: Floats) -> bool:
    """Whether two centroids of more than one sample share a mean (``means`` sorted)."""
    heavy = means[weights > 1.0]
    return bool(len(heavy) > 1 and (heavy[1:] == heavy[:-1]).any())


def choose_rule(means: Floats, weights: Floats) -> Rule:
    """The proven rule for a one-pass digest, else a measured one."""
    if is_one_pass(weights):
        return ONE_PASS
    return MERGED_MASSES if has_masses(means, weights) else MERGED


def envelopes(means: Floats, weights: Floats, lo: float, hi: float, rule: Rule
              ) -> tuple[Floats, Floats, Floats]:
    """(lower ends, upper ends, slack of the mean) of each centroid's samples, cut to
    the exact [lo, hi]; ``means`` sorted."""
    k = len(means)
    if k == 0:
        return means, means, means
    if not rule.distinct:  # the neighbours by position
        anchors = means
        below_at = np.arange(k) - rule.reach
        above_at = np.arange(k) + rule.reach
    else:
        # The neighbours by distinct mean among centroids of more than one sample: single
        # samples (exact) of other parts interleave after a merge and are no steps.
        heavy = means[weights > 1.0]
        if not len(heavy):
            heavy = means
        first = np.empty(len(heavy), dtype=bool)
        first[0] = True
        np.not_equal(heavy[1:], heavy[:-1], out=first[1:])
        anchors = heavy[first]
        repeats = np.diff(np.append(np.flatnonzero(first), len(heavy)))
        below_count = np.searchsorted(anchors, means, "left")  # anchors below each mean
        above_first = np.searchsorted(anchors, means, "right")  # first anchor above it
        below_at = below_count - rule.reach
        above_at = above_first + rule.reach - 1
        if rule.mass_reach > rule.reach:
            # The nearest point mass (an anchor several heavy centroids share) below
            # and above each centroid, by anchor index; -1 and d when there is none. A
            # centroid of a point mass itself stays tight.
            d = len(anchors)
            positions = np.arange(d)
            is_mass = repeats > 1
            last_mass = np.maximum.accumulate(np.where(is_mass, positions, -1))
            next_mass = np.minimum.accumulate(np.where(is_mass, positions, d)[::-1])[::-1]
            mass_below = np.where(below_count > 0, last_mass[np.maximum(below_count - 1, 0)],
                                  -1)
            mass_above = np.where(above_first < d, next_mass[np.minimum(above_first, d - 1)],
                                  d)
            on_mass = (above_first > below_count) & is_mass[np.minimum(below_count, d - 1)]
            below_at = np.where(~on_mass & (mass_below >= below_count - rule.mass_reach),
                                np.minimum(below_at, mass_below), below_at)
            above_at = np.where(~on_mass & (mass_above <= above_first + rule.mass_reach - 1),
                                np.maximum(above_at, mass_above), above_at)
    d = len(anchors)
    below = np.where(below_at >= 0, anchors[np.clip(below_at, 0, d - 1)], lo)
    above = np.where(above_at < d, anchors[np.clip(above_at, 0, d - 1)], hi)
    np.maximum(below, lo, out=below)
    np.minimum(above, hi, out=above)
    slack = _RELATIVE_SLACK * np.maximum(np.maximum(np.abs(below), np.abs(above)),
                                         np.abs(means))
    single = weights == 1.0  # one sample: exactly its mean
    slack[single] = 0.0
    below = np.where(single, means, np.maximum(below - slack, lo))
    above = np.where(single, means, np.minimum(above + slack, hi))
    return below, above, slack


def part_counts(centroids: Floats, bounds: Sequence[float] | Floats, lo: float, hi: float,
                zeros: int, count: int, rule: Rule | None = None) -> list[Counts]:
    """Counts for each bound over one stored row: a digest of its non-zero samples (or of
    all of them), ``zeros`` exact zeros beside it, its exact min, max and count."""
    columns = part_count_arrays(centroids, bounds, lo, hi, zeros, count, rule)
    return [Counts(count, *(float(x) for x in row)) for row in zip(*columns, strict=True)]


def part_count_arrays(centroids: Floats, bounds: Sequence[float] | Floats, lo: float,
                      hi: float, zeros: int, count: int, rule: Rule | None = None
                      ) -> tuple[Floats, Floats, Floats, Floats]:
    """``part_counts`` as four arrays (below: least, most; at or below: least, most),
    one entry per bound. ``rule``: by default ``choose_rule`` (ONE_PASS, MERGED or
    MERGED_MASSES, as the weights and means show)."""
    x = np.asarray(bounds, dtype=np.float64)
    if not count:
        zero = np.zeros(len(x))
        return zero, zero, zero, zero
    means = np.ascontiguousarray(centroids[:, 0], dtype=np.float64)
    weights = np.ascontiguousarray(centroids[:, 1], dtype=np.float64)
    if len(means) > 1 and (means[1:] < means[:-1]).any():
        order = np.argsort(means, kind="stable")
        means, weights = means[order], weights[order]
    n = float(count)
    if not ((x >= lo) & (x <= hi)).any():  # min and max decide (below)
        below_lo, below_hi = np.zeros(len(x)), np.full(len(x), n)
        at_lo, at_hi = np.zeros(len(x)), np.full(len(x), n)
    elif len(means) and float(weights.sum()) + zeros == count and digest.is_sketch(
            centroids):
        below_lo, below_hi, at_lo, at_hi = _sketch_counts(means, weights, lo, hi, x)
        positive = np.where(x > 0.0, float(zeros), 0.0)
        nonnegative = np.where(x >= 0.0, float(zeros), 0.0)
        below_lo, below_hi = below_lo + positive, below_hi + positive
        at_lo, at_hi = at_lo + nonnegative, at_hi + nonnegative
    elif len(means) and float(weights.sum()) + zeros == count:
        if rule is None:
            rule = choose_rule(means, weights)
        a, b, slack = envelopes(means, weights, lo, hi, rule)
        ends: tuple[Floats, Floats] | None = None
        if rule.refine and rule.refine_reach > rule.reach:
            wide = dataclasses.replace(rule, reach=rule.refine_reach)
            wide_a, wide_b, slack = envelopes(means, weights, lo, hi, wide)
            ends = (wide_a, wide_b)
        elif rule.refine:
            ends = (a, b)
        below_lo, below_hi, at_lo, at_hi = _digest_counts(means, weights, a, b, slack, x,
                                                          ends)
        positive = np.where(x > 0.0, float(zeros), 0.0)
        nonnegative = np.where(x >= 0.0, float(zeros), 0.0)
        below_lo, below_hi = below_lo + positive, below_hi + positive
        at_lo, at_hi = at_lo + nonnegative, at_hi + nonnegative
    elif not len(means) and zeros == count:  # zeros only
        below_lo = below_hi = np.where(x > 0.0, n, 0.0)
        at_lo = at_hi = np.where(x >= 0.0, n, 0.0)
    else:  # the digest does not account for the count: only min and max are sure
        below_lo, at_lo = np.zeros(len(x)), np.zeros(len(x))
        below_hi, at_hi = np.full(len(x), n), np.full(len(x), n)
    # What the exact min and max decide on their own: nothing is below the min, the min
    # itself is below any larger bound; likewise for the max.
    below_lo = np.where(x <= lo, 0.0, np.maximum(below_lo, 1.0))
    below_hi = np.where(x <= lo, 0.0, below_hi)
    at_lo = np.where(x < lo, 0.0, np.maximum(at_lo, 1.0))
    at_hi = np.where(x < lo, 0.0, at_hi)
    below_lo = np.where(x > hi, n, below_lo)
    below_hi = np.where(x > hi, n, np.minimum(below_hi, n - 1.0))
    at_lo = np.where(x >= hi, n, at_lo)
    at_hi = np.where(x >= hi, n, np.minimum(at_hi, n - 1.0))
    below_hi = np.maximum(below_hi, below_lo)
    at_lo = np.maximum(at_lo, below_lo)
    at_hi = np.maximum(at_hi, at_lo)
    return below_lo, below_hi, at_lo, at_hi


def _sketch_counts(values: Floats, weights: Floats, lo: float, hi: float, x: Floats
                   ) -> tuple[Floats, Floats, Floats, Floats]:
    """Exact bounds for a sketch: each row's samples lie in its bucket (cut to the exact
    [lo, hi]), so a bucket wholly below a bound is certainly below it and one that
    reaches it only possibly. Buckets are disjoint and in value order."""
    low, high = digest.bucket_bounds(values)
    low = np.clip(low, lo, hi)
    high = np.clip(high, lo, hi)
    ends = np.concatenate([[0.0], np.cumsum(weights)])
    return (ends[np.searchsorted(high, x, side="left")],  # high < x: certainly below
            ends[np.searchsorted(low, x, side="left")],  # low < x: possibly below
            ends[np.searchsorted(high, x, side="right")],  # high <= x: certainly at/below
            ends[np.searchsorted(low, x, side="right")])  # low <= x: possibly at/below


def _digest_counts(means: Floats, weights: Floats, a: Floats, b: Floats, slack: Floats,
                   x: Floats, refine: tuple[Floats, Floats] | None
                   ) -> tuple[Floats, Floats, Floats, Floats]:
    """Bounds on the digest's samples below and at or below each bound in ``x``, from
    the envelopes [a, b]; ``refine``: the envelopes that bound the counts through the
    mean (None: no such bound)."""
    bound = x[:, None]
    w, lo_end, hi_end = weights[None, :], a[None, :], b[None, :]
    low_mean, high_mean = (means - slack)[None, :], (means + slack)[None, :]
    if refine is not None:
        far_lo, far_hi = refine[0][None, :], refine[1][None, :]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # w(B - m)/(B - a) <= count <= w(b - m)/(b - B), "below" and "at or below"
            least = np.where(bound > far_lo, np.ceil(
                w * (bound - high_mean) / (bound - far_lo) - _COUNT_SLACK), 0.0)
            most = np.where(far_hi > bound, np.floor(
                w * (far_hi - low_mean) / (far_hi - bound) + _COUNT_SLACK), w)
        least = np.clip(np.nan_to_num(least, nan=0.0, posinf=np.inf, neginf=0.0), 0.0, w)
        most = np.clip(np.nan_to_num(most, nan=np.inf, posinf=np.inf, neginf=0.0), 0.0, w)
    else:
        least, most = np.zeros_like(w), w
    # Below B: none when B <= a, all when B > b; at least one when the mean is below B,
    # at most w - 1 when it is at or above.
    b_least = np.where(high_mean < bound, np.maximum(least, 1.0), least)
    b_most = np.where(low_mean >= bound, np.minimum(most, w - 1.0), most)
    b_least = np.where(bound > hi_end, w, np.where(bound <= lo_end, 0.0, b_least))
    b_most = np.where(bound > hi_end, w, np.where(bound <= lo_end, 0.0, b_most))
    # At or below B: none when B < a, all when B >= b; at least one when the mean is at
    # or below B, at most w - 1 when it is above.
    e_least = np.where(high_mean <= bound, np.maximum(least, 1.0), least)
    e_most = np.where(low_mean > bound, np.minimum(most, w - 1.0), most)
    e_least = np.where(bound >= hi_end, w, np.where(bound < lo_end, 0.0, e_least))
    e_most = np.where(bound >= hi_end, w, np.where(bound < lo_end, 0.0, e_most))
    e_least = np.maximum(e_least, b_least)
    b_most = np.minimum(b_most, e_most)
    return b_least.sum(axis=1), b_most.sum(axis=1), e_least.sum(axis=1), e_most.sum(axis=1)


def position(q: float, n: int) -> tuple[int, int]:
    """(floor, ceil) of k6's interpolation position q (n - 1), widened by rounding."""
    h = q * (n - 1)
    eps = 1e-9 * max(1.0, h)
    return max(int(math.floor(h - eps)), 0), min(int(math.ceil(h + eps)), n - 1)


def certain(expression: Expression, counts: Counts) -> bool | None:
    """Whether the threshold holds for the exact percentile, if the counts decide it."""
    n = counts.n
    if not n:
        return None
    q = 0.5 if expression.method == "med" else (expression.percentile or 0.0) / 100.0
    f, c = position(q, n)
    lt_true, lt_false = c < counts.below_lo, f >= counts.below_hi
    le_true, le_false = c < counts.at_or_below_lo, f >= counts.at_or_below_hi
    eq_true = lt_false and le_true
    eq_false = lt_true or le_false
    op = expression.op
    table = {
        "<": (lt_true, lt_false), "<=": (le_true, le_false),
        ">": (le_false, le_true), ">=": (lt_false, lt_true),
        "==": (eq_true, eq_false), "===": (eq_true, eq_false),
        "!=": (eq_false, eq_true),
    }
    yes, no = table[op]
    if yes:
        return True
    if no:
        return False
    return None
