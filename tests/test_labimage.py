"""The lab VM's read-only images (vmrig.labimage): packed by the real
mksquashfs, read back with unsquashfs; the L1 side is in test_labvm."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmrig import labimage

pytestmark = pytest.mark.skipif(not (shutil.which("mksquashfs") and shutil.which("unsquashfs")),
                                reason="needs squashfs-tools (./setup.sh)")


def _listing(img: Path) -> set[str]:
    p = subprocess.run(["unsquashfs", "-lc", "-d", "", str(img)], capture_output=True,
                       text=True, check=True)
    return {line.strip() for line in p.stdout.splitlines() if line.strip()}


@pytest.fixture
def trees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    monkeypatch.setenv("SLOTSCOPE_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "src" / "a", tmp_path / "other" / "b"
    (a / "pkg" / "__pycache__").mkdir(parents=True)
    (a / "pkg" / "mod.py").write_text("x = 1\n")
    (a / "pkg" / "__pycache__" / "mod.pyc").write_bytes(b"\0" * 16)
    (b / "include").mkdir(parents=True)
    (b / "include" / "h.h").write_text("#define X 1\n")
    (b / "scripts").symlink_to("../nowhere/scripts")
    return [a, b]


def test_image_holds_each_tree_at_its_path_and_is_reused(trees: Path) -> None:
    img = labimage.image("t", trees)
    assert img is not None and img.trees == tuple(trees)
    files = _listing(img.path)
    a, b = trees
    assert {f"{a}/pkg/mod.py", f"{a}/pkg/__pycache__/mod.pyc", f"{b}/include/h.h",
            f"{b}/scripts"} <= files
    mtime = img.path.stat().st_mtime_ns
    again = labimage.image("t", trees)
    assert again == img and img.path.stat().st_mtime_ns == mtime  # not packed again
    # a bytecode cache written by an import is no change
    (a / "pkg" / "__pycache__" / "other.pyc").write_bytes(b"\1")
    assert labimage.image("t", trees) == img


def test_changed_file_packs_anew_and_drops_the_old_image(trees: Path) -> None:
    first = labimage.image("t", trees)
    assert first is not None
    src = trees[0] / "pkg" / "mod.py"
    src.write_text("x = 2\n")
    os.utime(src, ns=(1, 1))
    second = labimage.image("t", trees)
    assert second is not None and second.path != first.path
    assert not first.path.exists() and second.path.exists()


def test_too_large_or_unpackable_stays_on_9p(trees: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labimage, "MAX_BYTES", 10)
    assert labimage.image("t", trees) is None
    monkeypatch.setattr(labimage, "MAX_BYTES", 2 << 30)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert labimage.image("t", trees) is None
    assert labimage.images(Path("/nonexistent"), Path("/nonexistent/vmlinux")) == []


def test_python_trees_are_this_pythons() -> None:
    import sys
    import sysconfig
    got = labimage.python_trees(Path(sys.prefix))
    for want in (Path(sys.prefix), Path(sysconfig.get_paths()["stdlib"])):
        assert any(want.resolve().is_relative_to(d) for d in got), (want, got)
    assert all(not (o != d and d.is_relative_to(o)) for d in got for o in got)


def test_mount_script_binds_every_tree(trees: Path) -> None:
    img = labimage.Image(Path("/c/t.img"), tuple(trees))
    script = labimage.mount_script([img])
    assert f"labvm_image slotscope-img0 {trees[0]} {trees[1]}" in script
    assert labimage.mount_script([]) == ""
    assert labimage.qemu_opts([img])[1].endswith("format=raw,readonly=on")
