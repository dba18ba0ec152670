"""The one module that knows how trend samples are compressed: a log-bucket sketch.

Everything outside this module sees a digest as a float64 array of shape (n, 2): rows
of (value, weight), sorted by value. A digest made here is a sketch with logarithmic
buckets, as DDSketch (Masson, Rim, Lee, VLDB 2019) defines them: a non-zero sample x
falls in bucket ``i = ceil(log|x| / log(GAMMA))``, which covers magnitudes
``(GAMMA**(i-1), GAMMA**i]``; a row stands for every sample of one bucket, at the
bucket's representative value ``2 * GAMMA**i / (GAMMA + 1)``, within ALPHA (1 %)
relative of each of them. Zeros are counted exactly, negative values mirror positive
ones. Merging adds the counts of equal buckets, so a digest merged from any number of
partials is the digest of all their samples: merging loses nothing.

Quantiles follow numpy's default (linear) definition: the samples at ranks
floor(q*(n-1)) and ceil(q*(n-1)) are taken from their buckets (rank 0 and rank n-1 are
the exact min and max) and interpolated. Each is within ALPHA of the true sample, so the
estimate is within ALPHA of numpy's quantile whenever both samples have one sign, also
across a gap between two clusters, where the t-digest this replaces interpolated over
its centroids (docs/DIGEST_ACCURACY.md).

On the wire and in the database a sketch is ``encode``'s compact form (bucket indices
and counts). Digests of the t-digest era, little-endian float64 (mean, weight) pairs,
are still read (``decode``), answered as before (``quantiles``) and turned into buckets
when merged with sketches.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

ALPHA = 0.01
GAMMA = (1.0 + ALPHA) / (1.0 - ALPHA)
_LOG_GAMMA = math.log(GAMMA)
_REP = 2.0 / (GAMMA + 1.0)  # representative of bucket i: _REP * GAMMA**i
# Buckets kept per digest. Beyond it the buckets nearest zero are folded into the
# nearest kept one (DDSketch's collapsing store): 1,024 buckets per sign span a range of
# GAMMA**1024 (6e8); values that far below the largest lose their relative accuracy,
# the upper quantiles keep theirs.
MAX_CENTROIDS = 2048

Centroids = npt.NDArray[np.float64]
_LE_F64 = np.dtype("<f8")
EMPTY: Centroids = np.zeros((0, 2), dtype=np.float64)

# encode: magic, version, flags (bit 0: counts are uint64, else uint32), negative
# buckets, positive buckets, zeros; then int32 indices (negative ones by magnitude,
# then positive ones, each increasing) and the counts in the same order.
_MAGIC = b"\xd5\x6b"
_VERSION = 1
_HEADER = struct.Struct("<2sBBIIQ")


# Every bucket a finite double can fall in, from the least subnormal to the largest
# double, and its representative: one table, so that a representative is always the
# same double (is_sketch compares exactly) and decoding needs no exp.
_FIRST_INDEX = math.floor(math.log(5e-324) / _LOG_GAMMA) - 2
_LAST_INDEX = math.ceil(math.log(1.7976931348623157e308) / _LOG_GAMMA) + 2
with np.errstate(over="ignore"):  # the last entries are beyond the largest double
    _TABLE = np.exp(np.arange(_FIRST_INDEX, _LAST_INDEX + 1, dtype=np.float64) * _LOG_GAMMA
                    + math.log(_REP))


def _indices(magnitudes: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    return np.ceil(np.log(magnitudes) / _LOG_GAMMA).astype(np.int64)


def _representatives(indices: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    return _TABLE[indices - _FIRST_INDEX]


def _group(indices: npt.NDArray[np.int64], weights: npt.NDArray[np.float64] | None
           ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Sum the weights (None: 1 each) of equal indices, in increasing index order."""
    n = len(indices)
    if n == 0:
        return indices, np.zeros(0)
    if n > 1 and (indices[1:] > indices[:-1]).all():  # already grouped
        return indices, np.ones(n) if weights is None else weights
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    if weights is None:
        sums = np.diff(np.append(starts, n)).astype(np.float64)
    else:
        sums = np.add.reduceat(weights[order], starts)
    return ordered[starts], sums


def _fold(indices: npt.NDArray[np.int64], weights: npt.NDArray[np.float64], budget: int
          ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Keep ``budget`` buckets: the ones nearest zero are added to the first kept one."""
    if len(indices) <= budget:
        return indices, weights
    cut = len(indices) - budget
    return indices[cut:], np.concatenate([[weights[:cut + 1].sum()], weights[cut + 1:]])


def _budgets(negative: int, positive: int) -> tuple[int, int]:
    if negative + positive <= MAX_CENTROIDS:
        return negative, positive
    half = MAX_CENTROIDS // 2
    if negative <= half:
        return negative, MAX_CENTROIDS - negative
    if positive <= half:
        return MAX_CENTROIDS - positive, positive
    return half, MAX_CENTROIDS - half


def _sketch(values: npt.NDArray[np.float64], weights: npt.NDArray[np.float64] | None
            ) -> Centroids:
    """Bucket samples (``weights`` None) or (value, weight) rows: legacy centroids or
    sketch rows alike."""
    positive = values > 0.0
    negative = values < 0.0
    if weights is None:
        zero_weight = float(len(values) - np.count_nonzero(positive | negative))
        neg_idx, neg_w = _group(_indices(-values[negative]), None)
        pos_idx, pos_w = _group(_indices(values[positive]), None)
    else:
        zero_weight = float(weights[~(positive | negative)].sum())
        neg_idx, neg_w = _group(_indices(-values[negative]), weights[negative])
        pos_idx, pos_w = _group(_indices(values[positive]), weights[positive])
    neg_budget, pos_budget = _budgets(len(neg_idx), len(pos_idx))
    neg_idx, neg_w = _fold(neg_idx, neg_w, neg_budget)
    pos_idx, pos_w = _fold(pos_idx, pos_w, pos_budget)
    return _assemble(neg_idx, neg_w, zero_weight, pos_idx, pos_w)


def _assemble(neg_idx: npt.NDArray[np.int64], neg_w: npt.NDArray[np.float64],
              zero_weight: float, pos_idx: npt.NDArray[np.int64],
              pos_w: npt.NDArray[np.float64]) -> Centroids:
    """Rows in value order: negative buckets (largest magnitude first), zeros, positive."""
    k, z = len(neg_idx), 1 if zero_weight else 0
    out = np.empty((k + z + len(pos_idx), 2), dtype=np.float64)
    if k:
        out[:k, 0] = -_representatives(neg_idx[::-1])
        out[:k, 1] = neg_w[::-1]
    if z:
        out[k] = (0.0, zero_weight)
    out[k + z:, 0] = _representatives(pos_idx)
    out[k + z:, 1] = pos_w
    return out


def from_values(values: Sequence[float] | npt.NDArray[np.float64]) -> Centroids:
    """The sketch of raw samples."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if len(array) == 0:
        return EMPTY
    return _sketch(array, None)


def split_zeros(values: Sequence[float] | npt.NDArray[np.float64]) -> tuple[Centroids, int]:
    """(sketch of the non-zero values, exact count of zeros).

    k6 timing metrics are full of exact zeros (``http_req_connecting`` on reused
    connections); rows keep their count in a column of its own, beside the digest.
    """
    array = np.asarray(values, dtype=np.float64)
    nonzero = array[array != 0.0]
    return from_values(nonzero), len(array) - len(nonzero)


def merge(parts: Sequence[Centroids]) -> Centroids:
    """One sketch of several digests' samples: equal buckets' counts added."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return EMPTY
    if len(parts) == 1 and len(parts[0]) <= MAX_CENTROIDS and is_sketch(parts[0]):
        return parts[0]
    stacked = np.concatenate(parts)
    return _sketch(stacked[:, 0], stacked[:, 1])


def is_sketch(centroids: Centroids) -> bool:
    """Whether every row is a bucket of this module's sketch (not a t-digest centroid of
    a row stored before it): each value is exactly its bucket's representative."""
    values = centroids[:, 0]
    nonzero = values[values != 0.0]
    if len(nonzero) == 0:
        return True
    magnitudes = np.abs(nonzero)
    return bool(np.array_equal(magnitudes, _representatives(_indices(magnitudes))))


def bucket_bounds(values: npt.NDArray[np.float64]
                  ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """For a sketch's values, the least and greatest sample each row can stand for
    (closed, and widened by a rounding margin; zeros are exact)."""
    magnitudes = np.abs(values)
    low = np.zeros(len(values))
    high = np.zeros(len(values))
    nonzero = magnitudes > 0.0
    idx = _indices(magnitudes[nonzero]).astype(np.float64)
    lower = np.exp((idx - 1.0) * _LOG_GAMMA) * (1.0 - 1e-9)
    upper = np.exp(idx * _LOG_GAMMA) * (1.0 + 1e-9)
    positive = values[nonzero] > 0.0
    low[nonzero] = np.where(positive, lower, -upper)
    high[nonzero] = np.where(positive, upper, -lower)
    return low, high


def outside(centroids: Centroids, lo: float, hi: float, known_sketch: bool = False) -> bool:
    """Whether a digest holds samples that cannot lie in [lo, hi]: a sketch's first or
    last bucket misses it, or a t-digest centroid's mean is outside it.
    ``known_sketch``: decoded from a sketch's encoding (is_sketch holds by construction)."""
    if not known_sketch and not is_sketch(centroids):
        return bool(centroids[0, 0] < lo or centroids[-1, 0] > hi)
    # Two rows: scalar arithmetic, as bucket_bounds does it for arrays.
    return (_bounds_of(float(centroids[0, 0]))[1] < lo
            or _bounds_of(float(centroids[-1, 0]))[0] > hi)


def _bounds_of(value: float) -> tuple[float, float]:
    """bucket_bounds for one value."""
    if value == 0.0:
        return 0.0, 0.0
    index = float(math.ceil(math.log(abs(value)) / _LOG_GAMMA))
    lower = _exp((index - 1.0) * _LOG_GAMMA) * (1.0 - 1e-9)
    upper = _exp(index * _LOG_GAMMA) * (1.0 + 1e-9)
    return (lower, upper) if value > 0.0 else (-upper, -lower)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # beyond the largest double, as numpy's exp says
        return math.inf


def quantiles(
    centroids: Centroids, qs: Sequence[float], lo: float, hi: float, zeros: int = 0,
    known_sketch: bool = False,
) -> list[float]:
    """Quantiles of a digest plus ``zeros`` exact zeros, clamped to the exact min and max.

    ``centroids`` may be several digests stacked (see ``stack``); they are read as one.
    ``known_sketch``: the caller made them with ``merge`` (no legacy check needed).
    """
    if len(centroids) == 0:
        return [0.0 if zeros else float("nan")] * len(qs)
    if not known_sketch and not is_sketch(centroids):
        return _legacy_quantiles(centroids, qs, lo, hi, zeros)
    values = centroids[:, 0]
    weights = centroids[:, 1]
    if len(values) > 1 and (values[1:] < values[:-1]).any():
        order = np.argsort(values, kind="stable")
        values, weights = values[order], weights[order]
    if zeros:
        at = int(np.searchsorted(values, 0.0))
        values = np.insert(values, at, 0.0)
        weights = np.insert(weights, at, float(zeros))
    ends = np.cumsum(weights)
    n = float(ends[-1])
    if n <= 0.0:
        return [float("nan")] * len(qs)
    ranks = np.asarray(qs, dtype=np.float64) * (n - 1.0)
    below = np.floor(ranks)
    # The samples at ranks floor and floor + 1 (at most n - 1), in one search.
    wanted = np.concatenate((below, np.minimum(below + 1.0, n - 1.0)))
    found = values[np.minimum(np.searchsorted(ends, wanted, side="right"), len(values) - 1)]
    result: list[float] = []
    for i, rank in enumerate(ranks.tolist()):
        pair: list[float] = []
        for j in (i, i + len(ranks)):
            rank_at = float(wanted[j])
            # The first and last samples are known exactly.
            pair.append(lo if rank_at <= 0.0 else hi if rank_at >= n - 1.0 else float(found[j]))
        estimate = pair[0] + (rank - float(below[i])) * (pair[1] - pair[0])
        result.append(min(max(estimate, lo), hi))
    return result


def _legacy_quantiles(centroids: Centroids, qs: Sequence[float], lo: float, hi: float,
                      zeros: int) -> list[float]:
    """A t-digest's quantiles as fastdigest reads them, for rows stored before sketches.

    The rank q * n is located among: the negative values (from the digest), then the
    zeros (exact), then the positive values (from the digest).
    """
    curve = _Curve.of(centroids)
    if curve is None:
        return [0.0 if zeros else float("nan")] * len(qs)
    weight = curve.weight
    if not zeros:
        return [min(max(v, lo), hi) for v in curve.quantiles(np.asarray(qs, dtype=np.float64))]
    if lo >= 0.0:
        negative = 0.0
    elif hi <= 0.0:
        negative = weight
    else:
        negative = curve.cdf(0.0) * weight
    total = weight + zeros
    result = []
    for q in qs:
        rank = q * total
        if rank < negative:
            value = curve.quantile(min(rank / weight, 1.0))
        elif rank <= negative + zeros:
            value = 0.0
        else:
            value = curve.quantile(min((rank - zeros) / weight, 1.0))
        result.append(min(max(value, lo), hi))
    return result


def stack(parts: Sequence[Centroids]) -> Centroids:
    """The union of several digests' rows, sorted by value, not merged.

    For a query that reads a few quantiles of many stored digests: sorting the union
    costs less than grouping it into buckets, and reads the same.
    """
    parts = [p for p in parts if len(p)]
    if len(parts) <= 1:
        return parts[0] if parts else EMPTY
    stacked = np.concatenate(parts)
    return stacked[np.argsort(stacked[:, 0], kind="stable")]


class _Curve:
    """The quantile function of a digest as fastdigest defines it, in numpy.

    Each centroid stands for ``weight`` samples at consecutive ranks, all at its mean;
    a quantile q sits at rank q * (n - 1) and is interpolated linearly between the
    centroids' middle ranks (and is the first or last mean outside them). The tests
    hold this against fastdigest's own ``quantile`` and ``cdf``. Doing it here saves
    building a fastdigest object per query, and reads stacked digests directly.
    """

    __slots__ = ("means", "middles", "weight")

    def __init__(self, means: npt.NDArray[np.float64], middles: npt.NDArray[np.float64],
                 weight: float) -> None:
        self.means = means
        self.middles = middles
        self.weight = weight

    @classmethod
    def of(cls, centroids: Centroids) -> _Curve | None:
        if len(centroids) == 0:
            return None
        means = centroids[:, 0]
        weights = centroids[:, 1]
        if len(means) > 1 and (means[1:] < means[:-1]).any():
            order = np.argsort(means, kind="stable")
            means = means[order]
            weights = weights[order]
        ends = np.cumsum(weights)
        weight = float(ends[-1])
        if weight <= 0.0:
            return None
        return cls(means, ends - (weights + 1.0) / 2.0, weight)

    def quantiles(self, qs: npt.NDArray[np.float64]) -> list[float]:
        ranks = qs * (self.weight - 1.0)
        return [float(v) for v in np.interp(ranks, self.middles, self.means)]

    def quantile(self, q: float) -> float:
        return self.quantiles(np.asarray([q], dtype=np.float64))[0]

    def cdf(self, x: float) -> float:
        means, middles = self.means, self.middles
        if x < means[0]:
            return 0.0
        if x > means[-1]:
            return 1.0
        if self.weight <= 1.0:
            return 0.5
        # Of several centroids with the same mean the first counts, as in fastdigest.
        i = int(np.searchsorted(means, x, side="left"))
        if means[i] == x:
            rank = float(middles[i])
        else:
            step = (x - means[i - 1]) / (means[i] - means[i - 1])
            rank = float(middles[i - 1] + step * (middles[i] - middles[i - 1]))
        return rank / (self.weight - 1.0)


def encode(centroids: Centroids, known_sketch: bool = False) -> bytes:
    """A sketch in its compact form; a legacy digest (t-digest centroids) is bucketed
    first (``known_sketch``: the caller made it with ``merge``, no check needed)."""
    if len(centroids) == 0:
        return b""
    if not known_sketch and not is_sketch(centroids):
        centroids = merge([centroids])
    values = centroids[:, 0]
    weights = np.rint(centroids[:, 1])
    negative = values < 0.0
    positive = values > 0.0
    neg_idx = _indices(-values[negative])[::-1]
    pos_idx = _indices(values[positive])
    counts = np.concatenate([weights[negative][::-1], weights[positive]])
    wide = bool(len(counts)) and float(counts.max()) >= 2**32
    zero_count = int(weights[~(negative | positive)].sum())
    body = (_HEADER.pack(_MAGIC, _VERSION, int(wide), len(neg_idx), len(pos_idx), zero_count)
            + np.concatenate([neg_idx, pos_idx]).astype("<i4").tobytes()
            + counts.astype("<u8" if wide else "<u4").tobytes())
    # Never a whole number of 16 bytes: that length means a legacy digest.
    return body + b"\0" if len(body) % 16 == 0 else body


def encodes_sketch(data: bytes) -> bool:
    """Whether ``decode`` reads these bytes as a sketch (else as legacy pairs); what it
    decodes from a sketch's bytes are bucket representatives, as is_sketch checks."""
    return len(data) % 16 != 0


def decode(data: bytes) -> Centroids:
    """Inverse of encode (and the legacy (mean, weight) pairs); ValueError names what is
    wrong with bytes that are neither."""
    if not encodes_sketch(data):
        return np.frombuffer(data, dtype=_LE_F64).astype(np.float64).reshape(-1, 2)
    if len(data) < _HEADER.size or data[:2] != _MAGIC:
        raise ValueError(f"digest of {len(data)} bytes is neither a sketch nor whole "
                         f"(mean, weight) pairs")
    magic, version, flags, n_neg, n_pos, zero_count = _HEADER.unpack_from(data)
    if version != _VERSION or flags & ~1:
        raise ValueError(f"sketch version {version} with flags {flags} is not supported")
    n = n_neg + n_pos
    width = 8 if flags & 1 else 4
    end = _HEADER.size + n * (4 + width)
    if len(data) not in (end, end + 1) or (len(data) == end + 1 and end % 16):
        raise ValueError(f"sketch of {n} buckets cannot be {len(data)} bytes")
    indices = np.frombuffer(data, dtype="<i4", count=n, offset=_HEADER.size).astype(np.int64)
    counts = np.frombuffer(data, dtype="<u8" if width == 8 else "<u4", count=n,
                           offset=_HEADER.size + 4 * n).astype(np.float64)
    if n and (indices.min() < _FIRST_INDEX or indices.max() > _LAST_INDEX):
        raise ValueError(f"sketch bucket index outside [{_FIRST_INDEX}, {_LAST_INDEX}] "
                         "(no double falls there)")
    neg_idx, pos_idx = indices[:n_neg], indices[n_neg:]
    if (np.diff(neg_idx) <= 0).any() or (np.diff(pos_idx) <= 0).any():
        raise ValueError("sketch bucket indices are not increasing")
    if (counts <= 0).any():
        raise ValueError("sketch bucket with no samples")
    return _assemble(neg_idx, counts[:n_neg], float(zero_count), pos_idx,
                     counts[n_neg:])


def check(centroids: Centroids, known_sketch: bool = False) -> str | None:
    """Why a decoded digest is unacceptable, or None: finite, positive weights, sorted.
    ``known_sketch``: decoded from a sketch's encoding, which decode has checked for
    positive counts and increasing buckets: only the values at both ends (a bucket
    beyond the largest double decodes to infinity) are left to check."""
    if len(centroids) == 0:
        return "empty digest"
    if known_sketch:
        ends_finite = math.isfinite(centroids[0, 0]) and math.isfinite(centroids[-1, 0])
        return None if ends_finite else "non-finite centroid"
    if not np.isfinite(centroids).all():
        return "non-finite centroid"
    if (centroids[:, 1] <= 0).any():
        return "non-positive centroid weight"
    # Compared pairwise rather than with np.diff, which overflows on +-1e308 means.
    if len(centroids) > 1 and (centroids[1:, 0] < centroids[:-1, 0]).any():
        return "centroids not sorted by mean"
    return None
