"""The one module that knows the t-digest library.

Everything outside this module sees a digest as a library-neutral float64 array of shape
(n, 2): rows of (mean, weight), sorted by mean. On the wire and in the database that
array is stored as little-endian float64 pairs ``mean0, weight0, mean1, weight1, ...``
(16 bytes per centroid), so changing the library later breaks no stored data.

Library choice (measured, see docs/DIGEST_ACCURACY.md): fastdigest with at most
``MAX_CENTROIDS`` centroids. pytdigest interpolates across point masses such as the
exact zeros k6 reports for ``http_req_connecting`` on reused connections and misses the
rank criterion there at any compression; fastdigest does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fastdigest
import numpy as np
import numpy.typing as npt

# Same value in the forwarder and both servers, so every partial has the same shape.
MAX_CENTROIDS = 300

Centroids = npt.NDArray[np.float64]
_LE_F64 = np.dtype("<f8")
EMPTY: Centroids = np.zeros((0, 2), dtype=np.float64)


def _build(values: Any, weights: Any = None) -> fastdigest.TDigest:
    return fastdigest.TDigest.from_values(values, weights, max_centroids=MAX_CENTROIDS)


def from_values(values: Sequence[float] | npt.NDArray[np.float64]) -> Centroids:
    """Compress raw samples into centroids."""
    if len(values) == 0:
        return EMPTY
    digest = _build(values)
    return np.asarray(digest.centroids, dtype=np.float64).reshape(-1, 2)


def split_zeros(values: Sequence[float] | npt.NDArray[np.float64]) -> tuple[Centroids, int]:
    """(digest of the non-zero values, exact count of zeros).

    k6 timing metrics are full of exact zeros (``http_req_connecting`` on reused
    connections). A t-digest smears such a point mass into its neighbours, so the zeros
    are counted exactly beside the digest and only the rest is compressed.
    """
    array = np.asarray(values, dtype=np.float64)
    nonzero = array[array != 0.0]
    return from_values(nonzero), len(array) - len(nonzero)


def merge(parts: Sequence[Centroids]) -> Centroids:
    """Merge several centroid arrays into one digest of at most MAX_CENTROIDS centroids."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return EMPTY
    if len(parts) == 1 and len(parts[0]) <= MAX_CENTROIDS:
        return parts[0]
    stacked = np.concatenate(parts)
    digest = _build(stacked[:, 0], stacked[:, 1])
    return np.asarray(digest.centroids, dtype=np.float64).reshape(-1, 2)


def quantiles(
    centroids: Centroids, qs: Sequence[float], lo: float, hi: float, zeros: int = 0
) -> list[float]:
    """Quantiles of a digest plus ``zeros`` exact zeros, clamped to the exact min and max.

    ``centroids`` may be several digests stacked (see ``stack``); they are read as one.
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
    """The union of several digests' centroids, sorted by mean, not compressed.

    For a query that merges stored digests only to read a few quantiles: compressing
    the union into MAX_CENTROIDS centroids costs more than reading the quantiles, and
    keeps less detail than the union has.
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


def encode(centroids: Centroids) -> bytes:
    """(n, 2) centroids to little-endian float64 (mean, weight) pairs."""
    return np.ascontiguousarray(centroids, dtype=_LE_F64).tobytes()


def decode(data: bytes) -> Centroids:
    """Inverse of encode; raises ValueError when the length is not a whole number of pairs."""
    if len(data) % 16:
        raise ValueError(f"digest length {len(data)} is not a multiple of 16 bytes")
    return np.frombuffer(data, dtype=_LE_F64).astype(np.float64).reshape(-1, 2)


def check(centroids: Centroids) -> str | None:
    """Why a decoded digest is unacceptable, or None: finite, positive weights, sorted means."""
    if len(centroids) == 0:
        return "empty digest"
    if not np.isfinite(centroids).all():
        return "non-finite centroid"
    if (centroids[:, 1] <= 0).any():
        return "non-positive centroid weight"
    # Compared pairwise rather than with np.diff, which overflows on +-1e308 means.
    if len(centroids) > 1 and (centroids[1:, 0] < centroids[:-1, 0]).any():
        return "centroids not sorted by mean"
    return None
