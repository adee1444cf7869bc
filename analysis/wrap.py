"""Generation wraps and the invariant their zap-all keeps (issue #13).

Each memslot swap adds A (``address_spaces``) to a VM's generation; MMIO
SPTEs keep its low B bits (``mmio_gen_bits``).  kvm_mmu_invalidate_mmio_sptes
masks the new generation with (2**B - 1) & ~(A - 1) and, when that is 0,
zaps every SPTE (kvm_mmu_zap_all_fast).  Without that zap an SPTE marked
2**B / A swaps earlier would carry the current masked generation again and
pass check_mmio_spte as a fast hit, though the memslots it was built from
are long gone.  The invariant checked here, per wrap: no MMIO fault after
the wrap is a fast hit on a page that has not been re-marked since the wrap.

Marks and touches are read against address space 0's generation (vCPUs
outside SMM); a wrap of address space 1 zaps the same SPTEs and is checked
the same way.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from recording.manifest import address_spaces, gen_bits

from .epochs import Correlation
from .forecast import wrap_forecast
from .frames import Recording
from .joins import as_numpy, asof_index, group_ids, vm_keys

COLUMNS = [
    "run", "vm", "as_id", "wrap_ns", "gen", "swap", "wrap_from", "update", "zap_ns",
    "zap_on_time", "pages_marked_before", "stale_equal_pages", "rebuilt_pages",
    "evidence_faults", "violations", "first_violation", "violation_ns", "violation_gpa",
    "verdict", "burst_faults", "burst_ns", "burst_extra_ns", "first_fault_p50_ns",
    "fast_hit_p50_ns", "predicted_swap", "forecast_wrap_ns", "forecast_error_s",
]
HELD, NO_EVIDENCE = "held", "no evidence"
_NONE = np.iinfo(np.int64).min  # "no such time" in int64 time arrays


def masked_gen(gen: np.ndarray, bits: np.ndarray, asn: np.ndarray) -> np.ndarray:
    """The generation as kvm_mmu_invalidate_mmio_sptes compares it: its low
    ``bits`` bits without the address-space bits (int64; gens stay < 2**63,
    the in-progress bit is a column of its own)."""
    g = np.asarray(gen).astype(np.uint64)
    period = np.left_shift(np.uint64(1), np.asarray(bits).astype(np.uint64))
    return ((g & (period - np.uint64(1))) & ~(np.asarray(asn).astype(np.uint64)
                                               - np.uint64(1))).astype(np.int64)


def _run_consts(rec: Recording) -> tuple[np.ndarray, np.ndarray]:
    """B and A per run code, from each run's manifest (defaults: 19 and 2)."""
    bits = np.array([gen_bits(rec.manifests[r]) for r in rec.runs], np.int64)
    asn = np.array([address_spaces(rec.manifests[r]) for r in rec.runs], np.int64)
    return bits, asn


def _empty(rec: Recording) -> pd.DataFrame:
    out = pd.DataFrame({c: [] for c in COLUMNS})
    out["run"] = pd.Categorical([], categories=rec.runs)  # rows_of() works on it
    return out


def _first_per_group(group: np.ndarray, t: np.ndarray,
                     last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sorted group ids and, per group, the position of its earliest (or
    latest) row by ``t``."""
    if not len(group):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((t, group))
    g = group[order]
    edge = np.r_[g[1:] != g[:-1], True] if last else np.r_[True, g[1:] != g[:-1]]
    return g[edge], order[edge]


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each key in ``sorted_keys`` (unique), or -1."""
    if not len(sorted_keys):
        return np.full(len(keys), -1, np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, pos, -1)


def _find_wraps(corr: Correlation, bits: np.ndarray, asn: np.ndarray) -> pd.DataFrame:
    """Every wrap: an invalidate row whose masked generation is 0; for a
    (run, VM) without invalidate rows, an update whose generations cross a
    multiple of 2**B (its end then stands for the wrap: the last moment the
    swap can have happened, so no fault before the swap is taken as after)."""
    rec = corr.recording
    g = rec.generation
    g = g[(g["source"] == "invalidate").to_numpy(dtype=bool) & g["gen"].notna().to_numpy()]
    run = as_numpy(g["run"])
    gen = as_numpy(g["gen"], np.uint64, 0)
    hit = masked_gen(gen, bits[run], asn[run]) == 0
    parts = [pd.DataFrame({"run": g["run"].to_numpy()[hit], "vm": as_numpy(g["vm"], np.uint64)[hit],
                           "wrap_ns": as_numpy(g["ns"])[hit],
                           "gen": gen[hit].astype(np.int64), "wrap_from": "invalidate"})]
    u = corr.updates
    u = u[u["ok"].to_numpy(dtype=bool) & u["gen_before"].notna().to_numpy()
          & u["gen_after"].notna().to_numpy()]
    if len(u):
        gk, uk = vm_keys(g, u)
        covered = np.unique(gk)
        ur = as_numpy(u["run"])
        period, a = np.int64(1) << bits[ur], asn[ur]
        gb = as_numpy(u["gen_before"], np.int64, 0)
        ga = as_numpy(u["gen_after"], np.int64, 0)
        lane = gb % a  # the address space: its generations are lane + k*A
        cross = ((ga - lane) // period > (gb - lane) // period) & ~np.isin(uk, covered)
        parts.append(pd.DataFrame({
            "run": u["run"].to_numpy()[cross], "vm": as_numpy(u["vm"], np.uint64)[cross],
            "wrap_ns": as_numpy(u["end_ns"])[cross],
            "gen": ((ga - lane) // period * period + lane)[cross], "wrap_from": "update"}))
    w = pd.concat(parts, ignore_index=True)
    w["run"] = pd.Categorical(w["run"], categories=rec.runs)
    return w


def _gen_at(bits: np.ndarray, asn: np.ndarray, keys: np.ndarray, t: np.ndarray,
            tl_keys: np.ndarray, tl: pd.DataFrame) -> np.ndarray:
    """Masked generation of address space 0 at each (key, t), -1 unknown.
    Before the first step it is the first update's generation before (the
    VM's generation since the recording began)."""
    out = np.full(len(t), -1, np.int64)
    if not len(tl) or not len(t):
        return out
    j = asof_index(keys, t, tl_keys, as_numpy(tl["ns"]))
    ids, first = np.unique(tl_keys, return_index=True)
    pos = _lookup(ids, keys)
    begin = (tl["kind"] == "begin").to_numpy(dtype=bool)
    early = (j < 0) & (pos >= 0)
    early[early] &= begin[first[pos[early]]]
    j = np.where(early, first[np.maximum(pos, 0)], j)
    run = as_numpy(tl["run"])
    m = masked_gen(as_numpy(tl["gen"], np.uint64, 0), bits[run], asn[run])
    return np.where(j >= 0, m[np.maximum(j, 0)], -1)


def wrap_verdicts(corr: Correlation) -> pd.DataFrame:
    """One row per generation wrap per (run, VM): whether its zap-all came on
    time, whether any fault after it was a fast hit served by a pre-wrap
    SPTE (the invariant), whether the interesting case was exercised (pages
    first touched again at their mark's masked generation), the rebuild
    burst, and the wrap forecast's error.  Empty when no wrap was recorded."""
    rec = corr.recording
    bits, asn = _run_consts(rec)
    w = _find_wraps(corr, bits, asn)
    if not len(w):
        return _empty(rec)
    u = corr.updates[corr.updates["ok"].to_numpy(dtype=bool)]
    f = rec.mmio_fault
    zap = rec.zap_all
    tl = corr.timeline
    tl = tl[tl["gen"].notna().to_numpy()]
    if len(tl):  # address space 0 only (lane 0 of the generation)
        tr = as_numpy(tl["run"])
        tl = tl[as_numpy(tl["gen"], np.int64, 0) % asn[tr] == 0]
    wk, fk, uk, zk, tk = vm_keys(w, f, u, zap, tl)
    order = np.lexsort((as_numpy(w["wrap_ns"]), wk))
    w, wk = w.iloc[order].reset_index(drop=True), wk[order]
    wns = as_numpy(w["wrap_ns"])
    wrun = as_numpy(w["run"])
    wgen = as_numpy(w["gen"])
    w["as_id"] = wgen % asn[wrun]
    w["swap"] = wgen // asn[wrun]
    # The previous wrap of the same (run, VM), if any: where a forecast restarts.
    same_prev = np.r_[False, wk[1:] == wk[:-1]]
    prev_ns = np.where(same_prev, np.r_[_NONE, wns[:-1]], _NONE)

    # The update holding each wrap, and the first zap-all at or after it.
    j = asof_index(wk, wns, uk, as_numpy(u["begin_ns"]))
    u_end = as_numpy(u["end_ns"])
    inside = j >= 0
    inside[inside] &= wns[inside] <= u_end[j[inside]]
    upd = np.where(inside, u.index.to_numpy()[np.maximum(j, 0)] if len(u) else 0, -1)
    end = np.where(inside, u_end[np.maximum(j, 0)] if len(u) else 0, _NONE)
    zns = as_numpy(zap["ns"])
    z = asof_index(wk, -wns, zk, -zns)  # the smallest zap time >= the wrap's
    zt = np.where(z >= 0, zns[np.maximum(z, 0)] if len(zns) else 0, _NONE)
    on_time = (z >= 0) & inside & (zt <= end)
    w["update"] = pd.arrays.IntegerArray(np.where(inside, upd, 0), ~inside)
    w["zap_ns"] = pd.arrays.IntegerArray(np.where(on_time, zt, 0), ~on_time)
    # Unknown, not False, where nothing could tell: no update row holds the
    # wrap, or the run recorded no zap-all at all (tracepoint absent).
    zapped_runs = np.bincount(as_numpy(zap["run"]), minlength=len(rec.runs)) > 0
    unknown = ~inside | ~zapped_runs[wrun]
    w["zap_on_time"] = pd.arrays.BooleanArray(on_time, unknown)

    _invariant(corr, w, wk, wns, f, fk, tl, tk, bits, asn)
    _predictions(w, wk, u, uk, bits, asn)
    _forecast_errors(corr, w, wk, u, uk, prev_ns)
    w["vm"] = w["vm"].astype("UInt64")
    return w[COLUMNS]


def _invariant(corr: Correlation, w: pd.DataFrame, wk: np.ndarray, wns: np.ndarray,
               f: pd.DataFrame, fk: np.ndarray, tl: pd.DataFrame, tk: np.ndarray,
               bits: np.ndarray, asn: np.ndarray) -> None:
    """The per-wrap fault columns, from every mmio_fault row (a vCPU thread's
    last exit too: its SPTE evidence is whole, only its latency is not)."""
    nw = len(w)
    keep = np.isin(fk, wk)
    f, fk = f[keep], fk[keep]
    t = as_numpy(f["exit_ns"])
    fast = as_numpy(f["fast_hit"], bool, False)
    remark = as_numpy(f["remarked"], bool, False)
    evidence = fast | remark | as_numpy(f["stale"], bool, False)
    gfn = as_numpy(f["gfn"], np.int64, -1)
    gpa = as_numpy(f["gpa"], np.uint64, 0)
    gfn = np.where(gfn >= 0, gfn, (gpa >> np.uint64(12)).astype(np.int64))
    page, npage = group_ids(fk, gfn)
    npage = max(npage, 1)
    # The wrap each fault follows (same key, at or before it: that bounds a
    # wrap's faults by the next wrap), and the next wrap after it: the one
    # its mark must be dropped by.
    fw = asof_index(fk, t, wk, wns)
    same_next = np.r_[wk[1:] == wk[:-1], False]
    ids, first_w = np.unique(wk, return_index=True)
    nxt = np.where(fw >= 0, np.where(same_next[np.maximum(fw, 0)], fw + 1, -1),
                   first_w[np.maximum(_lookup(ids, fk), 0)])
    after = fw >= 0

    # Pre-wrap marks: per (wrap, page) the last mark since the previous wrap.
    mr = np.flatnonzero(remark & (nxt >= 0))
    pre_comb, pre_row = _first_per_group(nxt[mr] * npage + page[mr], t[mr], last=True)
    pre_row = mr[pre_row]
    pre_w = pre_comb // npage
    # After the wrap: per (wrap, page) the first fault with SPTE evidence and
    # the first re-mark.
    er = np.flatnonzero(evidence & after)
    post_comb, post_row = _first_per_group(fw[er] * npage + page[er], t[er])
    post_row = er[post_row]
    rr = np.flatnonzero(remark & after)
    rem_comb, rem_row = _first_per_group(fw[rr] * npage + page[rr], t[rr])
    rem_row = rr[rem_row]

    w["pages_marked_before"] = np.bincount(pre_w, minlength=nw)
    p = _lookup(post_comb, pre_comb)
    has_post = p >= 0
    prow = post_row[np.maximum(p, 0)] if len(post_row) else np.zeros(len(p), np.int64)
    mark_gen = _gen_at(bits, asn, fk[pre_row], t[pre_row], tk, tl)
    touch_gen = _gen_at(bits, asn, fk[prow], t[prow], tk, tl)
    equal = has_post & (mark_gen >= 0) & (mark_gen == touch_gen)
    w["stale_equal_pages"] = np.bincount(pre_w[equal], minlength=nw)
    rebuilt = has_post & remark[prow] & ~fast[prow]
    w["rebuilt_pages"] = np.bincount(pre_w[rebuilt], minlength=nw)
    w["evidence_faults"] = np.bincount(fw[er], minlength=nw)

    # Violations: a fast hit after the wrap on a page not re-marked since.
    fr = np.flatnonzero(fast & after)
    r = _lookup(rem_comb, fw[fr] * npage + page[fr])
    remarked_first = r >= 0
    remarked_first[remarked_first] &= t[rem_row[r[remarked_first]]] <= t[fr[remarked_first]]
    bad = fr[~remarked_first]
    w["violations"] = np.bincount(fw[bad], minlength=nw)
    bw, brow = _first_per_group(fw[bad], t[bad])
    brow = bad[brow]
    vns = np.zeros(nw, np.int64)
    vgpa = np.zeros(nw, np.uint64)
    vns[bw], vgpa[bw] = t[brow], gpa[brow]
    has_v = np.zeros(nw, bool)
    has_v[bw] = True
    spte = as_numpy(f["spte_gen"], np.int64, -1)
    text: list[str | None] = [None] * nw
    for i, row in zip(bw, brow, strict=True):
        sg = "?" if spte[row] < 0 else str(spte[row])
        text[i] = (f"fault at ns {vns[i]} on gpa {int(vgpa[i]):#x}, spte_gen {sg} "
                   "from before the wrap")
    w["first_violation"] = pd.array(text, dtype="string")
    w["violation_ns"] = pd.arrays.IntegerArray(vns, ~has_v)
    w["violation_gpa"] = pd.arrays.IntegerArray(vgpa, ~has_v)
    verdict = np.where(w["evidence_faults"].to_numpy() > 0, HELD, NO_EVIDENCE).astype(object)
    verdict[bw] = [f"violated: {text[i]}" for i in bw]
    w["verdict"] = pd.array(verdict, dtype="string")

    # The rebuild burst: slow faults from the wrap until the last page marked
    # before it was re-marked (pages never re-marked before the next wrap do
    # not extend it).
    q = _lookup(rem_comb, pre_comb)
    got = q >= 0
    burst_end = np.full(nw, _NONE)
    if got.any():
        np.maximum.at(burst_end, pre_w[got], t[rem_row[q[got]]])
    slow = np.flatnonzero(evidence & ~fast & after)
    slow = slow[t[slow] <= burst_end[fw[slow]]]
    w["burst_faults"] = np.bincount(fw[slow], minlength=nw)
    ended = burst_end > _NONE
    w["burst_ns"] = pd.arrays.IntegerArray(np.where(ended, burst_end, wns) - wns, ~ended)
    # Latencies: only exits closed by re-entering the guest are whole.
    whole = as_numpy(f["reentered"], bool, True)
    lat = as_numpy(f["latency_ns"]).astype(np.float64)
    frun = as_numpy(f["run"])
    fast_p50 = np.full(len(corr.recording.runs), np.nan)
    for rc in np.unique(frun[fast & whole]):
        fast_p50[rc] = np.median(lat[fast & whole & (frun == rc)])
    wrun = as_numpy(w["run"])
    w["fast_hit_p50_ns"] = fast_p50[wrun]
    s = slow[whole[slow]]
    extra = lat[s] - fast_p50[frun[s]]
    ok = ~np.isnan(extra)
    burst_extra = np.bincount(fw[s][ok], extra[ok], minlength=nw)
    w["burst_extra_ns"] = np.where(np.isnan(fast_p50[wrun]), np.nan, burst_extra)
    first_lat = pd.Series(lat[prow[has_post]]).where(whole[prow[has_post]])
    w["first_fault_p50_ns"] = first_lat.groupby(pre_w[has_post]).median().reindex(
        range(nw)).to_numpy(np.float64)


def _predictions(w: pd.DataFrame, wk: np.ndarray, u: pd.DataFrame, uk: np.ndarray,
                 bits: np.ndarray, asn: np.ndarray) -> None:
    """The swap at which each wrap was due: from the generation before the
    first update of its (run, VM, address space), the i-th wrap there comes
    at the i-th generation past it whose masked value is 0."""
    wrun = as_numpy(w["run"])
    period, a = np.int64(1) << bits[wrun], asn[wrun]
    lane = as_numpy(w["as_id"])
    known = u["gen_before"].notna().to_numpy()
    ub = u[known]
    ukk = uk[known]
    ulane = as_numpy(ub["gen_before"], np.int64, 0) % asn[as_numpy(ub["run"])]
    ids, row = _first_per_group(ukk * 64 + ulane, as_numpy(ub["begin_ns"]))
    g0 = as_numpy(ub["gen_before"], np.int64, 0)[row]
    pos = _lookup(ids, wk * 64 + lane)
    base = g0[np.maximum(pos, 0)] if len(g0) else np.zeros(len(w), np.int64)
    first = (base - lane) // period * period + period + lane
    ordinal = pd.Series(wk * 64 + lane).groupby(wk * 64 + lane).cumcount().to_numpy()
    pred = (first + ordinal * period) // a
    w["predicted_swap"] = pd.arrays.IntegerArray(np.where(pos >= 0, pred, 0), pos < 0)


def _forecast_errors(corr: Correlation, w: pd.DataFrame, wk: np.ndarray, u: pd.DataFrame,
                     uk: np.ndarray, prev_ns: np.ndarray) -> None:
    """analysis.forecast.wrap_forecast as it stood before each wrap: fed the
    updates since the previous wrap (or the run's start) that ended before
    this one, as if the recording had stopped at the last of them; its ETA
    from then against the wrap's recorded time."""
    rec = corr.recording
    begin, end = as_numpy(u["begin_ns"]), as_numpy(u["end_ns"])
    eta = np.zeros(len(w), np.int64)
    known = np.zeros(len(w), bool)
    for i, (run, vm) in enumerate(zip(w["run"].astype(str), w["vm"], strict=True)):
        sel = (uk == wk[i]) & (end < w.at[i, "wrap_ns"]) & (begin >= prev_ns[i])
        if not sel.any():
            continue
        stop = int(end[sel].max())
        m = dict(rec.manifests[run])
        m["stop_ns"] = stop
        if prev_ns[i] != _NONE:
            m["start_ns"] = int(prev_ns[i])
        sub = Recording(rec.frames, {run: m}, {run: rec.paths[run]}, {})
        fc = wrap_forecast(replace(corr, updates=u[sel], recording=sub))
        fc = fc[fc["vm"] == int(vm)] if len(fc) else fc
        s = fc["next_zap_all_s"].iloc[0] if len(fc) else None
        if s is not None and s == s:
            eta[i], known[i] = stop + int(round(float(s) * 1e9)), True
    w["forecast_wrap_ns"] = pd.arrays.IntegerArray(eta, ~known)
    err = np.abs(eta - as_numpy(w["wrap_ns"])) / 1e9
    w["forecast_error_s"] = np.where(known, err, np.nan)


def wraps_of(corr: Correlation) -> pd.DataFrame:
    """wrap_verdicts of a Correlation, computed once (the summary of each run
    and the report's tables all ask for it)."""
    memo = corr.__dict__
    if "_wrap_verdicts" not in memo:
        memo["_wrap_verdicts"] = wrap_verdicts(corr)
    return memo["_wrap_verdicts"]


def invariant_figure(wraps: pd.DataFrame) -> str:
    """One word for a run's wraps: "violated" if any wrap was, "held" if
    any had evidence and none was violated, "no evidence" if there were
    wraps but no SPTE evidence after any, "none" without wraps."""
    if not len(wraps):
        return "none"
    if (wraps["violations"] > 0).any():
        return "violated"
    return HELD if (wraps["verdict"] == HELD).any() else NO_EVIDENCE


__all__ = ["COLUMNS", "invariant_figure", "masked_gen", "wrap_verdicts", "wraps_of"]
