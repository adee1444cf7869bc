"""Checks the nested lab VM tests share: which lab kernel is here, the
kernel's tracefs output parsed, and KVM's MMIO SPTE rules as a tracefs event
stream must show them (tests/test_labvm.py, tests/test_labvm_e2e.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import needs_root

from vmrig import RigError, labvm
from vmrig import kernel as vk


def _lab_kernel() -> vk.LabKernel | None:
    try:
        return vk.lab_kernel()
    except RigError:
        return None


LAB_KERNEL = _lab_kernel()
needs_lab_kernel = pytest.mark.skipif(
    LAB_KERNEL is None,
    reason="lab kernel not fetched (sudo .venv/bin/python -m vmrig.kernel fetch)")
_MISSING = labvm._missing_parts()
needs_lab_parts = pytest.mark.skipif(
    _MISSING is not None, reason=f"lab VM parts missing: {_MISSING and _MISSING[0]}")

# What a test that boots the L1 needs, in one place: the labvm marker (the
# slow tests, -m labvm), root, the fetched lab kernel and the lab VM's parts.
BOOTS_L1 = [pytest.mark.labvm, needs_root, needs_lab_kernel, needs_lab_parts]

_Test = TypeVar("_Test", bound=Callable[..., object])


def boots_l1(test: _Test) -> _Test:
    """``BOOTS_L1`` as one decorator (a module of L1 tests sets pytestmark)."""
    for mark in BOOTS_L1:
        test = mark(test)
    return test


def parse_trace(path: Path) -> list[tuple[str, dict[str, str]]]:
    """(event, fields) per tracefs line; kprobes print k=v, kvmmmu 'key value'."""
    events = []
    for line in path.read_text().splitlines():
        m = re.search(r"\s[\d.]+: (\w+): (.*)$", line)
        if not m or line.startswith("#"):
            continue
        name, rest = m.groups()
        if name == "check_mmio_spte":
            f = re.search(r"spte (\w+) kvm_gen (\w+) spte-gen (\w+) valid (\d)", rest)
            assert f, line
            fields = dict(zip(("spte", "kvm_gen", "spte_gen", "valid"), f.groups(),
                              strict=True))
        elif name == "mark_mmio_spte":
            f = re.search(r"gfn (\w+) access (\w+) gen (\w+)", rest)
            assert f, line
            fields = dict(zip(("gfn", "access", "gen"), f.groups(), strict=True))
        else:
            fields = dict(re.findall(r"(\w+)=(\S+)", rest))
        events.append((name, fields))
    return events


def address_spaces(k: vk.LabKernel) -> int:
    """KVM_ADDRESS_SPACE_NUM from the L1 kernel's own headers (x86: 2 with SMM)."""
    src = (k.modules_dir / "source").resolve()
    for rel in ("arch/x86/include/asm/kvm_host.h", "include/linux/kvm_host.h"):
        m = re.search(r"#define KVM_ADDRESS_SPACE_NUM\s+(\d+)", (src / rel).read_text())
        if m:
            return int(m.group(1))
    raise AssertionError("KVM_ADDRESS_SPACE_NUM not found in the headers")


SWAPS = {"create": 1, "flags_only": 1, "delete": 2, "move": 2}  # kvm_set_memslot
CHANGE_CODES = {"create": 0, "delete": 1, "move": 2, "flags_only": 3}  # enum kvm_mr_change


def spte_rule_violations(events: list[tuple[str, dict[str, str]]], step: int,
                         pages: int) -> dict[str, object]:
    """Check the kernel's lazy MMIO invalidation against a tracefs event stream.

    After CREATE/FLAGS_ONLY (one swap, no zap) each page's next MMIO fault
    meets a stale SPTE (kvm_gen = spte_gen + step) and is re-marked with
    the new generation; after DELETE/MOVE (two swaps, zap_all_fast in
    between) the SPTEs are gone: no stale check, new SPTEs marked with the
    new generation.  Returns the stale/zap counts and any violations.
    """
    violations: list[str] = []
    gen = None
    last_change = None
    stale = zaps = 0
    need_stale: set[str] = set()  # gfns whose next check must be stale
    marked: dict[str, int] = {}
    for name, f in events:
        if name == "ss_memslot":
            last_change = int(f["change"])
        elif name == "ss_invmmio":
            gen = int(f["gen"])
            if last_change in (0, 3) and marked:
                need_stale = set(marked)
        elif name == "ss_zapfast":
            zaps += 1
            need_stale = set()
            marked = {}
        elif name == "check_mmio_spte":
            kvm_gen, spte_gen = int(f["kvm_gen"], 16), int(f["spte_gen"], 16)
            valid = f["valid"] == "1"
            # An MMIO SPTE holds the gfn from bit 12 (low gfns: below bit 32).
            gfn = f"{int(f['spte'], 16) >> 12 & 0xfffff:x}"
            if valid:
                if gfn in need_stale:
                    violations.append(f"fresh check on {gfn} after a memslot swap")
                continue
            stale += 1
            if kvm_gen - spte_gen != step:
                violations.append(f"stale by {kvm_gen - spte_gen}, expected {step}")
            if gfn not in need_stale:
                violations.append(f"unexpected stale check on {gfn}")
            need_stale.discard(gfn)
        elif name == "mark_mmio_spte":
            m = int(f["gen"], 16)
            if gen is not None and m != gen & ((1 << 19) - 1):
                violations.append(f"marked gen {m} != current {gen}")
            marked[f["gfn"]] = m
    del pages
    return {"violations": violations, "stale": stale, "zaps": zaps}
