"""``slotscope history report``: one self-contained HTML page over a history
dataset: per figure and scenario a trend plot (a line per host x kernel,
the nights a change was found marked), the changes table, and the latest
nights.  PNGs embedded base64, inline CSS, no scripts (as analysis/report.py).
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from . import history

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}small{color:#666}
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode()


def _plot(figure: str, scenario: str, rows: list[dict[str, Any]],
          marks: list[dict[str, Any]]) -> str:
    """One scenario's nights of one figure: a line per host x kernel."""
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax = fig.add_subplot()
    lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault((r["host"], r["kernel"]), []).append(r)
    for (host, kernel), rs in sorted(lines.items()):
        ax.plot([r["period"] for r in rs], [r["value"] for r in rs], marker=".",
                label=f"{host} {kernel}")
    for m in marks:
        import datetime as dt
        ax.axvline(dt.date.fromisoformat(m["date"]), color="#b02020", linestyle="--",
                   linewidth=1)
    ax.set_title(f"{scenario}: {figure}", fontsize=10)
    ax.grid(alpha=.3)
    ax.legend(fontsize=7, loc="best")
    return (f'<p><img alt="{_esc(scenario)} {_esc(figure)}" '
            f'src="data:image/png;base64,{_png(fig)}"></p>')


def _table(head: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    if not body:
        return "<p><small>(none)</small></p>"
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    tr = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{th}</tr>{tr}</table>"


def write_history_report(dataset: str | os.PathLike[str], output: str | os.PathLike[str],
                         figures: Sequence[str], alpha: float = 0.01,
                         **filters: Any) -> Path:
    out = Path(output)
    found = history.changes(dataset, figures, alpha=alpha, **filters)
    parts = [f"<h1>slotscope history: {_esc(dataset)}</h1>",
             f"<p><small>written {time.strftime('%Y-%m-%d %H:%M:%S')}; change-point test "
             f"at false-alarm rate {alpha:g} per host x scenario x figure "
             "(analysis/changepoint.py); dashed lines mark the first night of a "
             "new level</small></p>",
             "<h2>Changes</h2>",
             _table(("host", "scenario", "figure", "night", "before", "after", "p",
                     "kernel before", "kernel after"),
                    [(c["host"], c["scenario"], c["figure"], c["date"],
                      f"{c['before']:,.4g}", f"{c['after']:,.4g}", f"{c['p_value']:.3f}",
                      c["kernel_before"], c["kernel_after"]) for c in found])]
    for figure in figures:
        rows = history.trend(dataset, figure, **filters)
        parts.append(f"<h2>{_esc(figure)}</h2>")
        if not rows:
            parts.append("<p><small>(no nights with this figure)</small></p>")
        for scenario in sorted({r["scenario"] for r in rows}):
            mine = [r for r in rows if r["scenario"] == scenario]
            marks = [c for c in found if c["figure"] == figure and c["scenario"] == scenario]
            parts.append(_plot(figure, scenario, mine, marks))
            last = sorted(mine, key=lambda r: r["period"])[-5:]
            parts.append(_table(("host", "kernel", "night", figure),
                                [(r["host"], r["kernel"], r["period"], f"{r['value']:,.4g}")
                                 for r in last]))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>slotscope history"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page)
    os.replace(tmp, out)
    return out
