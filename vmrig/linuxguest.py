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

from vmrig import RigError, guestbuild
from vmrig.config import LaunchFiles, RigConfig

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
    name = f"initramfs-{h.hexdigest()[:16]}.cpio"
    found = guestbuild.find(name)
    if found is not None and not force:
        return found
    out = guestbuild.cache_dir() / name
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


# Filesystems whose every read crosses to another machine: the nested lab
# VM sees the host's root, and the lab kernels, over 9p.
SHARED_FS = frozenset({"9p", "virtiofs", "nfs", "nfs4", "cifs", "fuse.sshfs"})


def fs_type(path: Path) -> str:
    """The type of the filesystem ``path`` lies on (its longest mount point
    in /proc/self/mounts), or '' if none matches."""
    target, best, fstype = str(path.resolve()), "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, kind = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, fstype = mnt, kind
    return fstype


def local_kernel(image: Path) -> Path:
    """``image``, or a copy of it in the guest cache where ``image`` lies on
    a shared filesystem.  QEMU reads all of a PVH vmlinux (66 MB) on every
    start: over the lab VM's 9p that was 7-18 s of each Linux L2's 14-24 s
    from spawn to ready (measured in the TCG L1), once per L1 boot now.
    Where the cache cannot be written, the image is read where it is."""
    if fs_type(image) not in SHARED_FS:
        return image
    st = image.stat()
    key = hashlib.sha256(f"{image}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = guestbuild.cache_dir() / f"{image.name}-{key}"
    if not out.exists():
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, tmp)
            os.replace(tmp, out)  # whole or absent for a concurrent reader
        except OSError:
            tmp.unlink(missing_ok=True)
            return image
    return out


def guest_files() -> tuple[Path, Path]:
    """The kernel (a local copy of one on a shared filesystem) and the
    initramfs the Linux guest boots, built or copied now if not cached."""
    from vmrig import kernel
    k = kernel.lab_kernel()
    return local_kernel(k.vmlinux), build_initramfs(k.release)


def prepare(config: RigConfig, files: LaunchFiles) -> None:
    """Link the kernel and the initramfs (guest_files) into the rig's
    private directory."""
    vmlinux, initrd = guest_files()
    assert files.kernel is not None and files.initrd is not None
    for link, target in ((files.kernel, vmlinux), (files.initrd, initrd)):
        link.unlink(missing_ok=True)
        link.symlink_to(target)
