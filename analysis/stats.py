"""Quantiles of float arrays (NaNs dropped, None for no data) and their
percentile-bootstrap CIs, vectorised: the statistics of summary figures and
run-to-run comparisons."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOT_SAMPLES = 1000
# resamples where each side has a handful of values (nights, lab repetitions):
# cheap at that size, and the CI's ends move less from seed to seed
FEW_VALUES_SAMPLES = 4000


def quantile(x: np.ndarray, q: float) -> float | None:
    return quantiles(x, (q,))[0]


def quantiles(x: np.ndarray, qs: Sequence[float] = (.5, .99)) -> list[float | None]:
    """Several quantiles from one partition pass; None for no data."""
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    if nan.any():
        x = x[~nan]
    if not len(x):
        return [None] * len(qs)
    return [float(v) for v in np.quantile(x, list(qs))]


def median_in_place(x: np.ndarray) -> float | None:
    """quantile(x, .5) of an array of the caller's own (a fresh selection),
    partitioned where it is instead of in another copy."""
    nan = np.isnan(x)
    if nan.any():
        x = x[~nan]
    return float(np.quantile(x, [.5], overwrite_input=True)[0]) if len(x) else None


def resampled_quantiles(x: np.ndarray, q: float, samples: int,
                         rng: np.random.Generator) -> np.ndarray | None:
    """``samples`` bootstrap replicates of the q-quantile of x (NaNs dropped),
    drawn exactly without building the resamples.

    numpy's (linear) q-quantile of a resample interpolates between its order
    statistics k and k+1 (k = floor(q (n-1))).  A resample is n draws
    s[floor(n U_i)] from the sorted data s with U_i uniform on (0, 1), and
    floor is monotone, so those order statistics are s[floor(n U_(k+1))] and
    s[floor(n U_(k+2))]: U_(k+1) ~ Beta(k+1, n-k), and the next one is
    U_(k+1) + (1 - U_(k+1)) B with B ~ Beta(1, n-k-1), the least of the
    n-k-1 uniforms above it.  One sort and two Beta draws per replicate
    instead of n draws and a partition: the same distribution, at any n
    (it once resampled a 20,000-point subsample, and took 28 s of a lab
    report's 62)."""
    x = np.asarray(x, dtype=np.float64)
    s = np.sort(x[~np.isnan(x)])
    n = len(s)
    if n < 2:
        return None
    h = q * (n - 1)
    k = int(np.floor(h))
    g = h - k
    u = rng.beta(k + 1, n - k, samples)
    lo = s[np.minimum((u * n).astype(np.int64), n - 1)]
    if g == 0 or k + 1 >= n:
        return lo
    u2 = u + (1 - u) * rng.beta(1, n - k - 1, samples)
    hi = s[np.minimum((u2 * n).astype(np.int64), n - 1)]
    return lo + g * (hi - lo)


def bootstrap_ci(x: np.ndarray, q: float = 0.5, *, samples: int = BOOT_SAMPLES,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile-bootstrap CI of the q-quantile of x (vectorised)."""
    stats = resampled_quantiles(x, q, samples, np.random.default_rng(seed))
    if stats is None:
        return None
    a = (1 - level) / 2
    return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


def bootstrap_diff_ci(x: np.ndarray, y: np.ndarray, q: float = 0.5, *,
                      samples: int = BOOT_SAMPLES, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float] | None:
    """CI of quantile(y) - quantile(x) from independent resamples."""
    rng = np.random.default_rng(seed)
    sx = resampled_quantiles(x, q, samples, rng)
    sy = resampled_quantiles(y, q, samples, rng) if sx is not None else None
    if sx is None or sy is None:
        return None
    d = sy - sx
    a = (1 - level) / 2
    return float(np.quantile(d, a)), float(np.quantile(d, 1 - a))
