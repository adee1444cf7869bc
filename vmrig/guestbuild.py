"""Flat guest images from guests/*.S (GNU as + ld), and other build
products of the rig (the micro-VMM's native loop), cached.

The bare guest (bareguest.py) and the micro-VMM's loops (microvm/guest.py)
are both built here.  An image is cached under a key hashed from the source
and its ``--defsym`` values, so editing the source, or asking for another
variant, builds anew.  A cache that cannot be written (the nested lab VM's
read-only root) only means building on every use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# How a guest names a failed build step: (tool, what went wrong) -> its own
# typed error, so that each guest's callers keep catching their class.
BuildError = Callable[[str, str], Exception]


@dataclass(frozen=True)
class GuestImage:
    data: bytes
    path: Path | None  # the cached copy; None where the cache is not writable


def cache_dir() -> Path:
    """Where built guests are kept: $SLOTSCOPE_CACHE, /var/cache/slotscope,
    or the user's cache directory, whichever is writable first."""
    root = Path(os.environ.get("SLOTSCOPE_CACHE", "/var/cache/slotscope"))
    if not os.access(root if root.exists() else root.parent, os.W_OK):
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slotscope"
    return root / "guests"


def build(source: Path, stem: str, link_base: int, error: BuildError, *,
          symbols: Mapping[str, int] | None = None,
          check: Callable[[bytes], None] | None = None, force: bool = False) -> GuestImage:
    """``source`` assembled (32-bit) and linked flat at ``link_base``, from
    the cache unless ``force``.  ``check`` vets a fresh image before it is
    cached (raising the guest's own error); tool failures become ``error``."""
    defs = [f"{k}={v:#x}" for k, v in sorted((symbols or {}).items())]

    def make(tmp: Path) -> bytes:
        obj, img = tmp / f"{stem}.o", tmp / f"{stem}.bin"
        defsyms = [a for d in defs for a in ("--defsym", d)]
        run_tool(["as", "--32", *defsyms, "-o", str(obj), str(source)], error)
        run_tool(["ld", "-m", "elf_i386", "-nostdlib", f"-Ttext={link_base:#x}",
                  "--oformat", "binary", "-e", "_start", "-o", str(img), str(obj)], error)
        return img.read_bytes()

    # Without symbols the key is the source's hash alone.
    return cached(stem, ".bin", source.read_bytes() + "\0".join(defs).encode(), make,
                  check=check, force=force)


def cached(stem: str, suffix: str, key: bytes, make: Callable[[Path], bytes], *,
           check: Callable[[bytes], None] | None = None, force: bool = False) -> GuestImage:
    """The file ``make`` builds in a scratch directory, cached under a hash
    of ``key`` (everything the build depends on)."""
    out = cache_dir() / f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}{suffix}"
    if out.exists() and not force:
        return GuestImage(out.read_bytes(), out)
    with tempfile.TemporaryDirectory(prefix=f"slotscope-{stem}-") as tmp:
        data = make(Path(tmp))
    if check is not None:
        check(data)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(f".{os.getpid()}.tmp")
        tmp_out.write_bytes(data)
        os.replace(tmp_out, out)  # whole or absent for a concurrent reader
    except OSError:
        return GuestImage(data, None)
    return GuestImage(data, out)


def run_tool(cmd: list[str], error: BuildError) -> None:
    path = shutil.which(cmd[0])
    if path is None:
        raise error(cmd[0], "not found: building guests needs binutils (./setup.sh)")
    p = subprocess.run([path, *cmd[1:]], capture_output=True, text=True, check=False)
    if p.returncode:
        raise error(cmd[0], (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1])
