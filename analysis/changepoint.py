"""Where a nightly series changed level: a rank-based change-point test with
a stated false-alarm rate (numpy only).

The test (Pettitt's, standardised, with a permutation p-value): rank the n
nightly values (ties averaged); for every split t with at least
``min_segment`` nights on each side, the Mann-Whitney statistic of the
nights from t on against those before,

    Z_t = (sum of ranks from t on - (n - t)(n + 1) / 2) / sqrt(t (n - t)(n + 1) / 12),

and the series' statistic is max_t Z_t (``up``: the figure rose), max_t -Z_t
(``down``) or max_t |Z_t| (``both``).  Its p-value is the share of
``permutations`` random orderings of the same values whose statistic is at
least as large, counting the observed order: (1 + k) / (1 + permutations).

False-alarm rate: when nothing changed (the nights are exchangeable: i.i.d.
noise, however skewed or heavy-tailed) P(p <= alpha) <= alpha, exactly, so a
series with no change is flagged with probability at most ``alpha`` over
all the splits it tests (a family-wise rate per series, not per night).
Testing S series (hosts x scenarios x figures) expects at most alpha x S
false alarms.  The change is placed at the split with the largest
statistic, then moved (by at most 5 nights) to the split that best fits
two levels to the values: the first night of the new level.  Rank-based, so a few wild
nights neither hide a change nor fake one; it finds one change per series
(the largest): after a fix and a new regression, look at each part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DIRECTIONS = ("up", "down", "both")


@dataclass(frozen=True)
class Change:
    index: int          # the first night of the new level
    p_value: float
    statistic: float
    before: float       # median of the nights before
    after: float        # median from index on


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    # ties: every member of a run of equal values gets the run's mean rank
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


def _statistics(ranks: np.ndarray, min_segment: int, direction: str) -> np.ndarray:
    """Z_t for each row of ``ranks`` (shape (k, n)), t from min_segment on.
    The ranks from t on sum to n(n+1)/2 minus the first t: one cumsum."""
    n = ranks.shape[-1]
    t = np.arange(min_segment, n - min_segment + 1)
    # The splits are one contiguous stretch: a view of the cumsum, and the
    # formula's steps in place, in its order (the same roundings), instead
    # of a fresh (k, n) array per step.
    z = np.cumsum(ranks, axis=-1)[..., min_segment - 1:n - min_segment]
    np.subtract(n * (n + 1) / 2, z, out=z)
    z -= (n - t) * (n + 1) / 2
    z /= np.sqrt(t * (n - t) * (n + 1) / 12)
    # Not np.negative(z, out=z): numpy 2.4 writes a (k, 1) strided view's
    # unary in-place result to the wrong elements (a single split).
    if direction == "down":
        z *= -1.0
    elif direction == "both":
        z = np.abs(z)
    return z


def _refine(x: np.ndarray, at: int, min_segment: int, reach: int = 5) -> int:
    """The split near ``at`` that fits two levels best (least absolute
    deviation from each side's median).  The standardised statistic's
    maximum can sit a night or two off the true change, e.g. when the last
    night before it is high in its band; the fit on the values does not."""
    lo, hi = max(min_segment, at - reach), min(len(x) - min_segment, at + reach)

    def cost(t: int) -> float:
        a, b = x[:t], x[t:]
        return float(np.abs(a - np.median(a)).sum() + np.abs(b - np.median(b)).sum())

    return min(range(lo, hi + 1), key=lambda t: (cost(t), abs(t - at)))


def detect(values: Sequence[float] | np.ndarray, alpha: float = 0.01, direction: str = "up",
           min_segment: int = 3, permutations: int = 999, seed: int = 0) -> Change | None:
    """The change in ``values`` (in night order) if its p-value is at most
    ``alpha``; None for a quiet series or one too short to split
    (fewer than 2 x min_segment nights)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: one of {', '.join(DIRECTIONS)}")
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2 * min_segment or np.all(x == x[0]):
        return None
    r = _ranks(x)
    z = _statistics(r, min_segment, direction)
    observed = float(z.max())
    at = min_segment + int(z.argmax())
    rng = np.random.default_rng(seed)
    exceed = 0
    # batches keep the permuted matrix near 8 MB whatever n is
    batch = max(1, min(permutations, 1_000_000 // n))
    done = 0
    # Once more orderings beat the observed one than p <= alpha allows, the
    # answer is "no change" whatever the rest say: a quiet series stops early.
    allowed = alpha * (1 + permutations) - 1
    while done < permutations and exceed <= allowed:
        k = min(batch, permutations - done)
        perm = rng.permuted(np.broadcast_to(r, (k, n)), axis=1)
        exceed += int((_statistics(perm, min_segment, direction).max(axis=1)
                       >= observed - 1e-12).sum())
        done += k
    if exceed > allowed:
        return None
    p = (1 + exceed) / (1 + permutations)
    if p > alpha:
        return None
    at = _refine(x, at, min_segment)
    return Change(at, p, observed, float(np.median(x[:at])), float(np.median(x[at:])))
