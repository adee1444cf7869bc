"""The tables of a run directory: one Arrow schema per event type, the enums,
the kernel constants writer and reader share, and the format's versions.

A run directory holds ``manifest.json`` (see manifest.py) and one Parquet
file per event type (``<type>.parquet``).  While a recording is live, each
flush writes a closed segment ``<type>.parts/NNNNNN.parquet`` so that a
crash or SIGKILL leaves everything up to the last flush readable; a clean
stop compacts the segments into ``<type>.parquet``.  Readers accept either.

Units: timestamps are ns on CLOCK_MONOTONIC (the clock of
``bpf_ktime_get_ns``; ``monotonic_ns`` below); gpa/gfn are u64; generations
are u64 with the in-progress bit (GEN_IN_PROGRESS_BIT in the kernel) kept
in a separate bool column.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from . import kvmconst
from .errors import ColumnsMismatch

# The format's versions and what each changed; a reader reads every one
# listed (columns added since are filled in as ADDED_COLUMNS says).
VERSIONS = {
    1: "the first format",
    2: "mmio_fault and mmio_hist gain `reentered`: False for a vCPU thread's last "
       "exit, closed when the thread exits (v1 recorded only intervals closed by "
       "re-entry)",
}
SCHEMA_VERSION = max(VERSIONS)
READABLE_VERSIONS = tuple(VERSIONS)
# (event, column) -> the value a file written before the column existed means.
ADDED_COLUMNS = {("mmio_fault", "reentered"): True, ("mmio_hist", "reentered"): True}

MANIFEST = "manifest.json"
WORKLOAD_CONFIG = "workload.json"  # the rig's side of the manifest (manifest.py)

# Kernel constants shared by writer and reader (their home: kvmconst).
GEN_IN_PROGRESS_BIT = kvmconst.GEN_IN_PROGRESS_BIT
MMIO_GEN_BITS_DEFAULT = kvmconst.MMIO_GEN_BITS_DEFAULT

CHANGE_TYPES = ("create", "delete", "move", "flags_only", "unknown")
ACCESS_TYPES = ("unsatisfied-read", "read", "write")
GENERATION_SOURCES = ("invalidate", "check", "mark")

u8, u16, u32, u64 = pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()
i32, i64 = pa.int32(), pa.int64()
b, s = pa.bool_(), pa.string()
cat = pa.dictionary(pa.int8(), pa.string())  # enums: categoricals in pandas

# vm: the kernel's ``struct kvm *`` where a backend sees it; otherwise
# (tracepoint-only) ``pid << 32 | vm_fd``, with vm_fd 0 when unknown.
SCHEMAS: dict[str, pa.Schema] = {
    "memslot_update": pa.schema([
        ("begin_ns", i64), ("end_ns", i64), ("pid", u32), ("tid", u32), ("vm", u64),
        ("as_id", u16), ("slot_id", u16), ("change", cat),
        ("base_gfn", u64), ("npages", u64), ("flags", u32), ("userspace_addr", u64),
        ("gen_before", u64), ("gen_after", u64), ("ret", i32),
    ]),
    "generation": pa.schema([
        ("ns", i64), ("pid", u32), ("tid", u32), ("vm", u64),
        ("gen", u64), ("in_progress", b), ("mmio_gen", u32), ("zap_all", b),
        # invalidate (kvm_mmu_invalidate_mmio_sptes), check or mark (kvmmmu
        # tracepoints: they carry only the masked generation).
        ("source", cat),
    ]),
    "mmio_fault": pa.schema([
        ("exit_ns", i64), ("latency_ns", i64), ("pid", u32), ("tid", u32), ("vm", u64),
        ("vcpu", i32), ("exit_reason", u32), ("gpa", u64), ("gfn", u64),
        ("kvm_gen", u32), ("spte_gen", u32), ("stale", b), ("remarked", b),
        ("fast_hit", b), ("is_write", b), ("len", u8), ("to_user", b),
        # False: the vCPU thread exited before re-entering the guest (its
        # last exit); latency_ns then ends where KVM_RUN returned to the VMM.
        ("reentered", b),
    ]),
    "mmio_access": pa.schema([
        ("ns", i64), ("pid", u32), ("tid", u32), ("vm", u64), ("vcpu", i32),
        ("type", cat), ("len", u8), ("gpa", u64), ("val", u64),
    ]),
    "zap_all": pa.schema([("ns", i64), ("pid", u32), ("tid", u32), ("vm", u64), ("gen", u64)]),
    # In-kernel aggregated exits: one row per (pid, reason, log2 bucket) and interval.
    "exit_hist": pa.schema([
        ("ns", i64), ("pid", u32), ("exit_reason", u32), ("log2_ns", u8),
        ("count", u64), ("sum_ns", u64),
    ]),
    # Aggregation mode (record --aggregate): MMIO intervals counted in kernel
    # instead of mmio_fault rows; one row per key and interval.  The bools
    # are the interval's SPTE evidence as in mmio_fault; exit_reason null
    # where kvm_exit never fires.
    "mmio_hist": pa.schema([
        ("ns", i64), ("pid", u32), ("vm", u64), ("vcpu", i32), ("exit_reason", u32),
        ("checked", b), ("stale", b), ("remarked", b), ("fast_hit", b), ("is_write", b),
        ("to_user", b), ("reentered", b), ("log2_ns", u8), ("count", u64), ("sum_ns", u64),
    ]),
    "lost": pa.schema([("ns", i64), ("event", s), ("count", u64)]),
    "workload": pa.schema([
        ("begin_ns", i64), ("end_ns", i64), ("action", s), ("target", s),
        ("size", u64), ("ok", b), ("error", s), ("detail", s),
    ]),
}
EVENT_TYPES = tuple(SCHEMAS)
# What the tracer writes; ``workload`` (+ ``workload.json``) comes from the rig.
TRACE_EVENTS = tuple(e for e in EVENT_TYPES if e != "workload")
# The enums' own order, first among a categorical's categories.
ENUMS = {("memslot_update", "change"): CHANGE_TYPES, ("mmio_access", "type"): ACCESS_TYPES,
         ("generation", "source"): GENERATION_SOURCES}


def monotonic_ns() -> int:
    """The recording clock (CLOCK_MONOTONIC, same as bpf_ktime_get_ns)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def columns_table(event: str, columns: Mapping[str, Any]) -> pa.Table:
    """Columns (lists or arrays, keyed by name) -> a table of exactly the
    event type's schema; ColumnsMismatch names missing and unknown columns."""
    schema = SCHEMAS[event]
    missing = set(schema.names) - set(columns)
    extra = set(columns) - set(schema.names)
    if missing or extra:
        raise ColumnsMismatch(event, missing, extra)
    arrays = []
    for field in schema:
        col = columns[field.name]
        if pa.types.is_dictionary(field.type):
            arr = pa.array(col, type=pa.string()).dictionary_encode().cast(field.type)
        else:
            arr = pa.array(col, type=field.type)
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=schema)


def hist_quantile(log2_ns: Iterable[int], counts: Iterable[int], q: float) -> float | None:
    """Quantile ``q`` of a log2 latency histogram (exit_hist, mmio_hist): a
    row with ``log2_ns`` k counts latencies in [2**k, 2**(k+1)) ns; the
    value is interpolated linearly inside its bucket (so at most 2x off)."""
    hist: dict[int, int] = {}
    for k, c in zip(log2_ns, counts, strict=True):
        hist[int(k)] = hist.get(int(k), 0) + int(c)
    total = sum(hist.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for k in sorted(hist):
        c = hist[k]
        if c and seen + c >= rank:
            return float(2 ** k * (1 + (rank - seen) / c))
        seen += c
    return float(2 ** (max(hist) + 1))
