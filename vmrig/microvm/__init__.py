"""The micro-VMM (see vmm.py); this step only moves the module into a package."""

from vmrig.microvm.vmm import (
    KVM_MEM_LOG_DIRTY_PAGES,
    RING_MAX,
    SLOT_HOME,
    SLOT_MOVE_OFFSET,
    SLOT_STRIDE,
    MemslotChange,
    MicroVM,
    Result,
    expected_mmio_events,
    parse_schedule,
    run,
    write_workload,
)

__all__ = ["KVM_MEM_LOG_DIRTY_PAGES", "RING_MAX", "SLOT_HOME", "SLOT_MOVE_OFFSET",
           "SLOT_STRIDE", "MemslotChange", "MicroVM", "Result", "expected_mmio_events",
           "parse_schedule", "run", "write_workload"]
