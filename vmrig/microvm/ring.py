"""The VM's coalesced MMIO ring: writes KVM completed without leaving the kernel.

KVM appends one entry per write to a registered zone and returns to user
space only when the ring is full.  Draining it counts the entries by vCPU
(the byte written, which the guest sets to its vCPU index) and page.
"""

from __future__ import annotations

import mmap
import threading
from collections import Counter

from vmrig.microvm.errors import GuestMisbehaved, MicroVMError
from vmrig.microvm.guest import MMIO_GPA
from vmrig.microvm.kvmapi import RING_ENTRY, RING_HEADER, RING_MAX


class CoalescedRing:
    """The ring at ``offset`` in a vCPU mmap (one ring per VM, mapped by each
    vCPU; KVM_CHECK_EXTENSION gives the page).  Any vCPU thread may drain,
    so under ``lock``; user space owns ``first``, KVM ``last``."""

    def __init__(self, run_map: mmap.mmap, offset: int, pages: int, vcpus: int) -> None:
        self.map, self.offset, self.pages, self.vcpus = run_map, offset, pages, vcpus
        self.lock = threading.Lock()
        self.counts = [[0] * pages for _ in range(vcpus)]  # [vcpu][page] entries drained

    def drained(self, vcpu: int) -> int:
        """Entries of ``vcpu`` drained so far (exact once it has exited)."""
        with self.lock:
            return sum(self.counts[vcpu])

    def drain(self) -> None:
        ring, off = self.map, self.offset
        with self.lock:
            first, last = RING_HEADER.unpack_from(ring, off)
            if first == last:
                return
            if max(first, last) >= RING_MAX:
                raise MicroVMError(f"coalesced MMIO ring out of range ({first}, {last})")
            spans = ((first, last),) if first < last else ((first, RING_MAX), (0, last))
            base = off + RING_HEADER.size
            size = RING_ENTRY.size
            for a, b in spans:
                entries = RING_ENTRY.iter_unpack(ring[base + a * size:base + b * size])
                for (phys, length, vcpu), c in Counter(entries).items():
                    page = (phys - MMIO_GPA) >> 12
                    if length != 1 or not 0 <= page < self.pages or vcpu >= self.vcpus:
                        raise GuestMisbehaved(f"unexpected coalesced MMIO entry: {phys:#x}, "
                                              f"{length} bytes, data {vcpu}")
                    self.counts[vcpu][page] += c
            # one aligned 4-byte store (struct.pack_into may write byte by
            # byte, and another vCPU's KVM reads `first` concurrently)
            memoryview(ring)[off:off + 4].cast("I")[0] = last

