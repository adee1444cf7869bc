"""Summary figures and tables: per run, per fault class, per change type and
workload action, and run-to-run comparisons with bootstrap CIs."""

from __future__ import annotations

import copy
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from recording import manifest
from recording.errors import RecordingError
from recording.schema import hist_quantile

from .epochs import (
    CAUSED,
    CLASSES,
    FAST,
    SLOW,
    Correlation,
    RunSource,
    class_codes,
    correlate_runs,
    finished,
)
from .forecast import forecast_of, wrap_forecast
from .frames import Recording, has_trace_events, one_line_errors, run_span_ns
from .joins import rows_of
from .latency import LatencyFigures, latency_figures
from .stats import (
    BOOT_SAMPLES,
    median_in_place,
    quantiles,
)
from .wrap import invariant_figure, wraps_of

SLOW_CODES = [CLASSES.index(c) for c in SLOW]
# Classes an aggregated run (mmio_hist) can tell without per-fault timing:
# "remarked" is first_touch, during_update or after_zap, which need the
# fault's time against updates and zap-alls.
HIST_CLASSES = ("fast", "vcpu_cache", "stale", "remarked", "unknown")
HIST_FAST = ("fast", "vcpu_cache")
def _clean(v: Any) -> Any:
    """JSON-safe: numpy scalars -> Python, NaN -> None."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if v is pd.NA or v is None:
        return None
    if isinstance(v, np.bool_ | bool):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return None if math.isnan(v) else float(v)
    return v


def lost_events(rec: Recording, run: str) -> dict[str, int]:
    """Lost events per event type: the larger of the lost table and the manifest."""
    lost = rec.lost[rec.lost["run"] == run]
    table = lost.groupby(lost["event"].astype(str))["count"].sum() if len(lost) else {}
    out = {str(k): int(v) for k, v in dict(table).items()}
    for k, v in manifest.lost(rec.manifests[run]).items():
        out[k] = max(out.get(k, 0), v)
    return out


def missing(rec: Recording, run: str) -> list[str]:
    """What the run lacks and why, one line each (for reports and the CLI)."""
    m = rec.manifests[run]
    backend = manifest.backend(m) or "unknown backend"
    n = {e: len(rows_of(df, run)) for e, df in rec.frames.items()}
    out: list[str] = []
    if not manifest.complete(m):
        out.append("recording not finalized (live, crashed or killed): "
                   "read up to its last flush")
    if not has_trace_events(rec, run):
        out.append("empty run: no trace events recorded")
        return out + list(rec.problems.get(run, []))
    if not n["memslot_update"]:
        out.append("no memslot_update events: nothing to attribute MMIO costs to")
    why = ("kvm.mmio_caching=N: KVM keeps no MMIO SPTEs" if manifest.mmio_caching_off(m) else
           f"{backend}: the MMIO SPTE tracepoints did not fire or are absent")
    if not n["mmio_fault"] and n["mmio_hist"]:
        out.append("aggregate mode: MMIO faults counted in kernel histograms; latency "
                   "quantiles within a log2 bucket, per-update and zap-all cost unavailable")
    elif not n["mmio_fault"]:
        what = "; kvm_mmio accesses counted instead" if n["mmio_access"] else ""
        out.append(f"no mmio_fault events ({why}): fault classes, MMIO latency "
                   f"and per-update cost unavailable{what}")
    else:
        f = rows_of(rec.mmio_fault, run)
        ev = (f["fast_hit"].fillna(False) | f["stale"].fillna(False) |
              f["remarked"].fillna(False)).to_numpy(dtype=bool)
        if not ev.any():
            out.append(f"MMIO faults carry no SPTE evidence ({why}): latencies are as "
                       "recorded, fault classes and per-update cost unavailable")
        elif not f["fast_hit"].fillna(False).any():
            out.append("no fast-path MMIO hits: no per-vCPU baseline, extra latency unknown")
    if not n["generation"]:
        u = rows_of(rec.memslot_update, run)
        known = u["gen_after"].notna().any() and (u["gen_after"].fillna(0) > 0).any()
        out.append("no generation events: generations " +
                   ("taken from memslot updates" if known else
                    "unknown (steps show the update count)"))
    if not n["workload"]:
        out.append("no workload table: updates not matched to rig actions")
    # The tracer's own list, each item once.
    for text in dict.fromkeys(manifest.missing_data(m)):
        out.append(f"tracer reports missing: {text}")
    out += list(rec.problems.get(run, []))
    return out


def _np_float(s: pd.Series) -> np.ndarray:
    return s.to_numpy(np.float64, na_value=np.nan)


def _us(v: float | None) -> float | None:
    return None if v is None else v / 1000


def latency_figures_of(corr: Correlation, run: str) -> LatencyFigures | None:
    """Latency quantiles and CDF points of one run's fault classes, from one
    sort (analysis/latency.py); once per Correlation.  None when latencies
    are missing (NA) or out of range: callers go class by class."""
    memo = corr.__dict__.setdefault("_latency", {})
    if run not in memo:
        f = rows_of(corr.faults, run)
        lat = f["latency_ns"]
        memo[run] = None if lat.hasnans else latency_figures(
            class_codes(f), lat.to_numpy(np.int64), len(CLASSES))
    return memo[run]


def run_summary(corr: Correlation, run: str) -> dict[str, Any]:
    """The figures of one run (flat keys for the lab job, nested details);
    computed once per Correlation (the lab job and the report both ask), a
    fresh copy each call."""
    memo = corr.__dict__.setdefault("_summaries", {})
    if run not in memo:
        memo[run] = _run_summary(corr, run)
    return copy.deepcopy(memo[run])


def _run_summary(corr: Correlation, run: str) -> dict[str, Any]:
    rec = corr.recording
    m = rec.manifests[run]
    upd = rows_of(corr.updates, run)
    f = rows_of(corr.faults, run)
    kc = class_codes(f)
    counts = np.bincount(kc, minlength=len(CLASSES))
    nf = len(f)
    # Shares count only faults with MMIO SPTE evidence (classified).
    n_known = int(nf - counts[CLASSES.index("unknown")])
    n_slow = int(n_known - sum(counts[CLASSES.index(c)] for c in FAST))
    n_caused = int(sum(counts[CLASSES.index(c)] for c in CAUSED))
    ok = upd[upd["ok"]]
    cost = _np_float(ok["cost_ns"])
    lost = lost_events(rec, run)
    zaps = rows_of(corr.zaps, run)
    fc = forecast_of(corr)
    fc = fc[fc["run"] == run] if len(fc) else fc
    wraps = rows_of(wraps_of(corr), run)
    by_class = {c: {k: v[k] for k in ("n", "share", "latency_p50_ns", "latency_p99_ns")}
                for c, v in class_stats(corr, run).items()}
    figs = latency_figures_of(corr, run)
    cost_q = quantiles(cost)
    lat_q = figs.overall if figs is not None else quantiles(_np_float(f["latency_ns"]))
    all_hist = rows_of(rec.mmio_hist, run)
    hist = finished(all_hist)
    # A vCPU thread's last exit, cut short by the thread exiting: counted only.
    unfinished = (len(rows_of(rec.mmio_fault, run)) - nf
                  + int(all_hist["count"].sum() - hist["count"].sum()))
    from_hist = not nf and len(hist) > 0
    if from_hist:  # aggregate mode: the same figures from the histograms
        nf = int(hist["count"].sum())
        n_known = nf - by_class.get("unknown", {}).get("n", 0)
        n_slow = n_known - sum(by_class.get(c, {}).get("n", 0) for c in HIST_FAST)
        lat_q = [hist_quantile(hist["log2_ns"], hist["count"], q) for q in (.5, .99)]
    host = manifest.host(m)
    out = {
        "run": run, "path": str(rec.paths[run]), "backend": manifest.backend(m),
        "hostname": host.get("hostname"), "kernel": host.get("kernel"),
        "complete": manifest.complete(m), "duration_s": run_span_ns(rec, run) / 1e9,
        "memslot_updates": len(upd), "failed_updates": int((~upd["ok"]).sum()),
        "updates_by_change": {str(k): int(v) for k, v in
                              upd["change"].value_counts().items() if v},
        "mmio_faults": nf, "unfinished_faults": unfinished,
        "mmio_accesses": len(rows_of(rec.mmio_access, run)),
        "slow_faults": n_slow, "caused_faults": None if from_hist else n_caused,
        "classified_faults": n_known,
        "slow_share": n_slow / n_known if n_known else None,
        # which update caused a fault needs its time: not in histograms
        "caused_share": n_caused / n_known if n_known and not from_hist else None,
        "mmio_from": "histograms (log2 buckets)" if from_hist else "rows",
        "classes": by_class,
        "update_cost_p50_ns": cost_q[0], "update_cost_p99_ns": cost_q[1],
        "update_cost_mean_ns": float(np.nanmean(cost)) if np.isfinite(cost).any() else None,
        "mmio_latency_p50_ns": lat_q[0], "mmio_latency_p99_ns": lat_q[1],
        "lost_events": sum(lost.values()), "lost": lost,
        "zap_alls": len(zaps), "zap_all_wraps": int(zaps["wrap"].sum()) if len(zaps) else 0,
        "zap_all_cost_ns": (float(zaps["cost_ns"].sum()) if zaps["cost_ns"].notna().any()
                            else None) if len(zaps) else 0.0,
        "forecast": fc.drop(columns=["run"]).to_dict("records") if len(fc) else [],
        # Per generation wrap: its zap-all and the invariant it keeps
        # (analysis/wrap.py); the lab's exit status reads wrap_invariant.
        "wraps": wraps.drop(columns=["run"]).to_dict("records") if len(wraps) else [],
        "wrap_invariant": invariant_figure(wraps),
        "missing": missing(rec, run),
    }
    return _clean(out)


def summarize(src: str | os.PathLike[str] | Recording | Correlation) -> dict[str, Any]:
    """One run's summary dict (JSON-safe).  ``src``: a run dir, or a loaded
    Recording/Correlation of a single run."""
    with one_line_errors(str(src) if isinstance(src, str | os.PathLike) else "summarize"):
        corr = correlate_runs(src)
        runs = corr.recording.runs
        if len(runs) != 1:
            raise RecordingError(f"summarize takes one run, got {len(runs)}; "
                                 "use summarize_all")
        return run_summary(corr, runs[0])


def summarize_all(src: RunSource) -> list[dict[str, Any]]:
    """One summary dict per run of ``src`` (run dirs, a Recording or a Correlation)."""
    corr = correlate_runs(src)
    return [run_summary(corr, r) for r in corr.recording.runs]


def hist_classes(h: pd.DataFrame) -> np.ndarray:
    """HIST_CLASSES index per mmio_hist row, by the same evidence rules as
    per-fault classification (epochs.correlate)."""
    fast, stale = h["fast_hit"].to_numpy(bool), h["stale"].to_numpy(bool)
    remarked = h["remarked"].to_numpy(bool)
    evidence = (fast | stale | remarked | h["checked"].to_numpy(bool)).any()
    k = np.full(len(h), HIST_CLASSES.index("vcpu_cache" if evidence else "unknown"))
    k[remarked] = HIST_CLASSES.index("remarked")
    k[stale] = HIST_CLASSES.index("stale")
    k[fast] = HIST_CLASSES.index("fast")
    return k


def _hist_class_stats(h: pd.DataFrame) -> dict[str, dict[str, Any]]:
    k = hist_classes(h)
    n_all = int(h["count"].sum())
    out = {}
    for i, c in enumerate(HIST_CLASSES):
        sel = h[k == i]
        n = int(sel["count"].sum())
        if n:
            out[c] = {"n": n, "share": n / n_all,
                      "latency_p50_ns": hist_quantile(sel["log2_ns"], sel["count"], .5),
                      "latency_p99_ns": hist_quantile(sel["log2_ns"], sel["count"], .99),
                      "extra_p50_ns": None}
    return out


def class_stats(corr: Correlation, run: str) -> dict[str, dict[str, Any]]:
    """Per fault class of one run: n, share, latency p50/p99 and extra p50
    (ns); computed once per Correlation (reports ask for it twice).  An
    aggregated run's classes come from its histograms (HIST_CLASSES,
    latencies within the 2x of a log2 bucket, no extra latency)."""
    memo = corr.__dict__.setdefault("_class_stats", {})
    if run not in memo:
        f = rows_of(corr.faults, run)
        h = finished(rows_of(corr.recording.mmio_hist, run))
        if not len(f) and len(h):
            memo[run] = _hist_class_stats(h)
            return memo[run]
        kc = class_codes(f)
        extra = f["extra_ns"].to_numpy(np.float64)
        counts = np.bincount(kc, minlength=len(CLASSES))
        # The latency sort on one thread, the extra latencies' selections on
        # this one (numpy releases the GIL in both).
        with ThreadPoolExecutor(1) as pool:
            latency = pool.submit(latency_figures_of, corr, run)
            extra_p50 = {i: median_in_place(extra[kc == i]) for i, n in enumerate(counts) if n}
            figs = latency.result()
        out = {}
        for i, (c, n) in enumerate(zip(CLASSES, counts, strict=True)):
            if n:
                p50, p99 = figs.quantiles[i] if figs is not None else \
                    quantiles(_np_float(f["latency_ns"])[kc == i])
                out[c] = {"n": int(n), "share": int(n) / len(f), "latency_p50_ns": p50,
                          "latency_p99_ns": p99, "extra_p50_ns": extra_p50[i]}
        memo[run] = out
    return memo[run]


def class_table(corr: Correlation) -> pd.DataFrame:
    """Per run and fault class: count, share, latency p50/p99 and extra p50 (us)."""
    rows = [{"run": run, "class": c, "n": v["n"], "share": v["share"],
             "p50_us": v["latency_p50_ns"] / 1e3, "p99_us": v["latency_p99_ns"] / 1e3,
             "extra_p50_us": _us(v["extra_p50_ns"])}
            for run in corr.recording.runs for c, v in class_stats(corr, run).items()]
    return pd.DataFrame(rows, columns=["run", "class", "n", "share", "p50_us", "p99_us",
                                       "extra_p50_us"])


def cost_table(corr: Correlation, by: str = "change") -> pd.DataFrame:
    """Per run and change type (or workload ``action``): updates, faults
    charged, and the per-update extra MMIO latency p50/p99 (us)."""
    u = corr.updates[corr.updates["ok"]]
    cols = ["run", by, "updates", "slow_faults", "faults_per_update", "cost_p50_us",
            "cost_p99_us", "cost_total_us", "duration_p50_us", "duration_p99_us"]
    if not len(u):
        return pd.DataFrame(columns=cols)
    g = u.groupby(["run", by], observed=True)
    t = pd.DataFrame({"updates": g.size(), "slow_faults": g["n_slow"].sum(min_count=1)})
    t["faults_per_update"] = t["slow_faults"] / t["updates"]
    q = g["cost_ns"].quantile([.5, .99]).unstack()
    t["cost_p50_us"] = q[.5] / 1000
    t["cost_p99_us"] = q[.99] / 1000
    t["cost_total_us"] = g["cost_ns"].sum(min_count=1) / 1000
    d = g["duration_ns"].quantile([.5, .99]).unstack()
    t["duration_p50_us"] = d[.5] / 1000
    t["duration_p99_us"] = d[.99] / 1000
    return t.reset_index()[cols]


def compare(src: RunSource, *, samples: int = BOOT_SAMPLES) -> pd.DataFrame:
    """Runs side by side: per-update cost and MMIO latency medians and p99
    with 95% bootstrap CIs, and the median's change vs the first run that
    has the metric.  Reduced run by run (analysis/reduce.py), as the Dask
    workers reduce them."""
    from .reduce import comparison
    return comparison(src, samples=samples)


def summary_tables(corr: Correlation) -> dict[str, pd.DataFrame]:
    """Every table the report shows, by name."""
    return {"classes": class_table(corr), "cost_by_change": cost_table(corr, "change"),
            "cost_by_action": cost_table(corr, "action"), "forecast": wrap_forecast(corr),
            "zap_alls": corr.zaps, "wraps": wraps_of(corr)}
