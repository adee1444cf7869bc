"""The recording format: the contract between tracer, rig and analysis.

A run directory holds ``manifest.json`` and one Parquet file per event
type (``<type>.parquet``).  While a recording is live, each flush writes a
closed segment ``<type>.parts/NNNNNN.parquet`` so that a crash or SIGKILL
leaves everything up to the last flush readable; a clean stop compacts the
segments into ``<type>.parquet``.  Readers accept either form.

Units: timestamps are ns on CLOCK_MONOTONIC (the clock of
``bpf_ktime_get_ns``); gpa/gfn are u64; generations are u64 with the
in-progress bit (bit 63 in the kernel) kept in a separate bool column.

This module needs only pyarrow: it runs on a laptop without root or bcc.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 2
# Versions this module reads; columns added since (absent in older files) are
# filled with what they meant then: v1 had only intervals closed by re-entry.
READABLE_VERSIONS = (1, 2)
ADDED_COLUMNS = {("mmio_fault", "reentered"): True, ("mmio_hist", "reentered"): True}
MANIFEST = "manifest.json"

# Kernel constants shared by writer and reader.
GEN_IN_PROGRESS_BIT = 63
MMIO_GEN_BITS_DEFAULT = 19  # MMIO_SPTE_GEN_LOW_BITS + HIGH_BITS on >= 5.5

CHANGE_TYPES = ("create", "delete", "move", "flags_only", "unknown")
ACCESS_TYPES = ("unsatisfied-read", "read", "write")


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


class RecordingError(Exception):
    """A run directory that cannot be read or written as asked."""


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
WORKLOAD_CONFIG = "workload.json"


def monotonic_ns() -> int:
    """The recording clock (CLOCK_MONOTONIC, same as bpf_ktime_get_ns)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def host_info() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "kernel": platform.release(),
            "machine": platform.machine()}


def _atomic_write_json(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _coerce(schema: pa.Schema, columns: Mapping[str, Any]) -> pa.Table:
    """Columns (lists or arrays) -> a table of exactly ``schema``."""
    missing = set(schema.names) - set(columns)
    extra = set(columns) - set(schema.names)
    if missing or extra:
        raise RecordingError(f"columns do not match schema: missing {sorted(missing)}, "
                             f"unknown {sorted(extra)}")
    arrays = []
    for field in schema:
        col = columns[field.name]
        if pa.types.is_dictionary(field.type):
            arr = pa.array(col, type=pa.string()).dictionary_encode()
            arr = arr.cast(field.type)
        else:
            arr = pa.array(col, type=field.type)
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=schema)


class EventWriter:
    """Buffers rows of one event type; each flush writes a closed segment."""

    def __init__(self, run_dir: Path, event: str) -> None:
        if event not in SCHEMAS:
            raise RecordingError(f"unknown event type {event!r}")
        self.event = event
        self.schema = SCHEMAS[event]
        self.parts = run_dir / f"{event}.parts"
        self.final = run_dir / f"{event}.parquet"
        self._cols: dict[str, list[Any]] = {n: [] for n in self.schema.names}
        self._segment = 0
        self.rows_written = 0

    def __len__(self) -> int:
        return len(self._cols[self.schema.names[0]])

    def append(self, row: Mapping[str, Any]) -> None:
        for name, col in self._cols.items():
            col.append(row.get(name))

    def extend(self, columns: Mapping[str, Any]) -> None:
        """Append columnar data (equal-length sequences keyed by column)."""
        for name, col in self._cols.items():
            col.extend(columns[name])

    def flush(self) -> int:
        n = len(self)
        if not n:
            return 0
        table = _coerce(self.schema, self._cols)
        self.parts.mkdir(exist_ok=True)
        tmp = self.parts / f".{self._segment:06d}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.parts / f"{self._segment:06d}.parquet")
        self._segment += 1
        self.rows_written += n
        self._cols = {name: [] for name in self.schema.names}
        return n

    def compact(self) -> None:
        """Merge the segments into ``<event>.parquet`` (also when empty)."""
        self.flush()
        segs = sorted(self.parts.glob("*.parquet")) if self.parts.exists() else []
        tmp = self.final.with_suffix(".tmp")
        with pq.ParquetWriter(tmp, self.schema) as w:
            for seg in segs:
                w.write_table(pq.read_table(seg, schema=self.schema))
        os.replace(tmp, self.final)
        if self.parts.exists():
            shutil.rmtree(self.parts)


class RunWriter:
    """Writes a run directory; use as a context manager so a stop finalizes."""

    def __init__(self, run_dir: str | os.PathLike[str], manifest: Mapping[str, Any],
                 events: Iterable[str] = TRACE_EVENTS) -> None:
        self.dir = Path(run_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".writable"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise RecordingError(f"cannot write run directory {self.dir}: {e.strerror}") from None
        if (self.dir / MANIFEST).exists():
            raise RecordingError(f"{self.dir} already holds a recording")
        self.writers = {e: EventWriter(self.dir, e) for e in events}
        self.manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "host": host_info(),
            "start_ns": monotonic_ns(), "start_wall": time.time(), "stop_ns": None,
            "complete": False, "lost": {}, "events": sorted(self.writers),
            **manifest,
        }
        self.write_manifest()

    def __getitem__(self, event: str) -> EventWriter:
        return self.writers[event]

    def write_manifest(self) -> None:
        self.manifest["rows"] = {e: w.rows_written for e, w in self.writers.items()}
        _atomic_write_json(self.dir / MANIFEST, self.manifest)

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()
        self.write_manifest()

    def close(self, **final: Any) -> None:
        for w in self.writers.values():
            w.compact()
        self.manifest.update(final, stop_ns=monotonic_ns(), complete=True)
        self.write_manifest()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Run:
    """A run directory as read back: its manifest and one table per event."""

    path: Path
    manifest: dict[str, Any]
    tables: dict[str, pa.Table]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordingError(f"{run_dir}: no {MANIFEST}; not a slotscope run directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordingError(f"{path}: unreadable manifest ({e})") from None
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise RecordingError(f"{path}: schema version {version!r}, this slotscope reads "
                             f"{readable}; use a matching slotscope release")
    wl = Path(run_dir) / WORKLOAD_CONFIG
    if wl.exists():
        manifest["workload"] = json.loads(wl.read_text())
    return manifest


def read_file(path: Path, event: str) -> pa.Table:
    """One Parquet file of ``event`` in this schema, older files included."""
    table = pq.read_table(path, schema=SCHEMAS[event])
    for (ev, name), default in ADDED_COLUMNS.items():
        i = table.schema.get_field_index(name) if ev == event else -1
        if i >= 0 and table.column(i).null_count:
            table = table.set_column(i, table.schema.field(i),
                                     pc.fill_null(table.column(i), default))
    return table


def read_table(run_dir: str | os.PathLike[str], event: str) -> pa.Table:
    """One event type: the compacted file, else the live/crashed segments."""
    run_dir = Path(run_dir)
    schema = SCHEMAS[event]
    final = run_dir / f"{event}.parquet"
    try:
        if final.exists():
            return read_file(final, event)
        parts = run_dir / f"{event}.parts"
        segs = sorted(parts.glob("*.parquet")) if parts.exists() else []
        tables = [read_file(p, event) for p in segs]
    except (pa.ArrowInvalid, OSError) as e:
        raise RecordingError(f"{run_dir}: {event} data is unreadable ({e})") from None
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_run(run_dir: str | os.PathLike[str]) -> Run:
    manifest = read_manifest(run_dir)
    tables = {e: read_table(run_dir, e) for e in EVENT_TYPES}
    return Run(Path(run_dir), manifest, tables)


def write_workload_config(run_dir: str | os.PathLike[str], config: Mapping[str, Any]) -> None:
    """The rig's side of the manifest, kept apart so the tracer never clobbers it."""
    _atomic_write_json(Path(run_dir) / WORKLOAD_CONFIG, config)


def write_table(run_dir: str | os.PathLike[str], event: str,
                columns: Mapping[str, Any]) -> None:
    """Write a whole table at once (e.g. the rig's workload table)."""
    table = _coerce(SCHEMAS[event], columns)
    path = Path(run_dir) / f"{event}.parquet"
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
