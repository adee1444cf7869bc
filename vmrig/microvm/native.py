"""The exit loop in C (exitloop.c), for the highest exit rate a host allows.

Python's loop (loops.exit_loop) manages ~30k exits/s on a host and 1-2k in
a TCG-nested L1, too few to tell a tracer's overhead from the drift between
runs.  ``native_exit_loop`` keeps everything else Python's (setup, the
schedule, the truth) and runs KVM_RUN in C between scheduled changes, so
the ground truth and its file are the same, exactly.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from vmrig import guestbuild
from vmrig.microvm.errors import GuestBuildError, GuestMisbehaved
from vmrig.microvm.guest import MAX_PAGES, MMIO_GPA
from vmrig.microvm.loops import Pacer, bounds
from vmrig.microvm.truth import VcpuCounts

if TYPE_CHECKING:
    from vmrig.microvm.vmm import MicroVM

SOURCE = Path(__file__).with_name("exitloop.c")
DONE, DEADLINE, BAD_GPA = 0, -10000, -10001


class Counts(ctypes.Structure):
    """struct counts in exitloop.c."""

    _fields_ = [("n", ctypes.c_int64), ("reads", ctypes.c_int64),
                ("writes", ctypes.c_int64), ("completed", ctypes.c_int64),
                ("pio", ctypes.c_int64), ("by_page", (ctypes.c_int64 * 2) * MAX_PAGES),
                ("last_was_read", ctypes.c_int64), ("bad_gpa", ctypes.c_uint64)]


def _error(tool: str, what: str) -> GuestBuildError:
    return GuestBuildError(f"native exit loop: {tool}: {what}")


def _compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise _error("cc", "not found: --native needs a C compiler (./setup.sh)")
    return cc


def build() -> guestbuild.GuestImage:
    """exitloop.c compiled, from the cache (keyed by source and compiler)."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout

    def make(tmp: Path) -> bytes:
        so = tmp / "exitloop.so"
        guestbuild.run_tool([cc, "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(so),
                             str(SOURCE)], _error)
        return so.read_bytes()

    return guestbuild.cached("exitloop", ".so", SOURCE.read_bytes() + version.encode(), make)


@cache
def library() -> ctypes.CDLL:
    """exitloop.c built (``build``) and loaded."""
    built = build()
    if built.path is not None:
        lib = ctypes.CDLL(str(built.path))  # CDLL: the GIL is released during the call
    else:  # no writable cache: load a private copy, removed once mapped
        with tempfile.NamedTemporaryFile(prefix="slotscope-exitloop-", suffix=".so") as tmp:
            tmp.write(built.data)
            tmp.flush()
            lib = ctypes.CDLL(tmp.name)
    lib.exit_loop.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                              ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(Counts)]
    lib.exit_loop.restype = ctypes.c_int
    return lib


def native_exit_loop(vm: MicroVM, index: int, limit: int,
                     schedule: Sequence[tuple[str, int]], every: int,
                     duration: float) -> VcpuCounts:
    """loops.exit_loop with its KVM_RUN loop in C: the same counts."""
    every, limit, deadline = bounds(limit, schedule, every, duration)
    lib = library()
    vcpu, run_map = vm.vcpus[index]
    run_addr = ctypes.addressof(ctypes.c_char.from_buffer(run_map))
    # time.monotonic() and CLOCK_MONOTONIC are the same clock on Linux
    deadline_ns = 0 if deadline == float("inf") else int(deadline * 1e9)
    pacer = Pacer(vm, schedule, every)
    c = Counts()
    while c.n < limit:
        stop = min(limit, c.n + pacer.until(c.n))
        rc = lib.exit_loop(vcpu, run_addr, MMIO_GPA, vm.pages, stop, deadline_ns,
                           ctypes.byref(c))
        if rc == DEADLINE:
            break
        if rc == BAD_GPA:
            raise GuestMisbehaved(f"guest touched unexpected gpa {c.bad_gpa:#x}")
        if rc < 0:
            raise OSError(-rc, f"KVM_RUN failed after {c.n} MMIO exits")
        if rc > 0:
            raise vm.stopped(rc, index, f"{c.n} MMIO exits")
        pacer.at(c.n)
    n = c.n
    pacer.finish(n)
    out = VcpuCounts(index, threading.get_native_id(),
                     by_page=[[c.by_page[p][0], c.by_page[p][1]] for p in range(vm.pages)])
    out.mmio_exits = out.mmio_user_exits = n
    out.mmio_reads, out.mmio_writes = c.reads, c.writes
    out.reads_completed, out.pio_exits = c.completed, c.pio
    return out

