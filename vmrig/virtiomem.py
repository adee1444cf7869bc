"""The virtio-mem workload: requested-size steps over QMP, each waited for
until the guest's driver has plugged or unplugged the blocks
(MEMORY_DEVICE_SIZE_CHANGE), with the memslots QEMU maps for the device
logged before the first step and after each (``event:memslots`` rows, read
by analysis/virtiomem.py)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from recording.schema import monotonic_ns
from vmrig.config import fmt_size
from vmrig.errors import QmpTimeout, RigError
from vmrig.workloadlog import WorkloadLog
from vmrig.workloads import check_cancelled

if TYPE_CHECKING:
    from vmrig.rig import Rig

# virtio-mem: requested-size written again this many times per step when the
# guest's size stops changing for ``timeout`` s, before the step ends where
# it stands (_await_size).
STALL_NUDGES = 3

# "alias memslot-3 @vmem0-mem ..." in `info mtree`: one mapped memslot of a
# virtio-mem device with dynamic-memslots (QEMU >= 8.2), named by its memdev.
_MEMSLOT_ALIAS = r"alias memslot-(\d+) @{memdev} "


async def device_memslots(rig: Rig, memdev: str) -> list[int]:
    """The memslots QEMU has mapped for a virtio-mem device right now (its
    ``memslot-N`` aliases in ``info mtree``, disabled ones left out): what
    each resize step's memslot_update rows must match."""
    import re
    text = str(await rig.require_qmp().execute(
        "human-monitor-command", {"command-line": "info mtree"}))
    pattern = re.compile(_MEMSLOT_ALIAS.format(memdev=re.escape(memdev)))
    return sorted({int(m[1]) for line in text.splitlines() if "[disabled]" not in line
                   for m in [pattern.search(line)] if m})


async def virtio_mem_steps(rig: Rig, log: WorkloadLog, sizes: list[int],
                           timeout: float = 10.0, duration: float | None = None) -> int:
    """Set the virtio-mem device's requested-size through ``sizes`` (cycled for
    ``duration`` s if given); each step waits until MEMORY_DEVICE_SIZE_CHANGE
    reports the new size (the guest driver plugged/unplugged the blocks).
    When no size change comes for ``timeout`` s, the same requested-size is
    written again (a "qom-set" row with ``nudge`` in its detail), at most
    STALL_NUDGES times a step; then a guest that ran but kept its blocks ends
    the step where it stands (a failed size-change row) and the next begins,
    while a stopped VM or starved vCPUs are a GuestFault (``_await_size``)."""
    vm = rig.config.virtio_mem
    if vm is None:
        raise RigError("virtio-mem workload: the rig has no virtio-mem device")
    for s in sizes:
        if s > vm.size or s % vm.block_size:
            raise RigError(f"virtio-mem size {fmt_size(s)}: need a multiple of "
                           f"{fmt_size(vm.block_size)} up to {fmt_size(vm.size)}")
    qmp = rig.require_qmp()
    path = f"/machine/peripheral/{vm.id}"
    memdev = f"{vm.id}-mem"
    dev = next((d["data"] for d in await rig.memory_devices()
                if d.get("type") == "virtio-mem" and d["data"].get("id") == vm.id), {})
    log.config.setdefault("workload", "virtio-mem")
    # memaddr and max-size: the guest-physical range the device's memslots lie in
    log.config.setdefault("params", {"sizes": sizes, "timeout": timeout, "duration": duration,
                                     "dynamic_memslots": rig.dynamic_memslots,
                                     "memaddr": dev.get("memaddr"),
                                     "max_size": dev.get("max-size")})

    async def memslots(requested: int) -> None:
        slots = await device_memslots(rig, memdev)
        log.event("memslots", vm.id, monotonic_ns(), len(slots),
                  detail={"memslots": slots, "requested": requested})

    await memslots(vm.requested)  # before the first step
    loop = asyncio.get_running_loop()
    start, steps = loop.time(), 0
    try:
        while True:
            for size in sizes:
                check_cancelled()
                if duration is not None and loop.time() - start >= duration and steps:
                    return steps
                current = int(await qmp.execute("qom-get", {"path": path, "property": "size"}))
                with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as listener:
                    begin = monotonic_ns()
                    await log.step("qom-set", vm.id, qmp.execute(
                        "qom-set", {"path": path, "property": "requested-size", "value": size}),
                        size)
                    await _await_size(rig, log, listener, path, size, current, begin,
                                      timeout)
                await memslots(size)
                steps += 1
            if duration is None:
                return steps
    finally:
        log.config["result"] = {"steps": steps}
        log.flush()


async def _await_size(rig: Rig, log: WorkloadLog, listener: Any, path: str, size: int,
                      current: int, begin: int, timeout: float) -> None:
    """Wait for MEMORY_DEVICE_SIZE_CHANGE events until the device reaches
    ``size``.  A guest that stops changing it for
    ``timeout`` s is nudged (requested-size written again) up to
    STALL_NUDGES times; one whose VM or vCPUs stopped is a GuestFault; one
    that ran and kept its blocks ends the step where it stands, recorded as
    a failed size-change row (virtio-mem's unplug is the guest's choice)."""
    vm = rig.config.virtio_mem
    assert vm is not None
    qmp = rig.require_qmp()
    nudges, before = 0, await rig.progress()
    while current != size:
        try:
            ev = await qmp.wait(listener, f"virtio-mem resize to {fmt_size(size)}", timeout,
                                match={"id": vm.id})
        except QmpTimeout as e:
            # A reset or paused VM, or starved vCPUs, will not move: say so now.
            why = await rig.why_silent(before, timeout * (nudges + 1))
            if not why and nudges < STALL_NUDGES:
                # A block the guest could not offline is retried by its driver
                # after 50 s (VIRTIO_MEM_RETRY_TIMER_MIN_MS), doubling; a config
                # notification (QEMU sends one on every requested-size write,
                # same value or not) makes it retry now.
                nudges += 1
                nudge = {"nudge": nudges, "stalled_at": current}
                await log.step("qom-set", vm.id, qmp.execute(
                    "qom-set", {"path": path, "property": "requested-size", "value": size}),
                    size, detail=lambda _, d=nudge: d)
                continue
            stalled = (f"{e}: stalled at {fmt_size(current)} after {nudges} nudges"
                       + (f" ({why})" if why else ""))
            log.add("event:MEMORY_DEVICE_SIZE_CHANGE", vm.id, begin, monotonic_ns(), current,
                    ok=False, error=stalled, detail={"requested": size})
            if why:
                raise why.error(stalled) from None
            return
        except RigError as e:
            log.add("event:MEMORY_DEVICE_SIZE_CHANGE", vm.id, begin, monotonic_ns(), size,
                    ok=False, error=str(e))
            raise
        current = int(ev["data"]["size"])
        log.event("MEMORY_DEVICE_SIZE_CHANGE", vm.id, monotonic_ns(), current,
                  detail={"latency_ns": monotonic_ns() - begin, "requested": size})
