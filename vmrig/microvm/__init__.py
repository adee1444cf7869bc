"""A micro-VMM on /dev/kvm: exact memslot changes while a vCPU touches MMIO.

No QEMU: this process does the KVM ioctls itself, so it knows exactly what
it asked of KVM.  Each vCPU runs a real-mode loop (guests/microvm.S) over
``pages`` distinct unbacked guest pages (at least 2: KVM's per-vCPU MMIO
cache hides a loop on one address), reading and/or writing one byte of
each, and after each round signals the VMM with ``out 0x10``.  Every access
exits to user space (KVM_EXIT_MMIO); after every ``every`` MMIO exits the
VMM applies the next memslot change of the schedule (CREATE, DELETE, MOVE,
FLAGS_ONLY on extra slots) through KVM_SET_USER_MEMORY_REGION.

Its counters are ground truth for the tracer tests and benchmark:
memslot ioctls with slot/gpa/size/flags/ret and MMIO exits by page and type.
The same package runs as the L2 workload inside the nested lab VM::

    python -m vmrig.microvm --mmio-accesses 20000 --pages 2 \\
        --schedule create:1,flags_only:1,flags_only:1,move:1,delete:1

``--coalesced`` (write-only) registers the MMIO pages as a coalesced MMIO
zone, so KVM completes most writes in the kernel (one kvm:kvm_mmio each,
appended to the VM's ring) instead of returning to user space: far higher
access rates than a Python KVM_RUN loop reaches.  The guest asks for a batch
of writes with ``in eax, 0x10``; the VMM drains the ring on every exit and
sizes each batch to end exactly where the next memslot change is due, so
counts (ring entries + ring-full KVM_EXIT_MMIO exits, per page and vCPU)
and the schedule stay exact.

Modules: kvmapi (ioctl numbers, struct layouts, exit reasons), guest (the
guest-physical map; assembles guests/microvm.S), changes (memslot change
kinds, their costs, the schedule), vmm (MicroVM, ``run``), loops (the vCPU
loops), ring (the coalesced MMIO ring), truth (Result, write_workload),
wrap (the generation-wrap workload, ``--wrap K``), errors, cli (``python -m vmrig.microvm``).
"""

from vmrig.microvm.changes import (
    CHANGES,
    SLOT_HOME,
    SLOT_MOVE_OFFSET,
    SLOT_STRIDE,
    parse_schedule,
)
from vmrig.microvm.errors import (
    BadRequest,
    GuestBuildError,
    GuestMisbehaved,
    GuestStopped,
    KVMUnavailable,
    MicroVMError,
    ScheduleError,
)
from vmrig.microvm.kvmapi import KVM_MEM_LOG_DIRTY_PAGES, RING_MAX
from vmrig.microvm.truth import MemslotChange, Result, expected_mmio_events, write_workload
from vmrig.microvm.vmm import MicroVM, run

__all__ = [
    "CHANGES", "KVM_MEM_LOG_DIRTY_PAGES", "RING_MAX", "SLOT_HOME", "SLOT_MOVE_OFFSET",
    "SLOT_STRIDE", "BadRequest", "GuestBuildError", "GuestMisbehaved", "GuestStopped",
    "KVMUnavailable", "MemslotChange", "MicroVM", "MicroVMError", "Result", "ScheduleError",
    "expected_mmio_events", "parse_schedule", "run", "write_workload",
]
