"""Flat guest images from guests/*.S: GNU as + ld (binutils), cached.

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
    src = source.read_bytes()
    defs = [f"{k}={v:#x}" for k, v in sorted((symbols or {}).items())]
    # Without symbols the key is the source's hash alone.
    key = hashlib.sha256(src + "\0".join(defs).encode()).hexdigest()[:16]
    out = cache_dir() / f"{stem}-{key}.bin"
    if out.exists() and not force:
        return GuestImage(out.read_bytes(), out)
    with tempfile.TemporaryDirectory(prefix=f"slotscope-{stem}-") as tmp:
        obj, img = Path(tmp) / f"{stem}.o", Path(tmp) / f"{stem}.bin"
        defsyms = [a for d in defs for a in ("--defsym", d)]
        _run(["as", "--32", *defsyms, "-o", str(obj), str(source)], error)
        _run(["ld", "-m", "elf_i386", "-nostdlib", f"-Ttext={link_base:#x}",
              "--oformat", "binary", "-e", "_start", "-o", str(img), str(obj)], error)
        data = img.read_bytes()
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


def _run(cmd: list[str], error: BuildError) -> None:
    path = shutil.which(cmd[0])
    if path is None:
        raise error(cmd[0], "not found: building guests needs binutils (./setup.sh)")
    p = subprocess.run([path, *cmd[1:]], capture_output=True, text=True, check=False)
    if p.returncode:
        raise error(cmd[0], (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1])
