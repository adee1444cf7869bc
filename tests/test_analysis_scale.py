"""The fast paths of issue #14 against straightforward references, on real
Parquet: the merge as-of join (time-ordered faults) against the per-key
search (the same run with every table's rows shuffled) and pandas.merge_asof;
the chunked, threaded per-fault pass over more than one chunk; quantiles
read off sorted data against np.quantile; the change-point statistics
against their formula."""

from __future__ import annotations

import importlib.util
import math
from importlib.machinery import SourceFileLoader
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import analysis
from analysis import changepoint, fault_columns
from analysis.joins import AsOf
from analysis.latency import sorted_quantiles, union_quantiles

ROOT = Path(__file__).resolve().parent.parent
QS = [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0]


def _bench_generate():
    loader = SourceFileLoader("analysis_scale_bench", str(ROOT / "bench" / "analysis_scale"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod.generate


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A bench recording (time-ordered, several chunks) and a copy with the
    rows of its fault, update and zap-all tables shuffled."""
    base = tmp_path_factory.mktemp("scale")
    n = 3 * fault_columns.CHUNK + 1234
    _bench_generate()(base / "sorted", n, 3000, vms=3, vcpus=3, pages=8, seed=4)
    shuffled = base / "shuffled"
    shuffled.mkdir()
    rng = np.random.default_rng(9)
    perms = {}
    for p in (base / "sorted").iterdir():
        if p.suffix == ".parquet" and p.stem in ("mmio_fault", "memslot_update", "zap_all"):
            t = pq.read_table(p)
            perms[p.stem] = rng.permutation(t.num_rows)
            pq.write_table(t.take(perms[p.stem]), shuffled / p.name)
        else:
            (shuffled / p.name).write_bytes(p.read_bytes())
    a = analysis.correlate(analysis.load(base / "sorted"))
    b = analysis.correlate(analysis.load(shuffled))
    return {"sorted": a, "shuffled": b, "perms": perms, "n": n}


def _ids(col: pd.Series, perm: np.ndarray) -> np.ndarray:
    """Row references of the shuffled run as rows of the sorted one (-1: NA)."""
    v = col.to_numpy(np.int64, na_value=-1)
    return np.where(v >= 0, perm[np.maximum(v, 0)], -1)


def test_merge_join_and_search_agree_on_every_fault(pair) -> None:
    a, b, perms = pair["sorted"], pair["shuffled"], pair["perms"]
    fa = a.faults
    fb = b.faults.iloc[np.argsort(perms["mmio_fault"])].reset_index(drop=True)
    assert len(fa) == pair["n"] > 3 * fault_columns.CHUNK
    assert fa["exit_ns"].is_monotonic_increasing  # the merge path ran on one side
    for col in ("klass", "since_update_ns", "epoch_gen", "baseline_ns", "extra_ns"):
        pd.testing.assert_series_equal(fa[col], fb[col], check_exact=True)
    for col, table in (("epoch_update", "memslot_update"), ("cause", "memslot_update"),
                       ("zap", "zap_all")):
        got = _ids(fb[col], perms[table])
        assert np.array_equal(fa[col].to_numpy(np.int64, na_value=-1), got), col
    assert set(fa["klass"].astype(str)) >= {"fast", "stale", "first_touch", "during_update",
                                            "after_zap"}
    # Per-update charges: the same sums, whichever order the rows came in.
    ua = a.updates.sort_index()
    ub = b.updates.set_axis(perms["memslot_update"][b.updates.index]).sort_index()
    for col in ("n_slow", "n_stale", "n_during_update", "n_after_zap", "epoch_faults"):
        assert ua[col].tolist() == ub[col].tolist(), col
    np.testing.assert_allclose(ua["cost_ns"].to_numpy(float), ub["cost_ns"].to_numpy(float),
                               rtol=1e-9)


def test_epochs_match_merge_asof(pair) -> None:
    """Each fault's opener and zap-all against pandas.merge_asof by VM."""
    corr = pair["sorted"]
    f = corr.faults.reset_index(names="row")[["row", "exit_ns", "vm"]]
    u = corr.updates[corr.updates["ok"]].reset_index(names="upd")[["upd", "end_ns", "vm"]]
    z = corr.recording.zap_all.reset_index(names="zap")[["zap", "ns", "vm"]]
    for right, on, col, ref in ((u, "end_ns", "epoch_update", "upd"), (z, "ns", "zap", "zap")):
        right = right.astype({"vm": "uint64", on: "int64"}).sort_values(on, kind="stable")
        m = pd.merge_asof(f.astype({"vm": "uint64"}), right, left_on="exit_ns", right_on=on,
                          by="vm", direction="backward").sort_values("row")
        want = m[ref].fillna(-1).to_numpy(np.int64)
        got = corr.faults[col].to_numpy(np.int64, na_value=-1)
        if col == "zap":  # the column names a zap-all only for after_zap faults
            keep = (corr.faults["klass"] == "after_zap").to_numpy()
            got, want = got[keep], want[keep]
            assert keep.any()
        assert np.array_equal(got, want), col


def test_summary_figures_equal_per_class_numpy(pair) -> None:
    """Latency quantiles read off one sort equal np.quantile per class."""
    corr = pair["sorted"]
    f = corr.faults
    s = analysis.summarize(corr)
    lat = f["latency_ns"].to_numpy(np.float64)
    assert s["mmio_latency_p50_ns"] == float(np.quantile(lat, 0.5))
    assert s["mmio_latency_p99_ns"] == float(np.quantile(lat, 0.99))
    klass = f["klass"].astype(str).to_numpy()
    for c, v in s["classes"].items():
        x = lat[klass == c]
        assert v["n"] == len(x)
        assert [v["latency_p50_ns"], v["latency_p99_ns"]] == \
            [float(q) for q in np.quantile(x, [0.5, 0.99])]


values = st.lists(st.integers(0, 2**40 - 1) | st.integers(0, 20), min_size=1, max_size=200)


@settings(max_examples=300, deadline=None)
@given(values, st.lists(values, min_size=1, max_size=4))
def test_quantiles_of_sorted_data_equal_numpy(x, parts) -> None:
    a = np.array(x, dtype=np.int64)
    assert sorted_quantiles(np.sort(a), QS) == [float(q) for q in
                                                np.quantile(a.astype(np.float64), QS)]
    segs = [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    allv = np.concatenate(segs).astype(np.float64)
    assert union_quantiles(segs, QS) == [float(q) for q in np.quantile(allv, QS)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 60)), max_size=80),
       st.lists(st.tuples(st.integers(0, 5), st.integers(0, 60)), min_size=1, max_size=40),
       st.booleans(), st.booleans())
def test_asof_last_and_next_per_key(needles, refs, strict, ordered) -> None:
    """AsOf's row and next row against a scan, time-ordered needles (merge)
    or not (search)."""
    if ordered:
        needles = sorted(needles, key=lambda kt: kt[1])
    k = np.array([a for a, _ in needles], dtype=np.int64)
    t = np.array([b for _, b in needles], dtype=np.int64)
    rk = np.array([a for a, _ in refs], dtype=np.int64)
    rt = np.array([b for _, b in refs], dtype=np.int64)
    j, q = AsOf(rk, rt, 6, strict)(k, t)
    for i, (key, x) in enumerate(needles):
        before = [(rt[r], r) for r in range(len(refs))
                  if rk[r] == key and (rt[r] < x if strict else rt[r] <= x)]
        after = [(rt[r], r) for r in range(len(refs))
                 if rk[r] == key and not (rt[r] < x if strict else rt[r] <= x)]
        assert j[i] == (max(before)[1] if before else -1)  # ties: the later row
        assert q[i] == (min(after)[1] if after else -1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2, max_size=60),
       st.sampled_from(changepoint.DIRECTIONS), st.integers(1, 4))
def test_changepoint_statistics_equal_the_formula(values, direction, m) -> None:
    """The in-place statistics, row by row, against the docstring's formula
    evaluated one split at a time."""
    r = changepoint._ranks(np.array(values))
    n = len(r)
    if n < 2 * m:
        return
    rows = np.stack([r, r[::-1]])
    z = changepoint._statistics(rows, m, direction)
    for got, ranks in zip(z, rows, strict=True):
        head = np.cumsum(ranks)
        for i, t in enumerate(range(m, n - m + 1)):
            want = (n * (n + 1) / 2 - head[t - 1] - (n - t) * (n + 1) / 2) \
                / math.sqrt(t * (n - t) * (n + 1) / 12)
            want = {"up": want, "down": -want, "both": abs(want)}[direction]
            assert got[i] == want
