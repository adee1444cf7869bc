"""``slotscope history``: the nightly lab's outputs across nights and hosts.

    slotscope history ingest LAB_OUT... --into DATASET [--host NAME]
    slotscope history compact DATASET
    slotscope history trend DATASET [--figure F] [--every night|week|month]
    slotscope history compare DATASET --a KERNEL --b KERNEL [--figure F]
    slotscope history changes DATASET [--figure F] [--alpha A] [--direction up|down|both]
    slotscope history report DATASET -o history.html

ingest needs the recording layer only (recording/history.py); the queries
import analysis.history, and with it DuckDB, in their handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from recording import history as dataset_format
from recording.errors import BadLabOutput

log = logging.getLogger(__name__)
FIGURE_DEFAULT = "update_cost_p50_ns"
# The figures users ask about across nights (every figure column is accepted).
FIGURES = ("update_cost_p50_ns", "mmio_latency_p99_ns", "slow_share", "lost_events",
           "memslot_updates")
ALL_FIGURES = dataset_format.FIGURES + dataset_format.COUNTS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("history", help="the lab's outputs across nights: ingest, trend, "
                       "compare kernels, find the night a figure changed",
                       description="A Parquet dataset of nightly lab outputs, queried in "
                       "place with DuckDB.")
    hs = p.add_subparsers(dest="history_command", metavar="SUBCOMMAND", required=True)
    i = hs.add_parser("ingest", help="add lab output directories to a history dataset")
    i.add_argument("lab_outputs", nargs="+", metavar="LAB_OUT")
    i.add_argument("--into", required=True, metavar="DATASET")
    i.add_argument("--host", help="the lab host's name (default: the runs' manifests; in "
                   "nested mode those name the lab VM)")
    i.set_defaults(func=cmd_ingest)
    c = hs.add_parser("compact", help="merge each partition's files into one")
    c.add_argument("dataset", metavar="DATASET")
    c.set_defaults(func=cmd_compact)

    def query(name: str, help_: str) -> argparse.ArgumentParser:
        q = hs.add_parser(name, help=help_)
        q.add_argument("dataset", metavar="DATASET")
        q.add_argument("--host")
        q.add_argument("--scenario")
        q.add_argument("--since", metavar="YYYY-MM-DD")
        q.add_argument("--until", metavar="YYYY-MM-DD")
        q.add_argument("--json", action="store_true", help="JSON on stdout")
        return q

    t = query("trend", "a figure per scenario x kernel x host over nights")
    t.add_argument("--figure", choices=ALL_FIGURES, default=FIGURE_DEFAULT)
    t.add_argument("--kernel")
    t.add_argument("--every", choices=("night", "week", "month", "year"), default="night",
                   help="one row per period: the median of its nights")
    t.set_defaults(func=cmd_trend)
    k = query("compare", "per scenario: kernel B's figure minus kernel A's, with a "
              "bootstrap CI over nights")
    k.add_argument("--a", required=True, metavar="KERNEL")
    k.add_argument("--b", required=True, metavar="KERNEL")
    k.add_argument("--figure", choices=ALL_FIGURES, default=FIGURE_DEFAULT)
    k.add_argument("--confidence", type=float, default=0.95)
    k.set_defaults(func=cmd_compare)
    g = query("changes", "the first night a figure left its band, per host x scenario")
    g.add_argument("--figure", choices=ALL_FIGURES, action="append",
                   help=f"repeatable; default: {', '.join(FIGURES)}")
    g.add_argument("--alpha", type=float, default=0.01,
                   help="false-alarm rate per series (host x scenario x figure)")
    g.add_argument("--direction", choices=("up", "down", "both"), default="up",
                   help="up: regressions (every figure is better lower)")
    g.set_defaults(func=cmd_changes)
    r = query("report", "a self-contained HTML page: trend plots, changes")
    r.add_argument("-o", "--output", required=True, metavar="HISTORY_HTML")
    r.add_argument("--figure", choices=ALL_FIGURES, action="append")
    r.set_defaults(func=cmd_report)


def cmd_ingest(args: argparse.Namespace) -> int:
    """Every lab output is ingested or refused on its own: one bad
    directory costs one error line, not the others."""
    failed = 0
    for out in args.lab_outputs:
        try:
            got = dataset_format.ingest(args.into, out, host=args.host)
        except BadLabOutput as e:
            log.error("slotscope history ingest: error: %s", e)
            failed += 1
            continue
        if got.rows:
            print(f"{out}: night {got.night_id}: {got.rows} rows in {got.files} files")
        else:
            print(f"{out}: night {got.night_id} is in {args.into} already; nothing added")
    return 1 if failed else 0


def cmd_compact(args: argparse.Namespace) -> int:
    before, after = dataset_format.compact(args.dataset)
    print(f"{args.dataset}: {before} files -> {after}")
    return 0


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("host", "scenario", "kernel", "since", "until")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _emit(args: argparse.Namespace, rows: list[dict[str, Any]], table: str) -> None:
    if args.json:
        json.dump(rows, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        print(table)


def cmd_trend(args: argparse.Namespace) -> int:
    from analysis import history
    rows = history.trend(args.dataset, args.figure, every=args.every, **_filters(args))
    _emit(args, rows, history.trend_table(rows, args.figure))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from analysis import history
    rows = history.compare(args.dataset, args.a, args.b, args.figure,
                           confidence=args.confidence, **_filters(args))
    _emit(args, rows, history.compare_table(rows, args.figure, args.a, args.b))
    return 0


def cmd_changes(args: argparse.Namespace) -> int:
    from analysis import history
    rows = history.changes(args.dataset, args.figure or list(FIGURES), alpha=args.alpha,
                           direction=args.direction, **_filters(args))
    _emit(args, rows, history.changes_table(rows, args.alpha))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.history_report import write_history_report
    path = write_history_report(args.dataset, args.output, args.figure or list(FIGURES),
                                **_filters(args))
    print(f"report: {path}")
    return 0
