"""QEMU's process samples: CPU, RSS, threads and each vCPU's CPU time,
taken every ``Rig.sample_interval`` and written as ``qemu-samples.csv``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil

from recording.schema import monotonic_ns
from vmrig.vcpus import cpu_by_tid

SAMPLES_FILE = "qemu-samples.csv"


def sample(pid: int, vcpu_tids: dict[int, int]) -> tuple[Any, ...] | None:
    """(ns, cpu_user_s, cpu_system_s, rss_bytes, threads, vcpu_cpu_s...);
    None if the process is gone."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            t = p.cpu_times()
            rss = p.memory_info().rss
            threads = cpu_by_tid(p)
    except psutil.Error:
        return None
    vcpu = [round(threads.get(tid, 0.0), 3) for _, tid in sorted(vcpu_tids.items())]
    return (monotonic_ns(), t.user, t.system, rss, len(threads), *vcpu)


def write_samples(path: Path, samples: list[tuple[Any, ...]],
                  vcpu_tids: dict[int, int]) -> None:
    """``samples`` as CSV with a header; nothing if there are none."""
    if not samples:
        return
    head = ["ns", "cpu_user_s", "cpu_system_s", "rss_bytes", "threads"]
    head += [f"vcpu{i}_cpu_s" for i in sorted(vcpu_tids)]
    lines = [",".join(head)] + [",".join(map(str, s)) for s in samples]
    path.write_text("\n".join(lines) + "\n")
