"""``slotscope lab``: the nightly lab run over a scenario matrix.

For every kernel, scenario and repetition: rig up, record, workload, rig
down (``slotscope lab-run``, slotscope.labrun).  In direct mode each run is
a child process with a deadline on the host, whose kernel is the only one;
in nested mode one lab VM boot per kernel runs all of that kernel's runs
with the probes compiled once (slotscope.labbatch).  Every run lands in
``OUT/runs/<kernel>/<scenario>/<n>/`` in the recording format, with a
``lab-run.json`` status beside the data; then ``OUT/summary.json`` (keyed
``<kernel>/<scenario>``, with the phase times of each L1 boot) and
``OUT/index.html``.  The only module that composes tracer, vmrig and analysis.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recording.errors import RecordingError
from recording.hostfacts import FAIL
from slotscope.labprogress import Progress
from vmrig.errors import GuestFault, L1Fault, RigError, read_record

from . import labverdict
from .labconfig import ConfigError, LabConfig, Scenario, load
from .labrun import PlannedRun, progress_failure, read_progress

if TYPE_CHECKING:
    from analysis.epochs import Correlation
    from vmrig.kernel import LabKernel

STATUS = "lab-run.json"
ONE_RUN_TIMEOUT = 86400.0  # lab-run --scenario: the caller keeps the deadline
DEFAULT_LOCK = Path("/run/lock/slotscope-lab.lock")
# TCG-nested L2 faults come in streaks: the pcdimm L2 of the nested lab test
# faulted on the first attempt in 3 of 5 full test runs here, in 1 of 19
# lab-runs looped in one L1.  Two reruns keep a CI run from failing on them.
LAB_FAULT_RERUNS = 2
VENV_BIN = Path(sys.executable).parent
log = logging.getLogger(__name__)


class LabError(Exception):
    """The lab job cannot start or finish; one line for the user."""


class RunFailed(LabError):
    """A run's inner command failed without a typed report from the rig: it
    exited non-zero (``returncode``) or, in direct mode, hung (None)."""

    kind_tag = "run_failed"

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


# -- mode ---------------------------------------------------------------------
def choose_mode(requested: str) -> tuple[str, str]:
    """(mode, why): direct only where the host's KVM shows MMIO SPTEs and a
    backend sees kvm_set_memslot; the nested lab VM otherwise."""
    from tracer import TracerError
    from tracer.capabilities import choose_backend, probe

    caps = probe()
    why_not = ""
    try:
        backend: str | None = choose_backend(caps).name
    except TracerError as e:
        backend, why_not = None, str(e)
    reasons = []
    if caps.kvm_module in (None, "kvm_pvm"):
        reasons.append(f"host KVM is {caps.kvm_module or 'absent'}")
    if not caps.mmio_caching:
        reasons.append("kvm.mmio_caching=N")
    if backend not in ("kprobe", "kfunc"):
        reasons.append(f"backend {backend or 'none'} does not see kvm_set_memslot"
                       if backend else why_not)
    direct_ok = not reasons
    if requested == "direct":
        if backend is None:
            raise LabError(f"direct mode: the tracer cannot run here: {why_not}")
        # Allowed, but say what the data will lack (memslot updates still show).
        return "direct", "requested" + ("; but " + "; ".join(reasons) if reasons else "")
    if requested == "nested" or not direct_ok:
        from vmrig.labvm import labvm_check
        row = labvm_check()
        if row.status == FAIL:
            raise LabError(f"nested lab VM unavailable: {row.detail} ({row.fix})")
        why = "requested" if requested == "nested" else "; ".join(reasons)
        return "nested", f"{why}; {row.detail}"
    return "direct", f"host KVM {caps.kvm_module} caches MMIO, backend {backend}"


# -- one run ------------------------------------------------------------------
@dataclass
class RunStatus:
    scenario: str
    rep: int
    ok: bool
    mode: str
    elapsed_s: float
    error: str | None = None
    accel: str | None = None
    # Why earlier attempts were thrown away (TCG-nested L1/L2 faults), " | "-joined.
    retried: str | None = None
    # The failure's type and kind, e.g. "guest_fault:reset", "l1_fault:lockup".
    kind: str | None = None
    # The kinds of the attempts thrown away, in the order of ``retried``.
    retried_kinds: list[str] = field(default_factory=list)
    kernel: str | None = None  # the L1's release (nested) or the host's (direct)
    # The typed failure itself, in the process that met it; lab-run.json
    # keeps its message (``error``) and ``kind``.
    failure: RigError | RunFailed | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.failure is not None:
            self.error = str(self.failure)
            self.kind = self.failure.kind_tag


def _read_status(run_dir: Path) -> RunStatus | None:
    try:
        return RunStatus(**json.loads((run_dir / STATUS).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_status(run_dir: Path, st: RunStatus) -> None:
    tmp = run_dir / f".{STATUS}.tmp"
    record = {f.name: getattr(st, f.name) for f in fields(st) if f.name != "failure"}
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, run_dir / STATUS)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _lab_fault(accel: str | None, f: Exception | None) -> bool:
    """An L1 panic or soft lockup, or an L2 guest fault the rig names, under
    TCG-emulated nesting: not the scenario's doing.  An L1 that merely hung
    (no lockup report) may have been waiting on the run itself: not rerun."""
    return accel == "tcg" and (
        isinstance(f, GuestFault) or (isinstance(f, L1Fault) and f.kind != "hang"))


class _Reruns:
    """The lab-fault reruns of each run: why each attempt was thrown away."""

    def __init__(self) -> None:
        self.why: dict[Path, list[str]] = {}
        self.kinds: dict[Path, list[str]] = {}

    def again(self, st: RunStatus, run_dir: Path, log: Callable[[str], None]) -> bool:
        """True if ``st`` is a lab fault to run again (its directory kept as
        ``<rep>.fault<n>``); else ``st`` gets the reruns' history."""
        why = self.why.setdefault(run_dir, [])
        kinds = self.kinds.setdefault(run_dir, [])
        if _lab_fault(st.accel, st.failure) and len(why) < LAB_FAULT_RERUNS:
            assert st.error is not None and st.kind is not None
            why.append(st.error)
            kinds.append(st.kind)
            log(f"{st.kernel}/{st.scenario}/{st.rep}: lab fault ({st.kind}), run again: "
                f"{st.error}")
            kept = run_dir.with_name(f"{run_dir.name}.fault{len(why)}")
            shutil.rmtree(kept, ignore_errors=True)
            run_dir.rename(kept)
            return True
        st.retried = " | ".join(why) or None
        st.retried_kinds = list(kinds)
        return False


def run_one(r: PlannedRun, kernel: str, timeout: float,
            log: Callable[[str], None] = print) -> RunStatus:
    """One repetition in direct mode, a child process on the host; a run
    lost to a TCG-nesting fault (a TCG L2) is done again."""
    t0 = time.monotonic()
    reruns = _Reruns()
    while True:
        st = _attempt(r, kernel, timeout)
        if not reruns.again(st, r.dir, log):
            break
    st.elapsed_s = time.monotonic() - t0
    _write_status(r.dir, st)
    return st


def _attempt(r: PlannedRun, kernel: str, timeout: float) -> RunStatus:
    if r.dir.exists():  # an unfinished earlier attempt: start clean
        shutil.rmtree(r.dir)
    r.dir.mkdir(parents=True)
    t0 = time.monotonic()
    plan = r.dir.parent / f".{r.dir.name}.plan.json"
    plan.write_text(json.dumps({"l0_qemu": None, "runs": [r.to_json()]}) + "\n")
    try:
        failure = _run_child([str(VENV_BIN / "slotscope"), "lab-run", "--plan", str(plan)],
                             r.dir, timeout)
    finally:
        plan.unlink(missing_ok=True)
    progress = read_progress(r.dir)
    if progress is not None and progress.get("state") == "failed":  # its own typed failure
        failure = progress_failure(r.dir, progress)
    # Direct mode: never a TCG-nested run, so no accel and no lab-fault rerun.
    return RunStatus(r.scenario.name, r.rep, failure is None, "direct",
                     time.monotonic() - t0, failure=failure, kernel=kernel)


def _exited(run_dir: Path, returncode: int | None, tail: str) -> RigError | RunFailed:
    """The failure of an inner run that exited non-zero: the typed error its
    rig left in the run directory (kind and all), in our words; RunFailed
    if it left none."""
    message = f"exit {returncode}: {tail}"
    return read_record(run_dir, message) or RunFailed(message, returncode)


def _run_child(argv: list[str], run_dir: Path, timeout: float) -> RigError | RunFailed | None:
    """Run the inner command in its own process group; None, or why it failed."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, stderr = p.communicate(timeout=timeout)
    except BaseException as e:  # timeout, Ctrl-C, SIGTERM: take the group down
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            return RunFailed(f"run hung: killed after {timeout:.0f} s", None)
        raise
    return None if p.returncode == 0 else _exited(run_dir, p.returncode, _last_line(stderr))


# -- the inner run (host or L1) ------------------------------------------------
def cmd_lab_run(args: argparse.Namespace) -> int:
    """Runs one after another in this process, one tracer session: a plan
    file (``--plan``, slotscope.labbatch writes them) or one scenario."""
    from recording.nopandas import block_pandas

    from . import labrun
    block_pandas()  # this process records, never analyses: 33 s less per L1 boot
    try:
        if args.plan:
            doc = json.loads(Path(args.plan).read_text())
            runs = [labrun.PlannedRun.from_json(d) for d in doc["runs"]]
            l0_qemu = doc.get("l0_qemu")
        elif args.scenario and args.output:
            runs = [labrun.PlannedRun(Scenario(**json.loads(args.scenario)), 1,
                                      Path(args.output), ONE_RUN_TIMEOUT)]
            l0_qemu = None
        else:
            raise LabError("give --plan FILE, or --scenario JSON and -o DIR")
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise LabError(f"bad lab-run plan: {e}") from None
    try:
        failed = labrun.run_plan(runs, l0_qemu)
    except OSError as e:  # a run directory that cannot be written: none can
        raise LabError(f"cannot write a run directory: {e}") from None
    for r in runs:
        p = labrun.read_progress(r.dir) or {}
        if p.get("state") != "ok":
            log.error("slotscope lab-run: error: %s: %s", r.label, p.get("error", "?"))
    return 1 if failed else 0


# -- the job --------------------------------------------------------------------
@contextlib.contextmanager
def job_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise LabError(f"another lab run holds {path} (pid {holder})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def _analyse(run_dirs: list[Path]) -> tuple[Correlation | None, dict[Path, dict[str, Any]]]:
    """Every completed run correlated once, for summary.json and the report
    alike: the correlation of the readable runs, and each run's summary (or
    ``{"path", "error"}`` for one that cannot be analysed)."""
    from analysis.epochs import correlate_runs
    from analysis.frames import one_line_errors
    from analysis.summary import summarize_all
    from recording.reader import read_manifest
    out: dict[Path, dict[str, Any]] = {}
    good = []
    for d in run_dirs:
        try:
            read_manifest(d)  # not a run, or a schema we do not read
            good.append(d)
        except RecordingError as e:
            out[d] = {"path": str(d), "error": str(e)}
    if not good:
        return None, out
    try:
        with one_line_errors("lab analysis"):
            corr = correlate_runs(good)
            summaries = summarize_all(corr)
    except RecordingError as e:  # all were analysed together: none has figures
        out.update({d: {"path": str(d), "error": str(e)} for d in good})
        return None, out
    out.update({Path(r["path"]): r for r in summaries})
    return corr, out


def _kernels(cfg: LabConfig, mode: str, requested: list[str] | None) -> list[LabKernel | None]:
    """The kernels to run on: nested mode, each of the config's (or
    --kernel's), resolved and fetched; direct mode, the host's (None)."""
    from vmrig.kernel import resolve_kernel
    specs = requested or list(cfg.kernels)
    if mode == "direct":
        if requested:
            raise LabError("--kernel needs nested mode: direct mode runs on the host's kernel")
        return [None]
    try:
        return [resolve_kernel(spec) for spec in specs]
    except RigError as e:
        raise LabError(str(e)) from None


def _plan(cfg: LabConfig, out: Path, kernel: str, resume: bool, inject: str | None,
          statuses: dict[str, list[RunStatus]], progress: Progress) -> list[PlannedRun]:
    """This kernel's runs still to do; --resume's finished ones go to ``statuses``."""
    todo = []
    for s in cfg.scenarios:
        key = f"{kernel}/{s.name}"
        statuses.setdefault(key, [])
        for rep in range(1, s.repetitions + 1):
            run_dir = out / "runs" / kernel / s.name / str(rep)
            prev = _read_status(run_dir) if resume else None
            if prev is not None and prev.ok:
                progress.log(f"{key}/{rep}: done earlier, skipped (--resume)")
                statuses[key].append(prev)
                progress.advance()
                continue
            todo.append(PlannedRun(s, rep, run_dir, s.run_timeout or cfg.run_timeout,
                                   panic_l1=inject == f"{s.name}/{rep}"))
    return todo


def _nested(k: LabKernel, todo: list[PlannedRun], out: Path, l0_qemu: str | None,
            statuses: dict[str, list[RunStatus]], progress: Progress) -> list[dict[str, Any]]:
    """Every run of ``todo`` on kernel ``k``, one L1 boot for all (a fresh
    one for the runs an L1 fault left); the phase times of each boot."""
    from .labbatch import run_batch, run_failure
    reruns = _Reruns()
    phases = []
    boot = idle = 0
    while todo:
        boot += 1
        progress.step(f"{k.release}: L1 boot {boot}, {len(todo)} runs")
        progress.log(f"{k.release}: L1 boot {boot} for {len(todo)} runs: "
                     + ", ".join(r.label for r in todo))
        try:
            b = run_batch(k, todo, out / "batches", boot, l0_qemu)
        except BaseException:  # Ctrl-C, SIGTERM: the runs this L1 finished stay done
            for r in todo:
                p = read_progress(r.dir)
                if p is not None and p.get("state") == "ok":
                    _write_status(r.dir, RunStatus(r.scenario.name, r.rep, True, "nested",
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
            r.panic_l1 = False  # injected once
            failure = run_failure(r, p, b)
            st = RunStatus(r.scenario.name, r.rep, failure is None, "nested",
                           float(p.get("elapsed_s") or 0.0), accel=b.accel,
                           failure=failure, kernel=k.release)
            if reruns.again(st, r.dir, progress.log):
                left.append(r)
                continue
            _write_status(r.dir, st)
            statuses[f"{k.release}/{r.scenario.name}"].append(st)
            state = "ok" if st.ok else f"FAILED: {st.error}"
            progress.log(f"{k.release}/{r.label}: {state} ({st.elapsed_s:.0f} s)")
            progress.advance()
        if not any(b.progress.values()):  # no run started
            idle += 1
            if _lab_fault(b.accel, b.fault) and idle <= LAB_FAULT_RERUNS:  # e.g. a TCG lockup
                progress.log(f"{k.release}: L1 boot {boot} ran no run ({b.fault}); boot again")
                continue
            # another boot would do the same
            why = str(b.fault or b.exit_error or "the lab VM ran no run")
            for r in left:
                r.dir.mkdir(parents=True, exist_ok=True)
                st = RunStatus(r.scenario.name, r.rep, False, "nested", 0.0, accel=b.accel,
                               failure=RigError(f"no run started in the L1: {why}"),
                               kernel=k.release)
                _write_status(r.dir, st)
                statuses[f"{k.release}/{r.scenario.name}"].append(st)
                progress.advance()
            break
        todo = left
    return phases


def _memslot_mismatches(run_dirs: list[Path]) -> list[str]:
    """virtio-mem runs: each resize step's recorded memslot creations and
    deletions against the memslots QEMU reported (analysis.virtiomem); a
    run without reports or with a step that disagrees is a failed run."""
    from analysis.virtiomem import memslot_steps
    out = []
    for d in run_dirs:
        steps = memslot_steps(d)
        if steps.empty:
            out.append(f"{d}: no memslot reports from QEMU (needs dynamic-memslots)")
        for st in steps[~steps["ok"]].itertuples():
            out.append(f"{d}: step {st.step} to {st.requested >> 20} MiB: QEMU mapped "
                       f"+{st.added} -{st.removed} memslots, recorded +{st.created} "
                       f"-{st.deleted}")
    return out


def run_lab(cfg: LabConfig, out: Path, *, mode: str, resume: bool,
            baseline: dict[str, Any] | None, progress: Progress,
            kernels: list[str] | None = None, inject: str | None = None) -> int:
    from vmrig.host import version_text
    out.mkdir(parents=True, exist_ok=True)
    mode, why = choose_mode(mode)
    progress.log(f"mode: {mode} ({why})")
    progress.log(f"config: {cfg.source}; {len(cfg.scenarios)} scenarios; output {out}")
    statuses: dict[str, list[RunStatus]] = {}
    phases: list[dict[str, Any]] = []
    t0 = time.monotonic()
    l0_qemu = version_text() if mode == "nested" else None
    specs: dict[str, str | None] = {}
    for i, k in enumerate(_kernels(cfg, mode, kernels)):
        release = k.release if k is not None else os.uname().release
        specs[release] = k.name if k is not None else None
        todo = _plan(cfg, out, release, resume, inject if i == 0 else None, statuses,
                     progress)
        if k is not None:
            phases += _nested(k, todo, out, l0_qemu, statuses, progress)
            continue
        for r in todo:
            progress.step(f"{r.label}")
            progress.log(f"{release}/{r.label}: {r.scenario.workload} ...")
            st = run_one(r, release, r.timeout, progress.log)
            statuses[f"{release}/{r.scenario.name}"].append(st)
            state = "ok" if st.ok else f"FAILED: {st.error}"
            progress.log(f"{release}/{r.label}: {state} ({st.elapsed_s:.0f} s)")
            progress.advance()
    progress.step("analysis")
    # The host the job ran on: in nested mode the runs' manifests name the
    # lab VM (virtme-ng), not the machine a history of nights is kept for.
    summary: dict[str, Any] = {"mode": mode, "mode_reason": why, "config": cfg.source,
                               "host": {"hostname": os.uname().nodename,
                                        "kernel": os.uname().release},
                               "qemu": {"l0": l0_qemu, "rig": version_text()},
                               "runs_wall_s": round(time.monotonic() - t0, 1),
                               "phases": phases, "finished_wall": time.time(),
                               "scenarios": {}}
    def run_dir(key: str, st: RunStatus) -> Path:
        return out / "runs" / key / str(st.rep)
    corr, analysed = _analyse([run_dir(key, st) for key, sts in statuses.items()
                               for st in sts if st.ok])
    by_name = {s.name: s for s in cfg.scenarios}
    for key, sts in statuses.items():
        kernel, name = key.split("/", 1)
        per_run = [analysed[run_dir(key, st)] for st in sts if st.ok]
        good = [r for r in per_run if "error" not in r]
        failed = [f"{st.rep}: {st.error}" for st in sts if not st.ok]
        failed += [f"{r['path']}: {r['error']}" for r in per_run if "error" in r]
        if by_name[name].workload == "virtio-mem":
            failed += _memslot_mismatches([run_dir(key, st) for st in sts if st.ok])
        sc = labverdict.scenario_summary(good, failed, expect_wraps=by_name[name].wraps)
        # the kernel axis entry it ran on (lab.toml's "6.12"), which the
        # history follows across that kernel's upgrades
        sc.update(kernel=kernel, scenario=name, kernel_spec=specs.get(kernel))
        # each run's own figures, for the history dataset (recording/history.py)
        sc["run_summaries"] = [
            {k: r.get(k) for k in ("path", *labverdict.FIGURES, *labverdict.COUNTS,
                                   "wrap_invariant")} for r in good]
        sc["retried_runs"] = [
            f"{st.rep}: [{', '.join(st.retried_kinds)}] {st.retried}" for st in sts if st.retried]
        summary["scenarios"][key] = sc
    summary["kernels"] = labverdict.kernel_comparison(summary["scenarios"])
    regressions = []
    if baseline is not None:
        regressions = labverdict.compare(summary, baseline, cfg.thresholds)
        summary["regressions"] = [str(r) for r in regressions]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if corr is not None:
        import pandas as pd

        from analysis.report import write_report
        sections = []
        if rows := labverdict.kernel_rows(summary):
            sections.append((
                "Kernels side by side",
                "median over each kernel's runs; the others against the first kernel, the "
                f"difference with a {summary['kernels']['confidence']:.0%} bootstrap CI over "
                "the runs", pd.DataFrame(rows)))
        write_report(corr, out / "index.html", title=f"slotscope lab: {out.name}",
                     sections=sections)
    progress.close()
    for p in phases:
        print(f"{p['kernel']}: L1 boot {p['boot_s']} s, probes {p['load_s']} s, "
              f"{len(p['runs'])} runs, {p['wall_s']:.0f} s")
    labverdict.print_kernels(summary)
    for r in regressions:
        print(f"regression: {r}")
    for name, sc in summary["scenarios"].items():
        for r in sc["retried_runs"]:
            print(f"lab fault, run again: {name}/{r}")
        if not sc["ok"]:
            print(f"failed: {name}: {'; '.join(sc['failed_runs'])}")
    print(f"summary: {out / 'summary.json'}; report: {out / 'index.html'}")
    return labverdict.exit_code(summary, regressions)


def cmd_lab(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
        baseline = labverdict.load_baseline(args.baseline) if args.baseline else None
    except ConfigError as e:
        raise LabError(str(e)) from None
    mode = args.mode or cfg.mode
    with job_lock(Path(args.lock)):
        n_kernels = len(args.kernel or cfg.kernels) if mode != "direct" else 1
        progress = Progress(n_kernels * sum(s.repetitions for s in cfg.scenarios))
        try:
            rc = run_lab(cfg, Path(args.output), mode=mode, resume=args.resume,
                         baseline=baseline, progress=progress, kernels=args.kernel,
                         inject=args.inject_l1_panic)
        finally:
            progress.close()
    if args.history:
        changed = history_changes(Path(args.output), Path(args.history), args.history_window)
        if changed and rc == labverdict.EXIT_OK:
            rc = labverdict.EXIT_REGRESSION
    return rc


def history_changes(out: Path, dataset: Path, window: int) -> list[dict[str, Any]]:
    """Tonight's output into the history dataset; then the changes of this
    host's series whose new level began within the last ``window`` nights
    and lasted (the change-point test wants 3 nights on each side): a
    sustained change, printed.  One seen earlier stops counting once it is
    more than ``window`` nights old."""
    from analysis.history import changes
    from recording.history import ingest

    from .history import FIGURES
    # summary.json names this host (run_lab), so ingest needs no --host
    # override, which would also make the night's identity differ from a
    # plain `slotscope history ingest OUT` of the same output.
    ingest(dataset, out)
    recent = [c for c in changes(dataset, FIGURES, host=os.uname().nodename)
              if c["nights"] - c["index"] <= window]
    for c in recent:
        print(f"history: sustained change: {c['scenario']} {c['figure']} from "
              f"{c['date']}: {c['before']:g} -> {c['after']:g} (p {c['p_value']:.3f}, "
              f"kernel {c['kernel_before']} -> {c['kernel_after']})")
    return recent


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="the nightly lab run: scenario matrix, report, verdict")
    p.add_argument("--config", help="scenario matrix (TOML; default: the shipped lab.toml)")
    p.add_argument("-o", "--output", default="slotscope-lab", help="output directory")
    p.add_argument("--baseline", metavar="SUMMARY_JSON",
                   help="compare with an earlier summary.json: exit 3 on regression")
    p.add_argument("--resume", action="store_true", help="skip runs that completed before")
    p.add_argument("--history", metavar="DATASET",
                   help="ingest tonight's output into this history dataset (slotscope "
                   "history) and exit 3 on a sustained change of this host's figures")
    p.add_argument("--history-window", type=int, default=7, metavar="NIGHTS",
                   help="--history: a change counts while its new level is at most this "
                   "many nights old (default 7)")
    p.add_argument("--mode", choices=("auto", "direct", "nested"),
                   help="override the config's mode")
    p.add_argument("--kernel", action="append", metavar="SPEC",
                   help="nested mode: an L1 kernel instead of the config's kernels "
                   "(6.1, 6.12, a Debian release or a kernel image path); repeat for more")
    # The lab's fault handling, tested: the L1 panics when SCENARIO/REP starts
    # (first kernel's L1 only); the run is a lab fault, the rest go on.
    p.add_argument("--inject-l1-panic", metavar="SCENARIO/REP", help=argparse.SUPPRESS)
    p.add_argument("--lock", default=str(DEFAULT_LOCK), help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_lab)
    r = sub.add_parser("lab-run")  # internal: runs in a child or the lab VM
    r.add_argument("--plan")
    r.add_argument("--scenario")
    r.add_argument("-o", "--output")
    r.set_defaults(func=cmd_lab_run)
