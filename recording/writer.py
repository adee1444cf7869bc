"""Writing a run directory: RunWriter, its per-event SegmentWriter, the
Flusher thread that writes segments off the caller's thread, and the whole-
table writes of the rig (``write_table``, ``write_workload_config``).

The tracer feeds Arrow tables (``SegmentWriter.add``); tests, the simulator
and benches build them from Python rows or columns (``append``, ``extend``).
Either way a flush writes one closed segment per event type, and a close
compacts each type's segments into ``<type>.parquet``.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import AlreadyRecorded, NotWritable, UndeclaredKeys, UnknownEvent, WriteFailed
from .manifest import KEYS, WRITER_KEYS, HostInfo, Manifest
from .schema import (
    MANIFEST,
    SCHEMA_VERSION,
    SCHEMAS,
    TRACE_EVENTS,
    WORKLOAD_CONFIG,
    columns_table,
    monotonic_ns,
)

CLOCKSOURCE = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")


def host_info() -> HostInfo:
    """The recording host; ``clocksource`` is the clock behind every
    timestamp (tsc, kvm-clock, hpet: an emulated HPET read costs
    microseconds), None where sysfs does not say."""
    try:
        clocksource: str | None = CLOCKSOURCE.read_text().strip()
    except OSError:
        clocksource = None
    return {"hostname": socket.gethostname(), "kernel": platform.release(),
            "machine": platform.machine(), "clocksource": clocksource}


def atomic_write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Replace ``path`` whole: a reader sees the old file or the new one."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How every table of a run is written: snappy, with dictionary encoding
    only for the dictionary columns (change, type, source...).  Pyarrow's
    default also dictionary-encodes every integer column, which on recorded
    runs took 1.3-2.6x as long to write (a wrap run's 262k memslot updates:
    119 ms against 60 ms here) for files 5-20% larger or at most 10% smaller."""
    return {"use_dictionary": [f.name for f in schema if pa.types.is_dictionary(f.type)]}


def _replace(path: Path, tmp: Path, buf: pa.BufferOutputStream) -> None:
    """``path`` becomes the Parquet bytes encoded into ``buf``: written to
    ``tmp`` with one call (on the lab VM's 9p each write is a round trip to
    the host, and pyarrow writes page by page) and renamed into place, so a
    reader sees the whole file or none."""
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


# Per event type, the segments a SegmentWriter also keeps in memory for its
# compaction, so that it writes them without reading them back: in the TCG
# lab VM, whose run directories are on 9p, a wrap run's compaction read ~130
# segments back.  Past this, compact() reads the segments from disk.
KEEP_BYTES = 64 << 20


class SegmentWriter:
    """One event type's rows on their way to disk: Arrow tables are added
    (no per-row Python objects on the tracer's path), each flush writes
    them as one closed segment, compact() merges the segments."""

    def __init__(self, run_dir: Path, event: str) -> None:
        if event not in SCHEMAS:
            raise UnknownEvent(event)
        self.event = event
        self.schema = SCHEMAS[event]
        self.options = parquet_options(self.schema)
        self.parts = run_dir / f"{event}.parts"
        self.final = run_dir / f"{event}.parquet"
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._segment = 0
        self.rows_written = 0
        self._parts_made = False
        self._kept: list[pa.Table] | None = []  # the segments written, up to KEEP_BYTES
        self._kept_bytes = 0

    def __len__(self) -> int:
        """Rows added and not yet taken."""
        return self._rows

    def add(self, rows: pa.Table) -> None:
        """Rows already in this event type's schema."""
        self._tables.append(rows)
        self._rows += rows.num_rows

    def extend(self, columns: Mapping[str, Any]) -> None:
        """Equal-length sequences keyed by column, exactly the schema's."""
        self.add(columns_table(self.event, columns))

    def append(self, row: Mapping[str, Any]) -> None:
        """One row as a dict; absent columns are null, unknown keys ignored."""
        self.extend({n: [row.get(n)] for n in self.schema.names})

    def take(self) -> list[pa.Table]:
        """The rows added since the last take, for write_segment elsewhere."""
        tables, self._tables, self._rows = self._tables, [], 0
        return tables

    def write_segment(self, tables: list[pa.Table]) -> int:
        n = sum(t.num_rows for t in tables)
        if not n:
            return 0
        if not self._parts_made:  # a syscall a segment is dear on the lab VM's 9p
            self.parts.mkdir(exist_ok=True)
            self._parts_made = True
        tmp = self.parts / f".{self._segment:06d}.tmp"
        table = pa.concat_tables(tables).combine_chunks()
        # Encoded in memory, then one write (profiled in the lab VM: opening,
        # writing and closing a segment's file page by page took the flush
        # thread longer than encoding it).
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, **self.options)
        _replace(self.parts / f"{self._segment:06d}.parquet", tmp, buf)
        self._segment += 1
        self.rows_written += n
        if self._kept is not None:
            self._kept_bytes += table.nbytes
            if self._kept_bytes <= KEEP_BYTES:
                self._kept.append(table)
            else:  # too big to keep: compact() reads the segments back
                self._kept = None
        return n

    def flush(self) -> int:
        return self.write_segment(self.take())

    def compact(self) -> None:
        """Merge the segments into ``<event>.parquet`` (also when empty)."""
        self.flush()
        segs = sorted(self.parts.glob("*.parquet")) if self.parts.exists() else []
        kept = self._kept if self._kept is not None and len(self._kept) == len(segs) else None
        tmp = self.final.with_suffix(".tmp")
        buf = pa.BufferOutputStream()
        with pq.ParquetWriter(buf, self.schema, **self.options) as w:
            for i, seg in enumerate(segs):
                w.write_table(kept[i] if kept is not None else
                              pq.read_table(seg, schema=self.schema))
        _replace(self.final, tmp, buf)
        self._kept, self._kept_bytes, self._parts_made = [], 0, False
        if self.parts.exists():
            shutil.rmtree(self.parts)


class Flusher:
    """Writes a run directory's segments and manifest on a thread of its own.

    Encoding a second of Parquet takes 0.3-0.5 s of wall time at 150k
    rows/s; done on the tracer's drain thread, the ring buffer would fill
    meanwhile.  One worker keeps segments and manifests in order; a write
    error is raised (WriteFailed) on the next submit or at join."""

    def __init__(self, writer: RunWriter) -> None:
        self.writer = writer
        # bounded: a disk slower than the event rate eventually stalls the
        # drain (and counts losses) rather than growing memory without end
        self._queue: queue.Queue[tuple[dict[str, list[pa.Table]], Manifest] | None] = \
            queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self.cpu_s = 0.0  # this thread's CPU time, once joined
        self._thread = threading.Thread(target=self._main, name="slotscope-flush", daemon=True)
        self._thread.start()

    def submit(self, fields: Manifest) -> None:
        """The rows added so far and these manifest fields, to be written."""
        self._raise()
        batches = {e: w.take() for e, w in self.writer.writers.items() if len(w)}
        self._queue.put((batches, fields))

    def wait(self) -> None:
        """Until everything submitted is written."""
        self._queue.join()
        self._raise()

    def _main(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:  # after an error keep draining; it is reported once
                    batches, fields = item
                    for event, tables in batches.items():
                        self.writer[event].write_segment(tables)
                    self.writer.manifest.update(fields)
                    self.writer.write_manifest()
            except BaseException as e:
                self._error = e
            finally:
                self._queue.task_done()
        self._queue.task_done()
        self.cpu_s = time.thread_time()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise WriteFailed(e) from None

    def join(self) -> None:
        """Wait until everything submitted is written, and end the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()


def _check_keys(fields: Mapping[str, Any]) -> None:
    if unknown := set(fields) - KEYS:
        raise UndeclaredKeys(unknown, "not declared in recording.manifest")
    if own := set(fields) & WRITER_KEYS:
        raise UndeclaredKeys(own, "RunWriter writes these itself (start_ns=, stop_ns=, error=)")


class RunWriter:
    """Writes a run directory; use as a context manager so a stop finalizes.

    ``fields``: the caller's manifest keys (recording.manifest declares
    them).  ``start_ns``: the run's start on the recording clock (default:
    now; a simulator passes its synthetic clock).  ``background``: flushes
    are written by a Flusher thread (the tracer), else on the caller's."""

    def __init__(self, run_dir: str | os.PathLike[str], fields: Manifest,
                 events: Iterable[str] = TRACE_EVENTS, *, start_ns: int | None = None,
                 background: bool = False) -> None:
        _check_keys(fields)
        self.dir = Path(run_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".writable"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise NotWritable(self.dir, str(e.strerror)) from None
        if (self.dir / MANIFEST).exists():
            raise AlreadyRecorded(self.dir)
        self.writers = {e: SegmentWriter(self.dir, e) for e in events}
        self.manifest: Manifest = {
            "schema_version": SCHEMA_VERSION, "host": host_info(),
            "start_ns": monotonic_ns() if start_ns is None else start_ns,
            "start_wall": time.time(), "stop_ns": None, "complete": False,
        }
        self.manifest.update(fields)
        self.write_manifest()
        self._flusher = Flusher(self) if background else None
        self.flush_cpu_s = 0.0  # CPU time of the Flusher thread, once closed

    def __getitem__(self, event: str) -> SegmentWriter:
        return self.writers[event]

    def write_manifest(self) -> None:
        self.manifest["rows"] = {e: w.rows_written for e, w in self.writers.items()}
        atomic_write_json(self.dir / MANIFEST, self.manifest)

    def flush(self, fields: Manifest | None = None, *, wait: bool = False) -> None:
        """Write the rows added so far as segments, and the manifest with
        ``fields`` merged in.  In the background: queued (``wait``: and
        written before returning); a failed earlier write raises WriteFailed."""
        snapshot: Manifest = {} if fields is None else fields.copy()  # the caller goes on
        _check_keys(snapshot)
        if self._flusher is not None:
            self._flusher.submit(snapshot)
            if wait:
                self._flusher.wait()
            return
        for w in self.writers.values():
            w.flush()
        self.manifest.update(snapshot)
        self.write_manifest()

    def close(self, fields: Manifest | None = None, *, stop_ns: int | None = None,
              error: str | None = None) -> None:
        """Compact every table and mark the run complete.  ``stop_ns``: the
        run's end (default: now); ``error``: why the run ended badly.  A
        background write that failed is recorded as the error and raised
        (WriteFailed) once the run directory is finalized."""
        failed = None
        if self._flusher is not None:
            flusher, self._flusher = self._flusher, None
            try:
                flusher.join()
            except WriteFailed as e:
                failed = e
            self.flush_cpu_s = flusher.cpu_s
        fields = fields or {}
        _check_keys(fields)
        for w in self.writers.values():
            w.compact()
        self.manifest.update(fields)
        self.manifest.update(stop_ns=monotonic_ns() if stop_ns is None else stop_ns,
                             complete=True)
        if failed is not None:
            error = str(failed)
        if error is not None:
            self.manifest["error"] = error
        self.write_manifest()
        if failed is not None:
            raise failed

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_workload_config(run_dir: str | os.PathLike[str], config: Mapping[str, Any]) -> None:
    """The rig's side of the manifest, kept apart so the tracer never clobbers it."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(run_dir) / WORKLOAD_CONFIG, config)


def write_table(run_dir: str | os.PathLike[str], event: str,
                columns: Mapping[str, Any]) -> None:
    """Write a whole table at once (e.g. the rig's workload table)."""
    table = columns_table(event, columns)
    path = Path(run_dir) / f"{event}.parquet"
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, **parquet_options(table.schema))
    _replace(path, path.with_suffix(".tmp"), buf)
