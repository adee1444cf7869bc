"""A micro-VMM on /dev/kvm: exact memslot changes while a vCPU touches MMIO.

No QEMU: this process does the KVM ioctls itself, so it knows exactly what
it asked of KVM.  One vCPU runs a few bytes of real-mode code that loops
over ``pages`` distinct unbacked guest pages (at least 2: KVM's per-vCPU
MMIO cache hides a loop on one address), reading and/or writing one byte of
each, and after each round signals the VMM with ``out 0x10``.  Every access
exits to user space (KVM_EXIT_MMIO); after every ``every`` MMIO exits the
VMM applies the next memslot change of the schedule (CREATE, DELETE, MOVE,
FLAGS_ONLY on extra slots) through KVM_SET_USER_MEMORY_REGION.

Its counters are ground truth for the tracer tests and benchmark:
memslot ioctls with slot/gpa/size/flags/ret and MMIO exits by page and type.
The same module runs as the L2 workload inside the nested lab VM::

    python -m vmrig.microvm --mmio-accesses 20000 --pages 2 \\
        --schedule create:1,flags:1,flags:1,move:1,delete:1

``--coalesced`` (write-only) registers the MMIO pages as a coalesced MMIO
zone, so KVM completes most writes in the kernel (one kvm:kvm_mmio each,
appended to the VM's ring) instead of returning to user space: far higher
access rates than a Python KVM_RUN loop reaches.  The guest asks for a batch
of writes with ``in eax, 0x10``; the VMM drains the ring on every exit and
sizes each batch to end exactly where the next memslot change is due, so
counts (ring entries + ring-full KVM_EXIT_MMIO exits, per page and vCPU)
and the schedule stay exact.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import mmap
import os
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vmrig import RigError

# <linux/kvm.h> ioctl numbers (x86-64).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_REGISTER_COALESCED_MMIO = 0x4010AE67
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_CAP_COALESCED_MMIO = 15

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17

# struct kvm_run offsets: exit_reason, then the io / mmio union at 32.
RUN_EXIT_REASON = 8
RUN_MMIO_PHYS, RUN_MMIO_DATA, RUN_MMIO_LEN, RUN_MMIO_IS_WRITE = 32, 40, 48, 52
RUN_IO = 32                 # direction u8, size u8, port u16, count u32, data_offset u64

# struct kvm_coalesced_mmio_ring: first, last (u32), then entries of
# {phys_addr u64, len u32, pad u32, data[8]} filling the rest of the page.
RING_ENTRY = 24
RING_MAX = (0x1000 - 8) // RING_ENTRY   # KVM_COALESCED_MMIO_MAX: 170 (169 usable)
COALESCED_BATCH = 4096      # writes the guest does per batch request (at most)

PAGE = 0x1000
RAM_SIZE = 0x10000          # slot 0: guest RAM with the code at CODE_GPA
CODE_GPA = 0x1000
MMIO_GPA = 0x20000          # unbacked: no slot covers it, so every access is MMIO
MAX_PAGES = 16              # one 64 KiB real-mode segment (ES)
SIGNAL_PORT = 0x10
SLOT_HOME = 0x10000000      # extra slot k lives at SLOT_HOME + k * SLOT_STRIDE
SLOT_STRIDE = 0x1000000
SLOT_MOVE_OFFSET = 0x800000  # MOVE alternates between home and home + this
CHANGES = ("create", "delete", "move", "flags")


def _asm(pages: int, access: str) -> bytes:
    """Real-mode loop: for each page, read and/or write one byte at ES:BX."""
    body = b""
    if access in ("read", "rw"):
        body += b"\x26\x8a\x07"          # mov al, [es:bx]
    if access in ("write", "rw"):
        body += b"\x26\x88\x07"          # mov [es:bx], al
    body += b"\x81\xc3\x00\x10"          # add bx, 0x1000
    code = b"\x31\xdb"                   # start: xor bx, bx
    code += b"\xb9" + struct.pack("<H", pages)  # mov cx, pages
    loop = len(code)
    code += body
    code += b"\xe2" + struct.pack("<b", loop - (len(code) + 2))  # loop body
    code += b"\xe6" + bytes([SIGNAL_PORT])                       # out 0x10, al
    code += b"\xeb" + struct.pack("<b", 0 - (len(code) + 2))     # jmp start
    return code


WRITE_LEN = 5  # bytes of one ``mov [es:disp16], bl`` in the coalesced loop


def _asm_coalesced(pages: int) -> tuple[bytes, int]:
    """Batch loop: ``in eax, 0x10`` returns CX rounds (low 16 bits) and the IP
    to enter the unrolled round at (high 16: a partial first round skips its
    first writes); one instruction per write keeps emulation cost down.
    BL (the vCPU index) is the byte written, so ring entries name their vCPU.
    Returns the code and the offset of the unrolled round."""
    code = b"\x66\xe5" + bytes([SIGNAL_PORT])   # start: in eax, 0x10
    code += b"\x89\xc1"                        # mov cx, ax
    code += b"\x66\xc1\xe8\x10"                # shr eax, 16
    code += b"\xff\xe0"                        # jmp ax
    body = len(code)
    for p in range(pages):
        code += b"\x26\x88\x1e" + struct.pack("<H", p * PAGE)  # mov [es:p*0x1000], bl
    code += b"\xe2" + struct.pack("<b", body - (len(code) + 2))  # loop round
    code += b"\xeb" + struct.pack("<b", 0 - (len(code) + 2))     # jmp start
    return code, body


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


@dataclass
class Result:
    pid: int
    tid: int
    vm_fd: int
    pages: int
    access: str
    vcpus: int = 1
    mode: str = "exit"     # exit: every access exits to user space | coalesced
    # MMIO accesses (each one kvm:kvm_mmio event); in coalesced mode the sum
    # of mmio_user_exits (ring full) and mmio_in_kernel (ring entries)
    mmio_exits: int = 0
    mmio_user_exits: int = 0
    mmio_in_kernel: int = 0
    in_kernel_by_page: dict[str, int] = field(default_factory=dict)
    batch: int = 0         # coalesced: most writes per guest batch request
    mmio_reads: int = 0
    mmio_writes: int = 0
    reads_completed: int = 0  # reads KVM finished on re-entry (kvm_mmio 'read')
    mmio_by_page: dict[str, dict[str, int]] = field(default_factory=dict)
    pio_exits: int = 0
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
    per_vcpu: list[dict[str, Any]] = field(default_factory=list)  # vcpu, tid, counts

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_schedule(text: str) -> list[tuple[str, int]]:
    """'create:1,flags:1,move:1,delete:1' -> [(change, slot id), ...]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        change, _, slot = item.partition(":")
        if change not in CHANGES:
            raise RigError(f"schedule item {item!r}: change must be one of {', '.join(CHANGES)}")
        try:
            sid = int(slot) if slot else 1
        except ValueError:
            raise RigError(f"schedule item {item!r}: slot must be an integer") from None
        if not 1 <= sid <= 64:
            raise RigError(f"schedule item {item!r}: extra slot ids are 1..64 (0 is RAM)")
        out.append((change, sid))
    return out


class _Slot:
    def __init__(self, sid: int, size: int) -> None:
        self.sid = sid
        self.size = size
        self.mem = mmap.mmap(-1, size)
        self.addr = _buffer_addr(self.mem)
        self.gpa = SLOT_HOME + sid * SLOT_STRIDE
        self.flags = 0
        self.live = False


def _buffer_addr(mem: mmap.mmap) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(mem))


class MicroVM:
    """One VM with ``vcpus`` vCPUs; use as a context manager to release its fds."""

    def __init__(self, pages: int = 2, access: str | None = None, slot_size: int = 0x100000,
                 vcpus: int = 1, coalesced: bool = False) -> None:
        access = access or ("write" if coalesced else "rw")
        if coalesced and access != "write":
            raise RigError("coalesced MMIO needs access 'write' (reads always exit)")
        if not 1 <= vcpus <= 64:
            raise RigError("vcpus must be 1..64")
        if not 2 <= pages <= MAX_PAGES:
            raise RigError(f"pages must be 2..{MAX_PAGES} (one MMIO page hides in KVM's cache)")
        if access not in ("read", "write", "rw"):
            raise RigError("access must be read, write or rw")
        if slot_size <= 0 or slot_size % PAGE:
            raise RigError("slot size must be a positive multiple of 4096")
        self.pages, self.access, self.slot_size = pages, access, slot_size
        self.slots: dict[int, _Slot] = {}
        try:
            self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise RigError(f"cannot open /dev/kvm: {e.strerror}") from None
        self.nvcpus = vcpus
        self.vm = -1
        self.vcpus: list[tuple[int, mmap.mmap]] = []
        self._exits0 = 0  # vCPU 0's MMIO exits so far: when each memslot change happened
        self.coalesced = coalesced
        self._ring_off = self._body = 0  # coalesced: ring offset in the vCPU mmap, loop body
        self._ring_lock = threading.Lock()
        # coalesced: [vcpu][page] ring entries drained, by whichever vCPU thread
        self._in_kernel = [[0] * pages for _ in range(vcpus)]
        self.result = Result(pid=os.getpid(), tid=0, vm_fd=-1, pages=pages, access=access,
                             vcpus=vcpus, mode="coalesced" if coalesced else "exit",
                             batch=COALESCED_BATCH if coalesced else 0)

    # -- setup -----------------------------------------------------------
    def start(self) -> None:
        if fcntl.ioctl(self.kvm, KVM_GET_API_VERSION) != 12:
            raise RigError("unexpected KVM API version")
        self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.result.vm_fd = self.vm
        self.result.tid = _gettid()
        with _ignore(errno.EINVAL, errno.ENOTTY):  # VMX needs it for real mode
            fcntl.ioctl(self.vm, KVM_SET_TSS_ADDR, 0x7FFFD000)  # < 2 GiB: a C int
        self.ram = mmap.mmap(-1, RAM_SIZE)
        if self.coalesced:
            # the capability is the ring's page offset in the vCPU mmap
            cap = fcntl.ioctl(self.kvm, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_MMIO)
            if cap <= 0:
                raise RigError("this KVM has no coalesced MMIO (KVM_CAP_COALESCED_MMIO)")
            self._ring_off = cap * PAGE
            fcntl.ioctl(self.vm, KVM_REGISTER_COALESCED_MMIO,
                        struct.pack("<QII", MMIO_GPA, self.pages * PAGE, 0))
            code, self._body = _asm_coalesced(self.pages)
        else:
            code = _asm(self.pages, self.access)
        self.ram[CODE_GPA:CODE_GPA + len(code)] = code
        self._set_region(0, 0, RAM_SIZE, 0, _buffer_addr(self.ram), "create", "setup")
        size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
        if self._ring_off + PAGE > size:
            raise RigError("coalesced MMIO ring lies outside the vCPU mmap")
        for i in range(self.nvcpus):
            fd = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, i)
            run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.vcpus.append((fd, run_map))
            sregs = bytearray(312)
            fcntl.ioctl(fd, KVM_GET_SREGS, sregs)
            # struct kvm_sregs starts cs, ds, es (struct kvm_segment, 24 bytes
            # each: base u64, limit u32, selector u16, ...); real mode, ES on MMIO.
            for off, base in ((0, 0), (24, 0), (48, MMIO_GPA)):
                struct.pack_into("<QIH", sregs, off, base, 0xFFFF, base >> 4)
            fcntl.ioctl(fd, KVM_SET_SREGS, sregs)
            regs = bytearray(144)
            fcntl.ioctl(fd, KVM_GET_REGS, regs)
            struct.pack_into("<QQ", regs, 128, CODE_GPA, 2)      # rip, rflags
            struct.pack_into("<Q", regs, 8, i)    # rbx: the byte written (coalesced)
            fcntl.ioctl(fd, KVM_SET_REGS, regs)

    def _set_region(self, slot: int, gpa: int, size: int, flags: int, addr: int,
                    change: str, phase: str) -> int:
        arg = struct.pack("<IIQQQ", slot, flags, gpa, size, addr)
        begin = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        try:
            fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, arg)
            ret = 0
        except OSError as e:
            ret = -e.errno
        end = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self.result.memslot_changes.append(MemslotChange(
            change, slot, gpa, size, flags, addr, ret, begin, end, self._exits0, phase))
        key = change if ret == 0 else f"{change}_failed"
        self.result.memslot_counts[key] = self.result.memslot_counts.get(key, 0) + 1
        return ret

    def apply(self, change: str, sid: int) -> int:
        """One scheduled memslot change on extra slot ``sid``; returns 0 or -errno."""
        s = self.slots.get(sid)
        if s is None:
            s = self.slots[sid] = _Slot(sid, self.slot_size)
        if change == "create":
            if s.live:
                raise RigError(f"schedule: create of slot {sid}, which exists")
            ret = self._set_region(sid, s.gpa, s.size, s.flags, s.addr, "create", "schedule")
            s.live = ret == 0
            return ret
        if not s.live:
            raise RigError(f"schedule: {change} of slot {sid}, which does not exist")
        if change == "delete":
            ret = self._set_region(sid, s.gpa, 0, s.flags, s.addr, "delete", "schedule")
            if ret == 0:
                s.live, s.flags = False, 0
        elif change == "move":
            home = SLOT_HOME + sid * SLOT_STRIDE
            gpa = home + SLOT_MOVE_OFFSET if s.gpa == home else home
            ret = self._set_region(sid, gpa, s.size, s.flags, s.addr, "move", "schedule")
            if ret == 0:
                s.gpa = gpa
        else:
            flags = s.flags ^ KVM_MEM_LOG_DIRTY_PAGES
            ret = self._set_region(sid, s.gpa, s.size, flags, s.addr, "flags_only", "schedule")
            if ret == 0:
                s.flags = flags
        return ret

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
            raise RigError("give a number of MMIO accesses or a duration")
        n = len(self.vcpus)
        shares = [mmio_accesses // n + (i < mmio_accesses % n) for i in range(n)]
        out: list[dict[str, Any] | BaseException | None] = [None] * n

        def vcpu_thread(i: int) -> None:
            _set_thread_name(f"CPU {i}/KVM".encode())
            try:
                loop = self._run_coalesced if self.coalesced else self._run
                out[i] = loop(i, shares[i] if mmio_accesses > 0 else 0,
                              schedule if i == 0 else (), every, duration)
            except BaseException as e:  # re-raised in the caller's thread
                out[i] = e

        threads = [threading.Thread(target=vcpu_thread, args=(i,), name=f"CPU {i}/KVM",
                                    daemon=True) for i in range(n)]
        r = self.result
        r.start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        t0 = time.perf_counter()
        cpu0 = _cpu_seconds()
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        elapsed = time.perf_counter() - t0
        r.cpu_seconds = _cpu_seconds() - cpu0
        r.stop_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for o in out:
            if isinstance(o, BaseException):
                raise o
        stats = [o for o in out if isinstance(o, dict)]
        if self.coalesced:
            self._drain()  # normally empty: each vCPU drained at its last exit
        for v in stats:  # add the writes KVM completed in the kernel
            kin = self._in_kernel[v["vcpu"]]
            v["mmio_in_kernel"] = sum(kin)
            v["mmio_exits"] += v["mmio_in_kernel"]
            v["mmio_writes"] += v["mmio_in_kernel"]
            for p, k in enumerate(kin):
                v["by_page"][p][1] += k
        r.per_vcpu = stats
        r.tid = stats[0]["tid"]
        r.mmio_exits = sum(v["mmio_exits"] for v in stats)
        r.mmio_user_exits = sum(v["mmio_user_exits"] for v in stats)
        r.mmio_in_kernel = sum(v["mmio_in_kernel"] for v in stats)
        r.in_kernel_by_page = {f"{MMIO_GPA + p * PAGE:#x}": sum(k[p] for k in self._in_kernel)
                               for p in range(self.pages)} if self.coalesced else {}
        r.mmio_reads = sum(v["mmio_reads"] for v in stats)
        r.mmio_writes = sum(v["mmio_writes"] for v in stats)
        r.reads_completed = sum(v["reads_completed"] for v in stats)
        r.pio_exits = sum(v["pio_exits"] for v in stats)
        r.mmio_by_page = {
            f"{MMIO_GPA + p * PAGE:#x}": {k: sum(v["by_page"][p][j] for v in stats)
                                          for j, k in enumerate(("read", "write"))}
            for p in range(self.pages)}
        for v in stats:
            del v["by_page"]
        r.run_seconds = elapsed
        r.mmio_exits_per_s = r.mmio_exits / elapsed if elapsed > 0 else 0.0
        return r

    def _run(self, index: int, limit: int, schedule: Sequence[tuple[str, int]],
             every: int, duration: float) -> dict[str, Any]:
        """One vCPU's loop; vCPU 0 also applies the memslot schedule."""
        every, limit, deadline = _bounds(limit, schedule, every, duration)
        vcpu, run_map = self.vcpus[index]
        unpack = struct.unpack_from
        pending = list(schedule)
        next_change = every if pending else -1
        by_page = [[0, 0] for _ in range(self.pages)]
        reads = writes = pio = completed = 0
        last_was_read = False
        n = 0
        ioctl = fcntl.ioctl
        while n < limit:
            ioctl(vcpu, KVM_RUN, 0)
            reason = unpack("<I", run_map, RUN_EXIT_REASON)[0]
            if reason == KVM_EXIT_MMIO:
                if last_was_read:
                    completed += 1
                phys, length, is_write = unpack("<Q8xIB", run_map, RUN_MMIO_PHYS)
                page = (phys - MMIO_GPA) >> 12
                if not 0 <= page < self.pages:
                    raise RigError(f"guest touched unexpected gpa {phys:#x}")
                by_page[page][is_write] += 1
                if is_write:
                    writes += 1
                    last_was_read = False
                else:
                    reads += 1
                    last_was_read = True
                n += 1
                if n == next_change:
                    self._exits0 = n
                    self.apply(*pending.pop(0))
                    next_change = n + every if pending else -1
                if n & 0x3FF == 0 and time.monotonic() >= deadline:
                    break
            elif reason == KVM_EXIT_IO:
                if last_was_read:
                    completed += 1
                last_was_read = False
                pio += 1
            else:
                raise self._stopped(reason, index, f"{n} MMIO exits")
        self._exits0 = n if index == 0 else self._exits0
        for change in pending:
            self.apply(*change)
        return {"vcpu": index, "tid": _gettid(), "mmio_exits": n, "mmio_reads": reads,
                "mmio_writes": writes, "reads_completed": completed, "pio_exits": pio,
                "mmio_user_exits": n, "by_page": by_page}

    def _run_coalesced(self, index: int, limit: int, schedule: Sequence[tuple[str, int]],
                       every: int, duration: float) -> dict[str, Any]:
        """One vCPU's loop in coalesced mode: hand out write batches at each
        ``in`` exit; count ring-full exits here and ring entries in _drain."""
        every, limit, deadline = _bounds(limit, schedule, every, duration)
        vcpu, run_map = self.vcpus[index]
        unpack = struct.unpack_from
        pending = list(schedule)
        next_change = every if pending else -1
        by_page = [[0, 0] for _ in range(self.pages)]  # ring-full exits (writes)
        user = pio = 0
        mine = self._in_kernel[index]
        pages, body = self.pages, CODE_GPA + self._body
        ioctl = fcntl.ioctl
        while True:
            ioctl(vcpu, KVM_RUN, 0)
            self._drain()
            reason = unpack("<I", run_map, RUN_EXIT_REASON)[0]
            if reason == KVM_EXIT_MMIO:  # the ring was full: this write came to us
                phys, length, is_write = unpack("<Q8xIB", run_map, RUN_MMIO_PHYS)
                page = (phys - MMIO_GPA) >> 12
                if not is_write or not 0 <= page < pages:
                    raise RigError(f"guest made an unexpected MMIO access at {phys:#x}")
                by_page[page][1] += 1
                user += 1
                continue
            if reason != KVM_EXIT_IO:
                raise self._stopped(reason, index, f"{user + sum(mine)} MMIO accesses")
            direction, size, port, _, data_off = unpack("<BBHIQ", run_map, RUN_IO)
            if (direction, size, port) != (0, 4, SIGNAL_PORT):
                raise RigError(f"guest made an unexpected port access ({port:#x})")
            pio += 1
            # exact: the last batch's writes are all in the drained ring or exits
            with self._ring_lock:
                n = user + sum(mine)
            if n == next_change:
                self._exits0 = n
                self.apply(*pending.pop(0))
                next_change = n + every if pending else -1
            if n >= limit or time.monotonic() >= deadline:
                break
            # end the batch where the next change is due, so it lands exactly
            k = min(COALESCED_BATCH, limit - n, next_change - n if pending else 1 << 62)
            rounds, part = divmod(k, pages)
            entry = body + (pages - part) * WRITE_LEN if part else body
            struct.pack_into("<HH", run_map, data_off, rounds + bool(part), entry)
        if index == 0:
            self._exits0 = n
        for change in pending:
            self.apply(*change)
        return {"vcpu": index, "tid": _gettid(), "mmio_exits": user, "mmio_reads": 0,
                "mmio_writes": user, "reads_completed": 0, "pio_exits": pio,
                "mmio_user_exits": user, "by_page": by_page}

    def _stopped(self, reason: int, index: int, done: str) -> RigError:
        """A vCPU left its loop for an exit it should never take: counted, and
        the error to raise."""
        name = {KVM_EXIT_HLT: "hlt", KVM_EXIT_SHUTDOWN: "shutdown",
                KVM_EXIT_FAIL_ENTRY: "fail_entry",
                KVM_EXIT_INTERNAL_ERROR: "internal_error"}.get(reason, str(reason))
        self.result.other_exits[name] = self.result.other_exits.get(name, 0) + 1
        return RigError(f"guest stopped unexpectedly: KVM exit {name} on vCPU {index} "
                        f"after {done}")

    def _drain(self) -> None:
        """Take every entry off the VM's coalesced MMIO ring, counted by vCPU
        (the byte written) and page.  Any vCPU thread may drain (one ring per
        VM), so under a lock; user space owns ``first``, KVM ``last``."""
        ring, off = self.vcpus[0][1], self._ring_off
        with self._ring_lock:
            first, last = struct.unpack_from("<II", ring, off)
            if first == last:
                return
            if max(first, last) >= RING_MAX:
                raise RigError(f"coalesced MMIO ring out of range ({first}, {last})")
            spans = ((first, last),) if first < last else ((first, RING_MAX), (0, last))
            base = off + 8
            for a, b in spans:
                entries = struct.iter_unpack(
                    "<QI4xB7x", ring[base + a * RING_ENTRY:base + b * RING_ENTRY])
                for (phys, length, vcpu), c in Counter(entries).items():
                    page = (phys - MMIO_GPA) >> 12
                    if length != 1 or not 0 <= page < self.pages or vcpu >= self.nvcpus:
                        raise RigError(f"unexpected coalesced MMIO entry: {phys:#x}, "
                                       f"{length} bytes, data {vcpu}")
                    self._in_kernel[vcpu][page] += c
            # one aligned 4-byte store (struct.pack_into may write byte by
            # byte, and another vCPU's KVM reads `first` concurrently)
            memoryview(ring)[off:off + 4].cast("I")[0] = last

    def close(self) -> None:
        for fd, run_map in self.vcpus:
            run_map.close()
            os.close(fd)
        self.vcpus = []
        for fd in (self.vm, self.kvm):
            if fd >= 0:
                os.close(fd)
        self.vm = self.kvm = -1

    def __enter__(self) -> MicroVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ignore:
    def __init__(self, *errnos: int) -> None:
        self.errnos = errnos

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: object, e: BaseException | None, tb: object) -> bool:
        return isinstance(e, OSError) and e.errno in self.errnos


def _bounds(limit: int, schedule: Sequence[tuple[str, int]], every: int,
            duration: float) -> tuple[int, int, float]:
    """A vCPU loop's (changes every N accesses, access limit, deadline):
    changes spread evenly by default; no limit or deadline when 0."""
    if not every and schedule:
        every = max(1, limit // (len(schedule) + 1)) if limit else 1000
    return (every, limit if limit > 0 else 1 << 62,
            time.monotonic() + duration if duration > 0 else float("inf"))


def _cpu_seconds() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _gettid() -> int:
    return threading.get_native_id()


def _set_thread_name(name: bytes) -> None:
    import ctypes
    libc = ctypes.CDLL(None)
    libc.prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME


def run(mmio_accesses: int = 0, pages: int = 2, schedule: str | Sequence[tuple[str, int]] = (),
        every: int = 0, access: str | None = None, duration: float = 0.0,
        slot_size: int = 0x100000, vcpus: int = 1, coalesced: bool = False) -> Result:
    """Create a VM, run the workload, close it; returns the ground truth.
    ``access`` defaults to 'rw', or 'write' (the only choice) when ``coalesced``."""
    sched = parse_schedule(schedule) if isinstance(schedule, str) else list(schedule)
    with MicroVM(pages, access, slot_size, vcpus, coalesced) as vm:
        vm.start()
        return vm.run(mmio_accesses, sched, every, duration)


def expected_mmio_events(r: Result) -> dict[str, int]:
    """kvm:kvm_mmio events this run makes: a read exits as 'unsatisfied-read'
    and traces 'read' again when KVM completes it on the next KVM_RUN."""
    return {"unsatisfied-read": r.mmio_reads, "read": r.reads_completed,
            "write": r.mmio_writes}


def write_workload(run_dir: str | os.PathLike[str], r: Result) -> None:
    """The run as the rig's side of a recording: ``workload.json`` (counts) and
    a ``workload`` table with one row per memslot ioctl and one for the MMIO loop."""
    from analysis.schema import write_table, write_workload_config
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vmrig.microvm", description=__doc__.split("\n")[0])
    p.add_argument("--mmio-accesses", "-n", type=int, default=0, metavar="M",
                   help="stop after M MMIO exits (accesses with --coalesced)")
    p.add_argument("--duration", "-d", type=float, default=0.0, help="or stop after S seconds")
    p.add_argument("--pages", type=int, default=2, help="distinct MMIO pages (2..16)")
    p.add_argument("--access", choices=("read", "write", "rw"),
                   help="default rw (write with --coalesced)")
    p.add_argument("--coalesced", action="store_true",
                   help="writes only, most completed in the kernel through a coalesced MMIO "
                   "ring (no exit to user space): >=100k accesses/s")
    p.add_argument("--schedule", default="", help="e.g. create:1,flags:1,move:1,delete:1")
    p.add_argument("--every", type=int, default=0, help="MMIO exits between changes")
    p.add_argument("--slot-size", type=int, default=0x100000, help="bytes per extra slot")
    p.add_argument("--vcpus", type=int, default=1,
                   help="vCPUs (threads 'CPU n/KVM'), sharing the MMIO accesses")
    p.add_argument("--wait", action="store_true",
                   help="print 'ready PID' and wait for a line on stdin before starting")
    p.add_argument("-o", "--output", help="write the JSON ground truth here (default stdout)")
    p.add_argument("--run-dir", help="also write workload.json + workload.parquet into this "
                   "run directory (e.g. the one `slotscope record` writes)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sched = parse_schedule(args.schedule)
        if args.mmio_accesses <= 0 and args.duration <= 0:
            raise RigError("give --mmio-accesses M or --duration S")
        if args.wait:
            print(f"ready {os.getpid()}", flush=True)
            sys.stdin.readline()
        r = run(args.mmio_accesses, args.pages, sched, args.every, args.access,
                args.duration, args.slot_size, args.vcpus, args.coalesced)
    except RigError as e:
        print(f"microvm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.run_dir:
        write_workload(args.run_dir, r)
    text = json.dumps(r.as_dict(), indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0

