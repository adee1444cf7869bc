"""The micro-VMM itself: one VM on /dev/kvm, its memslots and its vCPU threads.

MicroVM sets up RAM with the guest code (guest.py), vCPUs in real mode and,
in coalesced mode, the coalesced MMIO zone; ``apply`` issues one memslot
change (changes.py) and records it; ``run`` starts a thread per vCPU on
its loop (loops.py) and totals the counts into the ground truth (truth.py).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence

from vmrig.microvm import kvmapi as kvm
from vmrig.microvm.changes import SlotState, kind, new_slot, normalise, parse_schedule
from vmrig.microvm.errors import (
    BadRequest,
    GuestStopped,
    KVMUnavailable,
    MicroVMError,
    ScheduleError,
)
from vmrig.microvm.guest import (
    ACCESSES,
    CODE_GPA,
    MAX_PAGES,
    MAX_SPIN,
    MMIO_GPA,
    PAGE,
    RAM_SIZE,
    GuestCode,
    coalesced_program,
    exit_program,
)
from vmrig.microvm.loops import COALESCED_BATCH, coalesced_loop, exit_loop
from vmrig.microvm.native import native_exit_loop
from vmrig.microvm.ring import CoalescedRing
from vmrig.microvm.truth import MemslotChange, Result, VcpuCounts


class MicroVM:
    """One VM with ``vcpus`` vCPUs; use as a context manager to release its fds."""

    def __init__(self, pages: int = 2, access: str | None = None, slot_size: int = 0x100000,
                 vcpus: int = 1, coalesced: bool = False, native: bool = False,
                 spin: int = 0) -> None:
        access = access or ("write" if coalesced else "rw")
        if coalesced and access != "write":
            raise BadRequest("coalesced MMIO needs access 'write' (reads always exit)")
        if coalesced and native:
            raise BadRequest("--native runs the exit loop; coalesced mode has no C loop")
        if not 1 <= vcpus <= 64:
            raise BadRequest("vcpus must be 1..64")
        if not 2 <= pages <= MAX_PAGES:
            raise BadRequest(f"pages must be 2..{MAX_PAGES} (one MMIO page hides in KVM's cache)")
        if access not in ACCESSES:
            raise BadRequest("access must be read, write or rw")
        if slot_size <= 0 or slot_size % PAGE:
            raise BadRequest("slot size must be a positive multiple of 4096")
        if not 0 <= spin <= MAX_SPIN:
            raise BadRequest(f"guest spin must be 0..{MAX_SPIN} iterations")
        self.pages, self.access, self.slot_size = pages, access, slot_size
        self.slots: dict[int, SlotState] = {}
        self._slot_mem: dict[int, tuple[mmap.mmap, int]] = {}  # sid: (buffer, its address)
        self.guest: GuestCode = (coalesced_program(pages, spin) if coalesced
                                 else exit_program(pages, access, spin))
        try:
            self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KVMUnavailable(f"cannot open /dev/kvm: {e.strerror}") from None
        self.nvcpus = vcpus
        self.vm = -1
        self.vcpus: list[tuple[int, mmap.mmap]] = []
        self.coalesced = coalesced
        self.native = native
        self.ring: CoalescedRing | None = None
        self.result = Result(pid=os.getpid(), tid=0, vm_fd=-1, pages=pages, access=access,
                             vcpus=vcpus, mode="coalesced" if coalesced else "exit",
                             batch=COALESCED_BATCH if coalesced else 0,
                             loop="c" if native else "python", guest_spin=spin)

    # -- setup -----------------------------------------------------------
    def start(self) -> None:
        if fcntl.ioctl(self.kvm, kvm.KVM_GET_API_VERSION) != kvm.API_VERSION:
            raise KVMUnavailable("unexpected KVM API version")
        self.vm = fcntl.ioctl(self.kvm, kvm.KVM_CREATE_VM, 0)
        self.result.vm_fd = self.vm
        self.result.tid = threading.get_native_id()
        try:
            fcntl.ioctl(self.vm, kvm.KVM_SET_TSS_ADDR, kvm.TSS_ADDR)
        except OSError as e:  # only VMX needs it
            if e.errno not in (errno.EINVAL, errno.ENOTTY):
                raise
        self.ram = mmap.mmap(-1, RAM_SIZE)
        ring_off = 0
        if self.coalesced:
            cap = fcntl.ioctl(self.kvm, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_COALESCED_MMIO)
            if cap <= 0:
                raise KVMUnavailable("this KVM has no coalesced MMIO (KVM_CAP_COALESCED_MMIO)")
            ring_off = cap * PAGE
            fcntl.ioctl(self.vm, kvm.KVM_REGISTER_COALESCED_MMIO,
                        kvm.COALESCED_ZONE.pack(MMIO_GPA, self.pages * PAGE, 0))
        self.ram[CODE_GPA:CODE_GPA + len(self.guest.image)] = self.guest.image
        self._set_region(0, 0, RAM_SIZE, 0, _buffer_addr(self.ram), "create", "setup", 0)
        size = fcntl.ioctl(self.kvm, kvm.KVM_GET_VCPU_MMAP_SIZE)
        if ring_off + PAGE > size:
            raise KVMUnavailable("coalesced MMIO ring lies outside the vCPU mmap")
        for i in range(self.nvcpus):
            fd = fcntl.ioctl(self.vm, kvm.KVM_CREATE_VCPU, i)
            run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.vcpus.append((fd, run_map))
            sregs = bytearray(kvm.SREGS_SIZE)
            fcntl.ioctl(fd, kvm.KVM_GET_SREGS, sregs)
            # real mode: CS and DS at 0, ES on the MMIO pages
            for off, base in ((kvm.SREGS_CS, 0), (kvm.SREGS_DS, 0), (kvm.SREGS_ES, MMIO_GPA)):
                kvm.SEGMENT.pack_into(sregs, off, base, 0xFFFF, base >> 4)
            fcntl.ioctl(fd, kvm.KVM_SET_SREGS, sregs)
            regs = bytearray(kvm.REGS_SIZE)
            fcntl.ioctl(fd, kvm.KVM_GET_REGS, regs)
            kvm.REGS_RIP_RFLAGS.pack_into(regs, kvm.REGS_RIP, self.guest.entry, kvm.RFLAGS_FIXED)
            # rbx: the vCPU index, the byte the coalesced loop writes
            kvm.REG.pack_into(regs, kvm.REGS_RBX, i)
            fcntl.ioctl(fd, kvm.KVM_SET_REGS, regs)
        if self.coalesced:
            self.ring = CoalescedRing(self.vcpus[0][1], ring_off, self.pages, self.nvcpus)

    def _set_region(self, slot: int, gpa: int, size: int, flags: int, addr: int,
                    change: str, phase: str, after_mmio: int) -> int:
        arg = kvm.MEMORY_REGION.pack(slot, flags, gpa, size, addr)
        begin = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        try:
            fcntl.ioctl(self.vm, kvm.KVM_SET_USER_MEMORY_REGION, arg)
            ret = 0
        except OSError as e:
            ret = -e.errno
        end = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self.result.record_change(MemslotChange(
            change, slot, gpa, size, flags, addr, ret, begin, end, after_mmio, phase))
        return ret

    def apply(self, change: str, sid: int, after_mmio: int = 0) -> int:
        """One memslot change (a CHANGES name or alias) on extra slot ``sid``,
        after ``after_mmio`` of vCPU 0's accesses; returns 0 or -errno."""
        k = kind(change)
        s = self.slots.get(sid)
        if s is None:
            s = self.slots[sid] = new_slot(sid, self.slot_size)
            mem = mmap.mmap(-1, self.slot_size)
            self._slot_mem[sid] = (mem, _buffer_addr(mem))
        if k.on_live and not s.live:
            raise ScheduleError(f"schedule: {k.name} of slot {sid}, which does not exist")
        if not k.on_live and s.live:
            raise ScheduleError(f"schedule: {k.name} of slot {sid}, which exists")
        region, after = k.plan(s)
        ret = self._set_region(sid, region.gpa, region.size, region.flags,
                               self._slot_mem[sid][1], k.name, "schedule", after_mmio)
        if ret == 0:
            self.slots[sid] = after
        return ret

    def slot_addr(self, sid: int) -> int:
        """The user-space address of extra slot ``sid``'s memory."""
        return self._slot_mem[sid][1]

    # -- run ---------------------------------------------------------------
    def run(self, mmio_accesses: int = 0, schedule: Sequence[tuple[str, int]] = (),
            every: int = 0, duration: float = 0.0) -> Result:
        """Run until ``mmio_accesses`` MMIO exits in all (or ``duration`` seconds).

        vCPU 0 applies the schedule: its i-th change after (i + 1) * ``every``
        of vCPU 0's MMIO exits (default: spread evenly), while any other
        vCPUs keep exiting; changes left when the run ends are applied then,
        so every scheduled change always happens.  Each vCPU runs in a thread
        named like QEMU's ('CPU n/KVM'), so tracers can name the vCPU even if
        they missed KVM_CREATE_VCPU.  In coalesced mode "exits" are accesses
        (most never leave the kernel) and the counts are just as exact; a
        duration ends at a batch boundary (at most COALESCED_BATCH late).
        """
        if not self.vcpus:
            self.start()
        if mmio_accesses <= 0 and duration <= 0:
            raise BadRequest("give a number of MMIO accesses or a duration")
        sched = normalise(schedule)
        n = len(self.vcpus)
        shares = [mmio_accesses // n + (i < mmio_accesses % n) for i in range(n)]
        out: list[VcpuCounts | BaseException | None] = [None] * n
        loop = coalesced_loop if self.coalesced else native_exit_loop if self.native else exit_loop

        def vcpu_thread(i: int) -> None:
            _set_thread_name(f"CPU {i}/KVM".encode())
            try:
                out[i] = loop(self, i, shares[i] if mmio_accesses > 0 else 0,
                              sched if i == 0 else (), every, duration)
            except BaseException as e:  # re-raised in the caller's thread
                out[i] = e

        threads = [threading.Thread(target=vcpu_thread, args=(i,), name=f"CPU {i}/KVM",
                                    daemon=True) for i in range(n)]
        r = self.result
        r.start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        elapsed = time.perf_counter() - t0
        r.cpu_seconds = time.process_time() - cpu0
        r.stop_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for o in out:
            if isinstance(o, BaseException):
                raise o
        if self.ring is not None:
            self.ring.drain()  # normally empty: each vCPU drained at its last exit
        r.tally([o for o in out if isinstance(o, VcpuCounts)],
                self.ring.counts if self.ring is not None else None)
        r.run_seconds = elapsed
        r.mmio_exits_per_s = r.mmio_exits / elapsed if elapsed > 0 else 0.0
        return r

    def stopped(self, reason: int, index: int, done: str) -> MicroVMError:
        """A vCPU left its loop for an exit it should never take: counted, and
        the error to raise."""
        name = kvm.EXIT_NAMES.get(reason, str(reason))
        self.result.other_exits[name] = self.result.other_exits.get(name, 0) + 1
        return GuestStopped(name, index, done)

    def close(self) -> None:
        for fd, run_map in self.vcpus:
            run_map.close()
            os.close(fd)
        self.vcpus = []
        self.ring = None
        for fd in (self.vm, self.kvm):
            if fd >= 0:
                os.close(fd)
        self.vm = self.kvm = -1

    def __enter__(self) -> MicroVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _buffer_addr(mem: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mem))


def _set_thread_name(name: bytes) -> None:
    # the kernel's name for the thread (what tracers see), not just Python's
    libc = ctypes.CDLL(None)
    libc.prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME


def run(mmio_accesses: int = 0, pages: int = 2, schedule: str | Sequence[tuple[str, int]] = (),
        every: int = 0, access: str | None = None, duration: float = 0.0,
        slot_size: int = 0x100000, vcpus: int = 1, coalesced: bool = False,
        native: bool = False, spin: int = 0, hold: Callable[[], None] | None = None
        ) -> Result:
    """Create a VM, run the workload, close it; returns the ground truth.
    ``access`` defaults to 'rw', or 'write' (the only choice) when ``coalesced``;
    ``spin``: the guest's busy-loop iterations after each access; ``hold``:
    called once the VM, its memslot and vCPUs exist, before the first KVM_RUN."""
    sched = parse_schedule(schedule) if isinstance(schedule, str) else schedule
    with MicroVM(pages, access, slot_size, vcpus, coalesced, native, spin) as vm:
        vm.start()
        if hold is not None:
            hold()
        return vm.run(mmio_accesses, sched, every, duration)
