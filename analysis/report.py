"""One self-contained HTML report (plots embedded as base64 PNG, inline CSS,
no scripts or network), readable offline."""

from __future__ import annotations

import base64
import html
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recording import manifest
from recording.errors import RecordingError
from recording.reader import read_manifest

from . import plots
from .epochs import Correlation, RunSource, correlate_runs
from .frames import Recording, one_line_errors
from .summary import compare, run_summary, summary_tables

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.4em}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.missing{background:#fff6e0;border-left:4px solid #e0a000;padding:.4em .8em}
.ok{color:#2a7d2a}.bad{color:#b02020}img{max-width:100%;border:1px solid #eee}
.kv td{text-align:left}small{color:#666}
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, tuple) and len(v) == 2:
        return f"[{_fmt(v[0])}, {_fmt(v[1])}]"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(df: pd.DataFrame, max_rows: int = 50) -> str:
    if df is None or not len(df):
        return "<p><small>(no rows)</small></p>"
    extra = ""
    if len(df) > max_rows:
        extra = f"<p><small>first {max_rows} of {len(df):,} rows</small></p>"
        df = df.head(max_rows)
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>{extra}"


def _kv(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in items)
    return f'<table class="kv">{rows}</table>'


def _img(fig: Any, alt: str) -> str:
    data = base64.b64encode(plots.png_bytes(fig)).decode()
    return f'<p><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"></p>'


def _us(ns: Any) -> Any:
    return None if ns is None else ns / 1000


OVERVIEW = [("run", "run"), ("backend", "backend"), ("complete", "complete"),
            ("memslot_updates", "updates"), ("mmio_faults", "MMIO faults"),
            ("mmio_accesses", "kvm_mmio"), ("slow_share", "slow share"),
            ("update_cost_p50_ns", "cost p50 us"), ("update_cost_p99_ns", "cost p99 us"),
            ("mmio_latency_p50_ns", "lat p50 us"), ("mmio_latency_p99_ns", "lat p99 us"),
            ("zap_alls", "zap-alls"), ("wrap_invariant", "wrap invariant"),
            ("lost_events", "lost")]


def overview(summaries: Sequence[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for s in summaries:
        row = {}
        for key, label in OVERVIEW:
            v = s.get(key)
            row[label] = _us(v) if key.endswith("_ns") else v
        rows.append(row)
    return pd.DataFrame(rows)


def top_updates(corr: Correlation, run: str, n: int = 15) -> pd.DataFrame:
    """The updates that cost the most, with the faults charged to each."""
    u = corr.updates[(corr.updates["run"] == run) & corr.updates["ok"]]
    if not len(u) or u["cost_ns"].isna().all():
        return u.iloc[:0][["change"]]
    u = u.sort_values("cost_ns", ascending=False).head(n)
    t0 = int(corr.updates.loc[corr.updates["run"] == run, "begin_ns"].min())
    return pd.DataFrame({
        "update": u.index, "at_s": (u["begin_ns"].to_numpy() - t0) / 1e9,
        "change": u["change"].astype(str), "slot": u["slot_id"], "action": u["action"],
        "stale": u["n_stale"], "during": u["n_during_update"], "after_zap": u["n_after_zap"],
        "cost_us": u["cost_ns"] / 1e3, "ioctl_us": u["duration_ns"] / 1e3})


WRAP_COLUMNS = [("vm", "vm"), ("swap", "swap"), ("predicted_swap", "predicted swap"),
                ("wrap_from", "from"), ("zap_on_time", "zap-all on time"),
                ("pages_marked_before", "pages marked before"),
                ("stale_equal_pages", "equal-gen pages"), ("rebuilt_pages", "rebuilt"),
                ("evidence_faults", "faults after"), ("violations", "violations"),
                ("verdict", "verdict"), ("burst_faults", "burst faults"),
                ("burst_ns", "burst us"), ("burst_extra_ns", "burst extra us"),
                ("first_fault_p50_ns", "first fault p50 us"),
                ("fast_hit_p50_ns", "fast hit p50 us"),
                ("forecast_error_s", "forecast error s")]


def _wraps_section(wraps: pd.DataFrame, run: str, s: dict[str, Any]) -> str:
    """One row per generation wrap: its zap-all and the invariant's verdict."""
    w = wraps[wraps["run"] == run] if len(wraps) else wraps
    figure = s["wrap_invariant"]
    css = "bad" if figure == "violated" else "ok" if figure == "held" else ""
    head = (f"<h3>Generation wraps: the zap-all invariant</h3><p>invariant: "
            f'<b class="{css}">{_esc(figure)}</b> <small>(after a wrap no MMIO fault may '
            "be a fast hit on an SPTE marked before it; equal-gen pages were first "
            "touched again at their mark's masked generation, the case the zap-all "
            "exists for)</small></p>")
    if not len(w):
        return head
    t = pd.DataFrame({label: w[col].to_numpy() for col, label in WRAP_COLUMNS})
    t["vm"] = [f"{int(v):#x}" for v in w["vm"]]
    for col, label in WRAP_COLUMNS:
        if col.endswith("_ns"):
            t[label] = w[col].astype("Float64").to_numpy(np.float64, na_value=np.nan) / 1e3
    return head + _table(t, max_rows=100)


def _run_section(corr: Correlation, run: str, s: dict[str, Any],
                 tables: dict[str, pd.DataFrame]) -> str:
    m = corr.recording.manifests[run]
    host = manifest.host(m)
    parts = [f'<h2 id="{_esc(run)}">Run {_esc(run)}</h2>']
    started = manifest.start_wall(m)
    parts.append(_kv([
        ("path", s["path"]), ("host", host.get("hostname")), ("kernel", host.get("kernel")),
        ("machine", host.get("machine")), ("clocksource", host.get("clocksource")),
        ("backend", manifest.backend(m)),
        ("started", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
         if started is not None else None),
        ("duration s", s["duration_s"]), ("complete", s["complete"]),
        ("rows", ", ".join(f"{k} {v:,}" for k, v in manifest.rows(m).items())),
        ("workload", manifest.workload_name(m)),
        ("lost events", s["lost_events"]),
        ("unfinished MMIO exits", s.get("unfinished_faults")),
    ]))
    if s["missing"]:
        items = "".join(f"<li>{_esc(x)}</li>" for x in s["missing"])
        parts.append(f'<div class="missing"><b>Missing from this run</b><ul>{items}</ul></div>')
    for name, title in (("classes", "MMIO faults by class"),
                        ("cost_by_change", "Per-update cost by change type"),
                        ("cost_by_action", "Per-update cost by workload action"),
                        ("forecast", "Generation wrap forecast"),
                        ("zap_alls", "Recorded zap-alls and their cost")):
        t = tables[name]
        t = t[t["run"] == run].drop(columns=["run"]) if len(t) else t
        if name == "forecast" and len(t):
            t = t.assign(vm=[f"{int(v):#x}" for v in t["vm"]])
        if name == "zap_alls" and len(t):
            t = t[["ns", "vm", "gen", "reason", "update", "n_faults", "cost_ns"]].assign(
                vm=[f"{int(v):#x}" for v in t["vm"]])
        parts.append(f"<h3>{_esc(title)}</h3>" + _table(t))
    parts.append(_wraps_section(tables["wraps"], run, s))
    parts.append("<h3>The most expensive updates, fault by fault</h3>" +
                 _table(top_updates(corr, run), max_rows=15))
    figs = plots.figures(corr, run)
    for name, fig in figs.items():
        parts.append(_img(fig, f"{run} {name}"))
    return "\n".join(parts)


def render(corr: Correlation, title: str | None = None,
           skipped: Sequence[tuple[str, str]] = (),
           sections: Sequence[tuple[str, str, pd.DataFrame]] = ()) -> str:
    """The report's HTML; ``sections``: (heading, note, table) the caller
    adds after the overview (the lab: each figure per kernel side by side)."""
    runs = corr.recording.runs
    summaries = [run_summary(corr, r) for r in runs]
    tables = summary_tables(corr)
    title = title or ("slotscope report: " + ", ".join(runs[:4]) +
                      (f" and {len(runs) - 4} more" if len(runs) > 4 else ""))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}"
             f"</title><style>{CSS}</style></head><body><h1>{_esc(title)}</h1>",
             f"<p><small>generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
             " by slotscope analysis. Latencies in microseconds; a fault's <i>extra</i> "
             "latency is its latency minus the median fast-path hit of the same vCPU; an "
             "update's cost is the extra latency of the slow faults charged to it (stale, "
             "during the update, or after the zap-all it caused).</small></p>",
             "<h2>Overview</h2>", _table(overview(summaries)),
             "<p>" + " | ".join(f'<a href="#{_esc(r)}">{_esc(r)}</a>' for r in runs) + "</p>"]
    for heading, note, table in sections:
        parts.append(f"<h2>{_esc(heading)}</h2><p><small>{_esc(note)}</small></p>")
        parts.append(_table(table, max_rows=300))
    if skipped:
        items = "".join(f"<li>{_esc(why)}</li>" for _, why in skipped)
        parts.append(f'<div class="missing"><b>Runs not analysed</b><ul>{items}</ul></div>')
    if len(runs) > 1:
        cmp = compare(corr)
        parts.append("<h2>Comparison</h2><p><small>medians and p99 with 95% bootstrap "
                     "CIs; delta = median minus the first run's, with its CI.</small></p>")
        parts.append(_table(cmp, max_rows=300))
        parts.append(_img(plots.comparison(corr), "comparison"))
    parts += _run_sections(corr, runs, summaries, tables)
    parts.append("</body></html>")
    return "\n".join(parts)


# What forked section workers read: set just before the pool forks them, so
# they share the Correlation copy-on-write instead of receiving it pickled.
_SHARED: tuple[Correlation, list[str], list[dict[str, Any]], dict[str, pd.DataFrame]] | None \
    = None


def _section_of(i: int) -> str:
    assert _SHARED is not None
    corr, runs, summaries, tables = _SHARED
    return _run_section(corr, runs[i], summaries[i], tables)


def section_workers(n_runs: int) -> int:
    """Processes to draw ``n_runs`` runs' sections in: one per usable CPU, at
    most one per run; 1 (this process) where fork is not available."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(n_runs, len(os.sched_getaffinity(0))))


def _run_sections(corr: Correlation, runs: list[str], summaries: list[dict[str, Any]],
                  tables: dict[str, pd.DataFrame]) -> list[str]:
    """Each run's section, in order.  Their figures (three a run, ~0.3 s
    each, mostly matplotlib's ticks) were 26 s of the 40 s report of a
    32-run lab: with several cores, forked workers draw them side by side
    and the HTML is the same."""
    global _SHARED
    workers = section_workers(len(runs))
    if workers == 1:
        return [_run_section(corr, r, s, tables) for r, s in zip(runs, summaries, strict=True)]
    _SHARED = (corr, list(runs), list(summaries), tables)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_section_of, range(len(runs))))
    finally:
        _SHARED = None


def write_report(src: RunSource, out_html: str | os.PathLike[str],
                 title: str | None = None, names: Sequence[str] | None = None,
                 sections: Sequence[tuple[str, str, pd.DataFrame]] = ()) -> Path:
    """Analyse ``src`` (run dirs, a Recording or a Correlation) and write one
    self-contained HTML file; returns its path.

    Given run directories, those that cannot be read (no manifest, unknown
    schema version, ...) are listed in the report instead of failing it;
    RecordingError only when none can be read.  ``names`` label the runs.
    """
    with one_line_errors(f"report {out_html}"):
        return _write_report(src, out_html, title, names, sections)


def _write_report(src: RunSource, out_html: str | os.PathLike[str], title: str | None,
                  names: Sequence[str] | None,
                  sections: Sequence[tuple[str, str, pd.DataFrame]]) -> Path:
    skipped: list[tuple[str, str]] = []
    if isinstance(src, Correlation | Recording):
        corr = correlate_runs(src)
    else:
        paths = [src] if isinstance(src, str | os.PathLike) else list(src)
        labels = list(names) if names is not None else None
        good, good_names = [], []
        for i, p in enumerate(paths):
            try:
                read_manifest(p)
            except RecordingError as e:
                skipped.append((str(p), str(e)))
                continue
            good.append(p)
            if labels is not None:
                good_names.append(labels[i])
        if not good:
            raise RecordingError("no readable run: " + "; ".join(w for _, w in skipped))
        corr = correlate_runs(good, names=good_names if labels is not None else None)
    text = render(corr, title, skipped, sections)
    out = Path(out_html)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, out)
    except OSError as e:
        raise RecordingError(f"cannot write {out}: {e.strerror}") from None
    return out
