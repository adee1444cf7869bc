"""Kernel images: the release a bzImage or ELF vmlinux was built as, its
compressed payload, and whether QEMU can boot the ELF directly (PVH note)."""

from __future__ import annotations

import lzma
import mmap
import os
import re
import struct
import subprocess
import zlib
from pathlib import Path

from vmrig import RigError

from .labkernel import RELEASE

XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point note QEMU looks for


def _setup_header(data: bytes) -> tuple[int, int] | None:
    """(offset, length) of a bzImage's compressed payload, None if no bzImage."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    setup_sects = data[0x1f1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    return (setup_sects + 1) * 512 + payload_offset, payload_length


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Decompress the bzImage's payload (the kernel ELF: xz, zstd or gzip) into ``out``."""
    data = bzimage.read_bytes()
    hdr = _setup_header(data)
    if hdr is None:
        start = data.find(XZ_MAGIC)
        if start < 0:
            raise RigError(f"{bzimage}: no xz payload (not a Debian x86 bzImage?)")
        payload = data[start:]
    else:
        payload = data[hdr[0]:hdr[0] + hdr[1]]
    if payload.startswith(XZ_MAGIC):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(ZSTD_MAGIC):
        # The build appends the uncompressed size (4 bytes) after the frame,
        # which zstd(1) would take for a second, corrupt frame.  No zstd in
        # Python 3.11's standard library: the CLI (setup.sh installs it).
        try:
            p = subprocess.run(["zstd", "-dcq"], input=payload[:-4], capture_output=True,
                               check=False)
        except FileNotFoundError:
            raise RigError(f"{bzimage} is zstd-compressed and zstd is not installed "
                           "(apt-get install zstd)") from None
        if p.returncode:
            raise RigError(f"{bzimage}: zstd payload: {p.stderr.decode().strip()}")
        elf = p.stdout
    elif payload.startswith(GZIP_MAGIC):
        elf = zlib.decompressobj(wbits=31).decompress(payload)
    else:
        raise RigError(f"{bzimage}: payload is not xz, zstd or gzip")
    if not elf.startswith(b"\x7fELF"):
        raise RigError(f"{bzimage}: payload is not an ELF image")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, out)


def has_pvh_note(vmlinux: Path) -> bool:
    """True if the ELF carries XEN_ELFNOTE_PHYS32_ENTRY (QEMU boots it directly)."""
    with open(vmlinux, "rb") as f:
        ehdr = f.read(64)
        if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", ehdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            p_type, _, off, _, _, filesz = struct.unpack("<IIQQQQ", f.read(40))
            if p_type != 4:  # PT_NOTE
                continue
            f.seek(off)
            notes = f.read(filesz)
            pos = 0
            while pos + 12 <= len(notes):
                namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                name = notes[pos + 12:pos + 12 + namesz].rstrip(b"\0")
                if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                    return True
                pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def image_release(image: Path) -> str:
    """The release (uname -r) a bzImage or ELF vmlinux was built as."""
    try:
        with open(image, "rb") as f:
            head = f.read(0x1000)
            if head[:4] == b"\x7fELF":
                # linux_banner: "Linux version <release> (<builder>) ..."; the
                # format strings that quote it have %s, not a digit.
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    m = re.search(rb"Linux version (\d+\.\d+[^\s\0]*) \(", mm)
                    found = m.group(1).decode(errors="replace") if m else None
                if found:
                    return found
                raise RigError(f"{image}: ELF without a Linux version banner (not a vmlinux?)")
            if _setup_header(head) is not None:
                # kernel_version: the version string's offset minus 0x200
                ptr, = struct.unpack_from("<H", head, 0x20e)
                f.seek(ptr + 0x200)
                text = f.read(256).split(b"\0", 1)[0].decode(errors="replace").split()
                if ptr and text and RELEASE.fullmatch(text[0]):
                    return text[0]
                raise RigError(f"{image}: bzImage without a kernel version string")
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise RigError(f"cannot read kernel image {image}: "
                       f"{getattr(e, 'strerror', None) or e}") from None
    raise RigError(f"{image} is neither an x86 bzImage nor an ELF vmlinux")


def is_elf(image: Path) -> bool:
    with open(image, "rb") as f:
        return f.read(4) == b"\x7fELF"

