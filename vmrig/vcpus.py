"""QEMU's vCPU threads seen from the host: which thread runs which vCPU,
how much CPU each used, and the ones that used none (with where they sleep)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil

_VCPU_COMM = re.compile(r"CPU (\d+)/(\w+)")


def vcpu_threads(pid: int) -> dict[int, int]:
    """vCPU index -> thread id, from QEMU's thread names (debug-threads=on)."""
    out: dict[int, int] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        m = _VCPU_COMM.fullmatch(comm)
        if m:
            out[int(m[1])] = int(tid)
    return out


def cpu_by_tid(p: psutil.Process) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``p``."""
    return {th.id: th.user_time + th.system_time for th in p.threads()}


def vcpu_cpu_s(pid: int, vcpu_tids: dict[int, int]) -> dict[int, float]:
    """CPU seconds per vCPU index; threads that are gone are left out."""
    try:
        times = cpu_by_tid(psutil.Process(pid))
    except psutil.Error:
        return {}
    return {i: times[tid] for i, tid in vcpu_tids.items() if tid in times}


def stalled_vcpus(pid: int, vcpu_tids: dict[int, int], before: dict[int, float],
                  window_s: float) -> str:
    """Why a guest may not have answered: the vCPU threads that used no CPU
    since ``before`` (from ``vcpu_cpu_s``), with their state and where
    they sleep in the kernel.  Empty when every vCPU ran."""
    now = vcpu_cpu_s(pid, vcpu_tids)
    parts = []
    for idx, tid in sorted(vcpu_tids.items()):
        if idx not in now or idx not in before or now[idx] > before[idx]:
            continue
        try:
            state = psutil.Process(tid).status()
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text().strip() or "-"
        except (OSError, psutil.Error):
            state, wchan = "?", "?"
        parts.append(f"vCPU {idx} (tid {tid}) used no CPU in {window_s:g} s, "
                     f"state {state}, wchan {wchan}")
    return "; ".join(parts)
