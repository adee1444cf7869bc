"""The bare-metal guest: assembled from guests/bare.S, cached, patched per run.

The image is built with GNU as + ld (vmrig.guestbuild) into a cache keyed
by the source's hash, so editing bare.S rebuilds it.  Per-run parameters
(MMIO range, slot count) live in a block at a fixed offset that
``image_for`` patches into a copy in the rig's private directory.
"""

from __future__ import annotations

import struct
from pathlib import Path

from vmrig import RigError, guestbuild
from vmrig.config import BareGuestConfig
from vmrig.guestbuild import cache_dir

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


def _error(tool: str, detail: str) -> RigError:
    return RigError(f"building the bare guest: {tool}: {detail}")


def _check(data: bytes) -> None:
    if len(data) != IMAGE_SIZE or data[PARAMS_OFFSET:PARAMS_OFFSET + 8] != PARAMS_MAGIC:
        raise RigError(f"building the bare guest: bad image ({len(data)} bytes)")


def _image(force: bool = False) -> guestbuild.GuestImage:
    return guestbuild.build(SOURCE, "bare", LINK_BASE, _error, check=_check, force=force)


def build(force: bool = False) -> Path:
    """The cached image, built if the source changed since the cached build."""
    image = _image(force)
    if image.path is None:
        raise RigError(f"the guest cache {cache_dir()} is not writable "
                       "(set SLOTSCOPE_CACHE to a writable directory)")
    return image.path


def image_for(config: BareGuestConfig, nslots: int, dest: Path) -> Path:
    """The image with this run's parameters, written to ``dest``."""
    config.validate()
    # The bytes, not the cached file: a run needs no writable cache.
    data = bytearray(_image().data)
    PARAMS.pack_into(data, PARAMS_OFFSET, PARAMS_MAGIC, PARAMS_VERSION, config.mmio_base,
                     config.npages, config.stride, max(nslots, 1), COUNTER_GPA,
                     config.trap_after)
    dest.write_bytes(data)
    return dest
