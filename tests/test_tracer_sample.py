"""The saved host recording (tests/data/host-microvm) agrees with its own workload.

A real `slotscope record` of the micro-VMM on this host (tracepoint-only
backend, kvm_pvm), kept for the analysis tests; this checks it stays a
faithful example: every memslot ioctl the VMM made is one row with the
same change, slot, gpa and size, and every MMIO exit one mmio_access row.
"""

from __future__ import annotations

import json
from pathlib import Path

from recording.reader import read_run

RUN = Path(__file__).parent / "data" / "host-microvm"


def test_sample_matches_workload() -> None:
    run = read_run(RUN)
    assert run.complete and run.manifest["backend"] == "tracepoint"
    assert set(run.manifest["lost"].values()) == {0}
    wl = run.tables["workload"].to_pylist()
    slots = [w for w in wl if w["action"].startswith("memslot_")]
    rows = run.tables["memslot_update"].to_pylist()
    assert len(rows) == len(slots) == 9
    for row, w in zip(rows, slots, strict=True):
        detail = json.loads(w["detail"])
        assert f"memslot_{row['change']}" == w["action"]
        assert f"slot {row['slot_id']}" == w["target"]
        assert row["base_gfn"] << 12 == detail["gpa"] and row["npages"] << 12 == w["size"]
        assert row["flags"] == detail["flags"]
    exits = [t for t in run.tables["mmio_access"].column("type").to_pylist() if t != "read"]
    assert len(exits) == run.manifest["workload"]["mmio_exits"] == 3000


LAB = Path(__file__).parent / "data" / "labvm-microvm-kprobe"


def test_lab_kprobe_sample() -> None:
    """The same workload recorded with the kprobe backend inside the nested lab
    VM (Debian 6.1 L1, real KVM with MMIO SPTEs): kvm_set_memslot rows carry
    the kernel's change type and generations (+2 per swap; DELETE and MOVE
    swap twice), and MMIO faults carry the MMIO SPTE state."""
    run = read_run(LAB)
    m = run.manifest
    assert m["backend"] == "kprobe" and m["complete"] and set(m["lost"].values()) == {0}
    slots = [w for w in run.tables["workload"].to_pylist() if w["action"].startswith("memslot_")]
    rows = run.tables["memslot_update"].to_pylist()
    assert [f"memslot_{r['change']}" for r in rows] == [w["action"] for w in slots]
    step = {"create": 2, "flags_only": 2, "move": 4, "delete": 4}
    for r in rows:
        assert r["gen_after"] - r["gen_before"] == step[r["change"]]
    inval = [g for g in run.tables["generation"].to_pylist() if g["source"] == "invalidate"]
    assert len(inval) == sum(step[r["change"]] // 2 for r in rows)
    faults = run.tables["mmio_fault"].to_pandas()
    # schema v1: the last exit, never re-entered, was not recorded then; the
    # column added in v2 reads as what v1 rows were
    assert len(faults) == m["workload"]["mmio_exits"] - 1
    assert run.tables["mmio_fault"]["reentered"].null_count == 0 and faults.reentered.all()
    assert (faults.exit_reason == 0x400).all()            # SVM nested page fault
    assert faults.stale.sum() >= 1 and faults.fast_hit.sum() > len(faults) // 3
