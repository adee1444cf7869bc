"""Raw BPF event records -> rows of the recording schema (analysis.schema).

Column-wise with numpy for the high-volume types; memslot updates go
through ``SlotTracker``, which infers the change type of an ioctl-only
(tracepoint backend) update from the slot state it has seen per VM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analysis.schema import ACCESS_TYPES, CHANGE_TYPES, MMIO_GEN_BITS_DEFAULT

from .probes import EV_FAULT, EV_GEN, EV_MEMSLOT, EV_MMIO, EV_SETMEM, EV_VM, EV_ZAP, vcpu_from_comm

PAGE_SHIFT = 12
GEN_SOURCES = {1: "check", 2: "mark", 3: "invalidate"}
IN_PROGRESS = 1 << 63
MMIO_GEN_MASK = (1 << MMIO_GEN_BITS_DEFAULT) - 1
# mmio_fault bits (common.bpf.h)
F_CHECKED, F_STALE, F_REMARKED, F_FAST_HIT, F_WRITE, F_TO_USER = (1 << i for i in range(6))
EXIT_REASON_NONE = 0xFFFFFFFF

Columns = dict[str, list[Any]]


@dataclass
class _Slot:
    gpa: int
    size: int
    flags: int


@dataclass
class SlotTracker:
    """Per-VM memslot state as seen through KVM_SET_USER_MEMORY_REGION{,2}.

    A VM whose creation was traced starts with no slots, so every change is
    known.  For a VM already running when tracing began, the first update
    of a slot not seen before is 'unknown' (it may be a create, move or
    flags change); after that the slot's state is known.
    """

    vms: set[int] = field(default_factory=set)
    slots: dict[tuple[int, int], _Slot | None] = field(default_factory=dict)

    def vm_created(self, vm: int) -> None:
        self.vms.add(vm)
        for key in [k for k in self.slots if k[0] == vm]:  # vm fd reused
            del self.slots[key]

    def update(self, vm: int, slot: int, gpa: int, size: int, flags: int, ret: int) -> str:
        key = (vm, slot)
        known = key in self.slots or vm in self.vms
        old = self.slots.get(key)
        if size == 0:
            change = "delete"
        elif old is None:
            change = "create" if known else "unknown"
        elif gpa != old.gpa:
            change = "move"
        elif flags != old.flags:
            change = "flags_only"
        else:
            change = "unknown"  # no change: KVM returns 0 without touching slots
        if ret == 0:
            self.slots[key] = None if size == 0 else _Slot(gpa, size, flags)
        return change


class Decoder:
    def __init__(self) -> None:
        self.slots = SlotTracker()
        self._comm: dict[tuple[int, int], int] = {}

    def _vcpus(self, ev: np.ndarray) -> list[int]:
        out = ev["x"].tolist()
        for i, v in enumerate(out):
            if v < 0:
                key = (int(ev["pid"][i]), int(ev["tid"][i]))
                if key not in self._comm:
                    self._comm[key] = vcpu_from_comm(*key)
                out[i] = self._comm[key]
        return out

    def decode(self, ev: np.ndarray) -> dict[str, Columns]:
        """One batch of records -> {event type: columns}; empty types omitted."""
        out: dict[str, Columns] = {}
        types = ev["type"]
        # VM creations first: a batch may hold a VM's creation and its slots.
        for d in ev["d"][types == EV_VM].tolist():
            self.slots.vm_created(d)
        sel = ev[types == EV_MEMSLOT]
        if len(sel):
            out["memslot_update"] = self._memslot_ioctl(sel)
        sel = ev[types == EV_SETMEM]
        if len(sel):
            out["memslot_update"] = self._setmem(sel)
        sel = ev[types == EV_MMIO]
        if len(sel):
            out["mmio_access"] = {
                "ns": sel["ns"].tolist(), "pid": sel["pid"].tolist(),
                "tid": sel["tid"].tolist(), "vm": sel["d"].tolist(),
                "vcpu": self._vcpus(sel),
                "type": np.array(ACCESS_TYPES, dtype=object)[np.minimum(sel["e"], 2)].tolist(),
                "len": sel["f"].tolist(), "gpa": sel["a"].tolist(), "val": sel["b"].tolist(),
            }
        sel = ev[types == EV_FAULT]
        if len(sel):
            out["mmio_fault"] = self._faults(sel)
        sel = ev[types == EV_GEN]
        if len(sel):
            out["generation"] = self._gens(sel)
        sel = ev[types == EV_ZAP]
        if len(sel):
            out["zap_all"] = {"ns": sel["ns"].tolist(), "pid": sel["pid"].tolist(),
                              "tid": sel["tid"].tolist(), "vm": sel["d"].tolist(),
                              "gen": sel["a"].tolist()}
        return out

    def _memslot_ioctl(self, sel: np.ndarray) -> Columns:
        cols: Columns = {k: [] for k in (
            "begin_ns", "end_ns", "pid", "tid", "vm", "as_id", "slot_id", "change",
            "base_gfn", "npages", "flags", "userspace_addr", "gen_before", "gen_after", "ret")}
        for r in sel.tolist():
            (_t, pid, tid, ret, ns, ns2, gpa, size, uaddr, vm, slot, flags, _g, _h) = r
            change = self.slots.update(vm, slot, gpa, size, flags, ret)
            for k, v in (("begin_ns", ns), ("end_ns", ns2), ("pid", pid), ("tid", tid),
                         ("vm", vm), ("as_id", slot >> 16), ("slot_id", slot & 0xFFFF),
                         ("change", change), ("base_gfn", gpa >> PAGE_SHIFT),
                         ("npages", size >> PAGE_SHIFT), ("flags", flags),
                         ("userspace_addr", uaddr), ("gen_before", None),
                         ("gen_after", None), ("ret", ret)):
                cols[k].append(v)
        return cols

    @staticmethod
    def _setmem(sel: np.ndarray) -> Columns:
        change = np.minimum(sel["f"] >> 24, len(CHANGE_TYPES) - 1)
        return {
            "begin_ns": sel["ns"].tolist(), "end_ns": sel["ns2"].tolist(),
            "pid": sel["pid"].tolist(), "tid": sel["tid"].tolist(), "vm": sel["d"].tolist(),
            "as_id": (sel["e"] >> 16).tolist(), "slot_id": (sel["e"] & 0xFFFF).tolist(),
            "change": np.array(CHANGE_TYPES, dtype=object)[change].tolist(),
            "base_gfn": sel["a"].tolist(), "npages": sel["b"].tolist(),
            "flags": (sel["f"] & 0xFFFFFF).tolist(), "userspace_addr": sel["c"].tolist(),
            "gen_before": sel["g"].tolist(), "gen_after": sel["h"].tolist(),
            "ret": sel["x"].tolist(),
        }

    def _faults(self, sel: np.ndarray) -> Columns:
        bits = sel["c"]
        checked = (bits & F_CHECKED) != 0
        kvm_gen = (sel["b"] >> 32).tolist()
        spte_gen = (sel["b"] & 0xFFFFFFFF).tolist()
        chk = checked.tolist()
        return {
            "exit_ns": sel["ns"].tolist(),
            "latency_ns": (sel["ns2"].astype(np.int64) - sel["ns"].astype(np.int64)).tolist(),
            "pid": sel["pid"].tolist(), "tid": sel["tid"].tolist(), "vm": sel["d"].tolist(),
            "vcpu": self._vcpus(sel),
            "exit_reason": [None if r == EXIT_REASON_NONE else r for r in sel["e"].tolist()],
            "gpa": sel["a"].tolist(), "gfn": (sel["a"] >> PAGE_SHIFT).tolist(),
            "kvm_gen": [g if c else None for g, c in zip(kvm_gen, chk, strict=True)],
            "spte_gen": [g if c else None for g, c in zip(spte_gen, chk, strict=True)],
            "stale": ((bits & F_STALE) != 0).tolist(),
            "remarked": ((bits & F_REMARKED) != 0).tolist(),
            "fast_hit": ((bits & F_FAST_HIT) != 0).tolist(),
            "is_write": ((bits & F_WRITE) != 0).tolist(),
            "len": sel["f"].tolist(),
            "to_user": ((bits & F_TO_USER) != 0).tolist(),
        }

    @staticmethod
    def _gens(sel: np.ndarray) -> Columns:
        src = sel["e"].tolist()
        val = sel["a"].tolist()
        full = [v & ~IN_PROGRESS if s == 3 else None for v, s in zip(val, src, strict=True)]
        masked = [v & MMIO_GEN_MASK for v in val]
        return {
            "ns": sel["ns"].tolist(), "pid": sel["pid"].tolist(), "tid": sel["tid"].tolist(),
            "vm": sel["d"].tolist(), "gen": full,
            "in_progress": [bool(v & IN_PROGRESS) for v in val],
            "mmio_gen": masked,
            # kvm_mmu_invalidate_mmio_sptes zaps all when the masked generation,
            # address-space bit cleared, wraps to 0.
            "zap_all": [s == 3 and (m & ~1) == 0 for m, s in zip(masked, src, strict=True)],
            "source": [GEN_SOURCES.get(s, "unknown") for s in src],
        }
