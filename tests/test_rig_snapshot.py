"""A Linux guest booted once, saved and restored (vmrig/snapshot.py), on a
real QEMU (TCG here): the restored guest answers its ACPI and virtio-mem
drivers, a second rig of the same configuration restores without booting,
and a snapshot that does not load is replaced by a boot."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import lab_kernel_or_skip, needs_qemu

from vmrig.config import MiB, RigConfig, VirtioMemConfig
from vmrig.host import qemu_binary, qemu_version
from vmrig.linuxguest import READY_LINE
from vmrig.rig import Rig
from vmrig.snapshot import MIN_QEMU, Snapshots, supported
from vmrig.virtiomem import virtio_mem_steps
from vmrig.workloadlog import WorkloadLog
from vmrig.workloads import plug_dimm

pytestmark = needs_qemu


def _needs_snapshot_qemu() -> None:
    lab_kernel_or_skip()
    binary = qemu_binary()
    v = qemu_version(binary) if binary else None
    if v is None or v[:2] < MIN_QEMU:
        pytest.skip(f"QEMU {v} has no mapped-ram migration (needs {MIN_QEMU})")


def test_supported_versions() -> None:
    assert supported({"major": 10, "minor": 0, "micro": 2})
    assert supported({"major": 9, "minor": 0, "micro": 0})
    assert not supported({"major": 8, "minor": 2, "micro": 0})
    assert not supported({})


def test_key_leaves_the_private_directory_out(tmp_path: Path) -> None:
    snaps = Snapshots(tmp_path)
    a = ["qemu", "-qmp", "unix:/tmp/rig-a/qmp.sock", "-m", "256M"]
    b = ["qemu", "-qmp", "unix:/tmp/rig-b/qmp.sock", "-m", "256M"]
    c = ["qemu", "-qmp", "unix:/tmp/rig-b/qmp.sock", "-m", "512M"]
    assert snaps.path_for(a, Path("/tmp/rig-a")) == snaps.path_for(b, Path("/tmp/rig-b"))
    assert snaps.path_for(b, Path("/tmp/rig-b")) != snaps.path_for(c, Path("/tmp/rig-b"))
    assert snaps.path_for(a, Path("/tmp/rig-a")).parent == tmp_path


async def _exercise(rig: Rig, log_dir: Path) -> dict[str, Any]:
    """The guest's kernel answers: a pc-dimm is onlined (its _OST), the
    virtio-mem driver takes a resize."""
    with WorkloadLog(log_dir, {"rig": rig.info()}) as log:
        await plug_dimm(rig, log, 128 * MiB, timeout=60)
        assert await virtio_mem_steps(rig, log, [64 * MiB], timeout=60) == 1
    vm = [d for d in await rig.memory_devices() if d["type"] == "virtio-mem"]
    assert vm[0]["data"]["size"] == 64 * MiB
    return rig.info()


def test_linux_guest_saved_restored_and_restored_again(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    _needs_snapshot_qemu()
    cfg = RigConfig(guest="linux", accel="tcg", virtio_mem=VirtioMemConfig(size=256 * MiB),
                    boot_timeout=180)
    snaps = Snapshots(tmp_path / "snaps")
    snaps.directory.mkdir()

    async def one(name: str) -> tuple[dict[str, Any], str]:
        async with Rig(cfg, record_dir=tmp_path / name, snapshots=snaps) as rig:
            info = await _exercise(rig, tmp_path / name)
            return info, rig.serial()

    first, serial1 = asyncio.run(one("first"))
    files = sorted(snaps.directory.iterdir())
    assert [f.suffix for f in files] == [".mig"]  # no partial file left
    assert first["snapshot"]["restored"] and first["snapshot"]["saved_s"] > 0
    assert first["snapshot"]["file"] == files[0].name
    # The guest that ran is the restored one: a new serial log, no boot in it.
    assert READY_LINE not in serial1

    second, serial2 = asyncio.run(one("second"))
    assert second["snapshot"]["restored"] and "saved_s" not in second["snapshot"]
    assert READY_LINE not in serial2
    assert second["pid"] != first["pid"]

    # A snapshot that does not load: the rig says so and boots instead.
    files[0].write_bytes(files[0].read_bytes()[:4096])
    with caplog.at_level(logging.WARNING, logger="vmrig.rig"):
        third, _ = asyncio.run(one("third"))
    assert "booting the guest instead" in caplog.text
    assert "saved_s" in third["snapshot"]  # booted, saved afresh and restored
    assert files[0].stat().st_size > 4096
