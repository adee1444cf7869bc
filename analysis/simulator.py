"""A simulator of recordings that follow the kernel's MMIO generation rules.

For tests, demos and benchmarks where no real recording fits.  The model is
KVM's (virt/kvm/kvm_main.c, arch/x86/kvm/mmu): each memslot swap sets the
in-progress bit, then adds the number of address spaces to the generation
and calls kvm_mmu_invalidate_mmio_sptes, which zaps everything when the
masked generation wraps to 0.  CREATE and FLAGS_ONLY swap once; DELETE and
MOVE swap twice and flush the slot (a zap-all on TDP MMU kernels, as measured
in the nested lab VM).  A fault checks its page's SPTE generation: equal ->
fast hit; different -> stale, slow path, re-marked; no SPTE -> slow path,
marked.  While an update is in progress check_mmio_spte bails out before
its tracepoint, so such faults are slow and marked with the old generation.

``revisit_swaps`` plays the case the wrap's zap-all exists for: every page
marked, a long run of swaps with no MMIO, then every page touched again.
With ``2**gen_bits // as_count`` swaps the revisit comes when the masked
generation equals the pages' marks again, so only the zap-all at the wrap
in between keeps those SPTEs from passing as fast hits.

``simulate`` returns the ground truth (class and charged update per fault)
kept apart from the recorded rows, so tests can check the analysis against
it and against their own reading of the raw rows.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

from recording.manifest import Manifest
from recording.schema import EVENT_TYPES, MMIO_GEN_BITS_DEFAULT, SCHEMAS, TRACE_EVENTS
from recording.writer import RunWriter, write_table

CHANGES = ("create", "delete", "move", "flags_only")
ACTION_OF = {"create": "plug", "delete": "unplug", "move": "move", "flags_only": "dirty-log"}


@dataclass
class Truth:
    """What the simulator knows and the recording only implies."""

    classes: list[str] = field(default_factory=list)   # per mmio_fault row
    causes: list[int] = field(default_factory=list)    # memslot_update row or -1
    updates: list[str] = field(default_factory=list)   # change per update row
    zaps: int = 0
    wraps: list[tuple[int, int]] = field(default_factory=list)  # (vm, gen) per wrap


@dataclass
class _VM:
    vm: int
    pid: int
    gen: int
    spte: dict[int, int] = field(default_factory=dict)   # gfn -> marked masked gen
    seen: set[int] = field(default_factory=set)
    zapped_since: dict[int, bool] = field(default_factory=dict)
    last_update: int = -1
    slots: int = 0


def simulate(run_dir: str | os.PathLike[str], *, seed: int = 0, vms: int = 1,
             vcpus: int = 2, pages: int = 4, events: int = 2000, p_update: float = 0.02,
             changes: tuple[str, ...] = CHANGES, as_count: int = 2,
             gen_bits: int = MMIO_GEN_BITS_DEFAULT, start_gen: int = 0,
             p_during: float = 0.3, p_cache: float = 0.2, fail_every: int = 0,
             host_style: bool = False, revisit_swaps: int = 0,
             manifest: Manifest | None = None) -> Truth:
    """Write a recording of ``events`` steps to ``run_dir``; return the truth.

    ``host_style`` records what this host's kvm_pvm shows (MMIO caching off):
    memslot updates without generations, MMIO exits with latency but no SPTE
    evidence, kvm_mmio accesses and zap-alls; no generation events.

    ``revisit_swaps`` > 0: before the random stream, each VM touches every
    page, makes that many FLAGS_ONLY updates with no MMIO at all, and touches
    every page again (see the module's doc).  0 (the default) draws nothing
    extra, so a seed gives the same rows as before the option existed.
    """
    rng = random.Random(seed)
    mask = (1 << gen_bits) - 1
    t = 1_000_000_000
    truth = Truth()
    cols: dict[str, dict[str, list[Any]]] = {
        e: {c: [] for c in SCHEMAS[e].names} for e in EVENT_TYPES}

    def add(event: str, **row: Any) -> None:
        for c, v in cols[event].items():
            v.append(row.get(c))

    machines = [_VM(vm=0xffff_8880_0000_0000 + i * 0x10000, pid=1000 + i, gen=start_gen)
                for i in range(vms)]
    fast_base = {(m.vm, c): rng.uniform(1500, 3000) for m in machines for c in range(vcpus)}
    base_gpa = 0xfe00_0000

    def fault(m: _VM, vcpu: int, inprog_update: int = -1, page: int | None = None) -> None:
        nonlocal t
        # An explicit page draws nothing: the random stream stays as it was.
        gfn = (base_gpa >> 12) + (rng.randrange(pages) if page is None else page)
        cur = m.gen & mask
        lat = fast_base[(m.vm, vcpu)] * rng.uniform(0.8, 1.3)
        kvm_gen = spte_gen = 0
        stale = remarked = fast = False
        if inprog_update >= 0:
            klass, cause = "during_update", inprog_update
            remarked = True
            m.spte[gfn] = cur  # the old generation: stale again once the swap ends
        elif gfn in m.spte and m.spte[gfn] == cur:
            klass, cause, fast = "fast", -1, True
            kvm_gen = spte_gen = cur
        elif gfn in m.spte:
            klass, cause = "stale", m.last_update
            kvm_gen, spte_gen, stale, remarked = cur, m.spte[gfn], True, True
            m.spte[gfn] = cur
        else:
            after = gfn in m.seen and m.zapped_since.get(gfn, False)
            klass = "after_zap" if after else "first_touch"
            cause = m.last_update if after else -1
            remarked = True
            m.spte[gfn] = cur
        if not fast:
            lat += rng.uniform(8000, 30000)  # full page-fault path + re-mark
        m.seen.add(gfn)
        m.zapped_since[gfn] = False
        is_write = rng.random() < 0.5
        if host_style:  # exits to user space, no SPTE evidence at all
            add("mmio_fault", exit_ns=t, latency_ns=int(lat), pid=m.pid, tid=m.pid + 1 + vcpu,
                vm=m.vm, vcpu=vcpu, exit_reason=None, gpa=gfn << 12, gfn=gfn, kvm_gen=None,
                spte_gen=None, stale=False, remarked=False, fast_hit=False,
                is_write=is_write, len=4, to_user=True, reentered=True)
            truth.classes.append("unknown")
            truth.causes.append(-1)
        else:
            add("mmio_fault", exit_ns=t, latency_ns=int(lat), pid=m.pid, tid=m.pid + 1 + vcpu,
                vm=m.vm, vcpu=vcpu, exit_reason=0x400, gpa=gfn << 12, gfn=gfn,
                kvm_gen=kvm_gen, spte_gen=spte_gen, stale=stale, remarked=remarked,
                fast_hit=fast, is_write=is_write, len=4, to_user=True, reentered=True)
            truth.classes.append(klass)
            truth.causes.append(cause)
            if inprog_update < 0 and rng.random() < p_cache:
                # The same vCPU touches the page again: KVM's per-vCPU MMIO
                # info cache answers before any SPTE check (no evidence).
                t += int(lat) + rng.randrange(200, 2000)
                add("mmio_fault", exit_ns=t, latency_ns=int(fast_base[(m.vm, vcpu)] * 0.8),
                    pid=m.pid, tid=m.pid + 1 + vcpu, vm=m.vm, vcpu=vcpu, exit_reason=0x400,
                    gpa=gfn << 12, gfn=gfn, kvm_gen=None, spte_gen=None, stale=False,
                    remarked=False, fast_hit=False, is_write=True, len=4, to_user=True,
                    reentered=True)
                truth.classes.append("vcpu_cache")
                truth.causes.append(-1)
        add("mmio_access", ns=t + int(lat) // 2, pid=m.pid, tid=m.pid + 1 + vcpu, vm=m.vm,
            vcpu=vcpu, type="write" if is_write else "read", len=4, gpa=gfn << 12, val=0)
        t += int(lat) + rng.randrange(500, 20_000)

    def zap(m: _VM) -> None:
        m.spte.clear()
        for g in m.seen:
            m.zapped_since[g] = True
        add("zap_all", ns=t, pid=m.pid, tid=m.pid, vm=m.vm, gen=m.gen)
        truth.zaps += 1

    def update(m: _VM, change: str, fail: bool, quiet: bool = False) -> None:
        nonlocal t
        row = len(cols["memslot_update"]["begin_ns"])
        w_begin = t
        t += rng.randrange(10_000, 50_000)
        begin, gen_before = t, m.gen
        if not fail:
            for swap in range(2 if change in ("delete", "move") else 1):
                # In progress: faults of this VM go slow, other VMs carry on.
                t += rng.randrange(2_000, 10_000)
                while not quiet and rng.random() < p_during:
                    other = rng.choice(machines)
                    fault(other, rng.randrange(vcpus), row if other is m else -1)
                m.gen += as_count
                wrapped = ((m.gen & mask) & ~(as_count - 1)) == 0
                if not host_style:
                    add("generation", ns=t, pid=m.pid, tid=m.pid, vm=m.vm, gen=m.gen,
                        in_progress=False, mmio_gen=m.gen & mask, zap_all=wrapped,
                        source="invalidate")
                if wrapped:
                    truth.wraps.append((m.vm, m.gen))
                    zap(m)
                if swap == 0 and change in ("delete", "move"):
                    t += 1000
                    zap(m)  # kvm_arch_flush_shadow_memslot -> zap_all_fast
        t += rng.randrange(1_000, 5_000)
        slot = m.slots
        m.slots += change == "create"
        add("memslot_update", begin_ns=begin, end_ns=t, pid=m.pid, tid=m.pid, vm=m.vm,
            as_id=0, slot_id=slot % 32, change=change, base_gfn=0x100000 + slot * 0x8000,
            npages=0x8000, flags=1 if change == "flags_only" else 0,
            userspace_addr=0x7f00_0000_0000 + slot * 0x800_0000,
            gen_before=None if host_style else gen_before,
            gen_after=None if host_style else m.gen, ret=-22 if fail else 0)
        truth.updates.append(change)
        if not fail:
            m.last_update = row
        t += rng.randrange(10_000, 50_000)
        add("workload", begin_ns=w_begin, end_ns=t, action=ACTION_OF[change],
            target=f"slot{slot}", size=0x8000 << 12, ok=not fail,
            error="EINVAL" if fail else None, detail=None)

    for m in machines if revisit_swaps > 0 else ():
        for page in range(pages):
            fault(m, rng.randrange(vcpus), page=page)
        for _ in range(revisit_swaps):
            update(m, "flags_only", False, quiet=True)
        for page in range(pages):
            fault(m, rng.randrange(vcpus), page=page)

    n_upd = 0
    for _ in range(events):
        m = rng.choice(machines)
        if rng.random() < p_update:
            n_upd += 1
            update(m, rng.choice(changes), bool(fail_every) and n_upd % fail_every == 0)
        else:
            fault(m, rng.randrange(vcpus))

    info: Manifest = {"backend": "tracepoint" if host_style else "kprobe", "synthetic": True,
                      "mmio_gen_bits": gen_bits, "address_spaces": as_count}
    if host_style:
        info["kvm_params"] = {"kvm.mmio_caching": "N"}
        info["missing_data"] = ["MMIO SPTE events (kvm.mmio_caching=N)"]
    info.update(manifest or {})
    # start and stop on the synthetic clock, not the writer's
    w = RunWriter(run_dir, info, events=TRACE_EVENTS, start_ns=1_000_000_000)
    for e in TRACE_EVENTS:
        w[e].extend(cols[e])
    w.close(stop_ns=t)
    if cols["workload"]["begin_ns"]:
        write_table(run_dir, "workload", cols["workload"])
    return truth
