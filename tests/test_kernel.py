"""The lab's kernel axis (vmrig.kernel): Debian 6.1 and 6.12 fetched with their
exact headers and modules, kernel specs resolved, and a user's own build
linked into /lib/modules.  No VM boots here: tests/test_labvm*.py do that.

The user-build tests assemble a "build" from the fetched 6.12's real pieces:
its bzImage with the version string in the setup header rewritten to a test
release (so it cannot collide with the fetched kernel), a modules dir with
the KVM modules, and a copy of its headers tree.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root

from vmrig import RigError
from vmrig import kernel as vk

REPO = Path(__file__).resolve().parents[1]

needs_debian = pytest.mark.skipif(shutil.which("dpkg-query") is None
                                  or shutil.which("apt-cache") is None,
                                  reason="needs a Debian host (dpkg-query, apt-cache)")
pytestmark = needs_debian


def _fetched(spec: str) -> vk.LabKernel:
    try:
        return vk.resolve_kernel(spec)
    except RigError as e:
        pytest.skip(f"lab kernel {spec} not fetched ({e}; sudo .venv/bin/python -m "
                    "vmrig.kernel fetch)")


def _series(release: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", release).groups()  # type: ignore[union-attr]
    return int(major), int(minor)


# -- the default kernels --------------------------------------------------

@pytest.mark.parametrize("spec", vk.DEFAULT_KERNELS)
def test_default_kernel_is_complete(spec: str) -> None:
    k = _fetched(spec)
    assert k.name == spec
    assert _series(k.release) == _series(spec + ".0")
    # modules installed and depmod'ed: kvm-amd loads after kvm
    dep = (k.modules_dir / "modules.dep").read_text()
    assert re.search(r"kvm-amd\.ko[^:]*:.*kvm\.ko", dep), "kvm-amd must depend on kvm"
    # bcc inside the L1 compiles against build/: this release's own headers
    build = k.modules_dir / "build"
    assert (build / "Makefile").is_file()
    assert build.resolve() == k.headers_dir.resolve()
    assert f'"{k.release}"' in (build / "include/generated/utsrelease.h").read_text()
    assert (k.modules_dir / "source" / "Makefile").is_file()
    config = k.config.read_text().splitlines()
    assert "CONFIG_KVM_AMD=m" in config
    assert "CONFIG_KPROBES=y" in config
    # KVM_SMM became an option in 6.2; before, SMM was always built in.
    if _series(k.release) >= (6, 2):
        assert "CONFIG_KVM_SMM=y" in config
    else:
        assert not any(ln.startswith("CONFIG_KVM_SMM=") for ln in config)
    assert vk.has_pvh_note(k.vmlinux)
    assert not vk.has_pvh_note(k.vmlinuz)
    # The release is in both images: the bzImage's setup header, the ELF banner.
    assert vk.image_release(k.vmlinuz) == k.release
    assert vk.image_release(k.vmlinux) == k.release


def test_default_kernels_differ() -> None:
    kernels = [_fetched(spec) for spec in vk.DEFAULT_KERNELS]
    assert len({k.release for k in kernels}) == len(kernels)
    assert len({k.vmlinux for k in kernels}) == len(kernels)


# -- specs ----------------------------------------------------------------

def test_short_names_and_exact_releases_resolve_alike() -> None:
    k61 = _fetched("6.1")
    assert k61.release == vk.headers_release()[0]
    assert vk.resolve_kernel(None) == k61  # the default
    k612 = _fetched("6.12")
    assert re.fullmatch(r"6\.12\.\d+\+deb\d+-amd64", k612.release)
    # "6.12" is the newest 6.12 whose headers are on the host
    on_host = [d.name.removeprefix("linux-headers-")
               for d in vk.HEADERS_ROOT.glob("linux-headers-6.12.*-amd64")
               if re.fullmatch(r"linux-headers-6\.12\.\d+\+deb\d+-amd64", d.name)]
    newest = max(on_host, key=lambda r: [int(n) for n in re.findall(r"\d+", r)])
    assert k612.release == newest
    for k in (k61, k612):
        exact = vk.resolve_kernel(k.release)
        assert exact == k
        assert exact.name == k.release


@pytest.mark.parametrize("spec, message", [
    ("bogus", "unknown kernel 'bogus'"),
    ("6.12.0+deb12-amd64", "not fetched"),
    ("7.99", "no Debian 7.99 kernel"),
    ("/nonexistent/bzImage", "not found"),
])
def test_unknown_specs_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(RigError, match=re.escape(message)) as e:
        vk.resolve_kernel(spec)
    assert "\n" not in str(e.value)


def test_modules_without_a_build_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RigError, match="go with --kernel PATH"):
        vk.resolve_kernel("6.12", modules=tmp_path)


def test_cli_errors_are_one_line() -> None:
    p = subprocess.run([sys.executable, "-m", "vmrig.kernel", "show", "--kernel", "bogus"],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1
    assert p.stderr.startswith("vmrig.kernel: error: unknown kernel 'bogus'")
    assert len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([sys.executable, "-m", "slotscope", "labvm", "run", "--kernel",
                        "bogus", "--", "true"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1
    assert "slotscope labvm: error: unknown kernel 'bogus'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# -- fetch ----------------------------------------------------------------

@needs_root
def test_fetch_defaults_is_idempotent() -> None:
    kernels = [_fetched(spec) for spec in vk.DEFAULT_KERNELS]
    before = [k.vmlinux.stat().st_mtime_ns for k in kernels]
    p = subprocess.run([sys.executable, "-m", "vmrig.kernel", "fetch"], capture_output=True,
                       text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    for spec, k in zip(vk.DEFAULT_KERNELS, kernels, strict=True):
        assert f"name         {spec}\nrelease      {k.release}\n" in p.stdout
    # nothing downloaded or unpacked again
    assert [k.vmlinux.stat().st_mtime_ns for k in kernels] == before


def test_cli_show_lists_both_defaults() -> None:
    kernels = [_fetched(spec) for spec in vk.DEFAULT_KERNELS]
    p = subprocess.run([sys.executable, "-m", "vmrig.kernel", "show"], capture_output=True,
                       text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    for k in kernels:
        assert f"vmlinux      {k.vmlinux}\n" in p.stdout


# -- a user's build -------------------------------------------------------

def test_image_release_refuses_a_non_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"MZ" + os.urandom(8192))
    with pytest.raises(RigError, match="neither an x86 bzImage nor an ELF vmlinux"):
        vk.image_release(junk)


def _test_release(release: str) -> str:
    # Same length as the real one: the bzImage's string is patched in place.
    test = release.replace("+deb", "+tst", 1)
    assert test != release and len(test) == len(release)
    return test


def _build(tmp_path: Path, k: vk.LabKernel, release: str) -> tuple[Path, Path, Path]:
    """(bzImage, INSTALL_MOD_PATH, build tree) of a fake build of ``release``."""
    tree = tmp_path / "linux"
    shutil.copytree(k.headers_dir, tree, symlinks=True)
    uts = tree / "include/generated/utsrelease.h"
    uts.write_text(uts.read_text().replace(k.release, release))
    image = tree / "arch/x86/boot/bzImage"
    image.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(k.vmlinuz.read_bytes())
    # the setup header's kernel_version: the string's offset less 0x200
    at = struct.unpack_from("<H", data, 0x20e)[0] + 0x200
    assert data[at:at + len(k.release) + 2] == k.release.encode() + b" ("
    data[at:at + len(release)] = release.encode()
    image.write_bytes(data)
    staging = tmp_path / "staging"
    mods = staging / "lib/modules" / release
    kvm = Path("kernel/arch/x86/kvm")
    shutil.copytree(k.modules_dir / kvm, mods / kvm)
    order = (k.modules_dir / "modules.order").read_text().splitlines()
    (mods / "modules.order").write_text(
        "".join(f"{ln}\n" for ln in order if ln.startswith(str(kvm))))
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        shutil.copy(k.modules_dir / name, mods / name)
    return image, staging, tree


@pytest.fixture
def build_release() -> Iterator[tuple[vk.LabKernel, str]]:
    """The fetched 6.12 and a test release; whatever got linked is removed."""
    k = _fetched("6.12")
    release = _test_release(k.release)
    yield k, release
    link = vk.MODULES_ROOT / release
    if link.is_symlink():
        link.unlink()
    shutil.rmtree(vk.CACHE_ROOT / release, ignore_errors=True)


@needs_root
def test_user_build_is_linked_and_resolves(tmp_path: Path,
                                           build_release: tuple[vk.LabKernel, str]) -> None:
    k612, release = build_release
    image, staging, tree = _build(tmp_path, k612, release)
    assert vk.image_release(image) == release
    k = vk.resolve_kernel(str(image), modules=staging, headers=tree)
    assert k.release == release
    assert k.version == vk.BUILD_VERSION
    assert k.name == str(image)
    mods = staging / "lib/modules" / release
    link = vk.MODULES_ROOT / release
    assert link.is_symlink() and link.resolve() == mods.resolve()
    assert k.modules_dir == link
    assert (link / "build").resolve() == tree.resolve() == k.headers_dir
    assert (link / "source").resolve() == tree.resolve()
    # depmod ran on the build's modules
    assert re.search(r"kvm-amd\.ko[^:]*:.*kvm\.ko", (mods / "modules.dep").read_text())
    # The lab boots a link in the cache that names the image (not the build's
    # own arch/x86/boot/bzImage path, which vng would treat as a build tree).
    assert k.vmlinux.resolve() == image.resolve()
    assert not str(k.vmlinux).endswith("arch/x86/boot/bzImage")
    assert vk.image_release(k.vmlinux) == release
    assert k.config.read_text() == (k612.headers_dir / ".config").read_text()
    # Linked once, the image alone or the release finds it again, unchanged.
    stamp = vk.CACHE_ROOT / release / vk.STAMP
    mtime = stamp.stat().st_mtime_ns
    assert vk.resolve_kernel(str(image)) == k
    assert vk.resolve_kernel(release) == k
    assert vk.resolve_kernel(str(image), modules=staging, headers=tree) == k
    assert stamp.stat().st_mtime_ns == mtime
    p = subprocess.run([sys.executable, "-m", "vmrig.kernel", "show", "--kernel", str(image)],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert f"release      {release}\n" in p.stdout


def test_user_build_with_mismatched_release_is_refused(
        tmp_path: Path, build_release: tuple[vk.LabKernel, str]) -> None:
    k612, release = build_release
    image, staging, tree = _build(tmp_path, k612, release)
    # modules installed for another release than the image's
    other = staging / "lib/modules" / k612.release
    (staging / "lib/modules" / release).rename(other)
    with pytest.raises(RigError, match=re.escape(
            f"release mismatch: the image is {release} but {staging}/lib/modules "
            f"holds {k612.release}")):
        vk.resolve_kernel(str(image), modules=staging, headers=tree)
    with pytest.raises(RigError, match="release mismatch: .* the modules dir .* is "
                       + re.escape(k612.release)):
        vk.resolve_kernel(str(image), modules=other, headers=tree)
    other.rename(staging / "lib/modules" / release)
    # headers configured as another release
    with pytest.raises(RigError, match=re.escape(
            f"release mismatch: the image is {release} but the headers "
            f"{k612.headers_dir} are {k612.release}")):
        vk.resolve_kernel(str(image), modules=staging, headers=k612.headers_dir)
    # a build that claims a fetched Debian release
    debian = tmp_path / "debian-bzImage"
    shutil.copy(k612.vmlinuz, debian)
    with pytest.raises(RigError, match="is a fetched Debian kernel"):
        vk.resolve_kernel(str(debian), modules=staging, headers=tree)
    # nothing was linked
    assert not os.path.lexists(vk.MODULES_ROOT / release)


def test_user_build_needs_its_modules_the_first_time(
        tmp_path: Path, build_release: tuple[vk.LabKernel, str]) -> None:
    k612, release = build_release
    image, _staging, _tree = _build(tmp_path, k612, release)
    with pytest.raises(RigError, match=f"kernel build {re.escape(release)} is not linked "
                       "yet: give --modules DIR and --headers DIR"):
        vk.resolve_kernel(str(image))
