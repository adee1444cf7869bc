"""analysis on the committed REAL recordings: this host's (tracepoint backend,
kvm_pvm with kvm.mmio_caching=N) and the nested lab VM's (kprobe backend,
real MMIO SPTEs).  Expected counts come from the raw rows (tests/analysis_ref)
and from the workload's own counters (workload.json), never from analysis."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from analysis_ref import reference, rows

import analysis
from analysis.report import write_report

DATA = Path(__file__).resolve().parent / "data"
HOST = DATA / "host-microvm"
# The nested lab VM's recording (kprobe backend inside the L1).
NESTED = next((DATA / n for n in ("nested-microvm", "labvm-microvm-kprobe")
               if (DATA / n / "manifest.json").exists()), DATA / "nested-microvm")


def _truth_changes(run: Path) -> dict[str, int]:
    """Memslot changes the workload itself made (its own counters)."""
    truth = run / "truth.json"
    if truth.exists():
        changes = json.loads(truth.read_text())["memslot_changes"]
        return dict(Counter(c["change"] for c in changes if c.get("ret", 0) == 0))
    wl = json.loads((run / "workload.json").read_text())
    return {k: v for k, v in wl["memslot_counts"].items() if v}


def _need(run: Path) -> None:
    if not (run / "manifest.json").exists():
        pytest.skip(f"recording {run.relative_to(DATA.parent.parent)} not committed yet")


@pytest.mark.parametrize("run", [HOST, NESTED], ids=["host", "nested"])
def test_classes_and_attribution_match_raw_rows(run: Path) -> None:
    _need(run)
    corr = analysis.correlate(analysis.load(run))
    ref = reference(run)
    assert corr.faults["klass"].astype(str).tolist() == ref.classes
    assert corr.faults["cause"].fillna(-1).astype(int).tolist() == ref.causes
    assert corr.faults["epoch_update"].fillna(-1).astype(int).tolist() == ref.openers
    upd = corr.updates
    if upd["n_slow"].notna().any():
        assert {int(i): int(v) for i, v in upd["n_slow"].items() if v} == ref.n_slow
        for i, c in ref.cost.items():
            assert upd.loc[i, "cost_ns"] == pytest.approx(c, rel=1e-9, abs=1e-3)
    s = analysis.summarize(run)
    assert s["mmio_faults"] == len(rows(run, "mmio_fault"))
    assert s["memslot_updates"] == len(rows(run, "memslot_update"))
    assert s["mmio_latency_p50_ns"] > 0


def test_host_recording() -> None:
    """kvm_pvm: updates, MMIO exits with latency, no SPTE evidence at all."""
    _need(HOST)
    wl = json.loads((HOST / "workload.json").read_text())
    corr = analysis.correlate(analysis.load(HOST))
    s = analysis.summarize(corr)
    # The micro-VMM's own counters are the ground truth.
    assert s["updates_by_change"] == _truth_changes(HOST)
    assert s["mmio_accesses"] == len(rows(HOST, "mmio_access"))
    assert s["lost_events"] == 0
    assert set(corr.faults["klass"].astype(str)) == {"unknown"}
    assert s["slow_share"] is None and s["update_cost_p50_ns"] is None
    assert any("mmio_caching=N" in m for m in s["missing"])
    # Each update falls inside the rig action that made it.
    actions = corr.updates["action"].astype(str).tolist()
    assert actions == ["memslot_" + c for c in corr.updates["change"].astype(str)]
    # kvm_pvm flushes on DELETE and MOVE: each zap-all sits in such an update.
    zaps = corr.zaps
    n_flush = sum(wl["memslot_counts"].get(c, 0) for c in ("delete", "move"))
    assert len(zaps) == n_flush
    assert (zaps["reason"] == "slot flush").all()
    causes = corr.updates.loc[zaps["update"].astype(int), "change"].astype(str)
    assert set(causes) <= {"delete", "move"}
    # Every MMIO exit after the first update is counted in exactly one epoch.
    first_end = corr.updates["end_ns"].min()
    after = sum(1 for f in rows(HOST, "mmio_fault") if f["exit_ns"] >= first_end)
    assert int(corr.updates["epoch_faults"].sum()) == after


def test_nested_recording_follows_the_kernel_rules() -> None:
    """Debian 6.1 KVM in the nested L1 (rig-facts): CREATE/FLAGS_ONLY -> one
    stale check per MMIO page then re-mark; DELETE -> SPTEs rebuilt after a
    zap-all, no stale check."""
    _need(NESTED)
    corr = analysis.correlate(analysis.load(NESTED))
    f, upd = corr.faults, corr.updates
    counts = Counter(f["klass"].astype(str))
    assert counts["fast"] > 0 and counts["unknown"] == 0
    assert (f["latency_ns"] > 0).all()
    seen: set[int] = set()
    charged_any = False
    for i, u in upd[upd["ok"]].sort_values("end_ns").iterrows():
        epoch = f[f["epoch_update"] == i]
        touched_before = set(epoch["gfn"]) & seen
        slow_pages = epoch.loc[~epoch["klass"].isin(["fast", "vcpu_cache"]), "gfn"]
        if str(u["change"]) in ("create", "flags_only"):
            # One stale check per page that had an SPTE, then re-marked in place.
            assert int(u["n_stale"]) == len(touched_before)
            assert set(epoch.loc[epoch["klass"] == "stale", "gfn"]) == touched_before
        elif str(u["change"]) in ("delete", "move"):
            # SPTEs were zapped: rebuilt once per page, never a stale check.
            assert int(u["n_stale"]) == 0
            assert int(u["n_after_zap"]) == len(touched_before)
            assert slow_pages.is_unique
        charged_any |= bool(u["n_slow"])
        seen |= set(epoch["gfn"])
    assert charged_any
    # The kernel's own generation at each check is that of the epoch the
    # fault was joined to (masked to the 19 MMIO generation bits).
    checked = f[f["kvm_gen"].notna()]
    assert len(checked) > 0
    assert (checked["kvm_gen"].astype("int64") ==
            (checked["epoch_gen"].astype("int64") & ((1 << 19) - 1))).all()
    zaps = corr.zaps
    assert (zaps["reason"] == "slot flush").all()
    s = analysis.summarize(corr)
    assert s["updates_by_change"] == _truth_changes(NESTED)
    assert s["lost_events"] == 0
    assert s["slow_share"] is not None and 0 < s["slow_share"] < 1


def test_reports_on_real_recordings(tmp_path: Path) -> None:
    runs = [r for r in (NESTED, HOST) if (r / "manifest.json").exists()]
    if not runs:
        pytest.skip("no real recording committed yet")
    out = write_report(runs, tmp_path / "r.html")
    text = out.read_text()
    assert text.count("data:image/png;base64,") >= 3 * len(runs)
    for r in runs:
        m = json.loads((r / "manifest.json").read_text())
        assert m["host"]["kernel"] in text and str(m["backend"]) in text


def test_nested_classes_agree_with_the_independent_tracefs_capture() -> None:
    """The L1 kernel's own tracefs saw the same run: valid checks = fast hits,
    invalid checks = stale faults, marks = every re-marked class, zap-alls."""
    import gzip
    import re
    trace = NESTED / "tracefs-trace.txt.gz"
    if not trace.exists():
        pytest.skip(f"{trace.name} not committed with {NESTED.name}")
    lines = gzip.decompress(trace.read_bytes()).decode().splitlines()
    checks = [re.search(r"check_mmio_spte: .* valid (\d)", x) for x in lines]
    valid = sum(1 for m in checks if m and m.group(1) == "1")
    invalid = sum(1 for m in checks if m and m.group(1) == "0")
    marks = sum("mark_mmio_spte:" in x for x in lines)
    zaps = sum("kvm_mmu_zap_all_fast" in x for x in lines)
    gens = [int(m.group(1)) for x in lines if (m := re.search(r"invalidate_mmio.* gen=(\d+)", x))]
    corr = analysis.correlate(analysis.load(NESTED))
    counts = Counter(corr.faults["klass"].astype(str))
    assert counts["fast"] == valid
    assert counts["stale"] == invalid
    assert sum(counts[c] for c in ("stale", "first_touch", "during_update", "after_zap")) == marks
    assert len(corr.zaps) == zaps
    inv = corr.timeline[corr.timeline["kind"] == "invalidate"]
    assert [int(g) for g in inv["gen"]] == gens
