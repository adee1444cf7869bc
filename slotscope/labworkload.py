"""One lab run's workload, driven while lab-run's session records it.

A micro-VMM forked ready-imported (vmrig.microvm.prefork), its ground truth
written as the run's workload table; or a QEMU rig with a Linux or bare
guest whose memory is hotplugged (pc-dimm) or resized (virtio-mem) over QMP.
The caller (slotscope.labrun) owns the run's progress and its failure.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from vmrig import RigError

if TYPE_CHECKING:
    from tracer.recorder import Recorder
    from vmrig.config import RigConfig
    from vmrig.microvm.prefork import Forks
    from vmrig.snapshot import Snapshots

    from .labconfig import Scenario
    from .labrun import PlannedRun

SETTLE_S = 0.5  # keep recording after the last action: its MMIO faults come later
NO_INIT = "rdinit=/nonexistent"  # the in-L1 rerun test's L2: no init, so it resets
LINUX_BOOT_TIMEOUT = 120.0  # seconds, L1 time: see rig_config


def run_microvm(r: PlannedRun, rec: Recorder, vmms: Forks, final: dict[str, Any],
                phases: dict[str, float]) -> None:
    from vmrig.microvm.truth import write_run_workload
    s, t0 = r.scenario, time.monotonic()
    truth = r.dir / "microvm.json"
    work = (["--wrap", str(s.wraps)] if s.wraps else
            ["--mmio-accesses", str(s.mmio_accesses), "--schedule", s.schedule,
             *(["--native"] if s.native else [])])
    # No --run-dir: its workload table is written here, from the truth, so
    # that the VMM never imports pyarrow (2-4 s a run each way in a TCG L1).
    vmm = vmms.spawn(["--wait", *work, "--pages", str(s.mmio_pages), "-o", str(truth)])
    deadline = t0 + r.timeout
    try:
        if not vmm.ready(timeout=r.timeout):
            raise RigError(f"micro-VMM did not start: {vmm.stderr_tail()}")
        assert vmm.pid is not None
        # Before the VMM creates its memslots, so every one is seen.
        rec.begin_run(r.dir, pids=[vmm.pid])
        phases["vmm_ready_s"] = round(time.monotonic() - t0, 3)
        try:
            vmm.go()
            rec.run(until=lambda: vmm.poll() is not None or time.monotonic() > deadline)
        finally:
            rec.end_run(**final)
        phases["workload_s"] = round(time.monotonic() - t0, 3)
        if rec.stop_requested:
            return
        if vmm.poll() is None:
            raise RigError(f"run hung: micro-VMM killed after {r.timeout:.0f} s")
        if vmm.wait(timeout=60):
            raise RigError(f"micro-VMM failed: {vmm.stderr_tail()}")
        write_run_workload(r.dir, json.loads(truth.read_text()))
    finally:
        vmm.kill()
        vmm.stderr_tail()  # removes its file


def rig_config(s: Scenario, timeout: float) -> RigConfig:
    """The rig a QEMU scenario runs: its guest, and for virtio-mem a device of
    ``size`` (dynamic memslots where QEMU has them) with room for it."""
    from vmrig.config import BareGuestConfig, MemoryConfig, RigConfig, VirtioMemConfig
    base = MemoryConfig()
    vm = VirtioMemConfig(size=s.size_bytes) if s.workload == "virtio-mem" else None
    memory = MemoryConfig(maxmem=max(base.maxmem, base.base + s.size_bytes)) if vm else base
    # A Linux L2 under a TCG L1 boots in 16-50 s (measured 2026-12-02), not
    # the bare guest's seconds; one stuck for 2 minutes will not come up (the
    # first L2 in a fresh L1 did not in 210 s) and is a GuestFault, rerun.
    boot = max(RigConfig.boot_timeout, min(timeout / 2, LINUX_BOOT_TIMEOUT)) \
        if s.guest == "linux" else RigConfig.boot_timeout
    # KVM only: the lab measures KVM's memslots, and a guest that fell back
    # to TCG (the rig's auto) makes none, so its run would pass with no rows.
    # A guest KVM cannot boot is a failed run (a GuestFault is rerun).
    return RigConfig(guest=s.guest, vcpus=s.vcpus,  # type: ignore[arg-type]
                     accel="kvm", bare=BareGuestConfig(npages=s.mmio_pages),
                     virtio_mem=vm, memory=memory, boot_timeout=boot)


async def run_qemu(r: PlannedRun, rec: Recorder, final: dict[str, Any],
                   phases: dict[str, float], say: Callable[[str], None],
                   inject_reset: bool = False, snapshots: Snapshots | None = None) -> None:
    """``snapshots``: where a Linux guest traced from its ready line is
    restored from, boot once per configuration (vmrig/snapshot.py)."""
    import asyncio

    from tracer.capabilities import infers_change_types
    from vmrig import workloads as wl
    from vmrig.rig import Rig
    from vmrig.virtiomem import virtio_mem_steps
    from vmrig.workloadlog import WorkloadLog

    s, t0 = r.scenario, time.monotonic()
    # Where the backend infers change types (tracepoint), QEMU is traced from
    # before it execs (on_spawn) so that its initial memslots are recorded.
    # Where KVM itself says (kprobe, kfunc), from its guest's ready line: the
    # boot is not the scenario, and tracing it cost a Linux L2 in the TCG L1
    # ~50 s of boot against ~31 s untraced (seed_vcpus learns the running
    # VM's vCPUs from /proc); and the boot may take the quicker firmware.
    from_spawn = infers_change_types(rec.manifest["backend"])
    cfg = rig_config(s, r.timeout)
    if not from_spawn and cfg.guest == "linux":
        cfg = replace(cfg, firmware="qboot")
    if inject_reset:
        cfg = replace(cfg, kernel_cmdline=f"{cfg.kernel_cmdline} {NO_INIT}".strip())
    # A guest traced from its exec must boot: its boot's memslots are the
    # run's.  One traced from its ready line is the same guest restored.
    snaps = snapshots if not from_spawn and cfg.guest == "linux" and not inject_reset else None
    rec.begin_run(r.dir, pids=[os.getpid()])
    rec.start_thread()
    try:
        async with asyncio.timeout(r.timeout):
            async with Rig(cfg, record_dir=r.dir, snapshots=snaps,
                           on_spawn=rec.add_pid if from_spawn else None) as rig:
                assert rig.pid is not None
                if not from_spawn:
                    rec.add_pid(rig.pid)
                phases["qemu_up_s"] = round(time.monotonic() - t0, 3)
                snap = rig.snapshot_info
                how = (f"booted in {snap['boot_s']:.1f} s, saved in {snap['saved_s']:.1f} s, "
                       f"restored in {rig.boot_s:.1f} s" if "saved_s" in snap else
                       f"{'restored' if snap.get('restored') else 'booted'} in {rig.boot_s:.1f} s")
                say(f"QEMU up ({rig.accel}), guest {how}, traced from "
                    f"{'its exec' if from_spawn else 'the guest ready line'}")
                log = WorkloadLog(r.dir, {"rig": rig.info(), "scenario": asdict(s)})
                if s.workload == "hotplug":
                    await wl.hotplug_cycles(rig, log, cycles=s.cycles, size=s.size_bytes,
                                            rate=s.rate)
                elif s.workload == "dirty-log":
                    await wl.dirty_log_toggles(rig, log, count=None, duration=s.duration)
                elif s.workload == "virtio-mem":
                    await virtio_mem_steps(rig, log, s.virtio_mem_sizes())
                else:
                    raise RigError(f"workload {s.workload} is not supported by the lab job yet")
                await asyncio.sleep(SETTLE_S)
                phases["workload_s"] = round(time.monotonic() - t0, 3)
    except TimeoutError:
        raise RigError(f"run hung: rig stopped after {r.timeout:.0f} s") from None
    finally:
        try:
            await asyncio.to_thread(rec.stop_thread)
        finally:
            rec.end_run(**final)
