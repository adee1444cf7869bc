"""Run directories -> typed pandas DataFrames, one per event type.

Every frame gains a categorical ``run`` column so that several runs load into
one set of frames and every group-by can include the run.  Integer columns
become pandas nullable integers (a tracepoint-only backend leaves, e.g., the
generations of a memslot update unknown), enums categoricals, and each
timestamp column ``X_ns`` stays exact int64 ns on CLOCK_MONOTONIC.

A damaged table never sinks the whole run: it loads empty and the reason is
kept in ``Recording.problems`` so that reports say what is missing and why.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from recording import manifest
from recording.errors import RecordingError
from recording.manifest import Manifest
from recording.reader import read_manifest, read_tolerant
from recording.schema import ENUMS, EVENT_TYPES

from .errors import AnalysisFailed, EmptyRun
from .joins import as_numpy, rows_of

PathLike = str | os.PathLike[str]

# pyarrow -> pandas nullable integer dtypes.
_INT_DTYPES = {
    pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(), pa.bool_(): pd.BooleanDtype(),
}
# The high-volume tables keep plain numpy columns (much faster joins, less
# memory) unless a column does hold nulls; the others are nullable throughout.
BULK = ("mmio_fault", "mmio_access", "exit_hist", "mmio_hist")


@contextlib.contextmanager
def one_line_errors(what: str) -> Iterator[None]:
    """Unexpected failures while analysing become AnalysisFailed (a
    RecordingError) naming the exception, so a caller (a CLI, the lab job)
    can report one line and carry on with other runs; SLOTSCOPE_DEBUG=1 lets
    them through with a traceback."""
    try:
        yield
    except (RecordingError, KeyboardInterrupt, BrokenPipeError):
        raise
    except MemoryError as e:
        raise AnalysisFailed(what, e) from None
    except Exception as e:
        if os.environ.get("SLOTSCOPE_DEBUG"):
            raise
        raise AnalysisFailed(what, e) from None


@dataclass
class Recording:
    """One or more runs as DataFrames (all runs concatenated, ``run`` column)."""

    frames: dict[str, pd.DataFrame]
    manifests: dict[str, Manifest]
    paths: dict[str, Path]
    problems: dict[str, list[str]] = field(default_factory=dict)

    def __getattr__(self, name: str) -> pd.DataFrame:
        frames = self.__dict__.get("frames", {})
        if name in frames:
            return frames[name]
        raise AttributeError(name)

    @property
    def runs(self) -> list[str]:
        return list(self.manifests)

    def select(self, run: str) -> Recording:
        """The frames of one run only."""
        frames = {}
        for k, df in self.frames.items():
            sub = df[df["run"] == run].reset_index(drop=True)
            sub["run"] = sub["run"].cat.set_categories([run])
            frames[k] = sub
        return Recording(frames, {run: self.manifests[run]}, {run: self.paths[run]},
                         {run: self.problems.get(run, [])})


def _to_pandas(read: Callable[[], pa.Table], event: str) -> pd.DataFrame:
    """The table ``read()`` returns as typed pandas columns.  Each column's
    Arrow chunks are dropped as soon as it is converted, so a 10M-row table
    is never held twice over (Arrow's chunks and the contiguous numpy
    arrays pandas needs)."""
    table = read()
    names = table.column_names
    columns: list[pa.ChunkedArray | None] = list(table.columns)
    del table
    cols: dict[str, Any] = {}
    for i, name in enumerate(names):
        col, columns[i] = columns[i], None  # the list held the last reference
        cols[name] = _column(col, name, event)
        del col
    return pd.DataFrame(cols, copy=False)


def _column(col: pa.ChunkedArray, name: str, event: str) -> Any:
    typ = col.type
    if pa.types.is_dictionary(typ):
        # Arrow dictionaries become pandas categoricals without touching
        # every value; the enum's own order comes first.
        enum = ENUMS.get((event, name)) or ()
        values = pd.Categorical(col.to_pandas()) if len(col) else pd.Categorical([])
        present = [str(x) for x in values.categories]
        cats = list(enum) + sorted(set(present) - set(enum))
        values = values.rename_categories(present) if len(present) else values
        return values.set_categories(cats)
    if typ in _INT_DTYPES:
        if col.null_count == 0 and (name.endswith("_ns") or event in BULK):
            # Exact timestamps and bulk tables: plain numpy, zero nulls.
            return col.to_numpy()
        return col.to_pandas(types_mapper=_INT_DTYPES.get)
    if pa.types.is_string(typ):
        return col.to_pandas().astype("string")
    return col.to_pandas()


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the directory name, widened with parents on clashes."""
    names = [p.name or str(p) for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 6:
        depth += 1
        names = ["/".join(p.parts[-depth:]) for p in paths]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def load(run_dirs: PathLike | Iterable[PathLike],
         names: Sequence[str] | None = None) -> Recording:
    """Load one run directory or several into typed frames.

    ``names``: labels for the runs (default: the shortest unique path tails).
    Raises RecordingError (one line) for a directory that is not a run or has
    an unknown schema version; damaged tables load empty with a problem noted.
    """
    if isinstance(run_dirs, str | os.PathLike):
        run_dirs = [run_dirs]
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise RecordingError("no run directory given")
    read = [read_manifest(p) for p in paths]  # every run is one before any table loads
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(paths) or len(set(names)) != len(names):
            raise RecordingError("run names must be unique, one per run directory")
    else:
        names = _run_names(paths)
    manifests: dict[str, Manifest] = {}
    problems: dict[str, list[str]] = {}
    per_event: dict[str, list[pd.DataFrame]] = {e: [] for e in EVENT_TYPES}
    for name, path, m in zip(names, paths, read, strict=True):
        manifests[name] = m
        probs = problems.setdefault(name, [])
        code = names.index(name)
        for event in EVENT_TYPES:
            df = _to_pandas(partial(read_tolerant, path, event, probs), event)
            # Codes in the width pandas keeps them in (int8 up to 127 runs):
            # no 10M-row int32 array to narrow.
            df.insert(0, "run", pd.Categorical.from_codes(
                np.full(len(df), code, dtype=_code_dtype(len(names))), categories=names))
            per_event[event].append(df)
    frames = {}
    for event, dfs in per_event.items():
        if len(dfs) > 1:
            # Same categories everywhere, or concat falls back to object.
            for c in dfs[0].columns:
                if isinstance(dfs[0][c].dtype, pd.CategoricalDtype):
                    cats = list(dict.fromkeys(x for d in dfs for x in d[c].cat.categories))
                    for d in dfs:
                        d[c] = d[c].cat.set_categories(cats)
            frames[event] = pd.concat(dfs, ignore_index=True)
        else:
            frames[event] = dfs[0]
    # Arrow's allocator keeps the pages of the tables it freed for reuse;
    # analysis allocates with numpy from here on, so give them back.
    pa.default_memory_pool().release_unused()
    return Recording(frames, manifests, dict(zip(names, paths, strict=True)), problems)


def _code_dtype(ncategories: int) -> type[np.signedinteger]:
    for dtype in (np.int8, np.int16, np.int32):
        if ncategories <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def has_trace_events(rec: Recording, run: str) -> bool:
    """Whether any table of the run holds a row; the rig's workload table
    alone does not count (the tracer recorded nothing)."""
    return any(len(rows_of(df, run)) for event, df in rec.frames.items()
               if event != "workload")


def require_events(rec: Recording) -> None:
    """Raise EmptyRun for the first run without a single trace event."""
    for run in rec.runs:
        if not has_trace_events(rec, run):
            raise EmptyRun(rec.paths[run])


def run_span_ns(rec: Recording, run: str) -> int:
    """Recording length: manifest start/stop, else first to last event."""
    m = rec.manifests[run]
    lo, hi = manifest.start_ns(m), manifest.stop_ns(m)
    if lo is None or hi is None:
        ts = []
        for name, col in (("memslot_update", "begin_ns"), ("memslot_update", "end_ns"),
                          ("mmio_fault", "exit_ns"), ("mmio_access", "ns"),
                          ("generation", "ns")):
            df = rec.frames[name]
            v = as_numpy(rows_of(df, run)[col])
            if len(v):
                ts += [v.min(), v.max()]
        if not ts:
            return 0
        lo = lo if lo is not None else min(ts)
        hi = hi if hi is not None else max(ts)
    return max(int(hi) - int(lo), 0)
