"""Analysing many runs on a Dask cluster.

The per-run joins are independent: a fault's epoch, class and cost only ever
look at rows of its own run (every key is (run, VM)).  Two ways out:

* ``analyze_cluster``: each task loads, correlates and reduces one run
  directory (or a chunk of them) to what users read, its summary and
  comparison rows (analysis/reduce.py, the code the single process runs),
  and the client gets a few kB per run.  This is what ``slotscope analyze
  --scheduler/--workers`` uses: at 200 runs of 250k faults, every run's
  frames would be ~35 MB each on the wire and a 14 GB merge in the client.
* ``correlate_cluster``: each task sends its Correlation back and the client
  concatenates the parts into the Correlation the single-process path
  (``correlate_runs``) would have built: the same rows, run categories,
  ``update`` index values, dtypes and category orders, so that summaries,
  comparisons and the report cannot tell the two apart (notebooks, reports).

    an = analyze_cluster(dirs, scheduler="tcp://host:8786")  # a running cluster
    corr = correlate_cluster(dirs, workers=4)  # a LocalCluster of 4 worker processes

The workers read the run directories themselves (Parquet, as ever), by the
paths given: on a remote cluster they must see the same paths (absolute ones
on shared storage).  dask and distributed are imported only when a cluster
is used; ``merge`` alone needs pandas.  A script that starts a LocalCluster
(``workers=``) needs the ``if __name__ == "__main__":`` guard: the worker
processes are spawned and import the main module.  (~430 lines: the two
ways share the client, the task plan and the error transport.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pickle
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from recording.errors import RecordingError
from recording.reader import read_manifest

from .epochs import Correlation, correlate
from .errors import ClusterUnavailable
from .frames import PathLike, Recording, _run_names, load, one_line_errors, require_events
from .reduce import (
    Analysis,
    RunFigures,
    add_deltas,
    assemble,
    reference_values,
    references,
    run_figures,
)
from .stats import BOOT_SAMPLES

CONNECT_TIMEOUT_S = 10.0  # a wrong scheduler address fails in seconds, not minutes
# Categories the single-process path sorts over all runs (timeline.update_frame);
# every other categorical keeps its first-seen order, as frames.load builds it.
_SORTED_CATEGORIES = {("updates", "action"): "(none)"}
# Columns holding a memslot_update row (the ``update`` index) or a zap_all row.
_UPDATE_REFS = {"faults": ("epoch_update", "cause"), "timeline": ("update",),
                "zaps": ("update",)}
_ZAP_REFS = {"faults": ("zap",)}



@dataclass
class _Failure:
    """A RecordingError raised on a worker, carried back as data: the error
    classes take their fields as constructor arguments, which pickle would
    call with the message alone (doubling it or failing)."""

    module: str
    name: str
    message: str
    fields: dict[str, Any]

    @classmethod
    def of(cls, e: RecordingError) -> _Failure:
        fields = {}
        for k, v in vars(e).items():
            with contextlib.suppress(Exception):
                pickle.dumps(v)
                fields[k] = v
        return cls(type(e).__module__, type(e).__qualname__, str(e), fields)

    def error(self) -> RecordingError:
        try:
            kind = getattr(importlib.import_module(self.module), self.name)
        except (ImportError, AttributeError):
            kind = RecordingError
        if not (isinstance(kind, type) and issubclass(kind, RecordingError)):
            kind = RecordingError
        e = kind.__new__(kind)
        e.args = (self.message,)
        e.__dict__.update(self.fields)
        return e


@dataclass
class _Part:
    """A worker's Correlation on its way to the client.  ``fault_columns``:
    set when the recording's mmio_fault table was left off the wire because
    ``faults`` holds all its rows and columns (every fault finished), which
    is a third of the bytes; the client rebuilds it from ``faults``."""

    corr: Correlation
    fault_columns: list[str] | None


def check_runs(paths: Sequence[str]) -> _Failure | None:
    """On a worker: every directory is a run with a readable manifest, before
    any table loads (as in frames.load), so a mistyped path fails in a
    moment rather than after the other runs are correlated."""
    try:
        for p in paths:
            read_manifest(Path(p))
    except RecordingError as e:
        return _Failure.of(e)
    return None


def correlate_part(paths: Sequence[str], names: Sequence[str],
                   check_events: bool = False) -> _Part | _Failure:
    """On a worker: load and correlate some runs, labelled ``names``.
    ``check_events``: a run without trace events is an error (EmptyRun), as
    in the CLI."""
    try:
        with one_line_errors(", ".join(names)):
            rec = load(paths, names=names)
            if check_events:
                require_events(rec)
            corr = correlate(rec)
    except RecordingError as e:
        return _Failure.of(e)
    cols = list(rec.mmio_fault.columns)
    if len(corr.faults) != len(rec.mmio_fault):
        return _Part(corr, None)
    rec.frames["mmio_fault"] = rec.mmio_fault.iloc[:0]  # dtypes and categories only
    return _Part(corr, cols)


def _restore(parts: Sequence[_Part]) -> Correlation:
    """Merge the parts, with the mmio_fault tables rebuilt from ``faults``:
    when every part left it off, as one frame sharing the merged faults'
    columns (what one load and correlate hold); else part by part."""
    shared = all(p.fault_columns is not None for p in parts)
    if not shared:
        for p in parts:
            if p.fault_columns is not None:
                p.corr.recording.frames["mmio_fault"] = p.corr.faults[p.fault_columns]
    corr = merge([p.corr for p in parts])
    if shared:
        corr.recording.frames["mmio_fault"] = corr.faults[parts[0].fault_columns]
    return corr


def correlate_cluster(runs: PathLike | Iterable[PathLike], *,
                      names: Sequence[str] | None = None, scheduler: Any = None,
                      workers: int | None = None, chunk: int = 1,
                      check_events: bool = False,
                      connect_timeout: float = CONNECT_TIMEOUT_S) -> Correlation:
    """Correlate run directories on Dask, ``chunk`` runs per task; the result
    equals ``correlate_runs(runs, names=names)`` frame for frame.

    ``scheduler``: an address (``tcp://host:8786``) or a distributed.Client;
    else a LocalCluster of ``workers`` processes (default: one per core) is
    started for the call and closed after it.  The first failing run, in the
    order given, raises its RecordingError as the single-process path would.
    """
    paths, names, spans = _plan(runs, names, chunk)
    with _client(scheduler, workers, connect_timeout) as client:
        bad = client.submit(check_runs, paths, pure=False).result()
        if bad is not None:
            raise bad.error()
        futures = client.map(correlate_part, [paths[s] for s in spans],
                             [names[s] for s in spans], check_events=check_events,
                             pure=False)
        parts = _collect(futures)
    for part in parts:  # the first bad run in the order given is the one reported
        if isinstance(part, _Failure):
            raise part.error()
    return _restore(parts)


def reduce_part(paths: Sequence[str], names: Sequence[str], offset: int,
                check_events: bool, comparison: bool,
                samples: int) -> list[RunFigures] | _Failure:
    """On a worker: load, correlate and reduce some runs (analysis/reduce.py);
    ``offset``: the position of the first among all runs."""
    try:
        with one_line_errors(", ".join(names)):
            rec = load(paths, names=names)
            if check_events:
                require_events(rec)
            return run_figures(correlate(rec), offset, comparison=comparison,
                               samples=samples)
    except RecordingError as e:
        return _Failure.of(e)


def _without_values(part: list[RunFigures] | _Failure) -> list[RunFigures] | _Failure:
    """On a worker: what the client gets of a reduced part (the metric
    values stay behind for the changes vs the reference runs)."""
    if isinstance(part, _Failure):
        return part
    return [dataclasses.replace(f, values=None) for f in part]


def _references(parts: Sequence[list[RunFigures]],
                refs: dict[str, int]) -> dict[str, tuple[int, Any]]:
    return reference_values([f for p in parts for f in p], refs)


def _deltas(part: list[RunFigures], refs: dict[str, tuple[int, Any]],
            samples: int) -> list[list[dict[str, Any]]]:
    return [add_deltas(f, refs, samples) for f in part]


def analyze_cluster(runs: PathLike | Iterable[PathLike], *,
                    names: Sequence[str] | None = None, scheduler: Any = None,
                    workers: int | None = None, chunk: int = 1,
                    check_events: bool = False, samples: int = BOOT_SAMPLES,
                    connect_timeout: float = CONNECT_TIMEOUT_S) -> Analysis:
    """``reduce.analyze`` on Dask: the runs' summaries and comparison, equal
    to the single-process ones, reduced on the workers; the client receives
    a few kB per run.  Arguments and errors as ``correlate_cluster``."""
    paths, names, spans = _plan(runs, names, chunk)
    many = len(paths) > 1
    with _client(scheduler, workers, connect_timeout) as client:
        bad = client.submit(check_runs, paths, pure=False).result()
        if bad is not None:
            raise bad.error()
        # The reduced parts stay on their workers until the changes vs the
        # reference runs are in; the client fetches them without the values.
        held = client.map(reduce_part, [paths[s] for s in spans], [names[s] for s in spans],
                          [s.start for s in spans], check_events=check_events,
                          comparison=many, samples=samples, pure=False)
        try:
            parts = _collect(client.map(_without_values, held, pure=False))
            for part in parts:  # the first bad run in the order given is the one reported
                if isinstance(part, _Failure):
                    raise part.error()
            figs = [f for p in parts for f in p]
            if many:
                refs = references(figs)
                at = sorted({refs[m] // chunk for m in refs})
                ref = client.submit(_references, [held[i] for i in at], refs, pure=False)
                rows = client.gather(client.map(_deltas, held, refs=ref, samples=samples,
                                                pure=False))
                for f, r in zip(figs, (r for p in rows for r in p), strict=True):
                    f.comparison = r
        finally:
            for h in held:
                h.release()
    return assemble(figs, many)


def _plan(runs: PathLike | Iterable[PathLike], names: Sequence[str] | None,
          chunk: int) -> tuple[list[str], list[str], list[slice]]:
    """Paths, run names and the tasks' spans of runs, checked."""
    if isinstance(runs, str | os.PathLike):
        runs = [runs]
    paths = [str(p) for p in runs]
    if not paths:
        raise RecordingError("no run directory given")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(paths) or len(set(names)) != len(names):
            raise RecordingError("run names must be unique, one per run directory")
    else:
        names = _run_names([Path(p) for p in paths])
    if chunk < 1:
        raise RecordingError(f"chunk must be at least 1 run, not {chunk}")
    return paths, names, [slice(i, i + chunk) for i in range(0, len(paths), chunk)]


def _collect(futures: list[Any]) -> list[Any]:
    """The tasks' results in submission order, each fetched as soon as it is
    done and released on its worker: the transfer overlaps the correlation
    still running, and a worker holds only what it has not handed over yet.
    After a failure, tasks later in the order are cancelled (only the first
    failure in the order is reported)."""
    from distributed import as_completed
    out: list[Any] = [None] * len(futures)
    pos = {f.key: i for i, f in enumerate(futures)}
    first_bad = len(futures)
    try:
        for fut in as_completed(futures):
            i = pos[fut.key]
            if i > first_bad or fut.cancelled():
                continue
            out[i] = part = fut.result()
            fut.release()
            if isinstance(part, _Failure) and i < first_bad:
                first_bad = i
                for later in futures[i + 1:]:
                    later.cancel()
    finally:
        for f in futures:
            f.release()
    return out[:first_bad + 1]


@contextlib.contextmanager
def _client(scheduler: Any, workers: int | None, timeout: float) -> Iterator[Any]:
    """A distributed.Client: the caller's, one connected to ``scheduler``, or
    one on a LocalCluster of worker processes (one thread each: correlate
    runs its own threads, and pandas holds the GIL much of the time)."""
    from distributed import Client, LocalCluster
    if isinstance(scheduler, Client):
        yield scheduler
        return
    if scheduler is not None:
        try:
            _probe(str(scheduler), timeout)
            client = Client(str(scheduler), timeout=timeout)
        except Exception as e:  # noqa: BLE001 - whatever answered there is no scheduler
            # (a proxy or another service answers with bytes the Dask
            # protocol reads as anything, a huge frame length included)
            raise ClusterUnavailable(str(scheduler), e) from None
        with client:
            yield client
        return
    n = workers if workers else os.cpu_count() or 1
    if n < 1:
        raise RecordingError(f"a local cluster needs at least 1 worker, not {n}")
    try:
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None)
    except (OSError, TimeoutError) as e:
        raise ClusterUnavailable(f"a local cluster of {n} workers", e) from None
    with cluster, Client(cluster) as client:
        yield client


def _probe(address: str, timeout: float) -> None:
    """Fail at once where nothing listens: the Client retries a refused
    connection until its timeout, which says less and takes longer."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port
    scheme, loc = parse_address(address)
    if scheme in ("tcp", "tls"):
        with socket.create_connection(parse_host_port(loc), timeout=timeout):
            pass


def _union_categories(frames: Sequence[pd.DataFrame], col: str,
                      first: str | None = None) -> list[Any]:
    """The categories of ``col`` over all frames, first seen first (as
    frames.load joins runs); with ``first``: that one, then the rest sorted."""
    cats = list(dict.fromkeys(x for d in frames for x in d[col].cat.categories))
    if first is not None:
        cats = [first] + sorted(c for c in cats if c != first)
    return cats


def _concat(frames: Sequence[pd.DataFrame], kind: str = "",
            keep_empty: bool = False) -> pd.DataFrame:
    """Concatenate per-part frames with every categorical set to the
    categories of all parts (empty ones too), so no column falls back to
    object and a run without rows still has its category.  Empty parts'
    rows are left out unless ``keep_empty`` (frames.load keeps them): a part
    without rows builds some columns untyped, which the whole never does."""
    keep = list(frames) if keep_empty else [d for d in frames if len(d)] or list(frames[:1])
    keep = [d.copy(deep=False) for d in keep]
    for c in keep[0].columns:
        if isinstance(keep[0][c].dtype, pd.CategoricalDtype):
            typed = [d for d in frames if isinstance(d[c].dtype, pd.CategoricalDtype)]
            cats = _union_categories(typed, c, _SORTED_CATEGORIES.get((kind, c)))
            for d in keep:
                d[c] = d[c].cat.set_categories(cats)
    return pd.concat(keep, ignore_index=True) if len(keep) > 1 else keep[0]


def _shifted(df: pd.DataFrame, cols: Iterable[str], by: int) -> pd.DataFrame:
    """Row references (nullable ints) moved past the rows of earlier parts."""
    if not by or not len(df):
        return df
    df = df.copy(deep=False)
    for c in cols:
        df[c] = df[c] + by
    return df


def merge(parts: Sequence[Correlation]) -> Correlation:
    """Per-part Correlations (each of one or more whole runs, in run order)
    -> the Correlation of all their runs, as one ``correlate`` call over the
    runs loaded together would return it."""
    if not parts:
        raise RecordingError("no run directory given")
    if len(parts) == 1:
        return parts[0]
    recs = [p.recording for p in parts]
    runs = [r for rec in recs for r in rec.runs]
    if len(set(runs)) != len(runs):
        raise RecordingError("run names must be unique, one per run directory")
    rec = Recording(
        {e: _concat([r.frames[e] for r in recs], keep_empty=True) for e in recs[0].frames},
        {k: v for r in recs for k, v in r.manifests.items()},
        {k: v for r in recs for k, v in r.paths.items()},
        {k: v for r in recs for k, v in r.problems.items()})
    # The update ids and zap rows of part i follow those of the parts before it.
    upd_off = zap_off = 0
    shifted: dict[str, list[pd.DataFrame]] = {k: [] for k in
                                              ("updates", "faults", "timeline", "zaps")}
    for p in parts:
        for kind in shifted:
            df = _shifted(getattr(p, kind), _UPDATE_REFS.get(kind, ()), upd_off)
            shifted[kind].append(_shifted(df, _ZAP_REFS.get(kind, ()), zap_off))
        upd_off += len(p.recording.memslot_update)
        zap_off += len(p.recording.zap_all)
    out = {kind: _concat(dfs, kind) for kind, dfs in shifted.items()}
    # Each part's updates are numbered 0..n-1 in its own memslot_update
    # table, so the whole's are 0..N-1: a RangeIndex, as in one load.
    out["updates"] = out["updates"].copy(deep=False)
    out["updates"].index = pd.RangeIndex(len(out["updates"]), name="update")
    return Correlation(out["updates"], out["faults"], out["timeline"], out["zaps"], rec)
