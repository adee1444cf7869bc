"""The recording layer's errors: a small tree whose classes carry the cause.

    RecordingError              a run directory that cannot be read or written
    ├── NoRunDir                no such directory
    ├── NoManifest              no manifest.json: not a run directory
    ├── BadManifest             manifest.json is not readable JSON
    ├── UnknownVersion          a schema version this release does not read
    ├── CorruptTable            a table's Parquet data does not read
    ├── ColumnsMismatch         columns that are not the event type's schema
    ├── UnknownEvent            an event type the schema does not have
    ├── UndeclaredKeys          manifest keys recording.manifest does not
    │                           declare, or that belong to RunWriter itself
    ├── NotWritable             the run directory cannot be created or written
    ├── AlreadyRecorded         the run directory holds a recording already
    ├── WriteFailed             writing segments or the manifest failed
    ├── BadLabOutput            not a lab output: the history ingest refuses it
    └── HistoryWriteFailed      the history dataset cannot be written

analysis/errors.py adds EmptyRun, AnalysisFailed, DatasetError and
ClusterUnavailable under RecordingError.
Callers decide by class, never by the message; messages are one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class RecordingError(Exception):
    """A run directory that cannot be read or written as asked."""


class NoRunDir(RecordingError):
    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        super().__init__(f"{run_dir}: no such run directory")


class NoManifest(RecordingError):
    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        super().__init__(f"{run_dir}: no manifest.json; not a slotscope run directory")


class BadManifest(RecordingError):
    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: unreadable manifest ({reason})")


class UnknownVersion(RecordingError):
    def __init__(self, path: Path, version: object, readable: Iterable[int]) -> None:
        self.path = path
        self.version = version
        self.readable = tuple(readable)
        super().__init__(f"{path}: schema version {version!r}, this slotscope reads "
                         f"{', '.join(map(str, self.readable))}; use a matching slotscope release")


class CorruptTable(RecordingError):
    def __init__(self, run_dir: Path, event: str, reason: str) -> None:
        self.run_dir = run_dir
        self.event = event
        self.reason = reason
        super().__init__(f"{run_dir}: {event} data is unreadable ({reason})")


class ColumnsMismatch(RecordingError):
    def __init__(self, event: str, missing: Iterable[str], unknown: Iterable[str]) -> None:
        self.event = event
        self.missing = sorted(missing)
        self.unknown = sorted(unknown)
        super().__init__(f"columns do not match schema: missing {self.missing}, "
                         f"unknown {self.unknown}")


class UnknownEvent(RecordingError):
    def __init__(self, event: str) -> None:
        self.event = event
        super().__init__(f"unknown event type {event!r}")


class UndeclaredKeys(RecordingError):
    """A bug in a writer: keys recording.manifest does not declare (``why``
    says so), or keys RunWriter owns passed in by a caller."""

    def __init__(self, keys: Iterable[str], why: str) -> None:
        self.keys = sorted(keys)
        self.why = why
        super().__init__(f"manifest keys {', '.join(self.keys)}: {why}")


class NotWritable(RecordingError):
    def __init__(self, run_dir: Path, reason: str) -> None:
        self.run_dir = run_dir
        self.reason = reason
        super().__init__(f"cannot write run directory {run_dir}: {reason}")


class AlreadyRecorded(RecordingError):
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        super().__init__(f"{run_dir} already holds a recording")


class WriteFailed(RecordingError):
    """Writing a segment or the manifest failed; ``cause`` is the exception."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(f"cannot write the recording: {cause}")


class BadLabOutput(RecordingError):
    """A directory that is not a lab output (no summary.json, not JSON, wrong
    shape): refused whole, nothing of it is added."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: not a lab output ({reason}); nothing ingested")


class HistoryWriteFailed(RecordingError):
    def __init__(self, path: Path, cause: BaseException) -> None:
        self.path = path
        self.cause = cause
        super().__init__(f"cannot write history dataset {path}: {cause}")
