"""``slotscope doctor``: what this host lets slotscope trace, and how to fix the rest."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

from recording.hostfacts import FAIL, OK, WARN, Check, param_on
from tracer import TracerError
from tracer.capabilities import TRACEPOINTS, Capabilities, choose_backend, probe


def _tracepoint_checks(caps: Capabilities) -> list[Check]:
    out = []
    if caps.tracefs is None:
        return [Check("tracepoints", FAIL, "tracefs not mounted or not readable",
                      "run as root; mount -t tracefs tracefs /sys/kernel/tracing")]
    for system in ("kvm", "kvmmmu"):
        names = [tp for tp in TRACEPOINTS if tp.startswith(system + ":")]
        present = [tp.split(":")[1] for tp in names if caps.tracepoints[tp]]
        absent = [tp.split(":")[1] for tp in names if not caps.tracepoints[tp]]
        if not absent:
            out.append(Check(f"tracepoints {system}:*", OK, " ".join(present)))
        else:
            out.append(Check(
                f"tracepoints {system}:*", WARN if present else FAIL,
                f"missing {' '.join(absent)}" + (f"; have {' '.join(present)}" if present else ""),
                "load kvm (modprobe kvm_intel/kvm_amd) and mount tracefs"))
    return out


def _kvm_checks(caps: Capabilities) -> list[Check]:
    out = []
    dev = Path("/dev/kvm")
    if not dev.exists():
        out.append(Check("/dev/kvm", FAIL, "absent",
                         "enable virtualization in firmware; modprobe kvm_intel or kvm_amd"))
    else:
        usable = os.access(dev, os.R_OK | os.W_OK)
        out.append(Check.of("/dev/kvm", usable,
                            f"provided by {caps.kvm_module or 'unknown module'}",
                            "run as root or join the kvm group"))
    p = caps.kvm_params
    if "kvm.mmio_caching" in p:
        on = caps.mmio_caching
        out.append(Check.of("kvm.mmio_caching", on, p["kvm.mmio_caching"],
                            "no MMIO SPTEs on this host: use `slotscope labvm`"))
    if "kvm.tdp_mmu" in p:
        out.append(Check("kvm.tdp_mmu", OK, p["kvm.tdp_mmu"]))
    for key in ("kvm_intel.nested", "kvm_amd.nested", "kvm_intel.ept", "kvm_amd.npt"):
        if key in p:
            module, param = key.split(".")
            out.append(Check.of(key, param_on(p[key]), p[key], f"modprobe {module} {param}=1"))
    return out


def _rig_checks() -> list[Check]:
    out: list[Check] = []
    try:
        from vmrig.host import qemu_checks
    except ImportError:
        out.append(Check("qemu", WARN, "vmrig.host not available", "reinstall slotscope"))
    else:
        out.extend(qemu_checks())
    try:
        from vmrig.labvm import labvm_check
    except ImportError:
        out.append(Check("nested lab VM", WARN, "vmrig.labvm not available", "reinstall slotscope"))
    else:
        out.append(labvm_check())
    return out


def run_checks() -> tuple[list[Check], dict[str, object]]:
    caps = probe()
    checks = [
        Check("kernel", OK, caps.kernel),
        Check.of("BTF", caps.btf, "/sys/kernel/btf/vmlinux" if caps.btf else "absent",
                 "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y", FAIL),
        Check.of("tracefs", bool(caps.tracefs), str(caps.tracefs or "not mounted or not readable"),
                 "run as root; mount -t tracefs tracefs /sys/kernel/tracing", FAIL),
        Check.of("kprobes", caps.kprobes, caps.kprobes_why,
                 "a distro kernel has them; or use `slotscope labvm`"),
        Check.of("kfunc/fentry", caps.kfunc, caps.kfunc_why,
                 "the kernel may refuse tracing programs (lockdown, a vendor patch); "
                 "kprobe or the tracepoint backend still run, or use `slotscope labvm`"),
        *_tracepoint_checks(caps),
        *(Check.of(f"raw {tp.split(':')[1]}", r.ok, r.why,
                   "traced as a classic tracepoint: same rows, more cost an event")
          for tp, r in caps.raw.items()),
        Check.of("ioctl fentry", caps.ioctl_fentry.ok, caps.ioctl_fentry.why,
                 "KVM ioctls seen through the syscall tracepoints: same rows, every "
                 "syscall on the host pays a little"),
        Check.of("syscall regs", caps.task_regs.ok, caps.task_regs.why,
                 "the KVM ioctls are hooked on every KVM_RUN (fentry or syscall "
                 "tracepoints): same rows, more cost an exit"),
        Check.of("bpf atomics", caps.atomics.ok, caps.atomics.why,
                 "threads and histograms in hash maps (Linux < 5.12): same "
                 "rows, more cost an exit"),
        Check.of("bcc", caps.bcc_ok, caps.bcc_why, "sudo ./setup.sh, and run as root", FAIL),
        Check.of("kernel headers", caps.header_matches, caps.header_tree,
                 "stand-in tree: compiles; struct offsets are read from BTF instead"),
        *_kvm_checks(caps),
        *_rig_checks(),
    ]
    try:
        choice = choose_backend(caps)
        verdict: dict[str, object] = {"backend": choice.name, "reason": choice.reason,
                                      "missing": choice.missing, "tracer_can_run": True}
    except TracerError as e:
        verdict = {"backend": None, "reason": str(e), "missing": [], "tracer_can_run": False}
    return checks, verdict


WIDTH = 79
HANG = " " * 27  # continuation lines start under the detail column


def _wrap(text: str, first: str = "", rest: str = HANG) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest)


def render(checks: list[Check], verdict: dict[str, object]) -> str:
    lines = []
    for c in checks:
        lines += _wrap(f"{c.status:<4}  {c.name:<20} {c.detail}")
        if c.fix and c.status != OK:
            lines += _wrap(f"fix: {c.fix}", HANG)
    lines.append("")
    if not verdict["tracer_can_run"]:
        lines += _wrap(f"tracer cannot run: {verdict['reason']}", "", "  ")
        return "\n".join(lines)
    lines.append(f"backend: {verdict['backend']}")
    lines += _wrap(f"why: {verdict['reason']}", "  ", "    ")
    missing = verdict["missing"]
    if isinstance(missing, list) and missing:
        lines.append("missing from the data:")
        for m in missing:
            lines += _wrap(m, "  - ", "    ")
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    checks, verdict = run_checks()
    if args.json:
        json.dump({"checks": [asdict(c) for c in checks], **verdict}, sys.stdout, indent=2)
        print()
    else:
        print(render(checks, verdict))
    return 0 if verdict["tracer_can_run"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="say what this host can trace and how to fix the rest")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_doctor)
