"""QEMU/KVM test rig: guests, QMP workloads and a micro-VMM.

The in-process API (imported lazily, so ``from vmrig import RigError`` stays
cheap)::

    from vmrig import Rig, RigConfig, WorkloadLog, hotplug_cycles
    async with Rig(RigConfig(guest="bare", accel="auto"), record_dir=run) as rig:
        with WorkloadLog(run, {"rig": rig.info()}) as log:
            await hotplug_cycles(rig, log, cycles=10, size=128 << 20)
"""

from __future__ import annotations

from typing import Any

# The error tree is cheap and needed by every caller: imported eagerly.
from vmrig.errors import GuestFault, L1Fault, QemuGone, RigError

__all__ = ["GuestFault", "L1Fault", "QemuGone", "RigError"]

_LAZY = {
    "Rig": "vmrig.rig", "RigConfig": "vmrig.config", "MemoryConfig": "vmrig.config",
    "VirtioMemConfig": "vmrig.config", "NetConfig": "vmrig.config",
    "BareGuestConfig": "vmrig.config", "parse_size": "vmrig.config",
    "WorkloadLog": "vmrig.workloadlog", "hotplug_cycles": "vmrig.workloads",
    "plug_dimm": "vmrig.workloads", "unplug_dimm": "vmrig.workloads",
    "virtio_mem_steps": "vmrig.virtiomem", "dirty_log_toggles": "vmrig.workloads",
    "qemu_checks": "vmrig.host",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vmrig' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(module), name)
