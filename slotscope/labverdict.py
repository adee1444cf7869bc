"""summary.json across scenarios and the regression verdict against a baseline."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.stats import FEW_VALUES_SAMPLES, bootstrap_diff_ci

from .labconfig import ConfigError, Thresholds

EXIT_OK, EXIT_FAILED, EXIT_REGRESSION = 0, 1, 3

# The per-run figures a scenario summary aggregates (medians over repetitions;
# counts are summed).
FIGURES = ("slow_share", "update_cost_p50_ns", "update_cost_p99_ns",
           "mmio_latency_p50_ns", "mmio_latency_p99_ns")
COUNTS = ("memslot_updates", "mmio_faults", "unfinished_faults", "slow_faults", "lost_events")


def wrap_failures(runs: list[dict[str, Any]], expect_wraps: int) -> list[str]:
    """Runs whose generation wraps fail the job: a violated invariant
    (analysis/wrap.py) in any scenario, and in one that drives wraps
    (``wraps`` in lab.toml), fewer wraps than asked or none with evidence."""
    out = []
    for r in runs:
        wraps = r.get("wraps") or []
        verdict = r.get("wrap_invariant", "none")
        if verdict == "violated":
            bad = next(w for w in wraps if w["violations"])
            out.append(f"{r['path']}: wrap invariant {bad['verdict']}")
        elif expect_wraps and (len(wraps) < expect_wraps or verdict != "held"):
            out.append(f"{r['path']}: {len(wraps)} of {expect_wraps} wraps recorded, "
                       f"invariant: {verdict}")
    return out


def scenario_summary(runs: list[dict[str, Any]], failed: list[str],
                     expect_wraps: int = 0) -> dict[str, Any]:
    """Combine the per-run summaries of one scenario's repetitions."""
    failed = failed + wrap_failures(runs, expect_wraps)
    out: dict[str, Any] = {"runs": len(runs), "failed_runs": failed, "ok": not failed}
    for key in COUNTS:
        out[key] = sum(int(r.get(key) or 0) for r in runs)
    for key in FIGURES:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    backends = sorted({str(r.get("backend")) for r in runs if r.get("backend")})
    out["backend"] = ",".join(backends) or None
    out["missing"] = sorted({m for r in runs for m in r.get("missing", [])})
    verdicts = [str(w["verdict"]) for r in runs for w in r.get("wraps") or []]
    out["wraps"] = len(verdicts)
    out["wrap_verdicts"] = verdicts
    figures = {r.get("wrap_invariant", "none") for r in runs}
    out["wrap_invariant"] = next((f for f in ("violated", "no evidence", "held")
                                  if f in figures), "none")
    return out


@dataclass
class Regression:
    scenario: str
    figure: str
    baseline: float
    current: float
    limit: float
    # 95% bootstrap CI of current - baseline over the repetitions, where
    # both nights ran the scenario at least twice
    ci: tuple[float, float] | None = None

    def __str__(self) -> str:
        ci = (f"; change {self.current - self.baseline:+.3g}, 95% CI "
              f"[{self.ci[0]:+.3g}, {self.ci[1]:+.3g}] over runs" if self.ci else "")
        return (f"{self.scenario}: {self.figure} {self.current:g} vs baseline "
                f"{self.baseline:g} (limit {self.limit:g}{ci})")


def load_baseline(path: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"baseline {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"baseline {path}: not JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("scenarios"), dict):
        raise ConfigError(f"baseline {path}: no 'scenarios' object; not a lab summary.json")
    return doc


def compare(summary: dict[str, Any], baseline: dict[str, Any],
            t: Thresholds) -> list[Regression]:
    """Regressions of ``summary`` against ``baseline``; only scenarios both ran."""
    limits = (  # figure, limit from the baseline value
        ("slow_share", lambda b: b + t.slow_share_increase),
        ("update_cost_p50_ns", lambda b: b * t.update_cost_p50_ratio),
        ("mmio_latency_p99_ns", lambda b: b * t.mmio_latency_p99_ratio),
        ("lost_events", lambda b: t.lost_events),
    )
    out = []
    for name, cur in summary["scenarios"].items():
        base = baseline["scenarios"].get(name)
        if base is None or not cur.get("ok"):
            continue
        for figure, limit_of in limits:
            b, c = base.get(figure), cur.get(figure)
            if b is None or c is None:
                continue
            limit = limit_of(b)
            if c > limit:
                out.append(Regression(name, figure, float(b), float(c), float(limit),
                                      _runs_ci(base, cur, figure)))
    return out


def _runs_ci(base: dict[str, Any], cur: dict[str, Any],
             figure: str) -> tuple[float, float] | None:
    a, b = (np.array([float(r[figure]) for r in sc.get("run_summaries") or []
                      if r.get(figure) is not None]) for sc in (base, cur))
    return bootstrap_diff_ci(a, b, samples=FEW_VALUES_SAMPLES)


def exit_code(summary: dict[str, Any], regressions: list[Regression]) -> int:
    if any(not s.get("ok") for s in summary["scenarios"].values()):
        return EXIT_FAILED
    return EXIT_REGRESSION if regressions else EXIT_OK


# -- kernel against kernel ------------------------------------------------------
def kernel_comparison(scenarios: dict[str, dict[str, Any]],
                      confidence: float = 0.95) -> dict[str, Any]:
    """Each scenario's figures per kernel, side by side, in run order: the
    first kernel is the reference.  Per scenario and figure: ``per_kernel``
    maps each kernel to its median over repetitions and run count;
    ``vs_ref`` maps every other kernel to the difference of the medians
    with a bootstrap CI over runs and whether it excludes zero.  With fewer
    than 2 runs a side: no entry in ``vs_ref``."""
    kernels: list[str] = []
    by: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for sc in scenarios.values():
        k, name = str(sc.get("kernel")), str(sc.get("scenario"))
        if k not in kernels:
            kernels.append(k)
        by.setdefault(name, {})[k] = sc.get("run_summaries") or []
    out: dict[str, Any] = {"kernels": kernels, "confidence": confidence, "scenarios": {}}
    if len(kernels) < 2:
        return out
    ref = kernels[0]
    for name, per in by.items():
        rows = {}
        for fig in FIGURES:
            vals = {k: [float(r[fig]) for r in runs if r.get(fig) is not None]
                    for k, runs in per.items()}
            row: dict[str, Any] = {
                "per_kernel": {k: {"median": statistics.median(v) if v else None,
                                   "runs": len(v)} for k, v in vals.items()},
                "vs_ref": {}}
            for k in kernels[1:]:
                a, b = vals.get(ref, []), vals.get(k, [])
                ci = bootstrap_diff_ci(np.array(a), np.array(b), samples=FEW_VALUES_SAMPLES,
                                       level=confidence)
                if ci is None:
                    continue
                lo, hi = ci
                d = statistics.median(b) - statistics.median(a)
                verdict = "higher" if lo > 0 else "lower" if hi < 0 else "no difference"
                row["vs_ref"][k] = {"diff": d, "ci": [lo, hi], "verdict": verdict}
            rows[fig] = row
        out["scenarios"][name] = rows
    return out


def kernel_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The kernel comparison as rows (scenario, figure, each kernel's median,
    each difference with its CI and verdict): the report's table."""
    cmp = summary.get("kernels") or {}
    kernels = cmp.get("kernels") or []
    out = []
    for name, rows in (cmp.get("scenarios") or {}).items():
        for fig, row in rows.items():
            r: dict[str, Any] = {"scenario": name, "figure": fig}
            r.update({k: (row["per_kernel"].get(k) or {}).get("median") for k in kernels})
            for k, d in row["vs_ref"].items():
                key = f"{k} - {kernels[0]}"
                r[key] = f"{d['diff']:+.4g} [{d['ci'][0]:+.3g}, {d['ci'][1]:+.3g}]"
                r[f"{key}: verdict"] = d["verdict"]
            out.append(r)
    return out


def print_kernels(summary: dict[str, Any]) -> None:
    """The kernel comparison as a table, under 80 columns."""
    cmp = summary.get("kernels") or {}
    kernels = cmp.get("kernels") or []
    if len(kernels) < 2:
        return
    print(f"kernels: {' vs '.join(kernels)}")
    print(f"  median over runs per kernel; the others against the first, with a "
          f"{cmp['confidence']:.0%}")
    print("  bootstrap CI of the difference over runs (same: it holds zero)")
    for name, rows in cmp["scenarios"].items():
        print(f"  {name}")
        for fig, row in rows.items():
            meds = " ".join(_fmt((row["per_kernel"].get(k) or {}).get("median"))
                            for k in kernels)
            diffs = "; ".join(f"{_VERDICT[d['verdict']]} [{d['ci'][0]:+.2g}, "
                              f"{d['ci'][1]:+.2g}]" for d in row["vs_ref"].values())
            print(f"    {fig:20}{meds} {diffs}")


_VERDICT = {"higher": "higher", "lower": "lower", "no difference": "same"}


def _fmt(v: float | None) -> str:
    return f"{v:>9.3g}" if v is not None else f"{'-':>9}"
