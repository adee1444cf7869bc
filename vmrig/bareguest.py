"""The bare-metal guest: assembled from guests/bare.S, cached, patched per run.

The image is built with GNU as + ld (binutils) into a cache keyed by the
source's hash, so editing bare.S rebuilds it.  Per-run parameters (MMIO range,
slot count) live in a block at a fixed offset that ``image_for`` patches into
a copy in the rig's private directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from vmrig import RigError
from vmrig.config import BareGuestConfig

SOURCE = Path(__file__).with_name("guests") / "bare.S"
IMAGE_SIZE = 0x10000
LINK_BASE = 0xFFFF0000  # -bios maps the image at the top of 4 GiB
PARAMS_OFFSET = 0x10
PARAMS_MAGIC = b"SLOTSCOP"
# magic, version, mmio_base, npages, stride, nslots, counter, trap_after
PARAMS = struct.Struct("<8sIIIIIII")
PARAMS_VERSION = 2
COUNTER_GPA = 0x7000
READY_LINE = "slotscope-bare ready"


def cache_dir() -> Path:
    root = Path(os.environ.get("SLOTSCOPE_CACHE", "/var/cache/slotscope"))
    if not os.access(root if root.exists() else root.parent, os.W_OK):
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slotscope"
    return root / "guests"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RigError(f"{name} not found: the bare guest needs binutils (./setup.sh)")
    return path


def build(force: bool = False) -> Path:
    """The assembled image, built if the source changed since the cached build."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src).hexdigest()[:16]
    out = cache_dir() / f"bare-{key}.bin"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slotscope-bare-") as tmp:
        obj, img = Path(tmp) / "bare.o", Path(tmp) / "bare.bin"
        for cmd in ([_tool("as"), "--32", "-o", str(obj), str(SOURCE)],
                    [_tool("ld"), "-m", "elf_i386", "-nostdlib", f"-Ttext={LINK_BASE:#x}",
                     "--oformat", "binary", "-e", "_start", "-o", str(img), str(obj)]):
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if p.returncode:
                last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
                raise RigError(f"building the bare guest: {Path(cmd[0]).name}: {last}")
        data = img.read_bytes()
        if len(data) != IMAGE_SIZE or data[PARAMS_OFFSET:PARAMS_OFFSET + 8] != PARAMS_MAGIC:
            raise RigError(f"building the bare guest: bad image ({len(data)} bytes)")
        tmp_out = out.with_suffix(f".{os.getpid()}.tmp")
        tmp_out.write_bytes(data)
        os.replace(tmp_out, out)
    return out


def image_for(config: BareGuestConfig, nslots: int, dest: Path) -> Path:
    """Copy the cached image to ``dest`` with this run's parameters."""
    config.validate()
    data = bytearray(build().read_bytes())
    PARAMS.pack_into(data, PARAMS_OFFSET, PARAMS_MAGIC, PARAMS_VERSION, config.mmio_base,
                     config.npages, config.stride, max(nslots, 1), COUNTER_GPA,
                     config.trap_after)
    dest.write_bytes(data)
    return dest
