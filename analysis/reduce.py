"""What users get from many runs, reduced run by run: each run's summary
(with its cost per change type and its generation wraps' verdicts) and its
rows of the run comparison.  The same functions serve one process
(``analyze``) and the Dask workers (``cluster.analyze_cluster``), which then
send the client a few kB per run instead of the run's frames.

Every figure here looks at one run's rows only, with two exceptions in the
comparison: a run's position among all runs seeds its bootstraps, and the
median's change is taken against the reference run (the first that has the
metric).  So the reduction has two steps: ``run_figures`` (all but the
changes; each run's metric values kept beside its figures) and, once the
references are known from the runs' counts, ``add_deltas``.

    an = analyze(["runs/a", "runs/b"])   # an.summaries, an.comparison
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .epochs import Correlation, RunSource, class_codes, correlate_runs
from .joins import rows_of
from .stats import BOOT_SAMPLES, bootstrap_ci, bootstrap_diff_ci, quantile
from .summary import SLOW_CODES, _clean, _np_float, _us, cost_table, run_summary

METRICS = ("update_cost", "mmio_latency", "slow_latency")


@dataclass
class RunFigures:
    """One run reduced.  ``values``: its metric values without NaNs, which
    the later runs' changes need when it is a reference; the part sent to
    the client leaves them off (None)."""

    index: int  # the run's position among all runs: its bootstraps' seed
    run: str
    summary: dict[str, Any] | None
    comparison: list[dict[str, Any]]
    # The run's memslot_update rows: the id its first update has in the
    # Correlation it was reduced from, and how many.  Update ids are row
    # numbers over all runs, so a worker's part renumbers them (``assemble``).
    first_update: int
    updates: int
    values: dict[str, np.ndarray] | None = field(default=None, repr=False)


@dataclass
class Analysis:
    """The runs' summaries (``run_summary`` plus ``cost_by_change``) and,
    with more than one run, their comparison (the frame ``compare`` returns)."""

    summaries: list[dict[str, Any]]
    comparison: pd.DataFrame | None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"runs": self.summaries}
        if self.comparison is not None:
            doc["comparison"] = _clean(self.comparison.to_dict("records"))
        return doc


def metric_values(corr: Correlation, run: str) -> dict[str, np.ndarray]:
    """The values each comparison metric is taken over, NaNs dropped."""
    u = rows_of(corr.updates, run)
    f = rows_of(corr.faults, run)
    lat = _np_float(f["latency_ns"])
    data = {"update_cost": _np_float(u.loc[u["ok"], "cost_ns"]), "mmio_latency": lat,
            "slow_latency": lat[np.isin(class_codes(f), SLOW_CODES)]}
    return {m: x[~np.isnan(x)] for m, x in data.items()}


def _ci_us(ci: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if ci is None else (ci[0] / 1e3, ci[1] / 1e3)


def compare_rows(run: str, index: int, values: dict[str, np.ndarray],
                 samples: int) -> list[dict[str, Any]]:
    """One comparison row per metric: n, p50 and p99 with bootstrap CIs;
    the change columns None until ``add_deltas``."""
    rows = []
    for metric in METRICS:
        x = values[metric]
        row: dict[str, Any] = {"run": run, "metric": metric, "n": len(x)}
        for q, name in ((.5, "p50"), (.99, "p99")):
            row[f"{name}_us"] = _us(quantile(x, q))
            row[f"{name}_ci_us"] = _ci_us(bootstrap_ci(x, q, samples=samples, seed=index))
        row["p50_delta_us"] = row["p50_delta_ci_us"] = None
        rows.append(row)
    return rows


def run_figures(corr: Correlation, offset: int = 0, *, summaries: bool = True,
                comparison: bool = True,
                samples: int = BOOT_SAMPLES) -> list[RunFigures]:
    """Each run of ``corr`` reduced; ``offset``: the position of its first
    run among all runs (a worker's part starts past the parts before it)."""
    costs = cost_table(corr, "change") if summaries else None
    runs = corr.recording.runs
    # memslot_update holds the runs one after another (frames.load).
    n_upd = np.bincount(corr.recording.memslot_update["run"].cat.codes.to_numpy(),
                        minlength=len(runs))
    first_upd = np.cumsum(n_upd) - n_upd
    out = []
    for i, run in enumerate(runs, start=offset):
        s = None
        if costs is not None:
            s = run_summary(corr, run)
            s["cost_by_change"] = _clean(costs[costs["run"] == run].drop(columns=["run"])
                                         .to_dict("records"))
        values = metric_values(corr, run) if comparison else None
        rows = compare_rows(run, i, values, samples) if values is not None else []
        out.append(RunFigures(i, run, s, rows, int(first_upd[i - offset]),
                              int(n_upd[i - offset]), values))
    return out


def references(figs: Sequence[RunFigures]) -> dict[str, int]:
    """Per metric, the position of the first run that has it (any value)."""
    refs: dict[str, int] = {}
    for f in figs:
        for row in f.comparison:
            if row["n"] and row["metric"] not in refs:
                refs[row["metric"]] = f.index
    return refs


def reference_values(figs: Sequence[RunFigures],
                     refs: dict[str, int]) -> dict[str, tuple[int, np.ndarray]]:
    """The reference runs' values, from whichever of ``figs`` hold them."""
    out = {}
    for f in figs:
        for metric, i in refs.items():
            if f.index == i and f.values is not None:
                out[metric] = (i, f.values[metric])
    return out


def add_deltas(fig: RunFigures, refs: dict[str, tuple[int, np.ndarray]],
               samples: int = BOOT_SAMPLES) -> list[dict[str, Any]]:
    """The run's comparison rows with the median's change vs the reference
    and its CI, for runs after the metric's reference (None up to it)."""
    for row in fig.comparison:
        ref = refs.get(row["metric"])
        if ref is None or fig.index <= ref[0] or fig.values is None:
            continue
        base = quantile(ref[1], .5)
        row["p50_delta_us"] = (None if base is None or row["p50_us"] is None
                               else row["p50_us"] - base / 1000)
        row["p50_delta_ci_us"] = _ci_us(bootstrap_diff_ci(
            ref[1], fig.values[row["metric"]], .5, samples=samples, seed=fig.index))
    return fig.comparison


def assemble(figs: Sequence[RunFigures], comparison: bool) -> Analysis:
    """The reduced runs, in run order, as one Analysis: update ids (the
    wraps') numbered over all runs, as one Correlation of them numbers them."""
    start = 0
    for f in figs:
        shift = start - f.first_update
        for w in (f.summary or {}).get("wraps", []) if shift else []:
            if w["update"] is not None:
                w["update"] += shift
        start += f.updates
    cmp = pd.DataFrame([r for f in figs for r in f.comparison]) if comparison else None
    return Analysis([f.summary for f in figs if f.summary is not None], cmp)


def analyze(src: RunSource, *, samples: int = BOOT_SAMPLES) -> Analysis:
    """In this process: the summaries and (several runs) the comparison."""
    corr = correlate_runs(src)
    many = len(corr.recording.runs) > 1
    figs = run_figures(corr, comparison=many, samples=samples)
    return _finish(figs, many, samples)


def comparison(src: RunSource, *, samples: int = BOOT_SAMPLES) -> pd.DataFrame:
    """Only the comparison (``summary.compare``), for one run too."""
    figs = run_figures(correlate_runs(src), summaries=False, samples=samples)
    cmp = _finish(figs, True, samples).comparison
    assert cmp is not None
    return cmp


def _finish(figs: list[RunFigures], comparison: bool, samples: int) -> Analysis:
    if comparison:
        refs = reference_values(figs, references(figs))
        for f in figs:
            add_deltas(f, refs, samples)
    return assemble(figs, comparison)
