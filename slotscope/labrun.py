"""One lab run in direct mode: workload up, record it, workload down.

Runs as ``slotscope lab-run`` on the host, or inside the nested lab VM,
writing the run directory in the recording format.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tracer.recorder import Recorder
from vmrig import RigError

from .labconfig import Scenario

SETTLE_S = 0.5  # keep recording after the last action: its MMIO faults come later
_T0 = time.monotonic()
_log = logging.getLogger(__name__)  # not "log": _qemu has a WorkloadLog by that name


def _phase(what: str) -> None:
    """Phase times on stderr (the lab VM's console.log): where a slow run went.

    INFO through logging: printed by `slotscope lab-run` (cli.main sets the
    handler), silent when run_direct is called in-process."""
    _log.info("lab-run: +%.1f s %s", time.monotonic() - _T0, what)


def run_direct(s: Scenario, run_dir: Path) -> None:
    _phase(f"start {s.name} ({s.workload})")
    if s.workload == "microvm":
        _microvm(s, run_dir)
    else:
        asyncio.run(_qemu(s, run_dir))


def _microvm(s: Scenario, run_dir: Path) -> None:
    truth = run_dir / "microvm.json"
    work = (["--wrap", str(s.wraps)] if s.wraps else
            ["--mmio-accesses", str(s.mmio_accesses), "--schedule", s.schedule])
    argv = [sys.executable, "-m", "vmrig.microvm", "--wait", *work, "--pages",
            str(s.mmio_pages), "-o", str(truth), "--run-dir", str(run_dir)]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    try:
        ready = p.stdout.readline().split()
        if ready[:1] != ["ready"]:
            raise RigError(f"micro-VMM did not start: {p.stderr.read().strip()[-200:]}")
        # Attach before the VMM creates its memslots, so every one is seen.
        rec = Recorder(run_dir, pids=[p.pid], aggregate=s.aggregate).start()
        _phase("probes attached")
        with rec.stopped_by_signals():
            try:
                p.stdin.write("go\n")
                p.stdin.close()
                rec.run(until=lambda: p.poll() is not None)  # reaped: no zombie to wait on
                if not rec.stop_requested:
                    _phase("workload done")
            finally:
                rec.close(scenario=asdict(s))
                _phase("recording closed")
        if rec.stop_requested:  # every event drained and written: now the usual exit
            raise KeyboardInterrupt
        if p.wait(timeout=60):
            raise RigError(f"micro-VMM failed: {p.stderr.read().strip()[-200:]}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


async def _qemu(s: Scenario, run_dir: Path) -> None:
    from vmrig import workloads as wl
    from vmrig.config import BareGuestConfig, RigConfig
    from vmrig.rig import Rig

    cfg = RigConfig(guest=s.guest, vcpus=s.vcpus,  # type: ignore[arg-type]
                    bare=BareGuestConfig(npages=s.mmio_pages))
    # Load the probes before QEMU starts (a clang run: minutes in a TCG L1),
    # off the event loop, then extend the pid filter to QEMU's process
    # before it execs QEMU, so that its initial memslots are recorded too
    # (the tracepoint backend infers change types from them).
    rec = Recorder(run_dir, pids=[os.getpid()], aggregate=s.aggregate)
    await asyncio.to_thread(rec.start)
    _phase("probes attached")
    rec.start_thread()
    try:
        async with Rig(cfg, record_dir=run_dir, on_spawn=rec.add_pid) as rig:
            assert rig.pid is not None
            _phase(f"QEMU up ({rig.accel})")
            log = wl.WorkloadLog(run_dir, {"rig": rig.info(), "scenario": asdict(s)})
            if s.workload == "hotplug":
                await wl.hotplug_cycles(rig, log, cycles=s.cycles, size=s.size_bytes,
                                        rate=s.rate)
            elif s.workload == "dirty-log":
                await wl.dirty_log_toggles(rig, log, count=None, duration=s.duration)
            else:
                raise RigError(f"workload {s.workload} is not supported by the lab job yet")
            await asyncio.sleep(SETTLE_S)
            _phase("workload done")
    finally:
        await asyncio.to_thread(rec.stop)
        _phase("recording closed")
