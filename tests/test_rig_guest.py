"""Guest builds: the bare image is assembled from guests/bare.S into a cache
keyed by the source, rebuilt when it changes, and patched per run; the
Linux guest's kernel is copied into that cache off a shared filesystem."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import needs_root

from vmrig import bareguest, guestbuild
from vmrig.config import BareGuestConfig

pytestmark = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                reason="needs binutils (as, ld): ./setup.sh")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLOTSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "guests"


def test_build_cached_and_rebuilt_on_change(cache: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    first = bareguest.build()
    assert first.parent == cache
    data = first.read_bytes()
    assert len(data) == 0x10000
    assert data[0x10:0x18] == b"SLOTSCOP"
    assert data[0xFFF0] == 0xE9  # reset vector: a near jmp into the image
    mtime = first.stat().st_mtime_ns
    assert bareguest.build() == first and first.stat().st_mtime_ns == mtime  # cached
    src = tmp_path / "bare.S"
    src.write_text(bareguest.SOURCE.read_text() + "/* changed */\n")
    monkeypatch.setattr(bareguest, "SOURCE", src)
    second = bareguest.build()
    assert second != first and second.exists()
    assert second.read_bytes() == data  # a comment changes the key, not the code


def test_broken_source_is_a_rig_error(cache: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from vmrig import RigError
    src = tmp_path / "bare.S"
    src.write_text("\tbogus_instruction %eax\n")
    monkeypatch.setattr(bareguest, "SOURCE", src)
    with pytest.raises(RigError, match="building the bare guest: as:"):
        bareguest.build()


def test_params_patched(cache: Path, tmp_path: Path) -> None:
    cfg = BareGuestConfig(mmio_base=0xD000_0000, npages=7, stride=8192)
    img = bareguest.image_for(cfg, nslots=3, dest=tmp_path / "bare.bin").read_bytes()
    magic, version, base, npages, stride, nslots, counter, trap = bareguest.PARAMS.unpack_from(
        img, bareguest.PARAMS_OFFSET)
    assert (magic, base, npages, stride, nslots) == (b"SLOTSCOP", 0xD000_0000, 7, 8192, 3)
    assert counter == bareguest.COUNTER_GPA and version == bareguest.PARAMS_VERSION
    assert trap == 0  # no deliberate exception unless asked


def test_run_image_without_a_writable_cache(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only cache (the nested lab VM's root) means building each run;
    only asking for the cached file itself is an error."""
    from vmrig import RigError
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SLOTSCOPE_CACHE", str(tmp_path / "file" / "cache"))
    img = bareguest.image_for(BareGuestConfig(), nslots=2, dest=tmp_path / "bare.bin")
    assert img.read_bytes()[0x10:0x18] == b"SLOTSCOP"
    with pytest.raises(RigError, match="not writable"):
        bareguest.build()


@needs_root
def test_read_only_shared_cache_is_used_and_built_beside(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The lab VM's view of the host's guest cache is a read-only mount: a
    guest built there is used as it is, and one built inside goes beside it
    (guests.local).  The read-only mount is a real one (a bind mount)."""
    monkeypatch.setenv("SLOTSCOPE_CACHE", str(tmp_path / "cache"))
    shared = guestbuild.shared_dir()
    host_built = bareguest.build()  # by "the host", while it is writable
    assert host_built.parent == shared
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(shared)], check=True)
        assert guestbuild.cache_dir() == tmp_path / "cache" / "guests.local"
        assert bareguest.build() == host_built  # found, not built again
        img = guestbuild.build(bareguest.SOURCE, "other", bareguest.LINK_BASE,
                               lambda tool, what: RuntimeError(what))
        assert img.path is not None and img.path.parent == tmp_path / "cache" / "guests.local"
        assert not (shared / img.path.name).exists()
    finally:
        subprocess.run(["umount", str(shared)], check=True)


def test_kernel_copied_off_a_shared_filesystem_once(cache: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """fs_type reads the real mount table.  A kernel image on a local
    filesystem boots where it is; one on a shared filesystem (the lab VM's
    9p, taken here as the test directory's own type) is copied into the
    guest cache once, and again only when the image changes."""
    from vmrig import linuxguest
    assert linuxguest.fs_type(Path("/proc/self/status")) == "proc"
    assert linuxguest.fs_type(Path("/sys/kernel")) == "sysfs"
    img = tmp_path / "vmlinux"
    img.write_bytes(b"\x7fELF" + bytes(8192))
    kind = linuxguest.fs_type(img)
    assert kind and kind not in linuxguest.SHARED_FS
    assert linuxguest.local_kernel(img) == img
    monkeypatch.setattr(linuxguest, "SHARED_FS", frozenset({kind}))
    copy = linuxguest.local_kernel(img)
    assert copy.parent == cache and copy.read_bytes() == img.read_bytes()
    assert linuxguest.local_kernel(img) == copy
    img.write_bytes(b"\x7fELF" + bytes(4096))  # a rebuilt kernel
    again = linuxguest.local_kernel(img)
    assert again != copy and again.read_bytes() == img.read_bytes()
