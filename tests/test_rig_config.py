"""RigConfig -> QEMU argv: a list (never a shell string) that says what the
config says; sizes parse like QEMU's; bad values are one-line RigErrors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from vmrig import RigError
from vmrig.config import (
    GiB,
    LaunchFiles,
    MemoryConfig,
    MiB,
    NetConfig,
    RigConfig,
    VirtioMemConfig,
    fmt_size,
    parse_size,
    qemu_argv,
)

FILES = LaunchFiles(qmp_socket=Path("/r/qmp.sock"), serial_log=Path("/r/serial.log"),
                    pidfile=Path("/r/qemu.pid"), bios=Path("/r/bare.bin"),
                    kernel=Path("/r/kernel"), initrd=Path("/r/initrd"))


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_bare_kvm_argv() -> None:
    cfg = RigConfig(memory=MemoryConfig(256 * MiB, 4, 2 * GiB), vcpus=2)
    argv = qemu_argv("/usr/bin/qemu-system-x86_64", cfg, "kvm", FILES)
    assert all(isinstance(a, str) for a in argv)
    assert opt(argv, "-accel") == ["kvm"]
    assert opt(argv, "-cpu") == ["qemu64,-cx16,-xsave"]
    assert opt(argv, "-m") == ["256M,slots=4,maxmem=2048M"]
    assert opt(argv, "-smp") == ["2"]
    assert opt(argv, "-bios") == ["/r/bare.bin"]
    assert opt(argv, "-qmp") == ["unix:/r/qmp.sock,server=on,wait=off"]
    assert opt(argv, "-device") == ["pci-testdev", "edu"]
    assert "debug-threads=on" in opt(argv, "-name")[0]  # vCPU threads get names
    assert "-kernel" not in argv


def test_linux_tcg_nested_virtio_mem_net_argv() -> None:
    cfg = RigConfig(guest="linux", nested=True, virtio_mem=VirtioMemConfig(size=512 * MiB),
                    net=NetConfig(tap="sstap1"), kernel_cmdline="loglevel=7")
    argv = qemu_argv("qemu", cfg, "tcg", FILES, dynamic_memslots_supported=False)
    assert opt(argv, "-cpu") == ["max"]  # TCG's max has svm for nested guests
    append = opt(argv, "-append")[0]
    assert "memhp_default_state=online_movable" in append and append.endswith("loglevel=7")
    assert opt(argv, "-kernel") == ["/r/kernel"] and opt(argv, "-initrd") == ["/r/initrd"]
    vmem = [d for d in opt(argv, "-device") if d.startswith("virtio-mem-pci")][0]
    assert "dynamic-memslots" not in vmem  # this QEMU has no such property
    assert "tap,id=net0,ifname=sstap1,script=no,downscript=no" in opt(argv, "-netdev")
    nested_kvm = qemu_argv("qemu", cfg, "kvm", FILES, host_vendor="AuthenticAMD")
    assert opt(nested_kvm, "-cpu") == ["qemu64,-cx16,-xsave,+svm"]
    assert opt(argv, "-bios") == []  # SeaBIOS, QEMU's default
    qboot = qemu_argv("qemu", replace(cfg, firmware="qboot"), "tcg", FILES,
                      dynamic_memslots_supported=False)
    assert opt(qboot, "-bios") == ["qboot.rom"]


def test_dynamic_memslots() -> None:
    cfg = RigConfig(virtio_mem=VirtioMemConfig(dynamic_memslots=None))
    argv = qemu_argv("qemu", cfg, "tcg", FILES, dynamic_memslots_supported=True)
    assert any("dynamic-memslots=on" in d for d in opt(argv, "-device"))
    forced = RigConfig(virtio_mem=VirtioMemConfig(dynamic_memslots=True))
    with pytest.raises(RigError, match="no dynamic-memslots property"):
        qemu_argv("qemu", forced, "tcg", FILES, dynamic_memslots_supported=False)


@pytest.mark.parametrize(("text", "value"), [("128M", 128 * MiB), ("2G", 2 * GiB),
                                             ("4096", 4096), ("1GiB", GiB), ("64k", 65536)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value
    assert parse_size(fmt_size(value)) == value


@pytest.mark.parametrize("text", ["", "lots", "1.5G", "-1M", "12Q"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(RigError, match="bad size"):
        parse_size(text)


def test_bad_configs() -> None:
    for cfg, msg in [
        (RigConfig(vcpus=0), "vcpus"),
        (RigConfig(accel="hvf"), "unknown accelerator"),  # type: ignore[arg-type]
        (RigConfig(mmio_devices=("e1000",)), "unknown MMIO device"),
        (RigConfig(memory=MemoryConfig(8 * MiB)), ">= 16M"),
        (RigConfig(virtio_mem=VirtioMemConfig(size=64 * MiB, requested=128 * MiB)),
         "exceeds its size"),
        (RigConfig(virtio_mem=VirtioMemConfig(size=65 * MiB)), "multiples of the block"),
        (RigConfig(firmware="qboot"), "only for the Linux guest"),
        (RigConfig(guest="linux", firmware="ovmf"), "firmware"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(RigError, match=msg):
            cfg.validate()
