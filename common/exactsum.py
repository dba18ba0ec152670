"""Sums of float64 samples kept exact through every merge.

A double is an integer times a power of two, so a sum of doubles is one too: ``ExactSum``
holds it as ``n * 2**e`` with Python's unbounded integers. It travels and is stored as
its *expansion*: the correctly rounded float (the ``sum`` everybody reads) followed by the
rest, floats that add up exactly to what rounding left out (usually none or one). Any
number of expansions added with ``math.fsum`` gives the correctly rounded total of all
their samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

# An expansion never needs more floats than this (2,098 bits of range over 53 each).
MAX_TERMS = 40


class ExactSum:
    __slots__ = ("e", "n")

    def __init__(self, n: int = 0, e: int = 0) -> None:
        self.n = n
        self.e = e

    @classmethod
    def of_floats(cls, values: Iterable[float]) -> ExactSum:
        total = cls()
        for value in values:
            total.add_float(value)
        return total

    @classmethod
    def of_array(cls, values: npt.NDArray[np.float64]) -> ExactSum:
        """The exact sum of a sample array: mantissas summed per exponent in numpy, the
        few per-exponent sums combined as Python integers."""
        values = np.asarray(values, dtype=np.float64)
        values = values[values != 0.0]
        if not len(values):
            return cls()
        fractions, exponents = np.frexp(values)
        mantissas = (fractions * 9007199254740992.0).astype(np.int64)  # * 2**53: exact
        exponents = exponents.astype(np.int64) - 53
        order = np.argsort(exponents, kind="stable")
        exponents, mantissas = exponents[order], mantissas[order]
        starts = np.flatnonzero(np.concatenate(([True], exponents[1:] != exponents[:-1])))
        # Summed as two 27-bit halves, so that no int64 overflows below 2**35 samples.
        high = np.add.reduceat(mantissas >> 26, starts)
        low = np.add.reduceat(mantissas & ((1 << 26) - 1), starts)
        lowest = int(exponents[0])
        n = 0
        for exponent, hi, lo in zip(exponents[starts].tolist(), high.tolist(), low.tolist(),
                                    strict=True):
            n += ((hi << 26) + lo) << (exponent - lowest)
        return cls(n, lowest)

    @classmethod
    def of_expansion(cls, terms: Iterable[float]) -> ExactSum:
        return cls.of_floats(terms)

    def add_float(self, value: float) -> None:
        if value == 0.0:
            return
        numerator, denominator = value.as_integer_ratio()
        self._add(numerator, 1 - denominator.bit_length())

    def add(self, other: ExactSum) -> None:
        if other.n:
            self._add(other.n, other.e)

    def _add(self, n: int, e: int) -> None:
        if not self.n:
            self.n, self.e = n, e
        elif e >= self.e:
            self.n += n << (e - self.e)
        else:
            self.n = (self.n << (self.e - e)) + n
            self.e = e

    def value(self) -> float:
        """The correctly rounded float (round half to even; beyond the largest double,
        plus or minus infinity)."""
        try:
            if self.e >= 0:
                return float(self.n << self.e)
            return self.n / (1 << -self.e)
        except OverflowError:
            return math.inf if self.n > 0 else -math.inf

    def expansion(self) -> list[float]:
        """[correctly rounded value, rest...]: floats whose exact sum is this sum."""
        terms: list[float] = []
        rest = ExactSum(self.n, self.e)
        while rest.n and len(terms) < MAX_TERMS:
            term = rest.value()
            if not math.isfinite(term):
                break
            terms.append(term)
            rest.add_float(-term)
        return terms or [0.0]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExactSum):
            return NotImplemented
        return self.expansion() == other.expansion()

    def __repr__(self) -> str:
        return f"ExactSum({self.expansion()!r})"


def expansion_of(values: npt.NDArray[np.float64]) -> list[float]:
    """The expansion of a sample array's exact sum: ``[fsum, rest...]``.

    Small arrays by repeated ``math.fsum`` (each term is the correctly rounded value of
    what the terms before it leave), large ones through ``ExactSum.of_array``.
    """
    if len(values) > 512:
        return ExactSum.of_array(values).expansion()
    listed = values.tolist() if isinstance(values, np.ndarray) else list(values)
    terms = [math.fsum(listed)]
    if not math.isfinite(terms[0]):
        return ExactSum.of_array(np.asarray(values, dtype=np.float64)).expansion()
    while len(terms) < MAX_TERMS:
        rest = math.fsum(listed + [-t for t in terms])
        if rest == 0.0:
            break
        terms.append(rest)
    return terms
