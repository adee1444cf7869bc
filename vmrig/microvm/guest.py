"""The micro-VMM's guest: the guest-physical map and the code, from guests/microvm.S.

The loops are assembled with GNU as + ld (vmrig.guestbuild) into a flat
image per variant (--defsym: page count, access mode, loop), cached by the
hash of the source and the symbols, so editing microvm.S rebuilds them.  The
image's header says where the code starts and, for the coalesced loop,
where its unrolled round is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from vmrig import guestbuild
from vmrig.microvm.errors import GuestBuildError

# Guest-physical map: slot 0 is RAM with the code; the MMIO pages are
# unbacked (no slot covers them), so every access to them is MMIO.
PAGE = 0x1000
RAM_SIZE = 0x10000
CODE_GPA = 0x1000
MMIO_GPA = 0x20000
MAX_PAGES = 16           # one 64 KiB real-mode segment (ES)
SIGNAL_PORT = 0x10       # the guest's "round done" / "next batch" port
ACCESSES = ("read", "write", "rw")
MAX_SPIN = 0xFFFF        # the guest's busy loop counts in DX

SOURCE = Path(__file__).resolve().parent.parent / "guests" / "microvm.S"
HEADER = struct.Struct("<8sHHHH")  # magic, version, entry, round, round_end
MAGIC = b"SLSMICRO"
VERSION = 1


@dataclass(frozen=True)
class GuestCode:
    """One assembled loop, loaded at CODE_GPA."""

    image: bytes
    entry: int            # GPA every vCPU starts at
    pages: int
    round: int = 0        # coalesced: GPA of the unrolled round
    write_len: int = 0    # coalesced: bytes of one write in that round

    def batch_entry(self, part: int) -> int:
        """The IP to enter the round at so its first pass does only the
        last ``part`` writes (the whole round when 0)."""
        return self.round + (self.pages - part) * self.write_len if part else self.round


def exit_program(pages: int, access: str, spin: int = 0) -> GuestCode:
    """Each round reads and/or writes one byte of each page, then ``out``;
    ``spin``: busy-loop iterations after each access."""
    return _load(pages, COALESCED=0, READS=int(access in ("read", "rw")),
                 WRITES=int(access in ("write", "rw")), SPIN=spin)


def coalesced_program(pages: int, spin: int = 0) -> GuestCode:
    """Batches of one-byte writes (the byte: BL, the vCPU index) the VMM
    asks for through ``in eax``; see microvm.S."""
    return _load(pages, COALESCED=1, READS=0, WRITES=1, SPIN=spin)


def _load(pages: int, **symbols: int) -> GuestCode:
    image = assemble(dict(symbols, PAGES=pages, PAGE=PAGE, SIGNAL_PORT=SIGNAL_PORT))
    magic, version, entry, round_, round_end = HEADER.unpack_from(image)
    if (magic, version) != (MAGIC, VERSION):
        raise GuestBuildError("ld", f"image header {magic!r} v{version}, not {MAGIC!r} v{VERSION}")
    write_len, rest = divmod(round_end - round_, pages)
    if rest:
        raise GuestBuildError("as", "the coalesced round's writes differ in length")
    return GuestCode(image, CODE_GPA + entry, pages,
                     CODE_GPA + round_ if round_ else 0, write_len)


def assemble(symbols: dict[str, int]) -> bytes:
    """The flat image of microvm.S with these --defsym values, from the
    cache or built (and cached where the cache is writable)."""
    return guestbuild.build(SOURCE, "microvm", CODE_GPA, GuestBuildError, symbols=symbols,
                            check=_fits).data


def _fits(data: bytes) -> None:
    if len(data) > RAM_SIZE - CODE_GPA:
        raise GuestBuildError("ld", f"image of {len(data)} bytes does not fit in RAM")
