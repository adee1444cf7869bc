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
from .joins import as_numpy, asof_index, nullable_int, vm_keys


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
    g = rec.generation
    g = g[(g["source"] == "invalidate").to_numpy(dtype=bool)]
    # Columns as typed arrays (codes, values + NA masks), concatenated and
    # sorted once: the rows are begin, end and invalidate steps.
    kinds = ["begin", "invalidate", "end"]
    steps = [(u, "begin_ns", "gen_before", "begin"), (u, "end_ns", "gen_after", "end")] \
        if len(u) else []
    cols: dict[str, list[np.ndarray]] = {}

    def add(**parts: np.ndarray) -> None:
        for k, v in parts.items():
            cols.setdefault(k, []).append(v)

    for frame, ns, gen, kind in steps:
        add(run=_codes(frame["run"], rec.runs), vm=_values(frame["vm"]),
            vm_na=frame["vm"].isna().to_numpy(), ns=as_numpy(frame[ns]),
            gen=_values(frame[gen]), gen_na=frame[gen].isna().to_numpy(),
            in_progress=np.full(len(frame), kind == "begin"),
            kind=np.full(len(frame), kinds.index(kind), np.int8),
            update=frame.index.to_numpy().astype(np.int64),
            change=_codes(frame["change"], list(CHANGE_TYPES)),
            zap_all=np.zeros(len(frame), bool))
    if len(g):
        add(run=_codes(g["run"], rec.runs), vm=_values(g["vm"]), vm_na=g["vm"].isna().to_numpy(),
            ns=as_numpy(g["ns"]), gen=_values(g["gen"]), gen_na=g["gen"].isna().to_numpy(),
            in_progress=g["in_progress"].fillna(False).to_numpy(dtype=bool),
            kind=np.full(len(g), kinds.index("invalidate"), np.int8),
            update=np.full(len(g), -1, np.int64), change=np.full(len(g), -1, np.int8),
            zap_all=g["zap_all"].fillna(False).to_numpy(dtype=bool))
    empty = {"run": np.int8, "vm": np.uint64, "vm_na": bool, "ns": np.int64, "gen": np.uint64,
             "gen_na": bool, "in_progress": bool, "kind": np.int8, "update": np.int64,
             "change": np.int8, "zap_all": bool}
    c = {k: np.concatenate(cols[k]) if k in cols else np.zeros(0, t) for k, t in empty.items()}
    order = np.lexsort((c["kind"], c["ns"], np.where(c["vm_na"], 0, c["vm"]), c["run"]))
    c = {k: v[order] for k, v in c.items()}
    # Invalidate rows belong to the update whose window holds them.
    inv = c["kind"] == kinds.index("invalidate")
    if inv.any() and len(u):
        lk, rk = vm_keys(pd.DataFrame({"run": c["run"][inv], "vm": c["vm"][inv]}), u)
        inv_ns = c["ns"][inv]
        j = asof_index(lk, inv_ns, rk, as_numpy(u["begin_ns"]))
        inside = j >= 0
        inside[inside] &= inv_ns[inside] <= as_numpy(u["end_ns"])[j[inside]]
        c["update"][inv] = np.where(inside, u.index.to_numpy()[np.maximum(j, 0)], -1)
    tl = pd.DataFrame({
        "run": pd.Categorical.from_codes(c["run"], categories=rec.runs),
        "vm": pd.arrays.IntegerArray(c["vm"], c["vm_na"]), "ns": c["ns"],
        "gen": pd.arrays.IntegerArray(c["gen"], c["gen_na"]), "in_progress": c["in_progress"],
        "kind": pd.Categorical.from_codes(c["kind"], categories=kinds),
        "update": nullable_int(c["update"], c["update"] < 0),
        "change": pd.Categorical.from_codes(c["change"], categories=list(CHANGE_TYPES)),
        "zap_all": c["zap_all"]}, copy=False)
    # Epoch: completed updates so far in this (run, vm); the rows are in
    # (run, vm) order, so a running count less the count before each group.
    ends = np.cumsum(c["kind"] == kinds.index("end"))
    gid = vm_keys(tl)[0]
    first = np.r_[True, gid[1:] != gid[:-1]] if len(gid) else np.zeros(0, bool)
    before = np.where(first, ends - (c["kind"] == kinds.index("end")), 0)
    tl["epoch"] = ends - np.maximum.accumulate(before) if len(tl) else []
    return tl


def _codes(s: pd.Series, categories: list[str]) -> np.ndarray:
    """A categorical's codes into ``categories`` (-1: not among them)."""
    return s.cat.set_categories(categories).cat.codes.to_numpy()


def _values(s: pd.Series) -> np.ndarray:
    """A nullable unsigned column's values (0 where NA; the mask says)."""
    return s.to_numpy(np.uint64, na_value=0)
