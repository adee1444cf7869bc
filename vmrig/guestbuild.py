"""Flat guest images from guests/*.S (GNU as + ld), and other build
products of the rig (the micro-VMM's native loop), cached.

The bare guest (bareguest.py) and the micro-VMM's loops (microvm/guest.py)
are both built here.  An image is cached under a key hashed from the source
and its ``--defsym`` values, so editing the source, or asking for another
variant, builds anew.  Builds are looked for where they are written and in
the machine's shared cache, which the nested lab VM sees read-only (the
host's, so the L1 reuses what the host built and writes its own beside it,
in its memory).  A cache that cannot be written only means building on
every use.
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


def _takes_files(d: Path) -> bool:
    """Whether a file can be made in the directory ``d``: tried, since
    access(2) calls a read-only 9p export (the lab VM's view of the host's
    cache) writable."""
    try:
        fd, name = tempfile.mkstemp(dir=d, prefix=".slotscope-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def shared_dir() -> Path:
    """The machine's guest cache: $SLOTSCOPE_CACHE/guests, by default
    /var/cache/slotscope/guests.  The nested lab VM sees the host's,
    read-only (labvm): what the host built, the L1 need not build."""
    return Path(os.environ.get("SLOTSCOPE_CACHE", "/var/cache/slotscope")) / "guests"


def cache_dir() -> Path:
    """Where built guests are written: the shared cache; beside it where it
    is a read-only view (the lab VM's of the host's; ``guests.local`` is in
    the L1's memory); the user's cache directory where the shared cache's
    parent cannot be written."""
    shared = shared_dir()
    root = shared.parent
    if not os.access(root if root.exists() else root.parent, os.W_OK):
        user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return user / "slotscope" / "guests"
    if shared.is_dir() and not _takes_files(shared):
        return shared.with_name("guests.local")
    return shared


def find(name: str) -> Path | None:
    """The cached build ``name``: where builds are written, else in the
    shared cache; None if neither has it."""
    for d in dict.fromkeys((cache_dir(), shared_dir())):
        if (d / name).exists():
            return d / name
    return None


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
    name = f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}{suffix}"
    found = find(name)
    if found is not None and not force:
        return GuestImage(found.read_bytes(), found)
    out = cache_dir() / name
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
