#!/usr/bin/env python3
"""Rig figures: guest boot time and pc-dimm cycle / DEVICE_DELETED latency.

    .venv/bin/python bench/rig_hotplug.py [--cycles N] [--accel kvm,tcg] [--linux]

Prints one line per (guest, accel): boot seconds, then median/p95/max of the
plug (object-add .. device_add reply), unplug (device_del .. DEVICE_DELETED)
and whole-cycle times in ms.  Timings on a shared host are noisy: compare
runs made back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmrig import RigError  # noqa: E402
from vmrig.config import MiB, RigConfig  # noqa: E402
from vmrig.rig import Rig  # noqa: E402
from vmrig.workloadlog import WorkloadLog  # noqa: E402
from vmrig.workloads import hotplug_cycles  # noqa: E402


def stats_ms(values: list[float]) -> str:
    if not values:
        return "-"
    v = sorted(x * 1e3 for x in values)
    p95 = v[min(len(v) - 1, int(0.95 * len(v)))]
    return f"{statistics.median(v):6.1f} {p95:6.1f} {v[-1]:6.1f}"


async def one(guest: str, accel: str, cycles: int, size: int) -> str:
    cfg = RigConfig(guest=guest, accel=accel, boot_timeout=120)  # type: ignore[arg-type]
    async with Rig(cfg) as rig:
        with WorkloadLog() as log:
            s = await hotplug_cycles(rig, log, cycles=cycles, size=size, unplug_timeout=30)
        return (f"{guest:5} {rig.accel:3} {rig.boot_s:6.2f}  {stats_ms(s.plug_s)}  "
                f"{stats_ms(s.unplug_s)}  {stats_ms(s.cycle_s)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--size", type=int, default=128, help="MiB per pc-dimm")
    ap.add_argument("--accel", default="kvm,tcg")
    ap.add_argument("--linux", action="store_true", help="also the Linux guest (TCG)")
    args = ap.parse_args()
    runs = [("bare", a) for a in args.accel.split(",")
            if a != "kvm" or os.access("/dev/kvm", os.R_OK | os.W_OK)]
    if args.linux:
        runs.append(("linux", "tcg"))
    print(f"{args.cycles} cycles of {args.size}M; times in ms: median p95 max")
    print(f"{'guest':5} {'acc':3} {'boot_s':>6}  {'plug':^20}  {'unplug':^20}  {'cycle':^20}")
    for guest, accel in runs:
        try:
            print(asyncio.run(one(guest, accel, args.cycles, args.size * MiB)), flush=True)
        except RigError as e:
            print(f"{guest:5} {accel:3} error: {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
