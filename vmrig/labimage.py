"""Read-only disk images of the trees the nested lab VM's start-up reads most.

The L1 runs on a 9p view of the host's root, and under TCG every file it
opens is a round trip to the host: lab-run's imports (pyarrow, numpy, bcc)
and the probe compile's kernel headers were most of the ~75 s a boot spent
before its first run.  Here the host packs those trees (the venv, Python's
standard library and system packages, the L1 kernel's header trees) into
squashfs images, attached to the L1 as read-only virtio-blk disks; the L1
mounts them and binds each tree over its own path (``mount_script``), so the
same files are read from the L1's own block device.  Measured in the TCG L1
(6.1), two boots each way: ``slotscope record -d 1`` took 81-83 s over 9p and
50-54 s from the images, a boot to the end of it 127-133 s against 94-102 s.

Uncompressed: decompressing would cost a TCG vCPU more than it saves.  An
image is cached under a key of every file's path, size and mtime, so a
changed venv or header tree is packed anew (~8 s for the 800 MB venv here);
the superseded image of the same name is removed.  Where mksquashfs is
missing or fails, a tree set is over MAX_BYTES (a user's whole kernel build
as its headers), or the L1 cannot mount an image, the L1 reads those trees
over 9p as before, and says so on its console where a mount failed.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import site
import subprocess
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmrig import guestbuild
from vmrig.errors import RigError
from vmrig.kernel import CACHE_ROOT, lab_kernel

__all__ = ["Image", "images", "mount_script", "qemu_opts"]

SERIAL = "slotscope-img{}"   # the disk's serial: /dev/disk/by-id/virtio-<serial> in the L1
MOUNTS = "/run/labvm-images"  # where the L1 mounts them before binding the trees
# Larger trees stay on 9p: a copy of them costs the host disk and time.
MAX_BYTES = 2 << 30


@dataclass(frozen=True)
class Image:
    """A squashfs image holding ``trees``, each at its own absolute path."""

    path: Path
    trees: tuple[Path, ...]


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """Existing, non-empty directories of ``paths``, resolved, none inside another."""
    dirs = sorted({p.resolve() for p in paths if p.is_dir() and any(p.iterdir())})
    return [d for d in dirs if not any(o != d and d.is_relative_to(o) for o in dirs)]


def python_trees(venv: Path) -> list[Path]:
    """The venv, the standard library and the system site packages (bcc
    comes from Debian's python3-bpfcc) of the Python that runs the L1's
    commands, which is this one."""
    return _outermost([venv, Path(sysconfig.get_paths()["stdlib"]),
                       *map(Path, site.getsitepackages())])


def header_trees(kernel_image: Path) -> list[Path]:
    """The header trees bcc compiles against for the lab kernel whose image
    is ``kernel_image`` (its modules' ``build`` and ``source``); none for an
    image that is not a fetched or linked lab kernel."""
    target = kernel_image.resolve()
    for stamp in sorted(CACHE_ROOT.glob("*/lab-kernel.json")):
        try:
            k = lab_kernel(stamp.parent.name)
        except RigError:
            continue
        if target in (k.vmlinux.resolve(), k.vmlinuz.resolve()):
            return _outermost([k.headers_dir, k.modules_dir / "build", k.modules_dir / "source"])
    return []


def _key(trees: Sequence[Path]) -> tuple[str, int]:
    """A hash of every entry's path, size, mtime and link target, bytecode
    caches left out: Python writes them as it first imports a module, and
    a stale one only costs the L1 a compile (its source's mtime says so).
    With it, the bytes the entries hold."""
    h = hashlib.sha256()
    total = 0
    for tree in trees:
        for root, dirs, files in os.walk(tree):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                p = os.path.join(root, name)
                st = os.lstat(p)
                total += st.st_size
                link = os.readlink(p) if os.path.islink(p) else ""
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{link}\n".encode())
    return h.hexdigest()[:16], total


def image(name: str, trees: Sequence[Path]) -> Image | None:
    """The image of ``trees`` from the cache, packed now if any file
    changed; None where it cannot be packed (the L1 reads over 9p)."""
    mksquashfs = shutil.which("mksquashfs")
    if not trees or mksquashfs is None:
        return None
    try:
        key, size = _key(trees)
    except OSError:  # a file went as it was walked: this boot reads over 9p
        return None
    if size > MAX_BYTES:  # e.g. a whole kernel build tree as its headers
        return None
    cache = guestbuild.shared_dir().with_name("labvm")
    out = cache / f"{name}-{key}.img"
    if not out.exists():
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        try:
            cache.mkdir(parents=True, exist_ok=True)
            # -no-strip keeps each tree's full path inside the image
            p = subprocess.run([mksquashfs, *map(str, trees), str(tmp), "-no-strip",
                                "-noappend", "-noI", "-noD", "-noF", "-noX", "-no-xattrs",
                                "-quiet", "-no-progress"],
                               capture_output=True, text=True, check=False)
            if p.returncode:
                tmp.unlink(missing_ok=True)
                return None
            os.replace(tmp, out)  # whole or absent for a concurrent reader
        except OSError:
            tmp.unlink(missing_ok=True)
            return None
        for old in cache.glob(f"{name}-*.img"):  # superseded: 100s of MB each
            if old != out:
                old.unlink(missing_ok=True)
    return Image(out, tuple(trees))


def images(venv: Path, kernel_image: Path) -> list[Image]:
    """The images for an L1 booting ``kernel_image``: its Python's trees,
    and its header trees where the image is a lab kernel's."""
    headers = header_trees(kernel_image)
    found = [image("python", python_trees(venv)),
             image(f"headers-{headers[0].name}", headers) if headers else None]
    return [i for i in found if i is not None]


def qemu_opts(imgs: Sequence[Image]) -> list[str]:
    """QEMU arguments attaching ``imgs`` read-only, each with its serial."""
    out: list[str] = []
    for i, img in enumerate(imgs):
        out += ["-drive", f"file={img.path},if=none,id=ssimg{i},format=raw,readonly=on",
                "-device", f"virtio-blk-pci,drive=ssimg{i},serial={SERIAL.format(i)}"]
    return out


def mount_script(imgs: Sequence[Image]) -> str:
    """Shell lines for the L1: mount each image and bind its trees over
    their paths; an image that does not mount leaves them on 9p."""
    if not imgs:
        return ""
    lines = ["modprobe squashfs 2>/dev/null",
             "labvm_image() {  # SERIAL TREE...: mount the image, bind its trees",
             f'  m={MOUNTS}/$1; dev=/dev/disk/by-id/virtio-$1; shift',
             '  mkdir -p "$m" && mount -t squashfs -o ro "$dev" "$m" 2>/dev/null || {',
             '    echo "labvm: image $dev not mounted: reading over 9p" >&2; return; }',
             '  for t in "$@"; do mount --bind "$m$t" "$t"; done',
             "}"]
    for i, img in enumerate(imgs):
        lines.append(shlex.join(["labvm_image", SERIAL.format(i), *map(str, img.trees)]))
    return "\n".join(lines)
