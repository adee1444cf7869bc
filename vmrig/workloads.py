"""QMP workloads: pc-dimm hotplug cycles and dirty-log toggles, each action
a timestamped row of the ``workload`` table (vmrig.workloadlog.WorkloadLog),
and ``WORKLOADS``, the one list of them (virtio-mem resizes: vmrig.virtiomem).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from recording.schema import monotonic_ns
from vmrig.config import MiB, fmt_size
from vmrig.errors import QmpTimeout, RigError
from vmrig.workloadlog import WorkloadLog

if TYPE_CHECKING:  # reading WORKLOADS must not import the QEMU lifecycle
    from vmrig.rig import Rig

# The one list of workloads (rig run offers it, the lab config checks against
# it), with the phrase ``rig run --help`` shows for each.
WORKLOADS: dict[str, str] = {
    "hotplug": "pc-dimm cycles",
    "virtio-mem": "virtio-mem resizes (Linux guest)",
    "dirty-log": "dirty-log toggles (kvm)",
    "microvm": "the micro-VMM (no QEMU)",
}

DIMM_ALIGN = 2 * MiB  # QEMU: "backend memory size must be multiple of 0x200000"


@dataclass
class HotplugStats:
    cycles: int = 0
    plug_s: list[float] = field(default_factory=list)      # object-add .. device_add reply
    unplug_s: list[float] = field(default_factory=list)    # device_del .. DEVICE_DELETED
    cycle_s: list[float] = field(default_factory=list)


def _dimms(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["data"] for d in devices if d.get("type") == "dimm"]


async def check_dimm_fits(rig: Rig, size: int) -> list[dict[str, Any]]:
    """RigError unless one more ``size`` pc-dimm fits slots and maxmem."""
    mem = rig.config.memory
    if size <= 0 or size % DIMM_ALIGN:
        raise RigError(f"pc-dimm size {fmt_size(size)}: need a positive multiple of 2M")
    devices = await rig.memory_devices()
    dimms = _dimms(devices)
    if len(dimms) >= mem.slots:
        raise RigError(f"all {mem.slots} memory slots are in use")
    used = sum(int(d["data"].get("size", 0)) for d in devices)
    if used + size > mem.hotplug_bytes:
        raise RigError(f"a {fmt_size(size)} pc-dimm does not fit: {fmt_size(used)} of "
                       f"{fmt_size(mem.hotplug_bytes)} hotplug memory (maxmem - base) in use")
    return dimms


# ACPI _OST: an OS reports how it handled a hotplug notification.  Status 0
# is success, 0x84 "eject in progress"; anything else is a refusal.
OST_OK = (0, 0x84)


def _ost_for(dev_id: str, sources: tuple[int, ...] | None = None) -> Callable[..., bool]:
    def match(ev: dict[str, Any]) -> bool:
        if ev["event"] != "ACPI_DEVICE_OST":
            return ev["data"].get("device") == dev_id
        info = ev["data"].get("info", {})
        return info.get("device") == dev_id and (sources is None or info.get("source")
                                                 in sources)
    return match


async def plug_dimm(rig: Rig, log: WorkloadLog, size: int, timeout: float = 10.0) -> str:
    """object-add + device_add one pc-dimm; returns its device id.  With an
    ACPI guest (linux) it also waits for the guest's _OST for the insert, so
    the memory is online before anything unplugs it."""
    qmp = rig.require_qmp()
    await check_dimm_fits(rig, size)
    mem_id, dev_id = log.new_id("ssmem"), log.new_id("ssdimm")
    await log.step("object-add", mem_id, qmp.execute(
        "object-add", {"qom-type": "memory-backend-ram", "id": mem_id, "size": size}), size)
    with qmp.listener("ACPI_DEVICE_OST") as listener:
        before = await rig.progress()
        try:
            await log.step("device_add", dev_id, qmp.execute(
                "device_add", {"driver": "pc-dimm", "id": dev_id, "memdev": mem_id}), size)
        except RigError:
            # Leave no orphan backend; a failure here is recorded too.
            await log.step("object-del", mem_id, qmp.execute("object-del", {"id": mem_id}),
                           size)
            raise
        add_row = log.rows[-1]
        for d in _dimms(await rig.memory_devices()):
            if d.get("id") == dev_id:
                add_row["detail"] = json.dumps({"addr": d["addr"], "slot": d["slot"],
                                                "memdev": mem_id}, sort_keys=True)
        if rig.config.guest == "linux":
            begin = add_row["begin_ns"]
            try:
                ev = await qmp.wait(listener, f"device_add {dev_id}: guest _OST", timeout,
                                    match=_ost_for(dev_id, (0, 1)))
            except RigError as e:
                error: RigError = e
                if isinstance(e, QmpTimeout):
                    # As for the eject: a stopped VM or starved vCPUs are a
                    # GuestFault (rerun), not a guest that declined.
                    why = await rig.why_silent(before, timeout)
                    error = why.error(f"{e}" + (f" ({why})" if why else ""))
                log.add("event:ACPI_DEVICE_OST", dev_id, begin, monotonic_ns(), size,
                        ok=False, error=str(error))
                raise error from None
            status = int(ev["data"]["info"].get("status", 0))
            ok = status in OST_OK
            log.add("event:ACPI_DEVICE_OST", dev_id, monotonic_ns(), monotonic_ns(), size,
                    ok=ok, error="" if ok else f"guest _OST status {status:#x}",
                    detail={"latency_ns": monotonic_ns() - begin, **ev["data"]["info"]})
            if not ok:
                raise RigError(f"device_add {dev_id}: the guest failed the insert "
                               f"(_OST status {status:#x})")
    return dev_id


async def unplug_dimm(rig: Rig, log: WorkloadLog, dev_id: str, timeout: float = 5.0) -> float:
    """device_del, wait for DEVICE_DELETED, object-del; returns the event latency (s).

    DEVICE_UNPLUG_GUEST_ERROR, a failing ACPI _OST for the eject, or no
    event within ``timeout`` is recorded and raised; the dimm then stays
    plugged (query-memory-devices still lists it)."""
    qmp = rig.require_qmp()
    dimm = next((d for d in _dimms(await rig.memory_devices()) if d.get("id") == dev_id), None)
    if dimm is None:
        raise RigError(f"no pc-dimm {dev_id!r} is plugged")
    size, mem_id = int(dimm["size"]), str(dimm["memdev"]).rsplit("/", 1)[-1]
    with qmp.listener("DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR",
                      "ACPI_DEVICE_OST") as listener:
        before = await rig.progress()
        await log.step("device_del", dev_id, qmp.execute("device_del", {"id": dev_id}), size)
        begin = log.rows[-1]["begin_ns"]  # latency counts from sending device_del
        while True:
            try:
                ev = await qmp.wait(listener, f"device_del {dev_id}", timeout,
                                    match=_ost_for(dev_id))
            except RigError as e:
                error: RigError = e
                if isinstance(e, QmpTimeout):
                    # A guest that never ran cannot eject: say so, it is
                    # the host's (or the hypervisor's) problem then.
                    why = await rig.why_silent(before, timeout)
                    error = why.error(f"device_del {dev_id}: the guest did not eject within "
                                      f"{timeout:g} s" + (f" ({why})" if why else ""))
                log.add("event:DEVICE_DELETED", dev_id, begin, monotonic_ns(), size, ok=False,
                        error=str(error))
                log.flush()
                raise error from None
            end = monotonic_ns()
            if ev["event"] == "ACPI_DEVICE_OST":
                status = int(ev["data"]["info"].get("status", 0))
                if status in OST_OK:
                    continue
                msg = f"device_del {dev_id}: the guest refused the eject (_OST status " \
                      f"{status:#x})"
            elif ev["event"] == "DEVICE_UNPLUG_GUEST_ERROR":
                msg = f"device_del {dev_id}: the guest refused the unplug"
            else:
                break
            log.add(f"event:{ev['event']}", dev_id, end, end, size, ok=False, error=msg)
            log.flush()
            raise RigError(msg)
        log.event("DEVICE_DELETED", dev_id, end, size,
                  detail={"latency_ns": end - begin, "path": ev["data"].get("path")})
    await log.step("object-del", mem_id, qmp.execute("object-del", {"id": mem_id}), size)
    return (end - begin) / 1e9


def check_cancelled() -> None:
    """Stop a workload loop once its task is being cancelled, even if some
    await swallowed the CancelledError."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _pace(start: float, index: int, rate: float | None) -> None:
    if rate:
        loop = asyncio.get_running_loop()
        delay = start + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)


async def hotplug_cycles(rig: Rig, log: WorkloadLog, cycles: int | None = 5,
                         size: int = 128 * MiB, rate: float | None = None,
                         duration: float | None = None, hold: float = 0.0,
                         unplug_timeout: float = 5.0, batch: int = 1) -> HotplugStats:
    """pc-dimm plug/unplug cycles: ``cycles`` of them or for ``duration`` s,
    at most ``rate`` cycles/s.  A cycle plugs ``batch`` dimms (each its own
    slot and memslot), holds them ``hold`` s, then unplugs them in order."""
    if cycles is None and duration is None:
        raise RigError("hotplug: give a cycle count or a duration")
    if cycles is not None and cycles < 0:
        raise RigError(f"hotplug: cycles must be >= 0, not {cycles}")
    if not 1 <= batch <= max(1, rig.config.memory.slots):
        raise RigError(f"hotplug: batch {batch} must be 1..{rig.config.memory.slots} "
                       "(the memory slots)")
    log.config.setdefault("workload", "hotplug")
    log.config.setdefault("params", {"cycles": cycles, "size": size, "rate": rate,
                                     "duration": duration, "hold": hold, "batch": batch,
                                     "unplug_timeout": unplug_timeout})
    stats = HotplugStats()
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        while (cycles is None or stats.cycles < cycles) and \
                (duration is None or loop.time() - start < duration):
            check_cancelled()
            await _pace(start, stats.cycles, rate)
            t0 = loop.time()
            devs = []
            for _ in range(batch):
                t = loop.time()
                devs.append(await plug_dimm(rig, log, size))
                stats.plug_s.append(loop.time() - t)
            if hold:
                await asyncio.sleep(hold)
            for dev in devs:
                stats.unplug_s.append(await unplug_dimm(rig, log, dev, unplug_timeout))
            stats.cycle_s.append(loop.time() - t0)
            stats.cycles += 1
    finally:
        log.config["result"] = {"cycles": stats.cycles}
        log.flush()
    return stats


async def dirty_log_toggles(rig: Rig, log: WorkloadLog, count: int | None = 1,
                            calc_time: int = 1, duration: float | None = None,
                            timeout: float = 30.0) -> int:
    """calc-dirty-rate in dirty-bitmap mode: QEMU turns dirty logging on for
    every memslot, then off after ``calc_time`` s: two FLAGS_ONLY memslot
    updates each, with no hotplug."""
    if calc_time < 1:
        raise RigError("dirty-log: calc-time must be >= 1 s")
    if rig.accel != "kvm":
        # TCG has no memslots to flag, and QEMU 7.2 segfaults on a
        # dirty-bitmap calc-dirty-rate under TCG (measured here).
        raise RigError("dirty-log: needs -accel kvm (under TCG there is no memslot to flag)")
    qmp = rig.require_qmp()
    log.config.setdefault("workload", "dirty-log")
    log.config.setdefault("params", {"count": count, "calc_time": calc_time,
                                     "duration": duration, "mode": "dirty-bitmap"})
    loop = asyncio.get_running_loop()
    start, done = loop.time(), 0
    try:
        while (count is None or done < count) and \
                (duration is None or loop.time() - start < duration or not done):
            check_cancelled()
            begin = monotonic_ns()
            try:
                await qmp.execute("calc-dirty-rate",
                                  {"calc-time": calc_time, "mode": "dirty-bitmap"})
                deadline = loop.time() + timeout
                while True:
                    info = await qmp.execute("query-dirty-rate")
                    if info.get("status") == "measured":
                        break
                    if loop.time() > deadline:
                        raise RigError(f"calc-dirty-rate: not measured within {timeout:g} s")
                    await asyncio.sleep(0.05)
            except RigError as e:
                log.add("calc-dirty-rate", "all", begin, monotonic_ns(), ok=False, error=str(e))
                raise
            log.add("calc-dirty-rate", "all", begin, monotonic_ns(),
                    detail={"dirty_rate_mb_s": info.get("dirty-rate"),
                            "calc_time": calc_time, "mode": info.get("mode")})
            done += 1
    finally:
        log.config["result"] = {"toggles": done}
        log.flush()
    return done
