"""Many runs correlated on a real Dask LocalCluster (worker processes) give
the single-process Correlation frame for frame, row for row, and the runs
reduced on the workers the single-process summaries and comparison;
worker-side errors and an unreachable scheduler are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from analysis import simulator
from analysis.cluster import analyze_cluster, correlate_cluster
from analysis.epochs import Correlation, correlate_runs
from analysis.errors import ClusterUnavailable, EmptyRun
from analysis.frames import load, require_events
from analysis.reduce import Analysis, analyze
from analysis.summary import summarize_all
from recording.errors import NoRunDir
from recording.reader import read_table
from recording.writer import write_table

distributed = pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parent.parent
DATA = sorted(p for p in (ROOT / "tests" / "data").iterdir() if p.is_dir())
FRAMES = ("updates", "faults", "timeline", "zaps")


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The committed recordings and simulated runs of every kind the
    correlation branches on: several VMs, failed updates, wraps, MMIO caching
    off, no updates at all, a run with no rows in any table, and one whose
    vCPU threads exited before re-entering the guest (unfinished faults)."""
    base = tmp_path_factory.mktemp("cluster-runs")
    for name, kw in {
        "nested": dict(vms=2, vcpus=2, pages=4, events=3000, p_update=0.03, fail_every=9),
        "wrap": dict(seed=2, events=800, p_update=0.05, gen_bits=5, start_gen=20,
                     changes=("create", "flags_only")),
        "host": dict(seed=3, events=1500, host_style=True),
        "no-updates": dict(seed=6, events=500, p_update=0.0),
        "empty": dict(seed=7, events=0),
        "other": dict(seed=5, vms=1, vcpus=3, pages=3, events=2000, p_update=0.05),
    }.items():
        simulator.simulate(base / name, **kw)
    # The last exit of each vCPU thread cut short: the correlation leaves it
    # out, so this part's mmio_fault table travels whole.
    cols = read_table(base / "other", "mmio_fault").to_pydict()
    last = {tid: i for i, tid in enumerate(cols["tid"])}
    cols["reentered"] = [i not in last.values() for i in range(len(cols["tid"]))]
    write_table(base / "other", "mmio_fault", cols)
    return DATA + [base / n for n in ("nested", "wrap", "host", "no-updates", "empty",
                                      "other")]


def assert_same(got: Correlation, want: Correlation) -> None:
    for name in FRAMES:
        pd.testing.assert_frame_equal(getattr(got, name), getattr(want, name),
                                      check_exact=True, check_index_type=True,
                                      check_column_type=True, obj=name)
    assert got.recording.frames.keys() == want.recording.frames.keys()
    for event, df in want.recording.frames.items():
        pd.testing.assert_frame_equal(got.recording.frames[event], df, check_exact=True,
                                      check_index_type=True, obj=event)
    assert got.recording.manifests == want.recording.manifests
    assert got.recording.paths == want.recording.paths
    assert got.recording.problems == want.recording.problems


@pytest.mark.parametrize("chunk", [1, 3])
def test_cluster_correlation_equals_single_process(client: distributed.Client,
                                                   runs: list[Path], chunk: int) -> None:
    want = correlate_runs(runs)
    got = correlate_cluster(runs, scheduler=client, chunk=chunk)
    # The comparison has something to compare: every run, classes and charges.
    assert got.recording.runs == want.recording.runs and len(got.recording.runs) == len(runs)
    assert got.faults["run"].nunique() >= len(runs) - 1  # all but the empty run
    assert got.faults["cause"].notna().any() and got.zaps["update"].notna().any()
    assert got.updates.index.max() + 1 == len(want.recording.memslot_update)
    assert len(got.faults) < len(got.recording.mmio_fault)  # "other": unfinished faults
    assert_same(got, want)
    assert summarize_all(got) == summarize_all(want)


def assert_same_analysis(got: Analysis, want: Analysis) -> None:
    # JSON text: key order and float bits too, as `analyze --json` prints them.
    assert json.dumps(got.to_json()) == json.dumps(want.to_json())
    assert got.summaries == want.summaries
    if want.comparison is None:
        assert got.comparison is None
    else:
        pd.testing.assert_frame_equal(got.comparison, want.comparison, check_exact=True)


@pytest.mark.parametrize("chunk", [1, 3])
def test_cluster_reduction_equals_single_process(client: distributed.Client,
                                                 runs: list[Path], chunk: int) -> None:
    # Runs without updates first: the update-cost reference (the first run
    # with any) sits in the second task of 3 runs, on whichever worker.
    by = {p.name: p for p in runs}
    order = [by["empty"], by["host-microvm"], by["no-updates"]]
    order += [p for p in runs if p not in order]
    want = analyze(order, samples=100)
    got = analyze_cluster(order, scheduler=client, chunk=chunk, samples=100)
    cmp = want.comparison
    assert cmp is not None and len(got.summaries) == len(order)
    first = cmp[cmp["n"] > 0].groupby("metric", sort=False)["run"].first()
    assert first["update_cost"] == order[3].name and first["mmio_latency"] == "host-microvm"
    assert cmp["p50_delta_ci_us"].notna().sum() >= 2 * (len(order) - 4)
    assert any(s["wraps"] for s in want.summaries) and any(s["cost_by_change"]
                                                           for s in want.summaries)
    assert_same_analysis(got, want)
    one = analyze_cluster(order[3:4], scheduler=client, samples=100)
    assert one.comparison is None
    assert_same_analysis(one, analyze(order[3:4], samples=100))


def test_scheduler_address_and_names(client: distributed.Client, runs: list[Path]) -> None:
    names = [f"r{i}" for i in range(len(runs))][::-1]
    got = correlate_cluster(runs, names=names, scheduler=client.scheduler.address)
    assert_same(got, correlate_runs(runs, names=names))


def test_first_bad_run_in_order_is_reported(client: distributed.Client, runs: list[Path],
                                            tmp_path: Path) -> None:
    bad = [runs[0], tmp_path / "missing-1", runs[1], tmp_path / "missing-2"]
    with pytest.raises(NoRunDir) as e:
        correlate_cluster(bad, scheduler=client)
    assert e.value.run_dir == tmp_path / "missing-1"
    assert str(e.value) == f"{tmp_path / 'missing-1'}: no such run directory"
    empty = next(p for p in runs if p.name == "empty")
    with pytest.raises(EmptyRun) as got:
        correlate_cluster([runs[0], empty], scheduler=client, check_events=True)
    with pytest.raises(EmptyRun) as want:
        require_events(load([runs[0], empty]))
    assert str(got.value) == str(want.value) and got.value.path == want.value.path
    with pytest.raises(NoRunDir) as e:
        analyze_cluster(bad, scheduler=client)
    assert e.value.run_dir == tmp_path / "missing-1"
    with pytest.raises(EmptyRun) as got:
        analyze_cluster([runs[0], empty, runs[1]], scheduler=client, check_events=True)
    assert str(got.value) == str(want.value)


def test_unreachable_scheduler_is_one_line(runs: list[Path]) -> None:
    with pytest.raises(ClusterUnavailable, match="tcp://127.0.0.1:1"):
        correlate_cluster(runs[:1], scheduler="tcp://127.0.0.1:1", connect_timeout=5)
    r = subprocess.run([sys.executable, "-m", "slotscope", "analyze", "--scheduler",
                        "tcp://127.0.0.1:1", str(runs[0])], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("slotscope analyze: error: cannot reach the Dask scheduler "
                               "at tcp://127.0.0.1:1")


def test_cli_workers_prints_what_one_process_prints() -> None:
    dirs = [str(p) for p in DATA]

    def analyze(*extra: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "slotscope", "analyze", "--json", *extra,
                            *dirs], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    one = analyze()
    assert len(one["runs"]) == len(dirs) and one["comparison"]
    assert analyze("--workers", "2") == one
