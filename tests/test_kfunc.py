"""The kfunc backend's host-side pieces: BTF function ids, the compiled
fentry/fexit programs, and what the capability check says.

This host refuses tracing programs (EPERM), so loading and attaching are
tested for real in the nested lab VM (tests/test_labvm_e2e.py); here the
parts that do not need the kernel's consent.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_bcc, needs_root
from kfunc_checks import assert_verifier_refusal, bad_fentry_error

from tracer import TracerError, bpfsys, btf
from tracer.capabilities import probe

SLOTSCOPE = [sys.executable, "-m", "slotscope"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kvm_btf() -> btf.BTF:
    if not btf.BTF_DIR.joinpath("vmlinux").exists():
        pytest.skip("no /sys/kernel/btf/vmlinux")
    return btf.load("kvm")


def test_find_func_ids_name_func_records(kvm_btf: btf.BTF) -> None:
    try:
        found = {fn: btf.find_func(fn, kvm_btf)
                 for fn in ("kvm_set_memslot", "kvm_mmu_invalidate_mmio_sptes")}
    except TracerError as e:
        pytest.skip(f"kvm functions not in this kernel's BTF: {e}")
    for fn, (tid, nargs, module) in found.items():
        t = kvm_btf.type(tid)
        assert t.kind == btf.KIND_FUNC and kvm_btf.name(t.name_off) == fn
        # a built-in kvm is in vmlinux; a module's ids continue after vmlinux's
        assert module == ("kvm" if Path("/sys/kernel/btf/kvm").exists() else None)
        if module:
            assert kvm_btf.base is not None and tid >= kvm_btf.first_id
        assert nargs == {"kvm_set_memslot": 4, "kvm_mmu_invalidate_mmio_sptes": 2}[fn]


def test_find_func_says_why(kvm_btf: btf.BTF) -> None:
    with pytest.raises(TracerError, match="^no_such_fn_xyz not in BTF: "):
        btf.find_func("no_such_fn_xyz", kvm_btf)


@needs_root
def test_btf_objects_by_name() -> None:
    fd = bpfsys.btf_obj_fd("vmlinux")
    assert fd is not None
    os.close(fd)
    assert bpfsys.btf_obj_fd("no_such_module_xyz") is None
    kvm = bpfsys.btf_obj_fd("kvm")
    assert (kvm is not None) == Path("/sys/kernel/btf/kvm").exists()
    if kvm is not None:
        os.close(kvm)


@needs_root
@needs_bcc
def test_kfunc_programs_compile_without_autoload() -> None:
    """bcc builds the fentry/fexit programs but loads only its own
    (tracepoint) ones: the three are left for the raw bpf(2) load."""
    from bcc.libbcc import lib

    from tracer.loader import KFUNCS, _compile, _fentry_targets, program_text
    caps = probe(try_kfunc=False, try_bpf=False)
    try:
        targets = _fentry_targets(KFUNCS)
    except TracerError as e:
        pytest.skip(str(e))
    assert [t[:3] for t in targets] == [k[:3] for k in KFUNCS]
    text, flags, attached, _ = program_text("kfunc", caps, [1])
    assert attached[-3:] == ["fentry:kvm_set_memslot", "fexit:kvm_set_memslot",
                             "fentry:kvm_mmu_invalidate_mmio_sptes"]
    bpf, _ = _compile(text, flags)
    try:
        for _, _, prog, _ in KFUNCS:
            name = prog.encode()
            assert lib.bpf_function_size(bpf.module, name) > 0
            assert name not in bpf.funcs
        # bcc's own: tracepoints, and kvm_mmio raw where this kernel allows it
        assert all(n.startswith((b"tracepoint__", b"raw_tracepoint__")) for n in bpf.funcs)
    finally:
        bpf.cleanup()


@needs_bcc
def test_ioctl_fentry_programs_replace_the_syscall_tracepoints() -> None:
    """Where the kernel takes fentry on the ioctl syscall, the KVM ioctls are
    seen there: the programs compile, are left for the bpf(2) load (not
    bcc's), and no syscall tracepoint program is built."""
    from bcc.libbcc import lib

    from tracer.capabilities import IOCTL_SYSCALL, Raw
    from tracer.loader import IOCTL_FUNCS, _compile, _fentry_targets, program_text
    try:
        targets = _fentry_targets(IOCTL_FUNCS)
    except TracerError as e:
        pytest.skip(str(e))
    # in vmlinux's BTF, with the one (pt_regs *) parameter the programs read
    assert [(t[0], t[1], t[4]) for t in targets] == [("fentry", IOCTL_SYSCALL, None),
                                                       ("fexit", IOCTL_SYSCALL, None)]
    caps = probe(try_kfunc=False, try_bpf=False)
    caps.ioctl_fentry = Raw(True, "forced: compiled only")
    text, flags, attached, _ = program_text("kprobe", caps, [1])
    assert attached[:2] == [f"fentry:{IOCTL_SYSCALL}", f"fexit:{IOCTL_SYSCALL}"]
    assert not any(a.startswith("syscalls:") for a in attached)
    bpf, _ = _compile(text, flags)
    try:
        for _, _, prog, _ in IOCTL_FUNCS:
            assert lib.bpf_function_size(bpf.module, prog.encode()) > 0
            assert prog.encode() not in bpf.funcs
        assert not any(b"sys_enter_ioctl" in n or b"sys_exit_ioctl" in n for n in bpf.funcs)
    finally:
        bpf.cleanup()


@needs_root
@needs_bcc
def test_ioctl_free_programs_load() -> None:
    """Where kvm_exit and kvm_userspace_exit attach raw and programs may read
    the syscall's registers, the kprobe/kfunc backends hook no ioctl: the
    raw kvm_exit finds the thread's VM from its vCPU, kvm_userspace_exit
    marks KVM_RUN's return, and the memslot and zap-all programs read the
    ioctl's fd from bpf_task_pt_regs.  Here (kvm_pvm: no vendor BTF) the
    vendor offsets are stand-ins, so the programs are compiled and loaded
    through the verifier (bcc attaches its own), not run on exits."""
    from dataclasses import replace

    from tracer.capabilities import Raw
    from tracer.loader import KPROBES, _compile, program_text
    caps = probe(try_kfunc=False, try_bpf=False)
    if not caps.task_regs.ok:
        pytest.skip(caps.task_regs.why)
    if not all(caps.tracepoints.get(f"kvm:{n}") for n in ("kvm_exit", "kvm_userspace_exit")):
        pytest.skip("no kvm_exit / kvm_userspace_exit tracepoint")
    fake = {"OFF_VCPU_ID": 0, "OFF_VCPU_KVM": 8, "OFF_VENDOR_VCPU": 0, "OFF_SVM_VMCB": 16,
            "OFF_VMCB_EXIT_CODE": 0, "OFF_VMCB_EXIT_INFO2": 8}
    caps = replace(caps, raw={**caps.raw,
                              "kvm:kvm_exit": Raw(True, "stand-in offsets", fake),
                              "kvm:kvm_userspace_exit": Raw(True, "forced")})
    assert caps.ioctl_hook("kprobe") == caps.ioctl_hook("kfunc") == "none"
    assert caps.ioctl_hook("tracepoint") != "none"
    text, flags, attached, _ = program_text("kprobe", caps, [1],
                                            offsets={k: 8 for k in btf.NEEDED})
    assert flags["IOCTL_FREE"] == 1 and flags["IOCTL_FENTRY"] == 0
    assert attached[0] == "raw_tracepoint:kvm_userspace_exit"
    assert not any(a.startswith("syscalls:") or "sys_ioctl" in a for a in attached)
    from bcc import BPF
    bpf, _ = _compile(text, flags)  # bcc loads and attaches its own: verified
    try:
        names = set(bpf.funcs)
        assert {b"raw_tracepoint__kvm_userspace_exit", b"raw_tracepoint__kvm_exit"} <= names
        assert not any(b"ioctl" in n for n in names)
        for _, _, prog in KPROBES:  # the memslot programs, through the verifier
            bpf.load_func(prog.encode(), BPF.KPROBE)
    finally:
        bpf.cleanup()


@needs_root
def test_verifier_refusal_is_one_line() -> None:
    if not probe(try_bpf=False).kfunc:
        pytest.skip("this kernel loads no fentry program (the lab VM e2e test runs this)")
    assert_verifier_refusal(bad_fentry_error())


@needs_root
def test_unavailable_kfunc_fails_with_the_capability_reason(tmp_path: Path) -> None:
    caps = probe(try_bpf=False)
    if caps.kfunc:
        pytest.skip("fentry works here; the lab VM test records with it")
    assert caps.kfunc_why and "\n" not in caps.kfunc_why
    p = subprocess.run([*SLOTSCOPE, "record", "--backend", "kfunc", "-d", "1",
                        "-o", str(tmp_path / "r")], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().endswith(f"backend kfunc unavailable: {caps.kfunc_why}"), p.stderr
    assert not (tmp_path / "r").exists()
    assert "slotscope_probe" not in _loaded_names()  # the trial program is gone


def _loaded_names() -> set[str]:
    """Names of the loaded BPF programs (ids, not counts: other tests load some)."""
    names = set()
    for pid in bpfsys.prog_ids():
        try:
            fd = bpfsys._bpf(bpfsys.BPF_PROG_GET_FD_BY_ID,
                             bytearray(struct.pack("<III", pid, 0, 0)))
        except OSError:
            continue  # unloaded meanwhile
        try:
            names.add(bpfsys.prog_info(fd)[2])
        finally:
            os.close(fd)
    return names


@needs_root
def test_doctor_reports_the_same_fentry_verdicts() -> None:
    caps = probe(try_bpf=False)
    p = subprocess.run([*SLOTSCOPE, "doctor", "--json"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    row = next(c for c in json.loads(p.stdout)["checks"] if c["name"] == "kfunc/fentry")
    assert (row["status"] == "OK") == caps.kfunc
    assert row["detail"] == caps.kfunc_why
    row = next(c for c in json.loads(p.stdout)["checks"] if c["name"] == "ioctl fentry")
    assert (row["status"] == "OK") == caps.ioctl_fentry.ok
    assert row["detail"] == caps.ioctl_fentry.why and "\n" not in row["detail"]
