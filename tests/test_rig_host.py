"""vmrig.host: the QEMU rows of ``slotscope doctor`` against the real QEMU."""

from __future__ import annotations

import psutil
import pytest
from conftest import HAS_KVM, needs_qemu

from recording.hostfacts import Check
from vmrig import host


def _qemu_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "qemu" in p.name() and p.status() != psutil.STATUS_ZOMBIE}


@needs_qemu
def test_qemu_checks_real_qemu() -> None:
    before = _qemu_children()
    rows = host.qemu_checks(timeout=20)
    by_name = {r.name: r for r in rows}
    assert all(isinstance(r, Check) and r.status in ("OK", "WARN", "FAIL") for r in rows)
    assert by_name["qemu binary"].status == "OK"
    assert by_name["qemu version"].status == "OK"
    assert by_name["qemu -accel tcg"].status == "OK", by_name["qemu -accel tcg"]
    if HAS_KVM:
        # kvm may WARN (kvm_pvm) but must say it starts, or say why not.
        assert "qemu -accel kvm" in by_name
    # No probe QEMU is left running (other users' QEMUs are not ours to count).
    assert _qemu_children() <= before


def test_qemu_checks_missing_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOTSCOPE_QEMU", "/nonexistent/qemu-system-x86_64")
    rows = host.qemu_checks()
    assert (rows[0].name, rows[0].status) == ("qemu binary", "FAIL")
    assert rows[0].fix  # a fix is offered


@needs_qemu
def test_probe_rejects_unknown_cpu() -> None:
    p = host.probe_accel(host.qemu_binary() or "", "tcg", cpu="no-such-cpu", timeout=20)
    assert not p.ok
    assert "no-such-cpu" in p.detail or "unable" in p.detail.lower()


@needs_qemu
def test_device_properties_asked_once_per_binary() -> None:
    """virtio-mem-pci's properties come from QEMU the first time and from the
    cache after (every virtio-mem run asks); a QEMU named as on PATH, which
    cannot be stat'ed as a path, is still asked, and not kept."""
    import os
    binary = host.qemu_binary()
    assert binary is not None
    host._PROPERTIES.clear()
    first = host.device_properties(binary, "virtio-mem-pci")
    assert "requested-size" in first and len(host._PROPERTIES) == 1
    assert host.device_properties(binary, "virtio-mem-pci") is first
    by_name = host.device_properties(os.path.basename(binary), "virtio-mem-pci")
    assert by_name == first and len(host._PROPERTIES) == 1
