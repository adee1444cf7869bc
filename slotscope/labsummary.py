"""The lab job's outputs once its runs are done: every completed run analysed
once (one correlation for ``summary.json`` and the report alike), the
per-scenario verdicts (slotscope.labverdict), ``OUT/summary.json``,
``OUT/index.html`` and the closing lines on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recording.errors import RecordingError

from . import labverdict
from .labconfig import LabConfig
from .labstatus import RunStatus

if TYPE_CHECKING:
    from analysis.epochs import Correlation


def analyse(run_dirs: list[Path]) -> tuple[Correlation | None, dict[Path, dict[str, Any]]]:
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


def runs_without_updates(run_dirs: list[Path]) -> list[str]:
    """pc-dimm and dirty-log runs whose workload made no memslot update the
    probes saw: a guest KVM did not run (a TCG fallback makes no memslots)
    or probes that missed KVM.  A failed run, never a quiet pass."""
    from recording.reader import read_table
    out = []
    for d in run_dirs:
        acts = read_table(d, "workload").column("begin_ns").to_numpy()
        upd = read_table(d, "memslot_update").column("begin_ns").to_numpy()
        if not len(acts) or not (upd >= acts.min()).any():
            out.append(f"{d}: no memslot update recorded during its workload "
                       "(was the guest run by KVM?)")
    return out


def write_summary(summary: dict[str, Any], cfg: LabConfig, out: Path,
                  statuses: dict[str, list[RunStatus]], specs: dict[str, str | None],
                  baseline: dict[str, Any] | None) -> list[labverdict.Regression]:
    """Complete ``summary`` (the job's own fields: mode, host, phases...) with
    each ``<kernel>/<scenario>`` of ``statuses``, the kernel comparison and
    the regressions against ``baseline``; write summary.json and, if any run
    could be analysed, index.html.  The regressions."""
    def run_dir(key: str, st: RunStatus) -> Path:
        return out / "runs" / key / str(st.rep)
    corr, analysed = analyse([run_dir(key, st) for key, sts in statuses.items()
                              for st in sts if st.ok])
    by_name = {s.name: s for s in cfg.scenarios}
    for key, sts in statuses.items():
        kernel, name = key.split("/", 1)
        per_run = [analysed[run_dir(key, st)] for st in sts if st.ok]
        good = [r for r in per_run if "error" not in r]
        failed = [f"{st.rep}: {st.error}" for st in sts if not st.ok]
        failed += [f"{r['path']}: {r['error']}" for r in per_run if "error" in r]
        done = [run_dir(key, st) for st in sts if st.ok]
        if by_name[name].workload == "virtio-mem":
            failed += _memslot_mismatches(done)
        elif by_name[name].workload in ("hotplug", "dirty-log"):
            failed += runs_without_updates(done)
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
    return regressions


def print_outcome(summary: dict[str, Any], regressions: list[labverdict.Regression],
                  out: Path) -> None:
    """The closing lines: each L1 boot, the kernels, regressions, reruns, failures."""
    for p in summary["phases"]:
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
