"""The inner side of the lab: runs recorded one after another, one tracer session.

Runs as ``slotscope lab-run`` (registered here) on the host (direct mode:
one run per child process) or inside the nested lab VM (one L1 boot runs a
whole plan: the probes are compiled and attached once, each run still lands
in its own directory in the recording format, ``Recorder.begin_run``/
``end_run``).  The workload of each run: slotscope.labworkload.

Each run directory gets ``run-progress.json``, rewritten as the run goes:
``{"state": "started"|"ok"|"failed", "error", "elapsed_s", "phases",
"retried"}``.  The host reads it on its own clock: a run that stays
"started" past its timeout hangs, and when the L1 dies the run in flight is
the one it lost.  A run lost to an L2 fault of TCG nesting is run again in
the same L1 (``_attempts``); "retried" names the attempts thrown away.

This module imports only what is light at its top: ``cmd_lab_run`` starts
the probe compile in a thread first, and pyarrow, the tracer's recorder and
the lab config load beside it (in the TCG L1 each is 10-25 s of one vCPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmrig import RigError
from vmrig.errors import read_record, write_record

from .errors import LabError
from .labstatus import LAB_FAULT_RERUNS, lab_fault

if TYPE_CHECKING:
    from tracer.loader import Loaded
    from tracer.recorder import Recorder
    from vmrig.microvm.prefork import Forks
    from vmrig.snapshot import Snapshots

    from .labconfig import Scenario

PROGRESS = "run-progress.json"
# Test hook of the lab's fault handling (slotscope lab --inject-l1-panic):
# the L1 panics when this run starts, as a real L1 fault would take it down.
PANIC_ON_START = "panic_l1"
# Test hook of the in-L1 reruns (slotscope lab --inject-l2-reset): the run's
# first Linux L2 boots with no init, so its kernel panics and the VM resets,
# as TCG-nested L2s sometimes do by themselves.
RESET_L2 = "reset_l2"
ONE_RUN_TIMEOUT = 86400.0  # lab-run --scenario: the caller keeps the deadline
_T0 = time.monotonic()
_log = logging.getLogger(__name__)


@dataclass
class PlannedRun:
    """One repetition of a scenario, as the host plans it for the inner side."""

    scenario: Scenario
    rep: int
    dir: Path
    timeout: float                 # seconds; the inner side's own deadline
    panic_l1: bool = False         # PANIC_ON_START: the fault-handling test
    reset_l2: bool = False         # RESET_L2: the in-L1 rerun test
    reruns_done: int = 0           # lab-fault reruns in earlier L1 boots

    def to_json(self) -> dict[str, Any]:
        return {"scenario": asdict(self.scenario), "rep": self.rep, "dir": str(self.dir),
                "timeout": self.timeout, PANIC_ON_START: self.panic_l1,
                RESET_L2: self.reset_l2, "reruns_done": self.reruns_done}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlannedRun:
        from .labconfig import Scenario
        return cls(Scenario(**d["scenario"]), int(d["rep"]), Path(d["dir"]),
                   float(d["timeout"]), bool(d.get(PANIC_ON_START, False)),
                   bool(d.get(RESET_L2, False)), int(d.get("reruns_done", 0)))

    @property
    def label(self) -> str:
        return f"{self.scenario.name}/{self.rep}"


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    try:
        d = json.loads((run_dir / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def progress_failure(run_dir: Path, progress: dict[str, Any]) -> RigError | None:
    """None for a run whose progress says ok, else its failure: the typed
    record it left (GuestFault & co. keep their kind), or a RigError with
    the progress file's words."""
    if progress.get("state") == "ok":
        return None
    message = str(progress.get("error") or "the run did not finish")
    return read_record(run_dir, message) or RigError(message)


def _phase(what: str) -> None:
    """Phase times on stderr (the lab VM's console.log): where a slow run went.

    INFO through logging: printed by `slotscope lab-run` (cli.main sets the
    handler), silent when called in-process."""
    _log.info("lab-run: +%.1f s %s", time.monotonic() - _T0, what)


@dataclass
class _Session:
    """What the runs of one recorder session share."""

    rec: Recorder
    l0_qemu: str | None
    l1_qemu: Future[str | None]   # asked in the background: 3 s in a TCG L1
    vmms: Forks | None            # micro-VMMs forked ready-imported
    snapshots: Snapshots | None   # Linux guests booted once (vmrig/snapshot.py)

    def final(self, r: PlannedRun) -> dict[str, Any]:
        """The manifest keys lab-run adds to each run."""
        return {"scenario": asdict(r.scenario),
                "qemu": {"l0": self.l0_qemu, "l1": self.l1_qemu.result()}}


def run_plan(runs: Sequence[PlannedRun], l0_qemu: str | None = None,
             preloaded: Future[Loaded] | None = None) -> int:
    """Every run of ``runs`` in order; the number that failed.

    One recorder session per aggregate setting (it is compiled into the
    probes): runs are taken grouped by it.  A run's failure is written to
    its directory and the next run goes on; Ctrl-C/SIGTERM finalize the run
    in flight and raise KeyboardInterrupt.

    While the probes compile (one of a TCG L1's two vCPUs for 15-25 s), the
    rest gets ready beside it: the L1's QEMU version, the Linux guest's
    files, and the micro-VMMs' imports (vmrig.microvm.prefork).
    ``preloaded``: the first session's probes, compiling already (_preload);
    run_plan owns them: they are detached on every way out."""
    vmms: Forks | None = None
    snap_dir: str | None = None
    failed = 0
    try:
        from tracer.recorder import Recorder
        from vmrig.host import version_text
        from vmrig.microvm.prefork import Forks
        from vmrig.snapshot import Snapshots
        background = ThreadPoolExecutor(2, thread_name_prefix="lab-run")
        # A generous timeout: beside the compile and the guest's staging, all
        # reading over the L1's 9p, it took over 10 s once (3 s alone).
        l1_qemu = background.submit(version_text, None, 120.0)
        staging = snapshots = None
        if any(r.scenario.guest == "linux" for r in runs):
            staging = background.submit(_stage_linux_guest)
            snap_dir = tempfile.mkdtemp(prefix="slotscope-snapshots-")
            snapshots = Snapshots(snap_dir)
        background.shutdown(wait=False)  # the tasks run on; nothing more is submitted
        vmms = Forks() if any(r.scenario.workload == "microvm" for r in runs) else None
        for aggregate in sorted({r.scenario.aggregate for r in runs}):
            group = [r for r in runs if r.scenario.aggregate == aggregate]
            loaded, preloaded = _take(preloaded, aggregate)
            rec = Recorder(None, pids=[os.getpid()], aggregate=aggregate).start(loaded)
            _phase(f"probes compiled and attached ({rec.manifest.get('backend')}, "
                   f"{rec.load_s:.1f} s)")
            if staging is not None:
                _staged(staging)
                staging = None
            session = _Session(rec, l0_qemu, l1_qemu, vmms, snapshots)
            try:
                with rec.stopped_by_signals():
                    for r in group:
                        failed += not _attempts(r, session)
                        if rec.stop_requested:
                            raise KeyboardInterrupt
            finally:
                rec.close()
    finally:
        if vmms is not None:
            vmms.close()
        if snap_dir is not None:
            shutil.rmtree(snap_dir, ignore_errors=True)
        _discard(preloaded)  # not taken (an error first): detached
    return failed


def _preload(aggregate: bool) -> Future[Loaded]:
    """The first session's probes compiled and attached in a thread, while
    the caller imports the rest (tracer.loader.preload)."""
    def load() -> Loaded:
        from tracer.loader import preload
        return preload(None, [os.getpid()], aggregate=aggregate)
    pool = ThreadPoolExecutor(1, thread_name_prefix="lab-run-probes")
    future = pool.submit(load)
    pool.shutdown(wait=False)  # the task runs on; nothing more is submitted
    return future


def _take(preloaded: Future[Loaded] | None, aggregate: bool
          ) -> tuple[Loaded | None, Future[Loaded] | None]:
    """The preloaded probes if they are ``aggregate``'s, and what is left."""
    if preloaded is None:
        return None, None
    if preloaded.result().aggregate != aggregate:
        return None, preloaded
    return preloaded.result(), None


def _discard(preloaded: Future[Loaded] | None) -> None:
    """Detach preloaded probes no session took (after the compile ends)."""
    if preloaded is not None:
        with contextlib.suppress(Exception):  # its error was, or will be, someone else's
            preloaded.result().probes.close()


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("lab-run")  # internal: runs in a child or the lab VM
    r.add_argument("--plan")
    r.add_argument("--scenario")
    r.add_argument("-o", "--output")
    r.set_defaults(func=cmd_lab_run)


def cmd_lab_run(args: argparse.Namespace) -> int:
    """Runs one after another in this process, one tracer session: a plan
    file (``--plan``, slotscope.labbatch writes them) or one scenario."""
    from recording.nopandas import block_pandas
    block_pandas()  # this process records, never analyses: 33 s less per L1 boot
    try:
        if args.plan:
            doc = json.loads(Path(args.plan).read_text())
            docs, l0_qemu = list(doc["runs"]), doc.get("l0_qemu")
        elif args.scenario and args.output:
            docs = [{"scenario": json.loads(args.scenario), "rep": 1, "dir": args.output,
                     "timeout": ONE_RUN_TIMEOUT}]
            l0_qemu = None
        else:
            raise LabError("give --plan FILE, or --scenario JSON and -o DIR")
        first = min(bool(d["scenario"].get("aggregate", False)) for d in docs)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise LabError(f"bad lab-run plan: {e}") from None
    preloaded = _preload(first)
    try:
        runs = [PlannedRun.from_json(d) for d in docs]
    except BaseException as e:
        _discard(preloaded)
        if isinstance(e, (ValueError, TypeError, KeyError)):
            raise LabError(f"bad lab-run plan: {e}") from None
        raise
    try:
        failed = run_plan(runs, l0_qemu, preloaded)  # the probes are its from here
    except OSError as e:  # a run directory that cannot be written: none can
        raise LabError(f"cannot write a run directory: {e}") from None
    for r in runs:
        p = read_progress(r.dir) or {}
        if p.get("state") != "ok":
            _log.error("slotscope lab-run: error: %s: %s", r.label, p.get("error", "?"))
    return 1 if failed else 0


def _stage_linux_guest() -> float:
    """Build the Linux guest's initramfs and copy its kernel off the lab VM's
    9p (linuxguest.guest_files) while the probes compile: in a fresh L1 the
    two took ~15 s of the first Linux run (measured in the TCG L1).  The
    seconds it took."""
    from vmrig import linuxguest
    t = time.monotonic()
    linuxguest.guest_files()
    return time.monotonic() - t


def _staged(staging: Future[float]) -> None:
    """Log how the staging went, once the probes are in (the loader silences
    stderr while it compiles).  A failure is left to the run that needs the
    files: it reports it as that run's error."""
    try:
        _phase(f"Linux guest staged ({staging.result():.1f} s)")
    except (RigError, OSError) as e:
        _phase(f"Linux guest not staged ({e}); its first run will try again")


def _attempts(r: PlannedRun, session: _Session) -> bool:
    """Run ``r``, and run it again here when an L2 fault of TCG nesting
    (labstatus.lab_fault) lost it, up to LAB_FAULT_RERUNS times: this L1 is
    sound, and a fresh one would cost a boot and a probe compile (109 s for
    one L2 that reset 0.8 s into its boot, measured in the default lab).
    Each lost attempt is kept as ``<rep>.fault<n>``, numbered after the
    host's (``reruns_done``); the progress of the next names them
    ("retried"), and the host counts them with its own."""
    from vmrig.labvm import ACCEL_ENV
    accel = os.environ.get(ACCEL_ENV)
    retried: list[dict[str, str]] = []
    while True:
        failure = _one(r, session, retried, inject_reset=r.reset_l2 and not retried)
        if (failure is None or session.rec.stop_requested
                or r.reruns_done + len(retried) >= LAB_FAULT_RERUNS
                or not lab_fault(accel, failure)):
            return failure is None
        retried.append({"error": str(failure), "kind": failure.kind_tag})
        kept = r.dir.with_name(f"{r.dir.name}.fault{r.reruns_done + len(retried)}")
        shutil.rmtree(kept, ignore_errors=True)
        r.dir.rename(kept)
        _phase(f"{r.label}: lab fault ({failure.kind_tag}), run again in this L1")


def _one(r: PlannedRun, session: _Session, retried: list[dict[str, str]],
         inject_reset: bool = False) -> RigError | None:
    """One attempt at ``r``: None if it went well, else its failure."""
    import asyncio

    from recording.writer import atomic_write_json

    from . import labworkload
    rec = session.rec
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    failure: RigError | None = None
    progress: dict[str, Any] = {"state": "started", "label": r.label, "phases": phases,
                                "retried": retried}
    r.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(r.dir / PROGRESS, progress)
    _phase(f"start {r.label} ({r.scenario.workload})")
    if r.panic_l1:
        _panic_l1()
    try:
        final = session.final(r)
        if r.scenario.workload == "microvm":
            assert session.vmms is not None  # run_plan starts it for microvm runs
            labworkload.run_microvm(r, rec, session.vmms, final, phases)
        else:
            asyncio.run(labworkload.run_qemu(r, rec, final, phases, _phase, inject_reset,
                                             session.snapshots))
        progress["state"] = "ok"
        if rec.stop_requested:
            failure = RigError("interrupted")
            progress.update(state="failed", error=str(failure))
    except (RigError, OSError) as e:
        # the typed record: GuestFault & co. keep their kind across processes
        failure = e if isinstance(e, RigError) else RigError(str(e))
        write_record(r.dir, failure)
        progress.update(state="failed", error=str(e))
    except Exception as e:  # the tracer's or the recording's: this run is lost
        progress.update(state="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        progress["elapsed_s"] = round(time.monotonic() - t0, 3)
        atomic_write_json(r.dir / PROGRESS, progress)
        _phase(f"{r.label} {progress['state']} ({progress['elapsed_s']:.1f} s)")
    return failure


def _panic_l1() -> None:
    if os.environ.get("SLOTSCOPE_LABVM") != "1":
        raise RigError("panic_l1 only inside the nested lab VM")
    _log.warning("lab-run: panicking the L1 on purpose (--inject-l1-panic)")
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("c")
