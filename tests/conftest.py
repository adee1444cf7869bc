"""Shared test gates: tests that need root, /dev/kvm, QEMU or bcc skip with a reason."""

from __future__ import annotations

import os
import shutil

import pytest

IS_ROOT = os.geteuid() == 0
HAS_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
QEMU = shutil.which("qemu-system-x86_64")


def _bcc_importable() -> bool:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return True


HAS_BCC = _bcc_importable()

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (run: sudo .venv/bin/pytest)")
needs_kvm = pytest.mark.skipif(not HAS_KVM, reason="needs read/write access to /dev/kvm")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64 (./setup.sh)")
needs_bcc = pytest.mark.skipif(
    not HAS_BCC, reason="needs bcc (apt python3-bpfcc, a venv with system site packages)")


def lab_kernel_or_skip() -> None:
    """Skip unless the Linux guest's kernel (vmrig.kernel) is on this host."""
    from vmrig import RigError, kernel
    try:
        kernel.lab_kernel()
    except RigError as e:
        pytest.skip(f"Linux guest kernel not available: {e}")
