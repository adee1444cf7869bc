"""``slotscope doctor`` against independent reads of this system."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_bcc, needs_root

TRACEFS = Path("/sys/kernel/tracing")
SLOTSCOPE = [sys.executable, "-m", "slotscope"]


@pytest.fixture(scope="module")
def doctor() -> tuple[int, dict]:
    p = subprocess.run([*SLOTSCOPE, "doctor", "--json"], capture_output=True, text=True,
                       timeout=120)
    return p.returncode, json.loads(p.stdout)


def _check(report: dict, name: str) -> dict:
    matches = [c for c in report["checks"] if c["name"] == name]
    assert len(matches) == 1, f"expected one {name!r} check"
    return matches[0]


def test_json_shape(doctor: tuple[int, dict]) -> None:
    rc, report = doctor
    assert set(report) >= {"checks", "backend", "reason", "missing", "tracer_can_run"}
    for c in report["checks"]:
        assert set(c) == {"name", "status", "detail", "fix"}
        assert c["status"] in ("OK", "WARN", "FAIL")
        assert c["status"] == "OK" or c["fix"] or c["name"] in ("kernel",), c
    assert rc == (0 if report["tracer_can_run"] else 1)
    assert _check(report, "kernel")["detail"] == os.uname().release


@needs_root
def test_kprobes_match_tracefs(doctor: tuple[int, dict]) -> None:
    _, report = doctor
    has = (TRACEFS / "kprobe_events").exists()
    assert (_check(report, "kprobes")["status"] == "OK") == has


@needs_root
def test_tracepoints_match_tracefs(doctor: tuple[int, dict]) -> None:
    _, report = doctor
    for system, names in (("kvm", ("kvm_exit", "kvm_entry", "kvm_mmio")),
                          ("kvmmmu", ("check_mmio_spte", "mark_mmio_spte",
                                      "kvm_mmu_zap_all_fast"))):
        c = _check(report, f"tracepoints {system}:*")
        present = [n for n in names if (TRACEFS / "events" / system / n).is_dir()]
        assert (c["status"] == "OK") == (len(present) == len(names))
        for n in present:
            assert n in c["detail"]


def test_kvm_module_matches_sysfs(doctor: tuple[int, dict]) -> None:
    _, report = doctor
    if not Path("/dev/kvm").exists():
        assert _check(report, "/dev/kvm")["status"] == "FAIL"
        return
    modules = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path("/sys/module", m).exists()]
    assert modules, "a /dev/kvm without a vendor module in /sys/module"
    assert _check(report, "/dev/kvm")["detail"] == f"provided by {modules[0]}"


def test_mmio_caching_matches_sysfs(doctor: tuple[int, dict]) -> None:
    _, report = doctor
    param = Path("/sys/module/kvm/parameters/mmio_caching")
    if not param.exists():
        pytest.skip("kvm not loaded: no mmio_caching parameter")
    value = param.read_text().strip()
    c = _check(report, "kvm.mmio_caching")
    assert c["detail"] == value
    assert (c["status"] == "OK") == (value == "Y")
    assert any("MMIO SPTE" in m for m in report["missing"]) == (value != "Y")


@needs_root
@needs_bcc
def test_backend_follows_kprobes(doctor: tuple[int, dict]) -> None:
    rc, report = doctor
    assert rc == 0 and report["tracer_can_run"]
    if (TRACEFS / "kprobe_events").exists():
        assert report["backend"] == "kprobe"
    else:
        assert report["backend"] in ("kfunc", "tracepoint")
        assert "kprobe:" in report["reason"]


def test_human_output_fits_80_columns() -> None:
    p = subprocess.run([*SLOTSCOPE, "doctor"], capture_output=True, text=True, timeout=120)
    assert "backend:" in p.stdout or "tracer cannot run" in p.stdout
    assert max(len(line) for line in p.stdout.splitlines()) < 80


@needs_root
def test_unprivileged_user_gets_exit_1() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    p = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
         *SLOTSCOPE, "doctor", "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": "/tmp"})
    assert p.returncode == 1, p.stderr
    report = json.loads(p.stdout)
    assert not report["tracer_can_run"]
    assert _check(report, "bcc")["status"] == "FAIL"
