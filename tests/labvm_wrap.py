"""The generation-wrap L2 of the lab VM's end-to-end run (the L1 side).

``python -m vmrig.microvm --wrap 1`` drives address space 0's memslot
generation through one full wrap of its masked MMIO bits while the e2e
kprobe recorder records every process.  tracefs counts the same two kernel
functions on its own: kprobes on kvm_mmu_invalidate_mmio_sptes and
kvm_mmu_zap_all_fast, each with a hist trigger keyed by pid (in-kernel
counters: a quarter million calls never overflow them, as they would the
trace buffer).  Written to OUT: ``wrap-truth.json`` (the workload's ground
truth) and ``wrap-tracefs.json`` (the counts, by pid).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
PROBES = {"ss_wrap_inv": "kvm_mmu_invalidate_mmio_sptes", "ss_wrap_zap": "kvm_mmu_zap_all_fast"}
HIST = "hist:keys=common_pid:vals=hitcount:size=256"
TIMEOUT_S = 1200  # ~2 min at the ~2-3k swaps/s a TCG L1 allows; a hung L2 is killed


def _write(path: Path, text: str) -> None:
    # os.write with O_APPEND: tracefs refuses Python's seek to the end.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _counts(event: str) -> dict[int, int]:
    text = (TRACEFS / "events/kprobes" / event / "hist").read_text()
    return {int(p): int(n) for p, n in
            re.findall(r"common_pid:\s*(\d+)\s*\}\s*hitcount:\s*(\d+)", text)}


def run_wrap(repo: Path, scratch: Path, out: Path) -> dict[str, object]:
    """Run the wrap L2 under tracefs' counters; its status for inner.json."""
    truth = scratch / "wrap-truth.json"
    vm = subprocess.Popen([sys.executable, "-m", "vmrig.microvm", "--wrap", "1", "--pages",
                           "2", "--wait", "-o", str(truth)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=repo)
    assert vm.stdin is not None and vm.stdout is not None
    if vm.stdout.readline().split()[:1] != ["ready"]:
        vm.kill()
        return {"rc": None, "error": "the wrap micro-VMM did not get ready"}
    for name, fn in PROBES.items():
        _write(TRACEFS / "kprobe_events", f"p:{name} {fn}\n")
        _write(TRACEFS / "events/kprobes" / name / "trigger", HIST + "\n")
    status: dict[str, object] = {"pid": vm.pid}
    t = time.monotonic()
    try:
        vm.stdin.write("go\n")
        vm.stdin.flush()
        try:
            status["rc"] = vm.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            vm.kill()
            vm.wait()
            status["rc"] = 124
        status["seconds"] = round(time.monotonic() - t, 1)
        counts = {name: _counts(name).get(vm.pid, 0) for name in PROBES}
        status["tracefs"] = counts
        (out / "wrap-tracefs.json").write_text(json.dumps(
            {"pid": vm.pid, "invalidate_mmio_sptes": counts["ss_wrap_inv"],
             "zap_all_fast": counts["ss_wrap_zap"]}, indent=1))
    finally:
        for name in PROBES:
            _write(TRACEFS / "events/kprobes" / name / "trigger", f"!{HIST}\n")
            _write(TRACEFS / "kprobe_events", f"-:{name}\n")
    if truth.exists():
        (out / "wrap-truth.json").write_text(truth.read_text())
    return status
