"""Memslot generations x MMIO faults: epochs, fault classes, per-update cost.

The kernel invalidates MMIO SPTEs lazily: a memslot update bumps the
generation and the next MMIO fault per page finds its SPTE stale and takes
the slow page-fault path.  So each fault is joined (as-of, per run and VM) to
the *epoch* it fell in: the last completed memslot update before it, which is
the update that made it slow.  Back-to-back updates with no MMIO in between
charge their faults to the last of them: removing the earlier ones would not
have saved a single fault, so that is their marginal cost.

Updates of one VM are serialized by the kernel (slots_lock), so their
[begin, end] windows do not overlap within a VM; the joins rely on that.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recording.manifest import address_spaces, gen_bits

from .fault_columns import CLASSES, FaultColumns, _per_run_any, fault_columns
from .frames import Recording, load
from .joins import as_numpy, asof_index, nullable_int, vm_keys
from .timeline import generation_timeline, update_frame

# A fault with no MMIO SPTE evidence (no fast-path hit, no stale check, no
# re-mark) is "vcpu_cache" in a run that has evidence elsewhere: KVM's
# per-vCPU MMIO info cache answered it before any SPTE check (the cache is
# dropped when the generation changes, so it is never stale); in a run with no
# evidence at all (kvm.mmio_caching=N) it is "unknown".  CLASSES (the codes'
# order) lives with the per-fault pass, fault_columns.py.
FAST = ("fast", "vcpu_cache")
# Faults charged to a memslot update (the rest would have happened anyway).
CAUSED = ("stale", "during_update", "after_zap")
SLOW = tuple(c for c in CLASSES if c not in FAST and c != "unknown")


def class_codes(faults: pd.DataFrame) -> np.ndarray:
    """Fault classes as int8 codes into CLASSES (never an object array)."""
    return faults["klass"].cat.codes.to_numpy()


@dataclass
class Correlation:
    """Everything derived from one Recording."""

    updates: pd.DataFrame   # memslot_update + epoch, cost and workload columns
    faults: pd.DataFrame    # mmio_fault + epoch, class and extra latency
    timeline: pd.DataFrame  # generation step function per run and VM
    zaps: pd.DataFrame      # zap_all + cause and cost
    recording: Recording


def finished(df: pd.DataFrame) -> pd.DataFrame:
    """MMIO intervals closed by re-entering the guest (mmio_fault, mmio_hist):
    a vCPU thread's last exit, cut short by the thread exiting, has no whole
    latency and is only counted (``unfinished_faults``)."""
    done = as_numpy(df["reentered"], bool, True)
    return df if done.all() else df[done].reset_index(drop=True)


def correlate(rec: Recording) -> Correlation:
    """Join every MMIO fault to its generation epoch, classify it, and charge
    the slow ones to the memslot update (or zap-all) that caused them."""
    upd = update_frame(rec)
    tl = generation_timeline(rec, upd)
    f = finished(rec.mmio_fault)
    u = upd[upd["ok"].to_numpy()]
    c = fault_columns(f, u, rec.zap_all, len(rec.runs))
    # One frame built around the columns, no copies: assigning 10M-row
    # columns one by one would copy each of them.
    out = pd.DataFrame({
        **{name: f[name] for name in f.columns},
        "klass": pd.Categorical.from_codes(c.klass, categories=list(CLASSES)),
        "epoch_update": nullable_int(c.opener, c.opener < 0),
        "since_update_ns": nullable_int(c.since, c.since < 0),
        # The epoch's full generation (NA where the backend could not read it).
        "epoch_gen": pd.arrays.IntegerArray(c.epoch_gen, c.epoch_gen_na),
        "cause": nullable_int(c.cause, c.cause < 0),
        "zap": nullable_int(c.zap, c.klass != CLASSES.index("after_zap")),
        "baseline_ns": c.baseline, "extra_ns": c.extra}, index=f.index, copy=False)
    runs_known = _runs_known(out, c.klass, len(rec.runs))
    upd = _charge_updates(upd, out, c, runs_known, rec)
    zaps = _zap_costs(rec, u, out, c, runs_known)
    return Correlation(upd, out, tl, zaps, rec)


def _runs_known(faults: pd.DataFrame, klass: np.ndarray, nruns: int) -> np.ndarray:
    """Per run code: whether any of its faults is classified.  Without
    (none recorded, or no SPTE evidence as with kvm.mmio_caching=N) its
    update and zap-all costs are unknown, not 0."""
    return _per_run_any(klass != CLASSES.index("unknown"), as_numpy(faults["run"]), nruns)


RunSource = (str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | Recording
             | Correlation)


def correlate_runs(src: RunSource, *, names: Sequence[str] | None = None) -> Correlation:
    """The one way from run directories to a Correlation (CLI, summary,
    report): a Correlation is returned as it is, never recomputed; a
    Recording is correlated; one or more run directories are loaded first,
    labelled ``names`` (see recording.load)."""
    if isinstance(src, Correlation):
        return src
    if isinstance(src, Recording):
        return correlate(src)
    return correlate(load(src, names=names))


def _per_label(values: np.ndarray, upd: pd.DataFrame,
               weights: np.ndarray | None = None) -> np.ndarray:
    """Sum (count) per update of ``values``, update index labels, -1 none."""
    labels = upd.index.to_numpy()
    size = int(labels.max()) + 2 if len(labels) else 1
    return np.bincount(values + 1, weights, minlength=size)[labels + 1]


def _charge_updates(upd: pd.DataFrame, faults: pd.DataFrame, c: FaultColumns,
                    runs_known: np.ndarray, rec: Recording) -> pd.DataFrame:
    nu = len(upd)
    caused = np.flatnonzero(c.cause >= 0)  # the charged faults, a few in ten
    cause, klass, extra = c.cause[caused], c.klass[caused], c.extra[caused]
    lat = as_numpy(faults["latency_ns"])[caused].astype(np.float64)
    upd["n_slow"] = _per_label(cause, upd).astype(np.int64)
    for name in CAUSED:
        sel = klass == CLASSES.index(name)
        upd[f"n_{name}"] = _per_label(cause[sel], upd).astype(np.int64)
    upd["slow_latency_ns"] = _per_label(cause, upd, lat) if nu else []
    has_extra = ~np.isnan(extra)
    upd["cost_ns"] = _per_label(cause[has_extra], upd, extra[has_extra]) if nu else []
    upd["epoch_faults"] = _per_label(c.opener, upd).astype(np.int64)
    known = runs_known[as_numpy(upd["run"])] if nu else np.zeros(0, bool)
    upd["cost_ns"] = upd["cost_ns"].where(known & upd["ok"].to_numpy(dtype=bool))
    for col in ["n_slow", "slow_latency_ns"] + [f"n_{c}" for c in CAUSED]:
        upd[col] = upd[col].astype("Int64" if col != "slow_latency_ns" else "Float64")
        upd.loc[~np.asarray(known, dtype=bool), col] = pd.NA
    any_faults = np.bincount(as_numpy(faults["run"]), minlength=len(rec.runs)) > 0
    upd["epoch_faults"] = upd["epoch_faults"].astype("Int64")
    if nu:
        upd.loc[~any_faults[as_numpy(upd["run"])], "epoch_faults"] = pd.NA
    upd["mmio_accesses"] = _accesses_per_epoch(rec, upd)
    return upd


def _accesses_per_epoch(rec: Recording, upd: pd.DataFrame) -> np.ndarray:
    """kvm_mmio accesses in each update's epoch (all a host without MMIO
    caching can say about MMIO after an update)."""
    acc = rec.mmio_access
    nu = len(upd)
    if not nu or not len(acc):
        return np.zeros(nu, np.int64)
    u = upd[upd["ok"]]
    ak, uk = vm_keys(acc, u)
    j = asof_index(ak, as_numpy(acc["ns"]), uk, as_numpy(u["end_ns"]))
    pos = np.searchsorted(upd.index.to_numpy(), u.index.to_numpy())
    counts = np.zeros(nu, np.int64)
    np.add.at(counts, pos[j[j >= 0]], 1)
    return counts


def _zap_costs(rec: Recording, u: pd.DataFrame, faults: pd.DataFrame, c: FaultColumns,
               runs_known: np.ndarray) -> pd.DataFrame:
    """Recorded zap-alls: the update they happened in, why (a DELETE/MOVE
    flushing the slot, or the masked generation wrapping), and the faults
    (pages rebuilt after the zap) they cost."""
    zap = rec.zap_all.copy()
    nz = len(zap)
    rebuilt = np.flatnonzero(c.klass == CLASSES.index("after_zap"))
    zj, extra = c.zap[rebuilt], c.extra[rebuilt]
    zap["n_faults"] = np.bincount(zj, minlength=nz) if nz else []
    ok = ~np.isnan(extra)
    zap["cost_ns"] = np.bincount(zj[ok], extra[ok], minlength=nz) if nz else []
    # Costs are unknown (not 0) in runs without classified faults.
    if nz:
        run = as_numpy(zap["run"])
        zap["n_faults"] = nullable_int(zap["n_faults"].to_numpy(), ~runs_known[run])
        zap["cost_ns"] = zap["cost_ns"].where(runs_known[run])
        zk, uk = vm_keys(zap, u)
        zns = as_numpy(zap["ns"])
        j = asof_index(zk, zns, uk, as_numpy(u["begin_ns"]))
        inside = j >= 0
        inside[inside] &= zns[inside] <= as_numpy(u["end_ns"])[j[inside]]
        cause = np.where(inside, u.index.to_numpy()[np.maximum(j, 0)] if len(u) else 0, -1)
        zap["update"] = nullable_int(cause, cause < 0)
        change = np.full(nz, "", dtype=object)
        change[inside] = u["change"].astype(str).to_numpy()[j[inside]]
        bits = np.array([gen_bits(rec.manifests[r]) for r in rec.runs])[run]
        asn = np.array([address_spaces(rec.manifests[r]) for r in rec.runs])[run]
        g = as_numpy(zap["gen"], np.uint64, 0)
        masked = (g & ((np.uint64(1) << bits.astype(np.uint64)) - np.uint64(1))) \
            & ~(asn.astype(np.uint64) - np.uint64(1))
        flush = np.isin(change, ["delete", "move"])
        reason = np.where(flush, "slot flush", np.where(masked == 0, "wrap", "other"))
        zap["reason"] = pd.Categorical(reason, categories=["slot flush", "wrap", "other"])
        zap["wrap"] = reason == "wrap"
    else:
        zap["update"] = pd.array([], dtype="Int64")
        zap["reason"] = pd.Categorical([], categories=["slot flush", "wrap", "other"])
        zap["wrap"] = np.zeros(0, bool)
    return zap
