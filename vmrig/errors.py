"""The rig's errors: one tree under ``RigError``, each class carrying its cause.

    RigError                  a request that cannot be met (bad input, no QEMU, ...)
    ├── RigConfigError        a rig setting that cannot be used (its key and value)
    ├── QmpConnectError       the QMP socket did not accept us
    ├── QmpCommandError       QEMU answered a command with an error
    ├── QmpTimeout            no reply, or no awaited event, in time
    ├── QemuGone              QEMU closed the QMP connection (it exited)
    ├── SnapshotError         a guest could not be saved to, or restored from, a file
    ├── GuestFault            the guest, or the hypervisor under it, failed by itself
    └── L1Fault               the nested lab VM's kernel panicked, locked up, hung or was gone

Callers decide by type (``except GuestFault``), never by a message's words;
the message stays one line for the user.  An error that crosses a process
boundary (``lab-run`` inside the lab VM, read by the host) travels as a
record that names its type and kind (``write_record``/``read_record``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, cast, get_args

# What a guest did when it failed on its own (vmrig/README.md, "The nested
# lab under TCG"): a CPU exception it reported, a reset (triple fault) or a
# poweroff, a VM that QEMU paused, a KVM internal or emulation error, a guest
# panic, vCPU threads that got no CPU, a loop that did not advance although
# its vCPU ran, a boot that never reached its ready line although QEMU ran
# it (its boot timeout is several times a normal boot), or QEMU itself
# exiting under the workload.
GuestFaultKind = Literal["exception", "reset", "shutdown", "paused", "internal_error",
                         "panicked", "stalled_vcpu", "stuck_loop", "stuck_boot",
                         "qemu_exit"]
L1FaultKind = Literal["panic", "lockup", "hang", "gone"]
QmpAwaited = Literal["reply", "event"]

ERROR_FILE = "rig-error.json"  # in a record directory, when the rig ended with an error


class RigError(Exception):
    """A rig request that cannot be met; the message is one line for the user."""

    tag = "rig_error"  # the type's name in a record

    @property
    def kind_tag(self) -> str:
        """Type and kind as a record names them, e.g. 'guest_fault:reset'
        (the faults carry a ``kind``; other errors are their type alone)."""
        kind = getattr(self, "kind", "")
        return f"{self.tag}:{kind}" if kind else self.tag


class RigConfigError(RigError):
    """A rig setting that cannot be used.  ``key`` names the setting (may be
    empty), ``value`` is what was given; the message is one line."""

    tag = "rig_config"

    def __init__(self, message: str, key: str = "", value: object = None) -> None:
        super().__init__(message)
        self.key = key
        self.value = value


class QmpConnectError(RigError):
    """The QMP socket at ``socket`` did not accept a connection (``reason``).
    ``socket`` is its path, or "a socket pair" when QMP ran over one."""

    tag = "qmp_connect"

    def __init__(self, socket: str, reason: str) -> None:
        super().__init__(f"QMP connect to {socket}: {reason}")
        self.socket = socket
        self.reason = reason


class QmpCommandError(RigError):
    """QEMU answered ``command`` with an error; ``desc`` is its description."""

    tag = "qmp_command"

    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc


class QmpTimeout(RigError):
    """No ``awaited`` (a command's reply, or an event) for ``what`` within
    ``timeout_s``.  For an event, a silent guest is the usual cause."""

    tag = "qmp_timeout"

    def __init__(self, what: str, awaited: QmpAwaited, timeout_s: float) -> None:
        super().__init__(f"{what}: no {awaited} within {timeout_s:g} s")
        self.what = what
        self.awaited = awaited
        self.timeout_s = timeout_s


class QemuGone(RigError):
    """QEMU closed the QMP connection while ``what`` was pending: it exited.
    ``reason`` names how the connection ended, if known."""

    tag = "qemu_gone"

    def __init__(self, what: str, reason: str = "") -> None:
        super().__init__(f"{what}: QEMU closed the QMP connection"
                         + (f" ({reason})" if reason else ""))
        self.what = what
        self.reason = reason


class SnapshotError(RigError):
    """Saving a guest to a snapshot file, or restoring it from one
    (vmrig/snapshot.py), did not work: ``step`` is "save" or "restore",
    ``reason`` what QEMU said or what did not happen in time."""

    tag = "snapshot"

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"guest snapshot {step}: {reason}")
        self.step = step
        self.reason = reason


class GuestFault(RigError):
    """The guest, or the hypervisor under it, failed by itself, not the
    workload: ``kind`` says how, ``detail`` what the rig saw (the guest's
    exception line, the VM's run state and QEMU's error, stalled vCPUs).
    Under TCG-emulated nesting these happen with no tracer loaded."""

    tag = "guest_fault"

    def __init__(self, message: str, kind: GuestFaultKind, detail: str = "") -> None:
        super().__init__(message)
        self.kind: GuestFaultKind = kind
        self.detail = detail


class L1Fault(RigError):
    """The nested lab VM (L1) failed under the command: its kernel panicked,
    reported a soft lockup, did not finish before its deadline, or ended
    without returning the command's status and with no report at all (a
    reset or poweroff of the L1) (``kind``).  ``console`` is the L1's line
    that says so: the panic line, the lockup report, or its last console
    line."""

    tag = "l1_fault"

    def __init__(self, message: str, kind: L1FaultKind, console: str = "") -> None:
        super().__init__(message)
        self.kind: L1FaultKind = kind
        self.console = console


# -- across a process boundary ---------------------------------------------------
def to_record(err: RigError) -> dict[str, str]:
    """What ``from_record`` needs to rebuild ``err``'s type and kind."""
    detail = err.detail if isinstance(err, GuestFault) else \
        err.console if isinstance(err, L1Fault) else ""
    return {"type": err.tag, "kind": getattr(err, "kind", ""), "message": str(err),
            "detail": detail}


def from_record(record: dict[str, str], message: str | None = None) -> RigError:
    """The typed error a record names; ``message`` replaces its text (the
    reader's own wording of the same failure).  The faults are rebuilt with
    their kind; any other type as a plain RigError."""
    text = message if message is not None else str(record.get("message", ""))
    kind = record.get("kind", "")
    detail = str(record.get("detail", ""))
    if record.get("type") == GuestFault.tag and kind in get_args(GuestFaultKind):
        return GuestFault(text, cast(GuestFaultKind, kind), detail)
    if record.get("type") == L1Fault.tag and kind in get_args(L1FaultKind):
        return L1Fault(text, cast(L1FaultKind, kind), detail)
    return RigError(text)


def write_record(directory: Path, err: RigError) -> None:
    """Leave ``err`` in ``directory`` for a reader in another process."""
    tmp = directory / f".{ERROR_FILE}.tmp"
    tmp.write_text(json.dumps(to_record(err), indent=1) + "\n")
    os.replace(tmp, directory / ERROR_FILE)


def read_record(directory: Path, message: str | None = None) -> RigError | None:
    """The error a rig left in ``directory``, None if it left none."""
    try:
        record = json.loads((directory / ERROR_FILE).read_text())
    except (OSError, ValueError):
        return None
    return from_record(record, message) if isinstance(record, dict) else None
