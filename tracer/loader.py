"""Build, load and attach the BPF programs of one backend (bcc).

The C lives in tracer/bpf/*.bpf.c; this module only chooses defines (pid
filter, ring vs perf buffer, which optional tracepoints exist, BTF struct
offsets), compiles, attaches, and hands back a ``probes.Probes``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import TracerError
from .capabilities import (
    IOCTL_SYSCALL,
    RAW_PROTOS,
    BackendChoice,
    Capabilities,
    _quiet_stderr,
    choose_backend,
    probe,
    raw_define,
)

if TYPE_CHECKING:  # .probes imports numpy: loaded after the compile (load)
    from .probes import Probes

RINGBUF_PAGES = 8192  # 32 MiB: ~350k records, ~2 s of headroom at 175k/s
HIST_SLOTS = 64  # log2 ns latency buckets a histogram key (ATOMICS layout)

BPF_DIR = Path(__file__).parent / "bpf"

# Tracepoints a backend can do without (absent on some kernels): define name.
OPTIONAL_TPS = {
    "kvm:kvm_exit": "HAVE_KVM_EXIT",
    "kvm:kvm_entry": "HAVE_KVM_ENTRY",
    "kvmmmu:check_mmio_spte": "HAVE_CHECK_MMIO_SPTE",
    "kvmmmu:mark_mmio_spte": "HAVE_MARK_MMIO_SPTE",
    "kvmmmu:kvm_mmu_zap_all_fast": "HAVE_KVM_MMU_ZAP_ALL_FAST",
}
# The KVM ioctls' tracepoints: not needed where they are hooked otherwise
# (Capabilities.ioctl_hook).
IOCTL_TPS = ("syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl")
REQUIRED_TPS = (*IOCTL_TPS, "kvm:kvm_mmio", "sched:sched_process_exit")


def attached_name(tp: str, caps: Capabilities) -> str:
    """How probes_attached names tracepoint ``tp``: raw_tracepoint:<name>
    where it is attached raw."""
    return f"raw_tracepoint:{tp.split(':')[1]}" if caps.is_raw(tp) else tp


def tracepoint_of(probe: str) -> str:
    """The tracepoint (as perf names it) behind a probes_attached entry."""
    if probe.startswith("raw_tracepoint:"):
        name = probe.split(":")[1]
        return next(tp for tp in RAW_PROTOS if tp.endswith(":" + name))
    return probe


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
# The ioctl syscall's, where Capabilities.ioctl_hook is "fentry" (any backend).
IOCTL_FUNCS = (("fentry", IOCTL_SYSCALL, "fentry_ioctl", 1),
               ("fexit", IOCTL_SYSCALL, "fexit_ioctl", 1))
KfuncTarget = tuple[str, str, str, int, str | None]  # kind, fn, program, BTF id, module


def mmio_rows(emit_mmio: bool, aggregate: bool) -> bool:
    """Whether kvm_mmio accesses become mmio_access rows: aggregate mode is
    the cheapest, so it implies --no-mmio-access."""
    return emit_mmio and not aggregate


def program_text(backend: str, caps: Capabilities, pids: Sequence[int] = (),
                 emit_mmio: bool = True, offsets: dict[str, int] | None = None,
                 aggregate: bool = False
                 ) -> tuple[str, dict[str, int | str], list[str], list[str]]:
    """(C text without the buffer define, defines, probes attached, probes missing).

    ``aggregate``: MMIO intervals go to in-kernel histograms, not the buffer
    (and no mmio_access rows: ``mmio_rows``)."""
    hook = caps.ioctl_hook(backend)
    for tp in REQUIRED_TPS:
        if not caps.tracepoints.get(tp) and not (hook != "tracepoint" and tp in IOCTL_TPS):
            raise TracerError(f"tracepoint {tp} is missing on this kernel")
    flags: dict[str, int | str] = {
        "FILTER_PIDS": int(bool(pids)), "RINGBUF_PAGES": RINGBUF_PAGES,
        "HIST_SLOTS": HIST_SLOTS,
        "EMIT_MMIO": int(mmio_rows(emit_mmio, aggregate)),
        "MEMSLOT_FROM_IOCTL": int(backend == "tracepoint"),
        "AGGREGATE": int(aggregate), "IOCTL_FENTRY": int(hook == "fentry"),
        "IOCTL_FREE": int(hook == "none"), "ATOMICS": int(caps.atomics.ok),
    }
    # Raw where capabilities found the tracepoint attachable with the
    # prototype its program reads (the manifest's probes_attached says
    # which), else classic.
    for tp in RAW_PROTOS:
        flags[raw_define(tp)] = int(caps.is_raw(tp))
        if caps.is_raw(tp):
            flags.update(caps.raw[tp].defines)
    attached = [*caps.ioctl_probes(backend),
                *(attached_name(tp, caps) for tp in REQUIRED_TPS if tp not in IOCTL_TPS)]
    missing = []
    for tp, define in OPTIONAL_TPS.items():
        if caps.tracepoints.get(tp):
            flags[define] = 1
            attached.append(attached_name(tp, caps))
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


@dataclass
class Loaded:
    """Programs compiled and attached ahead of their Recorder
    (``Recorder.start(loaded=...)``), with what chose them."""

    caps: Capabilities
    choice: BackendChoice
    pids: list[int]
    emit_mmio: bool
    aggregate: bool
    probes: Probes
    load_s: float  # compile + attach, seconds


def preload(requested: str | None, pids: Sequence[int], emit_mmio: bool = True,
            aggregate: bool = False) -> Loaded:
    """What ``Recorder.start`` loads, done now (e.g. in a thread while the
    caller imports the rest: lab-run in the TCG L1, where the compile and
    pyarrow's import take 15-25 s and 10-15 s of CPU each).  The caller
    owns the probes until a Recorder takes them: close them if none will."""
    from .procfs import resolve_pids
    resolved = resolve_pids(pids)
    caps, choice = pick_backend(requested)
    t = time.monotonic()
    probes = load(choice.name, caps, resolved, emit_mmio, aggregate=aggregate)
    return Loaded(caps, choice, resolved, emit_mmio, aggregate, probes,
                  round(time.monotonic() - t, 3))


def program_source(backend: str, caps: Capabilities, pids: Sequence[int] = (),
                   emit_mmio: bool = True, aggregate: bool = False) -> str:
    """The C program ``load`` would compile with the ring buffer (``--ebpf``)."""
    text, flags, _, _ = program_text(backend, caps, pids, emit_mmio, None, aggregate)
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


def _fentry_targets(funcs: Sequence[tuple[str, str, str, int]]) -> list[KfuncTarget]:
    """BTF ids of ``funcs``' functions (found before a long compile), in the
    kvm module's BTF or vmlinux."""
    from .btf import find_func
    from .btf import load as load_btf
    btf = load_btf("kvm")
    targets: list[KfuncTarget] = []
    for kind, fn, prog, nargs in funcs:
        btf_id, n, module = find_func(fn, btf)
        if n != nargs:  # the program would read the wrong ctx slots
            raise TracerError(f"{fn} has {n} parameters in BTF; {prog} expects {nargs}")
        targets.append((kind, fn, prog, btf_id, module))
    return targets


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


PERF_EVENT_IOC_DISABLE = 0x2401


def _quiet_own_perf_events(bpf: Any) -> None:
    """Disable the perf events bcc opened to attach the tracepoint programs.

    The programs return TP_KEEP (1) so that other perf users keep their
    events; the kernel then also builds a perf sample for every enabled
    perf event on the tracepoint, bcc's own (buffer-less) one included:
    +0.3-0.5 us of the vCPU's time per event here.  The programs hang off
    the tracepoint, not off that event's enabled state, so they run on
    every CPU while it is disabled (tested: every row still recorded)."""
    for fd in bpf.tracepoint_fds.values():
        fcntl.ioctl(fd, PERF_EVENT_IOC_DISABLE, 0)


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
    text, flags, attached, missing = program_text(backend, caps, pids, emit_mmio, offsets,
                                                  aggregate)
    funcs = ((KFUNCS if backend == "kfunc" else ())
             + (IOCTL_FUNCS if flags["IOCTL_FENTRY"] else ()))
    kfuncs = _fentry_targets(funcs) if funcs else []  # before the long compile
    bpf, buffer = _compile(text, flags, buffers)
    links: list[int] = []
    try:
        _quiet_own_perf_events(bpf)
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
    # Only now: numpy, which .probes imports, is seconds of a TCG L1's vCPU,
    # and the compile above runs without the GIL beside whatever imports it
    # in the meantime (lab-run's main thread: pyarrow, which imports numpy).
    from .probes import Probes
    offs = {k: int(v) for k, v in flags.items() if k.startswith("OFF_")}
    probes = Probes(bpf, backend, buffer, attached, missing, offs, links, aggregate=aggregate,
                    atomics=bool(flags["ATOMICS"]))
    probes.open()
    return probes


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
