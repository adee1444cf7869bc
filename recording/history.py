"""The history dataset: the nightly lab's outputs across nights and hosts, as
one Parquet dataset that DuckDB queries in place (analysis/history.py).

Layout, hive-style by what users filter on::

    DATASET/host=H/kernel=K/scenario=S/year=YYYY/<file>.parquet
    DATASET/_nights/<night_id>.json        the ledger: one per ingested night

One row per lab run (scenario x repetition) of a night: the night's facts
(``date``, ``finished_wall``), the run's manifest facts (backend, KVM module,
QEMU version where recorded) and lab-run.json status, and the scenario's
figures from summary.json (the same on every repetition of a night: queries
take one value per night) beside the run's own figures (``run_*``, null
unless summary.json carries per-run summaries under ``run_summaries``).

Why ``year=`` and not ``date=``: DuckDB pays ~0.3-0.5 ms per file it opens
(measured here: 30,000 one-night files take 15 s to scan, 1,000 take 0.9 s),
so a file per night would put 10,000 nights far past a 1 s query.  ``date``
is a column instead (row-group statistics still prune by it) and
``compact`` merges a partition's files into one.

Writes are write-then-rename (a reader sees a whole file or none) under
names that carry the identity: ``<night_id>.parquet`` for one night, where
night_id hashes summary.json (and the --host given), so ingesting the same
lab output twice, or in two racing processes, lands on the same name and
adds nothing.  ``b-<hash>.parquet`` (a batch of nights) and
``c-<hash>.parquet`` (a compaction) hash the identities they hold;
compaction drops duplicate (night_id, rep) rows and runs under a lock per
partition.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import BadLabOutput, HistoryWriteFailed
from .schema import MANIFEST

# The dataset's versions and what each changed (as schema.VERSIONS).
VERSIONS = {1: "the first history dataset",
            2: "kernel_line: the lab's kernel spec a night ran (6.1, 6.12), its series key"}
HISTORY_VERSION = max(VERSIONS)

SUMMARY = "summary.json"
STATUS = "lab-run.json"  # slotscope.labstatus.STATUS; the format layer cannot import slotscope
LEDGER = "_nights"
# The scenario figures of summary.json (slotscope.labverdict FIGURES/COUNTS).
FIGURES = ("update_cost_p50_ns", "update_cost_p99_ns", "mmio_latency_p50_ns",
           "mmio_latency_p99_ns", "slow_share")
COUNTS = ("memslot_updates", "mmio_faults", "unfinished_faults", "slow_faults", "lost_events")
PARTITIONS = ("host", "kernel", "scenario", "year")
UNKNOWN = "unknown"
# ingest compacts a partition once it holds this many files.
COMPACT_AT = 32

f64, i64, i32, s, b = pa.float64(), pa.int64(), pa.int32(), pa.string(), pa.bool_()
# The columns inside each file; PARTITIONS come from the path.
SCHEMA = pa.schema(
    [("history_version", pa.int16()), ("night_id", s), ("date", pa.date32()),
     ("finished_wall", f64), ("lab_output", s), ("lab_mode", s), ("rep", i32),
     ("run_ok", b), ("run_error", s), ("accel", s), ("backend", s), ("kvm_module", s),
     ("qemu", s), ("machine", s), ("scenario_ok", b), ("runs", i32), ("failed_runs", i32),
     # The lab's kernel axis entry ("6.12": its release moves on with
     # upgrades); null before version 2 and in direct mode's single line.
     ("kernel_line", s)]
    + [(f, f64) for f in FIGURES] + [(c, i64) for c in COUNTS]
    + [(f"run_{f}", f64) for f in FIGURES] + [(f"run_{c}", i64) for c in COUNTS]
    + [("wrap_invariant", s), ("wraps", i32), ("wrap_verdicts", pa.list_(s)),
       ("missing", pa.list_(s))])
ROW_KEYS = frozenset(SCHEMA.names) | set(PARTITIONS)


@dataclass
class Ingested:
    lab_output: Path
    night_id: str
    rows: int       # rows added: 0 when the night was in the dataset already
    files: int


# -- reading a lab output --------------------------------------------------------
def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _run_facts(run_dir: Path) -> dict[str, Any]:
    """What a run's manifest and lab-run.json say; a failed run may have neither."""
    m = _json(run_dir / MANIFEST)
    m = m if isinstance(m, dict) else {}
    st = _json(run_dir / STATUS)
    st = st if isinstance(st, dict) else {}
    h = m.get("host") if isinstance(m.get("host"), dict) else {}
    q = m.get("qemu") if isinstance(m.get("qemu"), dict) else {}
    return {"host": _str(h.get("hostname")), "kernel": _str(m.get("kernel") or h.get("kernel")),
            "machine": _str(h.get("machine")), "backend": _str(m.get("backend")),
            "kvm_module": _str(m.get("kvm_module")),
            # The lab's manifests (slotscope.labrun): the QEMU running the lab
            # VM in nested mode, else the rig's own.
            "qemu": _str(q.get("l0") or q.get("l1")),
            "run_ok": st.get("ok") if isinstance(st.get("ok"), bool) else None,
            "run_error": _str(st.get("error")), "accel": _str(st.get("accel"))}


def _per_run(scenario: Mapping[str, Any], name: str, rep: int) -> dict[str, Any]:
    """The run's own figures, where summary.json lists per-run summaries."""
    for r in scenario.get("run_summaries") or []:
        parts = Path(str(r.get("path", ""))).parts if isinstance(r, dict) else ()
        if parts[-2:] == (Path(name).name, str(rep)):  # name: "<kernel>/<scenario>"
            out: dict[str, Any] = {f"run_{f}": _float(r.get(f)) for f in FIGURES}
            out.update({f"run_{c}": _int(r.get(c)) for c in COUNTS})
            return out
    return {}


def read_lab_output(lab_out: str | os.PathLike[str], host: str | None = None
                    ) -> list[dict[str, Any]]:
    """The rows of one lab output, or BadLabOutput.  ``host`` overrides the
    manifests' hostname (in nested mode that is the lab VM's, virtme-ng)."""
    path = Path(lab_out)
    if not path.is_dir():
        raise BadLabOutput(path, "no such directory")
    try:
        raw = (path / SUMMARY).read_bytes()
    except OSError as e:
        raise BadLabOutput(path, f"no readable {SUMMARY}: {e.strerror}") from None
    try:
        summary = json.loads(raw)
    except ValueError as e:
        raise BadLabOutput(path, f"{SUMMARY} is not JSON: {e}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("scenarios"), dict):
        raise BadLabOutput(path, f"{SUMMARY} has no 'scenarios' object")
    finished = _float(summary.get("finished_wall"))
    if finished is None:
        raise BadLabOutput(path, f"{SUMMARY} has no numeric 'finished_wall'")
    bad = [n for n, sc in summary["scenarios"].items() if not isinstance(sc, dict)]
    if bad:
        raise BadLabOutput(path, f"scenario {bad[0]!r} in {SUMMARY} is not an object")
    ident = hashlib.sha256(raw + b"\0" + (host or "").encode()).hexdigest()[:20]
    # The job's own host (summary.json since the lab records it) before the
    # runs' manifests, which in nested mode name the lab VM.
    job = summary.get("host") if isinstance(summary.get("host"), dict) else {}
    lab_host = _str(job.get("hostname"))
    # The night is dated by when the lab finished it, in UTC (one answer on every host).
    date = dt.datetime.fromtimestamp(finished, dt.UTC).date()
    runs = {name: sorted((int(d.name), d) for d in (path / "runs" / name).glob("*")
                         if d.is_dir() and d.name.isdigit())
            for name in summary["scenarios"]}
    facts = {(name, rep): _run_facts(d) for name, rs in runs.items() for rep, d in rs}
    # Facts a failed run lacks come from the night's other runs.
    night: dict[str, Any] = {}
    for f in facts.values():
        for k, v in f.items():
            if v is not None:
                night.setdefault(k, v)
    rows = []
    for name, sc in summary["scenarios"].items():
        for rep, _ in runs[name] or [(0, None)]:  # rep 0: a scenario without run dirs
            f = {k: v if v is not None else night.get(k)
                 for k, v in facts.get((name, rep), {}).items()} or dict(night)
            row: dict[str, Any] = {
                "history_version": HISTORY_VERSION, "night_id": ident, "date": date,
                "finished_wall": finished, "lab_output": str(path.resolve()),
                "lab_mode": _str(summary.get("mode")), "rep": rep,
                "scenario_ok": bool(sc.get("ok")), "runs": _int(sc.get("runs")),
                "failed_runs": len(sc.get("failed_runs") or []),
                "wrap_invariant": _str(sc.get("wrap_invariant")), "wraps": _int(sc.get("wraps")),
                "wrap_verdicts": [str(v) for v in sc.get("wrap_verdicts") or []],
                "missing": [str(v) for v in sc.get("missing") or []],
                # keyed "<kernel>/<scenario>" since the lab has a kernel axis
                "scenario": str(sc.get("scenario") or name), "year": str(date.year),
                "kernel_line": _str(sc.get("kernel_spec"))}
            row.update({k: f.get(k) for k in ("machine", "backend", "kvm_module", "qemu",
                                               "run_ok", "run_error", "accel")})
            row["host"] = host or lab_host or f.get("host") or UNKNOWN
            row["kernel"] = f.get("kernel") or UNKNOWN
            row["backend"] = row["backend"] or _str(sc.get("backend"))
            row.update({k: _float(sc.get(k)) for k in FIGURES})
            row.update({k: _int(sc.get(k)) for k in COUNTS})
            row.update(_per_run(sc, name, rep))
            rows.append(row)
    return rows


# -- writing ---------------------------------------------------------------------
def _quote(v: str) -> str:
    # DuckDB's hive_partitioning URL-decodes values: a kernel "a/b" stays one level.
    return urllib.parse.quote(v, safe="")


def partition_dir(dataset: Path, row: Mapping[str, Any]) -> Path:
    return dataset.joinpath(*(f"{k}={_quote(str(row[k]))}" for k in PARTITIONS))


def _table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    unknown = set().union(*(r.keys() for r in rows)) - ROW_KEYS
    if unknown:
        raise ValueError(f"history rows with unknown keys {sorted(unknown)}")
    return pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows],
                                schema=SCHEMA)


def _atomic_parquet(table: pa.Table, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    # A temp name no query glob (*.parquet) matches, unique per process.
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _ledger(dataset: Path, night_id: str) -> Path:
    return dataset / LEDGER / f"{night_id}.json"


def has_night(dataset: str | os.PathLike[str], night_id: str) -> bool:
    return _ledger(Path(dataset), night_id).exists()


def _record(dataset: Path, night_id: str, info: Mapping[str, Any]) -> None:
    p = _ledger(dataset, night_id)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, default=str) + "\n")
    os.replace(tmp, p)


def _groups(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(str(r[k]) for k in PARTITIONS), []).append(r)
    return out


def write_rows(dataset: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> int:
    """Write rows of any nights not yet in the dataset: one file per
    partition, named by the nights it holds; then the ledger.  The number
    of files written (0: every night was there already)."""
    root = Path(dataset)
    fresh = [r for r in rows if not has_night(root, r["night_id"])]
    if not fresh:
        return 0
    nights = sorted({r["night_id"] for r in fresh})
    try:
        groups = _groups(fresh)
        for part_rows in groups.values():
            ids = sorted({r["night_id"] for r in part_rows})
            name = (f"{ids[0]}.parquet" if len(ids) == 1 else
                    "b-" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20] + ".parquet")
            _atomic_parquet(_table(part_rows), partition_dir(root, part_rows[0]) / name)
        # The ledger last: a night is "in" only once all of its files are.
        for n in nights:
            first = next(r for r in fresh if r["night_id"] == n)
            _record(root, n, {"lab_output": first.get("lab_output"),
                              "finished_wall": first.get("finished_wall"),
                              "rows": sum(r["night_id"] == n for r in fresh)})
    except OSError as e:
        raise HistoryWriteFailed(root, e) from None
    return len(groups)


def ingest(dataset: str | os.PathLike[str], lab_out: str | os.PathLike[str],
           host: str | None = None, compact_at: int = COMPACT_AT) -> Ingested:
    """Add one lab output; refused whole (BadLabOutput) if it is not one."""
    root = Path(dataset)
    rows = read_lab_output(lab_out, host)
    night = rows[0]["night_id"] if rows else ""
    if not rows or has_night(root, night):
        return Ingested(Path(lab_out), night, 0, 0)
    files = write_rows(root, rows)
    for part in {partition_dir(root, r) for r in rows}:
        if len(list(part.glob("*.parquet"))) >= compact_at:
            compact_partition(part)
    return Ingested(Path(lab_out), night, len(rows), files)


# -- compaction -------------------------------------------------------------------
@contextlib.contextmanager
def _locked(part: Path) -> Iterator[None]:
    with open(part / ".compact.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _conform(t: pa.Table) -> pa.Table:
    """A file of any version as SCHEMA: columns added since, as nulls."""
    for f in SCHEMA:
        if f.name not in t.column_names:
            t = t.append_column(f, pa.nulls(t.num_rows, f.type))
    return t.select(SCHEMA.names).cast(SCHEMA)


def compact_partition(part: Path) -> tuple[int, int]:
    """Merge a partition's files into one, dropping duplicate (night_id, rep)
    rows; (files before, files after).  Readers see the merged file and
    the members both for a moment: queries take one value per night anyway."""
    try:
        with _locked(part):
            members = sorted(part.glob("*.parquet"))
            if len(members) < 2:
                return len(members), len(members)
            # ParquetFile, not read_table: no partition columns from the path.
            tables = [_conform(pq.ParquetFile(m).read()) for m in members]
            t = pa.concat_tables(tables).sort_by([("date", "ascending"), ("night_id", "ascending"),
                                                  ("rep", "ascending")])
            keys = list(zip(t["night_id"].to_pylist(), t["rep"].to_pylist(), strict=True))
            keep = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
            t = t.take(pa.array(keep, pa.int64()))
            digest = hashlib.sha256("\n".join(m.name for m in members).encode()).hexdigest()
            merged = part / f"c-{digest[:20]}.parquet"
            _atomic_parquet(t, merged)
            for m in members:
                if m != merged:
                    with contextlib.suppress(FileNotFoundError):
                        m.unlink()
            return len(members), 1
    except OSError as e:
        raise HistoryWriteFailed(part, e) from None
    except pa.ArrowException as e:
        raise HistoryWriteFailed(part, e) from None


_PART_RE = re.compile("/".join(f"{k}=[^/]*" for k in PARTITIONS) + "$")


def partitions(dataset: str | os.PathLike[str]) -> list[Path]:
    root = Path(dataset)
    return sorted(p for p in root.glob("/".join(f"{k}=*" for k in PARTITIONS))
                  if p.is_dir() and _PART_RE.search(p.as_posix()))


def compact(dataset: str | os.PathLike[str]) -> tuple[int, int]:
    """Compact every partition: (files before, files after)."""
    before = after = 0
    for part in partitions(dataset):
        b_, a_ = compact_partition(part)
        before, after = before + b_, after + a_
    return before, after
