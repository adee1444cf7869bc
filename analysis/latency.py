"""MMIO latency order statistics of a correlated run, from one sort.

A summary asks for the latency p50/p99 of every fault class and of all
faults, and the report draws each class's latency CDF: on 10M faults a
partition (np.quantile) per question, and a sample per curve.  Sorting
class << 40 | latency once puts every class's latencies in order, side by
side; each quantile is then two reads, and the CDF points are exact.
The figures equal np.quantile's ("linear" method) exactly: sorted_quantiles
interpolates between the same two order statistics the same way (tested
against np.quantile).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_LOW = 40  # latency bits below the class in the sort key (18 minutes in ns)
CDF_POINTS = 4_000  # a CDF curve is drawn through at most this many quantiles


def _quantile(n: int, q: float, nth: Callable[[int], Any]) -> float:
    """np.quantile's (method "linear") q-quantile of n sorted values, given
    the i-th of them by ``nth``: its steps (virtual index (n - 1) q, clipped
    to the ends) and its lerp, run by np.quantile on the pair itself so that
    the rounding is the same."""
    v = (n - 1) * np.float64(q)
    if v >= n - 1:
        return float(np.float64(nth(n - 1)))
    lo = max(int(np.floor(v)), 0)
    pair = np.array([nth(lo), nth(lo + 1)], dtype=np.float64)
    return float(np.quantile(pair, float(v - lo)))


def sorted_quantiles(s: np.ndarray, qs: Sequence[float]) -> list[float | None]:
    """np.quantile(s, q) (method "linear") of an ascending, NaN-free array,
    from the two order statistics around each q: no copy, no partition.
    None for an empty array."""
    n = len(s)
    return [_quantile(n, q, s.__getitem__) if n else None for q in qs]


def _kth(segments: Sequence[np.ndarray], k: int) -> int:
    """The k-th smallest (0-based) of the union of ascending int arrays: a
    binary search on the value, counting with one searchsorted per array."""
    lo = min(int(s[0]) for s in segments if len(s))
    hi = max(int(s[-1]) for s in segments if len(s))
    while lo < hi:  # the least v with more than k values <= v
        mid = (lo + hi) // 2
        if sum(int(np.searchsorted(s, mid, "right")) for s in segments) > k:
            hi = mid
        else:
            lo = mid + 1
    return lo


def union_quantiles(segments: Sequence[np.ndarray], qs: Sequence[float]) -> list[float | None]:
    """np.quantile of the union of ascending int arrays (values < 2**53)."""
    n = sum(len(s) for s in segments)
    return [_quantile(n, q, lambda k: _kth(segments, k)) if n else None for q in qs]


def cdf_points(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value, fraction at or below it) of an ascending array: every point
    when few, else CDF_POINTS evenly spaced ranks."""
    n = len(v)
    if n <= CDF_POINTS:
        return v.astype(np.float64), np.arange(1, n + 1) / n
    idx = np.unique(np.linspace(0, n - 1, CDF_POINTS).round().astype(np.int64))
    return v[idx].astype(np.float64), (idx + 1) / n


@dataclass
class LatencyFigures:
    """Latency figures (ns) per fault class code and over all faults."""

    quantiles: dict[int, list[float | None]]  # classes with faults: one per QS
    overall: list[float | None]
    cdf: dict[int, tuple[np.ndarray, np.ndarray]]  # cdf_points of each class


QS = (.5, .99)


def latency_figures(codes: np.ndarray, lat: np.ndarray, nclasses: int) -> LatencyFigures | None:
    """QS quantiles and CDF points per class and overall, from one sort of
    code << 40 | latency; None when a latency is negative or too large to
    pack (the caller then goes class by class)."""
    if len(lat) and (lat.min() < 0 or lat.max() >= 1 << _LOW):
        return None
    key = codes.astype(np.int64)
    key <<= _LOW
    key |= lat
    key.sort()
    key &= (1 << _LOW) - 1  # the latencies, in order within each class
    ends = np.cumsum(np.bincount(codes, minlength=nclasses))
    segs = {c: key[a:b] for c, (a, b) in enumerate(zip(np.r_[0, ends[:-1]], ends, strict=True))
            if b > a}
    return LatencyFigures({c: sorted_quantiles(v, QS) for c, v in segs.items()},
                          union_quantiles(list(segs.values()), QS),
                          {c: cdf_points(v) for c, v in segs.items()})
