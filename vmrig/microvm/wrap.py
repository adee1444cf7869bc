"""The generation-wrap workload: MMIO SPTEs meet their own masked generation
one full wrap later (the case the 2019 KVM patch removing the wraparound
hack said was never tested).

x86 KVM tags an MMIO SPTE with the low MMIO_GEN_BITS (19) of the memslot
generation.  Each memslot swap adds the VM's number of address spaces (2
with SMM) to address space 0's generation, which starts at 0, so its masked
generation is 0 again after 2**19 / 2 = 262,144 swaps; then
kvm_mmu_invalidate_mmio_sptes zaps every shadow page.  Without that zap, an
SPTE marked exactly one period earlier would pass check_mmio_spte.

The run, on one VM with one vCPU and two sets of ``pages`` MMIO pages:
1. setup: the RAM slot and a one-page dummy slot (CREATE: a swap each);
2. mark: the guest touches page set A, then B, so both are marked at the
   current masked generation gA;
3. swaps: exactly ``wraps`` periods of further swaps on the dummy slot
   (``change`` repeated: FLAGS_ONLY toggles dirty logging, one swap each;
   MOVE moves the slot back and forth, two each), touching B every
   ``touch_every`` swaps (stale SPTEs, slow path, re-mark), A never;
4. touch A: the masked generation equals gA again, and A's first access
   must take the slow path (its SPTEs went with the zap-all), then B.

The swap at which the masked generation reaches 0 is known in advance and
is part of the ground truth, with the clock around that very ioctl.  Only
the setup changes are kept one by one; the swaps are counted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from recording.kvmconst import MMIO_GEN_BITS_DEFAULT
from vmrig.microvm import kvmapi as kvm
from vmrig.microvm.changes import CHANGES, Region, SlotState
from vmrig.microvm.errors import BadRequest, GuestMisbehaved, MicroVMError
from vmrig.microvm.guest import MAX_PAGES, MMIO_GPA, PAGE, SIGNAL_PORT
from vmrig.microvm.truth import ExitCounts, GroundTruth, MemslotChange
from vmrig.microvm.vmm import MicroVM

DUMMY_SLOT = 1
# Changes that leave the slot live, so a run of them is a cycle of ioctls.
WRAP_CHANGES = ("flags_only", "move")
MAX_WRAP_PAGES = MAX_PAGES // 2  # per set: A and B share the guest's segment


def swaps_per_wrap(address_spaces: int, gen_bits: int = MMIO_GEN_BITS_DEFAULT) -> int:
    """Memslot swaps of one address space between two wraps of the masked
    MMIO generation."""
    return (1 << gen_bits) // address_spaces


@dataclass
class WrapResult(GroundTruth, ExitCounts):
    """The wrap run's ground truth (``python -m vmrig.microvm --wrap K -o``)."""

    pid: int
    tid: int
    vm_fd: int
    pages: int
    workload: str = "generation-wrap"
    address_spaces: int = 1      # the VM's, from KVM_CAP_MULTI_ADDRESS_SPACE
    gen_bits: int = MMIO_GEN_BITS_DEFAULT
    swaps_per_wrap: int = 0
    wraps: int = 0
    change: str = "flags_only"
    swaps_per_change: int = 1
    touch_every: int = 0
    pages_a: list[str] = field(default_factory=list)
    pages_b: list[str] = field(default_factory=list)
    # Swaps of address space 0 counted from the VM's creation (generation 0):
    # after swap s its generation is s * address_spaces.
    mark_swap: int = 0           # swaps done when A and B were marked
    mark_gen: int = 0
    mark_mmio_gen: int = 0       # gA: the masked generation A was marked with
    swaps: int = 0               # all of them, setup included
    final_gen: int = 0
    final_mmio_gen: int = 0      # == mark_mmio_gen: the interesting case
    wrap_swaps: list[int] = field(default_factory=list)  # where masked gen is 0
    wrap_ioctl_ns: list[list[int]] = field(default_factory=list)  # [begin, end] of each
    memslot_counts: dict[str, int] = field(default_factory=dict)
    memslot_changes: list[MemslotChange] = field(default_factory=list)  # setup only
    touches_a: int = 0
    touches_b: int = 0
    mmio_by_page: dict[str, dict[str, int]] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)  # name, begin/end ns, swaps
    start_ns: int = 0
    stop_ns: int = 0
    run_seconds: float = 0.0
    swaps_per_s: float = 0.0     # in the swap phase
    # user + system CPU of this process in the run: where a tracer's
    # in-kernel cost on each swap lands
    cpu_seconds: float = 0.0


def address_spaces(vm_fd: int) -> int:
    """The VM's memslot address spaces: its generation's step per swap."""
    try:
        n = fcntl.ioctl(vm_fd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_MULTI_ADDRESS_SPACE)
    except OSError:
        n = 0
    return max(1, n)  # 0: the capability is absent, one address space


class WrapRun:
    """One wrap run on a fresh MicroVM; ``run()`` returns its truth."""

    def __init__(self, wraps: int = 1, pages: int = 2, change: str = "flags_only",
                 touch_every: int = 4096, gen_bits: int = MMIO_GEN_BITS_DEFAULT) -> None:
        if wraps < 1:
            raise BadRequest("wraps must be at least 1")
        if change not in WRAP_CHANGES:
            raise BadRequest(f"wrap change must be one of {', '.join(WRAP_CHANGES)}")
        if not 2 <= pages <= MAX_WRAP_PAGES:
            raise BadRequest(f"wrap pages must be 2..{MAX_WRAP_PAGES} (two sets, A and B)")
        if touch_every < 1:
            raise BadRequest("touch-every must be at least 1 swap")
        self.vm = MicroVM(pages=pages, access="rw", slot_size=PAGE)
        self.kind = CHANGES[change]
        self.wraps, self.touch_every, self.gen_bits = wraps, touch_every, gen_bits
        self.a_base, self.b_base = MMIO_GPA, MMIO_GPA + pages * PAGE
        self.r = WrapResult(pid=os.getpid(), tid=0, vm_fd=-1, pages=pages, wraps=wraps,
                            change=change, swaps_per_change=self.kind.swaps,
                            touch_every=touch_every, gen_bits=gen_bits)
        self._sregs = bytearray(kvm.SREGS_SIZE)
        self._last_read = False

    # -- the guest's rounds --------------------------------------------------
    def _round(self, base: int, name: str) -> None:
        """One round of the exit loop over the set at ``base``: each page
        read and written once (each access an exit), then ``out``."""
        r, vm = self.r, self.vm
        fd, run_map = vm.vcpus[0]
        kvm.SEGMENT.pack_into(self._sregs, kvm.SREGS_ES, base, 0xFFFF, base >> 4)
        fcntl.ioctl(fd, kvm.KVM_SET_SREGS, self._sregs)
        while True:
            fcntl.ioctl(fd, kvm.KVM_RUN, 0)
            if self._last_read:  # KVM finished the read on this KVM_RUN
                r.reads_completed += 1
                self._last_read = False
            reason = kvm.RUN_EXIT_REASON.unpack_from(run_map, kvm.RUN_EXIT_REASON_OFF)[0]
            if reason == kvm.KVM_EXIT_MMIO:
                phys, _, is_write = kvm.RUN_MMIO.unpack_from(run_map, kvm.RUN_UNION_OFF)
                if not base <= phys < base + r.pages * PAGE:
                    raise GuestMisbehaved(f"guest touched {phys:#x} in a round on {name}")
                page = r.mmio_by_page.setdefault(f"{phys & ~(PAGE - 1):#x}",
                                                 {"read": 0, "write": 0})
                page["write" if is_write else "read"] += 1
                r.mmio_exits += 1
                if is_write:
                    r.mmio_writes += 1
                else:
                    r.mmio_reads += 1
                    self._last_read = True
            elif reason == kvm.KVM_EXIT_IO:
                port = kvm.RUN_IO.unpack_from(run_map, kvm.RUN_UNION_OFF)[2]
                if port != SIGNAL_PORT:
                    raise GuestMisbehaved(f"guest wrote port {port:#x}")
                r.pio_exits += 1
                break
            else:
                raise vm.stopped(reason, 0, f"{r.mmio_exits} MMIO exits")
        if name == "A":
            r.touches_a += 1
        else:
            r.touches_b += 1

    # -- the swaps ------------------------------------------------------------
    def _cycle(self) -> list[bytes]:
        """The ioctl arguments of one cycle of the change on the dummy slot:
        applying them in turn returns the slot to where it started."""
        vm = self.vm
        state: SlotState = vm.slots[DUMMY_SLOT]
        addr = vm.slot_addr(DUMMY_SLOT)
        out: list[Region] = []
        s = state
        while True:
            region, s = self.kind.plan(s)
            out.append(region)
            if s == state:
                break
        return [kvm.MEMORY_REGION.pack(DUMMY_SLOT, g.flags, g.gpa, g.size, addr) for g in out]

    def _swaps(self, changes: int, args: list[bytes], at: int) -> None:
        """``changes`` changes from cycle position ``at``; the clock is read
        around a change whose swaps include a predicted wrap."""
        r, vmfd, ioctl = self.r, self.vm.vm, fcntl.ioctl
        per = self.kind.swaps
        period = r.swaps_per_wrap
        n_args = len(args)
        done = 0
        while done < changes:
            # changes before the one holding the next wrap swap
            next_wrap = ((r.swaps // period) + 1) * period
            upto = min(changes - done, (next_wrap - r.swaps - 1) // per)
            for i in range(upto):
                ioctl(vmfd, kvm.KVM_SET_USER_MEMORY_REGION, args[(at + done + i) % n_args])
            done += upto
            r.swaps += upto * per
            if done == changes:
                break
            t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            ioctl(vmfd, kvm.KVM_SET_USER_MEMORY_REGION, args[(at + done) % n_args])
            t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            done += 1
            r.swaps += per
            r.wrap_swaps.append(next_wrap)
            r.wrap_ioctl_ns.append([t0, t1])
        r.memslot_counts[self.kind.name] = r.memslot_counts.get(self.kind.name, 0) + changes

    def _phase(self, name: str, begin: int, swaps_before: int) -> None:
        self.r.phases.append({"name": name, "begin_ns": begin,
                              "end_ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC),
                              "swaps_before": swaps_before})

    def run(self) -> WrapResult:
        vm, r = self.vm, self.r
        now = time.clock_gettime_ns
        mono = time.CLOCK_MONOTONIC
        with vm:
            r.start_ns = t = now(mono)
            t_run = time.perf_counter()
            cpu0 = time.process_time()
            vm.start()  # CREATE of the RAM slot: swap 1
            r.vm_fd, r.tid = vm.vm, threading.get_native_id()
            r.address_spaces = address_spaces(vm.vm)
            r.swaps_per_wrap = swaps_per_wrap(r.address_spaces, self.gen_bits)
            if vm.apply("create", DUMMY_SLOT):
                raise MicroVMError("the dummy slot's CREATE failed")
            fcntl.ioctl(vm.vcpus[0][0], kvm.KVM_GET_SREGS, self._sregs)
            r.memslot_changes = list(vm.result.memslot_changes)
            r.memslot_counts = dict(vm.result.memslot_counts)
            r.swaps = sum(CHANGES[c.change].swaps for c in r.memslot_changes if c.ret == 0)
            self._phase("setup", t, 0)
            t = now(mono)
            r.pages_a = [f"{self.a_base + i * PAGE:#x}" for i in range(r.pages)]
            r.pages_b = [f"{self.b_base + i * PAGE:#x}" for i in range(r.pages)]
            self._round(self.a_base, "A")
            self._round(self.b_base, "B")
            mask = (1 << self.gen_bits) - 1
            r.mark_swap = r.swaps
            r.mark_gen = r.swaps * r.address_spaces
            r.mark_mmio_gen = r.mark_gen & mask
            self._phase("mark", t, r.mark_swap)
            t = now(mono)
            total = self.wraps * r.swaps_per_wrap
            if total % self.kind.swaps:
                raise BadRequest(f"{self.kind.name} swaps {self.kind.swaps} times, which does "
                                 f"not divide {total} swaps")
            args = self._cycle()
            changes, at = total // self.kind.swaps, 0
            while changes:
                k = min(changes, self.touch_every // self.kind.swaps or 1)
                try:
                    self._swaps(k, args, at)
                except OSError as e:
                    raise MicroVMError(f"memslot {self.kind.name} after {r.swaps} swaps: "
                                       f"{errno.errorcode.get(e.errno, e.errno)}") from None
                at += k
                changes -= k
                if changes:
                    self._round(self.b_base, "B")
            if at % len(args):  # leave the slot as it started (not a swap count)
                raise MicroVMError("the wrap's changes did not end a whole cycle")
            self._phase("swaps", t, r.mark_swap)
            t = now(mono)
            r.final_gen = r.swaps * r.address_spaces
            r.final_mmio_gen = r.final_gen & mask
            self._round(self.a_base, "A")
            self._round(self.b_base, "B")
            self._phase("touch A", t, r.swaps)
            r.run_seconds = time.perf_counter() - t_run
            r.cpu_seconds = time.process_time() - cpu0
            r.stop_ns = now(mono)
        swaps_phase = next(p for p in r.phases if p["name"] == "swaps")
        span = (swaps_phase["end_ns"] - swaps_phase["begin_ns"]) / 1e9
        r.swaps_per_s = (r.swaps - r.mark_swap) / span if span > 0 else 0.0
        return r


def write_wrap_workload(run_dir: str | os.PathLike[str], r: WrapResult) -> None:
    """The wrap run as the rig's side of a recording: ``workload.json`` and a
    ``workload`` table (setup changes one by one, then one row per phase)."""
    from recording.writer import write_table, write_workload_config
    summary = r.as_dict()
    summary.pop("memslot_changes")
    write_workload_config(run_dir, summary)
    rows = [(c.begin_ns, c.end_ns, f"memslot_{c.change}", f"slot {c.slot}", c.size,
             c.ret == 0, None if c.ret == 0 else os.strerror(-c.ret),
             json.dumps({"gpa": c.gpa, "flags": c.flags, "phase": c.phase}))
            for c in r.memslot_changes]
    for p in r.phases:
        rows.append((p["begin_ns"], p["end_ns"], f"wrap_{p['name'].replace(' ', '_')}",
                     f"{r.pages} pages", 0, True, None,
                     json.dumps({"swaps_before": p["swaps_before"]})))
    for s, (b, e) in zip(r.wrap_swaps, r.wrap_ioctl_ns, strict=True):
        rows.append((b, e, "wrap_swap", f"swap {s}", 0, True, None,
                     json.dumps({"swap": s, "change": r.change})))
    rows.sort(key=lambda x: x[0])
    names = ("begin_ns", "end_ns", "action", "target", "size", "ok", "error", "detail")
    write_table(run_dir, "workload", {n: [row[i] for row in rows] for i, n in enumerate(names)})
