"""The vCPU loops: one thread per vCPU runs KVM_RUN and counts every exit.

One loop per guest program (guest.py): ``exit_loop`` for the loop whose
every access exits to user space, ``coalesced_loop`` for the batch loop
whose writes mostly complete in the kernel.  vCPU 0 also applies the
memslot schedule (a Pacer) at exact access counts.
"""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vmrig.microvm.errors import GuestMisbehaved
from vmrig.microvm.guest import MMIO_GPA, SIGNAL_PORT
from vmrig.microvm.kvmapi import (
    IN_BATCH,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_MMIO,
    KVM_RUN,
    RUN_EXIT_REASON,
    RUN_EXIT_REASON_OFF,
    RUN_IO,
    RUN_MMIO,
    RUN_UNION_OFF,
)
from vmrig.microvm.truth import VcpuCounts

if TYPE_CHECKING:
    from vmrig.microvm.vmm import MicroVM

COALESCED_BATCH = 4096  # writes the guest does per batch request (at most)
NO_LIMIT = 1 << 62


class Pacer:
    """A vCPU's share of the schedule: the next change once its accesses
    reach the next multiple of ``every``; what is left, when it stops."""

    def __init__(self, vm: MicroVM, schedule: Sequence[tuple[str, int]], every: int) -> None:
        self.vm, self.every = vm, every
        self.pending = list(schedule)
        self.next = every if self.pending else -1

    def at(self, n: int) -> None:
        """After ``n`` accesses."""
        if n == self.next:
            self.vm.apply(*self.pending.pop(0), after_mmio=n)
            self.next = n + self.every if self.pending else -1

    def until(self, n: int) -> int:
        """Accesses left before the next change is due (NO_LIMIT if none)."""
        return self.next - n if self.pending else NO_LIMIT

    def finish(self, n: int) -> None:
        """The loop stopped after ``n`` accesses: every scheduled change
        still happens."""
        for change in self.pending:
            self.vm.apply(*change, after_mmio=n)
        self.pending = []


def bounds(limit: int, schedule: Sequence[tuple[str, int]], every: int,
           duration: float) -> tuple[int, int, float]:
    """A vCPU loop's (changes every N accesses, access limit, deadline):
    changes spread evenly by default; no limit or deadline when 0."""
    if not every and schedule:
        every = max(1, limit // (len(schedule) + 1)) if limit else 1000
    return (every, limit if limit > 0 else NO_LIMIT,
            time.monotonic() + duration if duration > 0 else float("inf"))


def exit_loop(vm: MicroVM, index: int, limit: int, schedule: Sequence[tuple[str, int]],
              every: int, duration: float) -> VcpuCounts:
    """Every access is a KVM_EXIT_MMIO; a read is completed by KVM on the
    next KVM_RUN, which kvm:kvm_mmio traces again."""
    every, limit, deadline = bounds(limit, schedule, every, duration)
    vcpu, run_map = vm.vcpus[index]
    pacer = Pacer(vm, schedule, every)
    c = VcpuCounts(index, threading.get_native_id(), by_page=[[0, 0] for _ in range(vm.pages)])
    by_page = c.by_page
    reads = writes = pio = completed = 0
    last_was_read = False
    n = 0
    ioctl, reason_at, mmio_at = fcntl.ioctl, RUN_EXIT_REASON.unpack_from, RUN_MMIO.unpack_from
    while n < limit:
        ioctl(vcpu, KVM_RUN, 0)
        reason = reason_at(run_map, RUN_EXIT_REASON_OFF)[0]
        if reason == KVM_EXIT_MMIO:
            if last_was_read:
                completed += 1
            phys, length, is_write = mmio_at(run_map, RUN_UNION_OFF)
            page = (phys - MMIO_GPA) >> 12
            if not 0 <= page < vm.pages:
                raise GuestMisbehaved(f"guest touched unexpected gpa {phys:#x}")
            by_page[page][is_write] += 1
            if is_write:
                writes += 1
                last_was_read = False
            else:
                reads += 1
                last_was_read = True
            n += 1
            pacer.at(n)
            if n & 0x3FF == 0 and time.monotonic() >= deadline:
                break
        elif reason == KVM_EXIT_IO:
            if last_was_read:
                completed += 1
            last_was_read = False
            pio += 1
        else:
            raise vm.stopped(reason, index, f"{n} MMIO exits")
    pacer.finish(n)
    c.mmio_exits = c.mmio_user_exits = n
    c.mmio_reads, c.mmio_writes, c.reads_completed, c.pio_exits = reads, writes, completed, pio
    return c


def coalesced_loop(vm: MicroVM, index: int, limit: int, schedule: Sequence[tuple[str, int]],
                   every: int, duration: float) -> VcpuCounts:
    """Hand out write batches at each ``in`` exit, sized to end exactly
    where the next change is due; count ring-full exits here, ring entries
    in the ring's drain."""
    every, limit, deadline = bounds(limit, schedule, every, duration)
    vcpu, run_map = vm.vcpus[index]
    ring, code = vm.ring, vm.guest
    assert ring is not None
    pacer = Pacer(vm, schedule, every)
    c = VcpuCounts(index, threading.get_native_id(), by_page=[[0, 0] for _ in range(vm.pages)])
    by_page = c.by_page  # ring-full exits (writes)
    user = pio = 0
    pages = vm.pages
    ioctl, reason_at = fcntl.ioctl, RUN_EXIT_REASON.unpack_from
    while True:
        ioctl(vcpu, KVM_RUN, 0)
        ring.drain()
        reason = reason_at(run_map, RUN_EXIT_REASON_OFF)[0]
        if reason == KVM_EXIT_MMIO:  # the ring was full: this write came to us
            phys, length, is_write = RUN_MMIO.unpack_from(run_map, RUN_UNION_OFF)
            page = (phys - MMIO_GPA) >> 12
            if not is_write or not 0 <= page < pages:
                raise GuestMisbehaved(f"guest made an unexpected MMIO access at {phys:#x}")
            by_page[page][1] += 1
            user += 1
            continue
        if reason != KVM_EXIT_IO:
            raise vm.stopped(reason, index, f"{user + ring.drained(index)} MMIO accesses")
        direction, size, port, _, data_off = RUN_IO.unpack_from(run_map, RUN_UNION_OFF)
        if (direction, size, port) != (KVM_EXIT_IO_IN, 4, SIGNAL_PORT):
            raise GuestMisbehaved(f"guest made an unexpected port access ({port:#x})")
        pio += 1
        # exact: the last batch's writes are all in the drained ring or exits
        n = user + ring.drained(index)
        pacer.at(n)
        if n >= limit or time.monotonic() >= deadline:
            break
        k = min(COALESCED_BATCH, limit - n, pacer.until(n))
        rounds, part = divmod(k, pages)
        IN_BATCH.pack_into(run_map, data_off, rounds + bool(part), code.batch_entry(part))
    pacer.finish(n)
    c.mmio_exits = c.mmio_writes = c.mmio_user_exits = user
    c.pio_exits = pio
    return c
