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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import schema
from .recording import Recording

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
SWAPS = {"create": 1, "flags_only": 1, "delete": 2, "move": 2}
ADDRESS_SPACES_DEFAULT = 2  # x86 with SMM: generation += 2 per swap
_THREADS = 3  # independent passes over the faults run side by side


def _np(s: pd.Series, dtype: Any = np.int64, na: Any = -1) -> np.ndarray:
    """A column as a plain numpy array (nulls -> ``na``)."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.codes.to_numpy()
    return s.to_numpy(dtype=dtype, na_value=na)


def _groups(*keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense group ids for rows keyed by several integer columns (hashing,
    O(n): np.unique(axis=0) sorts and is far slower on 10M rows)."""
    n = len(keys[0])
    gid = np.zeros(n, np.int64)
    ng = 1
    for k in keys:
        codes, uniq = pd.factorize(k)
        gid, u = pd.factorize(gid * len(uniq) + codes)
        ng = len(u)
    return gid.astype(np.int64, copy=False), (ng if n else 0)


def vm_keys(*frames: pd.DataFrame) -> list[np.ndarray]:
    """Dense (run, vm) ids shared by several frames: run code * #VMs + the
    VM's rank.  One hash pass per frame (factorize), then a gather; no
    multi-column factorizing of 10M-row keys."""
    per = [pd.factorize(_np(df["vm"], np.uint64, 0)) for df in frames]
    vms = np.unique(np.concatenate([np.asarray(u, np.uint64) for _, u in per])) \
        if frames else np.zeros(0, np.uint64)
    nv = max(len(vms), 1)
    out = []
    for df, (codes, uniq) in zip(frames, per, strict=True):
        idx = np.searchsorted(vms, np.asarray(uniq, np.uint64)).astype(np.int64)[codes]
        run = _np(df["run"])
        if len(run) and run.min() == run.max():  # one run: no per-row arithmetic
            out.append(idx + int(run[0]) * nv if run[0] else idx)
        else:
            out.append(run.astype(np.int64) * nv + idx)
    return out


def rows_of(df: pd.DataFrame, run: str) -> pd.DataFrame:
    """The rows of one run; the frame itself (no copy) when it holds only
    that run, which matters with 10M-row fault tables."""
    cats = df["run"].cat.categories
    if run not in cats:
        return df.iloc[:0]
    codes = df["run"].cat.codes.to_numpy()
    code = cats.get_loc(run)
    sel = codes == code
    return df if sel.all() else df[sel]


def class_codes(faults: pd.DataFrame) -> np.ndarray:
    """Fault classes as int8 codes into CLASSES (never an object array)."""
    return faults["klass"].cat.codes.to_numpy()


def _nullable(values: np.ndarray, mask: np.ndarray) -> pd.arrays.IntegerArray:
    """Int64 with NA where ``mask`` (no per-element pandas assignment)."""
    return pd.arrays.IntegerArray(values.astype(np.int64, copy=False), mask)


def partition(keys: np.ndarray) -> list[tuple[int, np.ndarray | slice]]:
    """Row positions per key (small dense ids), computed once per table."""
    present = np.flatnonzero(np.bincount(keys)) if len(keys) else []
    if len(present) == 1:
        return [(int(present[0]), slice(None))]
    return [(int(k), np.flatnonzero(keys == k)) for k in present]


def asof_index(keys: np.ndarray, t: np.ndarray, ref_keys: np.ndarray, ref_t: np.ndarray,
               strict: bool = False,
               parts: list[tuple[int, np.ndarray | slice]] | None = None) -> np.ndarray:
    """For each (key, t): the row of ref with the same key and the greatest
    ref_t <= t (< t when ``strict``), or -1.  A per-key as-of join (what
    pandas.merge_asof does with ``by``), vectorised with searchsorted; each
    key's needles stay in time order, which keeps the searches cache-friendly.
    ``parts``: partition(keys), when the caller joins the same table often."""
    out = np.full(len(t), -1, dtype=np.int64)
    if not len(t) or not len(ref_t):
        return out
    keys, ref_keys = keys.astype(np.int64, copy=False), ref_keys.astype(np.int64, copy=False)
    order = np.lexsort((ref_t, ref_keys))
    rk, rt = ref_keys[order], ref_t[order]
    side = "left" if strict else "right"
    nkeys = int(max(rk.max(), keys.max())) + 1
    bounds = np.searchsorted(rk, np.arange(nkeys + 1))
    for k, sel in parts if parts is not None else partition(keys):
        lo, hi = bounds[k], bounds[k + 1]
        if lo == hi:
            continue
        pos = np.searchsorted(rt[lo:hi], t[sel], side=side) - 1
        out[sel] = np.where(pos >= 0, order[lo + np.maximum(pos, 0)], -1)
    return out


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
    done = _np(df["reentered"], bool, True)
    return df if done.all() else df[done].reset_index(drop=True)


def _valid_updates(upd: pd.DataFrame) -> np.ndarray:
    return _np(upd["ret"], np.int64, 0) == 0


def update_frame(rec: Recording) -> pd.DataFrame:
    """memslot_update plus ordinal ``epoch`` per VM and the workload action."""
    upd = rec.memslot_update.copy()
    upd.index.name = "update"
    ok = _valid_updates(upd)
    upd["ok"] = ok
    # Order within each (run, vm) by end time: the epoch number of the update.
    gid = vm_keys(upd)[0]
    order = np.lexsort((_np(upd["end_ns"]), gid))
    epoch = np.zeros(len(upd), np.int64)
    epoch[order] = pd.Series(ok[order].astype(np.int64)).groupby(gid[order]).cumsum()
    upd["epoch"] = pd.array(np.where(ok, epoch, 0), dtype="Int64")
    upd.loc[~ok, "epoch"] = pd.NA
    upd["duration_ns"] = _np(upd["end_ns"]) - _np(upd["begin_ns"])
    upd["action"] = _workload_action(rec, upd)
    return upd


def _workload_action(rec: Recording, upd: pd.DataFrame) -> pd.Categorical:
    """The rig action whose [begin, end] holds the update's begin, if any."""
    wl = rec.workload
    actions = ["(none)"] + sorted(set(wl["action"].dropna().astype(str)))
    codes = np.zeros(len(upd), np.int8)
    if len(wl) and len(upd):
        wl_ok = wl.dropna(subset=["begin_ns"])
        j = asof_index(_np(upd["run"]), _np(upd["begin_ns"]),
                       _np(wl_ok["run"]), _np(wl_ok["begin_ns"]))
        hit = j >= 0
        wl_end = _np(wl_ok["end_ns"], np.int64, np.iinfo(np.int64).max)
        hit[hit] &= _np(upd["begin_ns"])[hit] <= wl_end[j[hit]]
        names = wl_ok["action"].astype(str).to_numpy()
        codes[hit] = [actions.index(a) for a in names[j[hit]]] if hit.any() else []
    return pd.Categorical.from_codes(codes, categories=actions)


def generation_timeline(rec: Recording, updates: pd.DataFrame | None = None) -> pd.DataFrame:
    """The generation of each VM as a step function of time.

    One row per step: update begin (generation flagged in progress), each
    kvm_mmu_invalidate_mmio_sptes call (DELETE/MOVE make two) and update end.
    ``gen`` is NA where the backend could not read it (tracepoint-only);
    ``epoch`` counts completed updates, so the steps are plottable anyway.
    """
    upd = update_frame(rec) if updates is None else updates
    u = upd[upd["ok"]]
    parts = []
    if len(u):
        idx = u.index.to_numpy()
        for kind, ns, gen, inprog in (("begin", "begin_ns", "gen_before", True),
                                      ("end", "end_ns", "gen_after", False)):
            parts.append(pd.DataFrame({
                "run": u["run"].to_numpy(), "vm": u["vm"].to_numpy(),
                "ns": _np(u[ns]), "gen": u[gen].astype("UInt64").to_numpy(),
                "in_progress": inprog, "kind": kind, "update": idx,
                "change": u["change"].to_numpy(), "zap_all": False}))
    g = rec.generation
    g = g[g["source"] == "invalidate"]
    if len(g):
        parts.append(pd.DataFrame({
            "run": g["run"].to_numpy(), "vm": g["vm"].to_numpy(), "ns": _np(g["ns"]),
            "gen": g["gen"].astype("UInt64").to_numpy(),
            "in_progress": g["in_progress"].fillna(False).to_numpy(dtype=bool),
            "kind": "invalidate", "update": -1, "change": pd.NA,
            "zap_all": g["zap_all"].fillna(False).to_numpy(dtype=bool)}))
    cols = ["run", "vm", "ns", "gen", "in_progress", "kind", "update", "change", "zap_all"]
    tl = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: [] for c in cols})
    tl["run"] = pd.Categorical(tl["run"], categories=rec.runs)
    tl["vm"] = tl["vm"].astype("UInt64")
    tl["gen"] = tl["gen"].astype("UInt64")
    tl["kind"] = pd.Categorical(tl["kind"], categories=["begin", "invalidate", "end"])
    tl["change"] = pd.Categorical(tl["change"], categories=list(schema.CHANGE_TYPES))
    tl["update"] = tl["update"].astype("Int64")
    tl.loc[tl["update"] < 0, "update"] = pd.NA
    kind_order = tl["kind"].cat.codes.to_numpy()
    tl = tl.iloc[np.lexsort((kind_order, _np(tl["ns"]), _np(tl["vm"], np.uint64, 0),
                             _np(tl["run"])))].reset_index(drop=True)
    # Invalidate rows belong to the update whose window holds them.
    if len(tl) and len(u):
        inv = (tl["kind"] == "invalidate").to_numpy()
        if inv.any():
            lk, rk = vm_keys(tl[inv], u)
            j = asof_index(lk, _np(tl.loc[inv, "ns"]), rk, _np(u["begin_ns"]))
            inside = j >= 0
            inside[inside] &= _np(tl.loc[inv, "ns"])[inside] <= _np(u["end_ns"])[j[inside]]
            upd_idx = np.where(inside, u.index.to_numpy()[np.maximum(j, 0)], -1)
            tl.loc[inv, "update"] = pd.array(upd_idx, dtype="Int64")
            tl.loc[tl["update"] < 0, "update"] = pd.NA
    # Epoch: completed updates so far in this (run, vm).
    ends = (tl["kind"] == "end").to_numpy().astype(np.int64)
    gid = vm_keys(tl)[0]
    tl["epoch"] = pd.Series(ends).groupby(gid).cumsum().to_numpy() if len(tl) else []
    return tl


def _group_medians(key: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median of ``val`` (int ns) per ``key`` (small ints): one sort of
    key << 40 | val puts every group in order, the medians are its middles."""
    if len(val) and key.max() < 2**23 and val.min() >= 0 and val.max() < 2**40:
        comb = np.sort((key << 40) | val)
        counts = np.bincount(key)
        ids = np.flatnonzero(counts)
        n = counts[ids]
        starts = np.concatenate([[0], np.cumsum(n)[:-1]])
        low = comb & ((1 << 40) - 1)
        return ids, (low[starts + (n - 1) // 2] + low[starts + n // 2]) / 2
    med = pd.Series(val).groupby(key).median()
    return med.index.to_numpy(), med.to_numpy()


def _fault_baseline(fk: np.ndarray, vcpu: np.ndarray, fast: np.ndarray,
                    lat: np.ndarray) -> np.ndarray:
    """Median fast-hit latency of each fault's (run, vm, vCPU); else (run, vm)."""
    base = np.full(len(fk), np.nan)
    if not fast.any():
        return base
    vcpu = vcpu - vcpu.min() if len(vcpu) else vcpu
    for key in (fk * (int(vcpu.max()) + 1) + vcpu, fk):
        ids, meds = _group_medians(key[fast], lat[fast])
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


def _next_update(uk: np.ndarray, u_end: np.ndarray,
                 nkeys: int) -> tuple[np.ndarray, np.ndarray]:
    """Per update row: the next update of the same key by end time (-1 if
    none); per key id below ``nkeys``: its first update (-1 if none)."""
    nxt = np.full(len(uk), -1, np.int64)
    first = np.full(nkeys, -1, np.int64)
    if len(uk):
        order = np.lexsort((u_end, uk))
        same = uk[order][1:] == uk[order][:-1]
        nxt[order[:-1][same]] = order[1:][same]
        starts = np.r_[True, ~same]
        first[uk[order][starts]] = order[starts]
    return nxt, first


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
    t = _np(f["exit_ns"])
    u_begin, u_end = _np(u["begin_ns"]), _np(u["end_ns"])

    parts = partition(fk)
    fast = _np(f["fast_hit"], bool, False)
    stale = _np(f["stale"], bool, False)
    remarked = _np(f["remarked"], bool, False)
    lat_ns = _np(f["latency_ns"])

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
        nxt, first = _next_update(uk, u_end, nkeys)
        q = np.where(has_epoch, nxt[jj], first[fk]) if len(uk) else np.full(n, -1, np.int64)
        inprog = q >= 0
        inprog[inprog] &= u_begin[q[inprog]] <= t[inprog]
        inprog_upd = np.where(inprog, uidx[np.maximum(q, 0)] if len(uidx) else 0, -1)
        return j, opener, since, inprog, inprog_upd

    def zapped() -> tuple[np.ndarray, np.ndarray]:
        # Re-marked without a stale check, on a page seen before its VM's
        # last zap-all (the in-progress case is taken out by the caller).
        zj = asof_index(fk, t, zk, _np(zap["ns"]), parts=parts)
        seen_before = np.zeros(n, bool)
        cand = remarked & ~stale & (zj >= 0)
        if cand.any():
            gfn = _np(f["gfn"], np.uint64, 0)
            if gfn.max() < (1 << 40) and fk.max() < (1 << 22):
                page = (fk << 40) | gfn.astype(np.int64)
            else:
                page = _groups(fk, gfn.view(np.int64))[0]
            codes, uniq = pd.factorize(page)
            first_seen = np.full(len(uniq), np.iinfo(np.int64).max)
            np.minimum.at(first_seen, codes, t)
            seen_before[cand] = first_seen[codes[cand]] < _np(zap["ns"])[zj[cand]]
        return zj, seen_before

    def baseline() -> np.ndarray:
        return _fault_baseline(fk, _np(f["vcpu"], np.int64, -1), fast, lat_ns)

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

    run_codes = _np(f["run"])
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
    out["epoch_update"] = _nullable(opener, opener < 0)
    out["since_update_ns"] = _nullable(since, since < 0)
    # The epoch's full generation (NA where the backend could not read it).
    gen_after = u["gen_after"].to_numpy(dtype=np.float64, na_value=np.nan) if len(u) \
        else np.zeros(0)
    eg = gen_after[np.maximum(j, 0)] if len(u) else np.full(n, np.nan)
    eg_na = (j < 0) | np.isnan(eg)
    out["epoch_gen"] = pd.arrays.IntegerArray(np.where(eg_na, 0, eg).astype(np.int64), eg_na)
    out["cause"] = _nullable(cause, cause < 0)
    out["zap"] = _nullable(zj, klass != CLASSES.index("after_zap"))
    out["baseline_ns"] = base
    out["extra_ns"] = lat - base

    upd = _charge_updates(upd, out, cause, caused, klass, opener, rec)
    zaps = _zap_costs(rec, u, out, klass, zj)
    return Correlation(upd, out, tl, zaps, rec)


def _charge_updates(upd: pd.DataFrame, faults: pd.DataFrame, cause: np.ndarray,
                    caused: np.ndarray, klass: np.ndarray, opener: np.ndarray,
                    rec: Recording) -> pd.DataFrame:
    nu = len(upd)
    pos = np.full(int(upd.index.max()) + 1 if nu else 0, -1)
    pos[upd.index.to_numpy()] = np.arange(nu)
    c = pos[cause[caused]] if nu else np.zeros(0, np.int64)
    extra = faults["extra_ns"].to_numpy()[caused]
    lat = _np(faults["latency_ns"])[caused].astype(np.float64)
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
    runs_known = np.bincount(_np(faults["run"])[klass != CLASSES.index("unknown")],
                             minlength=len(rec.runs)) > 0
    known = runs_known[_np(upd["run"])] if nu else np.zeros(0, bool)
    upd["cost_ns"] = upd["cost_ns"].where(known & upd["ok"].to_numpy(dtype=bool))
    for col in ["n_slow", "slow_latency_ns"] + [f"n_{c}" for c in CAUSED]:
        upd[col] = upd[col].astype("Int64" if col != "slow_latency_ns" else "Float64")
        upd.loc[~np.asarray(known, dtype=bool), col] = pd.NA
    any_faults = np.bincount(_np(faults["run"]), minlength=len(rec.runs)) > 0
    upd["epoch_faults"] = upd["epoch_faults"].astype("Int64")
    if nu:
        upd.loc[~any_faults[_np(upd["run"])], "epoch_faults"] = pd.NA
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
    j = asof_index(ak, _np(acc["ns"]), uk, _np(u["end_ns"]))
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
    runs_known = np.bincount(_np(faults["run"])[klass != CLASSES.index("unknown")],
                             minlength=len(rec.runs)) > 0
    if nz:
        run = _np(zap["run"])
        zap["n_faults"] = _nullable(zap["n_faults"].to_numpy(), ~runs_known[run])
        zap["cost_ns"] = zap["cost_ns"].where(runs_known[run])
        zk, uk = vm_keys(zap, u)
        zns = _np(zap["ns"])
        j = asof_index(zk, zns, uk, _np(u["begin_ns"]))
        inside = j >= 0
        inside[inside] &= zns[inside] <= _np(u["end_ns"])[j[inside]]
        cause = np.where(inside, u.index.to_numpy()[np.maximum(j, 0)] if len(u) else 0, -1)
        zap["update"] = _nullable(cause, cause < 0)
        change = np.full(nz, "", dtype=object)
        change[inside] = u["change"].astype(str).to_numpy()[j[inside]]
        bits = np.array([gen_bits(rec.manifests[r]) for r in rec.runs])[run]
        asn = np.array([address_spaces(rec.manifests[r]) for r in rec.runs])[run]
        g = _np(zap["gen"], np.uint64, 0)
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


def _manifest_get(manifest: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        for scope in (manifest, manifest.get("kernel") or {}, manifest.get("kvm") or {}):
            if isinstance(scope, dict) and scope.get(k) is not None:
                return scope[k]
    return None


def gen_bits(manifest: dict[str, Any], default: int = schema.MMIO_GEN_BITS_DEFAULT) -> int:
    """The kernel's MMIO generation width: from the manifest, else 19 (5.5+)."""
    v = _manifest_get(manifest, "mmio_gen_bits", "gen_bits")
    return int(v) if v is not None else default


def address_spaces(manifest: dict[str, Any]) -> int:
    v = _manifest_get(manifest, "address_spaces", "as_count", "nr_address_spaces")
    return int(v) if v is not None else ADDRESS_SPACES_DEFAULT


def run_span_ns(rec: Recording, run: str) -> int:
    """Recording length: manifest start/stop, else first to last event."""
    m = rec.manifests[run]
    lo, hi = m.get("start_ns"), m.get("stop_ns")
    if lo is None or hi is None:
        ts = []
        for name, col in (("memslot_update", "begin_ns"), ("memslot_update", "end_ns"),
                          ("mmio_fault", "exit_ns"), ("mmio_access", "ns"),
                          ("generation", "ns")):
            df = rec.frames[name]
            v = _np(rows_of(df, run)[col])
            if len(v):
                ts += [v.min(), v.max()]
        if not ts:
            return 0
        lo = lo if lo is not None else min(ts)
        hi = hi if hi is not None else max(ts)
    return max(int(hi) - int(lo), 0)


def wrap_forecast(corr: Correlation, bits: int | None = None) -> pd.DataFrame:
    """Per run and VM: update rate, generation units per second, swaps per
    wrap, and when the masked MMIO generation wraps (zap-all) next."""
    rec = corr.recording
    upd = corr.updates[corr.updates["ok"]]
    rows = []
    for (run, vm), g in upd.groupby(["run", "vm"], observed=True):
        m = rec.manifests[str(run)]
        w = bits or gen_bits(m)
        asn = address_spaces(m)
        span_s = run_span_ns(rec, str(run)) / 1e9
        period = 1 << w
        per_change = g["change"].value_counts()
        units_est = float(sum(SWAPS.get(str(c), 1) * int(k) for c, k in per_change.items())
                          * asn)
        gens = g["gen_after"].dropna()
        first = g["gen_before"].dropna()
        known = len(gens) > 0 and len(first) > 0 and int(gens.max()) > 0
        units = float(int(gens.max()) - int(first.min())) if known else units_est
        rate_upd = len(g) / span_s if span_s > 0 else float("nan")
        rate_units = units / span_s if span_s > 0 else float("nan")
        cur = int(gens.iloc[np.argmax(_np(g.loc[gens.index, "end_ns"]))]) if known else None
        if cur is not None:
            pos = (cur & (period - 1)) & ~(asn - 1)
            remaining = period - pos
        else:
            remaining = None
        eta = remaining / rate_units if remaining is not None and rate_units > 0 else None
        rows.append({
            "run": str(run), "vm": int(vm), "gen_bits": w, "address_spaces": asn,
            "updates": len(g), "span_s": span_s, "updates_per_s": rate_upd,
            "gen_units_per_s": rate_units, "gen_from": "recorded" if known else "estimated",
            "current_gen": cur, "wrap_period_s": period / rate_units if rate_units > 0 else None,
            "next_zap_all_s": eta, "swaps_per_wrap": period // asn,
        })
    return pd.DataFrame(rows)
