"""The host's side of nested mode: one L1 boot runs every run left for a kernel.

The plan (``OUT/batches/<kernel>-<n>.json``) goes to ``slotscope lab-run
--plan`` inside the lab VM, which compiles the probes once and records the
runs one after another (slotscope.labrun).  The host watches each run's
``run-progress.json`` on its own clock (the L1's lags under load) and kills
the L1 when a run outlives its timeout or none starts in time.  When the L1
dies, the run in flight carries the L1's fault and the runs it never reached
go to a fresh L1; runs lost to a TCG-nesting fault are run again, up to
LAB_FAULT_RERUNS times, their directory kept as ``<rep>.fault<n>``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recording.errors import RecordingError
from recording.manifest import Manifest
from recording.reader import read_manifest
from vmrig.errors import RigError
from vmrig.kernel import LabKernel

from .labrun import PlannedRun, progress_failure, read_progress

# The L1 boots (15-30 s) and compiles the probes (1.5-4.5 min under TCG on
# 2 cores, worse beside other load) before the first run starts.
START_LIMIT_S = 600.0
# A run the inner side did not stop at its own deadline (its clock lags, or
# the L1 livelocked) is killed this much later by the host's clock.
RUN_GRACE_S = 60.0


@dataclass
class BatchOutcome:
    """What one L1 boot did: per run, its progress (None: never started)."""

    kernel: str
    accel: str
    boot_s: float | None
    load_s: float | None
    elapsed_s: float
    fault: RigError | None                  # the L1's own, if it had one
    exit_error: str | None                  # the inner command's last words if it failed
    progress: dict[Path, dict[str, Any] | None] = field(default_factory=dict)

    def phases(self) -> dict[str, Any]:
        runs = {str(d): {"state": (p or {}).get("state", "not started"),
                         "elapsed_s": (p or {}).get("elapsed_s")}
                for d, p in self.progress.items()}
        return {"kernel": self.kernel, "accel": self.accel, "boot_s": self.boot_s,
                "load_s": self.load_s,
                "wall_s": round(self.elapsed_s, 1), "runs": runs,
                "fault": str(self.fault) if self.fault else None}


class _Watch:
    """run_in_labvm's watch: why to kill the L1 now, by the host's clock."""

    def __init__(self, runs: list[PlannedRun]) -> None:
        self.runs = runs
        self.t0 = time.monotonic()
        self.seen: dict[Path, float] = {}  # host time a run was first seen started

    def __call__(self) -> str | None:
        now = time.monotonic()
        started = False
        for r in self.runs:
            p = read_progress(r.dir)
            if p is None:
                continue
            started = True
            first = self.seen.setdefault(r.dir, now)
            if p.get("state") == "started" and now - first > r.timeout + RUN_GRACE_S:
                return (f"run {r.label} still going {now - first:.0f} s after it started "
                        f"(timeout {r.timeout:.0f} s, host clock)")
        if not started and now - self.t0 > START_LIMIT_S:
            return f"no run started within {START_LIMIT_S:.0f} s of the L1's launch"
        return None


def run_batch(kernel: LabKernel, runs: list[PlannedRun], state: Path, n: int,
              l0_qemu: str | None) -> BatchOutcome:
    """Boot the L1 once on ``kernel`` and run ``runs`` inside it."""
    from vmrig.labvm import VENV_BIN, run_in_labvm
    state.mkdir(parents=True, exist_ok=True)
    plan = state / f"{kernel.release}-{n}.json"
    for r in runs:  # an unfinished earlier attempt: start clean
        if r.dir.exists():
            shutil.rmtree(r.dir)
        r.dir.mkdir(parents=True)
    plan.write_text(json.dumps({"l0_qemu": l0_qemu,
                                "runs": [r.to_json() for r in runs]}, indent=1) + "\n")
    watch = _Watch(runs)
    timeout = START_LIMIT_S + sum(r.timeout + RUN_GRACE_S for r in runs)
    # The lab's output directory is the L1's writable one (runs/ and
    # batches/ inside); this boot's script and logs in batches/<plan>/.
    boot = state / plan.stem
    res = run_in_labvm([str(VENV_BIN / "slotscope"), "lab-run", "--plan", str(plan)],
                       kernel=kernel.vmlinux, timeout=timeout, outdir=state.parent,
                       echo=False, watch=watch,
                       state_dir=str(boot.relative_to(state.parent)))
    progress = {r.dir: read_progress(r.dir) for r in runs}
    load_s = next((float(m["session"]["load_s"]) for r in runs
                   if (m := _session_manifest(r.dir)) is not None), None)
    exit_error = None
    if res.returncode not in (0, None):
        exit_error = _last_words(boot / "console.log",
                                 res.returncode)
    return BatchOutcome(kernel.release, res.accel, res.boot_s, load_s, res.elapsed_s, res.fault(),
                        exit_error, progress)


def _session_manifest(run_dir: Path) -> Manifest | None:
    """The run's manifest if the tracer session wrote one into it."""
    try:
        m = read_manifest(run_dir)
    except RecordingError:  # never started, or lost with the L1
        return None
    return m if "session" in m else None


def _last_words(console: Path, returncode: int | None) -> str:
    """The inner command's last line in the console, not the L1 kernel's."""
    try:
        lines = console.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    words = [ln for ln in lines if ln.strip() and not ln.startswith(("[", "labvm:"))]
    return f"exit {returncode}: {words[-1] if words else 'no output'}"


def run_failure(r: PlannedRun, progress: dict[str, Any],
                batch: BatchOutcome) -> RigError | None:
    """None if the run succeeded, else why it failed, typed where the rig
    left a record (GuestFault & co.) or the L1 had a fault (L1Fault)."""
    if progress.get("state") != "started":
        return progress_failure(r.dir, progress)
    # started and never finished: the L1 died or hung under it
    if batch.fault is not None:
        return batch.fault
    return RigError(batch.exit_error or "the lab VM ended before the run finished")

