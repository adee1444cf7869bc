"""Why a guest stopped answering, as far as the rig can tell.

A workload that waits for the guest (an eject) takes a ``Progress``
snapshot first; when the wait times out, ``why_silent`` compares and names
the causes, each with its GuestFault kind (vmrig/errors.py): the bare
guest's exception report, a VM that QEMU stopped (reset, poweroff, pause,
KVM internal error, guest panic), vCPU threads that got no CPU, or a bare
guest whose loop did not advance although its vCPU ran.  A boot that timed
out, or whose VM stopped first, is named the same way (``not_booted``).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmrig.errors import GuestFault, GuestFaultKind, RigError
from vmrig.vcpus import stalled_vcpus, vcpu_cpu_s

if TYPE_CHECKING:
    from vmrig.rig import Rig

# QEMU run states (query-status) that mean the guest stopped by itself, as
# GuestFault kinds; 'shutdown' is a reset when the SHUTDOWN event says so.
_STOPPED_KINDS: dict[str, GuestFaultKind] = {
    "shutdown": "shutdown", "paused": "paused", "internal-error": "internal_error",
    "guest-panicked": "panicked"}


@dataclass
class Progress:
    """CPU seconds per vCPU thread, and the bare guest's vCPU 0 loop count."""

    cpu: dict[int, float]
    loops: int | None


@dataclass(frozen=True)
class Silence:
    """Why a guest did not answer: its causes in order of weight, each a
    guest-fault kind (or None: seen, but not a fault the rig can name) with
    its text.  Formats as the causes' text, and is false when none was found."""

    causes: tuple[tuple[GuestFaultKind | None, str], ...] = ()

    def __str__(self) -> str:
        return "; ".join(text for _, text in self.causes)

    def __bool__(self) -> bool:
        return bool(self.causes)

    @property
    def kind(self) -> GuestFaultKind | None:
        """The first cause that is a guest fault."""
        return next((k for k, _ in self.causes if k is not None), None)

    def error(self, message: str) -> RigError:
        """The error for a wait that ended in this silence: a GuestFault
        when a cause is one, else a plain RigError."""
        kind = self.kind
        return GuestFault(message, kind, str(self)) if kind else RigError(message)


async def progress(rig: Rig) -> Progress:
    """A snapshot to compare against when the guest goes quiet."""
    loops = None
    if rig.config.guest == "bare":
        with contextlib.suppress(RigError, ValueError, IndexError):
            loops = await rig.read_counter()
    return Progress(vcpu_cpu_s(rig.pid or 0, rig.vcpu_tids), loops)


async def why_silent(rig: Rig, before: Progress, window_s: float) -> Silence:
    """Why ``rig``'s guest may not have answered in ``window_s`` since
    ``before``: a CPU exception the bare guest reported; QEMU stopped the VM
    (a KVM internal error pauses it: QEMU's first stderr line about it);
    vCPU threads that used no CPU; a bare guest whose loop did not advance
    although its vCPU ran.  Empty if none of these."""
    causes: list[tuple[GuestFaultKind | None, str]] = []
    if exc := rig.guest_exception():
        causes.append(("exception", f"guest said {exc!r}"))
    status = ""
    with contextlib.suppress(RigError):
        qmp = rig.require_qmp()
        status = str((await qmp.execute("query-status"))["status"])
        if status != "running":
            said = next((ln for ln in rig.stderr_lines() if "error" in ln.lower()), "")
            event = qmp.last_lifecycle()
            kind = _STOPPED_KINDS.get(status)
            if kind == "shutdown" and (qmp.last_lifecycle_event() or {}).get(
                    "data", {}).get("reason") == "guest-reset":
                kind = "reset"
            causes.append((kind, f"VM {status}" + (f" after {event}" if event else "")
                           + (f": QEMU said {said!r}" if said else "")
                           + await where_vcpu0(rig)))
    stalled = stalled_vcpus(rig.pid or 0, rig.vcpu_tids, before.cpu, window_s)
    if stalled:
        causes.append(("stalled_vcpu", stalled))
    elif status == "running" and before.loops is not None and not causes:
        now = await progress(rig)
        if now.loops == before.loops:
            causes.append(("stuck_loop",
                           f"vCPU 0 ran but the guest's loop stayed at {now.loops}"
                           + await where_vcpu0(rig)))
    return Silence(tuple(causes))


async def not_booted(rig: Rig, accel: str, before: Progress, window_s: float) -> GuestFault:
    """A boot that timed out, or whose VM stopped (reset, panic, pause)
    before its ready line, while QEMU ran: why, as far as the rig can tell
    (a stopped VM, starved vCPUs), else a boot stuck although its vCPUs ran
    (``stuck_boot``, with vCPU 0's instruction pointer).  A GuestFault either
    way: a bad setting makes QEMU exit instead of time out."""
    tail = [ln.strip() for ln in rig.serial().splitlines() if ln.strip()]
    serial = "(serial: " + (repr(tail[-1][:60]) if tail else "no output") + ")"
    if rig.qmp is not None and rig.qmp.vm_stopped():
        message = f"guest stopped {window_s:.1f} s into its boot under {accel} {serial}"
    else:
        message = f"guest not ready after {rig.config.boot_timeout:g} s under {accel} {serial}"
    why = await why_silent(rig, before, window_s)
    if why.kind is not None:
        return GuestFault(f"{message}: {why}", why.kind, str(why))
    where = await where_vcpu0(rig)
    return GuestFault(message + where, "stuck_boot", (str(why) + where).lstrip(", "))


async def where_vcpu0(rig: Rig) -> str:
    """', vCPU 0 at EIP=...' from HMP info registers ('' if it cannot tell)."""
    with contextlib.suppress(RigError):
        regs = str(await rig.require_qmp().execute(
            "human-monitor-command", {"command-line": "info registers"}))
        if m := re.search(r"\b([ER]IP=[0-9a-f]+)", regs):
            return f", vCPU 0 at {m[1]}"
    return ""
