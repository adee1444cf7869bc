"""The QEMU rig on a real QEMU over real QMP: boot, pc-dimm cycles, dirty-log,
bad input, faults and cleanup.  The bare guest boots in well under a second,
so these run in seconds.  One file of ~600 lines, in the order a rig lives
(config, boot, workloads, faults, cleanup), sharing its QEMU helpers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import HAS_KVM, needs_kvm, needs_qemu, needs_root

from recording.reader import read_table
from vmrig import GuestFault, RigError, tap
from vmrig.config import BareGuestConfig, MemoryConfig, MiB, NetConfig, RigConfig
from vmrig.errors import read_record
from vmrig.rig import Rig
from vmrig.workloadlog import WorkloadLog
from vmrig.workloads import (
    dirty_log_toggles,
    hotplug_cycles,
    plug_dimm,
    unplug_dimm,
)

pytestmark = needs_qemu
ACCELS = ["tcg", pytest.param("kvm", marks=needs_kvm)]
REPO = Path(__file__).resolve().parent.parent


def run(coro: Any) -> Any:
    return asyncio.run(coro)


_OLDER: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before_the_test() -> None:
    """Children this test process had before the test are not the rig's:
    multiprocessing's resource tracker, started by the Dask tests' worker
    processes, lives as long as the test process does."""
    _OLDER.clear()
    _OLDER.update(p.pid for p in psutil.Process().children(recursive=True))


def qemu_children() -> list[psutil.Process]:
    """What this test started and left running (not zombies: reaped later)."""
    return [p for p in psutil.Process().children(recursive=True)
            if p.pid not in _OLDER and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def assert_clean(private_dir: Path | None, pid: int | None) -> None:
    assert not qemu_children()
    if pid is not None:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    if private_dir is not None:
        assert not private_dir.exists()


def table(run_dir: Path) -> list[dict[str, Any]]:
    return read_table(run_dir, "workload").to_pylist()


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_bare_guest_boots_and_loops(accel: str, vcpus: int) -> None:
    async def body() -> tuple[Path, int]:
        async with Rig(RigConfig(accel=accel, vcpus=vcpus)) as rig:
            assert rig.accel == accel
            assert rig.boot_s < 5.0
            assert rig.private_dir is not None
            assert stat.S_IMODE(rig.private_dir.stat().st_mode) == 0o700
            assert stat.S_IMODE(rig.qmp_socket.stat().st_mode) == 0o600
            # vCPU threads are found by QEMU's thread names.
            assert list(rig.vcpu_tids) == list(range(vcpus))
            for i, tid in rig.vcpu_tids.items():
                comm = Path(f"/proc/{rig.pid}/task/{tid}/comm").read_text().strip()
                assert comm == f"CPU {i}/{accel.upper()}"
            first = [await rig.read_counter(i) for i in range(vcpus)]
            await asyncio.sleep(0.3)
            for i in range(vcpus):  # the MMIO loop runs on every vCPU
                assert await rig.read_counter(i) > first[i], i
            assert "slotscope-bare ready" in rig.serial()
            return rig.private_dir, rig.pid or 0
    private_dir, pid = run(body())
    assert_clean(private_dir, pid)


def test_on_spawn_runs_before_qemu_execs() -> None:
    """A tracer added in on_spawn sees QEMU from its first instruction: the
    pid it gets is still the holding shell, and becomes QEMU in place."""
    seen: dict[str, Any] = {}

    def on_spawn(pid: int) -> None:
        time.sleep(0.2)  # QEMU must not run meanwhile
        seen["pid"], seen["exe"] = pid, os.readlink(f"/proc/{pid}/exe")

    async def body() -> tuple[Path, int]:
        async with Rig(RigConfig(accel="tcg"), on_spawn=on_spawn) as rig:
            assert rig.pid == seen["pid"]
            assert "qemu-system" in os.readlink(f"/proc/{rig.pid}/exe")
            assert rig.proc is not None and rig.proc.poll() is None
            assert rig.private_dir is not None
            return rig.private_dir, rig.pid
    private_dir, pid = run(body())
    assert "qemu" not in seen["exe"] and Path(seen["exe"]).name in ("dash", "bash", "sh")
    assert_clean(private_dir, pid)


def test_on_spawn_failure_leaves_nothing_running() -> None:
    def on_spawn(pid: int) -> None:
        raise RigError("tracer refused")

    async def body() -> None:
        async with Rig(RigConfig(accel="tcg"), on_spawn=on_spawn):
            raise AssertionError("unreachable")
    with pytest.raises(RigError, match="tracer refused"):
        run(body())
    assert not qemu_children()


@pytest.mark.parametrize("accel", ACCELS)
def test_hotplug_cycles_agree_with_qmp(accel: str, tmp_path: Path) -> None:
    cycles = 5

    async def body() -> None:
        async with Rig(RigConfig(accel=accel), record_dir=tmp_path) as rig:
            log = WorkloadLog(tmp_path, {"rig": rig.info()})
            # One plug checked against query-memory-devices while plugged.
            dev = await plug_dimm(rig, log, 128 * MiB)
            devices = await rig.memory_devices()
            assert [d["data"]["id"] for d in devices] == [dev]
            detail = json.loads(log.actions("device_add")[-1]["detail"])
            assert detail["addr"] == devices[0]["data"]["addr"]
            assert detail["slot"] == devices[0]["data"]["slot"]
            await unplug_dimm(rig, log, dev)
            stats = await hotplug_cycles(rig, log, cycles=cycles - 1, size=64 * MiB)
            assert stats.cycles == cycles - 1
            assert await rig.memory_devices() == []
    run(body())
    rows = table(tmp_path)
    by_action: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        assert r["ok"], r
        by_action.setdefault(r["action"], []).append(r)
    for action in ("object-add", "device_add", "device_del", "event:DEVICE_DELETED",
                   "object-del"):
        assert len(by_action[action]) == cycles, action
    # Each DEVICE_DELETED answers its own device_del, after it was sent.
    for dd, ev in zip(by_action["device_del"], by_action["event:DEVICE_DELETED"], strict=True):
        assert dd["target"] == ev["target"]
        assert ev["end_ns"] >= dd["begin_ns"]
        assert json.loads(ev["detail"])["latency_ns"] == ev["end_ns"] - dd["begin_ns"]
    begins = [r["begin_ns"] for r in rows]
    assert begins == sorted(begins)
    assert all(r["end_ns"] >= r["begin_ns"] for r in rows)
    assert json.loads((tmp_path / "workload.json").read_text())["result"]["cycles"] == cycles - 1
    samples = (tmp_path / "qemu-samples.csv").read_text().splitlines()
    assert samples[0].startswith("ns,cpu_user_s") and len(samples) >= 2


@needs_kvm
def test_dirty_log_toggle_kvm(tmp_path: Path) -> None:
    async def body() -> None:
        async with Rig(RigConfig(accel="kvm"), record_dir=tmp_path) as rig:
            log = WorkloadLog(tmp_path)
            assert await dirty_log_toggles(rig, log, count=1) == 1
    run(body())
    rows = table(tmp_path)
    assert [r["action"] for r in rows] == ["calc-dirty-rate"]
    assert rows[0]["ok"]
    assert rows[0]["end_ns"] - rows[0]["begin_ns"] >= 1_000_000_000  # calc-time 1 s
    assert json.loads(rows[0]["detail"])["mode"] == "dirty-bitmap"


def test_dirty_log_refused_under_tcg() -> None:
    async def body() -> None:
        async with Rig(RigConfig(accel="tcg")) as rig:
            with pytest.raises(RigError, match="needs -accel kvm"):
                await dirty_log_toggles(rig, WorkloadLog(), count=1)
            assert rig.alive()  # refused before QEMU was asked (7.2 would segfault)
    run(body())


# -- bad input ---------------------------------------------------------------
def test_size_beyond_maxmem_and_slots_exhausted(tmp_path: Path) -> None:
    cfg = RigConfig(accel="tcg", memory=MemoryConfig(256 * MiB, slots=2, maxmem=512 * MiB))

    async def body() -> None:
        async with Rig(cfg, record_dir=tmp_path) as rig:
            with WorkloadLog(tmp_path) as log:
                with pytest.raises(RigError, match="does not fit"):
                    await plug_dimm(rig, log, 512 * MiB)
                with pytest.raises(RigError, match="multiple of 2M"):
                    await plug_dimm(rig, log, 3 * MiB)
                a = await plug_dimm(rig, log, 64 * MiB)
                b = await plug_dimm(rig, log, 64 * MiB)
                with pytest.raises(RigError, match="all 2 memory slots are in use"):
                    await plug_dimm(rig, log, 64 * MiB)
                # QEMU's own refusals come back as one-line RigErrors.
                with pytest.raises(RigError, match=r"^object-del: .*nope"):
                    await rig.require_qmp().execute("object-del", {"id": "nope"})
                ids = {d["data"]["id"] for d in await rig.memory_devices()}
                assert ids == {a, b}
                for dev in (a, b):
                    await unplug_dimm(rig, log, dev)
                assert await rig.memory_devices() == []
                objs = await rig.require_qmp().execute("qom-list", {"path": "/objects"})
                assert not [o for o in objs if o["name"].startswith("ssmem")]
    run(body())
    assert sum(r["action"] == "device_add" and r["ok"] for r in table(tmp_path)) == 2


def test_config_rejects_bad_values() -> None:
    with pytest.raises(RigError, match="must exceed base"):
        RigConfig(memory=MemoryConfig(1024 * MiB, 2, 512 * MiB)).validate()
    with pytest.raises(RigError, match=">= 2 pages"):
        from vmrig.config import BareGuestConfig
        RigConfig(bare=BareGuestConfig(npages=1)).validate()
    from vmrig.config import VirtioMemConfig
    with pytest.raises(RigError, match="does not fit the hotplug area"):
        RigConfig(virtio_mem=VirtioMemConfig(size=4096 * MiB)).validate()


def test_qemu_missing() -> None:
    with pytest.raises(RigError, match="not found"):
        run(Rig(RigConfig(), binary="/nonexistent/qemu-system-x86_64").__aenter__())
    assert not qemu_children()


# -- faults ----------------------------------------------------------------------
def test_guest_that_never_ejects(tmp_path: Path) -> None:
    async def body() -> None:
        async with Rig(RigConfig(accel="tcg"), record_dir=tmp_path) as rig:
            log = WorkloadLog(tmp_path)
            dev = await plug_dimm(rig, log, 128 * MiB)
            await rig.require_qmp().execute("stop")  # a guest that never answers
            with pytest.raises(RigError, match="did not eject within 0.5 s") as e:
                await unplug_dimm(rig, log, dev, timeout=0.5)
            # ...and the error says why: the paused vCPU thread did not run.
            assert "(VM paused after STOP, vCPU 0 at EIP=ffff" in str(e.value), e.value
            assert "; vCPU 0 (tid" in str(e.value), e.value
            assert "used no CPU in 0.5 s" in str(e.value)
            assert isinstance(e.value, GuestFault) and e.value.kind == "paused", repr(e.value)
            # Consistent: QEMU still has the dimm, the table says the unplug failed.
            assert [d["data"]["id"] for d in await rig.memory_devices()] == [dev]
    run(body())
    rows = table(tmp_path)
    ev = [r for r in rows if r["action"] == "event:DEVICE_DELETED"]
    assert len(ev) == 1 and not ev[0]["ok"] and "did not eject" in ev[0]["error"]


@pytest.mark.parametrize("accel", ACCELS)
def test_guest_exception_reported(accel: str, tmp_path: Path) -> None:
    """A CPU exception in the bare guest is printed, not a silent triple
    fault, and an eject timeout quotes it."""
    from vmrig import bareguest
    cfg = RigConfig(accel=accel, bare=BareGuestConfig(trap_after=50))

    async def body() -> RigError:
        async with Rig(cfg, record_dir=tmp_path) as rig:
            log = WorkloadLog(tmp_path)
            dev = await plug_dimm(rig, log, 128 * MiB)
            for _ in range(200):  # loop 50 comes within ms, or s on a busy host
                if rig.guest_exception():
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(RigError, match="did not eject") as e:
                await unplug_dimm(rig, log, dev, timeout=1.0)
            # The loop stopped exactly where it was told to fault.
            assert await rig.read_counter() == 50
            with pytest.raises(RigError) as bad:  # the workload's own error is not one
                await unplug_dimm(rig, log, "nodimm")
            assert not isinstance(bad.value, GuestFault), bad.value
            return e.value
    fault = run(body())
    # What the lab job reruns under TCG nesting: the guest's exception first.
    assert isinstance(fault, GuestFault) and fault.kind == "exception", repr(fault)
    err = str(fault)
    image = bareguest.build().read_bytes()
    ud2 = bareguest.LINK_BASE + image.index(b"\x0f\x0b")
    assert f"guest said '!exc 06 err 00000000 eip {ud2:08x}'" in err, err
    assert "vCPU 0 (tid" in err  # halted: its thread sleeps


def test_qemu_killed_mid_hotplug(tmp_path: Path) -> None:
    async def body() -> tuple[Path | None, int | None]:
        rig = Rig(RigConfig(accel="tcg"), record_dir=tmp_path)
        async with rig:
            log = WorkloadLog(tmp_path)
            dev = await plug_dimm(rig, log, 128 * MiB)
            await rig.require_qmp().execute("stop")
            task = asyncio.create_task(unplug_dimm(rig, log, dev, timeout=10))
            await asyncio.sleep(0.3)
            assert rig.pid is not None
            os.kill(rig.pid, signal.SIGKILL)
            with pytest.raises(RigError, match="QEMU closed the QMP connection"):
                await task
            private = rig.private_dir
        return private, rig.pid
    t0 = time.monotonic()
    private, pid = run(body())
    assert time.monotonic() - t0 < 8  # noticed promptly, not at the 10 s timeout
    assert_clean(private, pid)
    ev = [r for r in table(tmp_path) if r["action"] == "event:DEVICE_DELETED"]
    assert len(ev) == 1 and not ev[0]["ok"]


def test_qemu_death_named_with_its_status(tmp_path: Path) -> None:
    async def body() -> None:
        async with Rig(RigConfig(accel="tcg"), record_dir=tmp_path) as rig:
            assert rig.pid is not None
            os.kill(rig.pid, signal.SIGKILL)
            await rig.memory_devices()
    with pytest.raises(RigError) as e:
        run(body())
    # The QMP symptom and its cause, in one line.
    assert "QEMU closed the QMP connection" in str(e.value)
    assert str(e.value).endswith("QEMU exited with status -9"), e.value
    assert isinstance(e.value, GuestFault) and e.value.kind == "qemu_exit"
    # Left for a reader in another process (the lab job), kind and all.
    again = read_record(tmp_path)
    assert isinstance(again, GuestFault) and again.kind == "qemu_exit"
    assert str(again) == str(e.value)


def test_guest_reset_pauses_and_is_named(tmp_path: Path) -> None:
    async def body() -> str:
        async with Rig(RigConfig(accel="tcg"), record_dir=tmp_path) as rig:
            log = WorkloadLog(tmp_path)
            dev = await plug_dimm(rig, log, 128 * MiB)
            # A reset (as a guest triple fault is) pauses the VM; QEMU stays.
            await rig.require_qmp().execute("system_reset")
            with pytest.raises(RigError, match="did not eject") as e:
                await unplug_dimm(rig, log, dev, timeout=0.5)
            assert rig.alive()
            # The host reset it, not the guest: a shutdown, not a guest reset.
            assert isinstance(e.value, GuestFault) and e.value.kind == "shutdown"
            return str(e.value)
    err = run(body())
    assert "(VM shutdown after SHUTDOWN (host-qmp-system-reset), vCPU 0 at EIP=ffff" in err, err
    # The guest's serial output is kept with the run.
    assert (tmp_path / "serial.log").read_text().startswith("slotscope-bare ready")


def test_guest_that_never_boots_names_its_stalled_vcpu() -> None:
    """A boot that times out while QEMU runs is a GuestFault with its cause
    (the lab reruns those): here QEMU holds the vCPU (-S), so it got no CPU."""
    cfg = RigConfig(accel="tcg", boot_timeout=1.5, extra_args=("-S",))

    async def body() -> None:
        async with Rig(cfg):
            raise AssertionError("unreachable: the guest never runs")
    with pytest.raises(GuestFault) as e:
        run(body())
    assert e.value.kind == "stalled_vcpu", repr(e.value)
    assert "guest not ready after 1.5 s under tcg (serial: no output)" in str(e.value)
    assert "vCPU 0 (tid " in e.value.detail and "used no CPU" in e.value.detail
    assert not qemu_children()


def test_exception_inside_rig_cleans_up() -> None:
    seen: dict[str, Any] = {}

    async def body() -> None:
        async with Rig(RigConfig(accel="tcg")) as rig:
            seen["dir"], seen["pid"], seen["sock"] = rig.private_dir, rig.pid, rig.qmp_socket
            raise ValueError("boom")
    with pytest.raises(ValueError):
        run(body())
    assert not seen["sock"].exists()
    assert_clean(seen["dir"], seen["pid"])


@needs_root
def test_tap_created_and_removed() -> None:
    name = f"sst{os.getpid() % 100000}"

    async def body() -> None:
        async with Rig(RigConfig(accel="tcg", net=NetConfig(tap=name))) as rig:
            assert await asyncio.to_thread(tap.exists, name)
            assert f"ifname={name}" in " ".join(rig.argv)
    run(body())
    assert not tap.exists(name)


# -- the command line ------------------------------------------------------------
def slotscope(*args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slotscope", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})}, check=False)


def test_cli_up_hotplug_down(tmp_path: Path) -> None:
    state = tmp_path / "rig"
    env = {"SLOTSCOPE_RIG_DIR": str(state)}
    accel = "kvm" if HAS_KVM else "tcg"
    p = slotscope("rig", "up", "--accel", accel, env=env)
    assert p.returncode == 0, p.stderr
    pid = json.loads((state / "state.json").read_text())["pid"]
    try:
        assert "rig up: pid" in p.stdout
        p = slotscope("rig", "up", env=env)  # a second rig is refused
        assert p.returncode == 1 and "already up" in p.stderr
        assert p.stderr.count("\n") == 1
        p = slotscope("rig", "hotplug", "--cycles", "3", "--size", "128M",
                      "-o", str(tmp_path / "run"), env=env)
        assert p.returncode == 0, p.stderr
        assert "hotplug: 3 cycles of 128M" in p.stdout
        rows = table(tmp_path / "run")
        assert sum(r["action"] == "event:DEVICE_DELETED" and r["ok"] for r in rows) == 3
        p = slotscope("rig", "status", env=env)
        assert p.returncode == 0, p.stderr
        assert f"rig: pid {pid}, bare guest, accel {accel}, running" in p.stdout
        assert "vcpu tids" in p.stdout
        p = slotscope("rig", "hotplug", "--size", "3G", env=env)
        assert p.returncode == 1 and p.stderr.count("\n") == 1
        assert "does not fit" in p.stderr and "Traceback" not in p.stderr
    finally:
        p = slotscope("rig", "down", env=env)
    assert p.returncode == 0, p.stderr
    assert not state.exists()
    # Detached QEMU was reparented; an init that does not reap leaves a zombie.
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    p = slotscope("rig", "down", env=env)
    assert p.returncode == 1 and "no rig is up" in p.stderr


def test_cli_run_hotplug(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = slotscope("rig", "run", "--workload", "hotplug", "--accel", "tcg", "--duration", "1",
                  "--rate", "10", "-o", str(out))
    assert p.returncode == 0, p.stderr
    rows = table(out)
    n = sum(r["action"] == "device_add" for r in rows)
    assert 2 <= n <= 11  # 10 cycles/s for 1 s
    assert n == sum(r["action"] == "event:DEVICE_DELETED" and r["ok"] for r in rows)
    assert json.loads((out / "rig.json").read_text())["accel"] == "tcg"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_run_interrupted(sig: int, tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM mid-run: exit 130, QEMU gone, every recorded row kept,
    the run finalized (result, samples)."""
    out2 = tmp_path / "run2"
    proc = subprocess.Popen([sys.executable, "-m", "slotscope", "rig", "run", "--workload",
                             "hotplug", "--accel", "tcg", "--duration", "60", "--rate", "20",
                             "-o", str(out2)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    seen = 0
    while time.monotonic() < deadline and seen < 5:
        time.sleep(0.2)
        if (out2 / "workload.parquet").exists():
            seen = sum(r["action"] == "device_add" for r in table(out2))
    assert seen >= 5, "no hotplug cycles recorded within 60 s"
    qemu_pid = json.loads((out2 / "rig.json").read_text())["pid"]
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # do not leak it into later tests
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip() == "slotscope rig: interrupted"  # no traceback, no asyncio noise
    assert not psutil.pid_exists(qemu_pid) or psutil.Process(qemu_pid).status() == "zombie"
    # Nothing recorded before the interrupt is lost.
    assert sum(r["action"] == "device_add" for r in table(out2)) >= seen
    assert json.loads((out2 / "workload.json").read_text())["result"]["cycles"] >= seen - 1
    assert (out2 / "qemu-samples.csv").exists()


def test_cli_bad_input() -> None:
    p = slotscope("rig", "run", "--workload", "hotplug", "--accel", "tcg", "--duration", "1",
                  "--memory", "1G", "--maxmem", "512M")
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "must exceed base" in p.stderr
    p = slotscope("rig", "hotplug", "--size", "lots")
    assert p.returncode == 2 and "bad size" in p.stderr
    p = slotscope("rig", "run", "--workload", "hotplug", "--duration", "1",
                  env={"SLOTSCOPE_QEMU": "/nonexistent/qemu"})
    assert p.returncode == 1
    assert p.stderr == "slotscope rig: error: /nonexistent/qemu not found " \
        "(install qemu-system-x86: ./setup.sh)\n"


@needs_kvm
def test_cli_run_microvm(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = slotscope("rig", "run", "--workload", "microvm", "--duration", "0.5",
                  "--schedule", "create:1,flags:1,delete:1", "-o", str(out))
    assert p.returncode == 0, p.stderr
    rows = table(out)
    sched = [r["action"] for r in rows
             if json.loads(r["detail"]).get("phase") == "schedule"]
    assert sched == ["memslot_create", "memslot_flags_only", "memslot_delete"]
    result = json.loads((out / "workload.json").read_text())
    assert result["mmio_exits"] > 0
    # One row per memslot ioctl (setup slot included) and one for the MMIO loop.
    assert sum(n for n in result["memslot_counts"].values()) + 1 == len(rows)


TRACEFS = Path("/sys/kernel/tracing")
KVM_SET_USER_MEMORY_REGION = 0x4020AE46


@needs_root
@needs_kvm
@pytest.mark.skipif(not (TRACEFS / "events/syscalls/sys_enter_ioctl").exists(),
                    reason="needs tracefs with syscalls:sys_enter_ioctl")
def test_kvm_memslot_ioctls_per_action() -> None:
    """Under -accel kvm a pc-dimm plug is exactly one KVM_SET_USER_MEMORY_REGION
    (CREATE), its unplug one (DELETE); a dirty-log round flags every RAM slot
    on and off.  Counted in a private tracefs instance (no effect on others)."""
    inst = TRACEFS / "instances" / f"slotscope-rig-test-{os.getpid()}"
    inst.mkdir()
    counts: dict[str, int] = {}

    qemu: dict[str, int] = {}

    def take() -> int:
        # record-tgid: QEMU's short-lived threads (e.g. calc-dirty-rate's) count too.
        lines = [ln for ln in (inst / "trace").read_text().splitlines()
                 if "sys_ioctl" in ln and f"({qemu['pid']:>7})" in ln]
        (inst / "trace").write_text("")
        return len(lines)

    async def body() -> None:
        async with Rig(RigConfig(accel="kvm")) as rig:
            assert rig.pid is not None
            qemu["pid"] = rig.pid
            (inst / "options/record-tgid").write_text("1")
            ev = inst / "events/syscalls/sys_enter_ioctl"
            (ev / "filter").write_text(f"cmd == {KVM_SET_USER_MEMORY_REGION:#x}")
            (ev / "enable").write_text("1")
            take()
            log = WorkloadLog()
            dev = await plug_dimm(rig, log, 128 * MiB)
            await asyncio.sleep(0.1)
            counts["plug"] = take()
            await unplug_dimm(rig, log, dev)
            await asyncio.sleep(0.1)
            counts["unplug"] = take()
            await dirty_log_toggles(rig, log, count=1)
            await asyncio.sleep(0.1)
            counts["dirty"] = take()
            (ev / "enable").write_text("0")
    try:
        run(body())
    finally:
        inst.rmdir()
    assert counts["plug"] == 1 and counts["unplug"] == 1, counts
    assert counts["dirty"] >= 2 and counts["dirty"] % 2 == 0, counts


@needs_root
def test_owner_sigkilled_leaves_nothing_after_sweep() -> None:
    """SIGKILL cannot be cleaned up in-process: QEMU dies with its owner
    (PR_SET_PDEATHSIG) and the next rig sweeps the private dir and TAP."""
    from vmrig.privatedir import sweep_stale
    name = f"ssk{os.getpid() % 100000}"
    code = (
        "import asyncio\n"
        "from vmrig.config import RigConfig, NetConfig\n"
        "from vmrig.rig import Rig\n"
        "async def main():\n"
        f"    async with Rig(RigConfig(accel='tcg', net=NetConfig(tap='{name}'))) as rig:\n"
        "        print(rig.pid, rig.private_dir, flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    pid_s, private_s = proc.stdout.readline().split()
    qemu_pid, private = int(pid_s), Path(private_s)
    assert private.exists() and tap.exists(name)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(qemu_pid) and psutil.Process(qemu_pid).status() != "zombie":
        assert time.monotonic() < deadline, "QEMU outlived its SIGKILLed owner"
        time.sleep(0.05)
    assert private in sweep_stale()
    assert not private.exists() and not tap.exists(name)


def test_hotplug_batch_uses_distinct_slots(tmp_path: Path) -> None:
    async def body() -> None:
        async with Rig(RigConfig(accel="tcg", vcpus=2)) as rig:  # APs loop meanwhile
            with WorkloadLog(tmp_path) as log:
                stats = await hotplug_cycles(rig, log, cycles=2, size=64 * MiB, batch=3)
                assert stats.cycles == 2 and len(stats.unplug_s) == 6
                with pytest.raises(RigError, match="batch 5 must be 1..4"):
                    await hotplug_cycles(rig, log, cycles=1, batch=5)
            assert await rig.memory_devices() == []
    run(body())
    adds = [json.loads(r["detail"]) for r in table(tmp_path) if r["action"] == "device_add"]
    assert [a["slot"] for a in adds] == [0, 1, 2, 0, 1, 2]
    assert len({a["addr"] for a in adds[:3]}) == 3


def test_auto_accel_for_the_bare_guest() -> None:
    """auto: KVM where /dev/kvm works (the bare guest runs even on kvm_pvm),
    else TCG; either way the guest is up."""
    async def body() -> str:
        async with Rig(RigConfig(accel="auto")) as rig:
            assert "slotscope-bare ready" in rig.serial()
            return rig.accel
    assert run(body()) == ("kvm" if HAS_KVM else "tcg")
