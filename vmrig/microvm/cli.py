"""``python -m vmrig.microvm``: run the micro-VMM, print or store its ground truth."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from vmrig.microvm.changes import parse_schedule
from vmrig.microvm.errors import BadRequest, MicroVMError
from vmrig.microvm.guest import ACCESSES, MAX_PAGES
from vmrig.microvm.native import library
from vmrig.microvm.truth import Result, write_workload
from vmrig.microvm.vmm import run
from vmrig.microvm.wrap import WRAP_CHANGES, WrapResult, WrapRun, write_wrap_workload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vmrig.microvm",
        description="A micro-VMM on /dev/kvm: exact memslot changes while a vCPU touches MMIO.")
    p.add_argument("--mmio-accesses", "-n", type=int, default=0, metavar="M",
                   help="stop after M MMIO exits (accesses with --coalesced)")
    p.add_argument("--duration", "-d", type=float, default=0.0, help="or stop after S seconds")
    p.add_argument("--pages", type=int, default=2, help=f"distinct MMIO pages (2..{MAX_PAGES})")
    p.add_argument("--access", choices=ACCESSES, help="default rw (write with --coalesced)")
    p.add_argument("--coalesced", action="store_true",
                   help="writes only, most completed in the kernel through a coalesced MMIO "
                   "ring (no exit to user space): >=100k accesses/s")
    p.add_argument("--native", action="store_true",
                   help="run the exit loop in C (vmrig/microvm/exitloop.c, built with cc): "
                   "the highest exit rate the host allows, the same ground truth")
    p.add_argument("--guest-spin", type=int, default=0, metavar="N",
                   help="the guest busy-loops N iterations after each access (0..65535): "
                   "a guest that computes between accesses, at a lower access rate")
    p.add_argument("--schedule", default="",
                   help="e.g. create:1,flags_only:1,move:1,delete:1 ('flags' = flags_only)")
    p.add_argument("--every", type=int, default=0, help="MMIO exits between changes")
    p.add_argument("--slot-size", type=int, default=0x100000, help="bytes per extra slot")
    p.add_argument("--vcpus", type=int, default=1,
                   help="vCPUs (threads 'CPU n/KVM'), sharing the MMIO accesses")
    p.add_argument("--wrap", type=int, default=0, metavar="K",
                   help="the generation-wrap workload instead (vmrig/microvm/wrap.py): "
                   "page set A marked, then K wraps' worth of memslot swaps, then A touched")
    p.add_argument("--wrap-change", default="flags_only", choices=WRAP_CHANGES,
                   help="--wrap: the change repeated on the dummy slot (flags_only: one "
                   "swap each, move: two)")
    p.add_argument("--touch-every", type=int, default=4096, metavar="SWAPS",
                   help="--wrap: touch page set B every SWAPS swaps")
    p.add_argument("--wait", action="store_true",
                   help="print 'ready PID' and wait for a line on stdin before starting")
    p.add_argument("--wait-created", action="store_true",
                   help="as --wait, but once the VM, its memslot and vCPUs exist: a VM "
                   "that was running before a tracer attached")
    p.add_argument("-o", "--output", help="write the JSON ground truth here (default stdout)")
    p.add_argument("--run-dir", help="also write workload.json + workload.parquet into this "
                   "run directory (e.g. the one `slotscope record` writes)")
    return p


def _ready() -> None:
    """--wait: say so, then wait for a line on stdin."""
    print(f"ready {os.getpid()}", flush=True)
    sys.stdin.readline()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sched = parse_schedule(args.schedule)
        if args.wrap and args.wait_created:
            raise BadRequest("--wait-created is for the MMIO loop, not --wrap")
        if args.wrap:
            wrap: WrapRun | None = WrapRun(args.wrap, args.pages, args.wrap_change,
                                           args.touch_every)
        elif args.mmio_accesses <= 0 and args.duration <= 0:
            raise BadRequest("give --mmio-accesses M, --duration S or --wrap K")
        else:
            wrap = None
        if args.run_dir:  # before the run, not after it: a bad path costs nothing
            try:
                Path(args.run_dir).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BadRequest(f"--run-dir {args.run_dir}: {e.strerror}") from None
        if args.native:  # built and loaded now: the run's clock starts at "go"
            library()
        if args.wait:
            _ready()
        r: Result | WrapResult
        if wrap is not None:
            r = wrap.run()
        else:
            r = run(args.mmio_accesses, args.pages, sched, args.every, args.access,
                    args.duration, args.slot_size, args.vcpus, args.coalesced, args.native,
                    args.guest_spin, _ready if args.wait_created else None)
    except MicroVMError as e:
        # print, not logging: a separate entry point (run as a child by the
        # tests and the lab, which read this one line) with no status lines;
        # vmrig sets no handlers and cannot use slotscope's logsetup.
        # stdout stays data: "ready PID", the JSON ground truth.
        print(f"microvm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    text = json.dumps(r.as_dict(), indent=1)
    try:
        if args.run_dir:
            if isinstance(r, WrapResult):
                write_wrap_workload(args.run_dir, r)
            else:
                write_workload(args.run_dir, r)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text + "\n")
        else:
            print(text)
    except OSError as e:
        print(f"microvm: error: cannot write the results: {e}", file=sys.stderr)
        return 1
    return 0
