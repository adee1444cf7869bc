"""The host's side of nested mode: one L1 boot runs every run left for a kernel.

The plan (``OUT/batches/<kernel>-<n>.json``) goes to ``slotscope lab-run
--plan`` inside the lab VM, which compiles the probes once and records the
runs one after another (slotscope.labrun).  The host watches each run's
``run-progress.json`` on its own clock (the L1's lags under load) and kills
the L1 when a run outlives its timeout or none starts in time.  When the L1
dies, the run in flight carries the L1's fault and the runs it never reached
go to a fresh L1; runs lost to a TCG-nesting fault are run again, up to
LAB_FAULT_RERUNS times, their directory kept as ``<rep>.fault<n>``: an L2
fault by the inner side in the same L1, an L1 fault in a fresh one.
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

from .labprogress import Progress
from .labrun import PlannedRun, progress_failure, read_progress
from .labstatus import LAB_FAULT_RERUNS, Reruns, RunStatus, lab_fault, write_status

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
        # host time each attempt at a run was first seen started
        self.seen: dict[tuple[Path, int], float] = {}

    def __call__(self) -> str | None:
        now = time.monotonic()
        started = False
        for r in self.runs:
            p = read_progress(r.dir)
            if p is None:
                continue
            started = True
            # an attempt the inner side reran starts its own clock
            first = self.seen.setdefault((r.dir, len(p.get("retried") or [])), now)
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


def _build_guests(todo: list[PlannedRun], progress: Progress) -> None:
    """What the runs build, built here where the cache lasts: the L1 finds
    it in its view of this cache (guestbuild) and skips the builds it made
    at every boot on a TCG vCPU: the Linux L2's initramfs (a gcc -static
    of ~11 s beside the probe compile) and the micro-VMM's C loop (cc, in
    the first run's start-up).  A build that fails here is left to the L1:
    the run that needs it reports it."""
    from vmrig import kernel, linuxguest
    from vmrig.microvm import native
    builds = [("the Linux guest's initramfs", any(r.scenario.guest == "linux" for r in todo),
               lambda: linuxguest.build_initramfs(kernel.lab_kernel().release)),
              ("the micro-VMM's C loop", any(r.scenario.native for r in todo), native.build)]
    for what, wanted, build in builds:
        if not wanted:
            continue
        t = time.monotonic()
        try:
            build()
        except (RigError, OSError) as e:
            progress.log(f"{what} was not built on the host: {e}")
            continue
        progress.log(f"{what} is ready ({time.monotonic() - t:.1f} s)")


def run_kernel(k: LabKernel, todo: list[PlannedRun], out: Path, l0_qemu: str | None,
               statuses: dict[str, list[RunStatus]], progress: Progress) -> list[dict[str, Any]]:
    """Every run of ``todo`` on kernel ``k``, one L1 boot for all (a fresh
    one for the runs an L1 fault left); the phase times of each boot."""
    reruns = Reruns()
    phases = []
    boot = idle = 0
    _build_guests(todo, progress)
    while todo:
        boot += 1
        progress.step(f"{k.release}: L1 boot {boot}, {len(todo)} runs")
        progress.log(f"{k.release}: L1 boot {boot} for {len(todo)} runs: "
                     + ", ".join(r.label for r in todo))
        for r in todo:
            r.reruns_done = reruns.count(r.dir)
        try:
            b = run_batch(k, todo, out / "batches", boot, l0_qemu)
        except BaseException:  # Ctrl-C, SIGTERM: the runs this L1 finished stay done
            for r in todo:
                p = read_progress(r.dir)
                if p is not None and p.get("state") == "ok":
                    write_status(r.dir, RunStatus(r.scenario.name, r.rep, True, "nested",
                                                  float(p.get("elapsed_s") or 0.0),
                                                  kernel=k.release))
            raise
        phases.append(b.phases())
        progress.log(f"{k.release}: L1 boot {boot}: boot {b.boot_s} s, probes {b.load_s} s, "
                     f"wall {b.elapsed_s:.0f} s" + (f"; L1 fault: {b.fault}" if b.fault else ""))
        left = []
        for r in todo:
            p = b.progress[r.dir]
            if p is None:  # the L1 never reached it: a fresh L1 will
                left.append(r)
                continue
            r.panic_l1 = r.reset_l2 = False  # injected once
            inner = p.get("retried") or []  # rerun in that L1 already
            for a in inner:
                progress.log(f"{k.release}/{r.label}: lab fault ({a['kind']}), run again "
                             f"in the same L1: {a['error']}")
            reruns.took(r.dir, inner)
            failure = run_failure(r, p, b)
            st = RunStatus(r.scenario.name, r.rep, failure is None, "nested",
                           float(p.get("elapsed_s") or 0.0), accel=b.accel,
                           failure=failure, kernel=k.release)
            if reruns.again(st, r.dir, progress.log):
                left.append(r)
                continue
            write_status(r.dir, st)
            statuses[f"{k.release}/{r.scenario.name}"].append(st)
            state = "ok" if st.ok else f"FAILED: {st.error}"
            progress.log(f"{k.release}/{r.label}: {state} ({st.elapsed_s:.0f} s)")
            progress.advance()
        if not any(b.progress.values()):  # no run started
            idle += 1
            if lab_fault(b.accel, b.fault) and idle <= LAB_FAULT_RERUNS:  # e.g. a TCG lockup
                progress.log(f"{k.release}: L1 boot {boot} ran no run ({b.fault}); boot again")
                continue
            # another boot would do the same
            why = str(b.fault or b.exit_error or "the lab VM ran no run")
            for r in left:
                r.dir.mkdir(parents=True, exist_ok=True)
                st = RunStatus(r.scenario.name, r.rep, False, "nested", 0.0, accel=b.accel,
                               failure=RigError(f"no run started in the L1: {why}"),
                               kernel=k.release)
                write_status(r.dir, st)
                statuses[f"{k.release}/{r.scenario.name}"].append(st)
                progress.advance()
            break
        todo = left
    return phases
