"""What /proc says about traced processes: VM and vCPU fds, thread group
ids, QEMU's vCPU thread names, liveness."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from . import TracerError


def kvm_fds(pid: int) -> tuple[list[int], dict[int, int]]:
    """A process's KVM VM fds and {vCPU fd: vCPU id}, from /proc/PID/fd."""
    vms, vcpus = [], {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return vms, vcpus
    for name in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link == "anon_inode:kvm-vm":
            vms.append(int(name))
        elif link.startswith("anon_inode:kvm-vcpu:"):
            vcpus[int(name)] = int(link.rsplit(":", 1)[1])
    return vms, vcpus



def resolve_pids(pids: Sequence[int]) -> list[int]:
    """Process ids to filter on: a thread id maps to its process; TracerError if gone."""
    out = []
    for pid in pids:
        if pid <= 0:
            raise TracerError(f"bad pid {pid}")
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            raise TracerError(f"no process with pid {pid}") from None
        except PermissionError:
            raise TracerError(f"pid {pid}: permission denied reading /proc/{pid}") from None
        tgid = next((int(ln.split()[1]) for ln in status.splitlines()
                     if ln.startswith("Tgid:")), pid)
        if tgid not in out:
            out.append(tgid)
    return out


def vcpu_from_comm(pid: int, tid: int) -> int:
    """QEMU names vCPU threads 'CPU n/KVM'; -1 when the name says nothing."""
    try:
        comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return -1
    if comm.startswith("CPU ") and comm.endswith("/KVM"):
        try:
            return int(comm[4:-4])
        except ValueError:
            return -1
    return -1


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
