"""Property tests (hypothesis) of the epoch join on generated streams."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import analysis
from analysis.joins import asof_index
from recording.schema import CHANGE_TYPES
from recording.writer import RunWriter

keys_times = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50)), max_size=60)


@given(left=keys_times, right=keys_times, strict=st.booleans())
def test_asof_index_is_a_per_key_asof_join(left, right, strict) -> None:
    lk = np.array([k for k, _ in left], dtype=np.int64)
    lt = np.array([t for _, t in left], dtype=np.int64)
    rk = np.array([k for k, _ in right], dtype=np.int64)
    rt = np.array([t for _, t in right], dtype=np.int64)
    got = asof_index(lk, lt, rk, rt, strict=strict)
    for i, (k, t) in enumerate(left):
        cands = [(rt[j], j) for j in range(len(right))
                 if rk[j] == k and (rt[j] < t if strict else rt[j] <= t)]
        if not cands:
            assert got[i] == -1
        else:  # ties between equal times: any of them is the same instant
            assert rk[got[i]] == k and rt[got[i]] == max(cands)[0]


@st.composite
def streams(draw):
    """Per VM: non-overlapping update windows (the kernel serialises them)
    and faults anywhere, boundaries included."""
    n_vms = draw(st.integers(1, 3))
    updates, faults = [], []
    for vm in range(n_vms):
        t = draw(st.integers(0, 20))
        for _ in range(draw(st.integers(0, 6))):
            begin = t + draw(st.integers(0, 30))
            end = begin + draw(st.integers(0, 10))
            updates.append((vm, begin, end, draw(st.sampled_from(CHANGE_TYPES[:4])),
                            draw(st.sampled_from([0, 0, 0, -22]))))
            t = end + 1
        for _ in range(draw(st.integers(0, 25))):
            faults.append((vm, draw(st.integers(0, t + 20)), draw(st.integers(0, 2)),
                           draw(st.sampled_from(["fast", "stale", "mark", "none"]))))
    return updates, faults


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_epoch_join_on_generated_streams(stream) -> None:
    updates, faults = stream
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        w = RunWriter(run, {"backend": "kprobe"})
        for i, (vm, b, e, change, ret) in enumerate(updates):
            w["memslot_update"].append({
                "begin_ns": b, "end_ns": e, "pid": 1, "tid": 1, "vm": 100 + vm, "as_id": 0,
                "slot_id": i, "change": change, "base_gfn": 0, "npages": 1, "flags": 0,
                "userspace_addr": 0, "gen_before": 2 * i, "gen_after": 2 * i + 2, "ret": ret})
        for vm, t, gfn, kind in faults:
            w["mmio_fault"].append({
                "exit_ns": t, "latency_ns": 1000 if kind == "fast" else 9000, "pid": 1,
                "tid": 2, "vm": 100 + vm, "vcpu": 0, "exit_reason": 0, "gpa": gfn << 12,
                "gfn": gfn, "kvm_gen": 0, "spte_gen": 0, "stale": kind == "stale",
                "remarked": kind in ("stale", "mark"), "fast_hit": kind == "fast",
                "is_write": False, "len": 4, "to_user": False, "reentered": True})
        w.close()
        corr = analysis.correlate(analysis.load(run))
    f = corr.faults
    ok = [(i, u) for i, u in enumerate(updates) if u[4] == 0]
    for row, (vm, t, _, kind) in zip(f.itertuples(), faults, strict=True):
        ended = [(u[2], i) for i, u in ok if u[0] == vm and u[2] <= t]
        opener = max(ended)[1] if ended else None
        got = None if str(row.epoch_update) == "<NA>" else int(row.epoch_update)
        assert got == opener
        if opener is not None:
            assert int(row.since_update_ns) == t - updates[opener][2]
        running = [i for i, u in ok if u[0] == vm and u[1] <= t < u[2]]
        if kind in ("stale", "mark") and running:
            assert row.klass == "during_update" and int(row.cause) == running[0]
        elif kind == "fast":
            assert row.klass == "fast"
        elif kind == "none":  # no SPTE evidence: the vCPU's MMIO cache, if the run has any
            has = any(k != "none" for _, _, _, k in faults)
            assert row.klass == ("vcpu_cache" if has else "unknown")
        if row.klass == "stale":  # charged to its epoch's update, if one was recorded
            assert (None if str(row.cause) == "<NA>" else int(row.cause)) == opener
    # Every charged fault is counted once, on its own VM's update.
    charged = f["cause"].dropna().astype(int)
    assert int(corr.updates["n_slow"].fillna(0).sum()) == len(charged)
    for fi, ui in charged.items():
        assert int(corr.updates.loc[ui, "vm"]) == int(f.loc[fi, "vm"])


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 2**40 - 1)), min_size=1,
                max_size=80))
def test_group_medians(pairs) -> None:
    from analysis.joins import group_medians
    k = np.array([a for a, _ in pairs], dtype=np.int64)
    v = np.array([b for _, b in pairs], dtype=np.int64)
    ids, meds = group_medians(k, v)
    assert list(ids) == sorted(set(k.tolist()))
    for i, m in zip(ids, meds, strict=True):
        assert m == np.median(v[k == i])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10**9), min_size=1, max_size=300),
       st.sampled_from([0.01, 0.5, 0.9, 0.99, 1.0]))
def test_hist_quantile_within_its_bucket(lat: list[int], q: float) -> None:
    """A log2 histogram's quantile is at most one bucket (2x) from the exact one."""
    from collections import Counter

    from recording.schema import hist_quantile
    buckets = Counter(v.bit_length() - 1 for v in lat)  # bpf log2_u64: floor(log2)
    got = hist_quantile(list(buckets), list(buckets.values()), q)
    exact = float(np.quantile(np.array(lat, dtype=float), q, method="inverted_cdf"))
    assert got is not None
    assert 2 ** (int(exact).bit_length() - 1) <= got <= 2 ** int(exact).bit_length()
