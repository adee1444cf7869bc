"""The kfunc checks both sides share: the verifier's refusal of a bad fentry
program, as tests/test_kfunc.py sees it here and the lab VM e2e run sees
it in the L1 (where fentry programs load)."""

from __future__ import annotations

import os
import struct

from tracer import bpfsys, btf


def bad_fentry_error() -> str:
    """Load an fentry program that reads a third argument of the two-argument
    kvm_mmu_invalidate_mmio_sptes: the verifier's refusal as the caller sees it."""
    tid, nargs, module = btf.find_func("kvm_mmu_invalidate_mmio_sptes")
    # r0 = ctx[nargs] (past the last argument; fentry has no return slot); exit
    insns = struct.pack("<BBhi", 0x79, 0x10, 8 * nargs, 0) + bpfsys.RETURN_ZERO[8:]
    obj = bpfsys.btf_obj_fd(module) if module else 0
    assert obj is not None
    try:
        fd = bpfsys.load_tracing(insns, "fentry", tid, obj, "slotscope_bad")
    except OSError as e:
        return str(e.strerror)
    finally:
        if obj:
            os.close(obj)
    os.close(fd)
    return "loaded"


def assert_verifier_refusal(why: str) -> None:
    # EACCES, and the verifier's own words rather than its statistics line
    assert "\n" not in why and why.startswith("Permission denied: "), why
    assert "invalid bpf_context access" in why or "argument" in why, why
