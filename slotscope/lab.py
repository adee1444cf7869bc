"""``slotscope lab``: the nightly lab run over a scenario matrix.

For every kernel, scenario and repetition: rig up, record, workload, rig
down (``slotscope lab-run``, slotscope.labrun).  In direct mode each run is
a child process with a deadline on the host, whose kernel is the only one
(slotscope.labdirect); in nested mode one lab VM boot per kernel runs all of
that kernel's runs with the probes compiled once (slotscope.labbatch).
Every run lands in ``OUT/runs/<kernel>/<scenario>/<n>/`` in the recording
format, with a ``lab-run.json`` status beside the data (slotscope.labstatus,
which also decides the lab-fault reruns); then ``OUT/summary.json`` (keyed
``<kernel>/<scenario>``, with the phase times of each L1 boot) and
``OUT/index.html`` (slotscope.labsummary).  This module holds the command,
the mode, the kernels and the plan; the lab modules are the only ones that
compose tracer, vmrig and analysis.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recording.hostfacts import FAIL
from slotscope.labprogress import Progress
from vmrig.errors import RigError

from . import labverdict
from .errors import LabError
from .labconfig import ConfigError, LabConfig, load
from .labdirect import run_direct
from .labrun import PlannedRun
from .labstatus import RunStatus, read_status
from .labsummary import print_outcome, write_summary

if TYPE_CHECKING:
    from vmrig.kernel import LabKernel

DEFAULT_LOCK = Path("/run/lock/slotscope-lab.lock")
log = logging.getLogger(__name__)


# -- mode ---------------------------------------------------------------------
def choose_mode(requested: str, kernels: Sequence[str]) -> tuple[str, str]:
    """(mode, why): direct only where the host's KVM shows MMIO SPTEs and a
    backend sees kvm_set_memslot; the nested lab VM (booting ``kernels``)
    otherwise."""
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
        row = labvm_check(kernels)
        if row.status == FAIL:
            raise LabError(f"nested lab VM unavailable: {row.detail} ({row.fix})")
        why = "requested" if requested == "nested" else "; ".join(reasons)
        return "nested", f"{why}; {row.detail}"
    return "direct", f"host KVM {caps.kvm_module} caches MMIO, backend {backend}"


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


@dataclass(frozen=True)
class Injected:
    """Faults made on purpose to test the lab's handling: each a run label."""

    l1_panic: str | None = None   # the L1 panics as the run starts
    l2_reset: str | None = None   # the run's first Linux L2 resets in its boot


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


def _plan(cfg: LabConfig, out: Path, kernel: str, resume: bool, inject: Injected,
          statuses: dict[str, list[RunStatus]], progress: Progress) -> list[PlannedRun]:
    """This kernel's runs still to do; --resume's finished ones go to ``statuses``."""
    todo = []
    for s in cfg.scenarios:
        key = f"{kernel}/{s.name}"
        statuses.setdefault(key, [])
        for rep in range(1, s.repetitions + 1):
            run_dir = out / "runs" / kernel / s.name / str(rep)
            prev = read_status(run_dir) if resume else None
            if prev is not None and prev.ok:
                progress.log(f"{key}/{rep}: done earlier, skipped (--resume)")
                statuses[key].append(prev)
                progress.advance()
                continue
            label = f"{s.name}/{rep}"
            if label == inject.l2_reset and s.guest != "linux":
                raise LabError(f"--inject-l2-reset {label}: not a Linux-guest scenario")
            todo.append(PlannedRun(s, rep, run_dir, s.run_timeout or cfg.run_timeout,
                                   panic_l1=label == inject.l1_panic,
                                   reset_l2=label == inject.l2_reset))
    return todo


def run_lab(cfg: LabConfig, out: Path, *, mode: str, resume: bool,
            baseline: dict[str, Any] | None, progress: Progress,
            kernels: list[str] | None = None, inject: Injected = Injected()) -> int:
    from vmrig.host import version_text
    out.mkdir(parents=True, exist_ok=True)
    mode, why = choose_mode(mode, kernels or list(cfg.kernels))
    if mode != "nested" and (inject.l1_panic or inject.l2_reset):
        raise LabError("injected faults need nested mode: they test the lab VM's handling")
    progress.log(f"mode: {mode} ({why})")
    progress.log(f"config: {cfg.source}; {len(cfg.scenarios)} scenarios; output {out}")
    statuses: dict[str, list[RunStatus]] = {}
    phases: list[dict[str, Any]] = []
    t0 = time.monotonic()
    l0_qemu = version_text() if mode == "nested" else None
    specs: dict[str, str | None] = {}
    chosen = _kernels(cfg, mode, kernels)
    for i, k in enumerate(chosen):
        release = k.release if k is not None else os.uname().release
        specs[release] = k.name if k is not None else None
        # faults injected on purpose: an L1 panic on the first kernel, an L2
        # reset on the last (both on one, when there is one)
        todo = _plan(cfg, out, release, resume,
                     Injected(l1_panic=inject.l1_panic if i == 0 else None,
                              l2_reset=inject.l2_reset if i == len(chosen) - 1 else None),
                     statuses, progress)
        if k is not None:
            from .labbatch import run_kernel
            phases += run_kernel(k, todo, out, l0_qemu, statuses, progress)
        else:
            run_direct(todo, release, statuses, progress)
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
    regressions = write_summary(summary, cfg, out, statuses, specs, baseline)
    progress.close()
    print_outcome(summary, regressions, out)
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
                         inject=Injected(args.inject_l1_panic, args.inject_l2_reset))
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
    # ...and the L2 of SCENARIO/REP (a Linux guest; last kernel's L1 only)
    # resets in its first boot: rerun in the same L1.
    p.add_argument("--inject-l2-reset", metavar="SCENARIO/REP", help=argparse.SUPPRESS)
    p.add_argument("--lock", default=str(DEFAULT_LOCK), help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_lab)
