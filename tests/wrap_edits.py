"""A wrap recording edited on disk into the violation a missing zap-all would
allow (tests of analysis/wrap.py and of the lab's exit status)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recording.reader import read_table
from recording.schema import SCHEMAS

AS = 2  # address spaces of the simulated VMs (x86 with SMM)


def rows(run: Path, event: str) -> list[dict[str, Any]]:
    return read_table(run, event).to_pylist()


def masked(gen: int, bits: int, asn: int = AS) -> int:
    return gen & ((1 << bits) - 1) & ~(asn - 1)


def violate(src: Path, dst: Path, bits: int) -> dict[str, Any]:
    """Copy the run and turn the first post-wrap fault of a page marked before
    the wrap into the fast hit a missing zap-all would have allowed; returns
    that fault's row as edited."""
    shutil.copytree(src, dst)
    gens = [g for g in read_table(dst, "generation").select(["ns", "gen", "source"])
            .to_pylist() if g["source"] == "invalidate"]
    wrap_ns = min(g["ns"] for g in gens if masked(g["gen"], bits) == 0)
    table = read_table(dst, "mmio_fault")
    faults = table.to_pylist()
    marked = {f["gfn"]: f["exit_ns"] for f in faults if f["remarked"] and f["exit_ns"] < wrap_ns}
    i = min((f["exit_ns"], i) for i, f in enumerate(faults)
            if f["exit_ns"] >= wrap_ns and f["gfn"] in marked)[1]
    updates = rows(dst, "memslot_update")
    earlier = [g for g in gens if g["ns"] <= marked[faults[i]["gfn"]]]
    mark_gen = masked(max(earlier, key=lambda g: g["ns"])["gen"] if earlier
                      else min(updates, key=lambda u: u["begin_ns"])["gen_before"], bits)
    faults[i].update(fast_hit=True, remarked=False, stale=False, kvm_gen=mark_gen,
                     spte_gen=mark_gen)
    edited = pa.Table.from_pylist(faults, schema=SCHEMAS["mmio_fault"])
    pq.write_table(edited, dst / "mmio_fault.parquet")
    return faults[i]
