"""The tracer on the live kernel (bcc), against the micro-VMM's own counts.

On this host that is the tracepoint-only backend; the kprobe/kfunc backends
run in the nested lab VM (tests/test_labvm*).  Nothing here is mocked: real
BPF programs, a real /dev/kvm workload, real Parquet files.  One file of
~550 lines sharing the micro-VMM and recorder helpers; the decoding,
sampling and coexistence tests that need none of them have files of their
own (test_tracer_decode/_sample/_coexist).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import needs_bcc, needs_kvm, needs_root
from tracer_procs import SLOTSCOPE, Workload, start_tracer

from recording.reader import read_run

pytestmark = [needs_root, needs_kvm, needs_bcc]

M = 4000


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], str]:
    tmp = tmp_path_factory.mktemp("rec")
    wl = Workload(M, truth=tmp / "truth.json")
    rec = start_tracer("record", "-p", str(wl.pid), "-o", str(tmp / "run"))
    truth = wl.go()
    _, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    return read_run(tmp / "run"), truth, err


def test_memslot_updates_exact(recording: tuple[Any, dict[str, Any], str]) -> None:
    run, truth, _ = recording
    assert_memslots_exact(run, truth)


def assert_memslots_exact(run: Any, truth: dict[str, Any]) -> None:
    """The recording's memslot_update rows are exactly the VMM's ioctls."""
    df = run.tables["memslot_update"].to_pandas()
    want = truth["memslot_changes"]
    assert len(df) == len(want) == 10  # setup slot 0 + 9 scheduled
    vm = truth["pid"] << 32 | truth["vm_fd"]
    for row, w in zip(df.itertuples(), want, strict=True):
        assert row.slot_id == w["slot"] and row.as_id == 0
        assert row.change == w["change"]
        assert row.base_gfn << 12 == w["gpa"]
        assert row.npages << 12 == w["size"]
        assert row.flags == w["flags"]
        assert row.userspace_addr == w["userspace_addr"]
        assert row.ret == w["ret"] == 0
        assert row.vm == vm and row.pid == truth["pid"]
        # same clock: the VMM's timestamps around its ioctl bracket the syscall's
        assert w["begin_ns"] <= row.begin_ns <= row.end_ns <= w["end_ns"]
    assert Counter(df.change) == {"create": 4, "flags_only": 2, "move": 2, "delete": 2}


def test_mmio_access_exact(recording: tuple[Any, dict[str, Any], str]) -> None:
    run, truth, _ = recording
    df = run.tables["mmio_access"].to_pandas()
    # a read exits as 'unsatisfied-read' and is traced again as 'read' when
    # KVM completes it on the next KVM_RUN
    assert dict(Counter(df["type"].astype(str))) == {
        "unsatisfied-read": truth["mmio_reads"], "read": truth["reads_completed"],
        "write": truth["mmio_writes"]}
    assert truth["mmio_exits"] == M
    exits = df[df["type"] != "read"]
    assert len(exits) == M
    by_page = Counter(exits.gpa)
    assert {f"{g:#x}": n for g, n in by_page.items()} == {
        p: c["read"] + c["write"] for p, c in truth["mmio_by_page"].items()}
    assert set(df.vcpu) == {0} and set(df.tid) == {truth["tid"]}
    assert set(df.vm) == {truth["pid"] << 32 | truth["vm_fd"]}


def test_coalesced_rate_exact(tmp_path: Path) -> None:
    """The micro-VMM's highest rate: coalesced MMIO writes complete in the
    kernel (one kvm_mmio each, >100k/s here) and the recording still holds
    every access, per page, every memslot update, and loses nothing."""
    n = 500_000
    wl = Workload(n, truth=tmp_path / "t.json", coalesced=True)
    rec = start_tracer("record", "-p", str(wl.pid), "-o", str(tmp_path / "run"))
    truth = wl.go()
    _, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    assert truth["mode"] == "coalesced" and truth["mmio_exits"] == n
    assert truth["mmio_in_kernel"] > 50 * truth["mmio_user_exits"]
    run = read_run(tmp_path / "run")
    rate = f"at {truth['mmio_exits_per_s']:.0f} accesses/s, drain {run.manifest.get('drain')}"
    assert set(run.manifest["lost"].values()) == {0}, rate
    df = run.tables["mmio_access"].to_pandas()
    assert len(df) == n, rate
    assert set(df["type"].astype(str)) == {"write"}
    assert {f"{g:#x}": c for g, c in Counter(df.gpa).items()} == {
        p: c["write"] for p, c in truth["mmio_by_page"].items()}
    assert set(df.tid) == {truth["tid"]} and set(df.vcpu) == {0}
    assert_memslots_exact(run, truth)


def _record_in_process(tmp: Path, wl: Workload, caps: Any) -> Any:
    from tracer.recorder import Recorder
    rec = Recorder(tmp, pids=[wl.pid], caps=caps, stop_when_pids_exit=True)
    rec.start_thread()
    try:
        wl.go()
        time.sleep(0.2)
    finally:
        rec.stop()
    return read_run(tmp)


@pytest.mark.parametrize("coalesced", [False, True], ids=["exits", "coalesced-2-vcpus"])
def test_mmio_raw_and_classic_same_rows(tmp_path: Path, coalesced: bool) -> None:
    """kvm_mmio attached raw (TP_PROTO arguments, the data read through
    its pointer) records what the classic tracepoint does, timestamps aside;
    without raw (or the expected prototype) the classic one is attached.
    Two coalesced vCPUs write their index (0, 1): the value is checked.
    (kvm_exit, kvm_entry and check_mmio_spte never fire on kvm_pvm: the
    nested L1 test compares those raw and classic.)"""
    from tracer.capabilities import probe
    caps = probe(try_kfunc=False, try_bpf=False)
    if not caps.is_raw("kvm:kvm_mmio"):
        pytest.skip(f"kvm_mmio not raw here: {caps.raw['kvm:kvm_mmio'].why}")
    rows, faults = {}, {}
    for raw in (True, False):
        wl = (Workload(20_000, pages=2, vcpus=2, coalesced=True) if coalesced
              else Workload(2_000, pages=2))
        run = _record_in_process(tmp_path / str(raw), wl, caps if raw else caps.classic())
        assert set(run.manifest["lost"].values()) == {0}
        assert ("raw_tracepoint:kvm_mmio" if raw else "kvm:kvm_mmio") \
            in run.manifest["probes_attached"]
        cols = ["vcpu", "type", "len", "gpa", "val"]
        df = run.tables["mmio_access"].to_pandas()[cols]
        # two vCPUs interleave by timing: compare counts; one vCPU: row by row
        rows[raw] = (df.groupby(cols, observed=True).size() if coalesced
                     else df.reset_index(drop=True))
        fault = run.tables["mmio_fault"].to_pandas()
        faults[raw] = fault[[c for c in fault.columns if not c.endswith("ns")
                             and c not in ("pid", "tid", "vm")]].reset_index(drop=True)
    assert rows[True].equals(rows[False])
    if coalesced:
        assert set(rows[True].reset_index().val) == {0, 1}
    else:
        assert faults[True].equals(faults[False])


def test_native_loop_recorded_exactly(tmp_path: Path) -> None:
    """The micro-VMM's exit loop in C (--native, the benches' fast L2): every
    memslot update and MMIO exit recorded, against its truth."""
    wl = Workload(20_000, truth=tmp_path / "t.json", native=True)
    rec = start_tracer("record", "-p", str(wl.pid), "-o", str(tmp_path / "run"))
    truth = wl.go()
    _, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    assert truth["loop"] == "c" and truth["mmio_exits"] == 20_000
    run = read_run(tmp_path / "run")
    assert set(run.manifest["lost"].values()) == {0}
    assert_memslots_exact(run, truth)
    df = run.tables["mmio_access"].to_pandas()
    assert (df["type"] != "read").sum() == truth["mmio_exits"]
    assert (df["type"] == "read").sum() == truth["reads_completed"]
    assert len(run.tables["mmio_fault"]) == truth["mmio_exits"]


def test_mmio_fault_intervals(recording: tuple[Any, dict[str, Any], str]) -> None:
    run, truth, _ = recording
    df = run.tables["mmio_fault"].to_pandas()
    # every MMIO exit is an interval; the last was never re-entered (the
    # micro-VMM stops there): the vCPU thread's exit closed it, marked
    assert len(df) == M
    assert (df.latency_ns > 0).all() and df.to_user.all()
    assert list(df.reentered) == [True] * (M - 1) + [False]
    assert df.exit_ns.is_monotonic_increasing
    # the analysis counts it apart, out of the latency figures
    out = subprocess.run([sys.executable, "-m", "slotscope", "analyze", str(run.path)],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    assert f"MMIO faults {M - 1:,} (+1 unfinished)" in out
    assert abs(int(df.is_write.sum()) - truth["mmio_writes"]) <= 1
    assert {f"{g:#x}" for g in df.gpa} == set(truth["mmio_by_page"])
    assert set(df.vcpu) == {0}


def test_manifest_and_lost(recording: tuple[Any, dict[str, Any], str]) -> None:
    run, truth, err = recording
    m = run.manifest
    assert m["backend"] == "tracepoint" and m["complete"]
    assert m["filters"]["pids"] == [truth["pid"]]
    # raw where this kernel's BTF shows kvm_mmio's prototype, the ioctls by
    # fentry where it allows (tracer.capabilities)
    from tracer.capabilities import probe
    caps = probe(try_kfunc=False, try_bpf=False)
    assert set(caps.ioctl_probes(m["backend"])) <= set(m["probes_attached"])
    assert ("raw_tracepoint:kvm_mmio" if caps.is_raw("kvm:kvm_mmio") else "kvm:kvm_mmio") \
        in m["probes_attached"]
    assert m["stop_reason"] == "targets exited"
    assert set(m["lost"].values()) == {0}
    assert run.tables["lost"].num_rows == 0
    assert "0 lost" in err
    assert m["rows"]["mmio_access"] == run.tables["mmio_access"].num_rows


def test_aggregate_mode_counts_every_interval(tmp_path: Path) -> None:
    """record --aggregate: MMIO intervals counted in kernel (mmio_hist), no
    per-fault or per-access rows; the counts must still be exact."""
    wl = Workload(M, truth=tmp_path / "truth.json")
    rec = start_tracer("record", "--aggregate", "-p", str(wl.pid), "-o", str(tmp_path / "run"))
    truth = wl.go()
    _, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    run = read_run(tmp_path / "run")
    m = run.manifest
    assert m["mode"] == "aggregate" and not m["emit_mmio_access"]
    assert set(m["lost"].values()) == {0}
    assert run.tables["mmio_fault"].num_rows == run.tables["mmio_access"].num_rows == 0
    assert_memslots_exact(run, truth)
    h = run.tables["mmio_hist"].to_pandas()
    # the same intervals as streaming: every MMIO exit, the last unfinished
    assert int(h["count"].sum()) == m["mmio_faults_aggregated"] == M
    assert int(h.loc[~h.reentered, "count"].sum()) == 1
    assert f"{M} MMIO faults in histograms" in err
    assert abs(int(h.loc[h.is_write, "count"].sum()) - truth["mmio_writes"]) <= 1
    assert h.to_user.all() and not h.checked.any() and h.exit_reason.isna().all()
    assert set(h.vcpu) == {0} and set(h.pid) == {truth["pid"]}
    assert set(h.vm) == {truth["pid"] << 32 | truth["vm_fd"]}
    # each row's mean latency lies inside its log2 bucket
    mean = h.sum_ns / h["count"]
    assert ((mean >= 2.0 ** h.log2_ns) & (mean < 2.0 ** (h.log2_ns + 1))).all()
    assert (h["count"] > 0).all()
    # the analysis reads the same figures from the histograms
    from analysis import summarize
    s = summarize(tmp_path / "run")
    assert s["mmio_faults"] == M - 1 and s["mmio_from"].startswith("histograms")
    assert s["unfinished_faults"] == 1  # counted, its partial latency left out
    assert s["classes"]["unknown"]["n"] == M - 1  # kvm_pvm: no MMIO SPTE evidence
    lo, hi = 2.0 ** h.log2_ns.min(), 2.0 ** (h.log2_ns.max() + 1)
    assert lo <= s["mmio_latency_p50_ns"] <= s["mmio_latency_p99_ns"] <= hi
    assert any("aggregate mode" in x for x in s["missing"])


@pytest.mark.parametrize("layout", ["array", "hash", "keys-full"])
def test_aggregate_layouts_count_every_interval(tmp_path: Path, layout: str) -> None:
    """Aggregate mode's two kernel layouts (common.bpf.c): counters in one
    array, a run per key (BPF atomics), or a per-CPU hash (without them,
    forced here), give the same exact histogram.  With every key of the
    array taken, each interval is counted lost, never dropped silently."""
    from dataclasses import replace

    from tracer.capabilities import Raw, probe
    from tracer.recorder import Recorder
    caps = probe(try_kfunc=False, try_bpf=False)
    if layout == "hash":
        caps = replace(caps, atomics=Raw(False, "forced by the test"))
    elif not caps.atomics.ok:
        pytest.skip(caps.atomics.why)
    n = 3000
    wl = Workload(n, "create:1,flags:1", pages=2, truth=tmp_path / "t.json", vcpus=2)
    rec = Recorder(tmp_path / "run", pids=[wl.pid], emit_mmio=False, aggregate=True,
                   caps=caps, stop_when_pids_exit=True)
    rec.start_thread()
    try:
        assert rec.probes.atomics == (layout != "hash")
        if layout == "keys-full":
            nkeys = rec.probes.bpf[b"hist_nkeys"]
            nkeys[ctypes.c_int(0)] = ctypes.c_ulonglong(1 << 20)
        truth = wl.go()
        time.sleep(0.2)
    finally:
        rec.stop()
    run = read_run(tmp_path / "run")
    h = run.tables["mmio_hist"].to_pandas()
    lost = run.manifest["lost"]
    if layout == "keys-full":
        assert h.empty and lost["mmio_fault"] == truth["mmio_exits"] == n
        return
    assert set(lost.values()) == {0}
    got = h.groupby("vcpu")["count"].sum().to_dict()
    assert got == {v["vcpu"]: v["mmio_exits"] for v in truth["per_vcpu"]}
    assert sum(got.values()) == n
    mean = h.sum_ns / h["count"]
    assert ((mean >= 2.0 ** h.log2_ns) & (mean < 2.0 ** (h.log2_ns + 1))).all()


def test_recorder_api_in_process(tmp_path: Path) -> None:
    from tracer.recorder import Recorder
    from vmrig import microvm
    with Recorder(tmp_path / "run", pids=[os.getpid()]) as rec:
        r = microvm.run(1500, pages=2, schedule="create:5,flags:5,move:5,delete:5")
    run = read_run(tmp_path / "run")
    assert rec.counts["memslot_update"] == 5
    assert list(run.tables["memslot_update"].column("change").to_pylist()) == [
        "create", "create", "flags_only", "move", "delete"]
    assert run.tables["mmio_access"].num_rows == sum(microvm.expected_mmio_events(r).values())
    assert set(run.manifest["lost"].values()) == {0}


def test_quiet_recording_drains_less_often(tmp_path: Path) -> None:
    """The drain interval grows while the ring stays nearly empty (each drain
    costs the traced VMM CPU in a small L1), then a burst of 1500 exits in
    the same recording is taken whole."""
    from tracer.recorder import POLL_MAX_MS, POLL_MS, Recorder
    from vmrig import microvm
    rec = Recorder(tmp_path / "run", pids=[os.getpid()]).start()
    try:
        rec.run(duration=2.0)
        assert rec.probes.drain_stats()["max_drain_gap_s"] >= POLL_MAX_MS / 1000 > POLL_MS / 1000
        rec.start_thread()
        r = microvm.run(1500, pages=2, schedule="create:1")
        time.sleep(0.5)
        rec.stop_thread()
    finally:
        rec.close()
    run = read_run(tmp_path / "run")
    assert run.tables["mmio_access"].num_rows == sum(microvm.expected_mmio_events(r).values())
    assert set(run.manifest["lost"].values()) == {0}


def test_signal_while_a_batch_is_written_loses_nothing(tmp_path: Path) -> None:
    """Under stopped_by_signals() (what record/stream/live and the lab run
    under), a SIGTERM landing in the middle of writing a batch only asks for
    a stop: that batch and everything still in the ring are written."""
    from tracer.recorder import Recorder

    class SignalOnFirstRows:
        sent = False

        def write(self, event: str, rows: Any) -> None:
            if not self.sent:  # the first table of the first batch
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)

    wl = Workload(20_000, truth=tmp_path / "t.json", native=True)
    sink = SignalOnFirstRows()
    rec = Recorder(tmp_path / "run", pids=[wl.pid], sinks=[sink]).start()
    with rec.stopped_by_signals():
        try:
            truth = wl.go()  # every event is in the ring before the first poll
            rec.run(duration=30)
        finally:
            rec.close()
    assert sink.sent and rec.stop_requested
    run = read_run(tmp_path / "run")
    assert_memslots_exact(run, truth)
    assert run.tables["mmio_access"].num_rows == truth["mmio_exits"] + truth["reads_completed"]
    assert run.tables["mmio_fault"].num_rows == truth["mmio_exits"]
    assert set(run.manifest["lost"].values()) == {0}


def test_stream_json_lines(tmp_path: Path) -> None:
    wl = Workload(600, "create:4,delete:4", pages=2, truth=tmp_path / "t.json")
    p = start_tracer("stream", "-p", str(wl.pid), "-e", "memslot_update")
    truth = wl.go()
    out, _ = p.communicate(timeout=60)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["event"], r["slot_id"], r["change"]) for r in rows] == [
        ("memslot_update", 0, "create"), ("memslot_update", 4, "create"),
        ("memslot_update", 4, "delete")]
    assert rows[1]["base_gfn"] << 12 == truth["memslot_changes"][1]["gpa"]


def test_live_plain_lines(tmp_path: Path) -> None:
    wl = Workload(3000, "create:4,delete:4", pages=2)
    p = start_tracer("live", "-p", str(wl.pid), "0.3")  # ends when the VMM exits
    wl.go()
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    lines = out.splitlines()
    assert any(line.lstrip().startswith("VM VCPU") for line in lines)
    assert all(len(line) < 80 for line in lines)
    assert any(f"{wl.pid}/" in line for line in lines)


def _one_line_error(args: list[str], match: str) -> None:
    p = subprocess.run([*SLOTSCOPE, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert p.stderr.count("\n") == 1, p.stderr
    assert match in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_bad_pid(tmp_path: Path) -> None:
    _one_line_error(["record", "-p", "999999999", "-o", str(tmp_path / "r")],
                    "no process with pid 999999999")


def test_unavailable_backend(tmp_path: Path) -> None:
    from tracer.capabilities import probe
    caps = probe(try_kfunc=False)
    if caps.kprobes:
        pytest.skip("this kernel has kprobes; the unavailable case is tested where it lacks them")
    _one_line_error(["record", "--backend", "kprobe", "-d", "1", "-o", str(tmp_path / "r")],
                    "backend kprobe unavailable: ")
    assert not (tmp_path / "r").exists()


def test_unwritable_output(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(["record", "-d", "1", "-o", str(f / "run")], "cannot write run directory")
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{}")
    _one_line_error(["record", "-d", "1", "-o", str(run)], "already holds a recording")


def test_not_root(tmp_path: Path) -> None:
    if not Path("/usr/bin/setpriv").exists():
        pytest.skip("needs setpriv (util-linux)")
    p = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        *SLOTSCOPE, "record", "-d", "1", "-o", "/tmp/never"],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert p.returncode == 1 and "needs root" in p.stderr and p.stderr.count("\n") == 1


def test_missing_tracepoint() -> None:
    from dataclasses import replace

    from tracer import TracerError
    from tracer.capabilities import probe
    from tracer.loader import load
    caps = probe(try_kfunc=False)
    # the kernel as the probe saw it, minus kvm:kvm_mmio (as on a kernel without it)
    gone = replace(caps, tracepoints={**caps.tracepoints, "kvm:kvm_mmio": False})
    with pytest.raises(TracerError, match="tracepoint kvm:kvm_mmio is missing"):
        load("tracepoint", gone)


def test_kprobe_programs_verify() -> None:
    """The kprobe backend's programs compile and pass the verifier here,
    with struct offsets from this kernel's BTF (they attach in the lab VM)."""
    from tracer.btf import kvm_offsets
    from tracer.capabilities import probe
    from tracer.loader import verify_kprobe_programs
    offs = kvm_offsets()
    assert offs["OFF_SLOT_NPAGES"] == offs["OFF_SLOT_BASE_GFN"] + 8
    assert verify_kprobe_programs(probe(try_kfunc=False)) == [
        "on_set_memslot", "on_set_memslot_ret", "on_invalidate_mmio_sptes"]


def _wait_gone(ids: list[int], timeout: float = 10.0) -> list[int]:
    from tracer.bpfsys import prog_loaded
    deadline = time.monotonic() + timeout
    while True:
        left = [i for i in ids if prog_loaded(i)]
        if not left or time.monotonic() > deadline:
            return left


def test_sigkill_leaves_readable_run_and_no_probes(tmp_path: Path) -> None:
    from tracer.bpfsys import prog_loaded
    wl = Workload(1_000_000, "create:1,delete:1", pages=2)
    rec = start_tracer("record", "-p", str(wl.pid), "-o", str(tmp_path / "run"))
    wl.start()
    time.sleep(2.5)  # >= 2 flushes
    ids = json.loads((tmp_path / "run" / "manifest.json").read_text())["bpf_prog_ids"]
    assert ids and all(prog_loaded(i) for i in ids)
    rec.send_signal(signal.SIGKILL)
    rec.wait(timeout=10)
    wl.proc.kill()
    wl.proc.wait()
    assert _wait_gone(ids) == []
    run = read_run(tmp_path / "run")
    assert not run.complete
    assert run.tables["mmio_access"].num_rows > 100
    assert run.tables["memslot_update"].num_rows >= 1


def test_sigterm_finalizes(tmp_path: Path) -> None:
    """SIGTERM mid-run: the run is finalized, and it holds every event up to
    its end, without a hole.  A second recorder, left running, is the
    reference: the same tracepoint hits, stamped within microseconds of each
    other.  (A KeyboardInterrupt raised between taking a batch off the ring
    and writing it used to drop that batch.)"""
    wl = Workload(1_000_000, "create:1,delete:1", pages=2)
    ref = start_tracer("record", "-p", str(wl.pid), "-o", str(tmp_path / "ref"))
    # no -p: the interrupted recorder drains until it detaches, so a hole
    # would have rows after it
    rec = start_tracer("record", "-o", str(tmp_path / "run"))
    wl.start()
    time.sleep(1.5)
    rec.send_signal(signal.SIGTERM)
    _, err = rec.communicate(timeout=30)
    time.sleep(0.5)
    wl.proc.kill()
    wl.proc.wait()
    assert rec.returncode == 0, err
    _, ref_err = ref.communicate(timeout=30)
    assert ref.returncode == 0, ref_err
    run = read_run(tmp_path / "run")
    assert run.complete and run.manifest["stop_reason"] == "interrupted"
    assert not list((tmp_path / "run").glob("*.parts"))
    assert _wait_gone(run.manifest["bpf_prog_ids"]) == []
    acc = run.tables["mmio_access"].to_pandas()
    ns = np.sort(acc.ns[acc.pid == wl.pid].to_numpy())
    ref_ns = np.sort(read_run(tmp_path / "ref").tables["mmio_access"].column("ns").to_numpy())
    assert 100 < len(ns) < len(ref_ns)  # stopped mid-run
    # reference rows well inside a gap between two consecutive rows: a hole
    # (2 ms of slack: a program can be preempted between the two stamps)
    slack = 2_000_000
    lo = np.searchsorted(ref_ns, ns[:-1] + slack, side="right")
    hi = np.searchsorted(ref_ns, ns[1:] - slack, side="left")
    missing = np.clip(hi - lo, 0, None)
    assert missing.sum() == 0, f"{missing.sum()} events missing at {np.flatnonzero(missing)}"


def test_recorder_add_pid(tmp_path: Path) -> None:
    from tracer.recorder import Recorder
    wl = Workload(800, "create:2,move:2,delete:2", pages=2, truth=tmp_path / "t.json")
    with Recorder(tmp_path / "run", pids=[os.getpid()]) as rec:
        rec.add_pid(wl.pid)  # a VMM that appeared after the recorder started
        truth = wl.go()
        time.sleep(0.2)
    run = read_run(tmp_path / "run")
    assert run.manifest["filters"]["pids"] == [os.getpid(), wl.pid]
    assert run.tables["memslot_update"].column("change").to_pylist() == [
        "create", "create", "move", "delete"]
    assert run.tables["mmio_access"].num_rows == truth["mmio_reads"] + \
        truth["reads_completed"] + truth["mmio_writes"]


def test_one_session_records_runs_into_their_own_directories(tmp_path: Path) -> None:
    """begin_run/end_run: three VMMs one after another, probes compiled and
    attached once; each directory holds exactly its own VMM's memslots and
    MMIO accesses, counts start at zero each run, and an untraced VMM
    between runs lands nowhere."""
    from tracer.recorder import Recorder
    rec = Recorder(None, pids=[os.getpid()]).start()
    prog_ids = rec.manifest["bpf_prog_ids"]
    truths = []
    try:
        for i, schedule in enumerate(("create:2,delete:2", "create:1,flags:1,move:1",
                                      "create:1")):
            wl = Workload(600 + 100 * i, schedule, pages=2, truth=tmp_path / f"t{i}.json")
            rec.begin_run(tmp_path / f"run{i}", pids=[wl.pid])
            rec.start_thread()
            truths.append(wl.go())
            time.sleep(0.2)
            rec.stop_thread()
            rec.end_run(stop_reason="test")
            assert rec.manifest["bpf_prog_ids"] == prog_ids  # the same programs
            # between runs: a VMM nobody traces
            Workload(300, "create:1", pages=2, truth=tmp_path / "ignored.json").go()
    finally:
        rec.close()
    for i, truth in enumerate(truths):
        run = read_run(tmp_path / f"run{i}")
        assert run.manifest["complete"] and run.manifest["stop_reason"] == "test"
        assert run.manifest["session"]["run"] == i + 1
        assert run.manifest["filters"]["pids"] == [truth["pid"]]
        mem = run.tables["memslot_update"]
        assert mem.column("pid").to_pylist() == [truth["pid"]] * len(truth["memslot_changes"])
        assert mem.column("begin_ns").to_pylist() == [
            pytest.approx(w["begin_ns"], abs=w["end_ns"] - w["begin_ns"])
            for w in truth["memslot_changes"]]
        assert run.tables["mmio_access"].num_rows == truth["mmio_reads"] + \
            truth["reads_completed"] + truth["mmio_writes"]
        assert run.manifest["events"]["memslot_update"] == len(truth["memslot_changes"])
        assert set(run.manifest["lost"].values()) == {0}


def test_per_vcpu_attribution(tmp_path: Path) -> None:
    wl = Workload(2000, "create:1,flags:1,delete:1", pages=2, truth=tmp_path / "t.json",
                  vcpus=2)
    rec = start_tracer("record", "-p", str(wl.pid), "-o", str(tmp_path / "run"))
    truth = wl.go()
    _, err = rec.communicate(timeout=60)
    run = read_run(tmp_path / "run")
    df = run.tables["mmio_access"].to_pandas()
    exits = df[df["type"] != "read"]
    want = {v["vcpu"]: (v["tid"], v["mmio_exits"]) for v in truth["per_vcpu"]}
    got = {vcpu: (int(g.tid.iloc[0]), len(g)) for vcpu, g in exits.groupby("vcpu")}
    assert got == want == {0: (want[0][0], 1000), 1: (want[1][0], 1000)}
    assert set(run.manifest["lost"].values()) == {0}


@pytest.mark.parametrize("slots_full", [False, True], ids=["slots", "hash"])
def test_thread_entries_in_slots_or_hash(tmp_path: Path, slots_full: bool) -> None:
    """A traced thread's entry lives in the tid-indexed slot array or, where
    its slot is taken, in the LRU hash (common.bpf.c): with every slot taken
    by a tid no thread can have (tags above pid_max), both vCPUs' exits are
    still recorded exactly.  Either way a thread that exits frees its entry,
    and nothing else is touched."""
    from tracer.recorder import Recorder
    wl = Workload(2000, "create:1,flags:1", pages=2, truth=tmp_path / "t.json", vcpus=2)
    rec = Recorder(tmp_path / "run", pids=[wl.pid])
    rec.start_thread()
    try:
        slots, threads = rec.probes.bpf[b"thread_slots"], rec.probes.bpf[b"threads"]
        fake = {}
        if slots_full:
            for i in range(len(slots)):
                v = slots.Leaf()
                v.tid = fake[i] = (1 << 31) | i  # pid_max is at most 2**22
                slots[ctypes.c_int(i)] = v
        truth = wl.go()
        time.sleep(0.3)  # the drain thread takes the last rows
        tids = {v["tid"] for v in truth["per_vcpu"]} | {truth["pid"]}
        tags = {i: int(v.tid) for i, v in enumerate(slots.values()) if v.tid}
        assert tags == fake  # the VMM's threads freed theirs; the fakes stand
        assert not [k.value for k in threads if k.value in tids]
    finally:
        rec.stop()
    run = read_run(tmp_path / "run")
    assert set(run.manifest["lost"].values()) == {0}
    df = run.tables["mmio_access"].to_pandas()
    got = Counter(df.loc[df["type"] != "read", "vcpu"])
    assert got == {v["vcpu"]: v["mmio_exits"] for v in truth["per_vcpu"]} == {0: 1000, 1: 1000}
    assert len(run.tables["mmio_fault"]) == truth["mmio_exits"]


def test_perf_buffer_fallback() -> None:
    """The perf-buffer path (kernels without BPF ring buffers), forced here."""
    from collections import Counter as C

    from tracer.capabilities import probe
    from tracer.events import EV_MEMSLOT, EV_MMIO
    from tracer.loader import load
    from vmrig import microvm
    p = load("tracepoint", probe(try_kfunc=False), [os.getpid()], buffers=("perf",))
    try:
        assert p.buffer == "perf"
        r = microvm.run(1200, pages=2, schedule="create:1,delete:1")
        ev = p.drain()
        kinds = C(ev["type"].tolist())
        assert kinds[EV_MEMSLOT] == 3
        assert kinds[EV_MMIO] == sum(microvm.expected_mmio_events(r).values())
        assert set(p.lost_counts().values()) == {0}
    finally:
        p.close()


def test_attach_to_running_vm(tmp_path: Path) -> None:
    """A VM created before the tracer attached (like a running QEMU): its
    vCPU fds are read from /proc, so rows still carry the VM and vCPU ids."""
    from tracer.procfs import kvm_fds
    vm = subprocess.Popen([sys.executable, "-m", "vmrig.microvm", "-d", "60", "--vcpus", "2",
                           "--schedule", "create:1,flags:1", "--every", "3000",
                           "-o", str(tmp_path / "t.json")])
    try:
        deadline = time.monotonic() + 20
        while len(kvm_fds(vm.pid)[1]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        vm_fds, vcpus = kvm_fds(vm.pid)
        assert len(vm_fds) == 1 and set(vcpus.values()) == {0, 1}
        rec = start_tracer("record", "-p", str(vm.pid), "-d", "2", "-o", str(tmp_path / "run"))
        _, err = rec.communicate(timeout=60)
        assert rec.returncode == 0, err
    finally:
        vm.kill()
        vm.wait()
    run = read_run(tmp_path / "run")
    assert run.manifest["vcpu_fds_seeded"] >= 2
    df = run.tables["mmio_access"].to_pandas()
    assert len(df) > 100
    assert set(df.vm) == {vm.pid << 32 | vm_fds[0]}
    assert set(df.vcpu) == {0, 1}


def test_ebpf_prints_the_program_it_would_load() -> None:
    """--ebpf (as bcc's tools have): the C text, defines included, that bcc compiles."""
    out = subprocess.run([*SLOTSCOPE, "record", "--ebpf", "--aggregate", "-p", str(os.getpid())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for define in ("FILTER_PIDS 1", "AGGREGATE 1", "EMIT_MMIO 0", "USE_RINGBUF 1"):
        assert f"#define {define}\n" in text
    assert "TRACEPOINT_PROBE(kvm, kvm_mmio)" in text
    from bcc import BPF
    bpf = BPF(text=text.encode())  # the text is whole: it compiles and loads as printed
    try:
        # aggregate mode's counters: one array where BPF atomics load, else a hash
        atomics = "#define ATOMICS 1\n" in text
        assert bpf.get_table(b"hist_counts" if atomics else b"mmio_hist") is not None
    finally:
        bpf.cleanup()
