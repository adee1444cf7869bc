"""slotscope history: real lab outputs (the committed recordings as runs, the
lab's own analysis writing summary.json), the real ingest writing Parquet,
real DuckDB queries over it, real processes racing."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from recording import history as hist
from slotscope import cli, lab, labverdict

DATA = Path(__file__).parent / "data"
SLOTSCOPE = str(Path(sys.executable).parent / "slotscope")
# scenario -> the committed recordings that are its repetitions
LAYOUT = {"alpha": ("host-microvm", "labvm-microvm-kprobe"), "beta": ("nested-microvm",)}
DAY0 = dt.datetime(2026, 3, 1, 3, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real lab output: runs copied from tests/data, lab-run.json and
    summary.json written by slotscope.lab's own code."""
    out = tmp_path_factory.mktemp("lab") / "template"
    dirs: dict[str, list[Path]] = {}
    for name, srcs in LAYOUT.items():
        for rep, src in enumerate(srcs, 1):
            d = out / "runs" / name / str(rep)
            shutil.copytree(DATA / src, d)
            lab._write_status(d, lab.RunStatus(name, rep, True, "direct", 1.0))
            dirs.setdefault(name, []).append(d)
    _, analysed = lab._analyse([d for ds in dirs.values() for d in ds])
    summary = {"mode": "direct", "mode_reason": "test", "config": "test",
               "finished_wall": DAY0.timestamp(),
               "scenarios": {n: labverdict.scenario_summary([analysed[d] for d in ds], [])
                             for n, ds in dirs.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return out


def night(template: Path, dest: Path, day: int, host: str = "h1", kernel: str = "6.1.0",
          plant: dict[str, dict[str, Any]] | None = None) -> Path:
    """A copy of the template as night ``day`` on ``host`` running ``kernel``,
    with figures of summary.json set as ``plant`` says ({scenario: {fig: v}})."""
    out = dest / f"{host}-{kernel}-{day}"
    shutil.copytree(template, out, copy_function=os.link)  # Parquet shared, read-only
    for m in out.glob("runs/*/*/manifest.json"):
        doc = json.loads(m.read_text())
        doc["host"]["hostname"], doc["kernel"] = host, kernel
        m.unlink()  # a hard link: write a new file, not the template's
        m.write_text(json.dumps(doc))
    s = out / "summary.json"
    doc = json.loads(s.read_text())
    doc["finished_wall"] = (DAY0 + dt.timedelta(days=day)).timestamp()
    for name, figs in (plant or {}).items():
        doc["scenarios"][name].update(figs)
    s.unlink()
    s.write_text(json.dumps(doc))
    return out


def rows(dataset: Path, sql: str = "SELECT * FROM h ORDER BY night_id, scenario, rep"
         ) -> list[dict[str, Any]]:
    import duckdb
    con = duckdb.connect()
    glob = f"{dataset}/**/*.parquet".replace("'", "''")
    con.execute(f"CREATE VIEW h AS SELECT * FROM read_parquet('{glob}', hive_partitioning = true)")
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def files(dataset: Path) -> list[str]:
    return sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*") if p.is_file())


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# -- ingest ------------------------------------------------------------------------
def test_ingest_rows_are_the_lab_outputs_facts(template: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    lab_out = night(template, tmp_path, 3, host="bench-7", kernel="6.9.0-rc1/x")
    ds = tmp_path / "ds"
    rc, out, _ = run_cli(["history", "ingest", str(lab_out), "--into", str(ds)], capsys)
    assert rc == 0 and "3 rows in 2 files" in out
    got = rows(ds)
    summary = json.loads((lab_out / "summary.json").read_text())
    assert [(r["scenario"], r["rep"]) for r in got] == [("alpha", 1), ("alpha", 2), ("beta", 1)]
    for r in got:
        sc = summary["scenarios"][r["scenario"]]
        assert r["host"] == "bench-7" and r["kernel"] == "6.9.0-rc1/x"  # '/' survives the path
        assert str(r["date"]) == "2026-03-04" and r["year"] == 2026
        assert r["mmio_latency_p99_ns"] == sc["mmio_latency_p99_ns"]
        assert r["memslot_updates"] == sc["memslot_updates"]
        assert r["run_ok"] is True and r["scenario_ok"] == sc["ok"]
        assert r["wrap_invariant"] == sc["wrap_invariant"]
    manifest = json.loads((lab_out / "runs/beta/1/manifest.json").read_text())
    assert got[2]["backend"] == manifest["backend"]
    assert got[2]["kvm_module"] == manifest["kvm_module"]
    # the same lab output again, and once more under a new path: nothing added
    before = files(ds)
    rc, out, _ = run_cli(["history", "ingest", str(lab_out), "--into", str(ds)], capsys)
    assert rc == 0 and "nothing added" in out
    moved = tmp_path / "moved"
    lab_out.rename(moved)
    assert hist.ingest(ds, moved).rows == 0
    assert files(ds) == before and len(rows(ds)) == 3


@pytest.mark.parametrize("case", ["empty", "not-json", "no-scenarios", "scenario-not-object",
                                  "no-finished"])
def test_foreign_directory_is_refused_with_one_line(
        case: str, template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = night(template, tmp_path, 1)
    bad = tmp_path / "foreign"
    bad.mkdir()
    text = {"empty": None, "not-json": "{oops", "no-scenarios": '{"finished_wall": 1}',
            "scenario-not-object": '{"finished_wall": 1, "scenarios": {"a": 3}}',
            "no-finished": '{"scenarios": {}}'}[case]
    if text is not None:
        (bad / "summary.json").write_text(text)
    ds = tmp_path / "ds"
    rc, out, err = run_cli(["history", "ingest", str(bad), str(good), "--into", str(ds)], capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slotscope history ingest: error: ")
    assert str(bad) in lines[0] and "Traceback" not in err
    # the good one beside it went in; nothing of the foreign one did
    assert {r["lab_output"] for r in rows(ds)} == {str(good.resolve())}


def test_racing_ingests_lose_nothing_and_duplicate_nothing(template: Path,
                                                           tmp_path: Path) -> None:
    outs = [str(night(template, tmp_path, d, host=f"h{d % 2}")) for d in range(8)]
    ds = tmp_path / "ds"
    procs = [subprocess.Popen([SLOTSCOPE, "history", "ingest", *order, "--into", str(ds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for order in (outs, outs[::-1], outs[3:] + outs[:3])]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    got = rows(ds)
    keys = [(r["night_id"], r["scenario"], r["rep"]) for r in got]
    assert len(keys) == len(set(keys)) == 8 * 3
    assert {r["lab_output"] for r in got} == {str(Path(o).resolve()) for o in outs}
    assert not [f for f in files(ds) if f.endswith(".tmp")]


def test_compaction_merges_files_and_keeps_every_row(template: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    for d in range(6):
        hist.ingest(ds, night(template, tmp_path, d), compact_at=10**6)
    before = rows(ds)
    assert len([f for f in files(ds) if f.endswith(".parquet")]) == 12
    assert hist.compact(ds) == (12, 2)
    assert rows(ds) == before
    # a night ingested again after compaction is still known: nothing added
    assert hist.ingest(ds, tmp_path / "h1-6.1.0-0").rows == 0 and len(rows(ds)) == 18
