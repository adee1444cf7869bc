"""Queries over a history dataset (recording/history.py), in place with an
embedded DuckDB: nothing is loaded whole, DuckDB reads the Parquet files
and prunes partitions.  The SQL is analysis/history_sql.py; this module
binds it, shapes results into rows (dicts, what ``--json`` prints) and
terminal tables under 80 columns.  duckdb is imported here only, and this
module by its callers only, so ``import analysis`` stays light.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from recording import history as fmt

from . import changepoint, history_sql
from .errors import DatasetError
from .stats import FEW_VALUES_SAMPLES, bootstrap_diff_ci

FIGURE_COLUMNS = fmt.FIGURES + fmt.COUNTS + tuple(f"run_{f}" for f in fmt.FIGURES + fmt.COUNTS)
WIDTH = 80


def _bad_file(dataset: Path) -> str | None:
    """The first file of the dataset that does not read as Parquet, and why."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    for p in sorted(dataset.rglob("*.parquet")):
        try:
            pq.ParquetFile(p).schema_arrow  # noqa: B018 - reads the footer
        except (OSError, pa.ArrowException) as e:
            return f"{p}: not a readable Parquet file ({str(e).splitlines()[0]})"
    return None


def query(dataset: str | os.PathLike[str], sql: str, figure: str = "value",
          params: dict[str, Any] | None = None, **filters: Any) -> list[dict[str, Any]]:
    """Run one of history_sql's queries over ``dataset`` with ``filters``
    (host, kernel, scenario, since, until): rows as dicts."""
    import duckdb
    root = Path(dataset)
    if figure not in FIGURE_COLUMNS:
        raise DatasetError(f"unknown figure {figure!r}: one of {', '.join(FIGURE_COLUMNS)}")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such history dataset")
    # a partition without a Parquet file yet is no data either
    if next(root.glob("*=*/**/*.parquet"), None) is None:
        raise DatasetError(f"{root}: no history data (slotscope history ingest first)")
    unknown = set(filters) - set(history_sql.FILTERS)
    if unknown:
        raise DatasetError(f"unknown filters {sorted(unknown)}")
    used = {k: str(v) for k, v in filters.items() if v is not None}
    where = " AND ".join(history_sql.FILTERS[k] for k in used) or "true"
    glob = "'" + f"{root}/*=*/**/*.parquet".replace("'", "''") + "'"
    source = history_sql.SOURCE.format(glob=glob)

    def text_with(kernel_line: str) -> str:
        return sql.format(nights=history_sql.NIGHTS.format(
            figure=figure, where=where, source=source, kernel_line=kernel_line))
    bound = {**used, **(params or {})}
    # only the parameters this text names: DuckDB refuses unused ones
    bound = {k: v for k, v in bound.items() if f"${k}" in text_with("kernel_line")}
    try:
        con = duckdb.connect()
        try:
            cur = con.execute(text_with("kernel_line"), bound)
        except duckdb.BinderException:  # no file has the column yet (version 1)
            cur = con.execute(text_with("NULL"), bound)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    except duckdb.Error as e:
        first = str(e).splitlines()[0]
        bad = _bad_file(root)
        if bad:
            raise DatasetError(bad) from None
        # the only casts of user text are --since/--until's dates
        if isinstance(e, duckdb.ConversionException) and {"since", "until"} & set(filters):
            raise DatasetError(f"--since/--until: a date YYYY-MM-DD ({first})") from None
        raise DatasetError(f"{root}: query failed: {first}") from None


# -- trend ----------------------------------------------------------------------------
def trend(dataset: str | os.PathLike[str], figure: str, every: str = "night",
          **filters: Any) -> list[dict[str, Any]]:
    """A figure per scenario x host x kernel over nights (or weeks, months,
    years: the median of each period's nights)."""
    unit = {"night": "day", "week": "week", "month": "month", "year": "year"}[every]
    return query(dataset, history_sql.TREND, figure, {"every": unit}, **filters)


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    v = float(v)
    if v != 0 and abs(v) < 1:
        return f"{v:.3g}"
    return f"{v:,.0f}"


def _table(head: Sequence[str], body: Sequence[Sequence[Any]], right_from: int) -> str:
    """Columns as wide as their widest cell, each cut to keep the line < 80."""
    cells = [[str(c) for c in head]] + [[str(c) for c in r] for r in body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    # text columns give up width (from the left) until the table fits
    for i in range(right_from):
        over = sum(widths) + 2 * (len(widths) - 1) - (WIDTH - 1)
        if over > 0:
            widths[i] = max(6, widths[i] - over)
    lines = []
    for r in cells:
        out = []
        for i, c in enumerate(r):
            c = c if len(c) <= widths[i] else c[:widths[i] - 1] + "~"
            out.append(c.ljust(widths[i]) if i < right_from else c.rjust(widths[i]))
        lines.append("  ".join(out).rstrip())
    return "\n".join(lines)


def trend_table(rows: list[dict[str, Any]], figure: str) -> str:
    if not rows:
        return f"{figure}: no nights match"
    body = [(r["scenario"], r["host"], r["kernel"], r["period"], r["nights"], _num(r["value"]),
             _num(r["low"]), _num(r["high"])) for r in rows]
    return f"{figure} (median of the nights in each period)\n" + _table(
        ("scenario", "host", "kernel", "period", "nights", "median", "low", "high"), body, 4)


# -- compare ----------------------------------------------------------------------------
def compare(dataset: str | os.PathLike[str], a: str, b: str, figure: str,
            confidence: float = 0.95, **filters: Any) -> list[dict[str, Any]]:
    """Per scenario: kernel B's median night minus kernel A's, with a
    bootstrap CI over nights (hosts pooled; --host picks one).  A scenario
    only one kernel ran is listed with what it has."""
    if not 0 < confidence < 1:
        raise DatasetError(f"--confidence {confidence}: between 0 and 1")
    got = query(dataset, history_sql.COMPARE, figure, {"a": a, "b": b}, **filters)
    by: dict[str, dict[str, list[float]]] = {}
    for r in got:
        by.setdefault(r["scenario"], {})[r["kernel"]] = [float(v) for v in r["values"]]
    out = []
    for scenario, k in sorted(by.items()):
        va, vb = k.get(a, []), k.get(b, [])
        row: dict[str, Any] = {"scenario": scenario, "figure": figure, "a": a, "b": b,
                               "a_nights": len(va), "b_nights": len(vb),
                               "a_median": float(np.median(va)) if va else None,
                               "b_median": float(np.median(vb)) if vb else None,
                               "diff": None, "ci_low": None, "ci_high": None,
                               "confidence": confidence}
        if va and vb:
            row["diff"] = row["b_median"] - row["a_median"]
            # nights resampled within each kernel; one night a side has no CI
            ci = bootstrap_diff_ci(np.asarray(va), np.asarray(vb), samples=FEW_VALUES_SAMPLES,
                                   level=confidence)
            if ci is not None:
                row["ci_low"], row["ci_high"] = ci
        out.append(row)
    return out


def compare_table(rows: list[dict[str, Any]], figure: str, a: str, b: str) -> str:
    if not rows:
        return f"{figure}: neither {a} nor {b} has nights"
    conf = rows[0]["confidence"]
    body = [(r["scenario"], f"{r['a_nights']}/{r['b_nights']}", _num(r["a_median"]),
             _num(r["b_median"]), _num(r["diff"]),
             "-" if r["ci_low"] is None else f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]")
            for r in rows]
    return (f"{figure}: B={b} minus A={a}, median night; {conf:.0%} bootstrap CI\n"
            + _table(("scenario", "nights", "A", "B", "B-A", "CI"), body, 1))


# -- changes -------------------------------------------------------------------------
def changes(dataset: str | os.PathLike[str], figures: Sequence[str], alpha: float = 0.01,
            direction: str = "up", min_segment: int = 3, permutations: int = 999,
            **filters: Any) -> list[dict[str, Any]]:
    """Per host x scenario x figure, the night its level changed, where the
    change-point test (analysis/changepoint.py) says so at false-alarm rate
    ``alpha`` per series; with the kernel and QEMU either side of it."""
    if not 0 < alpha < 1:
        raise DatasetError(f"--alpha {alpha}: between 0 and 1")
    if direction not in changepoint.DIRECTIONS:
        raise DatasetError(f"--direction {direction!r}: one of up, down, both")
    series = [(figure, s) for figure in figures
              for s in query(dataset, history_sql.SERIES, figure, **filters)]

    def test(s: dict[str, Any]) -> changepoint.Change | None:
        return changepoint.detect(s["values"], alpha, direction, min_segment, permutations)

    # Each series' test draws from its own generator (seeded alike), and
    # shuffling releases the GIL: two at a time, the same answers.
    with ThreadPoolExecutor(2) as pool:
        found = list(pool.map(test, [s for _, s in series]))
    out = []
    for (figure, s), c in zip(series, found, strict=True):
        if c is None:
            continue
        i = c.index
        out.append({"host": s["host"], "scenario": s["scenario"],
                    "kernel_line": s["kernel_line"] or None, "figure": figure,
                    "date": _iso(s["dates"][i]), "last_before": _iso(s["dates"][i - 1]),
                    "before": c.before, "after": c.after, "p_value": c.p_value,
                    "nights": len(s["values"]), "index": i,
                    "kernel_before": s["kernels"][i - 1], "kernel_after": s["kernels"][i],
                    "qemu_before": s["qemus"][i - 1], "qemu_after": s["qemus"][i]})
    return out


def _iso(d: Any) -> str:
    return d.isoformat() if isinstance(d, dt.date) else str(d)


def changes_table(rows: list[dict[str, Any]], alpha: float) -> str:
    head = f"changes at false-alarm rate {alpha:g} per series"
    if not rows:
        return f"{head}: none"
    body = []
    for r in rows:
        what = (f"{r['kernel_before']}->{r['kernel_after']}"
                if r["kernel_before"] != r["kernel_after"] else r["kernel_after"])
        if r["qemu_before"] != r["qemu_after"]:
            what += f" qemu {r['qemu_before']}->{r['qemu_after']}"
        body.append((r["host"], r["scenario"], r["figure"], r["date"], _num(r["before"]),
                     _num(r["after"]), f"{r['p_value']:.3f}", what))
    return head + "\n" + _table(("host", "scenario", "figure", "night", "before", "after",
                                 "p", "kernel"), body, 4)
