"""The Linux guest on a real QEMU: boot, pc-dimm cycles through the guest's
ACPI, virtio-mem resizes through its driver.  One boot (~2-15 s under TCG,
depending on load) serves all checks."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import lab_kernel_or_skip, needs_qemu

from recording.hostfacts import pvm_host
from recording.reader import read_table
from vmrig import GuestFault
from vmrig.config import MiB, RigConfig, VirtioMemConfig
from vmrig.rig import Rig
from vmrig.virtiomem import STALL_NUDGES, virtio_mem_steps
from vmrig.workloadlog import WorkloadLog
from vmrig.workloads import hotplug_cycles, plug_dimm

pytestmark = needs_qemu


def test_linux_guest_hotplug_and_virtio_mem(tmp_path: Path) -> None:
    lab_kernel_or_skip()
    cfg = RigConfig(guest="linux", accel="auto", virtio_mem=VirtioMemConfig(size=256 * MiB),
                    boot_timeout=120)

    async def body() -> dict[str, Any]:
        async with Rig(cfg, record_dir=tmp_path) as rig:
            if pvm_host():
                assert rig.accel == "tcg"  # auto never picks kvm_pvm for Linux
            serial = rig.serial()
            assert "slotscope-linux ready: 6.1" in serial
            with WorkloadLog(tmp_path, {"rig": rig.info()}) as log:
                stats = await hotplug_cycles(rig, log, cycles=2, size=128 * MiB,
                                             unplug_timeout=30)
                assert stats.cycles == 2
                assert await rig.memory_devices() == [
                    d for d in await rig.memory_devices() if d["type"] == "virtio-mem"]
                log.config.pop("workload")  # a second workload in the same log
                log.config.pop("params")
                steps = await virtio_mem_steps(rig, log, [128 * MiB, 0], timeout=30)
                assert steps == 2
                vm = [d for d in await rig.memory_devices() if d["type"] == "virtio-mem"]
                assert vm and vm[0]["data"]["size"] == 0
            # The MMIO loop ran (it prints after 2^20 rounds; give it time).
            for _ in range(100):
                if "mmio: 4 pages, edu BAR0" in rig.serial():
                    break
                await asyncio.sleep(0.1)
            assert "mmio: 4 pages, edu BAR0" in rig.serial()
            return rig.info()
    info = asyncio.run(body())
    assert info["guest"] == "linux"
    rows = read_table(tmp_path, "workload").to_pylist()
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    acts = [r["action"] for r in rows]
    assert acts.count("device_add") == 2 and acts.count("event:DEVICE_DELETED") == 2
    assert acts.count("event:ACPI_DEVICE_OST") == 2  # the guest onlined each dimm
    sizes = [r["size"] for r in rows if r["action"] == "event:MEMORY_DEVICE_SIZE_CHANGE"]
    assert sizes[-1] == 0 and 128 * MiB in sizes
    for r in rows:
        if r["action"] == "event:DEVICE_DELETED":
            assert json.loads(r["detail"])["latency_ns"] > 0


def test_linux_boot_cut_short_is_a_stuck_boot(tmp_path: Path) -> None:
    """A Linux boot that does not reach its ready line in time although its
    vCPU ran (here: 0.5 s, a fraction of any boot) is a GuestFault that says
    where vCPU 0 was; a single accelerator's error keeps its type."""
    lab_kernel_or_skip()
    cfg = RigConfig(guest="linux", accel="tcg", boot_timeout=0.5)

    async def body() -> None:
        async with Rig(cfg, record_dir=tmp_path):
            raise AssertionError("unreachable: no Linux boots in 0.5 s")
    with pytest.raises(GuestFault) as e:
        asyncio.run(body())
    assert e.value.kind == "stuck_boot", repr(e.value)
    assert "guest not ready after 0.5 s under tcg" in str(e.value)
    assert ", vCPU 0 at RIP=" in str(e.value) or ", vCPU 0 at EIP=" in str(e.value)


def test_linux_guest_reset_in_boot_fails_at_once(tmp_path: Path) -> None:
    """A guest that resets before its ready line (here its kernel panics for
    want of an init; panic=-1 reboots it and the rig's QEMU turns a reboot
    into a stop) is a GuestFault of kind 'reset' as soon as QEMU says so,
    not at the boot deadline (600 s here)."""
    lab_kernel_or_skip()
    cfg = RigConfig(guest="linux", accel="tcg", boot_timeout=600,
                    kernel_cmdline="rdinit=/nonexistent")

    async def body() -> None:
        async with Rig(cfg, record_dir=tmp_path):
            raise AssertionError("unreachable: the guest has no init")
    t0 = time.monotonic()
    with pytest.raises(GuestFault) as e:
        asyncio.run(body())
    waited = time.monotonic() - t0
    assert e.value.kind == "reset", repr(e.value)
    assert "guest stopped " in str(e.value) and " s into its boot under tcg" in str(e.value)
    assert "SHUTDOWN (guest-reset)" in e.value.detail
    assert waited < cfg.boot_timeout, waited
    assert "Kernel panic" in (tmp_path / "serial.log").read_text()


def test_virtio_mem_stalled_step(tmp_path: Path) -> None:
    """A guest that runs but does not resize (here its virtio-mem driver is
    refused by module_blacklist) is nudged STALL_NUDGES times, then the step
    ends where it stands, recorded, and the workload goes on; a VM that does
    not run (paused) is a GuestFault at once, with no nudge, and so is a
    pc-dimm plug it never acknowledges."""
    lab_kernel_or_skip()
    cfg = RigConfig(guest="linux", accel="tcg", virtio_mem=VirtioMemConfig(size=256 * MiB),
                    boot_timeout=120, kernel_cmdline="module_blacklist=virtio_mem")

    def rows(log: WorkloadLog, action: str) -> list[dict[str, Any]]:
        return [r for r in log.rows if r["action"] == action]

    async def body() -> None:
        async with Rig(cfg, record_dir=tmp_path) as rig:
            with WorkloadLog(tmp_path, {"rig": rig.info()}) as log:
                assert await virtio_mem_steps(rig, log, [128 * MiB], timeout=0.5) == 1
                nudges = [json.loads(r["detail"]) for r in rows(log, "qom-set")][1:]
                assert nudges == [{"nudge": n, "stalled_at": 0}
                                  for n in range(1, STALL_NUDGES + 1)]
                failed = rows(log, "event:MEMORY_DEVICE_SIZE_CHANGE")
                assert [(r["ok"], r["size"]) for r in failed] == [(False, 0)]
                assert "stalled at 0 after 3 nudges" in failed[0]["error"]
                assert len(rows(log, "event:memslots")) == 2  # before and after the step
                await rig.require_qmp().execute("stop")
                log.config.pop("params")
                with pytest.raises(GuestFault, match="virtio-mem resize to 128M") as e:
                    await virtio_mem_steps(rig, log, [128 * MiB], timeout=0.5)
                assert e.value.kind == "paused", repr(e.value)
                assert "stalled at 0 after 0 nudges (VM paused after STOP" in str(e.value)
                assert len(rows(log, "qom-set")) == 1 + STALL_NUDGES + 1
                # A pc-dimm whose _OST never comes from a paused VM: the same.
                with pytest.raises(GuestFault, match="guest _OST: no event") as e:
                    await plug_dimm(rig, log, 128 * MiB, timeout=0.5)
                assert e.value.kind == "paused", repr(e.value)
                assert rows(log, "event:ACPI_DEVICE_OST")[-1]["ok"] is False
    asyncio.run(body())
