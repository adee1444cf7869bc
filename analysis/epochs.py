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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recording.manifest import address_spaces, gen_bits

from .frames import Recording, load
from .joins import (
    as_numpy,
    asof_index,
    group_ids,
    group_medians,
    next_by_key,
    nullable_int,
    partition,
    vm_keys,
)
from .timeline import generation_timeline, update_frame

# A fault with no MMIO SPTE evidence (no fast-path hit, no stale check, no
# re-mark) is "vcpu_cache" in a run that has evidence elsewhere: KVM's
# per-vCPU MMIO info cache answered it before any SPTE check (the cache is
# dropped when the generation changes, so it is never stale); in a run with no
# evidence at all (kvm.mmio_caching=N) it is "unknown".
CLASSES = ("fast", "vcpu_cache", "stale", "first_touch", "during_update", "after_zap",
           "unknown")
FAST = ("fast", "vcpu_cache")
# Faults charged to a memslot update (the rest would have happened anyway).
CAUSED = ("stale", "during_update", "after_zap")
SLOW = tuple(c for c in CLASSES if c not in FAST and c != "unknown")
_THREADS = 3  # independent passes over the faults run side by side


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


def _fault_baseline(fk: np.ndarray, vcpu: np.ndarray, fast: np.ndarray,
                    lat: np.ndarray) -> np.ndarray:
    """Median fast-hit latency of each fault's (run, vm, vCPU); else (run, vm)."""
    base = np.full(len(fk), np.nan)
    if not fast.any():
        return base
    vcpu = vcpu - vcpu.min() if len(vcpu) else vcpu
    for key in (fk * (int(vcpu.max()) + 1) + vcpu, fk):
        ids, meds = group_medians(key[fast], lat[fast])
        if key.max() < 2**24:  # dense ids: a lookup table, one gather
            table = np.full(int(key.max()) + 1, np.nan)
            table[ids] = meds
            found = table[key]
        else:
            pos = np.minimum(np.searchsorted(ids, key), len(ids) - 1)
            found = np.where(ids[pos] == key, meds[pos], np.nan)
        base = np.where(np.isnan(base), found, base)
        if not np.isnan(base).any():
            break
    return base


def correlate(rec: Recording) -> Correlation:
    """Join every MMIO fault to its generation epoch, classify it, and charge
    the slow ones to the memslot update (or zap-all) that caused them."""
    upd = update_frame(rec)
    tl = generation_timeline(rec, upd)
    f = finished(rec.mmio_fault)
    n = len(f)
    ok = upd["ok"].to_numpy()
    u = upd[ok]
    uidx = u.index.to_numpy()
    zap = rec.zap_all
    fk, uk, zk = vm_keys(f, u, zap)
    t = as_numpy(f["exit_ns"])
    u_begin, u_end = as_numpy(u["begin_ns"]), as_numpy(u["end_ns"])

    parts = partition(fk)
    fast = as_numpy(f["fast_hit"], bool, False)
    stale = as_numpy(f["stale"], bool, False)
    remarked = as_numpy(f["remarked"], bool, False)
    lat_ns = as_numpy(f["latency_ns"])

    def epochs() -> tuple[np.ndarray, ...]:
        # Epoch opener: the last update ended at or before the fault.
        j = asof_index(fk, t, uk, u_end, parts=parts)
        has_epoch = j >= 0
        jj = np.maximum(j, 0)
        opener = np.where(has_epoch, uidx[jj] if len(uidx) else 0, -1)
        since = np.where(has_epoch, t - (u_end[jj] if len(u_end) else 0), -1)
        # An update in progress: windows of one VM do not overlap, so it can
        # only be the VM's next update after the opener (whose end is past t
        # already): two gathers instead of another as-of join.
        nkeys = int(max(fk.max() if n else 0, uk.max() if len(uk) else 0)) + 1
        nxt, first = next_by_key(uk, u_end, nkeys)
        q = np.where(has_epoch, nxt[jj], first[fk]) if len(uk) else np.full(n, -1, np.int64)
        inprog = q >= 0
        inprog[inprog] &= u_begin[q[inprog]] <= t[inprog]
        inprog_upd = np.where(inprog, uidx[np.maximum(q, 0)] if len(uidx) else 0, -1)
        return j, opener, since, inprog, inprog_upd

    def zapped() -> tuple[np.ndarray, np.ndarray]:
        # Re-marked without a stale check, on a page seen before its VM's
        # last zap-all (the in-progress case is taken out by the caller).
        zj = asof_index(fk, t, zk, as_numpy(zap["ns"]), parts=parts)
        seen_before = np.zeros(n, bool)
        cand = remarked & ~stale & (zj >= 0)
        if cand.any():
            gfn = as_numpy(f["gfn"], np.uint64, 0)
            if gfn.max() < (1 << 40) and fk.max() < (1 << 22):
                page = (fk << 40) | gfn.astype(np.int64)
            else:
                page = group_ids(fk, gfn.view(np.int64))[0]
            codes, uniq = pd.factorize(page)
            first_seen = np.full(len(uniq), np.iinfo(np.int64).max)
            np.minimum.at(first_seen, codes, t)
            seen_before[cand] = first_seen[codes[cand]] < as_numpy(zap["ns"])[zj[cand]]
        return zj, seen_before

    def baseline() -> np.ndarray:
        return _fault_baseline(fk, as_numpy(f["vcpu"], np.int64, -1), fast, lat_ns)

    # Three independent passes over the faults; numpy releases the GIL in
    # its big loops, so on 2+ cores they overlap.
    with ThreadPoolExecutor(_THREADS) as pool:
        jobs = [pool.submit(fn) for fn in (epochs, zapped, baseline)]
        (j, opener, since, inprog, inprog_upd), (zj, seen_before), base = \
            [job.result() for job in jobs]
    after_zap = seen_before & ~inprog
    del seen_before
    # No MMIO SPTE evidence (no check/mark/fast-path event for the fault, e.g.
    # kvm.mmio_caching=N): the fault is left unclassified, whatever its timing.
    evidence = fast | stale | remarked

    run_codes = as_numpy(f["run"])
    run_has_evidence = np.bincount(run_codes[evidence], minlength=len(rec.runs)) > 0
    klass = np.where(run_has_evidence[run_codes], CLASSES.index("vcpu_cache"),
                     CLASSES.index("unknown")).astype(np.int8)
    klass[remarked] = CLASSES.index("first_touch")
    klass[after_zap] = CLASSES.index("after_zap")
    klass[stale] = CLASSES.index("stale")
    klass[inprog & evidence & ~fast] = CLASSES.index("during_update")
    klass[fast] = CLASSES.index("fast")
    del evidence

    lat = lat_ns.astype(np.float64)
    caused = np.isin(klass, [CLASSES.index(c) for c in CAUSED])
    cause = np.where(klass == CLASSES.index("during_update"), inprog_upd, opener)
    caused &= cause >= 0  # stale before the first recorded update: nobody to charge
    cause = np.where(caused, cause, -1)

    out = f.copy(deep=False)
    out["klass"] = pd.Categorical.from_codes(klass, categories=list(CLASSES))
    out["epoch_update"] = nullable_int(opener, opener < 0)
    out["since_update_ns"] = nullable_int(since, since < 0)
    # The epoch's full generation (NA where the backend could not read it).
    gen_after = u["gen_after"].to_numpy(dtype=np.float64, na_value=np.nan) if len(u) \
        else np.zeros(0)
    eg = gen_after[np.maximum(j, 0)] if len(u) else np.full(n, np.nan)
    eg_na = (j < 0) | np.isnan(eg)
    out["epoch_gen"] = pd.arrays.IntegerArray(np.where(eg_na, 0, eg).astype(np.int64), eg_na)
    out["cause"] = nullable_int(cause, cause < 0)
    out["zap"] = nullable_int(zj, klass != CLASSES.index("after_zap"))
    out["baseline_ns"] = base
    out["extra_ns"] = lat - base

    upd = _charge_updates(upd, out, cause, caused, klass, opener, rec)
    zaps = _zap_costs(rec, u, out, klass, zj)
    return Correlation(upd, out, tl, zaps, rec)


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


def _charge_updates(upd: pd.DataFrame, faults: pd.DataFrame, cause: np.ndarray,
                    caused: np.ndarray, klass: np.ndarray, opener: np.ndarray,
                    rec: Recording) -> pd.DataFrame:
    nu = len(upd)
    pos = np.full(int(upd.index.max()) + 1 if nu else 0, -1)
    pos[upd.index.to_numpy()] = np.arange(nu)
    c = pos[cause[caused]] if nu else np.zeros(0, np.int64)
    extra = faults["extra_ns"].to_numpy()[caused]
    lat = as_numpy(faults["latency_ns"])[caused].astype(np.float64)
    upd["n_slow"] = np.bincount(c, minlength=nu) if nu else []
    for name in CAUSED:
        sel = klass[caused] == CLASSES.index(name)
        upd[f"n_{name}"] = np.bincount(c[sel], minlength=nu) if nu else []
    upd["slow_latency_ns"] = np.bincount(c, lat, minlength=nu) if nu else []
    has_extra = ~np.isnan(extra)
    upd["cost_ns"] = np.bincount(c[has_extra], extra[has_extra], minlength=nu) if nu else []
    op = pos[opener[opener >= 0]] if nu else np.zeros(0, np.int64)
    upd["epoch_faults"] = np.bincount(op, minlength=nu) if nu else []
    # Without classified faults (none recorded, or no SPTE evidence as with
    # kvm.mmio_caching=N) a run's update costs are unknown, not 0.
    runs_known = np.bincount(as_numpy(faults["run"])[klass != CLASSES.index("unknown")],
                             minlength=len(rec.runs)) > 0
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


def _zap_costs(rec: Recording, u: pd.DataFrame, faults: pd.DataFrame,
               klass: np.ndarray, zj: np.ndarray) -> pd.DataFrame:
    """Recorded zap-alls: the update they happened in, why (a DELETE/MOVE
    flushing the slot, or the masked generation wrapping), and the faults
    (pages rebuilt after the zap) they cost."""
    zap = rec.zap_all.copy()
    nz = len(zap)
    sel = (klass == CLASSES.index("after_zap")) & (zj >= 0)
    zap["n_faults"] = np.bincount(zj[sel], minlength=nz) if nz else []
    extra = faults["extra_ns"].to_numpy()[sel]
    ok = ~np.isnan(extra)
    zap["cost_ns"] = np.bincount(zj[sel][ok], extra[ok], minlength=nz) if nz else []
    # Costs are unknown (not 0) in runs without classified faults.
    runs_known = np.bincount(as_numpy(faults["run"])[klass != CLASSES.index("unknown")],
                             minlength=len(rec.runs)) > 0
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
