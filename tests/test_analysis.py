"""analysis on recordings written with the schema: classes and per-update
attribution against the simulator's truth and an independent reading of the
raw rows; outputs; bad input as one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_ref import reference

import analysis
from analysis import simulator
from analysis.report import write_report
from recording.errors import RecordingError
from recording.reader import read_table
from recording.writer import RunWriter
from slotscope.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, simulator.Truth]]:
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, kw in {
        "nested": dict(vms=2, vcpus=2, pages=4, events=3000, p_update=0.03, fail_every=9),
        "other": dict(seed=5, vms=1, vcpus=3, pages=3, events=2000, p_update=0.05),
        "wrap": dict(seed=2, events=800, p_update=0.05, gen_bits=5, start_gen=20,
                     changes=("create", "flags_only")),
        "host": dict(seed=3, events=1500, host_style=True),
    }.items():
        out[name] = (base / name, simulator.simulate(base / name, **kw))
    return out


def _assert_matches(run_dir: Path, truth: simulator.Truth) -> analysis.Correlation:
    corr = analysis.correlate(analysis.load(run_dir))
    ref = reference(run_dir)
    got = corr.faults["klass"].astype(str).tolist()
    assert got == truth.classes
    assert got == ref.classes
    cause = corr.faults["cause"].fillna(-1).astype(int).tolist()
    assert cause == truth.causes == ref.causes
    assert corr.faults["epoch_update"].fillna(-1).astype(int).tolist() == ref.openers
    upd = corr.updates
    known = upd["n_slow"].notna()
    if known.any():
        n_slow = {int(i): int(v) for i, v in upd.loc[known, "n_slow"].items() if v}
        assert n_slow == ref.n_slow
        for i, c in ref.cost.items():
            assert upd.loc[i, "cost_ns"] == pytest.approx(c, rel=1e-9, abs=1e-3)
    return corr


@pytest.mark.parametrize("name", ["nested", "other", "wrap", "host"])
def test_classes_and_attribution(runs, name: str) -> None:
    corr = _assert_matches(*runs[name])
    classes = set(corr.faults["klass"].astype(str))
    if name == "nested":  # the stream exercises every class
        assert classes == {"fast", "vcpu_cache", "stale", "first_touch", "during_update",
                           "after_zap"}
    if name == "host":
        assert classes == {"unknown"}
        assert corr.updates["cost_ns"].isna().all()


def test_wrap_zap_all_is_found_and_costed(runs) -> None:
    run_dir, truth = runs["wrap"]
    corr = analysis.correlate(analysis.load(run_dir))
    zaps = corr.zaps
    assert len(zaps) == truth.zaps > 0
    assert zaps["wrap"].all()  # only creates/flags: every zap-all is a wrap
    s = analysis.summarize(run_dir)
    assert s["zap_all_wraps"] == truth.zaps
    assert s["zap_all_cost_ns"] > 0
    f = s["forecast"][0]
    assert f["gen_bits"] == 5 and f["gen_from"] == "recorded"
    # Generation steps are +2 per swap here, so a wrap every 2**5 / 2 swaps.
    assert f["swaps_per_wrap"] == 16
    assert 0 < f["next_zap_all_s"] <= f["wrap_period_s"]


def test_load_types(runs) -> None:
    rec = analysis.load([runs["nested"][0], runs["host"][0]])
    assert rec.runs == ["nested", "host"]
    u = rec.memslot_update
    assert isinstance(u["change"].dtype, pd.CategoricalDtype)
    assert list(u["change"].cat.categories[:4]) == ["create", "delete", "move", "flags_only"]
    assert isinstance(u["run"].dtype, pd.CategoricalDtype)
    assert u["begin_ns"].dtype == np.int64
    assert str(u["gen_after"].dtype) == "UInt64"  # nullable: unknown on the host
    assert u.loc[u["run"] == "host", "gen_after"].isna().all()
    assert rec.mmio_fault["exit_ns"].dtype == np.int64
    assert len(rec.select("host").memslot_update) == (u["run"] == "host").sum()


def test_timeline_steps(runs) -> None:
    run_dir, _ = runs["nested"]
    corr = analysis.correlate(analysis.load(run_dir))
    tl = corr.timeline
    u = read_table(run_dir, "memslot_update").to_pylist()
    ok = [x for x in u if x["ret"] == 0]
    swaps = sum(2 if x["change"] in ("delete", "move") else 1 for x in ok)
    assert (tl["kind"] == "begin").sum() == (tl["kind"] == "end").sum() == len(ok)
    assert (tl["kind"] == "invalidate").sum() == swaps
    for _vm, g in tl.groupby("vm"):
        assert (np.diff(g["ns"].to_numpy()) >= 0).all()
        ends = g[g["kind"] == "end"]
        assert ends["epoch"].tolist() == list(range(1, len(ends) + 1))
        # Invalidations sit inside the window of the update that made them.
        inv = g[g["kind"] == "invalidate"]
        assert inv["update"].notna().all()


def test_summary_counts(runs) -> None:
    run_dir, truth = runs["nested"]
    s = analysis.summarize(run_dir)
    assert s["mmio_faults"] == len(truth.classes)
    assert s["slow_faults"] == sum(c not in ("fast", "vcpu_cache") for c in truth.classes)
    assert s["slow_share"] == pytest.approx(s["slow_faults"] / s["mmio_faults"])
    assert s["classes"]["vcpu_cache"]["n"] == truth.classes.count("vcpu_cache") > 0
    assert s["memslot_updates"] == len(truth.updates)
    assert s["failed_updates"] == len(truth.updates) // 9
    assert s["lost_events"] == 0 and s["missing"] == []
    for key in ("update_cost_p50_ns", "update_cost_p99_ns", "mmio_latency_p50_ns",
                "mmio_latency_p99_ns"):
        assert s[key] > 0
    json.dumps(s)  # JSON-safe
    host = analysis.summarize(runs["host"][0])
    assert host["slow_share"] is None and host["update_cost_p50_ns"] is None
    assert host["mmio_latency_p50_ns"] > 0
    assert any("mmio_caching=N" in m for m in host["missing"])


def test_compare_bootstrap(runs) -> None:
    cmp = analysis.compare([runs["nested"][0], runs["other"][0]])
    row = cmp[(cmp["run"] == "other") & (cmp["metric"] == "mmio_latency")].iloc[0]
    lo, hi = row["p50_ci_us"]
    assert lo <= row["p50_us"] <= hi
    dlo, dhi = row["p50_delta_ci_us"]
    assert dlo <= row["p50_delta_us"] <= dhi


def test_plots_and_report(runs, tmp_path: Path) -> None:
    from analysis import plots
    corr = analysis.correlate(analysis.load([runs["nested"][0], runs["host"][0]]))
    for run in corr.recording.runs:
        for name, fig in plots.figures(corr, run).items():
            png, svg = plots.save(fig, tmp_path / f"{run}-{name}")
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert b"<svg" in svg.read_bytes()[:500]
    out = write_report(corr, tmp_path / "r.html", title="two runs")
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 2 * 3 + 1  # 3 per run + comparison
    assert "<h2>Comparison</h2>" in text and "two runs" in text
    assert "kvm.mmio_caching=N" in text  # the host run says what it lacks
    assert "http://" not in text and "https://" not in text and "<script" not in text


def test_report_sections_drawn_in_workers_are_the_same(runs, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With several cores, forked workers draw the runs' sections: the HTML,
    figures included, is byte for byte what one process writes."""
    import re

    from analysis import report
    if report.section_workers(3) < 2:
        pytest.skip("one usable CPU or no fork: the sections are drawn in this process")
    corr = analysis.correlate(analysis.load(
        [runs["nested"][0], runs["host"][0], runs["other"][0]]))
    forked = report.render(corr, title="three runs")
    monkeypatch.setattr(report, "section_workers", lambda n: 1)
    alone = report.render(corr, title="three runs")

    def stamp(text: str) -> str:
        return re.sub(r"generated [0-9: -]+ UTC", "generated", text)
    assert stamp(forked) == stamp(alone)
    assert forked.count("data:image/png;base64,") == 3 * 3 + 1


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_analyze(runs, capsys, tmp_path: Path) -> None:
    rc, out, err = _cli(capsys, "analyze", str(runs["nested"][0]), str(runs["host"][0]),
                        "--plots", str(tmp_path / "plots"))
    assert rc == 0, err
    assert len(list((tmp_path / "plots").glob("*.png"))) == 6
    assert len(list((tmp_path / "plots").glob("*.svg"))) == 6
    assert "stale" in out and "comparison" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    rc, out, _ = _cli(capsys, "analyze", "--json", str(runs["nested"][0]))
    doc = json.loads(out)
    assert doc["runs"][0]["mmio_faults"] == len(runs["nested"][1].classes)


def test_cli_report(runs, capsys, tmp_path: Path) -> None:
    out_html = tmp_path / "report.html"
    rc, out, _ = _cli(capsys, "report", str(runs["nested"][0]), "-o", str(out_html))
    assert rc == 0 and out_html.stat().st_size > 10_000
    rc, _, err = _cli(capsys, "report", str(runs["nested"][0]), "-o",
                      str(tmp_path / "no" / "such" / "dir" / "r.html"))
    assert rc == 1 and "cannot write" in err and len(err.strip().splitlines()) == 1


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["missing", "no_manifest", "bad_manifest", "version",
                                  "empty"])
def test_bad_input_one_line(runs, tmp_path: Path, capsys, case: str) -> None:
    run = tmp_path / "run"
    if case == "no_manifest":
        run.mkdir()
    elif case == "bad_manifest":
        _copy(runs["nested"][0], run)
        (run / "manifest.json").write_text('{"schema_version": 1, "trunc')
    elif case == "version":
        _copy(runs["nested"][0], run)
        m = json.loads((run / "manifest.json").read_text())
        m["schema_version"] = 99
        (run / "manifest.json").write_text(json.dumps(m))
    elif case == "empty":
        RunWriter(run, {"backend": "tracepoint"}).close()
    rc, out, err = _cli(capsys, "analyze", str(run))
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert {"missing": "no such run directory", "no_manifest": "not a slotscope run",
            "bad_manifest": "unreadable manifest", "version": "schema version 99",
            "empty": "empty run"}[case] in lines[0]
    with pytest.raises(RecordingError):
        analysis.summarize(run) if case != "empty" else (_ for _ in ()).throw(
            RecordingError("empty"))


def test_empty_run_and_analysis_failures_are_typed(runs, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers decide by class: EmptyRun carries the run, AnalysisFailed the cause."""
    from analysis.frames import one_line_errors, require_events
    run = tmp_path / "empty"
    RunWriter(run, {"backend": "tracepoint"}).close()
    with pytest.raises(analysis.EmptyRun) as e:
        require_events(analysis.load([runs["nested"][0], run]))
    assert e.value.path == run and e.value.missing == "trace events"
    assert isinstance(e.value, RecordingError)
    monkeypatch.delenv("SLOTSCOPE_DEBUG", raising=False)
    with pytest.raises(analysis.AnalysisFailed) as f, one_line_errors("x"):
        raise ValueError("boom")
    assert isinstance(f.value.cause, ValueError) and f.value.what == "x"
    assert "\n" not in str(f.value)


def test_correlate_runs_never_recomputes(runs) -> None:
    rec = analysis.load(runs["nested"][0])
    corr = analysis.correlate_runs(rec)
    assert analysis.correlate_runs(corr) is corr
    assert corr.recording is rec
    again = analysis.correlate_runs([runs["nested"][0]], names=["n"])
    assert again.recording.runs == ["n"] and len(again.faults) == len(corr.faults)


def test_truncated_table_is_partial_not_fatal(runs, tmp_path: Path, capsys) -> None:
    run = _copy(runs["nested"][0], tmp_path / "run")
    f = run / "mmio_fault.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    s = analysis.summarize(run)
    assert s["mmio_faults"] == 0
    assert s["memslot_updates"] == len(runs["nested"][1].updates)
    assert any("mmio_fault: unreadable" in m for m in s["missing"])
    rc, out, _ = _cli(capsys, "analyze", str(run))
    assert rc == 0 and "unreadable" in out


def test_live_run_from_segments(tmp_path: Path) -> None:
    run = tmp_path / "live"
    w = RunWriter(run, {"backend": "kprobe"})
    w["memslot_update"].append({"begin_ns": 10, "end_ns": 20, "pid": 1, "tid": 1, "vm": 1,
                                "as_id": 0, "slot_id": 0, "change": "create", "base_gfn": 0,
                                "npages": 1, "flags": 0, "userspace_addr": 0,
                                "gen_before": 0, "gen_after": 2, "ret": 0})
    for i, (stale, fast) in enumerate([(False, False), (False, True), (True, False)]):
        w["mmio_fault"].append({"exit_ns": 30 + i, "latency_ns": 100 + 1000 * (not fast),
                                "pid": 1, "tid": 2, "vm": 1, "vcpu": 0, "exit_reason": 0,
                                "gpa": 0x1000, "gfn": 1, "kvm_gen": 2, "spte_gen": 0,
                                "stale": stale, "remarked": not fast, "fast_hit": fast,
                                "is_write": False, "len": 4, "to_user": False,
                                "reentered": True})
    w.flush()  # a crash here leaves only segments and complete=False
    s = analysis.summarize(run)
    assert s["memslot_updates"] == 1 and s["mmio_faults"] == 3
    assert s["classes"]["stale"]["n"] == 1 and s["classes"]["first_touch"]["n"] == 1
    assert any("not finalized" in m for m in s["missing"])


def test_cli_subprocess_no_traceback(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "slotscope", "analyze", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1
    assert p.stderr.strip() == f"slotscope analyze: error: {tmp_path / 'x'}: no such run directory"


def test_report_for_a_lab_job(runs, tmp_path: Path) -> None:
    """The lab's index.html: labelled runs; an unreadable run is listed, not fatal."""
    bad = tmp_path / "crashed"
    bad.mkdir()
    out = write_report([runs["nested"][0], bad, runs["host"][0]], tmp_path / "index.html",
                       title="lab", names=["pc-dimm/0", "crashed/0", "microvm/0"])
    text = out.read_text()
    assert '<h2 id="pc-dimm/0">' in text and '<h2 id="microvm/0">' in text
    assert "Runs not analysed" in text and "not a slotscope run directory" in text
    with pytest.raises(RecordingError, match="no readable run"):
        write_report([bad], tmp_path / "x.html")


def test_more_runs_than_an_int8_counts(tmp_path: Path) -> None:
    """Run codes once overflowed int8: 130 runs load, correlate and summarise."""
    from analysis.summary import summarize_all
    dirs = []
    for i in range(130):
        d = tmp_path / f"r{i:03d}"
        simulator.simulate(d, seed=i, events=40)
        dirs.append(d)
    corr = analysis.correlate(analysis.load(dirs))
    assert list(corr.recording.runs) == [d.name for d in dirs]
    assert set(corr.faults["run"].astype(str)) == {d.name for d in dirs}
    assert len(summarize_all(corr)) == 130
