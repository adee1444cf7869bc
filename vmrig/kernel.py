"""The lab VM's kernel: a stock Debian 6.1 image, its modules and exact headers.

The nested lab VM (vmrig.labvm) and TCG Linux guests boot Debian's own
``linux-image-<release>`` so they get a distro kernel with kprobes and MMIO
caching on.  Its release must equal the installed ``linux-headers-<release>``
(pulled by ``linux-headers-amd64`` in setup.sh) so that bcc inside the L1
compiles against the exact headers.

The image package is downloaded and unpacked, never installed with dpkg: a
kernel package's hooks would touch the host's bootloader and initramfs.
Modules go to ``/lib/modules/<release>`` (a lab VM on the host's filesystem
loads them from there); the bzImage, config and an uncompressed PVH
``vmlinux`` (boots to /init in about half the time under TCG) stay in the
cache.  Everything is idempotent.

    python -m vmrig.kernel fetch     # download/unpack if needed, print paths
    python -m vmrig.kernel show      # print paths, exit 1 if not fetched
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from vmrig import RigError

CACHE_ROOT = Path(os.environ.get("SLOTSCOPE_CACHE", "/var/cache/slotscope")) / "kernel"
MODULES_ROOT = Path("/lib/modules")
HEADERS_META = "linux-headers-amd64"
STAMP = "lab-kernel.json"

XZ_MAGIC = b"\xfd7zXZ\x00"
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point note QEMU looks for


@dataclass(frozen=True)
class LabKernel:
    release: str        # e.g. 6.1.0-56-amd64
    version: str        # Debian package version, e.g. 6.1.192-2
    vmlinuz: Path       # the bzImage
    vmlinux: Path       # uncompressed ELF with a PVH entry note (faster TCG boot)
    modules_dir: Path   # /lib/modules/<release>
    headers_dir: Path   # /usr/src/linux-headers-<release> (= modules_dir/build)
    config: Path

    def to_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RigError(f"{cmd[0]} not found (Debian host needed; run ./setup.sh)") from None
    if p.returncode:
        last = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise RigError(f"{' '.join(cmd[:3])} failed: {last}")
    return p.stdout


def _dpkg_field(pkg: str, field: str) -> str | None:
    p = subprocess.run(["dpkg-query", "-W", "-f", f"${{Status}}|${{{field}}}", pkg],
                       capture_output=True, text=True, check=False)
    if p.returncode or not p.stdout.startswith("install ok installed|"):
        return None
    return p.stdout.split("|", 1)[1]


def headers_release() -> tuple[str, str]:
    """(release, version) of the headers the lab kernel must match."""
    depends = _dpkg_field(HEADERS_META, "Depends")
    if depends is None:
        raise RigError(f"{HEADERS_META} is not installed (run ./setup.sh)")
    m = re.search(r"linux-headers-(\S+-amd64)", depends)
    if not m:
        raise RigError(f"cannot find the headers release in {HEADERS_META}: {depends!r}")
    release = m.group(1)
    version = _dpkg_field(f"linux-headers-{release}", "Version")
    if version is None:
        raise RigError(f"linux-headers-{release} is not installed (run ./setup.sh)")
    return release, version


def _cache_dir(release: str) -> Path:
    return CACHE_ROOT / release


def lab_kernel(release: str | None = None) -> LabKernel:
    """The fetched lab kernel; RigError naming the fix if it is not there."""
    if release is None:
        release = headers_release()[0]
    stamp = _cache_dir(release) / STAMP
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        raise RigError(f"lab kernel {release} not fetched (run ./setup.sh or "
                       "python -m vmrig.kernel fetch)") from None
    k = LabKernel(**{k: (v if k in ("release", "version") else Path(v))
                     for k, v in info.items()})
    for p in (k.vmlinuz, k.vmlinux, k.modules_dir / "modules.dep", k.headers_dir / "Makefile"):
        if not p.exists():
            raise RigError(f"lab kernel {release} incomplete: {p} missing "
                           "(run python -m vmrig.kernel fetch)")
    return k


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Decompress the bzImage's xz payload (the kernel ELF) into ``out``."""
    data = bzimage.read_bytes()
    start = data.find(XZ_MAGIC)
    if start < 0:
        raise RigError(f"{bzimage}: no xz payload (not a Debian x86 bzImage?)")
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elf = d.decompress(data[start:])
    if not elf.startswith(b"\x7fELF"):
        raise RigError(f"{bzimage}: xz payload is not an ELF image")
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


def _download_image(release: str, version: str, dest: Path) -> Path:
    # The -unsigned package holds the same files without the signed-kernel
    # wrapper dependencies; fall back to the signed one where it is missing.
    # Stale package lists get one apt-get update before giving up.
    errors = []
    for attempt in range(2):
        if attempt:
            _run(["apt-get", "update", "-q"])
        for pkg in (f"linux-image-{release}-unsigned", f"linux-image-{release}"):
            try:
                _run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=dest)
            except RigError as e:
                errors.append(str(e))
                continue
            debs = sorted(dest.glob(f"{pkg}_*.deb"))
            if debs:
                return debs[-1]
    raise RigError(f"cannot download linux-image-{release} {version} to match the headers "
                   f"({errors[-1]}); if the archive moved on: apt-get install --only-upgrade "
                   f"{HEADERS_META}, then fetch again")


def _install_modules(tree: Path, release: str) -> Path:
    """Move the unpacked modules into /lib/modules/<release> and run depmod."""
    src = tree / "lib" / "modules" / release
    if not src.is_dir():
        raise RigError(f"image package has no lib/modules/{release}")
    dst = MODULES_ROOT / release
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    _run(["depmod", "-a", release])
    return dst


def _link_headers(release: str) -> Path:
    headers = Path(f"/usr/src/linux-headers-{release}")
    if not (headers / "Makefile").exists():
        raise RigError(f"{headers} missing (apt-get install linux-headers-{release})")
    mod = MODULES_ROOT / release
    mod.mkdir(parents=True, exist_ok=True)
    common = Path(f"/usr/src/linux-headers-{release.removesuffix('-amd64')}-common")
    for name, target in (("build", headers), ("source", common)):
        link = mod / name
        if target.exists() and not (link.is_symlink() and link.resolve() == target.resolve()):
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
    return headers


def fetch_lab_kernel(release: str | None = None) -> LabKernel:
    """Download, unpack and install the lab kernel unless already done."""
    version = None
    if release is None:
        release, version = headers_release()
    try:
        k = lab_kernel(release)
    except RigError:
        pass
    else:
        _link_headers(release)
        return k
    if os.geteuid() != 0:
        raise RigError("fetching the lab kernel needs root (it installs modules "
                       f"to {MODULES_ROOT})")
    if version is None:
        version = _dpkg_field(f"linux-headers-{release}", "Version")
        if version is None:
            raise RigError(f"linux-headers-{release} is not installed")
    cache = _cache_dir(release)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp_s:
        tmp = Path(tmp_s)
        os.chmod(tmp, 0o755)  # apt-get download drops privileges to _apt
        deb = _download_image(release, version, tmp)
        tree = tmp / "tree"
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
        boot = tree / "boot"
        vmlinuz = cache / "vmlinuz"
        config = cache / "config"
        os.replace(boot / f"vmlinuz-{release}", vmlinuz)
        os.replace(boot / f"config-{release}", config)
        if (boot / f"System.map-{release}").exists():
            os.replace(boot / f"System.map-{release}", cache / "System.map")
        modules = _install_modules(tree, release)
    vmlinux = cache / "vmlinux"
    extract_vmlinux(vmlinuz, vmlinux)
    if not has_pvh_note(vmlinux):
        # Still bootable as a bzImage; the lab VM then uses vmlinuz.
        vmlinux.unlink()
        vmlinux = vmlinuz
    headers = _link_headers(release)
    k = LabKernel(release=release, version=version, vmlinuz=vmlinuz, vmlinux=vmlinux,
                  modules_dir=modules, headers_dir=headers, config=config)
    (cache / STAMP).write_text(json.dumps(k.to_json(), indent=2) + "\n")
    return lab_kernel(release)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmrig.kernel",
                                 description="Fetch and show the nested lab VM's kernel.")
    ap.add_argument("action", choices=("fetch", "show"))
    ap.add_argument("--release", help="kernel release (default: linux-headers-amd64's)")
    args = ap.parse_args(argv)
    try:
        k = fetch_lab_kernel(args.release) if args.action == "fetch" else lab_kernel(args.release)
    except RigError as e:
        # print, not logging: a separate entry point whose only stderr line is
        # this error (stdout holds the paths).  vmrig sets no handlers and
        # cannot use slotscope's logsetup; a print always shows.
        print(f"vmrig.kernel: error: {e}", file=sys.stderr)
        return 1
    for key, val in k.to_json().items():
        print(f"{key:12} {val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
