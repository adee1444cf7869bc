"""Raw BPF event records -> rows of the recording schema (recording/schema.py).

Column-wise with numpy for the high-volume types; memslot updates go
through ``SlotTracker``, which infers the change type of an ioctl-only
(tracepoint backend) update from the slot state it has seen per VM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from recording.schema import (
    ACCESS_TYPES,
    CHANGE_TYPES,
    GEN_IN_PROGRESS_BIT,
    MMIO_GEN_BITS_DEFAULT,
    SCHEMAS,
)

from .events import (
    EV_FAULT,
    EV_GEN,
    EV_MEMSLOT,
    EV_MMIO,
    EV_SETMEM,
    EV_VM,
    EV_ZAP,
    EXIT_REASON_NONE,
    F_CHECKED,
    F_FAST_HIT,
    F_REMARKED,
    F_STALE,
    F_TO_USER,
    F_UNFINISHED,
    F_WRITE,
)
from .procfs import vcpu_from_comm

PAGE_SHIFT = 12
IN_PROGRESS = 1 << GEN_IN_PROGRESS_BIT
MMIO_GEN_MASK = (1 << MMIO_GEN_BITS_DEFAULT) - 1



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


def _col(field: pa.Field, v: Any) -> pa.Array:
    """numpy / list / (values, null mask) / (codes, labels) -> an Arrow column."""
    if pa.types.is_dictionary(field.type):
        codes, labels = v
        return pa.DictionaryArray.from_arrays(
            pa.array(np.asarray(codes, dtype=np.int8)), pa.array(list(labels), pa.string()))
    if isinstance(v, tuple):
        values, mask = v
        return pa.array(values, type=field.type, mask=mask)
    return pa.array(v, type=field.type)


def table(event: str, cols: dict[str, Any]) -> pa.Table:
    schema = SCHEMAS[event]
    return pa.Table.from_arrays([_col(f, cols[f.name]) for f in schema], schema=schema)


class Decoder:
    def __init__(self) -> None:
        self.slots = SlotTracker()
        self._comm: dict[tuple[int, int], int] = {}
        # pid -> its only VM's id, for rows whose VM fd the programs did not
        # know yet (vCPUs of a VM created before attaching, first moments)
        self.sole_vm: dict[int, int] = {}

    def _vcpus(self, ev: np.ndarray) -> np.ndarray:
        out = ev["x"].astype(np.int32)
        for i in np.flatnonzero(out < 0):
            key = (int(ev["pid"][i]), int(ev["tid"][i]))
            if key not in self._comm:
                self._comm[key] = vcpu_from_comm(*key)
            out[i] = self._comm[key]
        return out

    def decode(self, ev: np.ndarray) -> dict[str, pa.Table]:
        """One batch of records -> {event type: table}; empty types omitted."""
        out: dict[str, pa.Table] = {}
        types = ev["type"]
        # VM creations first: a batch may hold a VM's creation and its slots.
        for d in ev["d"][types == EV_VM].tolist():
            self.slots.vm_created(d)
        for kind, fn in ((EV_MEMSLOT, self._memslot_ioctl), (EV_SETMEM, self._setmem),
                         (EV_MMIO, self._mmio), (EV_FAULT, self._faults),
                         (EV_GEN, self._gens), (EV_ZAP, self._zaps)):
            sel = ev[types == kind]
            if len(sel):
                name, cols = fn(sel)
                out[name] = table(name, cols)
        return out

    def _ids(self, sel: np.ndarray) -> dict[str, Any]:
        vm = sel["d"]
        if self.sole_vm:
            unknown = (vm & 0xFFFFFFFF) == 0
            if unknown.any():
                vm = vm.copy()
                # a copy: Recorder.add_pid may add to it from another thread
                for pid, vm_id in list(self.sole_vm.items()):
                    vm[unknown & (sel["pid"] == pid)] = vm_id
        return {"pid": sel["pid"], "tid": sel["tid"], "vm": vm}

    def _mmio(self, sel: np.ndarray) -> tuple[str, dict[str, Any]]:
        return "mmio_access", {
            "ns": sel["ns"].astype(np.int64), **self._ids(sel), "vcpu": self._vcpus(sel),
            "type": (np.minimum(sel["e"], 2), ACCESS_TYPES),
            "len": sel["f"].astype(np.uint8), "gpa": sel["a"], "val": sel["b"],
        }

    def _zaps(self, sel: np.ndarray) -> tuple[str, dict[str, Any]]:
        return "zap_all", {"ns": sel["ns"].astype(np.int64), **self._ids(sel),
                           "gen": sel["a"]}

    def _memslot_ioctl(self, sel: np.ndarray) -> tuple[str, dict[str, Any]]:
        changes = [CHANGE_TYPES.index(self.slots.update(vm, slot, gpa, size, flags, ret))
                   for vm, slot, gpa, size, flags, ret in zip(
                       sel["d"].tolist(), sel["e"].tolist(), sel["a"].tolist(),
                       sel["b"].tolist(), sel["f"].tolist(), sel["x"].tolist(), strict=True)]
        unknown = np.ones(len(sel), dtype=bool)
        return "memslot_update", {
            "begin_ns": sel["ns"].astype(np.int64), "end_ns": sel["ns2"].astype(np.int64),
            **self._ids(sel), "as_id": (sel["e"] >> 16).astype(np.uint16),
            "slot_id": (sel["e"] & 0xFFFF).astype(np.uint16), "change": (changes, CHANGE_TYPES),
            "base_gfn": sel["a"] >> PAGE_SHIFT, "npages": sel["b"] >> PAGE_SHIFT,
            "flags": sel["f"], "userspace_addr": sel["c"],
            # the ioctl does not show KVM's generation
            "gen_before": (np.zeros(len(sel), np.uint64), unknown),
            "gen_after": (np.zeros(len(sel), np.uint64), unknown),
            "ret": sel["x"],
        }

    def _setmem(self, sel: np.ndarray) -> tuple[str, dict[str, Any]]:
        return "memslot_update", {
            "begin_ns": sel["ns"].astype(np.int64), "end_ns": sel["ns2"].astype(np.int64),
            **self._ids(sel), "as_id": (sel["e"] >> 16).astype(np.uint16),
            "slot_id": (sel["e"] & 0xFFFF).astype(np.uint16),
            "change": (np.minimum(sel["f"] >> 24, len(CHANGE_TYPES) - 1), CHANGE_TYPES),
            "base_gfn": sel["a"], "npages": sel["b"], "flags": sel["f"] & 0xFFFFFF,
            "userspace_addr": sel["c"], "gen_before": sel["g"], "gen_after": sel["h"],
            "ret": sel["x"],
        }

    def _faults(self, sel: np.ndarray) -> tuple[str, dict[str, Any]]:
        bits = sel["c"]
        unchecked = (bits & F_CHECKED) == 0
        reason = sel["e"]
        return "mmio_fault", {
            "exit_ns": sel["ns"].astype(np.int64),
            "latency_ns": sel["ns2"].astype(np.int64) - sel["ns"].astype(np.int64),
            **self._ids(sel), "vcpu": self._vcpus(sel),
            "exit_reason": (reason, reason == EXIT_REASON_NONE),
            "gpa": sel["a"], "gfn": sel["a"] >> PAGE_SHIFT,
            "kvm_gen": ((sel["b"] >> 32).astype(np.uint32), unchecked),
            "spte_gen": ((sel["b"] & 0xFFFFFFFF).astype(np.uint32), unchecked),
            "stale": (bits & F_STALE) != 0, "remarked": (bits & F_REMARKED) != 0,
            "fast_hit": (bits & F_FAST_HIT) != 0, "is_write": (bits & F_WRITE) != 0,
            "len": sel["f"].astype(np.uint8), "to_user": (bits & F_TO_USER) != 0,
            "reentered": (bits & F_UNFINISHED) == 0,
        }

    def _gens(self, sel: np.ndarray) -> tuple[str, dict[str, Any]]:
        src = sel["e"]
        val = sel["a"]
        inval = src == 3
        masked = (val & MMIO_GEN_MASK).astype(np.uint32)
        sources = ("unknown", "check", "mark", "invalidate")
        return "generation", {
            "ns": sel["ns"].astype(np.int64), **self._ids(sel),
            # check/mark carry only the masked MMIO generation
            "gen": (val & np.uint64(~IN_PROGRESS & (2**64 - 1)), ~inval),
            "in_progress": (val & np.uint64(IN_PROGRESS)) != 0,
            "mmio_gen": masked,
            # kvm_mmu_invalidate_mmio_sptes zaps all when the masked generation,
            # address-space bit cleared, wraps to 0.
            "zap_all": inval & ((masked & ~np.uint32(1)) == 0),
            "source": (np.where(src <= 3, src, 0), sources),
        }


HistRows = list[tuple[tuple[int, ...], int, int]]


def hist_delta(cur: dict[tuple[int, ...], tuple[int, int]],
               prev: dict[tuple[int, ...], tuple[int, int]]) -> HistRows:
    """(key, count, sum ns) grown since ``prev``: cumulative in-kernel
    histograms -> per-interval rows."""
    out = []
    for key, (count, total) in cur.items():
        c0, t0 = prev.get(key, (0, 0))
        if count > c0:
            out.append((key, count - c0, total - t0))
    return out


def _hist_columns(rows: HistRows, names: tuple[str, ...]) -> dict[str, Any]:
    # Python ints per column: keys mix signed (vCPU -1) and full-range u64 (VM)
    cols: dict[str, Any] = {n: [k[i] for k, _, _ in rows] for i, n in enumerate(names)}
    cols["count"] = [c for _, c, _ in rows]
    cols["sum_ns"] = [t for _, _, t in rows]
    return cols


def exit_hist_table(now: int, rows: HistRows) -> pa.Table:
    """Probes.histograms() exit keys: (pid, reason, log2 ns)."""
    c = _hist_columns(rows, ("pid", "exit_reason", "log2_ns"))
    return table("exit_hist", {**c, "ns": [now] * len(rows)})


def mmio_hist_table(now: int, rows: HistRows) -> pa.Table:
    """Probes.histograms() MMIO keys: (pid, vm, vcpu, reason, bits, log2 ns)."""
    c = _hist_columns(rows, ("pid", "vm", "vcpu", "exit_reason", "bits", "log2_ns"))
    bits = np.array(c.pop("bits"), dtype=np.uint32)
    reason = np.array(c["exit_reason"], dtype=np.uint32)
    c["exit_reason"] = (reason, reason == EXIT_REASON_NONE)
    for name, flag in (("checked", F_CHECKED), ("stale", F_STALE), ("remarked", F_REMARKED),
                       ("fast_hit", F_FAST_HIT), ("is_write", F_WRITE),
                       ("to_user", F_TO_USER)):
        c[name] = (bits & flag) != 0
    c["reentered"] = (bits & F_UNFINISHED) == 0
    return table("mmio_hist", {**c, "ns": [now] * len(rows)})
