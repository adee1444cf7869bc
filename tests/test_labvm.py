"""The nested lab VM: its kernel, accelerator choice, CLI, Vagrantfile and a real L1.

The L1 tests boot the Debian 6.1 L1 (TCG here, ~20-40 s a boot) and check
the infrastructure with the kernel's own tracefs, independently of the
tracer: kprobes on kvm_set_memslot / kvm_mmu_invalidate_mmio_sptes fire for
an L2 micro-VMM exactly as its ground truth says.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labvm_checks import (
    CHANGE_CODES,
    LAB_KERNEL,
    SWAPS,
    address_spaces,
    boots_l1,
    needs_lab_kernel,
    parse_trace,
    spte_rule_violations,
)

from recording import hostfacts
from vmrig import RigError, guestbuild, labvm
from vmrig import kernel as vk

REPO = Path(__file__).resolve().parents[1]
SLOTSCOPE = [sys.executable, "-m", "slotscope"]


L1_TIMEOUT = 420.0  # a TCG boot takes 15-40 s on 2 shared cores; hangs happen


# -- kernel ---------------------------------------------------------------

@needs_lab_kernel
def test_lab_kernel_matches_installed_headers() -> None:
    k = LAB_KERNEL
    assert k is not None
    release, version = vk.headers_release()
    assert (k.release, k.version) == (release, version)
    # The headers bcc compiles against inside the L1 are this release's.
    assert (k.modules_dir / "build").resolve() == k.headers_dir.resolve()
    ver_h = (k.headers_dir / "include/generated/utsrelease.h").read_text()
    assert f'"{release}"' in ver_h
    dep = (k.modules_dir / "modules.dep").read_text()
    assert re.search(r"kvm-amd\.ko[^:]*:.*kvm\.ko", dep), "kvm-amd must depend on kvm"
    assert "CONFIG_KPROBES=y" in k.config.read_text().splitlines()


@needs_lab_kernel
def test_vmlinux_is_the_bzimage_payload_with_pvh_note(tmp_path: Path) -> None:
    k = LAB_KERNEL
    assert k is not None
    assert vk.has_pvh_note(k.vmlinux)
    assert not vk.has_pvh_note(k.vmlinuz)  # a bzImage is not an ELF
    out = tmp_path / "vmlinux"
    vk.extract_vmlinux(k.vmlinuz, out)
    assert out.read_bytes() == k.vmlinux.read_bytes()
    # The release string is in the kernel's banner.
    assert k.release.encode() in out.read_bytes()


def test_extract_rejects_non_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"MZ" + os.urandom(4096).replace(b"\xfd7zXZ", b"xxxxxx"))
    with pytest.raises(RigError, match="no xz payload"):
        vk.extract_vmlinux(junk, tmp_path / "out")


@needs_lab_kernel
def test_fetch_is_idempotent() -> None:
    k = LAB_KERNEL
    assert k is not None
    before = k.vmlinux.stat().st_mtime_ns
    t0 = time.monotonic()
    again = vk.fetch_lab_kernel()
    assert again == k
    assert k.vmlinux.stat().st_mtime_ns == before
    assert time.monotonic() - t0 < 5  # no download or unpack the second time


def test_kernel_cli_show() -> None:
    p = subprocess.run([sys.executable, "-m", "vmrig.kernel", "show"], capture_output=True,
                       text=True, cwd=REPO)
    if LAB_KERNEL is None:
        assert p.returncode == 1 and "not fetched" in p.stderr
        assert "Traceback" not in p.stderr
    else:
        assert p.returncode == 0, p.stderr
        assert f"release      {LAB_KERNEL.release}" in p.stdout


# -- accelerator and doctor -----------------------------------------------

def test_accel_choice_follows_host_nested_support() -> None:
    accel, why = labvm.choose_accel("auto")
    nested = hostfacts.nested_vendor()
    if nested is None or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert accel == "tcg" and why.startswith("TCG")
        with pytest.raises(RigError, match="--accel kvm unavailable"):
            labvm.choose_accel("kvm")
    else:
        assert accel in ("kvm", "tcg")
    assert labvm.choose_accel("tcg")[0] == "tcg"
    with pytest.raises(RigError, match="unknown accelerator"):
        labvm.choose_accel("hvf")


def test_labvm_check_row() -> None:
    row = labvm.labvm_check()
    name, status, detail, fix = row.name, row.status, row.detail, row.fix
    assert name == "nested lab VM"
    assert status in ("OK", "WARN", "FAIL")
    if status == "FAIL":
        assert fix
    else:
        assert LAB_KERNEL is not None and LAB_KERNEL.release in detail
        assert labvm.choose_accel("auto")[0].upper() in detail
        # a job that names its kernels is told about those alone (the lab's mode line)
        one = labvm.labvm_check(["6.12"])
        assert one.status == "OK" and LAB_KERNEL.release not in one.detail
        assert one.detail.startswith("6.12.")
    assert len(f"{name}  {status}  {detail}") < 80


# -- CLI errors (no boot) -------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["labvm", "run"], "no COMMAND given"),
    (["labvm", "run", "--"], "no COMMAND given"),
    (["labvm", "run", "--kernel", "/nonexistent/vmlinuz", "--", "true"], "not found"),
    (["labvm", "run", "--timeout", "0", "--", "true"], "timeout must be positive"),
])
def test_labvm_cli_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    p = subprocess.run(SLOTSCOPE + args, capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 1
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# -- Vagrantfile ----------------------------------------------------------

@pytest.mark.skipif(shutil.which("vagrant") is None,
                    reason="vagrant not installed (apt-get install vagrant; ./setup.sh)")
def test_vagrantfile_validates(tmp_path: Path) -> None:
    def validate(text: str) -> subprocess.CompletedProcess[str]:
        d = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "Vagrantfile").write_text(text)
        env = dict(os.environ, VAGRANT_DEFAULT_PROVIDER="libvirt", VAGRANT_HOME=str(tmp_path),
                   VAGRANT_CHECKPOINT_DISABLE="1")
        # Without the vagrant-libvirt plugin, provider options cannot be checked.
        have_libvirt = subprocess.run(["vagrant", "plugin", "list"], capture_output=True,
                                      text=True, env=env, cwd=d).stdout
        cmd = ["vagrant", "validate"]
        if "vagrant-libvirt" not in have_libvirt:
            cmd.append("--ignore-provider")
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=d, timeout=120)

    text = (REPO / "Vagrantfile").read_text()
    ok = validate(text)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "validated successfully" in ok.stdout
    for key in ("lv.nested = true", 'lv.cpu_mode = "host-passthrough"', "--nested-hw-virt",
                "./setup.sh"):
        assert key in text
    # The check has teeth: a misspelt libvirt option fails it (when the
    # plugin is there to know the options).
    bad = validate(text.replace("lv.nested = true", "lv.nestedd = true"))
    if "--ignore-provider" not in " ".join(bad.args):
        assert bad.returncode != 0 and "nestedd" in bad.stdout + bad.stderr


# -- a real L1 ------------------------------------------------------------

TRACEFS_CHECK = r"""
set -e
T=/sys/kernel/tracing
echo 0 > $T/tracing_on
echo > $T/trace
echo 'p:ss_memslot kvm_set_memslot change=%cx:u32' >> $T/kprobe_events
echo 'p:ss_invmmio kvm_mmu_invalidate_mmio_sptes gen=%si:u64' >> $T/kprobe_events
echo 'p:ss_zapfast kvm_mmu_zap_all_fast' >> $T/kprobe_events
echo 1 > $T/events/kprobes/enable
echo 1 > $T/events/kvmmmu/check_mmio_spte/enable
echo 1 > $T/events/kvmmmu/mark_mmio_spte/enable
echo 8192 > $T/buffer_size_kb
echo 1 > $T/tracing_on
python -m vmrig.microvm -n 2000 --pages 2 --every 400 \
    --schedule create:1,flags:1,move:1,delete:1 -o "$SLOTSCOPE_LABVM_OUT/truth.json"
echo 0 > $T/tracing_on
cat $T/trace > "$SLOTSCOPE_LABVM_OUT/trace.txt"
echo 0 > $T/events/kprobes/enable
echo > $T/kprobe_events
{ uname -r; cat /sys/module/kvm/parameters/mmio_caching;
  cat /sys/module/kvm_amd/parameters/nested /sys/module/kvm_amd/parameters/npt \
      2>/dev/null || cat /sys/module/kvm_intel/parameters/nested;
  readlink -f /lib/modules/$(uname -r)/build; } > "$SLOTSCOPE_LABVM_OUT/facts.txt"
# $1: a file in the host's guest cache, which the L1 sees read-only
# (labvm); what the L1 builds goes beside it, in its own memory
python -c 'import sys; from vmrig import guestbuild as g; d = g.cache_dir()
d.mkdir(parents=True, exist_ok=True); (d / "l1").write_text("l1")
print(g.find(sys.argv[1]), d)' "$(basename "$1")" > "$SLOTSCOPE_LABVM_OUT/guests.txt"
awk '$3 == "squashfs" {print $2}' /proc/mounts > "$SLOTSCOPE_LABVM_OUT/images.txt"
echo written > "$SLOTSCOPE_LABVM_OUT/marker"
exit 7
"""


@boots_l1
def test_l1_runs_command_and_kprobes_see_l2_memslots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "before.txt").write_text("host file\n")
    script = out / "check.sh"
    script.write_text(TRACEFS_CHECK)
    seed = guestbuild.shared_dir() / f"labvm-test-seed-{os.getpid()}"
    seed.parent.mkdir(parents=True, exist_ok=True)
    seed.write_text("host\n")
    try:
        res = labvm.run_in_labvm(["sh", str(script), str(seed)], timeout=L1_TIMEOUT,
                                 outdir=out, cwd=REPO, echo=False)
    finally:
        seed.unlink()
    print(f"L1 {res.accel}: exit {res.returncode} in {res.elapsed_s:.1f} s, "
          f"command at uptime {res.boot_s} s")
    assert not res.timed_out, "L1 hung:\n" + "\n".join(res.console_tail)
    assert res.returncode == 7, (out / "labvm/console.log").read_text()[-3000:]
    assert (out / "marker").read_text() == "written\n"  # written inside, seen on host
    assert (out / "before.txt").read_text() == "host file\n"
    # what the host built is found inside; what the L1 builds stays there
    found, l1_cache = (out / "guests.txt").read_text().split()
    assert found == str(seed) and Path(l1_cache) != seed.parent
    assert not (Path(l1_cache) / "l1").exists()
    assert res.boot_s is not None and 0 < res.boot_s < res.elapsed_s
    result = json.loads((out / "labvm/result.json").read_text())
    assert result["returncode"] == 7

    k = LAB_KERNEL
    assert k is not None
    if shutil.which("mksquashfs"):  # the venv and the headers came from disks, not 9p
        assert len(result["images"]) == 2, result
        mounted = (out / "images.txt").read_text().split()
        assert str(labvm.VENV_BIN.parent.resolve()) in mounted
        assert str(k.headers_dir.resolve()) in mounted, mounted
    release, caching, nested, *rest = (out / "facts.txt").read_text().split()
    assert release == k.release
    assert caching == "Y"
    assert nested in ("1", "Y")
    assert rest[-1] == str(k.headers_dir.resolve())

    truth = json.loads((out / "truth.json").read_text())
    events = parse_trace(out / "trace.txt")
    memslot = [f for e, f in events if e == "ss_memslot"]
    changes = [c["change"] for c in truth["memslot_changes"]]
    assert len(changes) == 5 and changes[0] == "create"
    assert [int(f["change"]) for f in memslot] == [CHANGE_CODES[c] for c in changes]
    # Generation rule: each swap adds the address-space count.
    gens = [int(f["gen"]) for e, f in events if e == "ss_invmmio"]
    assert len(gens) == sum(SWAPS[c] for c in changes)
    step = address_spaces(k)
    assert all(b - a == step for a, b in zip(gens, gens[1:], strict=False)), gens
    # MMIO SPTE rules, as the L1 kernel's own tracepoints show them.
    pages = truth["pages"]
    after = spte_rule_violations(events, step, pages)
    assert after["violations"] == [], after
    later = changes[1:]  # the setup CREATE comes before any MMIO SPTE exists
    assert after["stale"] == pages * sum(c in ("create", "flags_only") for c in later)
    assert after["zaps"] == sum(c in ("delete", "move") for c in changes)


@boots_l1
def test_l1_hang_is_killed_at_deadline(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("still here\n")
    timeout = 110.0  # the watchdog reports at L1 uptime 65 s, the command well up
    t0 = time.monotonic()
    # A slotscope process that does not end: a micro-VMM run of an hour.
    res = labvm.run_in_labvm(["sh", "-c", "echo started > started; exec python -m slotscope "
                              "rig run --workload microvm --duration 3600"],
                             timeout=timeout, outdir=out, echo=False)
    wall = time.monotonic() - t0
    assert res.timed_out and res.returncode is None
    assert timeout <= wall < timeout + 20
    assert res.console_tail, "the hang report needs the last console lines"
    # Before the kill, the L1's watchdog said what every task was doing:
    # ps, the kernel's blocked-task and per-CPU reports, and the slotscope
    # process's Python stacks (faulthandler on SIGUSR1).
    console = (out / "labvm/console.log").read_text(errors="replace")
    report = console.split(f"labvm: deadline in {labvm.HANG_REPORT_S} s", 1)
    assert len(report) == 2, console[-2000:]
    assert "-m slotscope rig run --workload microvm" in report[1]
    assert "sysrq: Show Blocked State" in report[1]
    assert "(most recent call first)" in report[1] and "vmrig/" in report[1]
    assert (out / "kept.txt").read_text() == "still here\n"
    if (out / "started").exists():  # the command got going before the deadline
        assert (out / "started").read_text() == "started\n"
    result = json.loads((out / "labvm/result.json").read_text())
    assert result["timed_out"] is True
    # The host read every L1 vCPU on its own clock, twice, and named where
    # the kernel was from the L1's kallsyms (the L1 clock plays no part).
    vcpus = [ln for ln in result["host_report"] if " vCPU " in ln]
    per_sample = [sum(ln.startswith(f"sample {i} ") for ln in vcpus) for i in (0, 1)]
    assert per_sample[0] == per_sample[1] >= 1, result["host_report"]
    assert any(re.search(r"RIP 0x[0-9a-f]{16} \w+\+0x", ln) for ln in vcpus), vcpus
    assert "labvm: host report before the kill (killed after 110 s, host clock)" in console
    fault = res.fault()
    assert fault is not None and fault.kind == "hang" and "vCPUs at " in str(fault)
    # No QEMU of ours survives the kill.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps


# -- the saved L1 recording (no boot; runs anywhere) ------------------------

SAVED = REPO / "tests/data/nested-microvm"


def test_saved_nested_recording_follows_kernel_rules() -> None:
    """tests/data/nested-microvm: recorded in the L1 by the kprobe backend."""
    from recording.reader import read_run

    run = read_run(SAVED)
    truth = json.loads((SAVED / "truth.json").read_text())
    m = run.manifest
    assert m["backend"] == "kprobe" and m["complete"] and sum(m["lost"].values()) == 0
    mu = sorted(run.tables["memslot_update"].to_pylist(), key=lambda r: r["begin_ns"])
    changes = truth["memslot_changes"]
    assert [(r["change"], r["slot_id"]) for r in mu] == [(c["change"], c["slot"])
                                                         for c in changes]
    step = 2  # KVM_ADDRESS_SPACE_NUM on x86 in 6.1 (the recording's kernel)
    assert [r["gen_after"] - r["gen_before"] for r in mu] == [
        step * SWAPS[c["change"]] for c in changes]
    faults = run.tables["mmio_fault"].to_pylist()
    stale = [r for r in faults if r["stale"]]
    later = [c["change"] for c in changes[1:]]
    assert len(stale) == truth["pages"] * sum(c in ("create", "flags_only") for c in later)
    assert all(r["kvm_gen"] - r["spte_gen"] == step and r["remarked"] for r in stale)
    assert all(r["latency_ns"] > 0 for r in faults)
    assert run.tables["zap_all"].num_rows == sum(c in ("delete", "move") for c in later)
    # The independent tracefs capture of the same run agrees.
    events = []
    with gzip.open(SAVED / "tracefs-trace.txt.gz", "rt") as f:
        trace_text = f.read()
    for line in trace_text.splitlines():
        mm = re.search(r"\s[\d.]+: (ss_memslot|ss_invmmio): .*(?:change|gen)=(\d+)", line)
        if mm:
            events.append((mm.group(1), int(mm.group(2))))
    assert [v for e, v in events if e == "ss_memslot"] == [CHANGE_CODES[c["change"]]
                                                          for c in changes]
    inval = sorted((r for r in run.tables["generation"].to_pylist()
                    if r["source"] == "invalidate"), key=lambda r: r["ns"])
    assert [r["gen"] for r in inval] == [v for e, v in events if e == "ss_invmmio"]


@boots_l1
def test_labvm_cli_reports_a_hang(tmp_path: Path) -> None:
    # 3 s is far too short for a TCG boot: the deadline path, from the CLI.
    t0 = time.monotonic()
    p = subprocess.run(SLOTSCOPE + ["labvm", "run", "--timeout", "3", "-o", str(tmp_path / "o"),
                                    "--", "true"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 124
    assert time.monotonic() - t0 < 30
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("slotscope labvm: error: L1 hung: no exit within 3 s")
    assert "Traceback" not in p.stderr
    result = json.loads((tmp_path / "o/labvm/result.json").read_text())
    assert result["timed_out"] is True and result["returncode"] is None


@boots_l1
def test_labvm_cli_reports_an_l1_panic(tmp_path: Path) -> None:
    # A real panic of the L1 kernel, as seen under TCG nesting (a corrupted
    # stack end in an L2 vCPU thread): named in one line, not "exit 255".
    p = subprocess.run(SLOTSCOPE + ["labvm", "run", "--timeout", "300", "-o", str(tmp_path / "o"),
                                    "--", "sh", "-c", "echo c > /proc/sysrq-trigger"],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("slotscope labvm: error: the L1 kernel panicked after "), last
    assert "Kernel panic - not syncing: sysrq triggered crash (task sh)" in last, last
    result = json.loads((tmp_path / "o/labvm/result.json").read_text())
    assert result["panic"].startswith("Kernel panic - not syncing: sysrq triggered crash")


def test_l1_panic_is_the_l1_kernels_own(tmp_path: Path) -> None:
    """Only the L1 kernel's lines say it panicked: a lab-run error quoting
    its L2's serial (from a default lab's console.log, where it marked a
    sound L1 as panicked) does not; a panic with or without a time stamp does."""
    console = tmp_path / "console.log"
    quoted = ("lab-run: +304.5 s qemu-virtio-mem/1 failed: guest stopped 0.9 s into its "
              "boot under kvm (serial: '[    0.844640] Kernel panic - not syncing: Fatal "
              "exception i'): VM shutdown after SHUTDOWN (guest-reset)\n")
    console.write_text(quoted + "[  190.839093] kvm: kvm [411]: vcpu0, Unhandled WRMSR\n")
    assert labvm._panic(console) == ""
    assert labvm.LabResult(0, "tcg", 1.0, False, tmp_path,
                           panic=labvm._panic(console)).fault() is None
    for stamp in ("[  218.230961] ", ""):
        console.write_text(quoted + f"{stamp}Kernel panic - not syncing: sysrq triggered "
                           f"crash\n{stamp}CPU: 1 PID: 412 Comm: sh Not tainted 6.1.0\n")
        assert labvm._panic(console) == "Kernel panic - not syncing: sysrq triggered crash " \
            "(task sh)", stamp


def test_l1_lockup_is_read_from_the_console(tmp_path: Path) -> None:
    """The soft-lockup report of an L1 that hung in the nested lab test
    (lines from that console.log); the last one is kept."""
    console = tmp_path / "console.log"
    console.write_text(
        "lab-run: +41.3 s probes attached\n"
        "[  248.441756] watchdog: BUG: soft lockup - CPU#0 stuck for 157s! [swapper/0:0]\n"
        "[  248.441819] RIP: 0010:finish_task_switch.isra.0+0x9f/0x2d0\n"
        "[  276.553484] watchdog: BUG: soft lockup - CPU#1 stuck for 182s! [slotscope:260]\n"
        "[  276.553484]  </TASK>\n")
    assert labvm._lockup(console) == "soft lockup - CPU#1 stuck for 182s! [slotscope:260]"
    console.write_text("[    1.0] nothing wrong\n")
    assert labvm._lockup(console) == "" == labvm._lockup(tmp_path / "absent")
    # an RCU stall, then the L1 died under the command (rc file missing: 255)
    console.write_text("[  176.278439] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n")
    assert labvm._lockup(console) == "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"
    died = labvm.LabResult(255, "tcg", 1.0, False, tmp_path, lockup=labvm._lockup(console))
    fault = died.fault()
    assert fault is not None and fault.kind == "lockup"
    assert labvm.LabResult(1, "tcg", 1.0, False, tmp_path, lockup="x").fault() is None
    # gone with no report at all: the last console line says where
    gone = labvm.LabResult(255, "tcg", 1.0, False, tmp_path,
                           console_tail=["lab-run: +79.3 s QEMU up (kvm)", ""]).fault()
    assert gone is not None and gone.kind == "gone" and gone.console == \
        "lab-run: +79.3 s QEMU up (kvm)"
    assert labvm.LabResult(1, "tcg", 1.0, False, tmp_path).fault() is None
