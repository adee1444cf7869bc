"""``slotscope lab``: the nightly lab run over a scenario matrix.

For every scenario and repetition: rig up, record, workload, rig down, in a
child process with a deadline (``slotscope lab-run``), on the host (direct
mode) or inside the nested lab VM (nested mode); then analyse.  Every run
lands in ``OUT/runs/<scenario>/<n>/`` in the recording format, with a
``lab-run.json`` status beside the data; then ``OUT/summary.json`` and
``OUT/index.html``.  The only module that composes tracer, vmrig and analysis.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recording.errors import RecordingError
from recording.hostfacts import FAIL
from slotscope.labprogress import Progress
from vmrig.errors import GuestFault, L1Fault, RigError, read_record

from . import labverdict
from .labconfig import ConfigError, LabConfig, Scenario, load

if TYPE_CHECKING:
    from analysis.epochs import Correlation

STATUS = "lab-run.json"
DEFAULT_LOCK = Path("/run/lock/slotscope-lab.lock")
# TCG-nested L2 faults come in streaks: the pcdimm L2 of the nested lab test
# faulted on the first attempt in 3 of 5 full test runs here, in 1 of 19
# lab-runs looped in one L1.  Two reruns keep a CI run from failing on them.
LAB_FAULT_RERUNS = 2
VENV_BIN = Path(sys.executable).parent


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


def _inner_argv(s: Scenario, run_dir: Path) -> list[str]:
    return [str(VENV_BIN / "slotscope"), "lab-run", "--scenario", json.dumps(asdict(s)),
            "-o", str(run_dir)]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _lab_fault(st: RunStatus) -> bool:
    """An L1 panic or soft lockup, or an L2 guest fault the rig names, under
    TCG-emulated nesting: not the scenario's doing.  An L1 that merely hung
    (no lockup report) may have been waiting on the run itself: not rerun."""
    f = st.failure
    return st.accel == "tcg" and (
        isinstance(f, GuestFault) or (isinstance(f, L1Fault) and f.kind != "hang"))


def run_one(s: Scenario, rep: int, run_dir: Path, mode: str, timeout: float,
            log: Callable[[str], None] = print) -> RunStatus:
    """One repetition.  A run lost to a TCG-nesting fault is done again, up
    to LAB_FAULT_RERUNS times; the status keeps why, and the lost attempt's
    directory stays beside the run as ``<rep>.fault<n>``."""
    t0 = time.monotonic()
    st = _attempt(s, rep, run_dir, mode, timeout)
    why: list[str] = []
    kinds: list[str] = []
    while _lab_fault(st) and len(why) < LAB_FAULT_RERUNS:
        assert st.error is not None and st.kind is not None
        why.append(st.error)
        kinds.append(st.kind)
        log(f"{s.name}/{rep}: lab fault ({st.kind}), run again: {st.error}")
        kept = run_dir.with_name(f"{run_dir.name}.fault{len(why)}")
        shutil.rmtree(kept, ignore_errors=True)
        run_dir.rename(kept)
        st = _attempt(s, rep, run_dir, mode, timeout)
    st.retried = " | ".join(why) or None
    st.retried_kinds = kinds
    st.elapsed_s = time.monotonic() - t0
    _write_status(run_dir, st)
    return st


def _attempt(s: Scenario, rep: int, run_dir: Path, mode: str, timeout: float) -> RunStatus:
    if run_dir.exists():  # an unfinished earlier attempt: start clean
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t0 = time.monotonic()
    accel = None
    failure: RigError | RunFailed | None
    if mode == "nested":
        from vmrig.labvm import run_in_labvm
        res = run_in_labvm(_inner_argv(s, run_dir), timeout=timeout, outdir=run_dir,
                           echo=False)
        accel = res.accel
        failure = res.fault()
        if failure is None and res.returncode != 0:
            log = run_dir / "labvm" / "console.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            # The command's own last words, not the L1 kernel's printk lines.
            tail = _last_line("\n".join(ln for ln in text.splitlines()
                                         if not ln.startswith("[")))
            failure = _exited(run_dir, res.returncode, tail)
    else:
        failure = _run_child(_inner_argv(s, run_dir), run_dir, timeout)
    return RunStatus(s.name, rep, failure is None, mode, time.monotonic() - t0,
                     accel=accel, failure=failure)


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
    from . import labrun
    try:
        scenario = Scenario(**json.loads(args.scenario))
    except (ValueError, TypeError) as e:
        raise LabError(f"bad --scenario: {e}") from None
    labrun.run_direct(scenario, Path(args.output))
    return 0


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


def run_lab(cfg: LabConfig, out: Path, *, mode: str, resume: bool,
            baseline: dict[str, Any] | None, progress: Progress) -> int:
    out.mkdir(parents=True, exist_ok=True)
    mode, why = choose_mode(mode)
    progress.log(f"mode: {mode} ({why})")
    progress.log(f"config: {cfg.source}; {len(cfg.scenarios)} scenarios; output {out}")
    statuses: dict[str, list[RunStatus]] = {}
    for s in cfg.scenarios:
        statuses[s.name] = []
        for rep in range(1, s.repetitions + 1):
            run_dir = out / "runs" / s.name / str(rep)
            prev = _read_status(run_dir) if resume else None
            if prev is not None and prev.ok:
                progress.log(f"{s.name}/{rep}: done earlier, skipped (--resume)")
                statuses[s.name].append(prev)
                progress.advance()
                continue
            progress.step(f"{s.name} {rep}/{s.repetitions}")
            progress.log(f"{s.name}/{rep}: {s.workload} ...")
            st = run_one(s, rep, run_dir, mode, s.run_timeout or cfg.run_timeout,
                         progress.log)
            statuses[s.name].append(st)
            state = "ok" if st.ok else f"FAILED: {st.error}"
            progress.log(f"{s.name}/{rep}: {state} ({st.elapsed_s:.0f} s)")
            progress.advance()
    progress.step("analysis")
    # The host the job ran on: in nested mode the runs' manifests name the
    # lab VM (virtme-ng), not the machine a history of nights is kept for.
    summary: dict[str, Any] = {"mode": mode, "mode_reason": why, "config": cfg.source,
                               "host": {"hostname": os.uname().nodename,
                                        "kernel": os.uname().release},
                               "finished_wall": time.time(), "scenarios": {}}
    corr, analysed = _analyse([out / "runs" / name / str(st.rep)
                               for name, sts in statuses.items() for st in sts if st.ok])
    wraps = {s.name: s.wraps for s in cfg.scenarios}
    for name, sts in statuses.items():
        per_run = [analysed[out / "runs" / name / str(st.rep)] for st in sts if st.ok]
        good = [r for r in per_run if "error" not in r]
        failed = [f"{st.rep}: {st.error}" for st in sts if not st.ok]
        failed += [f"{r['path']}: {r['error']}" for r in per_run if "error" in r]
        summary["scenarios"][name] = labverdict.scenario_summary(
            good, failed, expect_wraps=wraps[name])
        # each run's own figures, for the history dataset (recording/history.py)
        summary["scenarios"][name]["run_summaries"] = [
            {k: r.get(k) for k in ("path", *labverdict.FIGURES, *labverdict.COUNTS,
                                   "wrap_invariant")} for r in good]
        summary["scenarios"][name]["retried_runs"] = [
            f"{st.rep}: [{', '.join(st.retried_kinds)}] {st.retried}" for st in sts if st.retried]
    regressions = []
    if baseline is not None:
        regressions = labverdict.compare(summary, baseline, cfg.thresholds)
        summary["regressions"] = [str(r) for r in regressions]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if corr is not None:
        from analysis.report import write_report
        write_report(corr, out / "index.html", title=f"slotscope lab: {out.name}")
    progress.close()
    for r in regressions:
        print(f"regression: {r}")
    for name, s in summary["scenarios"].items():
        for r in s["retried_runs"]:
            print(f"lab fault, run again: {name}/{r}")
        if not s["ok"]:
            print(f"failed: {name}: {'; '.join(s['failed_runs'])}")
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
        progress = Progress(sum(s.repetitions for s in cfg.scenarios))
        try:
            rc = run_lab(cfg, Path(args.output), mode=mode, resume=args.resume,
                         baseline=baseline, progress=progress)
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
    p.add_argument("--lock", default=str(DEFAULT_LOCK), help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_lab)
    r = sub.add_parser("lab-run")  # internal: one run, in a child or the lab VM
    r.add_argument("--scenario", required=True)
    r.add_argument("-o", "--output", required=True)
    r.set_defaults(func=cmd_lab_run)
