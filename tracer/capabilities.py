"""What this host lets the tracer see, found by trying rather than by version.

``probe()`` reads the system (tracefs, BTF, /dev/kvm, and the KVM modules
through recording.hostfacts, which the rig shares) and tries to compile and
load tiny BPF programs; ``choose_backend()`` turns the answer into the
attach backend the tracer will use and the data it will lack.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from recording.hostfacts import kvm_params, kvm_vendor_module

from . import TracerError

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")
BACKENDS = ("kprobe", "kfunc", "tracepoint")

# The tracepoints slotscope uses; syscalls:* carry the tracepoint-only
# backend's memslot updates, sched_process_exit ends a vCPU thread's last exit.
TRACEPOINTS = (
    "kvm:kvm_exit", "kvm:kvm_entry", "kvm:kvm_mmio", "kvm:kvm_userspace_exit",
    "kvmmmu:check_mmio_spte", "kvmmmu:mark_mmio_spte", "kvmmmu:kvm_mmu_zap_all_fast",
    "syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl", "sched:sched_process_exit",
)
# The ioctl syscall's entry point (x86-64), taken by fentry/fexit where the
# kernel allows: ``_ioctl_fentry``.
IOCTL_SYSCALL = "__x64_sys_ioctl"
# Functions the kprobe/kfunc backends attach to.
KERNEL_FUNCTIONS = ("kvm_set_memslot", "kvm_mmu_invalidate_mmio_sptes")


@dataclass(frozen=True)
class Raw:
    """Whether one tracepoint is attached raw, and why (or why not);
    ``defines``: what else its raw program reads (kvm_exit's struct offsets,
    btf.exit_offsets), found once here."""

    ok: bool
    why: str
    defines: dict[str, int] = field(default_factory=dict)


@dataclass
class Capabilities:
    kernel: str
    tracefs: Path | None
    btf: bool
    kvm_btf: bool  # struct kvm's BTF: in vmlinux (kvm built in) or /sys/kernel/btf/kvm
    kprobes: bool
    kprobes_why: str
    kfunc: bool
    kfunc_why: str
    tracepoints: dict[str, bool]
    bcc_ok: bool
    bcc_why: str
    header_tree: str
    header_matches: bool
    kvm_module: str | None
    kvm_params: dict[str, str]
    functions: dict[str, bool] = field(default_factory=dict)
    # The hot tracepoints that attach raw here (RAW_PROTOS), each with why
    # or why not; absent: not tried.
    raw: dict[str, Raw] = field(default_factory=dict)
    # The KVM ioctls hooked by fentry/fexit on the ioctl syscall
    # (IOCTL_SYSCALL) instead of the syscalls:sys_{enter,exit}_ioctl pair.
    ioctl_fentry: Raw = field(default_factory=lambda: Raw(False, "not tried"))
    # bpf_task_pt_regs usable: a program can read the current syscall's
    # arguments (ioctl_free)
    task_regs: Raw = field(default_factory=lambda: Raw(False, "not tried"))
    # BPF atomics that return the old value (compare-and-swap, fetch-add):
    # traced threads' entries in a tid-indexed array, and the exit and
    # aggregate mode's MMIO histograms in one array (common.bpf.c); without,
    # all in hash maps.
    atomics: Raw = field(default_factory=lambda: Raw(False, "not tried"))

    @property
    def mmio_caching(self) -> bool:
        return self.kvm_params.get("kvm.mmio_caching", "Y").upper().startswith("Y")

    def is_raw(self, name: str) -> bool:
        """Whether tracepoint ``name`` (e.g. "kvm:kvm_exit") is attached raw."""
        r = self.raw.get(name)
        return bool(r and r.ok)

    def classic(self) -> Capabilities:
        """The same host with every tracepoint attached classic (tests and
        benches compare the two)."""
        return replace(self, raw={n: Raw(False, "classic requested") for n in self.raw})

    def ioctl_free(self, backend: str) -> bool:
        """Whether ``backend`` traces exits with no hook on the ioctl syscall:
        a vCPU thread's identity from the raw kvm_exit's vCPU (its id, and
        its struct kvm, learnt as a VM at the memslot ioctl, whose fd the
        kprobe/kfunc programs read from the syscall's saved registers), and
        KVM_RUN's return from the raw kvm_userspace_exit.  The hook ran on
        every KVM_RUN, twice."""
        return (backend in ("kprobe", "kfunc") and self.task_regs.ok
                and self.is_raw("kvm:kvm_exit") and self.is_raw("kvm:kvm_userspace_exit"))

    def ioctl_hook(self, backend: str) -> str:
        """How ``backend`` sees the KVM ioctls here, the first that works:
        "none" (``ioctl_free``), "fentry" (``ioctl_fentry``), "tracepoint"."""
        if self.ioctl_free(backend):
            return "none"
        return "fentry" if self.ioctl_fentry.ok else "tracepoint"

    def ioctl_probes(self, backend: str) -> tuple[str, ...]:
        """The probes that see the KVM ioctls, as probes_attached names them."""
        return {"none": ("raw_tracepoint:kvm_userspace_exit",),
                "fentry": (f"fentry:{IOCTL_SYSCALL}", f"fexit:{IOCTL_SYSCALL}"),
                "tracepoint": ("syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl"),
                }[self.ioctl_hook(backend)]


@dataclass
class BackendChoice:
    name: str
    reason: str
    missing: list[str]


def _is_dir(p: Path) -> bool:
    # tracefs is root-only: EACCES means "cannot see", not a traceback.
    try:
        return p.is_dir()
    except OSError:
        return False


def find_tracefs() -> Path | None:
    for p in TRACEFS_CANDIDATES:
        if _is_dir(p / "events"):
            return p
    return None


def _kprobes(tracefs: Path | None) -> tuple[bool, str]:
    if tracefs is None:
        return False, "tracefs not mounted or not readable (run as root)"
    if (tracefs / "kprobe_events").exists():
        return True, "kprobe_events present"
    return False, "no kprobe_events in tracefs (kernel built without CONFIG_KPROBES)"


def _kallsyms() -> set[str]:
    names: set[str] = set()
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in KERNEL_FUNCTIONS:
                    names.add(parts[2])
    except OSError:
        pass
    return names


def _bcc_importable() -> tuple[bool, str]:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False, "bcc not importable (apt install python3-bpfcc; venv with system site pkgs)"
    return True, "importable (load not tried)"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """libbpf prints load failures on fd 2; the caller reports them itself."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _try_bpf(text: str, load: str | None = None) -> tuple[bool, str]:
    """Compile ``text`` with bcc and load it (``load`` names a function to load
    as a tracepoint program)."""
    ok, why = _bcc_importable()
    if not ok:
        return ok, why
    from bcc import BPF
    try:
        with _quiet_stderr():
            b = BPF(text=text.encode())
            if load:
                b.load_func(load.encode(), BPF.TRACEPOINT)
            b.cleanup()
    except Exception as e:  # bcc raises bare Exception
        msg = str(e).strip().splitlines()
        return False, msg[-1] if msg else type(e).__name__
    return True, "compiled and loaded"


def _header_tree() -> tuple[str, bool]:
    build = Path("/lib/modules") / platform.release() / "build"
    if not build.exists():
        return "none", False
    real = build.resolve()
    # Debian names header dirs linux-headers-<release>; a stand-in tree for
    # another release compiles but its struct layouts must not be trusted.
    return str(real), platform.release() in real.name


def _kfunc() -> tuple[bool, str]:
    """Load and attach a trivial fentry program on kvm_set_memslot the way the
    kfunc backend does (raw bpf(2) against the kvm module's BTF object), then
    close it.  No bcc compile: a BTF parse and two syscalls."""
    from .bpfsys import RETURN_ZERO, btf_obj_fd, fentry
    from .btf import find_func
    fn = "kvm_set_memslot"
    if not BTF_VMLINUX.exists():
        return False, "no /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF)"
    obj = 0
    try:
        btf_id, _, module = find_func(fn)
        if module:
            obj = btf_obj_fd(module) or 0
            if not obj:
                return False, f"no kernel BTF object named {module}"
        prog, link = fentry(RETURN_ZERO, "fentry", btf_id, obj, "slotscope_probe")
    except TracerError as e:
        return False, str(e)
    except OSError as e:
        if e.errno == errno.EPERM:
            why = "run as root" if os.geteuid() else "kernel refused to load a BPF " \
                "tracing (fentry) program"
            return False, f"{why} (EPERM)"
        return False, f"fentry on {fn} refused: {e.strerror}"
    finally:
        if obj:
            os.close(obj)
    os.close(link)
    os.close(prog)
    return True, f"fentry on {fn} loads and attaches (BTF of {module or 'vmlinux'})"


# The tracepoints the programs take raw where they can, with the prototype
# (BTF.param_kinds of btf_trace_<name>) each program reads its arguments as.
# A raw program runs from the tracepoint's call with those arguments, without
# the perf record a classic tracepoint builds (and fills through the vendor's
# callbacks: kvm_exit's get_exit_info) before its program runs.
RAW_PROTOS: dict[str, list[str] | None] = {
    # (int type, int len, u64 gpa, void *val); older kernels passed the value
    "kvm:kvm_mmio": ["int4", "int4", "int8", "ptr"],
    # (struct kvm_vcpu *vcpu, u32 isa): the reason is read from the vendor's
    # vCPU struct at offsets from its BTF (btf.exit_offsets)
    "kvm:kvm_exit": ["ptr", "int4"],
    # reads no argument: it closes the thread's open exit
    "kvm:kvm_entry": None,
    # (u32 reason, int errno), read by nothing: KVM_RUN returns (ioctl_free)
    "kvm:kvm_userspace_exit": None,
    # (u64 spte, unsigned int kvm_gen, unsigned int spte_gen)
    "kvmmmu:check_mmio_spte": ["int8", "int4", "int4"],
}
RAW_ENV = "SLOTSCOPE_RAW_TRACEPOINTS"  # "0": attach every tracepoint classic


def raw_define(tp: str) -> str:
    """The define kvm_events.bpf.c tests for tracepoint ``tp`` attached raw:
    RAW_<NAME>."""
    return "RAW_" + tp.split(":")[1].upper()


def _raw(tp: str, tracepoints: dict[str, bool], vendor: str | None) -> Raw:
    """Whether tracepoint ``tp`` can be traced raw: its prototype in BTF is
    the one the program reads, what else the program reads is found, and a
    trivial raw tracepoint program loads and attaches (bpf(2), no compile)."""
    from .bpfsys import RETURN_ZERO, raw_tracepoint
    from .btf import exit_offsets, tracepoint_params
    if not tracepoints.get(tp):
        return Raw(False, f"{tp} absent")
    if os.environ.get(RAW_ENV) == "0":
        return Raw(False, f"classic: {RAW_ENV}=0")
    want = RAW_PROTOS[tp]
    name = tp.split(":")[1]
    params = tracepoint_params(name)
    if params is None:
        return Raw(False, f"no btf_trace_{name} in the kernel's BTF: prototype unknown")
    if want is not None and params != want:
        return Raw(False, f"{name}'s prototype in BTF is ({', '.join(params)}), not "
                   f"({', '.join(want)})")
    why = f"prototype ({', '.join(params)}) from BTF"
    defines: dict[str, int] = {}
    if name == "kvm_exit":
        if vendor == "kvm_pvm":  # emulates its guests: no VM exits to trace
            return Raw(False, "kvm_pvm never fires kvm_exit: left classic, unused")
        try:
            defines = exit_offsets(vendor or "no KVM vendor module")
        except TracerError as e:
            return Raw(False, f"exit reason unreadable: {e}")
        why += f", exit reason from {vendor}'s BTF"
    try:
        prog, link = raw_tracepoint(RETURN_ZERO, name, "slotscope_probe")
    except OSError as e:
        return Raw(False, f"raw tracepoint on {name} refused: {e.strerror}")
    os.close(link)
    os.close(prog)
    return Raw(True, why, defines)


def _ioctl_fentry() -> Raw:
    """Whether the KVM ioctls can be seen by fentry/fexit on the ioctl
    syscall (IOCTL_SYSCALL) rather than by the syscalls:sys_{enter,exit}_ioctl
    tracepoints.  Any syscall tracepoint sends every syscall of every process
    through the kernel's traced slow path (+40 ns a syscall on this host);
    a trampoline on the one syscall costs only ioctl callers.  Per KVM_RUN
    in the TCG L1 the empty pair cost a third less, the recorder's programs
    on it about the same (tracer/README.md).  Tried as the recorder attaches
    it: fentry and fexit of a trivial program (bpf(2))."""
    from .bpfsys import RETURN_ZERO, fentry
    from .btf import find_func
    from .btf import load as load_btf
    if platform.machine() != "x86_64":  # the programs read x86-64 pt_regs
        return Raw(False, f"{platform.machine()}: the fentry programs read x86-64 registers")
    if not BTF_VMLINUX.exists():
        return Raw(False, "no /sys/kernel/btf/vmlinux")
    try:
        btf_id, nargs, _ = find_func(IOCTL_SYSCALL, load_btf())
    except TracerError as e:
        return Raw(False, str(e))
    if nargs != 1:
        return Raw(False, f"{IOCTL_SYSCALL} has {nargs} parameters in BTF, not (pt_regs *)")
    for kind in ("fentry", "fexit"):
        try:
            prog, link = fentry(RETURN_ZERO, kind, btf_id, 0, "slotscope_probe")
        except OSError as e:
            return Raw(False, f"{kind} on {IOCTL_SYSCALL} refused: {e.strerror}")
        os.close(link)
        os.close(prog)
    return Raw(True, f"fentry and fexit on {IOCTL_SYSCALL} load and attach")


def _trial(insns: tuple[tuple[int, int, int, int], ...], what: str) -> Raw:
    """Load ``insns`` (opcode, regs, off, imm each), then r0 = 0 and exit, as
    a raw tracepoint program, not attached: whether the kernel allows
    ``what``."""
    from .bpfsys import RETURN_ZERO, load_tracing
    code = b"".join(struct.pack("<BBhi", *i) for i in insns) + RETURN_ZERO
    try:
        fd = load_tracing(code, "raw_tracepoint", 0, 0, "slotscope_probe")
    except OSError as e:
        return Raw(False, f"{what} refused: {e.strerror.splitlines()[-1]}")
    os.close(fd)
    return Raw(True, f"{what} loads")


def _task_regs() -> Raw:
    """Whether programs may call bpf_task_pt_regs (5.15) on the current task
    (bpf_get_current_task_btf)."""
    if platform.machine() != "x86_64":  # the programs read x86-64 pt_regs
        return Raw(False, f"{platform.machine()}: the programs read x86-64 registers")
    # r0 = bpf_get_current_task_btf(); r1 = r0; r0 = bpf_task_pt_regs(r1)
    return _trial(((0x85, 0, 0, 158), (0xBF, 0x01, 0, 0), (0x85, 0, 0, 175)),
                  "bpf_task_pt_regs")


def _atomics() -> Raw:
    """Whether programs may use BPF atomics with fetch (5.12): a
    compare-and-swap on the stack."""
    # *(u64 *)(r10 - 8) = 0; r0 = 0; r1 = 1; r0 = cmpxchg((u64 *)(r10 - 8), r0, r1)
    return _trial(((0x7A, 0x0A, -8, 0), (0xB7, 0, 0, 0), (0xB7, 0x01, 0, 1),
                   (0xDB, 0x1A, -8, 0xF1)), "BPF compare-and-swap")


def probe(try_kfunc: bool | None = True, try_bpf: bool = True) -> Capabilities:
    """``try_kfunc``: load a trial fentry program (None: only where kprobes are
    missing, since kprobe is preferred anyway).  ``try_bpf=False`` skips the
    trial compile (a whole clang run, tens of seconds in a TCG L1) for callers
    whose own load proves bcc works."""
    tracefs = find_tracefs()
    kprobes, kprobes_why = _kprobes(tracefs)
    events = tracefs / "events" if tracefs else None
    tps = {tp: bool(events and _is_dir(events / tp.replace(":", "/"))) for tp in TRACEPOINTS}
    if try_bpf:
        bcc_ok, bcc_why = _try_bpf("int slotscope_probe(void *ctx) { return 0; }",
                                   "slotscope_probe")
        if not bcc_ok and "super-user" in bcc_why:
            bcc_why = "the kernel refused to load a BPF program: run as root"
    else:
        bcc_ok, bcc_why = _bcc_importable()
    funcs = _kallsyms()
    if try_kfunc is None:
        try_kfunc = not kprobes
    kfunc, kfunc_why = _kfunc() if try_kfunc else (False, "not tried")
    header, matches = _header_tree()
    vendor = kvm_vendor_module()
    raw = {tp: _raw(tp, tps, vendor) for tp in RAW_PROTOS}
    return Capabilities(
        kernel=platform.release(), tracefs=tracefs, btf=BTF_VMLINUX.exists(),
        # A loadable kvm has its own BTF object; a built-in one is in vmlinux.
        kvm_btf=Path("/sys/kernel/btf/kvm").exists()
        or (BTF_VMLINUX.exists() and not Path("/sys/module/kvm/initstate").exists()),
        kprobes=kprobes, kprobes_why=kprobes_why, kfunc=kfunc, kfunc_why=kfunc_why,
        tracepoints=tps, bcc_ok=bcc_ok, bcc_why=bcc_why, header_tree=header,
        header_matches=matches, kvm_module=vendor, kvm_params=kvm_params(),
        functions={f: f in funcs for f in KERNEL_FUNCTIONS},
        raw=raw, ioctl_fentry=_ioctl_fentry(), task_regs=_task_regs(), atomics=_atomics(),
    )


def _unavailable(caps: Capabilities, name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if not caps.bcc_ok:
        return f"bcc cannot load programs: {caps.bcc_why}"
    if name == "kprobe":
        if not caps.kprobes:
            return caps.kprobes_why
    elif name == "kfunc":
        if not caps.kfunc:
            return caps.kfunc_why
        if not caps.kvm_btf:
            return "no BTF for the kvm module"
    elif name == "tracepoint":
        if caps.tracefs is None:
            return "tracefs not mounted or not readable"
        if not (caps.tracepoints["syscalls:sys_enter_ioctl"]
                and caps.tracepoints["syscalls:sys_exit_ioctl"]):
            return "syscalls:sys_{enter,exit}_ioctl tracepoints missing (CONFIG_FTRACE_SYSCALLS)"
        return None
    else:
        return f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})"
    missing = [f for f, ok in caps.functions.items() if not ok]
    if missing:
        return f"{', '.join(missing)} not in /proc/kallsyms (kvm not loaded?)"
    return None


def infers_change_types(backend: str) -> bool:
    """Whether memslot change types are inferred from each slot's history
    (the ioctl-only tracepoint backend) instead of read from KVM: such a
    recording must see a VMM's first memslots to type its later updates."""
    return backend == "tracepoint"


def missing_data(caps: Capabilities, backend: str) -> list[str]:
    """What a recording made here will lack, one short phrase each."""
    out = []
    if backend == "tracepoint":
        out.append("full memslot generations and in-progress windows (only the masked "
                   "MMIO gen from check/mark_mmio_spte)")
        out.append("KVM-internal memslots (not set through the ioctl)")
    if caps.kvm_module is None:
        out.append("everything KVM: no KVM module loaded")
    if not caps.mmio_caching:
        out.append("MMIO SPTE events (kvm.mmio_caching=N: check/mark_mmio_spte never fire)")
    for tp in TRACEPOINTS:
        if not caps.tracepoints[tp] and not tp.startswith("syscalls"):
            out.append(f"{tp} (tracepoint absent)")
    if caps.kvm_module == "kvm_pvm":
        out.append("kvm_exit/kvm_entry latencies (kvm_pvm emulates guests; they do not fire)")
    return out


def choose_backend(caps: Capabilities, requested: str | None = None) -> BackendChoice:
    if requested is not None:
        why = _unavailable(caps, requested)
        if why:
            raise TracerError(f"backend {requested} unavailable: {why}")
        return BackendChoice(requested, "requested with --backend",
                             missing_data(caps, requested))
    refused = []
    for name in BACKENDS:
        why = _unavailable(caps, name)
        if why is None:
            reason = "preferred backend" if not refused else "; ".join(refused)
            return BackendChoice(name, reason, missing_data(caps, name))
        refused.append(f"{name}: {why}")
    raise TracerError("no tracer backend can run here: " + "; ".join(refused))
