"""The generation-wrap workload on this host's /dev/kvm (vmrig/microvm/wrap.py)
and the tracer keeping up with it.

This host's KVM shows no MMIO SPTEs (kvm_pvm), so the invariant itself is
checked in the nested L1 (test_labvm_e2e.py::test_generation_wrap_in_l1);
here: the workload's own truth is exact and consistent with KVM's
generation arithmetic, and every one of its memslot swaps is recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_bcc, needs_kvm, needs_root
from tracer_procs import start_tracer

from recording.reader import read_run
from vmrig.microvm.wrap import WrapRun


@needs_kvm
def test_wrap_truth_follows_the_generation_arithmetic() -> None:
    # 12 generation bits instead of 19: the same arithmetic, a small period
    r = WrapRun(wraps=2, pages=2, change="move", touch_every=300, gen_bits=12).run()
    period = (1 << 12) // r.address_spaces
    assert r.swaps_per_wrap == period and r.swaps_per_change == 2
    assert r.mark_swap == 2  # the RAM slot and the dummy slot: one swap each
    assert r.swaps == r.mark_swap + 2 * period
    assert r.memslot_counts == {"create": 2, "move": period}  # two swaps each
    assert r.wrap_swaps == [period, 2 * period]
    assert all(b < e for b, e in r.wrap_ioctl_ns)
    assert r.final_mmio_gen == r.mark_mmio_gen == (2 * r.address_spaces) % (1 << 12)
    # A once before the swaps and once after; B also between swap blocks
    assert r.touches_a == 2
    assert r.touches_b == 2 + -(-2 * period // 300) - 1
    assert all(r.mmio_by_page[p] == {"read": 2, "write": 2} for p in r.pages_a)
    assert all(r.mmio_by_page[p] == {"read": r.touches_b, "write": r.touches_b}
               for p in r.pages_b)
    assert r.mmio_exits == 2 * r.pages * (r.touches_a + r.touches_b)
    assert r.reads_completed == r.mmio_reads


@needs_root
@needs_kvm
@needs_bcc
def test_tracer_records_every_swap_of_a_full_wrap(tmp_path: Path) -> None:
    """A whole 19-bit period of swaps (~10 s here): every memslot update
    recorded, nothing lost, the workload's side written into the run."""
    run_dir = tmp_path / "run"
    vm = subprocess.Popen([sys.executable, "-m", "vmrig.microvm", "--wrap", "1", "--wait",
                           "-o", str(tmp_path / "truth.json"), "--run-dir", str(run_dir)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert vm.stdin is not None and vm.stdout is not None
    assert vm.stdout.readline().startswith("ready")
    rec = start_tracer("record", "-p", str(vm.pid), "-o", str(run_dir))
    vm.stdin.write("go\n")
    vm.stdin.close()
    assert vm.wait(timeout=300) == 0
    _, err = rec.communicate(timeout=120)
    assert rec.returncode == 0, err
    truth = json.loads((tmp_path / "truth.json").read_text())
    run = read_run(run_dir)
    assert set(run.manifest["lost"].values()) == {0}
    mu = run.tables["memslot_update"].to_pandas()
    assert len(mu) == truth["swaps"] == sum(truth["memslot_counts"].values())
    assert (mu.ret == 0).all()
    counts = mu.change.astype(str).value_counts()
    assert counts[counts > 0].to_dict() == truth["memslot_counts"]
    acc = run.tables["mmio_access"].to_pandas()
    assert len(acc) == truth["mmio_exits"] + truth["reads_completed"]
    wl = run.tables["workload"].to_pandas()
    assert wl.action.tolist().count("wrap_swap") == 1
    assert run.manifest["workload"]["wrap_swaps"] == truth["wrap_swaps"]


@pytest.mark.parametrize("args, match", [
    (["--wrap", "1", "--pages", "9"], "wrap pages must be 2..8"),
    (["--wrap", "1", "--touch-every", "0"], "touch-every must be at least 1"),
    (["--wrap", "1", "--wrap-change", "delete"], "invalid choice"),
])
def test_bad_wrap_options_get_one_line(args: list[str], match: str) -> None:
    p = subprocess.run([sys.executable, "-m", "vmrig.microvm", *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert match in p.stderr and "Traceback" not in p.stderr
