"""Typed rig configuration and the QEMU argument list it stands for.

``qemu_argv`` returns a list for ``subprocess`` (never a shell string).  The
machine is ``pc`` (i440fx + PIIX4): its ACPI memory-hotplug registers sit at
I/O port 0x0a00, which the bare guest drives to finish pc-dimm unplugs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from vmrig.errors import RigConfigError, RigError

Accel = Literal["auto", "kvm", "tcg"]
GuestKind = Literal["bare", "linux"]
ACCELS: tuple[Accel, ...] = get_args(Accel)
GUESTS: tuple[GuestKind, ...] = get_args(GuestKind)
# The Linux guest's firmware.  qboot (QEMU's own minimal one, in
# qemu-system-data) boots the Linux L2 of the TCG lab VM 1-3 s sooner than
# SeaBIOS (8.8 vs 10.0 s and 10.4 vs 13.4 s to the ready line, medians of
# 3-4 boots, 2026-12-03) but makes other memslot changes on the way: only
# for runs that do not record the boot.
Firmware = Literal["seabios", "qboot"]
FIRMWARES: tuple[Firmware, ...] = get_args(Firmware)
MMIO_DEVICES = ("pci-testdev", "edu")  # QEMU devices with MMIO BARs the guests loop over

MiB = 1 << 20
GiB = 1 << 30
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
# kvm_pvm hosts reject MSR 0x10a with -cpu host/max on some kernels; this model
# starts on every KVM we have met, so the rig uses it unless told otherwise.
KVM_SAFE_CPU = "qemu64,-cx16,-xsave"


def parse_size(text: str | int, key: str = "") -> int:
    """'128M', '2G', '4096' -> bytes (binary units, as QEMU reads them).

    The one size parser: the rig's config, its command line and the lab
    config all read sizes here.  ``key`` names the setting in the error."""
    where = f"{key}: " if key else ""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise RigConfigError(f"{where}size must not be negative: {text}", key, text)
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.I) \
        if isinstance(text, str) else None
    if not m:
        raise RigConfigError(f"{where}bad size {text!r} (expected e.g. 128M, 2G)", key, text)
    return int(m[1]) * _UNITS[m[2].upper()]


def fmt_size(n: int) -> str:
    """Bytes as the shortest exact size ``parse_size`` reads back ('2G')."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


@dataclass(frozen=True)
class MemoryConfig:
    """Boot RAM plus the hotplug area: ``-m base,slots=N,maxmem=M``."""

    base: int = 256 * MiB
    slots: int = 4
    maxmem: int = 2 * GiB

    def validate(self) -> None:
        if self.base < 16 * MiB or self.base % MiB:
            raise RigConfigError(f"memory base {fmt_size(self.base)}: need a whole number of MiB "
                           ">= 16M")
        if not 0 <= self.slots <= 256:
            raise RigConfigError(f"memory slots {self.slots}: QEMU allows 0..256")
        if self.slots and self.maxmem <= self.base:
            raise RigConfigError(f"maxmem {fmt_size(self.maxmem)} must exceed base memory "
                           f"{fmt_size(self.base)} when slots > 0")

    @property
    def hotplug_bytes(self) -> int:
        return max(0, self.maxmem - self.base) if self.slots else 0

    def argv(self) -> list[str]:
        if not self.slots:
            return ["-m", f"{self.base // MiB}M"]
        return ["-m", f"{self.base // MiB}M,slots={self.slots},maxmem={self.maxmem // MiB}M"]


@dataclass(frozen=True)
class VirtioMemConfig:
    """A virtio-mem-pci device; resizes need a guest driver (the Linux guest).

    ``dynamic_memslots``: None = on when this QEMU has the property (>= 8.2).
    Without it the whole device region is one memslot and a resize changes no
    memslot, which the workload records.
    """

    size: int = 512 * MiB
    requested: int = 0
    block_size: int = 2 * MiB
    dynamic_memslots: bool | None = None
    id: str = "vmem0"


@dataclass(frozen=True)
class NetConfig:
    """virtio-net on a TAP the rig creates (pyroute2) and removes at exit."""

    tap: str = "sstap0"
    mac: str = "52:54:00:51:07:01"


@dataclass(frozen=True)
class BareGuestConfig:
    """The MMIO loop of the bare guest: npages pages from mmio_base."""

    mmio_base: int = 0xC000_0000  # in the PCI hole, unbacked: every access is MMIO
    npages: int = 4
    stride: int = 4096
    trap_after: int = 0  # > 0: ud2 at that loop count (tests the guest's exception report)

    def validate(self) -> None:
        if self.npages < 2:
            raise RigConfigError("the MMIO loop needs >= 2 pages (KVM's per-vCPU MMIO cache "
                           "hides a single-address loop)")
        if self.stride < 4096 or self.stride % 4096:
            raise RigConfigError(f"MMIO stride {self.stride}: need a multiple of 4096")
        end = self.mmio_base + self.npages * self.stride
        if self.mmio_base < 0x10_0000 or end > 0xFEC0_0000:
            raise RigConfigError(f"MMIO range {self.mmio_base:#x}..{end:#x} must lie below "
                           "0xfec00000 (IOAPIC) and above 1 MiB")
        if not 0 <= self.trap_after < 2**32:
            raise RigConfigError(f"trap_after {self.trap_after}: need 0..2^32-1")


@dataclass(frozen=True)
class RigConfig:
    guest: GuestKind = "bare"
    accel: Accel = "auto"
    cpu: str | None = None  # None: a model that starts under the chosen accel
    nested: bool = False     # expose vmx/svm to the guest
    vcpus: int = 1
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    mmio_devices: tuple[str, ...] = MMIO_DEVICES
    virtio_mem: VirtioMemConfig | None = None
    net: NetConfig | None = None
    bare: BareGuestConfig = field(default_factory=BareGuestConfig)
    kernel_cmdline: str = ""   # extra Linux guest arguments
    firmware: Firmware = "seabios"  # the Linux guest's (the bare guest is its own)
    boot_timeout: float = 30.0
    qmp_timeout: float = 10.0
    extra_args: tuple[str, ...] = ()  # appended verbatim (e.g. -trace patterns)

    def validate(self) -> None:
        self.memory.validate()
        self.bare.validate()
        if self.guest not in GUESTS:
            raise RigConfigError(f"unknown guest {self.guest!r} ({' or '.join(GUESTS)})",
                                 "guest", self.guest)
        if self.firmware not in FIRMWARES or (self.firmware != "seabios"
                                              and self.guest != "linux"):
            raise RigConfigError(f"firmware {self.firmware!r}: {' or '.join(FIRMWARES)}, "
                                 "and only for the Linux guest", "firmware", self.firmware)
        if self.accel not in ACCELS:
            raise RigConfigError(f"unknown accelerator {self.accel!r} ({', '.join(ACCELS)})",
                                 "accel", self.accel)
        if not 1 <= self.vcpus <= 64:
            raise RigConfigError(f"vcpus {self.vcpus}: need 1..64")
        for dev in self.mmio_devices:
            if dev not in MMIO_DEVICES:
                raise RigConfigError(f"unknown MMIO device {dev!r} ({' or '.join(MMIO_DEVICES)})",
                                     "mmio_devices", dev)
        vm = self.virtio_mem
        if vm is not None:
            if vm.requested > vm.size:
                raise RigConfigError(f"virtio-mem requested {fmt_size(vm.requested)} exceeds its "
                               f"size {fmt_size(vm.size)}")
            if vm.size > self.memory.hotplug_bytes:
                raise RigConfigError(f"virtio-mem size {fmt_size(vm.size)} does not fit the "
                               f"hotplug area ({fmt_size(self.memory.hotplug_bytes)} = maxmem "
                               "- base)")
            if vm.size % vm.block_size or vm.requested % vm.block_size:
                raise RigConfigError(f"virtio-mem sizes must be multiples of the block size "
                               f"{fmt_size(vm.block_size)}")


def config_from_dict(d: dict[str, Any]) -> RigConfig:
    """The RigConfig that ``asdict`` turned into ``d`` (state.json's config)."""
    d = dict(d)
    d["memory"] = MemoryConfig(**d["memory"])
    d["bare"] = BareGuestConfig(**d["bare"])
    d["mmio_devices"] = tuple(d["mmio_devices"])
    d["extra_args"] = tuple(d.get("extra_args", ()))
    d["virtio_mem"] = VirtioMemConfig(**d["virtio_mem"]) if d.get("virtio_mem") else None
    d["net"] = NetConfig(**d["net"]) if d.get("net") else None
    return RigConfig(**d)


def cpu_model(config: RigConfig, accel: str, host_vendor: str) -> str:
    """The -cpu value: explicit, else one known to start under ``accel``."""
    if config.cpu:
        model = config.cpu
    elif accel == "kvm":
        model = KVM_SAFE_CPU
    else:
        model = "max" if config.nested else "qemu64"
    if config.nested and accel == "kvm":
        model += ",+svm" if host_vendor == "AuthenticAMD" else ",+vmx"
    return model


def host_cpu_vendor() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    m = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    return m[1] if m else ""


@dataclass(frozen=True)
class LaunchFiles:
    """Paths inside the rig's private directory that the argv refers to."""

    qmp_socket: Path
    serial_log: Path
    pidfile: Path
    bios: Path | None = None       # bare guest image
    kernel: Path | None = None     # linux guest
    initrd: Path | None = None


def qemu_argv(binary: str, config: RigConfig, accel: str, files: LaunchFiles,
              dynamic_memslots_supported: bool = False, host_vendor: str = "") -> list[str]:
    """The full QEMU command line for ``config`` under ``accel`` (kvm or tcg)."""
    config.validate()
    argv = [binary,
            "-name", "slotscope-rig,debug-threads=on",  # vCPU threads named "CPU n/KVM"
            "-machine", "pc", "-accel", accel,
            "-cpu", cpu_model(config, accel, host_vendor),
            "-smp", str(config.vcpus),
            *config.memory.argv(),
            "-nodefaults", "-no-user-config", "-display", "none",
            # A guest reset (a triple fault) or poweroff pauses the VM instead
            # of ending QEMU: the rig can still say what happened, registers
            # included, rather than see the QMP socket vanish.
            "-action", "reboot=shutdown,shutdown=pause",
            "-serial", f"file:{files.serial_log}",
            "-qmp", f"unix:{files.qmp_socket},server=on,wait=off",
            "-pidfile", str(files.pidfile)]
    if config.guest == "bare":
        if files.bios is None:
            raise RigError("bare guest: no firmware image")
        argv += ["-bios", str(files.bios)]
    else:
        if files.kernel is None or files.initrd is None:
            raise RigError("linux guest: no kernel/initramfs")
        # pci=noearly: no early PCI scans.  On QEMU's AMD CPU models the kernel
        # looks for a K8 GART/AGP bridge by reading config space of every
        # bus and slot, port I/O exits all: 7-10 s of a ~38 s boot of the
        # Linux L2 in the TCG lab VM (medians of 4 boots each: 31 vs 38 s).
        # swiotlb=noforce: no 64 MB bounce buffer zeroed at boot (no device
        # here needs one: virtio without ACCESS_PLATFORM, edu, pci-testdev):
        # QMP to ready line 4.4-5.2 s instead of 6.4-8.7 s in the TCG L1,
        # and 211 MB of the 256 MB usable instead of 144 (room for the pages
        # a virtio-mem unplug migrates).
        cmdline = ("console=ttyS0 panic=-1 memhp_default_state=online_movable quiet "
                   f"pci=noearly swiotlb=noforce slotscope.pages={config.bare.npages}")
        if config.kernel_cmdline:
            cmdline += " " + config.kernel_cmdline
        argv += ["-kernel", str(files.kernel), "-initrd", str(files.initrd),
                 "-append", cmdline]
        if config.firmware == "qboot":
            argv += ["-bios", "qboot.rom"]  # from QEMU's own data directory
    for dev in config.mmio_devices:
        argv += ["-device", dev]
    vm = config.virtio_mem
    if vm is not None:
        # reserve=off (QEMU >= 6.1): no swap reservation for the whole device,
        # as virtio-mem's documentation advises; a 2G device in a 2G lab VM
        # was refused otherwise ("Cannot allocate memory")
        argv += ["-object", f"memory-backend-ram,id={vm.id}-mem,size={vm.size},reserve=off"]
        dev = (f"virtio-mem-pci,id={vm.id},memdev={vm.id}-mem,"
               f"requested-size={vm.requested},block-size={vm.block_size}")
        if vm.dynamic_memslots or (vm.dynamic_memslots is None and dynamic_memslots_supported):
            if not dynamic_memslots_supported:
                raise RigConfigError("this QEMU's virtio-mem has no dynamic-memslots property "
                               "(needs QEMU >= 8.2)")
            dev += ",dynamic-memslots=on"
        argv += ["-device", dev]
    if config.net is not None:
        argv += ["-netdev", f"tap,id=net0,ifname={config.net.tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=net0,mac={config.net.mac}"]
    return argv + list(config.extra_args)
