"""The tracer beside other tools on the same tracepoints (this host's kernel).

A BPF program on a perf tracepoint filters that event for every perf user:
returning 0 drops it for `perf record`, `perf stat` and `perf kvm stat`
alike.  So perf must count exactly what it counts alone, against the
micro-VMM's own truth, while slotscope records; and a second slotscope
recorder must record the same rows as the first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_bcc, needs_kvm, needs_root
from tracer_procs import Workload, start_tracer

from recording.reader import read_run

PERF = shutil.which("perf")
needs_perf = pytest.mark.skipif(PERF is None, reason="needs perf (apt linux-perf; ./setup.sh)")
pytestmark = [needs_root, needs_kvm, needs_bcc]

MICROVM = [sys.executable, "-m", "vmrig.microvm", "-n", "3000", "--pages", "2",
           "--schedule", "create:1,flags:1,delete:1"]


def _attached_tracepoints() -> list[str]:
    """Every tracepoint the tracer attaches on this kernel, as perf names it
    (kvm_mmio attached raw is still the kvm:kvm_mmio tracepoint)."""
    from tracer.capabilities import probe
    from tracer.loader import program_text, tracepoint_of
    return [tracepoint_of(p) for p in program_text("tracepoint", probe(try_kfunc=False))[2]]


def _perf_stat(events: list[str], truth: Path) -> dict[str, int]:
    """perf stat's count per tracepoint over one micro-VMM run (its threads only)."""
    args = [PERF or "perf", "stat", "-x,", *(a for e in events for a in ("-e", e)),
            "--", *MICROVM, "-o", str(truth)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    counts = {}
    for line in p.stderr.splitlines():
        f = line.split(",")
        if len(f) > 2 and f[2] in events:
            counts[f[2]] = int(f[0])
    assert set(counts) == set(events), p.stderr
    return counts


def _expected(truth: dict[str, Any]) -> dict[str, int]:
    # A read exits as unsatisfied-read and is traced again when KVM completes it.
    return {"kvm:kvm_mmio": truth["mmio_exits"] + truth["reads_completed"]}


@needs_perf
def test_perf_counts_every_event_while_slotscope_records(tmp_path: Path) -> None:
    tps = _attached_tracepoints()
    assert {"kvm:kvm_mmio", "syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl",
            "sched:sched_process_exit"} <= set(tps)
    alone = _perf_stat(tps, tmp_path / "alone.json")
    truth_alone = json.loads((tmp_path / "alone.json").read_text())
    # no pid filter: the tracer's programs run (and decide) for every process
    rec = start_tracer("record", "-o", str(tmp_path / "run"), "-d", "600")
    try:
        beside = _perf_stat(tps, tmp_path / "beside.json")
    finally:
        rec.terminate()
        _, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    truth = json.loads((tmp_path / "beside.json").read_text())
    assert beside == alone, (alone, beside)
    for tp, n in _expected(truth).items():
        assert beside[tp] == n == _expected(truth_alone)[tp], (tp, beside)
    assert beside["syscalls:sys_enter_ioctl"] == beside["syscalls:sys_exit_ioctl"] > 3000
    # and slotscope still recorded that run whole
    run = read_run(tmp_path / "run")
    acc = run.tables["mmio_access"].to_pandas()
    assert (acc.pid == truth["pid"]).sum() == _expected(truth)["kvm:kvm_mmio"]
    assert set(run.manifest["lost"].values()) == {0}


def test_two_recorders_record_the_same_rows(tmp_path: Path) -> None:
    wl = Workload(3000, truth=tmp_path / "truth.json")
    recs = [start_tracer("record", "-p", str(wl.pid), "-o", str(tmp_path / f"run{i}"))
            for i in (1, 2)]
    truth = wl.go()
    for r in recs:
        _, err = r.communicate(timeout=60)
        assert r.returncode == 0, err
    runs = [read_run(tmp_path / f"run{i}") for i in (1, 2)]
    # each program stamps its own clock reads: compare what the events say
    cols = {"memslot_update": ["vm", "slot_id", "as_id", "change", "base_gfn", "npages",
                               "flags", "userspace_addr", "ret"],
            "mmio_access": ["vm", "tid", "vcpu", "gpa", "type", "len"],
            "mmio_fault": ["vm", "tid", "vcpu", "gpa", "is_write", "reentered"]}
    for table, keep in cols.items():
        a, b = (r.tables[table].to_pandas()[keep] for r in runs)
        assert len(a) > 0 and a.equals(b), table
    assert len(runs[0].tables["memslot_update"]) == len(truth["memslot_changes"])
    assert len(runs[0].tables["mmio_fault"]) == truth["mmio_exits"]
    for r in runs:
        assert set(r.manifest["lost"].values()) == {0}
