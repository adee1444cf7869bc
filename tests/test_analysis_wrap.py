"""The generation wrap and its invariant (analysis/wrap.py, issue #13): after
a wrap no MMIO fault may be a fast hit served by an SPTE marked before it.

Simulated recordings written through the recording format, checked against
the simulator's truth and against a naive reading of the raw rows; one of
them edited on disk into a violation; the committed real recordings."""

from __future__ import annotations

import bisect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from wrap_edits import AS, masked, rows, violate

import analysis
from analysis import simulator
from analysis.report import write_report
from analysis.wrap import COLUMNS, wrap_verdicts
from recording.schema import SCHEMAS

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
KERNEL_BITS = 19
PAGES = 4


def naive_wraps(run: Path, bits: int, asn: int = AS) -> list[dict[str, Any]]:
    """The invariant restated one row at a time (no pandas, no numpy)."""
    gens = rows(run, "generation")
    faults = sorted(rows(run, "mmio_fault"), key=lambda f: f["exit_ns"])
    updates = [u for u in rows(run, "memslot_update") if u["ret"] == 0]
    wraps = sorted((g["vm"], g["ns"], g["gen"]) for g in gens
                   if g["source"] == "invalidate" and masked(g["gen"], bits, asn) == 0)
    # Each VM's generation steps: update begin (the generation before, in
    # progress), each invalidate, update end; ties in that order.
    steps: dict[int, list[tuple[int, int, int]]] = {}
    for u in updates:
        steps.setdefault(u["vm"], []).extend([(u["begin_ns"], 0, u["gen_before"]),
                                              (u["end_ns"], 2, u["gen_after"])])
    for g in gens:
        if g["source"] == "invalidate":
            steps.setdefault(g["vm"], []).append((g["ns"], 1, g["gen"]))
    for v in steps.values():
        v.sort()

    def gen_at(vm: int, t: int) -> int:
        """Before the first step: the first update's generation before."""
        i = bisect.bisect_right(steps[vm], (t, 3, 0))
        return masked(steps[vm][max(i - 1, 0)][2], bits, asn)

    out = []
    for i, (vm, ns, gen) in enumerate(wraps):
        prev = max([n for v, n, _ in wraps[:i] if v == vm], default=-1)
        nxt = min([n for v, n, _ in wraps[i + 1:] if v == vm], default=2**63)
        marks: dict[int, int] = {}
        for f in faults:
            if f["vm"] == vm and f["remarked"] and prev <= f["exit_ns"] < ns:
                marks[f["gfn"]] = f["exit_ns"]
        after = [f for f in faults if f["vm"] == vm and ns <= f["exit_ns"] < nxt]
        first: dict[int, dict[str, Any]] = {}
        remark: dict[int, int] = {}
        violations = []
        for f in after:
            if f["fast_hit"] or f["stale"] or f["remarked"]:
                first.setdefault(f["gfn"], f)
            if f["remarked"]:
                remark.setdefault(f["gfn"], f["exit_ns"])
            if f["fast_hit"] and f["gfn"] not in remark:
                violations.append(f)
        touched = [p for p in marks if p in first]
        ends = [remark[p] for p in marks if p in remark]
        out.append({
            "vm": vm, "wrap_ns": ns, "gen": gen,
            "pages_marked_before": len(marks),
            "stale_equal_pages": sum(gen_at(vm, first[p]["exit_ns"]) == gen_at(vm, marks[p])
                                     for p in touched),
            "rebuilt_pages": sum(bool(first[p]["remarked"] and not first[p]["fast_hit"])
                                 for p in touched),
            "violations": len(violations),
            "burst_faults": sum(1 for f in after if (f["stale"] or f["remarked"])
                                and not f["fast_hit"] and ends and f["exit_ns"] <= max(ends)),
        })
    return out


def check_against_naive(run: Path, w: Any, bits: int) -> None:
    ref = naive_wraps(run, bits)
    got = w.sort_values(["vm", "wrap_ns"]).to_dict("records")
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        for k, v in r.items():
            assert g[k] == v, (k, g, r)


@pytest.fixture(scope="module")
def revisit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, simulator.Truth]:
    """At the kernel's width: pages marked 4 swaps before the wrap, 2**19 / 2
    swaps with no MMIO, then every page touched again at its mark's masked
    generation, so only the wrap's zap-all stands between them and fast hits."""
    run = tmp_path_factory.mktemp("wrap") / "revisit"
    truth = simulator.simulate(run, seed=4, pages=PAGES, events=300, p_update=0.01,
                               changes=("create", "flags_only"),
                               start_gen=2**KERNEL_BITS - 2 * AS,
                               revisit_swaps=2**KERNEL_BITS // AS)
    return run, truth


@pytest.fixture(scope="module")
def revisit_corr(revisit) -> analysis.Correlation:
    return analysis.correlate(analysis.load(revisit[0]))


def test_wrap_at_kernel_width_held(revisit, revisit_corr) -> None:
    run, truth = revisit
    w = wrap_verdicts(revisit_corr)
    assert list(w.columns) == COLUMNS
    assert [(int(v), int(g)) for v, g in zip(w["vm"], w["gen"], strict=True)] == truth.wraps
    x = w.iloc[0]
    assert x["gen"] == 2**KERNEL_BITS and x["swap"] == 262_144 == x["predicted_swap"]
    assert x["wrap_from"] == "invalidate"
    assert x["zap_on_time"] and x["zap_ns"] >= x["wrap_ns"]
    assert x["verdict"] == "held" and x["violations"] == 0
    # The interesting case was exercised: every page came back at its mark's gen.
    assert x["pages_marked_before"] == x["stale_equal_pages"] == x["rebuilt_pages"] == PAGES
    assert x["burst_faults"] >= PAGES and x["burst_ns"] > 0
    assert x["first_fault_p50_ns"] > x["fast_hit_p50_ns"] > 0 and x["burst_extra_ns"] > 0
    assert x["forecast_error_s"] >= 0 and x["forecast_wrap_ns"] > 0
    check_against_naive(run, w, KERNEL_BITS)

    s = analysis.summarize(revisit_corr)
    assert s["wrap_invariant"] == "held"
    assert [(v["swap"], v["verdict"], v["zap_on_time"]) for v in s["wraps"]] == \
        [(g // AS, "held", True) for _, g in truth.wraps]
    assert s["wraps"][0]["stale_equal_pages"] == PAGES
    json.dumps(s)


def test_violation_is_named(revisit, tmp_path: Path) -> None:
    run = tmp_path / "violated"
    bad = violate(revisit[0], run, KERNEL_BITS)
    assert bad["spte_gen"] == masked(2**KERNEL_BITS - 2 * AS, KERNEL_BITS)
    corr = analysis.correlate(analysis.load(run))
    w = wrap_verdicts(corr)
    x = w.iloc[0]
    text = (f"fault at ns {bad['exit_ns']} on gpa {bad['gpa']:#x}, spte_gen "
            f"{bad['spte_gen']} from before the wrap")
    assert x["verdict"] == "violated: " + text and x["first_violation"] == text
    assert x["violation_ns"] == bad["exit_ns"] and x["violation_gpa"] == bad["gpa"]
    # Still touched at its mark's gen, but served fast instead of rebuilt.
    assert x["violations"] >= 1 and x["stale_equal_pages"] == PAGES
    assert x["rebuilt_pages"] == PAGES - 1
    check_against_naive(run, w, KERNEL_BITS)
    assert analysis.summarize(corr)["wrap_invariant"] == "violated"

    p = subprocess.run([sys.executable, "-m", "slotscope", "analyze", str(run)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "wrap invariant: violated" in p.stdout
    words = p.stdout.split()
    assert str(bad["exit_ns"]) in words and f"{bad['gpa']:#x}," in words
    assert max(len(line) for line in p.stdout.splitlines()) <= 80


def test_report_wrap_section(tmp_path: Path) -> None:
    """A small wrap recording (5-bit generations), held and then violated."""
    run = tmp_path / "held"
    simulator.simulate(run, seed=1, pages=3, events=300, gen_bits=5, start_gen=26,
                       revisit_swaps=16, changes=("create", "flags_only"))
    html = write_report(run, tmp_path / "held.html").read_text()
    assert "Generation wraps: the zap-all invariant" in html
    assert '<b class="ok">held</b>' in html and "<td>held</td>" in html
    bad = violate(run, tmp_path / "violated", 5)
    html = write_report(tmp_path / "violated", tmp_path / "bad.html").read_text()
    assert '<b class="bad">violated</b>' in html
    assert f"on gpa {bad['gpa']:#x}, spte_gen {bad['spte_gen']}" in html


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simulated_wraps_hold(tmp_path: Path, seed: int) -> None:
    """The simulator follows the kernel's rules (DELETE/MOVE flushes, faults
    during updates, two VMs), so every wrap it makes must hold."""
    run = tmp_path / "run"
    truth = simulator.simulate(run, seed=seed, vms=2, pages=3, events=1500, p_update=0.06,
                               gen_bits=4, start_gen=10, revisit_swaps=8)
    w = wrap_verdicts(analysis.correlate(analysis.load(run)))
    assert sorted((int(v), int(g)) for v, g in zip(w["vm"], w["gen"], strict=True)) == \
        sorted(truth.wraps)
    assert len(w) >= 4
    assert (w["verdict"] == "held").all() and w["zap_on_time"].all()
    assert (w["predicted_swap"] == w["swap"]).all()
    assert (w["stale_equal_pages"] > 0).any()
    check_against_naive(run, w, 4)


def test_wraps_from_updates_without_generation_rows(tmp_path: Path) -> None:
    """No invalidate rows (a backend without them): a wrap is an update whose
    generations cross a multiple of 2**B, placed at the update's end."""
    run = tmp_path / "run"
    truth = simulator.simulate(run, seed=1, pages=3, events=400, gen_bits=5, start_gen=26,
                               revisit_swaps=16, changes=("create", "flags_only"))
    empty = pa.Table.from_pylist([], schema=SCHEMAS["generation"])
    pq.write_table(empty, run / "generation.parquet")
    w = wrap_verdicts(analysis.correlate(analysis.load(run)))
    assert [int(g) for g in w["gen"]] == [g for _, g in truth.wraps]
    assert (w["wrap_from"] == "update").all()
    ends = {u["gen_after"]: u["end_ns"] for u in rows(run, "memslot_update")}
    assert [int(t) for t in w["wrap_ns"]] == [ends[g] for _, g in truth.wraps]
    assert (w["verdict"] == "held").all() and (w["predicted_swap"] == w["swap"]).all()
    assert w["stale_equal_pages"].iloc[0] == 3


def test_no_evidence(tmp_path: Path) -> None:
    run = tmp_path / "run"
    simulator.simulate(run, seed=1, pages=3, events=200, gen_bits=5, start_gen=26,
                       revisit_swaps=16, changes=("flags_only",))
    faults = rows(run, "mmio_fault")
    for f in faults:
        f.update(fast_hit=False, stale=False, remarked=False)
    pq.write_table(pa.Table.from_pylist(faults, schema=SCHEMAS["mmio_fault"]),
                   run / "mmio_fault.parquet")
    s = analysis.summarize(run)
    assert s["wraps"] and all(v["verdict"] == "no evidence" for v in s["wraps"])
    assert s["wrap_invariant"] == "no evidence"


def test_no_wraps(tmp_path: Path, capsys) -> None:
    from slotscope.cli import main
    run = tmp_path / "run"
    simulator.simulate(run, seed=3, vms=2, events=1000, p_update=0.05)
    corr = analysis.correlate(analysis.load(run))
    w = wrap_verdicts(corr)
    assert len(w) == 0 and list(w.columns) == COLUMNS
    s = analysis.summarize(corr)
    assert s["wraps"] == [] and s["wrap_invariant"] == "none"
    assert main(["analyze", str(run)]) == 0
    assert "wrap invariant" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["host-microvm", "labvm-microvm-kprobe", "nested-microvm"])
def test_committed_recordings_have_no_wrap(name: str) -> None:
    s = analysis.summarize(DATA / name)
    assert s["wraps"] == [] and s["wrap_invariant"] == "none"
    assert s["mmio_faults"] > 0
