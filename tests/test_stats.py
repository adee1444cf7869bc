"""The bootstrap's replicates against exact enumeration: every resample of a
small sample, each quantile as numpy computes it."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from analysis.stats import bootstrap_ci, resampled_quantiles


@pytest.mark.parametrize("q", [0.25, 0.5, 0.9, 0.99])
def test_replicates_follow_the_exact_resampling_distribution(q: float) -> None:
    x = np.array([3.0, 1.0, 10.0, 2.5])  # unsorted on purpose
    exact: Counter[float] = Counter()
    for idx in itertools.product(range(len(x)), repeat=len(x)):  # all 256 resamples
        exact[round(float(np.quantile(x[list(idx)], q)), 9)] += 1
    n = 200_000
    reps = resampled_quantiles(x, q, n, np.random.default_rng(7))
    assert reps is not None and len(reps) == n
    got = Counter(np.round(reps, 9).tolist())
    assert set(got) <= set(exact), set(got) - set(exact)
    for value, count in exact.items():
        # 200k draws: a frequency's sd is < 0.0012; off-by-one Beta
        # parameters move these by more than 0.02
        assert abs(got[value] / n - count / 256) < 0.006, (value, got[value] / n, count / 256)


def test_nans_dropped_and_too_little_data() -> None:
    rng = np.random.default_rng(0)
    assert resampled_quantiles(np.array([np.nan, 1.0]), 0.5, 10, rng) is None
    reps = resampled_quantiles(np.array([np.nan, 1.0, 1.0, 1.0]), 0.5, 10, rng)
    assert reps is not None and (reps == 1.0).all()
    lo, hi = bootstrap_ci(np.random.default_rng(1).normal(5, 1, 100_000), 0.5)
    assert lo < 5 < hi and hi - lo < 0.05
