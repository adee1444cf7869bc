"""``slotscope lab`` end to end: real runs, real recordings, real reports.

One file of ~520 lines: the direct-mode tests share one lab run (a module
fixture) and the nested test one L1 batch per kernel; split, each file would
pay its own run.  The tests that need no run (config, faults decided by
type, locking) are the short ones at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_bcc, needs_kvm, needs_qemu, needs_root

from recording.reader import read_run
from slotscope.labrun import PlannedRun
from vmrig.errors import GuestFault, L1Fault, RigError

SLOTSCOPE = [sys.executable, "-m", "slotscope"]
HOST_KERNEL = os.uname().release  # direct mode's one kernel: runs/<kernel>/<scenario>/<n>
MICROVM = """
[[scenario]]
name = "{name}"
workload = "microvm"
schedule = "create:1,flags:1,flags:1,move:1,delete:1"
mmio_accesses = {n}
mmio_pages = 2
"""

VMEM = """
[[scenario]]
name = "vmem"
workload = "virtio-mem"
guest = "linux"
size = "1152M"
steps = ["1G", "1152M", "1G"]
cycles = 1
aggregate = true
"""

PCDIMM = """
[[scenario]]
name = "pcdimm"
workload = "hotplug"
cycles = 2
size = "128M"
rate = 2.0
mmio_pages = 2
"""


def _config(tmp: Path, body: str, mode: str = "direct", extra: str = "") -> Path:
    p = tmp / "lab.toml"
    p.write_text(f'[lab]\nmode = "{mode}"\nrun_timeout = 300\n{extra}\n{body}')
    return p


def _lab(*args: str, tmp: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SLOTSCOPE, "lab", "--lock", str(tmp / "lab.lock"), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("body,key", [
    ('[[scenario]]\nname = "a"\nworkload = "microvm"\nrte = 1\n', "rte"),
    ('[[scenario]]\nname = "a"\nworkload = "microvm"\nmmio_pages = 1\n', "mmio_pages"),
    ('[[scenario]]\nname = "a"\nworkload = "microvm"\nrate = "fast"\n', "rate"),
    ('[[scenario]]\nname = "a"\n', "workload"),
    ('[thresholds]\nlost = 1\n[[scenario]]\nname = "a"\nworkload = "microvm"\n', "lost"),
    ('[[scenario]]\nname = "a"\nworkload = "virtio-mem"\n', "guest"),
    ('[lab]\nkernels = "6.1"\n[[scenario]]\nname = "a"\nworkload = "microvm"\n', "kernels"),
    ('[lab]\nkernels = []\n[[scenario]]\nname = "a"\nworkload = "microvm"\n', "kernels"),
    ('[[scenario]]\nname = "a"\nworkload = "microvm"\nsteps = ["1G"]\n', "steps"),
    ('[[scenario]]\nname = "a"\nworkload = "microvm"\nwraps = 1\nnative = true\n', "native"),
    ('[[scenario]]\nname = "a"\nworkload = "hotplug"\nnative = true\n', "native"),
    ('[[scenario]]\nname = "a"\nworkload = "virtio-mem"\nguest = "linux"\nsize = "1G"\n'
     'steps = ["2G"]\n', "steps"),
    ('[[scenario]]\nname = "a"\nworkload = "virtio-mem"\nguest = "linux"\nsteps = ["x"]\n',
     "steps"),
])
def test_malformed_config_is_one_line_naming_the_key(tmp_path: Path, body: str,
                                                     key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    p = _lab("--config", str(cfg), "-o", str(tmp_path / "out"), tmp=tmp_path, timeout=60)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert key in lines[0] and str(cfg) in lines[0]
    assert not (tmp_path / "out").exists()


def test_default_config_parses() -> None:
    from slotscope.labconfig import load
    cfg = load(None)
    assert {s.workload for s in cfg.scenarios} >= {"microvm", "hotplug", "virtio-mem"}
    assert cfg.kernels == ("6.1", "6.12")
    # the figure scenarios repeat, for confidence intervals per kernel
    assert all(s.repetitions >= 3 for s in cfg.scenarios if not s.wraps)
    vmem = next(s for s in cfg.scenarios if s.workload == "virtio-mem")
    assert vmem.virtio_mem_sizes() == [1 << 30, 1152 << 20, 1 << 30]


@pytest.fixture(scope="module")
def direct_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if os.geteuid() != 0 or not os.access("/dev/kvm", os.W_OK):
        pytest.skip("needs root and /dev/kvm")
    tmp = tmp_path_factory.mktemp("lab")
    # mv-b records in aggregate mode (MMIO faults as kernel histograms)
    cfg = _config(tmp, MICROVM.format(name="mv-a", n=3000) + MICROVM.format(name="mv-b", n=2000)
                  + "aggregate = true\n" + PCDIMM)
    out = tmp / "out"
    p = _lab("--config", str(cfg), "-o", str(out), tmp=tmp)
    assert p.returncode == 0, p.stdout + p.stderr
    return cfg, out


@needs_root
@needs_kvm
@needs_bcc
def test_direct_lab_writes_runs_summary_and_report(direct_lab: tuple[Path, Path]) -> None:
    _, out = direct_lab
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "direct"
    for name in ("mv-a", "mv-b"):
        s = summary["scenarios"][f"{HOST_KERNEL}/{name}"]
        assert s["scenario"] == name and s["kernel"] == HOST_KERNEL
        assert s["ok"] and s["runs"] == 1 and s["lost_events"] == 0
        run = read_run(out / "runs" / HOST_KERNEL / name / "1")
        assert run.complete and run.manifest["backend"] == s["backend"]
        # one tracer session per aggregate setting: a run of its own here
        assert run.manifest["session"]["run"] == 1 and run.manifest["qemu"]["l0"] is None
        truth = json.loads((out / "runs" / HOST_KERNEL / name / "1" / "microvm.json")
                           .read_text())
        # Every memslot ioctl the micro-VMM made is in the recording and summary.
        assert run.tables["memslot_update"].num_rows == len(truth["memslot_changes"])
        assert s["memslot_updates"] == len(truth["memslot_changes"])
        actions = run.tables["workload"].column("action").to_pylist()
        assert sum(a.startswith("memslot_") for a in actions) == len(truth["memslot_changes"])
        # MMIO intervals: every exit, as rows or counted in histograms; the
        # last one the vCPU thread never re-entered is counted apart
        assert run.manifest["mode"] == ("aggregate" if name == "mv-b" else "stream")
        faults = (sum(run.tables["mmio_hist"].column("count").to_pylist())
                  if name == "mv-b" else run.tables["mmio_fault"].num_rows)
        assert faults == truth["mmio_exits"]
        assert s["mmio_faults"] == truth["mmio_exits"] - 1 and s["unfinished_faults"] == 1
        # each run's own figures, for the history dataset
        [r] = s["run_summaries"]
        assert Path(r["path"]).parts[-2:] == (name, "1")
        assert r["memslot_updates"] == s["memslot_updates"] and r["wrap_invariant"] == "none"
    assert summary["host"] == {"hostname": os.uname().nodename, "kernel": os.uname().release}
    # ingested, the night carries this host and the runs' own figures
    from recording.history import read_lab_output
    rows = read_lab_output(out)
    assert {r["host"] for r in rows} == {os.uname().nodename}
    mv_a = next(r for r in rows if r["scenario"] == "mv-a")
    assert mv_a["run_memslot_updates"] == \
        summary["scenarios"][f"{HOST_KERNEL}/mv-a"]["memslot_updates"]
    assert mv_a["kernel"] == HOST_KERNEL
    from vmrig.host import version_text
    assert mv_a["qemu"] == version_text() is not None  # the QEMU a night ran with
    html = (out / "index.html").read_text()
    assert "mv-a" in html and "mv-b" in html and "<img" in html


@needs_root
@needs_kvm
@needs_qemu
@needs_bcc
def test_direct_lab_pcdimm_updates_fall_inside_qmp_actions(
        direct_lab: tuple[Path, Path]) -> None:
    _, out = direct_lab
    s = json.loads((out / "summary.json").read_text())["scenarios"][f"{HOST_KERNEL}/pcdimm"]
    assert s["ok"] and s["lost_events"] == 0
    run = read_run(out / "runs" / HOST_KERNEL / "pcdimm" / "1")
    wl = run.tables["workload"].to_pandas()
    acts = wl[wl["action"].isin(["device_add", "device_del"]) & wl["ok"]]
    assert list(acts["action"]) == ["device_add", "device_del"] * 2
    upd = run.tables["memslot_update"].to_pandas()
    assert len(upd) == s["memslot_updates"] > 0
    # QEMU is traced from its exec: its initial memslots are recorded, so no
    # change type is left unknown, and the workload's updates follow them.
    first = wl["begin_ns"].min()
    boot = upd[upd["begin_ns"] < first]
    assert len(boot) and (boot["change"] == "create").any()
    assert not (upd["change"] == "unknown").any()
    upd = upd[upd["begin_ns"] >= first]
    # A plug's ioctl comes from QEMU's main thread inside device_add; an
    # unplug's from a vCPU thread when the guest ejects, between device_del
    # and DEVICE_DELETED.
    deleted = wl[wl["action"] == "event:DEVICE_DELETED"]["begin_ns"].to_numpy()
    plugs = acts[acts["action"] == "device_add"]
    unplugs = acts[acts["action"] == "device_del"]
    vcpus = set(json.loads((out / "runs" / HOST_KERNEL / "pcdimm" / "1" / "rig.json")
                           .read_text())
                ["vcpu_tids"].values())
    for _, u in upd.iterrows():
        if u["change"] == "delete":
            assert u["tid"] in vcpus
            assert any(b <= u["begin_ns"] <= d for b, d in zip(unplugs["begin_ns"], deleted,
                                                                 strict=True))
        else:
            assert u["change"] == "create" and u["tid"] not in vcpus
            assert ((plugs["begin_ns"] <= u["begin_ns"])
                    & (u["begin_ns"] <= plugs["end_ns"])).any()
    assert (upd["change"] == "delete").sum() == len(upd) // 2


@needs_root
@needs_kvm
@needs_qemu
@needs_bcc
def test_pcdimm_run_without_memslot_updates_is_failed(direct_lab: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """A pc-dimm run whose workload left no memslot row (a guest KVM did not
    run makes none) is named as failed, not passed quietly."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from slotscope.labsummary import runs_without_updates
    _, out = direct_lab
    run = out / "runs" / HOST_KERNEL / "pcdimm" / "1"
    assert runs_without_updates([run]) == []
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    table = pq.read_table(copy / "memslot_update.parquet")
    first = pq.read_table(copy / "workload.parquet").column("begin_ns").to_numpy().min()
    boot = table.filter(pc.less(table["begin_ns"], first))  # QEMU's own, at start
    pq.write_table(boot, copy / "memslot_update.parquet")
    assert runs_without_updates([copy]) == [
        f"{copy}: no memslot update recorded during its workload (was the guest run by KVM?)"]


@needs_root
@needs_kvm
@needs_bcc
def test_tightened_baseline_exits_3_naming_the_scenario(
        direct_lab: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, out = direct_lab
    baseline = tmp_path / "baseline.json"
    summary = json.loads((out / "summary.json").read_text())
    # The same figures, but mv-b's baseline latency far lower: a regression.
    summary["scenarios"][f"{HOST_KERNEL}/mv-b"]["mmio_latency_p99_ns"] /= 100
    baseline.write_text(json.dumps(summary))
    p = _lab("--config", str(cfg), "-o", str(out), "--resume", "--baseline", str(baseline),
             tmp=tmp_path)
    assert p.returncode == 3, p.stdout + p.stderr
    regressions = [ln for ln in p.stdout.splitlines() if ln.startswith("regression:")]
    assert len(regressions) == 1 and f"{HOST_KERNEL}/mv-b: mmio_latency_p99_ns" in regressions[0]
    assert p.stdout.count("skipped (--resume)") == 3
    # Within the thresholds against itself: exit 0.
    (tmp_path / "same.json").write_text((out / "summary.json").read_text())
    p = _lab("--config", str(cfg), "-o", str(out), "--resume", "--baseline",
             str(tmp_path / "same.json"), tmp=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


@needs_root
@needs_kvm
@needs_bcc
def test_killed_job_resumes_without_redoing_finished_runs(tmp_path: Path) -> None:
    # The second scenario runs long enough to be killed in the middle of it.
    cfg = _config(tmp_path, MICROVM.format(name="first", n=2000)
                  + MICROVM.format(name="second", n=2_000_000))
    out = tmp_path / "out"
    p = subprocess.Popen([*SLOTSCOPE, "lab", "--lock", str(tmp_path / "lab.lock"), "--config",
                          str(cfg), "-o", str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    for line in p.stdout:
        if "second/1: microvm" in line:
            break
    time.sleep(3)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 130
    runs = out / "runs" / HOST_KERNEL
    first = json.loads((runs / "first" / "1" / "lab-run.json").read_text())
    assert first["ok"]
    assert not (runs / "second" / "1" / "lab-run.json").exists()
    # Nothing of the killed run is left running.
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True)
    assert left.stdout.strip() == ""
    mtime = (runs / "first" / "1" / "manifest.json").stat().st_mtime_ns
    cfg.write_text(cfg.read_text().replace("2000000", "2000"))
    r = _lab("--config", str(cfg), "-o", str(out), "--resume", tmp=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "first/1: done earlier, skipped (--resume)" in r.stdout
    assert (runs / "first" / "1" / "manifest.json").stat().st_mtime_ns == mtime
    assert json.loads((runs / "second" / "1" / "lab-run.json").read_text())["ok"]


def test_second_job_is_refused_while_one_holds_the_lock(tmp_path: Path) -> None:
    import fcntl
    lock = tmp_path / "lab.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("4242")
        f.flush()
        p = _lab("-o", str(tmp_path / "out"), tmp=tmp_path, timeout=60)
    assert p.returncode == 1
    assert "another lab run holds" in p.stderr and "4242" in p.stderr


@needs_root
@needs_kvm
@needs_qemu
@needs_bcc
@pytest.mark.labvm
def test_nested_lab_short_config(tmp_path: Path) -> None:
    """The CI run of the main job: nested mode (TCG here) on two kernels, a
    micro-VMM scenario twice, a QEMU pc-dimm scenario (bare L2) and a
    virtio-mem one with dynamic memslots (Linux L2), each kernel's runs in
    one L1 boot with the probes compiled once.  The first kernel's L1 panics
    when mv/2 starts (--inject-l1-panic): mv/1 is kept, mv/2 is a lab fault
    run again, the rest go to a fresh L1.  The second kernel's vmem/1 L2
    resets in its first boot (--inject-l2-reset): run again in the same L1."""
    from analysis.virtiomem import memslot_steps
    from vmrig.host import version_text
    from vmrig.kernel import resolve_kernel
    k1, k2 = (resolve_kernel(s).release for s in ("6.1", "6.12"))
    # Aggregate mode (the cheapest; MMIO SPTE evidence counted in kernel
    # histograms) for all: one recorder session, one compile per L1 boot.
    cfg = _config(tmp_path, MICROVM.format(name="mv", n=2000) + "aggregate = true\n"
                  "native = true\nrepetitions = 2\n" + PCDIMM + "aggregate = true\n" + VMEM,
                  mode="nested", extra='kernels = ["6.1", "6.12"]')
    out = tmp_path / "out"
    t0 = time.monotonic()
    p = _lab("--config", str(cfg), "-o", str(out), "--inject-l1-panic", "mv/2",
             "--inject-l2-reset", "vmem/1", tmp=tmp_path, timeout=2400)
    print(f"nested lab: {time.monotonic() - t0:.0f} s\n{p.stdout}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[0].split("lab: ", 1)[1].startswith("mode: nested")
    summary = json.loads((out / "summary.json").read_text())
    names = ("mv", "pcdimm", "vmem")
    assert set(summary["scenarios"]) == {f"{k}/{n}" for k in (k1, k2) for n in names}
    # The panic cost the first kernel one more boot, and only mv/2 a rerun;
    # the L2 reset cost the second none.  An L1 fault of TCG nesting besides
    # the injected one (an L1 panic, "stack guard page was hit" in CPU 0/KVM,
    # once in five runs on 2026-12-03) costs a boot more: the job gives the
    # runs left to a fresh L1, as it should, and the test warns.
    boots = [ph["kernel"] for ph in summary["phases"]]
    assert boots.count(k1) >= 2 and boots.count(k2) >= 1, summary["phases"]
    unplanned_phases = [ph for ph in summary["phases"][1:] if ph.get("fault")]
    unplanned = [ph["fault"] for ph in unplanned_phases]
    assert len(boots) == 3 + len(unplanned), summary["phases"]
    if unplanned:
        warnings.warn(f"nested lab: an L1 fault besides the injected one: {unplanned}",
                      stacklevel=1)
    first = summary["phases"][0]
    assert "panic" in first["fault"]
    assert [(*Path(d).parts[-2:], r["state"]) for d, r in first["runs"].items()] == [
        ("mv", "1", "ok"), ("mv", "2", "started"), ("pcdimm", "1", "not started"),
        ("vmem", "1", "not started")]
    retried = summary["scenarios"][f"{k1}/mv"]["retried_runs"]
    assert len(retried) == 1 and retried[0].startswith("2: [l1_fault:panic]"), retried
    assert (out / "runs" / k1 / "mv" / "2.fault1" / "run-progress.json").exists()
    retried = summary["scenarios"][f"{k2}/vmem"]["retried_runs"]
    assert len(retried) == 1 and retried[0].startswith("1: [guest_fault:reset"), retried
    # A TCG-nesting fault of the attempt after the injected one (an L2 that
    # reset 3 s into its next boot, once in two runs on 2026-12-03) is rerun
    # too: warned about, as for the other scenarios below.
    extra = retried[0].split("]", 1)[0].count(",")
    if extra:
        warnings.warn(f"nested lab {k2}/vmem {retried[0]}", stacklevel=1)
    lost = json.loads((out / "runs" / k2 / "vmem" / "1.fault1" / "run-progress.json")
                      .read_text())
    assert lost["state"] == "failed" and "guest stopped " in lost["error"], lost
    assert f"{k2}/vmem/1: lab fault (guest_fault:reset), run again in the same L1" \
        in p.stdout
    for key, s in summary["scenarios"].items():
        for r in s["retried_runs"]:  # a TCG-nesting fault, rerun by the job itself
            if key not in (f"{k1}/mv", f"{k2}/vmem"):
                warnings.warn(f"nested lab {key}/{r}", stacklevel=1)
        assert s["ok"] and s["backend"] == "kprobe" and s["lost_events"] == 0, (key, s)
        assert s["memslot_updates"] > 0 and s["mmio_faults"] > 0
    for k in (k1, k2):
        for name, reps in (("mv", 2), ("pcdimm", 1), ("vmem", 1)):
            for rep in range(1, reps + 1):
                run = read_run(out / "runs" / k / name / str(rep))
                assert run.manifest["kernel"] == k and run.tables["generation"].num_rows > 0
                assert run.manifest["qemu"]["l0"] == version_text()
                # one compile per boot: the session's runs share its load time
                assert run.manifest["session"]["load_s"] > 0
        sessions = [read_run(out / "runs" / k / n / r).manifest["session"]
                    for n, r in (("mv", "1"), ("mv", "2"), ("pcdimm", "1"), ("vmem", "1"))]
        if k == k2 and boots.count(k2) == 1:  # all four in one boot, in order, the
            # lost vmem attempt 4th
            lost = read_run(out / "runs" / k / "vmem" / "1.fault1").manifest["session"]
            assert [x["run"] for x in sessions] == [1, 2, 3, 5 + extra] and lost["run"] == 4
            assert len({x["attach_ns"] for x in [*sessions, lost]}) == 1
    # Aggregated: no fault rows; the histograms hold fast-path hits and the
    # stale faults each plug's generation bump causes, and the summary agrees.
    run = read_run(out / "runs" / k2 / "pcdimm" / "1")
    assert run.tables["mmio_fault"].num_rows == 0
    h = run.tables["mmio_hist"].to_pandas()
    s = summary["scenarios"][f"{k2}/pcdimm"]
    assert int(h.loc[h.reentered, "count"].sum()) == s["mmio_faults"]
    assert int(h.loc[~h.reentered, "count"].sum()) == s["unfinished_faults"]
    assert h.loc[h.fast_hit, "count"].sum() > 0 and h.loc[h.stale, "count"].sum() > 0
    # virtio-mem, dynamic memslots: 1G, all, 1G of an 1152M device (memslots
    # of 1G and 128M); each step's recorded memslot creations and deletions
    # are exactly the memslots QEMU's own `info mtree` added and removed.
    for k in (k1, k2):
        steps = memslot_steps(out / "runs" / k / "vmem" / "1")
        assert steps["qemu_memslots"].tolist() == [1, 2, 1], steps
        assert steps["created"].tolist() == [1, 1, 0] and steps["deleted"].tolist() == [0, 0, 1]
        assert steps["ok"].all()
        # traced from the ready line (kprobe): the L2 boots with qboot, once,
        # and the run's guest is restored from the snapshot taken after its
        # ready line (vmrig/snapshot.py)
        rig = json.loads((out / "runs" / k / "vmem" / "1" / "rig.json").read_text())
        assert rig["config"]["firmware"] == "qboot" and "qboot.rom" in rig["argv"]
        assert rig["snapshot"]["restored"] and rig["snapshot"]["saved_s"] > 0, rig["snapshot"]
        assert rig["argv"][-2:] == ["-incoming", "defer"]
    # Every boot's plan has the Linux L2 (vmem): its kernel and initramfs
    # were staged (off the L1's 9p) while the probes compiled.
    consoles = sorted((out / "batches").glob("*/console.log"))
    assert len(consoles) == len(summary["phases"])
    boot_of: dict[str, int] = {}
    for ph in summary["phases"]:
        boot_of[ph["kernel"]] = boot_of.get(ph["kernel"], 0) + 1
        con = out / "batches" / f"{ph['kernel']}-{boot_of[ph['kernel']]}" / "console.log"
        text = con.read_text(errors="replace")
        if ph["boot_s"] is None and ph in unplanned_phases:
            # The L1 died before lab-run began (on 2026-12-04, the L0's own
            # TCG: "iotlb_to_section: Assertion ... failed" 2 s into the boot
            # after the injected panic): nothing was staged; warned above.
            assert all(r["state"] == "not started" for r in ph["runs"].values()), ph
            continue
        assert "lab-run: " in text, con
        assert "Linux guest staged" in text, con
    # Kernel against kernel, side by side, with a CI where both ran twice.
    cmp = summary["kernels"]
    assert cmp["kernels"] == [k1, k2]
    slow = cmp["scenarios"]["mv"]["slow_share"]
    assert slow["per_kernel"][k1]["runs"] == slow["per_kernel"][k2]["runs"] == 2
    lo, hi = slow["vs_ref"][k2]["ci"]
    assert lo <= slow["vs_ref"][k2]["diff"] <= hi
    assert f"kernels: {k1} vs {k2}" in p.stdout
    html = (out / "index.html").read_text()
    assert "Kernels side by side" in html and f"{k2} - {k1}" in html


# A TCG-nesting fault as the nested lab test met it (an L2 reset).
L2_RESET = GuestFault(
    "exit 1: slotscope lab-run: error: device_del ssdimm253x4: the guest did not "
    "eject within 5 s (VM shutdown after SHUTDOWN (guest-reset), vCPU 0 at "
    "EIP=0000fff0; vCPU 0 (tid 266) used no CPU in 5 s, state sleeping, wchan "
    "futex_wait_queue)", "reset")
LOCKUP = "soft lockup - CPU#1 stuck for 182s! [slotscope:260]"
PANIC = "Kernel panic - not syncing: x"


def _scripted_attempts(monkeypatch: pytest.MonkeyPatch,
                       outcomes: list[Exception | None]) -> list[Exception | None]:
    """Replace the lab's attempts by ``outcomes`` in turn (None: the run
    succeeded), each attempt leaving its number in its directory."""
    from slotscope import labdirect
    from slotscope.labstatus import RunStatus
    left = list(outcomes)

    def attempt(r: PlannedRun, kernel: str, timeout: float) -> RunStatus:
        r.dir.mkdir(parents=True)
        err = left.pop(0)
        (r.dir / "attempt").write_text(str(len(outcomes) - len(left)))
        return RunStatus(r.scenario.name, r.rep, err is None, "nested", 1.0, accel="tcg",
                         failure=err, kernel=kernel)

    monkeypatch.setattr(labdirect, "_attempt", attempt)
    return left


@pytest.mark.parametrize("outcomes,ok", [
    ([L2_RESET, L1Fault(f"L1 soft lockup: {LOCKUP}", "lockup", LOCKUP), None], True),
    ([L2_RESET, L1Fault(f"L1 kernel panic: {PANIC}", "panic", PANIC), L2_RESET], False),
    ([RigError("exit 1: slotscope lab-run: error: bad scenario"), None], False),
])
def test_lab_fault_reruns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          outcomes: list[Exception | None], ok: bool) -> None:
    """Only TCG-nesting faults are run again, at most LAB_FAULT_RERUNS times,
    each lost attempt kept beside the run.  The attempts are scripted: such
    faults cannot be made on demand (the rig's classifier is tested on real
    ones in test_rig.py)."""
    from slotscope.labconfig import Scenario
    from slotscope.labdirect import run_one
    from slotscope.labstatus import STATUS
    left = _scripted_attempts(monkeypatch, outcomes)
    said: list[str] = []
    run = tmp_path / "runs" / "pc" / "1"
    st = run_one(PlannedRun(Scenario("pc", "hotplug"), 1, run, 60), "k", 60,
                 log=said.append)
    assert st.ok is ok
    if left:  # not a lab fault: no rerun
        assert st.retried is None and not said and st.error == str(outcomes[0])
        return
    assert st.retried == " | ".join(str(o) for o in outcomes[:2]) and len(said) == 2
    assert st.error == (None if outcomes[2] is None else str(outcomes[2]))
    for n in (1, 2):
        assert (run.with_name(f"1.fault{n}") / "attempt").read_text() == str(n)
    assert (run / "attempt").read_text() == "3"
    status = json.loads((run / STATUS).read_text())
    assert status["retried"] == st.retried
    # Each thrown-away attempt's kind is kept beside its message.
    assert status["retried_kinds"] == ["guest_fault:reset", outcomes[1].kind_tag]
    assert status["kind"] == (None if outcomes[2] is None else "guest_fault:reset")


def test_lab_reruns_count_the_lab_vms_own(tmp_path: Path) -> None:
    """Attempts the lab VM threw away and ran again itself (an L2 fault in a
    sound L1) count against LAB_FAULT_RERUNS with the host's: one more fault
    is rerun as the second (its directory numbered after the L1's), the
    next is final, and the status names all of them in order."""
    from slotscope.labstatus import LAB_FAULT_RERUNS, Reruns, RunStatus
    assert LAB_FAULT_RERUNS == 2
    run = tmp_path / "1"
    run.mkdir()
    reruns = Reruns()
    inner = {"error": "guest stopped 0.8 s into its boot", "kind": "guest_fault:reset"}
    reruns.took(run, [inner])
    assert reruns.count(run) == 1
    said: list[str] = []
    st = RunStatus("vmem", 1, False, "nested", 1.0, accel="tcg", failure=L2_RESET)
    assert reruns.again(st, run, said.append) and len(said) == 1
    assert (tmp_path / "1.fault2").is_dir() and not run.exists()
    run.mkdir()
    last = RunStatus("vmem", 1, False, "nested", 1.0, accel="tcg", failure=L2_RESET)
    assert not reruns.again(last, run, said.append) and run.is_dir()
    assert last.retried == f"{inner['error']} | {L2_RESET}"
    assert last.retried_kinds == ["guest_fault:reset", "guest_fault:reset"]


@pytest.mark.parametrize("failure", [
    # The words of a guest fault in an error that is not one: not rerun.
    RigError("device_del d1: VM shutdown after SHUTDOWN (guest-reset); vCPU 0 used no CPU"),
    # A hung L1 without a lockup report may have waited on the run itself.
    L1Fault("lab VM hung: killed after 60 s; last console: L1 soft lockup", "hang"),
])
def test_lab_fault_is_decided_by_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      failure: Exception) -> None:
    from slotscope.labconfig import Scenario
    from slotscope.labdirect import run_one
    left = _scripted_attempts(monkeypatch, [failure, None])
    st = run_one(PlannedRun(Scenario("pc", "hotplug"), 1, tmp_path / "1", 60), "k", 60,
                 log=lambda _: None)
    assert not st.ok and st.retried is None and left == [None]
    assert st.kind == failure.kind_tag  # type: ignore[attr-defined]


def test_lab_rebuilds_the_rigs_fault_from_its_record(tmp_path: Path) -> None:
    """A lab-run that fails in another process (the lab VM) leaves its rig's
    error as a record; the host rebuilds the typed fault from the kind it
    names, in its own words."""
    from slotscope.errors import RunFailed
    from slotscope.labdirect import _exited
    from vmrig.errors import write_record
    write_record(tmp_path, GuestFault("device_del d1: the guest did not eject", "reset",
                                      "VM shutdown"))
    f = _exited(tmp_path, 1, "slotscope lab-run: error: device_del d1: ...")
    assert isinstance(f, GuestFault) and f.kind == "reset" and f.detail == "VM shutdown"
    assert str(f) == "exit 1: slotscope lab-run: error: device_del d1: ..."
    (tmp_path / "rig-error.json").unlink()
    f = _exited(tmp_path, 2, "boom")
    assert isinstance(f, RunFailed) and f.returncode == 2 and str(f) == "exit 2: boom"


def test_lab_correlates_each_run_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """summary.json and the report come from one correlation of all completed
    runs, with the same figures as each run analysed on its own; a directory
    that is not a run is named, not fatal."""
    from analysis import epochs
    from analysis.report import write_report
    from analysis.simulator import simulate
    from analysis.summary import summarize
    from slotscope.labsummary import analyse
    dirs = [tmp_path / "runs" / name / "1" for name in ("a", "b")]
    for seed, d in enumerate(dirs):
        simulate(d, seed=seed)
    bad = tmp_path / "runs" / "c" / "1"
    bad.mkdir(parents=True)
    alone = {d: summarize(d) for d in dirs}
    real, calls = epochs.correlate, []

    def counted(rec: Any) -> Any:
        calls.append(list(rec.runs))
        return real(rec)

    monkeypatch.setattr(epochs, "correlate", counted)
    corr, analysed = analyse([*dirs, bad])
    assert corr is not None
    write_report(corr, tmp_path / "index.html")
    assert calls == [["a/1", "b/1"]]
    assert "not a slotscope run directory" in analysed[bad]["error"]
    for d in dirs:
        assert {k: v for k, v in analysed[d].items() if k != "run"} == \
            {k: v for k, v in alone[d].items() if k != "run"}


def test_violated_wrap_invariant_fails_the_job(tmp_path: Path) -> None:
    """A wrap recording analysed by the lab's own pass: held is a pass; the
    same recording with one post-wrap fast hit on a pre-wrap SPTE fails its
    scenario (exit 1, not a regression), naming the fault; a scenario that
    asked for a wrap and recorded none fails too."""
    from wrap_edits import violate

    from analysis import simulator
    from slotscope import labverdict
    from slotscope.labsummary import analyse

    held, bad = tmp_path / "held", tmp_path / "violated"
    simulator.simulate(held, seed=4, pages=4, events=300, p_update=0.01,
                       changes=("create", "flags_only"), start_gen=2**19 - 4,
                       revisit_swaps=2**18)
    fault = violate(held, bad, 19)
    plain = tmp_path / "plain"
    simulator.simulate(plain, seed=1)
    _, runs = analyse([held, bad, plain])
    ok = labverdict.scenario_summary([runs[held]], [], expect_wraps=1)
    assert ok["ok"] and ok["wrap_invariant"] == "held"
    assert ok["wraps"] >= 1 and set(ok["wrap_verdicts"]) == {"held"}
    v = labverdict.scenario_summary([runs[bad]], [], expect_wraps=1)
    assert not v["ok"] and v["wrap_invariant"] == "violated"
    assert f"fault at ns {fault['exit_ns']} on gpa {fault['gpa']:#x}" in v["failed_runs"][0]
    # a violation fails any scenario, wraps asked for or not
    assert not labverdict.scenario_summary([runs[bad]], [])["ok"]
    none = labverdict.scenario_summary([runs[plain]], [], expect_wraps=1)
    assert not none["ok"] and "0 of 1 wraps recorded" in none["failed_runs"][0]
    assert labverdict.scenario_summary([runs[plain]], [])["ok"]
    summary = {"scenarios": {"held": ok, "violated": v}}
    assert labverdict.exit_code(summary, []) == labverdict.EXIT_FAILED
    assert labverdict.exit_code({"scenarios": {"held": ok}}, []) == labverdict.EXIT_OK


def test_lab_run_parses_its_arguments_before_pyarrow_loads() -> None:
    """`slotscope lab-run` imports only its own module to parse its command
    line, so its probe compile starts while pyarrow, the recorder and the
    lab config load beside it (slotscope.labrun: 10-25 s each in the TCG L1)."""
    code = ("import sys; from slotscope.cli import build_parser; "
            "a = ['lab-run', '--plan', 'p']; print(build_parser(a).parse_args(a).plan); "
            "print(*[m for m in ('pyarrow', 'numpy', 'asyncio', 'bcc', 'tracer.recorder', "
            "'slotscope.labconfig') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.splitlines() == ["p", ""]
    # and the compile's own path to clang leaves numpy (the ring reader's)
    # to be imported after it, by then by pyarrow in the main thread
    code = "import sys, tracer.loader; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["False"]


def test_commands_table_names_what_each_module_registers() -> None:
    """slotscope.cli.COMMANDS (command -> module, for the lazy parser) says
    exactly what each module's register() adds."""
    import argparse
    import importlib

    from slotscope.cli import COMMANDS
    for module in set(COMMANDS.values()):
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert set(sub.choices) == {c for c, m in COMMANDS.items() if m == module}, module


@needs_root
@needs_bcc
@pytest.mark.parametrize("plan,says", [
    (None, "bad lab-run plan: "),  # no such file: before any probe is compiled
    ({"runs": [{"scenario": {"name": "a", "workload": "microvm", "colour": 1}, "rep": 1,
                "dir": "RUN", "timeout": 60}]}, "bad lab-run plan: "),  # after preload began
])
def test_bad_lab_run_plan_is_one_line(tmp_path: Path, plan: dict[str, Any] | None,
                                      says: str) -> None:
    """A plan lab-run cannot read ends in one line and exit 1, also when it is
    found bad only after the probes began compiling in the background (the
    thread's compile is waited for and its probes closed, quietly); no run
    directory is made."""
    path = tmp_path / "plan.json"
    if plan is not None:
        path.write_text(json.dumps(plan).replace("RUN", str(tmp_path / "run")))
    p = subprocess.run([*SLOTSCOPE, "lab-run", "--plan", str(path)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and says in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()
