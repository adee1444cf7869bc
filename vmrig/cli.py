"""``slotscope rig up|hotplug|down|run``: the QEMU rig from the command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
from pathlib import Path
from typing import Any

from vmrig.config import (
    ACCELS,
    GUESTS,
    BareGuestConfig,
    MemoryConfig,
    NetConfig,
    RigConfig,
    VirtioMemConfig,
    fmt_size,
    parse_size,
)
from vmrig.errors import RigConfigError, RigError
from vmrig.workloads import WORKLOADS


def _size(text: str) -> int:
    """``parse_size`` as an argparse type: argparse prints only an
    ArgumentTypeError's own message (exit 2)."""
    try:
        return parse_size(text)
    except RigConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_rig_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rig")
    g.add_argument("--guest", choices=GUESTS, default=None,
                   help="bare-metal loop (default) or Linux + busybox")
    g.add_argument("--accel", choices=ACCELS, default="auto")
    g.add_argument("--cpu", help="QEMU -cpu model (default: one that starts)")
    g.add_argument("--nested", action="store_true", help="expose vmx/svm to the guest")
    g.add_argument("--vcpus", type=int, default=1)
    g.add_argument("--memory", type=_size, default=256 << 20, metavar="SIZE",
                   help="boot RAM (default 256M)")
    g.add_argument("--slots", type=int, default=4, help="pc-dimm slots (default 4)")
    g.add_argument("--maxmem", type=_size, default=2 << 30, metavar="SIZE",
                   help="boot RAM + hotplug area (default 2G)")
    g.add_argument("--pages", type=int, default=4, help="MMIO pages the guest loops over")
    g.add_argument("--virtio-mem", type=_size, metavar="SIZE",
                   help="add a virtio-mem device of SIZE (Linux guest resizes it)")
    g.add_argument("--tap", metavar="NAME", help="virtio-net on a new TAP NAME")
    g.add_argument("--boot-timeout", type=float, default=60.0, metavar="S")


def _config(args: argparse.Namespace, guest: str = "bare") -> RigConfig:
    vm = VirtioMemConfig(size=args.virtio_mem) if args.virtio_mem else None
    cfg = RigConfig(
        guest=args.guest or guest, accel=args.accel, cpu=args.cpu, nested=args.nested,
        vcpus=args.vcpus, memory=MemoryConfig(args.memory, args.slots, args.maxmem),
        virtio_mem=vm, net=NetConfig(tap=args.tap) if args.tap else None,
        bare=BareGuestConfig(npages=args.pages), boot_timeout=args.boot_timeout)
    cfg.validate()
    return cfg


def _state_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.state_dir) if args.state_dir else None


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return (f"median {statistics.median(values) * 1e3:.1f} ms, "
            f"max {max(values) * 1e3:.1f} ms")


# -- up / down ---------------------------------------------------------------
async def _up(args: argparse.Namespace) -> int:
    from vmrig.rig import Rig
    from vmrig.rigstate import default_state_dir
    d = _state_dir(args) or default_state_dir()
    async with Rig(_config(args), private_dir=d, detach=True) as rig:
        print(f"rig up: pid {rig.pid}, {rig.config.guest} guest, accel {rig.accel}, "
              f"booted in {rig.boot_s:.2f} s")
        print(f"  qmp {rig.qmp_socket}")
        print(f"  vcpu threads {sorted(rig.vcpu_tids.values())}")
    return 0


async def _down(args: argparse.Namespace) -> int:
    from vmrig.rig import Rig
    rig = await Rig.attach(_state_dir(args))
    pid, was_alive = rig.pid, rig.pid is not None
    await rig.stop()
    print(f"rig down: pid {pid} stopped" if was_alive
          else "rig down: QEMU was already gone; cleaned up")
    return 0


async def _status(args: argparse.Namespace) -> int:
    from vmrig.rig import Rig
    rig = await Rig.attach(_state_dir(args))
    if rig.qmp is None:
        raise RigError("the rig's QEMU is not running; run: slotscope rig down")
    try:
        status = (await rig.qmp.execute("query-status"))["status"]
        devices = await rig.memory_devices()
        s1 = rig.sample()
        await asyncio.sleep(0.5)
        s2 = rig.sample()
    finally:
        await rig.qmp.close()
    print(f"rig: pid {rig.pid}, {rig.config.guest} guest, accel {rig.accel}, {status}")
    if s1 and s2:
        cpu = (s2[1] + s2[2] - s1[1] - s1[2]) / ((s2[0] - s1[0]) / 1e9) * 100
        print(f"  cpu {cpu:.0f}%, rss {s2[3] >> 20} MiB, {s2[4]} threads, "
              f"vcpu tids {sorted(rig.vcpu_tids.values())}")
    for d in devices:
        data = d["data"]
        print(f"  {d['type']:10} {data.get('id', '-'):24} {fmt_size(int(data['size'])):>6} "
              f"at {int(data.get('addr', data.get('memaddr', 0))):#x}")
    return 0


# -- workloads ---------------------------------------------------------------
def _prepare_run_dir(path: str | None) -> Path | None:
    if path is None:
        return None
    d = Path(path)
    if (d / "workload.parquet").exists():
        raise RigError(f"{d} already holds a workload table")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RigError(f"cannot create {d}: {e.strerror}") from None
    return d


async def _hotplug(args: argparse.Namespace) -> int:
    from vmrig.rig import Rig
    from vmrig.workloadlog import WorkloadLog
    from vmrig.workloads import hotplug_cycles
    run_dir = _prepare_run_dir(args.output)
    rig = await Rig.attach(_state_dir(args))
    if rig.qmp is None:
        raise RigError("the rig's QEMU is not running; run: slotscope rig down")
    log = WorkloadLog(run_dir, {"rig": {"pid": rig.pid, "accel": rig.accel,
                                        "argv": rig.argv, "vcpu_tids": rig.vcpu_tids}})
    try:
        stats = await hotplug_cycles(rig, log, cycles=args.cycles, size=args.size,
                                     rate=args.rate, hold=args.hold,
                                     unplug_timeout=args.timeout, batch=args.batch)
    finally:
        assert rig.qmp is not None
        await rig.qmp.close()
    _print_hotplug(stats, args.size, run_dir)
    return 0


def _print_hotplug(stats: Any, size: int, run_dir: Path | None) -> None:
    print(f"hotplug: {stats.cycles} cycles of {fmt_size(size)}")
    print(f"  plug   {_ms(stats.plug_s)}")
    print(f"  unplug {_ms(stats.unplug_s)} (device_del to DEVICE_DELETED)")
    print(f"  cycle  {_ms(stats.cycle_s)}")
    if run_dir is not None:
        print(f"  workload table: {run_dir / 'workload.parquet'}")


async def _run(args: argparse.Namespace) -> int:
    if args.duration <= 0:
        raise RigError("--duration must be > 0")
    run_dir = _prepare_run_dir(args.output)
    if args.workload == "microvm":
        return _run_microvm(args, run_dir)
    from vmrig import workloads as wl
    from vmrig.rig import Rig
    from vmrig.virtiomem import virtio_mem_steps
    guest = "linux" if args.workload == "virtio-mem" else "bare"
    if args.workload == "virtio-mem" and args.guest == "bare":
        raise RigError("virtio-mem resizes need the guest's driver: use --guest linux")
    if args.workload == "virtio-mem" and not args.virtio_mem:
        args.virtio_mem = 512 << 20
    cfg = _config(args, guest)
    # Made before QEMU starts: its first write pays pyarrow's one-off pandas
    # import (1 s here, ~20 s in a TCG L1) while no guest is waiting.
    log = wl.WorkloadLog(run_dir)
    async with Rig(cfg, record_dir=run_dir) as rig:
        log.config["rig"] = rig.info()
        log.flush()
        print(f"rig: pid {rig.pid}, {cfg.guest} guest, accel {rig.accel}, "
              f"booted in {rig.boot_s:.2f} s")
        if args.workload == "hotplug":
            stats = await wl.hotplug_cycles(rig, log, cycles=args.cycles, size=args.size,
                                            rate=args.rate, duration=args.duration,
                                            hold=args.hold, unplug_timeout=args.timeout,
                                            batch=args.batch)
            _print_hotplug(stats, args.size, run_dir)
        elif args.workload == "virtio-mem":
            assert cfg.virtio_mem is not None
            top = cfg.virtio_mem.size
            steps = await virtio_mem_steps(rig, log, [top // 2, top, 0],
                                           timeout=args.timeout, duration=args.duration)
            print(f"virtio-mem: {steps} resize steps")
        else:
            n = await wl.dirty_log_toggles(rig, log, count=None, duration=args.duration)
            print(f"dirty-log: {n} calc-dirty-rate rounds (dirty logging on/off)")
    return 0


def _run_microvm(args: argparse.Namespace, run_dir: Path | None) -> int:
    from vmrig import microvm
    r = microvm.run(duration=args.duration, pages=max(2, args.pages), schedule=args.schedule)
    if run_dir is not None:
        microvm.write_workload(run_dir, r)
    print(f"microvm: {r.mmio_exits} MMIO exits ({r.mmio_exits_per_s:.0f}/s), "
          f"{len(r.memslot_changes)} memslot changes")
    return 0


# -- registration ------------------------------------------------------------
def _dimm_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """pc-dimm cycle shape, shared by `rig hotplug` and `rig run`."""
    p.add_argument("--size", type=_size, default=128 << 20, metavar="SIZE",
                   help=f"{prefix}pc-dimm size")
    p.add_argument("--rate", type=float, help=f"{prefix}at most RATE cycles/s")
    p.add_argument("--hold", type=float, default=0.0, metavar="S",
                   help=f"{prefix}keep each dimm plugged S seconds")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help=f"{prefix}plug N dimms (N slots) per cycle, then unplug them")


_INTERRUPTED = -130


def _sync(coro_fn: Any) -> Any:
    """Run an async handler; SIGINT/SIGTERM cancel it (so every ``finally``
    and ``async with Rig`` cleanup runs inside the loop), then surface as
    KeyboardInterrupt for slotscope's "interrupted" exit.  A signal handler
    raising KeyboardInterrupt at an arbitrary point would instead land in
    qemu.qmp's internal tasks and skip the rig's cleanup."""
    async def main(args: argparse.Namespace) -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            if not interrupted:  # a second signal must not cut the cleanup short
                interrupted = True
                task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        try:
            return int(await coro_fn(args))
        except asyncio.CancelledError:
            if interrupted:
                return _INTERRUPTED
            raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def handler(args: argparse.Namespace) -> int:
        rc = asyncio.run(main(args))
        if rc == _INTERRUPTED:
            raise KeyboardInterrupt
        return rc
    return handler


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rig = subparsers.add_parser("rig", help="QEMU/KVM test rig: boot, hotplug, workloads",
                                description="QEMU/KVM test rig driven over QMP.")
    sub = rig.add_subparsers(dest="rig_command", metavar="ACTION", required=True)

    def state_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", help="where a running rig is kept "
                       "(default $SLOTSCOPE_RIG_DIR or /run/slotscope/rig)")

    up = sub.add_parser("up", help="boot a guest and leave it running")
    _add_rig_options(up)
    state_opt(up)
    up.set_defaults(func=_sync(_up))

    hp = sub.add_parser("hotplug", help="pc-dimm plug/unplug cycles on the running rig")
    hp.add_argument("--cycles", type=int, default=1)
    _dimm_options(hp)
    hp.add_argument("--timeout", type=float, default=10.0, metavar="S",
                    help="wait this long for DEVICE_DELETED")
    hp.add_argument("-o", "--output", metavar="RUN_DIR", help="write the workload table here")
    state_opt(hp)
    hp.set_defaults(func=_sync(_hotplug))

    st = sub.add_parser("status", help="the running rig: state, CPU, RSS, memory devices")
    state_opt(st)
    st.set_defaults(func=_sync(_status))

    down = sub.add_parser("down", help="stop the running rig and remove what it made")
    state_opt(down)
    down.set_defaults(func=_sync(_down))

    run = sub.add_parser("run", help="boot, run one workload, record it, tear down")
    run.add_argument("--workload", choices=tuple(WORKLOADS), required=True,
                     help=", ".join(f"{name}: {what}" for name, what in WORKLOADS.items()))
    run.add_argument("--duration", type=float, default=5.0, metavar="S",
                     help="run the workload this long (default 5)")
    run.add_argument("-o", "--output", metavar="RUN_DIR", help="write the workload table here")
    run.add_argument("--cycles", type=int, help="hotplug: stop after N cycles")
    _dimm_options(run, "hotplug: ")
    run.add_argument("--timeout", type=float, default=10.0, metavar="S",
                     help="wait this long for each awaited QMP event")
    run.add_argument("--schedule", default="create:1,flags:1,flags:1,move:1,delete:1",
                     help="microvm: memslot change schedule")
    _add_rig_options(run)
    run.set_defaults(func=_sync(_run))
