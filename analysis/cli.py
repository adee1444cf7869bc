"""``slotscope analyze`` and ``slotscope report``.

pandas and matplotlib are imported by the handlers only, so registering
these commands costs nothing for the others.

Both correlate in this process unless given ``--scheduler ADDRESS`` (a
running Dask cluster) or ``--workers N|auto`` (a LocalCluster of N worker
processes, ``auto`` one per core, started for the command): a cluster costs
seconds to start, which pays only for many or large runs, so it is never
chosen behind the user's back.  ``analyze`` there has the workers reduce
the runs to their figures (analysis/reduce.py); ``report`` and ``--plots``
draw from every row, so they merge the runs' frames in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

WIDTH = 80
WRAP_LINES = 10  # wraps listed one per line; the rest counted (all in --json)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="summarize run directories: what each memslot "
                       "update cost MMIO",
                       description="Correlate memslot generations with MMIO faults in "
                       "one or more run directories and print the summary (< 80 columns).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--plots", metavar="DIR", help="also write the plots (PNG and SVG) here")
    _cluster_options(p)
    p.set_defaults(func=cmd_analyze)
    r = sub.add_parser("report", help="write a self-contained HTML report",
                       description="One offline HTML file with the manifests, tables and "
                       "plots of the runs, and a comparison when given several.")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR")
    r.add_argument("-o", "--output", required=True, metavar="REPORT_HTML")
    r.add_argument("--title")
    _cluster_options(r)
    r.set_defaults(func=cmd_report)


def _workers(v: str) -> int:
    if v == "auto":
        return os.cpu_count() or 1
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v!r}: a number of workers (1 or more) or 'auto'")
    return n


def _cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="correlate the runs on this Dask cluster (tcp://HOST:8786), one "
                   "task per run; its workers read the run directories by these paths")
    g.add_argument("--workers", metavar="N", type=_workers,
                   help="correlate the runs on a local Dask cluster of N worker processes "
                   "('auto': one per core); default: in this process")


def _guard(fn: Any, *a: Any) -> Any:
    """Analysis bugs become one-line errors too (SLOTSCOPE_DEBUG=1 re-raises)."""
    from .frames import one_line_errors
    with one_line_errors("analysis"):
        return fn(*a)


def _load(runs: list[str], args: argparse.Namespace | None = None) -> Any:
    """Load and correlate, here or on a Dask cluster; a run without trace
    events is an error here (EmptyRun), while summaries and reports list it
    as missing data."""
    if args is not None and (args.scheduler or args.workers):
        from .cluster import correlate_cluster
        return correlate_cluster(runs, scheduler=args.scheduler, workers=args.workers,
                                 check_events=True)
    from .epochs import correlate_runs
    from .frames import load, require_events
    rec = load(runs)
    require_events(rec)
    return correlate_runs(rec)


def _num(v: Any, scale: float = 1.0, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    v = v / scale
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _wrap(text: str, indent: str = "  ") -> list[str]:
    import textwrap
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False)


def format_summary(s: dict[str, Any]) -> list[str]:
    """One run as terminal lines, none wider than 80 columns."""
    lines = [f"run {s['run']}  backend {s.get('backend') or '?'}  "
             f"kernel {s.get('kernel') or '?'}"[:WIDTH]]
    if s.get("hostname"):
        lines[0] = (lines[0] + f"  host {s['hostname']}")[:WIDTH]
    state = "complete" if s["complete"] else "NOT finalized"
    lines.append(f"  {state}, {s['duration_s']:.3g} s, lost events {s['lost_events']:,}")
    by = ", ".join(f"{k} {v}" for k, v in s["updates_by_change"].items())
    lines += _wrap(f"memslot updates {s['memslot_updates']:,}"
                   + (f" ({by})" if by else "")
                   + (f", {s['failed_updates']} failed" if s["failed_updates"] else ""))
    cut = s.get("unfinished_faults") or 0  # a vCPU thread's last exit, cut short
    lines += _wrap(f"MMIO faults {s['mmio_faults']:,}"
                   + (f" (+{cut} unfinished)" if cut else "") + "  kvm_mmio accesses "
                   f"{s['mmio_accesses']:,}  slow {_num(s['slow_share'], pct=True)}  "
                   f"charged to updates {_num(s['caused_share'], pct=True)}")
    if s["classes"]:
        lines.append(f"  {'class':<14}{'faults':>10}{'share':>8}{'p50 us':>10}{'p99 us':>10}")
        for c, v in s["classes"].items():
            lines.append(f"  {c:<14}{v['n']:>10,}{_num(v['share'], pct=True):>8}"
                         f"{_num(v['latency_p50_ns'], 1e3):>10}"
                         f"{_num(v['latency_p99_ns'], 1e3):>10}")
        lines.append(f"  MMIO latency p50 {_num(s['mmio_latency_p50_ns'], 1e3)} us, "
                     f"p99 {_num(s['mmio_latency_p99_ns'], 1e3)} us")
    if s.get("cost_by_change"):
        lines.append(f"  {'change':<12}{'updates':>9}{'slow':>8}{'cost p50 us':>13}"
                     f"{'cost p99 us':>13}{'ioctl p50 us':>14}")
        for r in s["cost_by_change"]:
            lines.append(f"  {r['change']:<12}{r['updates']:>9,}{_num(r['slow_faults']):>8}"
                         f"{_num(r['cost_p50_us']):>13}{_num(r['cost_p99_us']):>13}"
                         f"{_num(r['duration_p50_us']):>14}")
    if s["update_cost_p50_ns"] is not None:
        lines.append(f"  per-update cost p50 {_num(s['update_cost_p50_ns'], 1e3)} us, "
                     f"p99 {_num(s['update_cost_p99_ns'], 1e3)} us (extra MMIO latency)")
    if s["zap_alls"]:
        cost = s["zap_all_cost_ns"]
        lines.append(f"  zap-alls {s['zap_alls']} ({s['zap_all_wraps']} wraps)" +
                     (f", cost {_num(cost, 1e3)} us of extra MMIO latency"
                      if cost is not None else ""))
    lines += format_wraps(s)
    for f in s["forecast"]:
        eta = f.get("next_zap_all_s")
        per = f.get("wrap_period_s")
        when = (f"next in {_num(eta)} s" if eta is not None
                else f"every {_num(per)} s" if per is not None else "never at this rate")
        lines += _wrap(f"wrap: VM {f['vm']:#x} {_num(f['updates_per_s'])} updates/s, "
                       f"{f['gen_bits']}-bit MMIO gen ({f['gen_from']}): zap-all {when}")
    for m in s["missing"]:
        lines += _wrap("missing: " + m)
    return lines


def format_wraps(s: dict[str, Any]) -> list[str]:
    """The wrap invariant: one line per generation wrap with its verdict
    (a violation's text may continue on a second line)."""
    wraps = s.get("wraps") or []
    if not wraps:
        return []
    lines = [f"  wrap invariant: {s['wrap_invariant']} ({len(wraps)} generation "
             f"wrap{'s' if len(wraps) > 1 else ''}, zap-all checked per wrap)"]
    several = len({w["vm"] for w in wraps}) > 1
    zap = {True: "zap-all on time", False: "NO zap-all in its update", None: "zap-all ?"}
    for w in wraps[:WRAP_LINES]:
        vm = f" vm {w['vm']:#x}" if several else ""
        # Held: whether the case the zap-all exists for came up (pages first
        # touched again at their mark's masked generation) and the rebuild.
        detail = (f"; equal-gen pages {w['stale_equal_pages']}/{w['pages_marked_before']}, "
                  f"burst {w['burst_faults']}") if w["verdict"] == "held" else ""
        lines += _wrap(f"wrap at swap {w['swap']:,}{vm}: {w['verdict']}; "
                       f"{zap[w['zap_on_time']]}{detail}")
    if len(wraps) > WRAP_LINES:
        held = sum(w["verdict"] == "held" for w in wraps[WRAP_LINES:])
        lines.append(f"  ... {len(wraps) - WRAP_LINES} more wraps, {held} held")
    return lines


def format_comparison(cmp: Any) -> list[str]:
    lines = ["comparison (95% bootstrap CIs; delta vs the first run)",
             f"  {'run':<14}{'metric':<13}{'p50 us':>8}{'CI':>17}{'delta':>8}{'CI':>17}"]

    def ci(v: Any) -> str:  # no thousands separators inside the brackets
        return "-" if v is None else "[" + ",".join(
            f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}" for x in v) + "]"

    for r in cmp.to_dict("records"):
        if not r["n"]:
            continue
        lines.append(f"  {str(r['run'])[:13]:<14}{r['metric']:<13}{_num(r['p50_us']):>8}"
                     f"{ci(r['p50_ci_us']):>17}{_num(r['p50_delta_us']):>8}"
                     f"{ci(r['p50_delta_ci_us']):>17}")
    return lines


def _analysis(args: argparse.Namespace) -> tuple[Any, Any]:
    """The runs' summaries and comparison (analysis/reduce.py) and, where
    plots are asked for, the Correlation they are drawn from.  On a cluster
    without plots the workers reduce the runs and only the figures travel."""
    from .reduce import analyze
    if (args.scheduler or args.workers) and not args.plots:
        from .cluster import analyze_cluster
        return analyze_cluster(args.runs, scheduler=args.scheduler, workers=args.workers,
                               check_events=True), None
    corr = _load(args.runs, args)
    return analyze(corr), corr


def _analyze(args: argparse.Namespace) -> int:
    an, corr = _analysis(args)
    if args.plots:
        from . import plots
        os.makedirs(args.plots, exist_ok=True)
        for run in corr.recording.runs:
            for name, fig in plots.figures(corr, run).items():
                plots.save(fig, os.path.join(args.plots, f"{run.replace('/', '_')}-{name}"))
    if args.json:
        json.dump(an.to_json(), sys.stdout, indent=1)
        print()
        return 0
    out: list[str] = []
    for s in an.summaries:
        out += format_summary(s) + [""]
    if an.comparison is not None:
        out += format_comparison(an.comparison)
    print("\n".join(out).rstrip())
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    return _guard(_analyze, args)


def _report(args: argparse.Namespace) -> int:
    from .report import write_report
    out = write_report(_load(args.runs, args), args.output, title=args.title)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    return _guard(_report, args)
