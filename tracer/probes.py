"""A loaded, attached BPF program set (``Probes``): draining its buffers,
reading its maps, teaching it the vCPUs of running VMs, detaching it.

``loader.load`` builds one.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bpfsys import array_values
from .events import EVENT_DTYPE, LOST_KINDS
from .loader import HIST_SLOTS, RINGBUF_PAGES
from .procfs import kvm_fds
from .ringbuf import RingReader


def _items(table: Any) -> list[tuple[Any, Any]]:
    """A hash map's entries in one BPF_MAP_LOOKUP_BATCH call.  bcc's items()
    costs two syscalls an entry (next key, lookup), every flush, on the
    drain thread: 4-6x slower here at 300 entries, more in the TCG L1 where
    a syscall is dear.  Kernels before 5.6 have no batch lookup."""
    try:
        return list(table.items_lookup_batch())
    except Exception:  # bcc raises bare Exception for a failed syscall
        return list(table.items())


@dataclass
class Probes:
    """A loaded, attached program set; ``close()`` detaches everything."""

    bpf: Any
    backend: str
    buffer: str                       # ringbuf | perf
    attached: list[str]
    missing: list[str]
    offsets: dict[str, int] = field(default_factory=dict)
    links: list[int] = field(default_factory=list)  # fentry/fexit link fds
    aggregate: bool = False           # MMIO intervals in kernel histograms
    atomics: bool = False             # ATOMICS: the histograms in one array
    perf_lost: int = 0
    _chunks: list[bytes] = field(default_factory=list)
    _ring: RingReader | None = None

    def _on_event(self, ctx: Any, data: Any, size: int) -> None:
        # perf pads raw samples to 8 bytes (+4): keep exactly one struct event
        self._chunks.append(ctypes.string_at(data, EVENT_DTYPE.itemsize))

    def _on_lost(self, count: int) -> None:
        self.perf_lost += count

    def open(self) -> None:
        if self.buffer == "ringbuf":
            self._ring = RingReader(self.bpf[b"events"].map_fd, RINGBUF_PAGES * mmap.PAGESIZE)
        else:
            self.bpf[b"events"].open_perf_buffer(self._on_event, page_cnt=256,
                                                lost_cb=self._on_lost, wakeup_events=256)

    def poll(self, timeout_ms: int) -> np.ndarray:
        """Sleep ``timeout_ms``, then take everything buffered (batched draining:
        the BPF side never wakes us per record)."""
        time.sleep(timeout_ms / 1000)
        return self.drain()

    def take(self) -> np.ndarray:
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.empty(0, EVENT_DTYPE)
        return np.frombuffer(b"".join(chunks), dtype=EVENT_DTYPE)

    def drain(self) -> np.ndarray:
        """Everything already in the buffers, without waiting."""
        if self.buffer == "ringbuf":
            return self._ring.read()
        self.bpf.perf_buffer_consume()
        return self.take()

    def lost_counts(self) -> dict[str, int]:
        """Cumulative reserve failures per event kind (+ perf buffer losses)."""
        table = self.bpf[b"lost"]
        out = {}
        for i, kind in enumerate(LOST_KINDS):
            out[kind] = int(sum(table[ctypes.c_int(i)]))
        if self.buffer == "perf":
            out["perf_buffer"] = self.perf_lost
        return out

    def last_fill(self) -> float | None:
        """The fraction of the ring buffer the last drain found in use (None
        on the perf buffer, which bcc drains per CPU)."""
        return None if self._ring is None else self._ring.last_fill

    def drain_stats(self) -> dict[str, float]:
        if self._ring is None:
            return {}
        return {"max_ring_fill": round(self._ring.max_fill, 4),
                "max_drain_gap_s": round(self._ring.max_gap_s, 3)}

    def histograms(self) -> tuple[dict[tuple[int, int, int], tuple[int, int]],
                                  dict[tuple[int, ...], tuple[int, int]]]:
        """The cumulative histograms, each key -> (count, sum ns): the exits
        that are not MMIO intervals by (pid, reason, log2 ns), and (empty
        unless loaded with ``aggregate``) the MMIO intervals by (pid, vm,
        vcpu, reason, bits, log2 ns).  With ATOMICS both come from one read
        of the keys' counters in one array (common.bpf.c), split by bits;
        else from the exit_hist hash and the per-CPU mmio_hist hash, summed
        over CPUs."""
        exits: dict[tuple[int, int, int], tuple[int, int]] = {}
        mmio: dict[tuple[int, ...], tuple[int, int]] = {}
        if self.atomics:
            for k, slot, cs in self._hist_counts():
                if k.bits:  # an MMIO interval has at least one evidence bit
                    mmio[(k.pid, k.vm, k.vcpu, k.reason, k.bits, slot)] = cs
                else:
                    exits[(k.pid, k.reason, slot)] = cs
            return exits, mmio
        exits = {(k.pid, k.reason, k.slot): (v.count, v.sum_ns)
                 for k, v in _items(self.bpf[b"exit_hist"])}
        if self.aggregate:  # otherwise the programs have no mmio_hist map
            for k, per_cpu in _items(self.bpf[b"mmio_hist"]):
                mmio[(k.pid, k.vm, k.vcpu, k.reason, k.bits, k.slot)] = (
                    sum(v.count for v in per_cpu), sum(v.sum_ns for v in per_cpu))
        return exits, mmio

    def _hist_counts(self) -> list[tuple[Any, int, tuple[int, int]]]:
        """(key, log2 ns slot, (count, sum ns)) of every nonzero counter in
        hist_counts (ATOMICS): each key's run of HIST_SLOTS, from the index
        hist_keys gives it.  Keys are allocated from index 0 up, so one batch
        read covers every run."""
        firsts = [(k, int(getattr(base, "value", base)) - 1)  # batch reads give ints
                  for k, base in _items(self.bpf[b"hist_keys"])]
        if not firsts:
            return []
        counters = self.bpf[b"hist_counts"]
        end = max(first for _, first in firsts) + HIST_SLOTS
        vals = np.frombuffer(array_values(counters.map_fd, end, ctypes.sizeof(counters.Leaf)),
                             "<u8").reshape(end, 2)  # struct hist_val: count, sum_ns
        out = []
        for k, first in firsts:
            run = vals[first:first + HIST_SLOTS]
            out.extend((k, slot, (int(run[slot, 0]), int(run[slot, 1])))
                       for slot in np.flatnonzero(run[:, 0]).tolist())
        return out

    def forget_threads(self) -> None:
        """Drop every thread's entry: with the pid filter emptied, no thread
        passes it again (a thread's entry is its pass, common.bpf.c).  Slots
        in the array are freed by their tag; the LRU hash is cleared."""
        self.bpf[b"threads"].clear()
        slots = self.bpf[b"thread_slots"]
        for k, v in _items(slots):
            if v.tid:
                slots[k] = slots.Leaf()  # zeroed: tag 0 is a free slot

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        while self.links:  # detach; bcc's cleanup() closes the program fds
            os.close(self.links.pop())
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def seed_vcpus(probes: Probes, pids: Sequence[int],
               sole_vm: dict[int, int] | None = None) -> int:
    """Teach the programs the vCPUs of VMs created before they attached
    (e.g. a running QEMU): (pid, vCPU fd) -> VM id and vCPU id, and pid ->
    VM id where the process has one VM.  A process with several VMs gets
    only the vCPU ids (which VM a vCPU fd belongs to is not visible in
    /proc).  ``sole_vm`` collects pid -> VM id for processes with exactly
    one VM."""
    table = probes.bpf[b"vcpu_fds"]
    pid_vm = probes.bpf[b"pid_vm"]
    if not pids:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    n = 0
    for pid in pids:
        vms, vcpus = kvm_fds(pid)
        if len(vms) == 1:
            pid_vm[ctypes.c_uint(pid)] = ctypes.c_ulonglong(pid << 32 | vms[0])
            if sole_vm is not None:
                sole_vm[pid] = pid << 32 | vms[0]
        for fd, vcpu in vcpus.items():
            k = table.Key()
            k.pid, k.fd = pid, fd
            v = table.Leaf()
            v.vm = pid << 32 | (vms[0] if len(vms) == 1 else 0)
            v.vcpu = vcpu
            table[k] = v
            n += 1
    return n
