"""A user's own kernel build (a KVM developer testing a patch), linked into
/lib/modules and the cache so that the lab boots it like a fetched kernel.

The release is read from the image and must equal the modules dir's;
/lib/modules/<release> becomes a symlink to the modules (depmod'ed) with
``build`` -> headers.  Once linked, the image path alone (or the release)
finds it again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from vmrig import RigError

from .image import has_pvh_note, image_release, is_elf
from .labkernel import (
    BUILD_VERSION,
    MODULES_ROOT,
    STAMP,
    LabKernel,
    cache_dir,
    lab_kernel,
    relink,
    run_tool,
)


def _build_modules_dir(modules: Path, release: str) -> Path:
    """The modules dir of a build: DIR named <release>, or an INSTALL_MOD_PATH."""
    mods = modules.expanduser().absolute()
    if not mods.is_dir():
        raise RigError(f"modules dir {mods} not found")
    nested = mods / "lib" / "modules"
    if nested.is_dir():
        names = sorted(p.name for p in nested.iterdir() if p.is_dir())
        if release not in names:
            raise RigError(f"release mismatch: the image is {release} but {nested} holds "
                           f"{', '.join(names) or 'nothing'}")
        mods = nested / release
    elif mods.name != release:
        raise RigError(f"release mismatch: the image is {release} but the modules dir "
                       f"{mods} is {mods.name}")
    if not ((mods / "modules.order").is_file() or (mods / "kernel").is_dir()):
        raise RigError(f"{mods} holds no modules (make modules_install INSTALL_MOD_PATH=DIR)")
    return mods


def _tree_release(headers: Path) -> str | None:
    """The release a headers or build tree was configured as, if it says."""
    try:
        text = (headers / "include/generated/utsrelease.h").read_text()
    except OSError:
        return None
    m = re.search(r'UTS_RELEASE "([^"]+)"', text)
    return m.group(1) if m else None


def link_build(image: Path, modules: str | os.PathLike[str] | None,
                headers: str | os.PathLike[str] | None) -> LabKernel:
    """Link a user's build into /lib/modules and the cache; its LabKernel."""
    image = image.absolute()
    if not image.is_file():
        raise RigError(f"kernel image {image} not found")
    release = image_release(image)
    elf = is_elf(image)
    if elf and not has_pvh_note(image):
        raise RigError(f"{image} has no PVH entry note: QEMU cannot boot it directly "
                       "(build with CONFIG_PVH=y, or give arch/x86/boot/bzImage)")
    cache = cache_dir(release)
    try:
        known = json.loads((cache / STAMP).read_text())
    except (OSError, ValueError):
        known = None
    if known and known.get("version") != BUILD_VERSION:
        raise RigError(f"{release} is a fetched Debian kernel; give your build another "
                       "release (CONFIG_LOCALVERSION)")
    if modules is None and headers is None:
        if known and Path(known["vmlinux"]).resolve() == image.resolve():
            return lab_kernel(release)
        raise RigError(f"kernel build {release} is not linked yet: give --modules DIR "
                       "and --headers DIR")
    if modules is None:
        raise RigError("--headers needs --modules DIR (make modules_install "
                       "INSTALL_MOD_PATH=DIR)")
    mods = _build_modules_dir(Path(modules), release)
    hdrs = Path(headers).expanduser().absolute() if headers is not None else mods / "build"
    if not (hdrs / "Makefile").is_file():
        raise RigError(f"headers dir {hdrs} has no Makefile (--headers: the build tree, "
                       "or a make headers-style tree)")
    tree = _tree_release(hdrs)
    if tree is not None and tree != release:
        raise RigError(f"release mismatch: the image is {release} but the headers {hdrs} "
                       f"are {tree}")
    hdrs = hdrs.resolve()  # before build is relinked: it may be mods/build itself
    link = MODULES_ROOT / release
    if link.exists() and not link.is_symlink() and link.resolve() != mods.resolve():
        raise RigError(f"{link} already holds another kernel's modules; give your build "
                       "another release (CONFIG_LOCALVERSION) or remove it")
    try:
        if link.is_symlink() or not link.exists():
            relink(link, mods)
        relink(link / "build", hdrs)
        # An O= build tree's source link names the sources; else they are one tree.
        source = hdrs / "source"
        relink(link / "source", source.resolve() if source.is_dir() else hdrs)
        dep, order = link / "modules.dep", link / "modules.order"
        if not dep.exists() or (order.exists() and order.stat().st_mtime > dep.stat().st_mtime):
            run_tool(["depmod", "-a", release])
        cache.mkdir(parents=True, exist_ok=True)
        boot, other = ((cache / "vmlinux", cache / "vmlinuz") if elf
                       else (cache / "vmlinuz", cache / "vmlinux"))
        if other.is_symlink():
            other.unlink()
        # A symlink in the cache, not the build's own path: vng takes a path
        # ending in arch/x86/boot/bzImage beside a .config for a build tree
        # and swaps in its own module handling.
        relink(boot, image)
        k = LabKernel(release=release, version=BUILD_VERSION, vmlinuz=boot, vmlinux=boot,
                      modules_dir=link, headers_dir=hdrs, config=hdrs / ".config",
                      name=str(image))
        text = json.dumps(k.to_json(), indent=2) + "\n"
        stamp = cache / STAMP
        if not stamp.exists() or stamp.read_text() != text:
            stamp.write_text(text)
    except OSError as e:
        raise RigError(f"cannot link kernel build {release}: {e.strerror} "
                       f"({e.filename}); linking into {MODULES_ROOT} needs root") from None
    return lab_kernel(release)

