"""The micro-VMM's ground truth: what it asked of KVM and what its guest did.

A Result is exact (the VMM issued every memslot ioctl and saw or drained
every MMIO access); the tracer tests and benchmark compare recordings with
it.  ``python -m vmrig.microvm`` prints it as JSON, and write_workload
stores it as the rig's side of a recording.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Self

from vmrig.microvm.guest import MMIO_GPA, PAGE

ACCESS_KINDS = ("read", "write")  # index = kvm_run.mmio.is_write


@dataclass
class MemslotChange:
    """One KVM_SET_USER_MEMORY_REGION ioctl as this VMM issued it."""

    change: str            # create | delete | move | flags_only (schema names)
    slot: int              # as_id << 16 | id (as_id is always 0 here)
    gpa: int
    size: int              # memory_size passed (0 for delete)
    flags: int
    userspace_addr: int
    ret: int               # 0 or -errno
    begin_ns: int
    end_ns: int
    after_mmio: int        # vCPU 0's MMIO accesses (exits, + in-kernel if coalesced) before it
    phase: str             # setup | schedule


@dataclass(kw_only=True)
class ExitCounts:
    """The exits every micro-VMM loop counts: per vCPU (VcpuCounts) and per
    run (Result, WrapResult).  Keyword-only, so a record's own fields keep
    their positions."""

    # MMIO accesses (each one kvm:kvm_mmio event); in coalesced mode the sum
    # of mmio_user_exits (ring full) and mmio_in_kernel (ring entries)
    mmio_exits: int = 0
    mmio_reads: int = 0
    mmio_writes: int = 0
    reads_completed: int = 0  # reads KVM finished on re-entry (kvm_mmio 'read')
    pio_exits: int = 0


@dataclass
class VcpuCounts(ExitCounts):
    """One vCPU's loop: its MMIO exits to user space and port I/O; in
    coalesced mode the ring entries it wrote are added by ``tally``."""

    vcpu: int
    tid: int
    mmio_user_exits: int = 0
    mmio_in_kernel: int = 0
    by_page: list[list[int]] = field(default_factory=list)  # [page][read, write]

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        del d["by_page"]
        return d


class GroundTruth:
    """JSON in and out for a dataclass run record holding ``memslot_changes``
    (Result here, WrapResult in vmrig.microvm.wrap)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """The record ``as_dict`` gave (the JSON ground truth read back)."""
        return cls(**{**d, "memslot_changes": [MemslotChange(**c)
                                                for c in d["memslot_changes"]]})


@dataclass
class Result(GroundTruth, ExitCounts):
    pid: int
    tid: int
    vm_fd: int
    pages: int
    access: str
    vcpus: int = 1
    mode: str = "exit"     # exit: every access exits to user space | coalesced
    loop: str = "python"   # the exit loop's language: python | c (--native)
    guest_spin: int = 0    # the guest's busy-loop iterations after each access
    mmio_user_exits: int = 0
    mmio_in_kernel: int = 0
    in_kernel_by_page: dict[str, int] = field(default_factory=dict)
    batch: int = 0         # coalesced: most writes per guest batch request
    mmio_by_page: dict[str, dict[str, int]] = field(default_factory=dict)
    other_exits: dict[str, int] = field(default_factory=dict)
    memslot_changes: list[MemslotChange] = field(default_factory=list)
    memslot_counts: dict[str, int] = field(default_factory=dict)
    start_ns: int = 0
    stop_ns: int = 0
    run_seconds: float = 0.0
    mmio_exits_per_s: float = 0.0
    # user + system CPU of this process during the run: unlike the exit
    # rate, barely moved by other load on the host; a tracer's in-kernel
    # cost lands here (as system time of the vCPU threads)
    cpu_seconds: float = 0.0
    per_vcpu: list[dict[str, Any]] = field(default_factory=list)  # VcpuCounts.summary()

    def record_change(self, c: MemslotChange) -> None:
        self.memslot_changes.append(c)
        key = c.change if c.ret == 0 else f"{c.change}_failed"
        self.memslot_counts[key] = self.memslot_counts.get(key, 0) + 1

    def tally(self, stats: list[VcpuCounts], in_kernel: list[list[int]] | None) -> None:
        """Totals from the vCPU loops' counts and, in coalesced mode, the
        ring entries drained per [vcpu][page] (writes KVM completed itself)."""
        for v in stats:
            kin = in_kernel[v.vcpu] if in_kernel else [0] * self.pages
            v.mmio_in_kernel = sum(kin)
            v.mmio_exits += v.mmio_in_kernel
            v.mmio_writes += v.mmio_in_kernel
            for p, k in enumerate(kin):
                v.by_page[p][1] += k
        self.per_vcpu = [v.summary() for v in stats]
        self.tid = stats[0].tid
        for name in ("mmio_exits", "mmio_user_exits", "mmio_in_kernel", "mmio_reads",
                     "mmio_writes", "reads_completed", "pio_exits"):
            setattr(self, name, sum(getattr(v, name) for v in stats))
        self.in_kernel_by_page = {_page(p): sum(k[p] for k in in_kernel)
                                  for p in range(self.pages)} if in_kernel else {}
        self.mmio_by_page = {
            _page(p): {kind: sum(v.by_page[p][j] for v in stats)
                       for j, kind in enumerate(ACCESS_KINDS)}
            for p in range(self.pages)}


def _page(p: int) -> str:
    return f"{MMIO_GPA + p * PAGE:#x}"


def expected_mmio_events(r: Result) -> dict[str, int]:
    """kvm:kvm_mmio events this run makes: a read exits as 'unsatisfied-read'
    and traces 'read' again when KVM completes it on the next KVM_RUN."""
    return {"unsatisfied-read": r.mmio_reads, "read": r.reads_completed,
            "write": r.mmio_writes}


def write_workload(run_dir: str | os.PathLike[str], r: Result) -> None:
    """The run as the rig's side of a recording: ``workload.json`` (counts) and
    a ``workload`` table with one row per memslot ioctl and one for the MMIO loop."""
    from recording.writer import write_table, write_workload_config
    summary = r.as_dict()
    summary.pop("memslot_changes")
    write_workload_config(run_dir, {"workload": "microvm", **summary})
    rows = [(c.begin_ns, c.end_ns, f"memslot_{c.change}", f"slot {c.slot}", c.size, c.ret == 0,
             None if c.ret == 0 else os.strerror(-c.ret),
             json.dumps({"gpa": c.gpa, "flags": c.flags, "userspace_addr": c.userspace_addr,
                         "after_mmio": c.after_mmio, "phase": c.phase}))
            for c in r.memslot_changes]
    rows.append((r.start_ns, r.stop_ns, "mmio_loop", f"{r.pages} pages", r.pages * PAGE, True,
                 None, json.dumps({"mmio_exits": r.mmio_exits, "reads": r.mmio_reads,
                                   "writes": r.mmio_writes, "access": r.access, "mode": r.mode,
                                   "mmio_user_exits": r.mmio_user_exits,
                                   "mmio_in_kernel": r.mmio_in_kernel})))
    rows.sort(key=lambda x: x[0])
    names = ("begin_ns", "end_ns", "action", "target", "size", "ok", "error", "detail")
    write_table(run_dir, "workload", {n: [row[i] for row in rows] for i, n in enumerate(names)})


def write_run_workload(run_dir: str | os.PathLike[str], truth: dict[str, Any]) -> None:
    """``write_workload`` (or the wrap's) from the JSON ground truth of
    either run: what ``--run-dir`` writes, done by a process that has
    pyarrow loaded already (the lab's, not the micro-VMM in a TCG L1)."""
    from vmrig.microvm.wrap import WrapResult, write_wrap_workload
    if truth.get("workload") == WrapResult.workload:
        write_wrap_workload(run_dir, WrapResult.from_dict(truth))
    else:
        write_workload(run_dir, Result.from_dict(truth))
