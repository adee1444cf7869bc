"""Quantiles of float arrays (NaNs dropped, None for no data) and their
percentile-bootstrap CIs, vectorised: the statistics of summary figures and
run-to-run comparisons."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOT_SAMPLES = 1000
BOOT_CAP = 20_000  # resample at most this many points (CIs get wider, never narrower)
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
    """``samples`` bootstrap replicates of the q-quantile of x (NaNs dropped;
    at most BOOT_CAP points; vectorised in chunks of ~4M draws)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return None
    if len(x) > BOOT_CAP:
        x = rng.choice(x, BOOT_CAP, replace=False)
    stats = np.empty(samples)
    chunk = max(1, 4_000_000 // len(x))
    for lo in range(0, samples, chunk):
        n = min(chunk, samples - lo)
        stats[lo:lo + n] = np.quantile(x[rng.integers(0, len(x), (n, len(x)))], q, axis=1)
    return stats


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
