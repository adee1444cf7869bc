"""The micro-VMM's errors: one class per cause, each a RigError with a one-line message.

Callers decide by class (and its attributes), never by the message.
"""

from __future__ import annotations

from vmrig import RigError


class MicroVMError(RigError):
    """Anything the micro-VMM cannot do."""


class BadRequest(MicroVMError):
    """Parameters the micro-VMM cannot run with (pages, access, vcpus, sizes)."""


class ScheduleError(BadRequest):
    """A memslot change schedule that is malformed or impossible at its step."""


class KVMUnavailable(MicroVMError):
    """/dev/kvm is missing, unopenable or lacks what the run needs."""


class GuestBuildError(MicroVMError):
    """Assembling the guest code failed (``tool``: the binutils program)."""

    def __init__(self, tool: str, detail: str) -> None:
        super().__init__(f"building the micro-VMM guest: {tool}: {detail}")
        self.tool = tool
        self.detail = detail


class GuestMisbehaved(MicroVMError):
    """The guest did what its loop never does: an unexpected access or exit."""


class GuestStopped(GuestMisbehaved):
    """A vCPU took an exit its loop never takes (``exit``: its name or number)."""

    def __init__(self, exit: str, vcpu: int, done: str) -> None:
        super().__init__(f"guest stopped unexpectedly: KVM exit {exit} on vCPU {vcpu} "
                         f"after {done}")
        self.exit = exit
        self.vcpu = vcpu
