"""Reading a run directory back: the manifest, each event table (compacted
or still in segments, from any readable version), and a tolerant table read
for the analysis that keeps what still reads of a damaged table."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import (
    BadManifest,
    CorruptTable,
    NoManifest,
    NoRunDir,
    RecordingError,
    UnknownVersion,
)
from .manifest import Manifest
from .schema import (
    ADDED_COLUMNS,
    EVENT_TYPES,
    MANIFEST,
    READABLE_VERSIONS,
    SCHEMAS,
    WORKLOAD_CONFIG,
)


@dataclass
class Run:
    """A run directory as read back: its manifest and one table per event."""

    path: Path
    manifest: Manifest
    tables: dict[str, pa.Table]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))


def read_manifest(run_dir: str | os.PathLike[str]) -> Manifest:
    """manifest.json, with the rig's workload.json under ``workload``."""
    if not Path(run_dir).is_dir():
        raise NoRunDir(run_dir)
    path = Path(run_dir) / MANIFEST
    try:
        manifest: Manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoManifest(run_dir) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadManifest(path, str(e)) from None
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise UnknownVersion(path, version, READABLE_VERSIONS)
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
    final = run_dir / f"{event}.parquet"
    try:
        if final.exists():
            return read_file(final, event)
        parts = run_dir / f"{event}.parts"
        segs = sorted(parts.glob("*.parquet")) if parts.exists() else []
        tables = [read_file(p, event) for p in segs]
    except (pa.ArrowInvalid, OSError) as e:
        raise CorruptTable(run_dir, event, str(e)) from None
    return pa.concat_tables(tables) if tables else SCHEMAS[event].empty_table()


def read_tolerant(run_dir: Path, event: str, problems: list[str]) -> pa.Table:
    """read_table, else every file that still reads; never raises.  What
    was lost is appended to ``problems``, one line."""
    try:
        return read_table(run_dir, event)
    except RecordingError:
        pass
    files = [run_dir / f"{event}.parquet"]
    parts = run_dir / f"{event}.parts"
    if parts.is_dir():
        files += sorted(parts.glob("*.parquet"))
    good, bad = [], []
    for f in files:
        if not f.exists():
            continue
        try:
            good.append(read_file(f, event))
        except (pa.ArrowInvalid, OSError):
            bad.append(f.name)
    problems.append(f"{event}: unreadable file(s) {', '.join(bad)} (truncated or corrupt); "
                    f"{'kept the readable segments' if good else 'table loaded empty'}")
    return pa.concat_tables(good) if good else SCHEMAS[event].empty_table()


def read_run(run_dir: str | os.PathLike[str]) -> Run:
    manifest = read_manifest(run_dir)
    tables = {e: read_table(run_dir, e) for e in EVENT_TYPES}
    return Run(Path(run_dir), manifest, tables)
