"""Memslot updates numbered into epochs, and each VM's generation over time.

An update's *epoch* is its ordinal among the completed updates of its run and
VM (failed ioctls open none).  The timeline is the generation of each VM as
a step function: update begin (in progress), each
kvm_mmu_invalidate_mmio_sptes call and update end.  The correlation joins
faults against both; the plots draw the timeline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recording.schema import CHANGE_TYPES

from .frames import Recording
from .joins import as_numpy, asof_index, vm_keys


def _valid_updates(upd: pd.DataFrame) -> np.ndarray:
    return as_numpy(upd["ret"], np.int64, 0) == 0


def update_frame(rec: Recording) -> pd.DataFrame:
    """memslot_update plus ordinal ``epoch`` per VM and the workload action."""
    upd = rec.memslot_update.copy()
    upd.index.name = "update"
    ok = _valid_updates(upd)
    upd["ok"] = ok
    # Order within each (run, vm) by end time: the epoch number of the update.
    gid = vm_keys(upd)[0]
    order = np.lexsort((as_numpy(upd["end_ns"]), gid))
    epoch = np.zeros(len(upd), np.int64)
    epoch[order] = pd.Series(ok[order].astype(np.int64)).groupby(gid[order]).cumsum()
    upd["epoch"] = pd.array(np.where(ok, epoch, 0), dtype="Int64")
    upd.loc[~ok, "epoch"] = pd.NA
    upd["duration_ns"] = as_numpy(upd["end_ns"]) - as_numpy(upd["begin_ns"])
    upd["action"] = _workload_action(rec, upd)
    return upd


def _workload_action(rec: Recording, upd: pd.DataFrame) -> pd.Categorical:
    """The rig action whose [begin, end] holds the update's begin, if any."""
    wl = rec.workload
    actions = ["(none)"] + sorted(set(wl["action"].dropna().astype(str)))
    codes = np.zeros(len(upd), np.int32)
    if len(wl) and len(upd):
        wl_ok = wl.dropna(subset=["begin_ns"])
        j = asof_index(as_numpy(upd["run"]), as_numpy(upd["begin_ns"]),
                       as_numpy(wl_ok["run"]), as_numpy(wl_ok["begin_ns"]))
        hit = j >= 0
        wl_end = as_numpy(wl_ok["end_ns"], np.int64, np.iinfo(np.int64).max)
        hit[hit] &= as_numpy(upd["begin_ns"])[hit] <= wl_end[j[hit]]
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
                "ns": as_numpy(u[ns]), "gen": u[gen].astype("UInt64").to_numpy(),
                "in_progress": inprog, "kind": kind, "update": idx,
                "change": u["change"].to_numpy(), "zap_all": False}))
    g = rec.generation
    g = g[g["source"] == "invalidate"]
    if len(g):
        parts.append(pd.DataFrame({
            "run": g["run"].to_numpy(), "vm": g["vm"].to_numpy(), "ns": as_numpy(g["ns"]),
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
    tl["change"] = pd.Categorical(tl["change"], categories=list(CHANGE_TYPES))
    tl["update"] = tl["update"].astype("Int64")
    tl.loc[tl["update"] < 0, "update"] = pd.NA
    kind_order = tl["kind"].cat.codes.to_numpy()
    tl = tl.iloc[np.lexsort((kind_order, as_numpy(tl["ns"]), as_numpy(tl["vm"], np.uint64, 0),
                             as_numpy(tl["run"])))].reset_index(drop=True)
    # Invalidate rows belong to the update whose window holds them.
    if len(tl) and len(u):
        inv = (tl["kind"] == "invalidate").to_numpy()
        if inv.any():
            lk, rk = vm_keys(tl[inv], u)
            inv_ns = as_numpy(tl.loc[inv, "ns"])
            j = asof_index(lk, inv_ns, rk, as_numpy(u["begin_ns"]))
            inside = j >= 0
            inside[inside] &= inv_ns[inside] <= as_numpy(u["end_ns"])[j[inside]]
            upd_idx = np.where(inside, u.index.to_numpy()[np.maximum(j, 0)], -1)
            tl.loc[inv, "update"] = pd.array(upd_idx, dtype="Int64")
            tl.loc[tl["update"] < 0, "update"] = pd.NA
    # Epoch: completed updates so far in this (run, vm).
    ends = (tl["kind"] == "end").to_numpy().astype(np.int64)
    gid = vm_keys(tl)[0]
    tl["epoch"] = pd.Series(ends).groupby(gid).cumsum().to_numpy() if len(tl) else []
    return tl
