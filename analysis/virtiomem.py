"""virtio-mem with dynamic memslots: each resize step against QEMU's own report.

With ``dynamic-memslots=on`` (QEMU >= 8.2) a virtio-mem device's region is
split into memslots that QEMU maps only while blocks in them are plugged.
The rig (vmrig.virtiomem.virtio_mem_steps) logs, before the first step and
after each, the device's mapped memslots as QEMU's ``info mtree`` lists them
(``event:memslots`` rows of the workload table: ``size`` = how many,
``detail.memslots`` = which).  Between two such reports the recording must
hold exactly one KVM memslot creation per memslot QEMU added and one
deletion per memslot it removed, in address space 0, inside the device's
guest-physical range (``memaddr``, ``max_size`` in workload.json).  (With
SMM the same regions also appear in address space 1.)
"""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd

from recording.reader import read_run

__all__ = ["memslot_steps"]


def memslot_steps(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per resize step of a virtio-mem run: the requested size,
    the memslots QEMU added and removed, the KVM memslot creations and
    deletions recorded in the device's range, and ``ok`` when they agree.
    Empty for a run without memslot reports (not virtio-mem, or old)."""
    run = read_run(run_dir)
    params: dict[str, Any] = (run.manifest.get("workload") or {}).get("params") or {}
    wl = run.tables["workload"].to_pandas()
    reports = wl[wl["action"] == "event:memslots"].sort_values("begin_ns")
    cols = ["step", "requested", "begin_ns", "end_ns", "qemu_memslots", "added", "removed",
            "created", "deleted", "ok"]
    if reports.empty or params.get("memaddr") is None:
        return pd.DataFrame(columns=cols)
    lo = int(params["memaddr"])
    hi = lo + int(params["max_size"])
    upd = run.tables["memslot_update"].to_pandas()
    gpa = upd["base_gfn"].astype("int64") * 4096
    upd = upd[(upd["as_id"] == 0) & (upd["ret"] == 0) & (gpa >= lo) & (gpa < hi)]
    rows = []
    prev = None
    for i, (_, rep) in enumerate(reports.iterrows()):
        detail = json.loads(rep["detail"])
        slots = set(detail["memslots"])
        if prev is not None:
            begin, before = prev
            # an ioctl belongs to the step whose report follows it
            window = upd[(upd["begin_ns"] > begin) & (upd["begin_ns"] <= rep["begin_ns"])]
            created = int((window["change"] == "create").sum())
            deleted = int((window["change"] == "delete").sum())
            added, removed = len(slots - before), len(before - slots)
            rows.append({"step": i, "requested": int(detail["requested"]), "begin_ns": begin,
                         "end_ns": int(rep["begin_ns"]), "qemu_memslots": len(slots),
                         "added": added, "removed": removed, "created": created,
                         "deleted": deleted, "ok": created == added and deleted == removed
                         and len(window) == created + deleted})
        prev = (int(rep["begin_ns"]), slots)
    return pd.DataFrame(rows, columns=cols)
