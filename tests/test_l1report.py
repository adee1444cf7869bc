"""The host-side report of a hung L1's vCPUs, on a real QEMU over QMP."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from conftest import QEMU, needs_qemu

from vmrig.l1report import Symbols, report


@needs_qemu
def test_registers_of_every_vcpu_named_from_symbols(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    assert QEMU is not None
    q = subprocess.Popen([QEMU, "-accel", "tcg", "-smp", "2", "-m", "64", "-nodefaults",
                          "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off"])
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        # SeaBIOS runs somewhere in the 64 MiB: name every MiB as kallsyms would
        syms = tmp_path / "kallsyms"
        syms.write_text("".join(f"{m << 20:016x} T mib_{m}\n" for m in range(64)))
        lines = report(sock, syms, samples=2, gap=0.2)
    finally:
        q.kill()
        q.wait()
    vcpu_lines = [ln for ln in lines if " vCPU " in ln]
    assert len(vcpu_lines) == 4, lines  # 2 samples x 2 vCPUs
    for i in (0, 1):
        assert sum(f"vCPU {i}: RIP 0x" in ln for ln in vcpu_lines) == 2
    assert all("?" not in ln.split("RIP")[1] for ln in vcpu_lines), lines
    assert lines[-1].startswith("read in")


def test_symbols_name_addresses_within_the_text() -> None:
    s = Symbols([0xFFFFFFFF81000000, 0xFFFFFFFF81000100], ["_stext", "native_safe_halt"])
    assert s.name(0xFFFFFFFF81000105) == "native_safe_halt+0x5"
    assert s.name(0xFFFFFFFF80000000) == "?" and s.name(0x1000) == "?"


def test_unreachable_monitor_is_one_line(tmp_path: Path) -> None:
    lines = report(tmp_path / "absent.sock", None)
    assert len(lines) == 1 and lines[0].startswith("no vCPU registers:")
