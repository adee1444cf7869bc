"""The Linux guest: Debian's 6.1 kernel (vmrig.kernel) + a busybox initramfs.

The initramfs holds busybox-static, guests/init, the static MMIO loop built
from guests/mmio.c with ``gcc -static``, and the virtio modules (virtio-mem
needs its driver).  It is cached under a key of every input (sources,
busybox, kernel release), so a changed input rebuilds it.  The kernel boots
as a PVH vmlinux (~2 s to /init under TCG) with
``memhp_default_state=online_movable`` so hotplugged memory can be unplugged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vmrig import RigError
from vmrig.config import LaunchFiles, RigConfig
from vmrig.guestbuild import cache_dir

GUESTS = Path(__file__).with_name("guests")
INIT = GUESTS / "init"
MMIO_C = GUESTS / "mmio.c"
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "virtio_mem")
READY_LINE = "slotscope-linux ready"


def _busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.exists():
            return p
    raise RigError("busybox not found: the Linux guest needs busybox-static (./setup.sh)")


def _run(cmd: list[str], what: str, **kw: object) -> None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise RigError(f"{what}: {cmd[0]} not found (./setup.sh)") from None
    if p.returncode:
        last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise RigError(f"{what}: {last}")


def _module_paths(release: str) -> list[Path]:
    base = Path("/lib/modules") / release / "kernel" / "drivers" / "virtio"
    out = []
    for m in MODULES:
        p = base / f"{m}.ko"
        if not p.exists():
            raise RigError(f"kernel module {p} missing (python -m vmrig.kernel fetch)")
        out.append(p)
    return out


def _progress(msg: str) -> contextlib.AbstractContextManager[object]:
    """A spinner on a terminal while building; nothing when not interactive."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console
    return Console(stderr=True).status(f"rig: {msg}")


def build_initramfs(release: str, force: bool = False) -> Path:
    """The cached initramfs (newc cpio, uncompressed) for kernel ``release``."""
    busybox = _busybox()
    modules = _module_paths(release)
    h = hashlib.sha256()
    for p in (INIT, MMIO_C, busybox, *modules):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(release.encode())
    out = cache_dir() / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _progress("building the Linux guest initramfs (busybox, mmio, virtio modules)"), \
            tempfile.TemporaryDirectory(prefix="slotscope-initramfs-") as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "dev", "proc", "sys", "lib/modules", "tmp"):
            (root / d).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        shutil.copy2(INIT, root / "init")
        os.chmod(root / "init", 0o755)
        _run(["gcc", "-O2", "-static", "-o", str(root / "bin" / "mmio"), str(MMIO_C)],
             "building the guest MMIO program")
        for m in modules:
            shutil.copy2(m, root / "lib" / "modules" / m.name)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        tmp_out = out.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp_out, "wb") as f:
            p = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                               input="\n".join(names).encode(), stdout=f,
                               stderr=subprocess.PIPE, check=False)
        if p.returncode:
            tmp_out.unlink(missing_ok=True)
            raise RigError(f"cpio: {p.stderr.decode(errors='replace').strip()}")
        os.replace(tmp_out, out)
    return out


def prepare(config: RigConfig, files: LaunchFiles) -> None:
    """Link the kernel and initramfs into the rig's private directory."""
    from vmrig import kernel
    k = kernel.lab_kernel()
    initrd = build_initramfs(k.release)
    assert files.kernel is not None and files.initrd is not None
    for link, target in ((files.kernel, k.vmlinux), (files.initrd, initrd)):
        link.unlink(missing_ok=True)
        link.symlink_to(target)
