"""A running QEMU: launch, supervision, QMP, and cleanup on every exit path.

    async with Rig(RigConfig(guest="bare", accel="auto"), record_dir=run) as rig:
        await hotplug_cycles(rig, WorkloadLog(run), cycles=5, size=128 * MiB)

The rig's private directory (0700) holds the QMP socket (0600), serial log,
guest image and pidfile.  QEMU runs in its own session (a terminal's Ctrl-C
reaches only us; we shut it down in order) and, unless detached for
``rig up``, with PR_SET_PDEATHSIG so it dies even if we are SIGKILLed.
Stopping removes the process, socket, TAP and private directory.

The class reads top to bottom as its lifecycle (paths, start, snapshots,
supervision, QMP helpers, stop, detach/attach), hence one module of ~520
lines.  What it uses lives beside it: ``spawn`` (QEMU's process), ``privatedir`` (the
private directory and the sweep of stale ones), ``vcpus`` and ``samples``
(what QEMU's threads do), ``silence`` (why a guest stopped answering),
``rigstate`` (what ``rig up`` leaves behind), ``snapshot`` (a Linux guest
booted once and restored for every run) and ``errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from recording.hostfacts import pvm_host
from recording.schema import monotonic_ns
from vmrig import bareguest, host, silence, snapshot
from vmrig.config import LaunchFiles, RigConfig, config_from_dict, host_cpu_vendor, qemu_argv
from vmrig.errors import GuestFault, QemuGone, RigError, SnapshotError, write_record
from vmrig.privatedir import make_private_dir, sweep_stale, write_owner
from vmrig.qmp import Qmp
from vmrig.rigstate import RigState, default_state_dir
from vmrig.samples import SAMPLES_FILE, sample, write_samples
from vmrig.silence import Progress, Silence
from vmrig.spawn import spawn_qemu
from vmrig.vcpus import vcpu_threads

_log = logging.getLogger(__name__)

RIG_FILE = "rig.json"


class Rig:
    """One QEMU guest driven over QMP.  Use ``async with``."""

    def __init__(self, config: RigConfig, record_dir: str | os.PathLike[str] | None = None,
                 private_dir: str | os.PathLike[str] | None = None,
                 binary: str | None = None, detach: bool = False,
                 sample_interval: float = 0.5,
                 on_spawn: Callable[[int], None] | None = None,
                 snapshots: snapshot.Snapshots | None = None) -> None:
        """``on_spawn(pid)`` runs after QEMU's process exists and before it
        execs: a tracer that adds the pid there sees every KVM ioctl QEMU
        makes, its initial memslots included.  ``snapshots``: a Linux guest
        is restored from its configuration's snapshot there, or booted,
        saved there and restored (vmrig/snapshot.py); QEMU >= 9.0."""
        config.validate()
        self.config = config
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self._private_arg = Path(private_dir) if private_dir is not None else None
        self.binary_arg = binary
        self.detach = detach
        self.sample_interval = sample_interval
        self.on_spawn = on_spawn
        self.snapshots = snapshots
        self.snapshot_info: dict[str, Any] = {}  # rig.json's "snapshot"
        self.private_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.qmp: Qmp | None = None
        self.accel: str = ""
        self.argv: list[str] = []
        self.boot_s: float = 0.0
        self.spawn_ns: int = 0
        self.vcpu_tids: dict[int, int] = {}
        self.tap_created: str | None = None
        self.dynamic_memslots = False
        self._sampler: asyncio.Task[None] | None = None
        self._samples: list[tuple[Any, ...]] = []
        self._attached = False

    # -- paths ---------------------------------------------------------------
    def _files(self) -> LaunchFiles:
        assert self.private_dir is not None
        d = self.private_dir
        return LaunchFiles(qmp_socket=d / "qmp.sock", serial_log=d / "serial.log",
                           pidfile=d / "qemu.pid",
                           bios=d / "bare.bin" if self.config.guest == "bare" else None,
                           kernel=d / "kernel" if self.config.guest == "linux" else None,
                           initrd=d / "initrd" if self.config.guest == "linux" else None)

    @property
    def qmp_socket(self) -> Path:
        return self._files().qmp_socket

    @property
    def serial_log(self) -> Path:
        return self._files().serial_log

    def serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def guest_exception(self) -> str:
        """The bare guest's report of a CPU exception ('!exc 06 err ...
        eip ...'), '' if it printed none."""
        return next((ln for ln in self.serial().splitlines() if ln.startswith("!exc ")), "")

    # -- lifecycle -----------------------------------------------------------
    async def __aenter__(self) -> Rig:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.detach and exc[0] is None:
            await self._detach()
            return
        error = exc[1] if isinstance(exc[1], RigError) else None
        if isinstance(error, GuestFault) and self.snapshots is not None \
                and "file" in self.snapshot_info:
            # Never restore a guest that faulted again: the next run boots.
            (self.snapshots.directory / self.snapshot_info["file"]).unlink(missing_ok=True)
        if isinstance(error, QemuGone) and self.proc is not None:
            # QMP going away first is the symptom; QEMU's status and last
            # stderr line are the cause.
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, 5)
            if self.proc.returncode is not None:
                tail = self._stderr_tail()
                event = self.qmp.last_lifecycle() if self.qmp is not None else ""
                died = f"QEMU exited with status {self.proc.returncode}" + \
                    (f" after {event}" if event else "") + (f": {tail}" if tail else "")
                error = GuestFault(f"{error}; {died}", "qemu_exit", died)
        await self.stop()
        if error is not None and self.record_dir is not None:
            # For a reader in another process (the lab job on the host).
            with contextlib.suppress(OSError):
                write_record(self.record_dir, error)
        if error is not None and error is not exc[1]:
            raise error from None

    def _accel_candidates(self) -> list[str]:
        kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK)
        if self.config.accel == "kvm":
            if not kvm_ok:
                raise RigError("-accel kvm: /dev/kvm is missing or not read/writable")
            return ["kvm"]
        if self.config.accel == "tcg":
            return ["tcg"]
        # auto: KVM only where this guest can run under it; kvm_pvm emulates
        # every instruction and cannot boot Linux (its emulator lacks
        # cmpxchg16b/xrstor), but runs the bare guest.
        if kvm_ok and not (self.config.guest == "linux" and pvm_host()):
            return ["kvm", "tcg"]
        return ["tcg"]

    async def start(self) -> None:
        binary = host.qemu_binary(self.binary_arg)
        if binary is None:
            wanted = self.binary_arg or os.environ.get("SLOTSCOPE_QEMU") or host.QEMU_BINARY
            raise RigError(f"{wanted} not found "
                           "(install qemu-system-x86: ./setup.sh)")
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
        if self._private_arg is None:
            await asyncio.to_thread(sweep_stale)  # pyroute2 runs its own loop
        self.private_dir = make_private_dir(self._private_arg)
        files = self._files()
        if self.config.virtio_mem is not None:
            self.dynamic_memslots = ("dynamic-memslots"
                                     in host.device_properties(binary, "virtio-mem-pci"))
        if self.config.guest == "bare":
            assert files.bios is not None
            bareguest.image_for(self.config.bare, self.config.memory.slots, files.bios)
        else:
            from vmrig import linuxguest  # needs the kernel cache; imported on demand
            await asyncio.to_thread(linuxguest.prepare, self.config, files)
        if self.config.net is not None:
            from vmrig import tap
            # pyroute2's sync API runs its own event loop: keep it off ours.
            if self._private_arg is None:
                write_owner(self.private_dir, self.config.net.tap)  # before it exists
            await asyncio.to_thread(tap.create, self.config.net.tap)
            self.tap_created = self.config.net.tap
        errors: list[tuple[str, RigError]] = []
        for accel in self._accel_candidates():
            if errors:  # auto: the first accelerator failed, say so before the next
                failed, why = errors[-1]
                _log.warning("rig: %s did not boot the guest (%s); trying %s", failed, why,
                             accel)
            try:
                await self._launch(binary, accel, files)
                break
            except RigError as e:
                errors.append((accel, e))
                await self._kill()
        else:
            if len(errors) == 1:
                raise errors[0][1]  # its type (a GuestFault's kind) kept for the caller
            raise RigError("QEMU did not boot the guest: "
                           + "; ".join(f"{a}: {e}" for a, e in errors))
        self._write_rig_json()
        if not self.detach:
            self._sampler = asyncio.create_task(self._sample_loop())

    async def _launch(self, binary: str, accel: str, files: LaunchFiles) -> None:
        self.accel = accel
        self.argv = qemu_argv(binary, self.config, accel, files,
                              dynamic_memslots_supported=self.dynamic_memslots,
                              host_vendor=host_cpu_vendor())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.boot_timeout
        snap = self._snapshot_path()
        if snap is not None and snap.exists() and await self._restore(snap, files, deadline):
            return
        await self._spawn(self.argv, files, deadline)
        qmp = self.require_qmp()
        ready = bareguest.READY_LINE if self.config.guest == "bare" else "slotscope-linux ready"
        before, t_wait = await self.progress(), loop.time()
        while ready not in self.serial():
            self._check_alive("booting")
            # A guest that reset (-action reboot=shutdown), panicked or was
            # paused never prints its line: say why now, not at the deadline
            # (a Linux L2 that double-faulted 0.8 s into its boot used to
            # hold a lab run for the whole boot_timeout).
            if loop.time() > deadline or qmp.vm_stopped():
                raise await silence.not_booted(self, accel, before, loop.time() - t_wait)
            await asyncio.sleep(0.01)
        self.boot_s = (monotonic_ns() - self.spawn_ns) / 1e9
        if snap is not None and snapshot.supported(qmp.version):
            await self._save_and_restore(snap, files)

    async def _spawn(self, argv: list[str], files: LaunchFiles, deadline: float) -> None:
        """Start QEMU with ``argv`` and connect to its QMP socket."""
        for f in (files.qmp_socket, files.serial_log, files.pidfile):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        self.spawn_ns = monotonic_ns()
        assert self.private_dir is not None
        self.proc = spawn_qemu(argv, self.private_dir / "qemu.stderr",
                               die_with_parent=not self.detach, on_spawn=self.on_spawn)
        self.pid = self.proc.pid
        loop = asyncio.get_running_loop()
        # QEMU creates the socket before the guest runs.
        while not files.qmp_socket.exists():
            self._check_alive("starting")
            if loop.time() > deadline:
                raise RigError(f"no QMP socket after {self.config.boot_timeout:g} s")
            await asyncio.sleep(0.01)
        # The socket file appears at bind(), a moment before listen().
        while True:
            qmp = Qmp(timeout=self.config.qmp_timeout)
            try:
                await qmp.connect(str(files.qmp_socket))
                break
            except RigError:
                await qmp.close()
                self._check_alive("starting")
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.02)
        self.qmp = qmp
        os.chmod(files.qmp_socket, 0o600)
        # QEMU made its vCPU threads before its monitor answered.
        self.vcpu_tids = vcpu_threads(self.pid)

    # -- snapshots (vmrig/snapshot.py) ---------------------------------------
    def _snapshot_path(self) -> Path | None:
        """Where this configuration's snapshot is kept; None where the rig
        takes none: no store, a bare guest (it boots in a moment), or a
        configuration whose save failed before."""
        if self.snapshots is None or self.config.guest != "linux":
            return None
        assert self.private_dir is not None
        path = self.snapshots.path_for(self.argv, self.private_dir)
        return None if path in self.snapshots.failed else path

    async def _restore(self, snap: Path, files: LaunchFiles, deadline: float) -> bool:
        """Run the guest from ``snap``.  False, with the file removed and
        QEMU gone, where that did not work: the caller boots instead."""
        t0 = monotonic_ns()
        try:
            self.snapshot_info["restored"] = True  # what running_argv() gives
            await self._spawn(self.running_argv(), files, deadline)
            await snapshot.restore(self.require_qmp(), snap,
                                   max(1.0, deadline - asyncio.get_running_loop().time()))
        except RigError as e:
            _log.warning("rig: %s; booting the guest instead", e)
            self.snapshot_info.pop("restored")
            await self._kill()
            snap.unlink(missing_ok=True)
            return False
        self.boot_s = (monotonic_ns() - self.spawn_ns) / 1e9
        self.snapshot_info.update(file=snap.name,
                                  restore_s=round((monotonic_ns() - t0) / 1e9, 3))
        return True

    async def _save_and_restore(self, snap: Path, files: LaunchFiles) -> None:
        """Save the guest just booted to ``snap`` and run it from there, as
        every later run of this configuration will (the same guest state in
        each).  A failed save leaves the booted guest running, and the
        configuration is not saved again in this store."""
        assert self.snapshots is not None
        t0, qmp = monotonic_ns(), self.require_qmp()
        try:
            await snapshot.save(qmp, snap, self.config.boot_timeout)
        except RigError as e:
            _log.warning("rig: %s; this configuration boots every run", e)
            self.snapshots.failed.add(snap)
            if not isinstance(e, QemuGone):
                with contextlib.suppress(RigError):
                    await qmp.execute("cont")
            self.snapshot_info.update(save_error=str(e))
            return
        self.snapshot_info.update(saved_s=round((monotonic_ns() - t0) / 1e9, 3),
                                  boot_s=round(self.boot_s, 4))
        await self._kill()
        deadline = asyncio.get_running_loop().time() + self.config.boot_timeout
        if not await self._restore(snap, files, deadline):
            self.snapshots.failed.add(snap)  # later runs boot
            raise SnapshotError("restore", "the snapshot just saved did not load")

    def stderr_lines(self) -> list[str]:
        """What QEMU printed, warnings left out."""
        if self.private_dir is None:
            return []
        try:
            lines = (self.private_dir / "qemu.stderr").read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln.strip() for ln in lines if "warning:" not in ln]

    def _stderr_tail(self) -> str:
        lines = self.stderr_lines()
        return lines[-1] if lines else ""

    async def why_silent(self, before: Progress, window_s: float) -> Silence:
        """Why the guest may not have answered in ``window_s`` since ``before``
        (vmrig/silence.py)."""
        return await silence.why_silent(self, before, window_s)

    async def progress(self) -> Progress:
        """A snapshot to compare against when the guest goes quiet."""
        return await silence.progress(self)

    def _check_alive(self, phase: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self._stderr_tail()
            raise RigError(f"QEMU exited while {phase} (status {self.proc.returncode})"
                           + (f": {tail}" if tail else ""))

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and psutil.pid_exists(self.pid)

    # -- supervision ---------------------------------------------------------
    def sample(self) -> tuple[Any, ...] | None:
        """QEMU's CPU, RSS and vCPU times now (vmrig/samples.py)."""
        return sample(self.pid, self.vcpu_tids) if self.pid is not None else None

    async def _sample_loop(self) -> None:
        while True:
            s = self.sample()
            if s is not None:
                self._samples.append(s)
            await asyncio.sleep(self.sample_interval)

    def _samples_path(self) -> Path | None:
        return (self.record_dir or self.private_dir or Path()) / SAMPLES_FILE \
            if (self.record_dir or self.private_dir) else None

    def _write_samples(self) -> None:
        path = self._samples_path()
        if path is not None:
            write_samples(path, self._samples, self.vcpu_tids)

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid, "accel": self.accel, "guest": self.config.guest,
                "argv": self.running_argv(), "boot_s": round(self.boot_s, 4),
                "spawn_ns": self.spawn_ns,
                "vcpu_tids": self.vcpu_tids, "qemu_version": self.qmp.version if self.qmp else {},
                "dynamic_memslots": self.dynamic_memslots,
                "snapshot": self.snapshot_info or None,
                "config": asdict(self.config)}

    def running_argv(self) -> list[str]:
        """The command line of the QEMU that runs the guest: a restored one
        was started to wait for its snapshot."""
        return [*self.argv, "-incoming", "defer"] if self.snapshot_info.get("restored") \
            else self.argv

    def _write_rig_json(self) -> None:
        target = self.record_dir or self.private_dir
        if target is not None:
            (target / RIG_FILE).write_text(json.dumps(self.info(), indent=2, default=str))

    # -- QMP helpers ---------------------------------------------------------
    def require_qmp(self) -> Qmp:
        if self.qmp is None or not self.qmp.connected:
            raise RigError("the rig is not running")
        return self.qmp

    async def memory_devices(self) -> list[dict[str, Any]]:
        return list(await self.require_qmp().execute("query-memory-devices"))

    async def read_counter(self, vcpu: int = 0) -> int:
        """The bare guest's MMIO loop count on ``vcpu`` (APs numbered in start
        order), read from guest RAM over HMP xp."""
        gpa = bareguest.COUNTER_GPA + 8 * vcpu
        out = await self.require_qmp().execute(
            "human-monitor-command", {"command-line": f"xp /1gx {gpa:#x}"})
        return int(str(out).split(":")[1].split()[0], 16)

    # -- stopping ------------------------------------------------------------
    async def _kill(self) -> None:
        """Make sure the QEMU we launched is gone (quit, then SIGTERM, SIGKILL)."""
        if self.qmp is not None:
            if self.qmp.connected and self.alive():
                with contextlib.suppress(RigError):
                    await self.qmp.execute("quit", timeout=3)
            await self.qmp.close()
            self.qmp = None
        if self.pid is None:
            return
        for sig, wait in ((None, 3.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
            if await self._wait_exit(wait):
                break
        self.proc = None

    async def _wait_exit(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    return True
            else:
                try:
                    if psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE:
                        return True
                except psutil.NoSuchProcess:
                    return True
            await asyncio.sleep(0.02)
        return False

    async def stop(self) -> None:
        """Remove everything the rig made; safe to call more than once."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        last = self.sample()
        if last is not None:
            self._samples.append(last)
        await self._kill()
        with contextlib.suppress(OSError):
            self._write_samples()
        if self.tap_created:
            from vmrig import tap
            await asyncio.to_thread(tap.delete, self.tap_created)
            self.tap_created = None
        if self.private_dir is not None:
            for name in ("qemu.stderr", "serial.log"):  # what QEMU and the guest said
                src = self.private_dir / name
                if self.record_dir is not None and src.exists() and src.stat().st_size:
                    with contextlib.suppress(OSError):
                        shutil.copyfile(src, self.record_dir / name)
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None

    # -- rig up / attach -----------------------------------------------------
    async def _detach(self) -> None:
        assert self.private_dir is not None and self.pid is not None
        state = RigState(pid=self.pid, create_time=psutil.Process(self.pid).create_time(),
                         accel=self.accel, guest=self.config.guest,
                         qmp_socket=str(self.qmp_socket), private_dir=str(self.private_dir),
                         tap=self.tap_created, argv=self.running_argv(), boot_s=self.boot_s,
                         vcpu_tids=self.vcpu_tids, config=asdict(self.config))
        state.write(self.private_dir)
        if self.qmp is not None:
            await self.qmp.close()
            self.qmp = None
        self.proc = None  # it outlives us now

    @classmethod
    async def attach(cls, private_dir: str | os.PathLike[str] | None = None) -> Rig:
        """The rig a ``rig up`` left running, with QMP connected."""
        d = Path(private_dir) if private_dir is not None else default_state_dir()
        state = RigState.read(d)
        config = config_from_dict(state.config)
        rig = cls(config, private_dir=d)
        rig.private_dir, rig.pid, rig.accel, rig.argv = d, state.pid, state.accel, state.argv
        rig.boot_s, rig.tap_created = state.boot_s, state.tap
        rig.vcpu_tids = state.vcpu_tids
        rig._attached = True
        try:
            same = psutil.Process(state.pid).create_time() == state.create_time
        except psutil.NoSuchProcess:
            same = False
        if not same:
            rig.pid = None  # never signal a recycled pid
            return rig
        rig.qmp = Qmp(timeout=config.qmp_timeout)
        try:
            await rig.qmp.connect(state.qmp_socket)
        except RigError:
            rig.qmp = None
        return rig

