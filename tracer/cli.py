"""``slotscope record | stream | live``: the tracer's commands."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from . import TracerError

# Status lines (attached, the final tally): INFO on stderr once the slotscope
# command's composition root (slotscope/logsetup.py) gives them a handler;
# silent when these functions are used in-process.
log = logging.getLogger(__name__)

EVENTS = ("memslot_update", "generation", "mmio_fault", "mmio_access", "zap_all",
          "exit_hist", "mmio_hist", "lost")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--pid", type=int, action="append", default=[], metavar="PID",
                   help="trace only this VMM process (all its threads); repeatable")
    p.add_argument("--backend", choices=("kprobe", "kfunc", "tracepoint"),
                   help="attach backend (default: the best this host supports)")
    p.add_argument("--no-mmio-access", dest="emit_mmio", action="store_false",
                   help="do not stream kvm_mmio rows (high volume)")
    p.add_argument("--aggregate", action="store_true",
                   help="count MMIO faults in kernel histograms (mmio_hist, per "
                   "interval) instead of a row each; implies --no-mmio-access")
    p.add_argument("--ebpf", action="store_true",
                   help="print the BPF C program this command would load, and exit")


def register(sub: Any) -> None:
    p = sub.add_parser("record", help="record KVM memslot/MMIO events to a run directory",
                       description="Record until Ctrl-C/SIGTERM, -d SECONDS, or all -p "
                       "processes exit.")
    _common(p)
    p.add_argument("-d", "--duration", type=float, help="stop after SECONDS")
    p.add_argument("-o", "--output", metavar="RUN_DIR", help="required")
    p.add_argument("--flush-interval", type=float, default=1.0, metavar="S")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("stream", help="stream events as JSON lines on stdout")
    _common(p)
    p.add_argument("-d", "--duration", type=float, help="stop after SECONDS")
    p.add_argument("-e", "--event", action="append", choices=EVENTS,
                   help="only these event types; repeatable")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("live", help="top-like view per VM and vCPU")
    _common(p)
    p.add_argument("interval", nargs="?", type=float, default=1.0)
    p.add_argument("count", nargs="?", type=int, default=0, help="number of updates (0: forever)")
    p.set_defaults(func=cmd_live)


def _check(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise TracerError("needs root (loading BPF programs needs CAP_BPF and CAP_PERFMON)")
    if getattr(args, "duration", None) is not None and args.duration <= 0:
        raise TracerError("duration must be positive")


def _print_ebpf(args: argparse.Namespace) -> int:
    """--ebpf: the program text, defines included, for whoever debugs it."""
    from .loader import pick_backend, program_source
    from .procfs import resolve_pids
    caps, choice = pick_backend(args.backend)
    print(program_source(choice.name, caps, resolve_pids(args.pid),
                         args.emit_mmio, args.aggregate))
    return 0


def _recorder(args: argparse.Namespace, run_dir: str | None, sinks: list[Any],
              flush: float = 1.0) -> Any:
    from .recorder import Recorder
    return Recorder(run_dir, pids=args.pid, backend=args.backend, emit_mmio=args.emit_mmio,
                    flush_interval=flush, sinks=sinks, stop_when_pids_exit=bool(args.pid),
                    aggregate=args.aggregate)


def cmd_record(args: argparse.Namespace) -> int:
    _check(args)
    if args.ebpf:
        return _print_ebpf(args)
    if not args.output:
        raise TracerError("record needs -o RUN_DIR")
    if args.flush_interval <= 0 or args.flush_interval > 1:
        raise TracerError("flush interval must be in (0, 1] seconds")
    rec = _recorder(args, args.output, [], args.flush_interval)
    # Outside the signal block: Ctrl-C still aborts a compile (minutes in a TCG L1).
    rec.start()
    with rec.stopped_by_signals():
        _attached(rec, "record")
        how = "interrupted"
        try:
            rec.run(args.duration)
            if not rec.stop_requested:
                gone = args.pid and not rec.targets_alive()
                how = "targets exited" if gone else "duration"
        finally:
            rec.close(stop_reason=how)
    total = sum(v for k, v in rec.counts.items() if k not in ("lost", "exit_hist", "mmio_hist"))
    lost = sum(rec.lost.values())
    agg = (f", {rec.aggregated_faults} MMIO faults in histograms" if rec.aggregate else "")
    log.info("slotscope record: %s; %s events%s, %s lost", how, total, agg, lost)
    return 0


def _live_screen(stack: contextlib.ExitStack) -> Callable[[list[str]], None]:
    """A terminal: one screen, redrawn each interval."""
    from rich.live import Live
    from rich.text import Text
    live = stack.enter_context(Live(Text("waiting..."), auto_refresh=False,
                                    transient=False))
    return lambda lines: live.update(Text("\n".join(lines)), refresh=True)


def _live_lines(lines: list[str]) -> None:
    """A pipe or file: a timestamp line, then the interval's lines."""
    print(time.strftime("%H:%M:%S"), flush=False)
    print("\n".join(lines), flush=True)


def _attached(rec: Any, what: str) -> None:
    m = rec.manifest
    mode = ", aggregate" if m.get("mode") == "aggregate" else ""
    # Tests and the lab wait for this line ("backend") before they start a
    # workload: the handler flushes each record.
    log.info("slotscope %s: %s backend (%s%s), %s probes, pids %s", what, m["backend"],
             m["buffer"], mode, len(m["probes_attached"]), m["filters"]["pids"] or "all")


def cmd_stream(args: argparse.Namespace) -> int:
    _check(args)
    if args.ebpf:
        return _print_ebpf(args)
    from .sinks import JsonLines
    sink = JsonLines(sys.stdout, set(args.event) if args.event else None)
    rec = _recorder(args, None, [sink])
    rec.start()
    with rec.stopped_by_signals():
        _attached(rec, "stream")
        try:
            rec.run(args.duration)
        finally:
            rec.close()
    return 0


def cmd_live(args: argparse.Namespace) -> int:
    _check(args)
    if args.ebpf:
        return _print_ebpf(args)
    if args.interval <= 0 or args.count < 0:
        raise TracerError("interval must be positive and count >= 0")
    from .sinks import LiveStats
    stats = LiveStats()
    rec = _recorder(args, None, [stats], min(1.0, args.interval))
    rec.start()
    with rec.stopped_by_signals(), contextlib.ExitStack() as stack:
        stack.callback(rec.close)
        _attached(rec, "live")
        show = _live_screen(stack) if sys.stdout.isatty() else _live_lines
        shown = 0
        while (not args.count or shown < args.count) and not rec.stop_requested:
            t0 = time.monotonic()
            rec.run(args.interval)
            show(stats.take(time.monotonic() - t0))
            shown += 1
            if args.pid and not rec.targets_alive():
                break
    return 0
