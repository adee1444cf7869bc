"""The micro-VMM on the real /dev/kvm: its own counts are exact; its guest
code is assembled from guests/microvm.S; its schedule uses the schema's names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_kvm

from recording.schema import CHANGE_TYPES
from vmrig import RigError, microvm
from vmrig.microvm import guest

needs_binutils = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                    reason="needs binutils (as, ld): ./setup.sh")

SCHEDULE = "create:1,create:2,flags:1,move:2,flags:1,move:2,delete:1,delete:2"


@needs_kvm
def test_counts_and_schedule() -> None:
    r = microvm.run(3000, pages=3, schedule=SCHEDULE)
    assert r.mmio_exits == 3000
    assert r.mmio_reads + r.mmio_writes == 3000
    assert r.mmio_reads == r.mmio_writes == 1500      # rw: one read, one write per page
    assert r.reads_completed == 1500                  # each read finished on re-entry
    assert r.pio_exits == 3000 // 6 - 1  # one "out" per round; the run ends before the last
    pages = r.mmio_by_page
    assert sorted(pages) == ["0x20000", "0x21000", "0x22000"]
    assert all(c == {"read": 500, "write": 500} for c in pages.values())
    changes = [(c.change, c.slot) for c in r.memslot_changes if c.phase == "schedule"]
    assert changes == [("create", 1), ("create", 2), ("flags_only", 1), ("move", 2),
                       ("flags_only", 1), ("move", 2), ("delete", 1), ("delete", 2)]
    assert all(c.ret == 0 for c in r.memslot_changes)
    # exact gpa/size/flags of each ioctl
    c = r.memslot_changes
    home2 = microvm.SLOT_HOME + 2 * microvm.SLOT_STRIDE
    assert (c[4].gpa, c[4].size) == (home2 + microvm.SLOT_MOVE_OFFSET, 0x100000)
    assert (c[6].gpa, c[6].size) == (home2, 0x100000)   # moved back home
    assert c[3].flags == microvm.KVM_MEM_LOG_DIRTY_PAGES and c[5].flags == 0
    assert c[8].size == 0 and c[8].gpa == home2
    # spread evenly: a change every 3000 // 9 MMIO exits
    assert [x.after_mmio for x in c[1:]] == [333 * i for i in range(1, 9)]
    assert r.memslot_counts == {"create": 3, "flags_only": 2, "move": 2, "delete": 2}


@needs_kvm
def test_write_only_and_duration() -> None:
    r = microvm.run(0, pages=2, access="write", duration=0.3)
    assert r.mmio_exits > 100 and r.mmio_reads == 0 and r.reads_completed == 0
    assert r.mmio_exits_per_s > 0


@needs_kvm
def test_coalesced_counts_and_schedule() -> None:
    r = microvm.run(20000, pages=2, schedule=SCHEDULE, coalesced=True)
    assert r.mode == "coalesced" and r.access == "write"
    assert r.mmio_exits == r.mmio_writes == 20000 and r.mmio_reads == 0
    assert r.mmio_user_exits + r.mmio_in_kernel == 20000
    # the ring holds 169 writes: about one exit per 170, the rest never leave KVM
    assert 20000 // microvm.RING_MAX <= r.mmio_user_exits <= 20000 // 100
    assert r.mmio_by_page == {"0x20000": {"read": 0, "write": 10000},
                              "0x21000": {"read": 0, "write": 10000}}
    assert sum(r.in_kernel_by_page.values()) == r.mmio_in_kernel
    assert all(r.in_kernel_by_page[p] <= c["write"] for p, c in r.mmio_by_page.items())
    # batches end where a change is due: exactly every 20000 // 9 accesses
    assert [c.after_mmio for c in r.memslot_changes[1:]] == [2222 * i for i in range(1, 9)]
    assert r.memslot_counts == {"create": 3, "flags_only": 2, "move": 2, "delete": 2}
    assert all(c.ret == 0 for c in r.memslot_changes)
    assert r.pio_exits >= 9 and not r.other_exits


@needs_kvm
def test_coalesced_vcpus_and_odd_counts() -> None:
    # 3 pages and an odd share: partial rounds, per-vCPU counts from the written byte
    r = microvm.run(30001, pages=3, schedule="create:1,delete:1", every=777, vcpus=2,
                    coalesced=True)
    assert [(v["vcpu"], v["mmio_exits"]) for v in r.per_vcpu] == [(0, 15001), (1, 15000)]
    assert all(v["mmio_user_exits"] + v["mmio_in_kernel"] == v["mmio_exits"]
               for v in r.per_vcpu)
    assert sum(c["write"] for c in r.mmio_by_page.values()) == r.mmio_exits == 30001
    assert [c.after_mmio for c in r.memslot_changes[1:]] == [777, 1554]


@needs_kvm
def test_guest_spin_keeps_the_counts_exact() -> None:
    """--guest-spin puts a busy loop after every access: in the coalesced
    round (entered part way for odd shares, so each write and its loop must
    stay one length) and in the exit loop; every count is still exact."""
    r = microvm.run(30001, pages=3, schedule="create:1,delete:1", every=777, vcpus=2,
                    coalesced=True, spin=3)
    assert r.guest_spin == 3
    assert [(v["vcpu"], v["mmio_exits"]) for v in r.per_vcpu] == [(0, 15001), (1, 15000)]
    assert sum(c["write"] for c in r.mmio_by_page.values()) == r.mmio_exits == 30001
    assert [c.after_mmio for c in r.memslot_changes[1:]] == [777, 1554]
    r = microvm.run(600, pages=2, spin=5)
    assert (r.mmio_exits, r.mmio_reads, r.mmio_writes, r.guest_spin) == (600, 300, 300, 5)
    plain = guest.coalesced_program(3)
    spun = guest.coalesced_program(3, spin=3)
    assert spun.write_len > plain.write_len and spun.round == plain.round


@needs_kvm
def test_wait_created_holds_a_made_vm(tmp_path: Path) -> None:
    """--wait-created: "ready" once the VM and its vCPUs exist (what /proc
    shows a tracer that attaches then), the loop only after the go line."""
    from tracer.procfs import kvm_fds
    p = subprocess.Popen([sys.executable, "-m", "vmrig.microvm", "-n", "300", "--vcpus", "2",
                          "--wait-created", "-o", str(tmp_path / "t.json")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().split() == ["ready", str(p.pid)]
        vms, vcpus = kvm_fds(p.pid)
        assert len(vms) == 1 and set(vcpus.values()) == {0, 1}
        p.stdin.write("go\n")
        p.stdin.close()
        assert p.wait(timeout=60) == 0
    finally:
        p.kill()
    t = json.loads((tmp_path / "t.json").read_text())
    assert (t["mmio_exits"], t["vm_fd"]) == (300, vms[0])
    bad = subprocess.run([sys.executable, "-m", "vmrig.microvm", "--wrap", "1",
                          "--wait-created"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "microvm: error: --wait-created is for the MMIO loop, not --wrap")


@needs_kvm
def test_coalesced_duration() -> None:
    r = microvm.run(pages=2, duration=0.3, coalesced=True)
    assert r.mmio_exits == r.mmio_user_exits + r.mmio_in_kernel > 10000
    assert r.mmio_in_kernel > 100 * r.mmio_user_exits / 2


@needs_kvm
@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"pages": 1}, "pages must be 2..16"),
    ({"coalesced": True, "access": "rw"}, "coalesced MMIO needs access 'write'"),
    ({"schedule": "delete:1"}, "delete of slot 1, which does not exist"),
    ({"schedule": "create:1,create:1"}, "create of slot 1, which exists"),
    ({"schedule": "grow:1"}, "change must be one of"),
    ({"schedule": "create:0"}, "extra slot ids are 1..64"),
    ({"spin": 65536}, "guest spin must be 0..65535"),
])
def test_bad_input(kwargs: dict, msg: str) -> None:
    with pytest.raises(RigError, match=msg):
        microvm.run(100, **kwargs)


@needs_kvm
def test_cli_json_and_errors() -> None:
    out = subprocess.run([sys.executable, "-m", "vmrig.microvm", "-n", "400", "--pages", "2",
                          "--schedule", "create:3,move:3,delete:3"],
                         capture_output=True, text=True, timeout=60, check=True)
    d = json.loads(out.stdout)
    assert d["mmio_exits"] == 400 and d["memslot_counts"] == {
        "create": 2, "move": 1, "delete": 1}
    out = subprocess.run([sys.executable, "-m", "vmrig.microvm", "-n", "5000", "--coalesced",
                          "--schedule", "create:3,delete:3"],
                         capture_output=True, text=True, timeout=60, check=True)
    d = json.loads(out.stdout)
    assert (d["mode"], d["access"], d["mmio_exits"]) == ("coalesced", "write", 5000)
    assert d["mmio_user_exits"] + d["mmio_in_kernel"] == 5000
    assert [c["after_mmio"] for c in d["memslot_changes"]] == [0, 1666, 3332]
    bad = subprocess.run([sys.executable, "-m", "vmrig.microvm", "-n", "10", "--pages", "40"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "error: pages must be" in bad.stderr


def test_schedule_names_are_the_schemas() -> None:
    assert set(microvm.CHANGES) <= set(CHANGE_TYPES)
    # "flags" is the spelling schedules had before the schema's
    assert (microvm.parse_schedule("create:2,flags:2,flags_only:2,move:2,delete:2")
            == [("create", 2), ("flags_only", 2), ("flags_only", 2), ("move", 2),
                ("delete", 2)])
    assert microvm.parse_schedule("create") == [("create", 1)]
    # DELETE and MOVE invalidate the slot first: two memslot swaps
    assert {k.name: k.swaps for k in microvm.CHANGES.values()} == {
        "create": 1, "delete": 2, "move": 2, "flags_only": 1}


@pytest.mark.parametrize(("text", "error"), [
    ("grow:1", microvm.ScheduleError), ("create:x", microvm.ScheduleError),
    ("move:65", microvm.ScheduleError),
])
def test_schedule_errors_are_typed(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        microvm.parse_schedule(text)


@needs_kvm
@pytest.mark.parametrize(("kwargs", "error"), [
    ({"pages": 17}, microvm.BadRequest), ({"schedule": "move:1"}, microvm.ScheduleError),
    ({"schedule": [("flags", 1)]}, microvm.ScheduleError),
])
def test_run_errors_are_typed(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        microvm.run(100, **kwargs)


@needs_kvm
def test_flags_alias_in_pairs() -> None:
    r = microvm.run(600, pages=2, schedule=[("create", 1), ("flags", 1), ("delete", 1)])
    assert [c.change for c in r.memslot_changes] == ["create", "create", "flags_only",
                                                     "delete"]


@needs_binutils
def test_guest_built_into_cache_and_without_one(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOTSCOPE_CACHE", str(tmp_path / "cache"))
    g = guest.coalesced_program(3)
    assert len(list((tmp_path / "cache" / "guests").glob("microvm-*.bin"))) == 1
    assert guest.coalesced_program(3) == g  # from the cache
    # the round: one 5-byte write per page; a partial round skips the first
    assert g.entry == guest.CODE_GPA + guest.HEADER.size
    assert (g.write_len, g.batch_entry(0), g.batch_entry(1)) == (5, g.round, g.round + 10)
    loop = guest.exit_program(3, "read")
    assert loop.round == 0 and loop.image != guest.exit_program(3, "rw").image
    # no writable cache (a read-only root, as in the nested lab VM): built each time
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SLOTSCOPE_CACHE", str(tmp_path / "file" / "cache"))
    assert guest.coalesced_program(3) == g


TRUTH_KEYS = ("mmio_exits", "mmio_user_exits", "mmio_reads", "mmio_writes", "reads_completed",
              "mmio_by_page", "pio_exits", "other_exits", "memslot_counts")


@needs_kvm
@pytest.mark.parametrize("args", [
    dict(mmio_accesses=6000, pages=3, schedule=SCHEDULE),
    dict(mmio_accesses=4001, pages=2, access="read", schedule="create:1,flags:1", every=1000),
    dict(mmio_accesses=3000, pages=16, access="write", vcpus=2, schedule="create:3"),
])
def test_native_loop_same_truth(args: dict) -> None:
    """--native runs the exit loop in C: the ground truth is the Python loop's."""
    py, c = microvm.run(**args), microvm.run(**args, native=True)
    assert (py.loop, c.loop) == ("python", "c")
    for key in TRUTH_KEYS:
        assert getattr(c, key) == getattr(py, key), key
    strip = ("begin_ns", "end_ns", "userspace_addr")
    assert ([{k: v for k, v in vars(x).items() if k not in strip} for x in c.memslot_changes]
            == [{k: v for k, v in vars(x).items() if k not in strip}
                for x in py.memslot_changes])


@needs_kvm
def test_native_loop_duration_and_refusals() -> None:
    r = microvm.run(0, pages=2, duration=0.3, native=True, schedule="create:1", every=500)
    assert r.mmio_exits > 1000 and r.mmio_reads + r.mmio_writes == r.mmio_exits
    assert r.memslot_counts == {"create": 2}
    with pytest.raises(RigError, match="coalesced"):
        microvm.run(100, coalesced=True, native=True)


@needs_kvm
def test_native_loop_without_a_writable_cache(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """The lab VM sees the host read-only: the C loop is built and loaded
    from a private copy that is gone once mapped."""
    from vmrig.microvm import native
    monkeypatch.setenv("SLOTSCOPE_CACHE", "/proc/slotscope-unwritable")
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/slotscope-unwritable")
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    native.library.cache_clear()
    try:
        r = microvm.run(3000, pages=2, native=True, schedule="create:1")
    finally:
        native.library.cache_clear()
    assert r.loop == "c" and r.mmio_exits == 3000 and r.memslot_counts == {"create": 2}
    assert list(tmp_path.iterdir()) == []


def test_microvm_starts_without_pyarrow() -> None:
    """Neither pyarrow nor pandas is imported to drive KVM: in the TCG L1
    each costs seconds of every lab run (the lab writes the table itself)."""
    code = "import sys, vmrig.microvm.cli; print('pyarrow' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["False", "False"]


@needs_kvm
@pytest.mark.parametrize("work", [["-n", "600", "--schedule", "create:1,flags:1,delete:1"],
                                  ["--wrap", "1", "--touch-every", "65536"]])
def test_workload_from_the_truth_equals_run_dir(work: list[str], tmp_path: Path) -> None:
    """write_run_workload (the lab's path) writes what --run-dir writes."""
    from recording.reader import read_table
    from vmrig.microvm.truth import write_run_workload
    a, b = tmp_path / "a", tmp_path / "b"
    truth = tmp_path / "truth.json"
    subprocess.run([sys.executable, "-m", "vmrig.microvm", *work, "--pages", "2",
                    "-o", str(truth), "--run-dir", str(a)],
                   capture_output=True, text=True, timeout=300, check=True)
    b.mkdir()
    write_run_workload(b, json.loads(truth.read_text()))
    assert (b / "workload.json").read_text() == (a / "workload.json").read_text()
    assert read_table(b, "workload").equals(read_table(a, "workload"))
    assert read_table(a, "workload").num_rows > 3


@needs_kvm
def test_prefork_vmms_are_processes_of_their_own(tmp_path: Path) -> None:
    """The lab's micro-VMMs, forked from one server that imported them: each
    its own process (the pid the tracer filters on) with exact truth; a bad
    request and a killed VMM end alone, and the server serves on."""
    from vmrig.microvm.prefork import Forks
    forks = Forks()
    try:
        pids = set()
        for n in (300, 500):
            out = tmp_path / f"{n}.json"
            vmm = forks.spawn(["--wait", "-n", str(n), "--schedule", "create:1", "-o", str(out)])
            assert vmm.ready(60) and vmm.pid != forks.proc.pid
            vmm.go()
            assert vmm.wait(120) == 0 and vmm.stderr_tail() == ""
            r = json.loads(out.read_text())
            assert r["pid"] == vmm.pid and r["mmio_exits"] == n
            assert r["memslot_counts"] == {"create": 2}
            pids.add(vmm.pid)
        assert len(pids) == 2
        bad = forks.spawn(["--wait", "--access", "sideways", "-n", "5"])
        assert not bad.ready(60) and bad.returncode == 2
        assert "invalid choice: 'sideways'" in bad.stderr_tail()
        hung = forks.spawn(["--wait", "--duration", "600", "-o", str(tmp_path / "h.json")])
        assert hung.ready(60)
        hung.go()
        hung.kill()
        assert hung.returncode == -9 and not (tmp_path / "h.json").exists()
        # no -o: the truth's JSON lines go to the same stdout as the
        # conversation, and must not be taken for a part of it
        last = forks.spawn(["--wait", "-n", "100"])
        assert last.ready(60)
        last.go()
        assert last.wait(120) == 0 and last.pid is not None
    finally:
        forks.close()
    assert forks.proc.returncode == 0
