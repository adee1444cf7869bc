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
from slotscope import cli, lab, labstatus, labsummary, labverdict

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
            labstatus.write_status(d, labstatus.RunStatus(name, rep, True, "direct", 1.0))
            dirs.setdefault(name, []).append(d)
    _, analysed = labsummary.analyse([d for ds in dirs.values() for d in ds])
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


# -- queries -------------------------------------------------------------------------
P99 = "mmio_latency_p99_ns"


def _noisy_nights(template: Path, tmp_path: Path, n: int, step_at: int | None,
                  seed: int) -> tuple[Path, list[float], list[float]]:
    """n nights on h1: alpha's MMIO p99 lognormal noise around 1 ms, 1.5x
    from night ``step_at`` on (kernel 6.2 from there); beta's around 2 ms,
    unchanged.  The dataset and both planted series."""
    import numpy as np
    rng = np.random.default_rng(seed)
    alpha = 1e6 * rng.lognormal(0, 0.05, n) * np.where(np.arange(n) >= (step_at or n), 1.5, 1)
    beta = 2e6 * rng.lognormal(0, 0.05, n)
    ds = tmp_path / "ds"
    for d in range(n):
        kernel = "6.2" if step_at is not None and d >= step_at else "6.1"
        plant = {"alpha": {P99: float(alpha[d])}, "beta": {P99: float(beta[d])}}
        hist.ingest(ds, night(template, tmp_path, d, kernel=kernel, plant=plant))
    return ds, [float(v) for v in alpha], [float(v) for v in beta]


def test_trend_compare_and_json_give_the_planted_values(
        template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    ds, alpha, beta = _noisy_nights(template, tmp_path, 12, step_at=6, seed=3)
    rc, out, _ = run_cli(["history", "trend", str(ds), "--figure", P99, "--json"], capsys)
    assert rc == 0
    got = [r for r in json.loads(out) if r["scenario"] == "alpha"]
    assert [r["value"] for r in got] == alpha
    assert [r["kernel"] for r in got] == ["6.1"] * 6 + ["6.2"] * 6
    assert got[0]["period"] == "2026-03-01" and got[-1]["period"] == "2026-03-12"
    rc, out, _ = run_cli(["history", "trend", str(ds), "--figure", P99, "--every", "month",
                          "--scenario", "beta", "--kernel", "6.1"], capsys)
    assert rc == 0 and f"{np.median(beta[:6]):,.0f}" in out
    assert max(len(line) for line in out.splitlines()) < 80
    rc, out, _ = run_cli(["history", "compare", str(ds), "--a", "6.1", "--b", "6.2",
                          "--figure", P99, "--json"], capsys)
    by = {r["scenario"]: r for r in json.loads(out)}
    a = by["alpha"]
    assert a["diff"] == pytest.approx(np.median(alpha[6:]) - np.median(alpha[:6]))
    assert 0 < a["ci_low"] <= a["diff"] <= a["ci_high"]   # the planted 1.5x step
    b = by["beta"]
    assert b["ci_low"] <= 0 <= b["ci_high"]               # nothing planted
    rc, out, _ = run_cli(["history", "compare", str(ds), "--a", "6.1", "--b", "6.2",
                          "--figure", P99], capsys)
    assert rc == 0 and "alpha" in out and max(map(len, out.splitlines())) < 80


def test_changes_finds_the_planted_night_and_not_the_quiet_series(
        template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds, _, _ = _noisy_nights(template, tmp_path, 30, step_at=17, seed=5)
    rc, out, _ = run_cli(["history", "changes", str(ds), "--figure", P99, "--json"], capsys)
    assert rc == 0
    got = json.loads(out)
    assert [(r["scenario"], r["date"]) for r in got] == [("alpha", "2026-03-18")]
    assert got[0]["kernel_before"] == "6.1" and got[0]["kernel_after"] == "6.2"
    assert got[0]["after"] / got[0]["before"] == pytest.approx(1.5, rel=0.1)
    rc, out, _ = run_cli(["history", "changes", str(ds), "--figure", P99], capsys)
    assert "2026-03-18" in out and "6.1->6.2" in out


def test_changepoint_false_alarm_rate_and_power() -> None:
    """The stated rate: 400 seeded series with no change, alpha 0.02, at most
    a binomial's plausible share alarm; a 1.3x step is found on its night."""
    import numpy as np

    from analysis.changepoint import detect
    rng = np.random.default_rng(11)
    alarms = sum(detect(rng.lognormal(0, 0.1, 40), alpha=0.02, permutations=199, seed=i)
                 is not None for i in range(400))
    assert alarms <= 16  # expected <= 8; P(Binomial(400, 0.02) > 16) < 0.005
    for seed in range(10):
        x = rng.lognormal(0, 0.1, 40) * np.where(np.arange(40) >= 25, 1.3, 1)
        c = detect(x, alpha=0.01, seed=seed)
        assert c is not None and abs(c.index - 25) <= 1
        assert detect(x, alpha=0.01, direction="down", seed=seed) is None


def test_a_corrupt_parquet_file_is_named_in_one_line(
        template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "ds"
    hist.ingest(ds, night(template, tmp_path, 1))
    part = next(p for p in hist.partitions(ds) if "scenario=beta" in str(p))
    bad = part / "zzz.parquet"
    bad.write_bytes(b"PAR1 not really")
    rc, _, err = run_cli(["history", "trend", str(ds)], capsys)
    assert rc == 1 and err.count("\n") == 1 and str(bad) in err
    assert err.startswith("slotscope history: error: ")
    rc, _, err = run_cli(["history", "trend", str(tmp_path / "nothing")], capsys)
    assert rc == 1 and "no such history dataset" in err and err.count("\n") == 1


def test_no_data_and_bad_dates_are_told_by_fact_and_type(
        template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A partition directory without a Parquet file is no data (found on
    disk, not read from DuckDB's message); a --since that is not a date is
    DuckDB's ConversionException, named as the option's fault."""
    empty = tmp_path / "empty"
    (empty / "host=h1").mkdir(parents=True)
    rc, _, err = run_cli(["history", "trend", str(empty)], capsys)
    assert rc == 1 and "no history data" in err and err.count("\n") == 1
    ds = tmp_path / "ds"
    hist.ingest(ds, night(template, tmp_path, 1))
    rc, _, err = run_cli(["history", "trend", str(ds), "--since", "yesterday"], capsys)
    assert rc == 1 and "--since/--until: a date YYYY-MM-DD" in err and err.count("\n") == 1


def test_report_is_one_self_contained_page_with_the_planted_change(
        template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import base64
    import re
    ds, alpha, _ = _noisy_nights(template, tmp_path, 16, step_at=9, seed=8)
    page = tmp_path / "history.html"
    rc, out, _ = run_cli(["history", "report", str(ds), "-o", str(page), "--figure", P99,
                          "--figure", "memslot_updates"], capsys)
    assert rc == 0 and str(page) in out
    text = page.read_text()
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(pngs) == 4  # 2 figures x 2 scenarios
    assert all(base64.b64decode(p).startswith(b"\x89PNG") for p in pngs)
    assert "<script" not in text and "http" not in text
    assert "<td>2026-03-10</td>" in text               # the planted night, in the changes
    assert f"<td>{alpha[-1]:,.4g}</td>" in text         # the last night's planted value


def test_nightly_job_flags_a_recent_sustained_change(
        template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`slotscope lab --history`: tonight's output goes in, and a change of
    this host's series whose new level began within the window is reported
    (the job then exits 3); one older than the window no longer counts."""
    import numpy as np
    me = os.uname().nodename
    rng = np.random.default_rng(7)
    ds = tmp_path / "ds"
    p99 = 1e6 * rng.lognormal(0, 0.05, 13) * np.where(np.arange(13) >= 8, 1.5, 1)
    outs = [night(template, tmp_path, d, host=me, plant={"alpha": {P99: float(p99[d])}})
            for d in range(13)]
    for out in outs[:-1]:
        hist.ingest(ds, out)
    got = lab.history_changes(outs[-1], ds, window=7)  # new level from night 8 of 13
    assert [(c["scenario"], c["figure"], c["date"]) for c in got] == [
        ("alpha", P99, "2026-03-09")]
    out = capsys.readouterr().out
    assert "history: sustained change: alpha mmio_latency_p99_ns from 2026-03-09" in out
    assert lab.history_changes(outs[-1], ds, window=4) == []  # ingested once, too old now
    assert len(rows(ds, "SELECT DISTINCT night_id FROM h")) == 13


def _two_kernel_night(template: Path, dest: Path, day: int,
                      kernels: dict[str, tuple[str, float]]) -> Path:
    """Night ``day`` of a lab with a kernel axis: {line: (release, alpha's
    MMIO p99)}; runs under runs/<release>/<scenario>/<n>, summary.json keyed
    <release>/<scenario> with the line each ran for (slotscope.lab's layout)."""
    out = dest / f"axis-{day}"
    doc = json.loads((template / "summary.json").read_text())
    scenarios = {}
    for line, (release, p99) in kernels.items():
        for name in LAYOUT:
            shutil.copytree(template / "runs" / name, out / "runs" / release / name,
                            copy_function=os.link)
            for m in (out / "runs" / release / name).glob("*/manifest.json"):
                man = json.loads(m.read_text())
                man["kernel"] = release
                m.unlink()
                m.write_text(json.dumps(man))
            sc = dict(doc["scenarios"][name], kernel=release, scenario=name, kernel_spec=line)
            if name == "alpha":
                sc[P99] = p99
            scenarios[f"{release}/{name}"] = sc
    doc.update(finished_wall=(DAY0 + dt.timedelta(days=day)).timestamp(), scenarios=scenarios,
               host={"hostname": "h1", "kernel": "6.18"})  # the job's host (slotscope.lab)
    (out / "summary.json").write_text(json.dumps(doc))
    return out


def test_changes_follow_each_kernel_line_across_its_upgrades(
        template: Path, tmp_path: Path) -> None:
    """Two kernels every night (the lab's kernel axis): each line is its own
    series, whatever its release; the step planted in 6.12 at night 12 is
    found there, two nights after that line's upgrade, and 6.1 stays quiet.
    Mixed into one series by night, the two levels would interleave."""
    import numpy as np

    from analysis.history import changes
    rng = np.random.default_rng(7)
    ds = tmp_path / "ds"
    for d in range(24):
        new = "6.12.120" if d >= 10 else "6.12.117"
        p99_612 = 3e6 * (1.5 if d >= 12 else 1.0) * rng.lognormal(0, 0.03)
        hist.ingest(ds, _two_kernel_night(template, tmp_path, d, {
            "6.1": ("6.1.0-57", 1e6 * rng.lognormal(0, 0.03)), "6.12": (new, p99_612)}))
    got = [c for c in changes(ds, [P99]) if c["scenario"] == "alpha"]
    assert [(c["kernel_line"], c["date"]) for c in got] == [("6.12", "2026-03-13")], got
    assert got[0]["kernel_before"] == got[0]["kernel_after"] == "6.12.120"
    assert got[0]["after"] / got[0]["before"] == pytest.approx(1.5, rel=0.1)
    # the dataset's rows carry the line
    lines = {(r["kernel"], r["kernel_line"]) for r in rows(ds, "SELECT DISTINCT kernel, "
                                                          "kernel_line FROM h")}
    assert lines == {("6.1.0-57", "6.1"), ("6.12.117", "6.12"), ("6.12.120", "6.12")}


def test_a_dataset_from_before_kernel_lines_still_answers(template: Path,
                                                          tmp_path: Path) -> None:
    """Version-1 files have no kernel_line column: queries take them as one
    line, and compaction adds the column as nulls."""
    import pyarrow.parquet as pq

    from analysis.history import changes, trend
    ds = tmp_path / "ds"
    for d in range(3):
        hist.ingest(ds, night(template, tmp_path, d), compact_at=10**6)
    for f in ds.glob("*=*/**/*.parquet"):  # as version 1 wrote them
        t = pq.read_table(f, partitioning=None)
        pq.write_table(t.drop_columns(["kernel_line"]), f)
    assert trend(ds, P99) and changes(ds, [P99]) == []
    part = next(p for p in ds.glob("host=*/kernel=*/scenario=*/year=*"))
    assert hist.compact_partition(part)[1] == 1
    merged = pq.read_table(next(part.glob("*.parquet")), partitioning=None)
    assert merged.column("kernel_line").null_count == merged.num_rows
