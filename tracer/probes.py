"""Build, load and drain the BPF programs of one backend (bcc).

The C lives in tracer/bpf/*.bpf.c; this module only chooses defines (pid
filter, ring vs perf buffer, which optional tracepoints exist, BTF struct
offsets) and hands raw event records to the caller in batches.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import TracerError
from .capabilities import BackendChoice, Capabilities, _quiet_stderr, choose_backend, probe

BPF_DIR = Path(__file__).parent / "bpf"
RINGBUF_PAGES = 8192  # 32 MiB: ~350k records, ~2 s of headroom at 175k/s

# Tracepoints a backend can do without (absent on some kernels): define name.
OPTIONAL_TPS = {
    "kvm:kvm_exit": "HAVE_KVM_EXIT",
    "kvm:kvm_entry": "HAVE_KVM_ENTRY",
    "kvmmmu:check_mmio_spte": "HAVE_CHECK_MMIO_SPTE",
    "kvmmmu:mark_mmio_spte": "HAVE_MARK_MMIO_SPTE",
    "kvmmmu:handle_mmio_page_fault": "HAVE_HANDLE_MMIO_PAGE_FAULT",
    "kvmmmu:kvm_mmu_zap_all_fast": "HAVE_KVM_MMU_ZAP_ALL_FAST",
}
REQUIRED_TPS = ("syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl", "kvm:kvm_mmio",
                "sched:sched_process_exit")

# struct event in common.bpf.c
EVENT_DTYPE = np.dtype([
    ("type", "<u4"), ("pid", "<u4"), ("tid", "<u4"), ("x", "<i4"),
    ("ns", "<u8"), ("ns2", "<u8"), ("a", "<u8"), ("b", "<u8"), ("c", "<u8"), ("d", "<u8"),
    ("e", "<u4"), ("f", "<u4"), ("g", "<u8"), ("h", "<u8"),
])
EV_MEMSLOT, EV_MMIO, EV_FAULT, EV_GEN, EV_ZAP, EV_VM, EV_SETMEM = range(1, 8)
LOST_KINDS = ("memslot_update", "mmio_access", "mmio_fault", "generation", "zap_all", "vm")


class RingReader:
    """Consumes the BPF ring buffer through its mmap, a batch at a time.

    Every record is one ``struct event``, so the committed span between the
    consumer and producer positions is an array of fixed-size slots: numpy
    reads it without a Python call per record (bcc's callback path costs
    ~10 us a record, which on a 2-CPU host slows the traced VM).
    """

    HDR = 8
    BUSY, DISCARD = 1 << 31, 1 << 30

    def __init__(self, fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.size, self.mask = size, size - 1
        self.slot = (EVENT_DTYPE.itemsize + self.HDR + 7) & ~7
        self.cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        # producer page, then the data area mapped twice (wrap-around is linear)
        self.prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                              offset=page)
        self.data = np.frombuffer(self.prod, dtype=np.uint8, offset=page)
        # positions as one 8-byte load/store each: struct's byte-wise copy can
        # tear, and a torn consumer_pos makes the kernel's reserve fail (lost)
        self._cpos = np.frombuffer(self.cons, dtype=np.uint64, count=1)
        self._ppos = np.frombuffer(self.prod, dtype=np.uint64, count=1)
        self.records = 0
        self.max_fill = 0.0        # highest fraction of the ring found in use
        self.max_gap_s = 0.0       # longest time between two reads
        self._last = time.monotonic()

    def read(self) -> np.ndarray:
        now = time.monotonic()
        self.max_gap_s = max(self.max_gap_s, now - self._last)
        self._last = now
        cpos = int(self._cpos[0])
        ppos = int(self._ppos[0])
        self.max_fill = max(self.max_fill, (ppos - cpos) / self.size)
        n = (ppos - cpos) // self.slot
        if n <= 0:
            return np.empty(0, EVENT_DTYPE)
        start = cpos & self.mask
        raw = self.data[start:start + n * self.slot].reshape(n, self.slot)
        hdr = raw[:, :4].copy().view("<u4").ravel()
        busy = np.flatnonzero(hdr & self.BUSY)
        if len(busy):  # reserved, not yet committed: stop before it
            n = int(busy[0])
            raw, hdr = raw[:n], hdr[:n]
        keep = (hdr & self.DISCARD) == 0
        out = np.ascontiguousarray(raw[keep, self.HDR:self.HDR + EVENT_DTYPE.itemsize])
        self._cpos[0] = cpos + n * self.slot
        self.records += len(out)
        return out.view(EVENT_DTYPE).ravel()

    def close(self) -> None:
        del self.data, self._cpos, self._ppos
        self.prod.close()
        self.cons.close()


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
    aggregate: bool = False           # MMIO intervals in the mmio_hist map
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

    def drain_stats(self) -> dict[str, float]:
        if self._ring is None:
            return {}
        return {"max_ring_fill": round(self._ring.max_fill, 4),
                "max_drain_gap_s": round(self._ring.max_gap_s, 3)}

    def exit_hist(self) -> dict[tuple[int, int, int], tuple[int, int]]:
        """Cumulative (pid, reason, log2 ns) -> (count, sum ns)."""
        return {(k.pid, k.reason, k.slot): (v.count, v.sum_ns)
                for k, v in self.bpf[b"exit_hist"].items()}

    def mmio_hist(self) -> dict[tuple[int, ...], tuple[int, int]]:
        """Cumulative (pid, vm, vcpu, reason, bits, log2 ns) -> (count, sum ns),
        summed over CPUs; empty unless loaded with ``aggregate``."""
        if not self.aggregate:  # the programs have no such map
            return {}
        out = {}
        for k, per_cpu in self.bpf[b"mmio_hist"].items():
            out[(k.pid, k.vm, k.vcpu, k.reason, k.bits, k.slot)] = (
                sum(v.count for v in per_cpu), sum(v.sum_ns for v in per_cpu))
        return out

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        while self.links:  # detach; bcc's cleanup() closes the program fds
            os.close(self.links.pop())
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def _source() -> str:
    return "\n".join((BPF_DIR / name).read_text()
                     for name in ("common.bpf.c", "kvm_events.bpf.c"))


def _defines(flags: dict[str, int | str]) -> str:
    return "".join(f"#define {k} {v}\n" for k, v in flags.items())


KPROBES = (("kprobe", "kvm_set_memslot", "on_set_memslot"),
           ("kretprobe", "kvm_set_memslot", "on_set_memslot_ret"),
           ("kprobe", "kvm_mmu_invalidate_mmio_sptes", "on_invalidate_mmio_sptes"))
# (attach type, function, program, parameters the program reads from ctx)
KFUNCS = (("fentry", "kvm_set_memslot", "fentry_set_memslot", 4),
          ("fexit", "kvm_set_memslot", "fexit_set_memslot", 4),
          ("fentry", "kvm_mmu_invalidate_mmio_sptes", "fentry_invalidate_mmio", 2))
KfuncTarget = tuple[str, str, str, int, str | None]  # kind, fn, program, BTF id, module


def program_text(backend: str, caps: Capabilities, pids: Sequence[int] = (),
                 emit_mmio: bool = True, offsets: dict[str, int] | None = None,
                 aggregate: bool = False
                 ) -> tuple[str, dict[str, int | str], list[str], list[str]]:
    """(C text without the buffer define, defines, probes attached, probes missing).

    ``aggregate``: MMIO intervals go to in-kernel histograms, not the buffer."""
    for tp in REQUIRED_TPS:
        if not caps.tracepoints.get(tp):
            raise TracerError(f"tracepoint {tp} is missing on this kernel")
    flags: dict[str, int | str] = {
        "FILTER_PIDS": int(bool(pids)), "RINGBUF_PAGES": RINGBUF_PAGES,
        "EMIT_MMIO": int(emit_mmio), "MEMSLOT_FROM_IOCTL": int(backend == "tracepoint"),
        "AGGREGATE": int(aggregate),
    }
    attached = list(REQUIRED_TPS)
    missing = []
    for tp, define in OPTIONAL_TPS.items():
        if caps.tracepoints.get(tp):
            flags[define] = 1
            attached.append(tp)
        else:
            missing.append(tp)
    text = _source()
    if backend in ("kprobe", "kfunc"):
        from .btf import kvm_offsets
        flags.update(offsets or kvm_offsets())
        flags["USE_KFUNC"] = int(backend == "kfunc")
        text += "\n" + (BPF_DIR / "memslot_fn.bpf.c").read_text()
        if backend == "kfunc":
            attached += [f"{kind}:{fn}" for kind, fn, _, _ in KFUNCS]
        else:
            attached += [f"{kind}:{fn}" for kind, fn, _ in KPROBES]
    elif backend != "tracepoint":
        raise TracerError(f"unknown backend {backend!r}")
    return text, flags, attached, missing


def _with_buffer(text: str, flags: dict[str, int | str], buffer: str) -> str:
    """The whole C text bcc compiles for output ``buffer`` (ringbuf or perf)."""
    flags["USE_RINGBUF"] = int(buffer == "ringbuf")
    return _defines(flags) + text


def pick_backend(requested: str | None) -> tuple[Capabilities, BackendChoice]:
    """This host's capabilities and the backend to load (``requested`` or the best)."""
    # No trial compile: loading the real programs proves bcc works.
    caps = probe(try_kfunc=None if requested is None else requested == "kfunc",
                 try_bpf=False)
    return caps, choose_backend(caps, requested)


def program_source(backend: str, caps: Capabilities, pids: Sequence[int] = (),
                   emit_mmio: bool = True, aggregate: bool = False) -> str:
    """The C program ``load`` would compile with the ring buffer (``--ebpf``)."""
    offsets = _kfunc_targets(None)[1] if backend == "kfunc" else None
    text, flags, _, _ = program_text(backend, caps, pids, emit_mmio, offsets, aggregate)
    return _with_buffer(text, flags, "ringbuf")


def _compile(text: str, flags: dict[str, int | str],
             buffers: Sequence[str] = ("ringbuf", "perf")) -> tuple[Any, str]:
    """BPF object and buffer kind: the ring buffer if the kernel takes it, else perf."""
    from bcc import BPF
    errors = []
    for buffer in buffers:
        try:
            with _quiet_stderr():
                return BPF(text=_with_buffer(text, flags, buffer).encode()), buffer
        except Exception as e:  # bcc raises bare Exception
            lines = str(e).strip().splitlines()
            errors.append(f"{buffer}: {lines[-1] if lines else type(e).__name__}")
    raise TracerError("cannot load the BPF programs: " + "; ".join(errors))


def _kfunc_targets(offsets: dict[str, int] | None
                   ) -> tuple[list[KfuncTarget], dict[str, int]]:
    """BTF ids of the kfunc backend's functions (found before a long compile)
    and the struct offsets, from one parse of the kvm BTF."""
    from .btf import find_func, kvm_offsets
    from .btf import load as load_btf
    btf = load_btf("kvm")
    targets: list[KfuncTarget] = []
    for kind, fn, prog, nargs in KFUNCS:
        btf_id, n, module = find_func(fn, btf)
        if n != nargs:  # the program would read the wrong ctx slots
            raise TracerError(f"{fn} has {n} parameters in BTF; {prog} expects {nargs}")
        targets.append((kind, fn, prog, btf_id, module))
    return targets, offsets or kvm_offsets(btf)


def _attach_kfuncs(bpf: Any, targets: Sequence[KfuncTarget]) -> list[int]:
    """Load bcc's compiled fentry/fexit programs with bpf(2) against the
    functions' BTF ids and attach them; the link fds.

    bcc has created the maps and put their fds in the instructions; what
    it cannot do before 0.28 is name a module's BTF object as the target."""
    from bcc import BPF
    from bcc.libbcc import lib

    from .bpfsys import btf_obj_fd, fentry
    obj_fds: dict[str, int] = {}
    links: list[int] = []
    try:
        for kind, fn, prog, btf_id, module in targets:
            if module and module not in obj_fds:
                fd = btf_obj_fd(module)
                if fd is None:
                    raise TracerError(f"no kernel BTF object named {module} ({module} unloaded?)")
                obj_fds[module] = fd
            name = prog.encode()
            start = lib.bpf_function_start(bpf.module, name)
            if not start:
                raise TracerError(f"program {prog} missing from the compiled object")
            insns = ctypes.string_at(start, lib.bpf_function_size(bpf.module, name))
            try:
                pfd, link = fentry(insns, kind, btf_id, obj_fds[module] if module else 0, prog)
            except OSError as e:
                raise TracerError(f"cannot attach {kind} on {fn}: {e.strerror}") from None
            # In bcc's table: cleanup() closes it and the recorder lists its id.
            bpf.funcs[name] = BPF.Function(bpf, name, pfd)
            links.append(link)
    except BaseException:
        for link in links:
            os.close(link)
        raise
    finally:
        for fd in obj_fds.values():  # the loaded programs hold their own reference
            os.close(fd)
    return links


def load(backend: str, caps: Capabilities, pids: Sequence[int] = (),
         emit_mmio: bool = True, offsets: dict[str, int] | None = None,
         buffers: Sequence[str] = ("ringbuf", "perf"), aggregate: bool = False) -> Probes:
    """Compile, load and attach ``backend``'s programs, filtered to ``pids``.

    ``buffers``: the output buffers to try in order (tests force "perf")."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise TracerError("bcc is not importable (apt install python3-bpfcc; use a venv "
                          "with system site packages)") from None
    kfuncs: list[KfuncTarget] = []
    if backend == "kfunc":
        kfuncs, offsets = _kfunc_targets(offsets)
    text, flags, attached, missing = program_text(backend, caps, pids, emit_mmio, offsets,
                                                  aggregate)
    bpf, buffer = _compile(text, flags, buffers)
    links: list[int] = []
    try:
        if kfuncs:
            links = _attach_kfuncs(bpf, kfuncs)
        if backend == "kprobe":
            for kind, fn, prog in KPROBES:
                attach = bpf.attach_kretprobe if kind == "kretprobe" else bpf.attach_kprobe
                try:
                    with _quiet_stderr():
                        attach(event=fn.encode(), fn_name=prog.encode())
                except Exception as e:
                    raise TracerError(f"cannot attach {kind} on {fn}: "
                                      f"{str(e).strip().splitlines()[-1]}") from None
        if pids:
            table = bpf[b"pids"]
            for pid in pids:
                table[ctypes.c_uint(pid)] = ctypes.c_ubyte(1)
    except BaseException:
        for link in links:
            os.close(link)
        bpf.cleanup()
        raise
    offs = {k: int(v) for k, v in flags.items() if k.startswith("OFF_")}
    probes = Probes(bpf, backend, buffer, attached, missing, offs, links, aggregate=aggregate)
    probes.open()
    return probes


def kvm_fds(pid: int) -> tuple[list[int], dict[int, int]]:
    """A process's KVM VM fds and {vCPU fd: vCPU id}, from /proc/PID/fd."""
    vms, vcpus = [], {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return vms, vcpus
    for name in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link == "anon_inode:kvm-vm":
            vms.append(int(name))
        elif link.startswith("anon_inode:kvm-vcpu:"):
            vcpus[int(name)] = int(link.rsplit(":", 1)[1])
    return vms, vcpus


def seed_vcpus(probes: Probes, pids: Sequence[int],
               sole_vm: dict[int, int] | None = None) -> int:
    """Teach the programs the vCPUs of VMs created before they attached
    (e.g. a running QEMU): (pid, vCPU fd) -> VM id and vCPU id.  A process
    with several VMs gets only the vCPU ids (which VM a vCPU fd belongs to
    is not visible in /proc).  ``sole_vm`` collects pid -> VM id for
    processes with exactly one VM."""
    table = probes.bpf[b"vcpu_fds"]
    if not pids:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    n = 0
    for pid in pids:
        vms, vcpus = kvm_fds(pid)
        if len(vms) == 1 and sole_vm is not None:
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


def verify_kprobe_programs(caps: Capabilities) -> list[str]:
    """Compile the kprobe backend and load (verify) its programs without
    attaching: checks it on hosts that cannot attach kprobes."""
    from bcc import BPF
    text, flags, _, _ = program_text("kprobe", caps, [1])
    bpf, _ = _compile(text, flags)
    try:
        for _, _, prog in KPROBES:
            bpf.load_func(prog.encode(), BPF.KPROBE)
        return [prog for _, _, prog in KPROBES]
    finally:
        bpf.cleanup()


def resolve_pids(pids: Sequence[int]) -> list[int]:
    """Process ids to filter on: a thread id maps to its process; TracerError if gone."""
    out = []
    for pid in pids:
        if pid <= 0:
            raise TracerError(f"bad pid {pid}")
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            raise TracerError(f"no process with pid {pid}") from None
        except PermissionError:
            raise TracerError(f"pid {pid}: permission denied reading /proc/{pid}") from None
        tgid = next((int(ln.split()[1]) for ln in status.splitlines()
                     if ln.startswith("Tgid:")), pid)
        if tgid not in out:
            out.append(tgid)
    return out


def vcpu_from_comm(pid: int, tid: int) -> int:
    """QEMU names vCPU threads 'CPU n/KVM'; -1 when the name says nothing."""
    try:
        comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return -1
    if comm.startswith("CPU ") and comm.endswith("/KVM"):
        try:
            return int(comm[4:-4])
        except ValueError:
            return -1
    return -1


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


Callback = Callable[[np.ndarray], None]
