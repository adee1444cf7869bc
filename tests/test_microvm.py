"""The micro-VMM on the real /dev/kvm: its own counts are exact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import needs_kvm

from vmrig import RigError, microvm

pytestmark = needs_kvm

SCHEDULE = "create:1,create:2,flags:1,move:2,flags:1,move:2,delete:1,delete:2"


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


def test_write_only_and_duration() -> None:
    r = microvm.run(0, pages=2, access="write", duration=0.3)
    assert r.mmio_exits > 100 and r.mmio_reads == 0 and r.reads_completed == 0
    assert r.mmio_exits_per_s > 0


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


def test_coalesced_vcpus_and_odd_counts() -> None:
    # 3 pages and an odd share: partial rounds, per-vCPU counts from the written byte
    r = microvm.run(30001, pages=3, schedule="create:1,delete:1", every=777, vcpus=2,
                    coalesced=True)
    assert [(v["vcpu"], v["mmio_exits"]) for v in r.per_vcpu] == [(0, 15001), (1, 15000)]
    assert all(v["mmio_user_exits"] + v["mmio_in_kernel"] == v["mmio_exits"]
               for v in r.per_vcpu)
    assert sum(c["write"] for c in r.mmio_by_page.values()) == r.mmio_exits == 30001
    assert [c.after_mmio for c in r.memslot_changes[1:]] == [777, 1554]


def test_coalesced_duration() -> None:
    r = microvm.run(pages=2, duration=0.3, coalesced=True)
    assert r.mmio_exits == r.mmio_user_exits + r.mmio_in_kernel > 10000
    assert r.mmio_in_kernel > 100 * r.mmio_user_exits / 2


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"pages": 1}, "pages must be 2..16"),
    ({"coalesced": True, "access": "rw"}, "coalesced MMIO needs access 'write'"),
    ({"schedule": "delete:1"}, "delete of slot 1, which does not exist"),
    ({"schedule": "create:1,create:1"}, "create of slot 1, which exists"),
    ({"schedule": "grow:1"}, "change must be one of"),
    ({"schedule": "create:0"}, "extra slot ids are 1..64"),
])
def test_bad_input(kwargs: dict, msg: str) -> None:
    with pytest.raises(RigError, match=msg):
        microvm.run(100, **kwargs)


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
