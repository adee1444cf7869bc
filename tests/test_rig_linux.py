"""The Linux guest on a real QEMU: boot, pc-dimm cycles through the guest's
ACPI, virtio-mem resizes through its driver.  One boot (~2-15 s under TCG,
depending on load) serves all checks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_qemu

from recording.hostfacts import pvm_host
from recording.reader import read_table
from vmrig import GuestFault, RigError
from vmrig.config import MiB, RigConfig, VirtioMemConfig
from vmrig.rig import Rig
from vmrig.workloadlog import WorkloadLog
from vmrig.workloads import STALL_NUDGES, hotplug_cycles, virtio_mem_steps

pytestmark = needs_qemu


def _lab_kernel_or_skip() -> None:
    from vmrig import kernel
    try:
        kernel.lab_kernel()
    except RigError as e:
        pytest.skip(f"Linux guest kernel not available: {e}")


def test_linux_guest_hotplug_and_virtio_mem(tmp_path: Path) -> None:
    _lab_kernel_or_skip()
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
    _lab_kernel_or_skip()
    cfg = RigConfig(guest="linux", accel="tcg", boot_timeout=0.5)

    async def body() -> None:
        async with Rig(cfg, record_dir=tmp_path):
            raise AssertionError("unreachable: no Linux boots in 0.5 s")
    with pytest.raises(GuestFault) as e:
        asyncio.run(body())
    assert e.value.kind == "stuck_boot", repr(e.value)
    assert "guest not ready after 0.5 s under tcg" in str(e.value)
    assert ", vCPU 0 at RIP=" in str(e.value) or ", vCPU 0 at EIP=" in str(e.value)


def test_virtio_mem_step_nudges_a_stalled_guest(tmp_path: Path) -> None:
    """A step whose size stops changing writes requested-size again (a
    "nudge" row) and goes on when the guest moves; after STALL_NUDGES nudges
    a VM that does not run is a GuestFault.  The guest is held by pausing
    its VM.  (A guest that runs and keeps its blocks ends the step where it
    stands: seen in the nested lab, vmrig/README.md.)"""
    _lab_kernel_or_skip()
    cfg = RigConfig(guest="linux", accel="tcg", virtio_mem=VirtioMemConfig(size=256 * MiB),
                    boot_timeout=120)

    def nudges(log: WorkloadLog) -> list[dict[str, Any]]:
        details = [json.loads(r["detail"]) for r in log.rows if r["action"] == "qom-set"]
        return [d for d in details if "nudge" in d]

    async def body() -> None:
        async with Rig(cfg, record_dir=tmp_path) as rig:
            qmp = rig.require_qmp()
            with WorkloadLog(tmp_path, {"rig": rig.info()}) as log:
                await qmp.execute("stop")

                async def resume() -> None:
                    await asyncio.sleep(3)
                    await qmp.execute("cont")
                task = asyncio.create_task(resume())
                assert await virtio_mem_steps(rig, log, [128 * MiB], timeout=2) == 1
                await task
                got = nudges(log)
                assert 1 <= len(got) <= STALL_NUDGES and got[0] == {"nudge": 1,
                                                                   "stalled_at": 0}, got
                await qmp.execute("stop")  # and never again
                log.config.pop("params")
                with pytest.raises(GuestFault, match="virtio-mem resize to 0") as e:
                    await virtio_mem_steps(rig, log, [0], timeout=0.5)
                assert e.value.kind == "paused", repr(e.value)
                assert "stalled at 128M after 3 nudges (VM paused after STOP" in str(e.value)
                assert len(nudges(log)) == len(got) + STALL_NUDGES
                assert not log.rows[-1]["ok"]
    asyncio.run(body())
