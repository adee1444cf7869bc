"""The lab VM's kernels: stock Debian images with their modules and exact headers,
or a user's own build.

The nested lab VM (vmrig.labvm) and TCG Linux guests boot a distro kernel
with kprobes and MMIO caching on.  bcc inside the L1 compiles against
``/lib/modules/<release>/build``, so every lab kernel comes with its exact
headers and modules.  A kernel is asked for by a *spec*:

``6.1``
    bookworm's own kernel: the release ``linux-headers-amd64`` (setup.sh)
    pulls in.  The default.
``6.12`` (any ``X.Y``)
    the newest ``linux-headers-6.12.*+deb12-amd64`` on the host, else the
    newest in the apt lists (bookworm-security carries Debian's 6.12 for
    bookworm, bookworm-backports an older one; either will do).  It stays
    put once fetched: an exact release fetches a newer one.
``6.12.95+deb12-amd64``
    that exact Debian release.
``/path/to/bzImage`` or ``/path/to/vmlinux``
    a user's build (a KVM developer testing a patch), with ``--modules DIR``
    (``make modules_install INSTALL_MOD_PATH=DIR``: DIR or
    DIR/lib/modules/<release>) and ``--headers DIR`` (the build tree, or a
    ``make headers``-style tree with its Makefile; default: the modules
    dir's ``build`` link).  The release is read from the image (the bzImage
    setup header's version string, an ELF vmlinux's ``Linux version``
    banner) and must equal the modules dir's; /lib/modules/<release>
    becomes a symlink to the modules (depmod'ed) with ``build`` -> headers.
    A vmlinux must carry the PVH note (CONFIG_PVH=y) to boot directly.
    Once linked, the image path alone (or the release) finds it again.

A Debian kernel's packages are downloaded and unpacked, never installed
with dpkg or apt: a kernel package's hooks would touch the host's bootloader
and initramfs, and 6.12's headers package depends on its image package.
Headers go to /usr/src (and their kbuild to /usr/lib) unless installed
already, as 6.1's are by setup.sh's linux-headers-amd64.  Modules go to
``/lib/modules/<release>`` (a lab VM on the host's filesystem loads them
from there); the bzImage, config and an uncompressed PVH
``vmlinux`` (boots to /init in about half the time under TCG) stay in the
cache, ``<cache>/<release>``, beside a stamp that user builds get too.
Everything is idempotent, and quick once done.

    python -m vmrig.kernel fetch [--kernel SPEC ...]  # install what is missing
    python -m vmrig.kernel show [--kernel SPEC ...]   # print paths, exit 1 if absent
    python -m vmrig.kernel fetch --kernel ~/linux/arch/x86/boot/bzImage \\
        --modules ~/mods --headers ~/linux
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import lzma
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from vmrig import RigError

CACHE_ROOT = Path(os.environ.get("SLOTSCOPE_CACHE", "/var/cache/slotscope")) / "kernel"
MODULES_ROOT = Path("/lib/modules")
HEADERS_ROOT = Path("/usr/src")
HEADERS_META = "linux-headers-amd64"
STAMP = "lab-kernel.json"
DEFAULT_KERNELS = ("6.1", "6.12")
BUILD_VERSION = "build"  # LabKernel.version of a user's build (no Debian package)

XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point note QEMU looks for

SHORT_NAME = re.compile(r"\d+\.\d+")
# 6.1.0-57-amd64, 6.12.95+deb12-amd64, a user's 6.13.0-rc1-kvm+ ...
RELEASE = re.compile(r"\d+\.\d+\.\d+[-+.~\w]*")


@dataclass(frozen=True)
class LabKernel:
    release: str        # uname -r, e.g. 6.1.0-57-amd64; runs/<release>/ in the lab
    version: str        # Debian package version, e.g. 6.1.192-3; "build" for a user's
    vmlinuz: Path       # the bzImage (a user's ELF-only build: the vmlinux)
    vmlinux: Path       # what the lab boots: a PVH ELF where there is one (faster TCG boot)
    modules_dir: Path   # /lib/modules/<release>
    headers_dir: Path   # /usr/src/linux-headers-<release> or the build's (= modules_dir/build)
    config: Path
    # The spec it was asked as ("6.12", a path); not part of its identity.
    name: str = dataclasses.field(default="", compare=False)

    def to_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def _run(cmd: list[str], cwd: Path | None = None, what: str | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    except FileNotFoundError:
        raise RigError(f"{cmd[0]} not found (Debian host needed; run ./setup.sh)") from None
    if p.returncode:
        last = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise RigError(f"{what or ' '.join(cmd[:3])} failed: {last}")
    return p.stdout


def _dpkg_field(pkg: str, field: str) -> str | None:
    p = subprocess.run(["dpkg-query", "-W", "-f", f"${{Status}}|${{{field}}}", pkg],
                       capture_output=True, text=True, check=False)
    if p.returncode or not p.stdout.startswith("install ok installed|"):
        return None
    return p.stdout.split("|", 1)[1]


def headers_release() -> tuple[str, str]:
    """(release, version) of the default (6.1) lab kernel: linux-headers-amd64's."""
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


# -- specs -----------------------------------------------------------------

def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def _series_releases(series: str, installed: bool) -> list[str]:
    """Debian amd64 releases of a series (6.12 -> 6.12.N+debNN-amd64, 6.1 ->
    6.1.0-N-amd64): those whose headers are on the host (apt-installed or
    unpacked by a fetch), or every one in the apt lists."""
    pat = re.compile(rf"linux-headers-({re.escape(series)}\.\d+(?:\+deb\d+|-\d+)-amd64)")
    if installed:
        names = [d.name for d in HEADERS_ROOT.glob(f"linux-headers-{series}.*")
                 if (d / "Makefile").is_file()]
    else:
        names = _run(["apt-cache", "pkgnames", f"linux-headers-{series}."]).split()
    found = {m.group(1) for n in names if (m := pat.fullmatch(n))}
    return sorted(found, key=_release_key)


def debian_release(spec: str) -> str:
    """The exact Debian release a short name or release spec stands for."""
    if spec == DEFAULT_KERNELS[0]:
        return headers_release()[0]
    if SHORT_NAME.fullmatch(spec):
        releases = (_series_releases(spec, installed=True)
                    or _series_releases(spec, installed=False))
        if not releases:
            raise RigError(f"no Debian {spec} kernel: no linux-headers-{spec}.*-amd64 "
                           "installed or in the apt lists (apt-get update; bookworm's "
                           "6.12 comes from bookworm-security or bookworm-backports)")
        return releases[-1]
    if RELEASE.fullmatch(spec):
        return spec
    raise RigError(f"unknown kernel {spec!r}: give 6.1, 6.12, an exact release such as "
                   "6.12.95+deb12-amd64, or the path of a kernel image")


def _is_path(spec: str) -> bool:
    if "/" in spec or spec.startswith(("~", ".")):
        return True
    return not (SHORT_NAME.fullmatch(spec) or RELEASE.fullmatch(spec)) and Path(spec).exists()


def resolve_kernel(spec: str | None = None, modules: str | os.PathLike[str] | None = None,
                   headers: str | os.PathLike[str] | None = None) -> LabKernel:
    """The lab kernel ``spec`` names (default 6.1), ready to boot.

    A Debian kernel must have been fetched (RigError naming the fetch
    command otherwise); a user's build is linked into /lib/modules here
    (root needed the first time)."""
    spec = spec or DEFAULT_KERNELS[0]
    if _is_path(spec):
        return dataclasses.replace(_user_build(Path(spec).expanduser(), modules, headers),
                                   name=spec)
    if modules is not None or headers is not None:
        raise RigError("--modules and --headers go with --kernel PATH (a kernel build)")
    return dataclasses.replace(lab_kernel(debian_release(spec)), name=spec)


def fetch_kernel(spec: str | None = None, modules: str | os.PathLike[str] | None = None,
                 headers: str | os.PathLike[str] | None = None) -> LabKernel:
    """Install what ``spec`` needs (headers, image, modules) unless there already."""
    spec = spec or DEFAULT_KERNELS[0]
    if _is_path(spec) or modules is not None or headers is not None:
        return resolve_kernel(spec, modules, headers)
    return dataclasses.replace(fetch_lab_kernel(debian_release(spec)), name=spec)


# -- fetched kernels -------------------------------------------------------

def _cache_dir(release: str) -> Path:
    return CACHE_ROOT / release


def lab_kernel(release: str | None = None) -> LabKernel:
    """The fetched lab kernel (default 6.1); RigError naming the fix if absent."""
    if release is None:
        release = headers_release()[0]
    stamp = _cache_dir(release) / STAMP
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        raise RigError(f"lab kernel {release} not fetched (run ./setup.sh or python -m "
                       f"vmrig.kernel fetch --kernel {release})") from None
    info.setdefault("name", release)
    k = LabKernel(**{k: (v if k in ("release", "version", "name") else Path(v))
                     for k, v in info.items()})
    for p in (k.vmlinuz, k.vmlinux, k.modules_dir / "modules.dep", k.headers_dir / "Makefile"):
        if not p.exists():
            raise RigError(f"lab kernel {release} incomplete: {p} missing "
                           f"(run python -m vmrig.kernel fetch --kernel {k.name})")
    return k


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


def _candidate(pkg: str) -> str | None:
    """The version apt would fetch for ``pkg``, None if it knows none."""
    m = re.search(r"Candidate: (\S+)", _run(["apt-cache", "policy", pkg]))
    return m.group(1) if m and m.group(1) != "(none)" else None


def _unpack_headers(release: str, tmp: Path) -> str:
    """Unpack linux-headers-<release> and the -common and kbuild packages it
    needs (those not installed) into /usr/src and /usr/lib; its version.

    Not apt-get install: Debian's 6.12 headers depend on their image
    package, which would install a kernel on the host (initramfs, bootloader
    entry).  Like the modules, the files are unpacked, owned by no package."""
    pkg = f"linux-headers-{release}"
    version = _candidate(pkg)
    if version is None:  # stale lists get one update before giving up
        _run(["apt-get", "update", "-q"])
        version = _candidate(pkg)
    if version is None:
        raise RigError(f"{pkg} is not in the apt lists (is {release} a Debian release? "
                       "6.12 needs bookworm-security or bookworm-backports in the sources)")
    show = _run(["apt-cache", "show", f"{pkg}={version}"])
    depends = next((ln.split(":", 1)[1] for ln in show.splitlines()
                    if ln.startswith("Depends:")), "")
    wanted = [f"{pkg}={version}"]
    for name, exact in re.findall(r"(linux-(?:headers-[^\s,|]+-common|kbuild-[^\s,|]+))"
                                  r"(?: \(= ([^)]+)\))?", depends):
        if _dpkg_field(name, "Version") is not None:
            continue  # a shared kbuild the host has (6.1's): never overwrite
        dep = exact or _candidate(name)
        if not dep:
            raise RigError(f"{name} ({pkg} needs it) is not in the apt lists")
        wanted.append(f"{name}={dep}")
    debs = tmp / "headers"
    debs.mkdir()
    os.chmod(debs, 0o755)  # apt-get download drops privileges to _apt
    _run(["apt-get", "download", "-q", *wanted], cwd=debs,
         what=f"apt-get download {pkg}")
    tree = tmp / "headers-tree"
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
    # Only the trees: lib/modules/<release>/{build,source} are made by
    # _link_headers, and the docs are not needed.
    for top in ("usr/src", "usr/lib"):
        for entry in sorted((tree / top).glob("linux-*")):
            dst = Path("/") / top / entry.name
            if dst.is_symlink() or dst.is_file():
                dst.unlink()
            elif dst.is_dir():
                shutil.rmtree(dst)  # a half-done earlier unpack of ours
            shutil.move(entry, dst)
    return version


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
                   f"linux-headers-{release} (or fetch a newer release), then fetch again")


def _install_modules(tree: Path, release: str) -> Path:
    """Move the unpacked modules into /lib/modules/<release> and run depmod."""
    src = next((d for d in (tree / "lib" / "modules" / release,
                            tree / "usr" / "lib" / "modules" / release) if d.is_dir()), None)
    if src is None:
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


def _relink(link: Path, target: Path) -> None:
    """Point the symlink ``link`` at ``target`` unless it already does."""
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise RigError(f"{link} is a directory, not a link to {target}; remove it")
    link.symlink_to(target)


def _link_headers(release: str) -> Path:
    headers = HEADERS_ROOT / f"linux-headers-{release}"
    if not (headers / "Makefile").exists():
        raise RigError(f"{headers} missing (apt-get install linux-headers-{release})")
    mod = MODULES_ROOT / release
    mod.mkdir(parents=True, exist_ok=True)
    common = HEADERS_ROOT / f"linux-headers-{release.removesuffix('-amd64')}-common"
    for name, target in (("build", headers), ("source", common)):
        if target.exists():
            _relink(mod / name, target)
    return headers


def fetch_lab_kernel(release: str | None = None) -> LabKernel:
    """Install a Debian release's headers, image and modules unless already
    done (default: the 6.1 release linux-headers-amd64 names)."""
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
        raise RigError("fetching a lab kernel needs root (it unpacks headers to /usr/src "
                       f"and modules to {MODULES_ROOT})")
    if version is None:
        version = _dpkg_field(f"linux-headers-{release}", "Version")
    cache = _cache_dir(release)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp_s:
        tmp = Path(tmp_s)
        os.chmod(tmp, 0o755)  # apt-get download drops privileges to _apt
        if version is None:
            version = _unpack_headers(release, tmp)
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
                  modules_dir=modules, headers_dir=headers, config=config, name=release)
    (cache / STAMP).write_text(json.dumps(k.to_json(), indent=2) + "\n")
    return lab_kernel(release)


# -- a user's build ----------------------------------------------------------

def _build_modules_dir(modules: Path, release: str) -> Path:
    """The modules dir of a build: DIR named <release>, or an INSTALL_MOD_PATH."""
    mods = modules.expanduser().absolute()
    if not mods.is_dir():
        raise RigError(f"modules dir {mods} not found")
    nested = mods / "lib" / "modules"
    if nested.is_dir():
        names = sorted(p.name for p in nested.iterdir() if p.is_dir())
        if release not in names:
            raise RigError(f"release mismatch: the image is {release} but {nested} holds "
                           f"{', '.join(names) or 'nothing'}")
        mods = nested / release
    elif mods.name != release:
        raise RigError(f"release mismatch: the image is {release} but the modules dir "
                       f"{mods} is {mods.name}")
    if not ((mods / "modules.order").is_file() or (mods / "kernel").is_dir()):
        raise RigError(f"{mods} holds no modules (make modules_install INSTALL_MOD_PATH=DIR)")
    return mods


def _tree_release(headers: Path) -> str | None:
    """The release a headers or build tree was configured as, if it says."""
    try:
        text = (headers / "include/generated/utsrelease.h").read_text()
    except OSError:
        return None
    m = re.search(r'UTS_RELEASE "([^"]+)"', text)
    return m.group(1) if m else None


def _is_elf(image: Path) -> bool:
    with open(image, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _user_build(image: Path, modules: str | os.PathLike[str] | None,
                headers: str | os.PathLike[str] | None) -> LabKernel:
    """Link a user's build into /lib/modules and the cache; its LabKernel."""
    image = image.absolute()
    if not image.is_file():
        raise RigError(f"kernel image {image} not found")
    release = image_release(image)
    elf = _is_elf(image)
    if elf and not has_pvh_note(image):
        raise RigError(f"{image} has no PVH entry note: QEMU cannot boot it directly "
                       "(build with CONFIG_PVH=y, or give arch/x86/boot/bzImage)")
    cache = _cache_dir(release)
    try:
        known = json.loads((cache / STAMP).read_text())
    except (OSError, ValueError):
        known = None
    if known and known.get("version") != BUILD_VERSION:
        raise RigError(f"{release} is a fetched Debian kernel; give your build another "
                       "release (CONFIG_LOCALVERSION)")
    if modules is None and headers is None:
        if known and Path(known["vmlinux"]).resolve() == image.resolve():
            return lab_kernel(release)
        raise RigError(f"kernel build {release} is not linked yet: give --modules DIR "
                       "and --headers DIR")
    if modules is None:
        raise RigError("--headers needs --modules DIR (make modules_install "
                       "INSTALL_MOD_PATH=DIR)")
    mods = _build_modules_dir(Path(modules), release)
    hdrs = Path(headers).expanduser().absolute() if headers is not None else mods / "build"
    if not (hdrs / "Makefile").is_file():
        raise RigError(f"headers dir {hdrs} has no Makefile (--headers: the build tree, "
                       "or a make headers-style tree)")
    tree = _tree_release(hdrs)
    if tree is not None and tree != release:
        raise RigError(f"release mismatch: the image is {release} but the headers {hdrs} "
                       f"are {tree}")
    hdrs = hdrs.resolve()  # before build is relinked: it may be mods/build itself
    link = MODULES_ROOT / release
    if link.exists() and not link.is_symlink() and link.resolve() != mods.resolve():
        raise RigError(f"{link} already holds another kernel's modules; give your build "
                       "another release (CONFIG_LOCALVERSION) or remove it")
    try:
        if link.is_symlink() or not link.exists():
            _relink(link, mods)
        _relink(link / "build", hdrs)
        # An O= build tree's source link names the sources; else they are one tree.
        source = hdrs / "source"
        _relink(link / "source", source.resolve() if source.is_dir() else hdrs)
        dep, order = link / "modules.dep", link / "modules.order"
        if not dep.exists() or (order.exists() and order.stat().st_mtime > dep.stat().st_mtime):
            _run(["depmod", "-a", release])
        cache.mkdir(parents=True, exist_ok=True)
        boot, other = ((cache / "vmlinux", cache / "vmlinuz") if elf
                       else (cache / "vmlinuz", cache / "vmlinux"))
        if other.is_symlink():
            other.unlink()
        # A symlink in the cache, not the build's own path: vng takes a path
        # ending in arch/x86/boot/bzImage beside a .config for a build tree
        # and swaps in its own module handling.
        _relink(boot, image)
        k = LabKernel(release=release, version=BUILD_VERSION, vmlinuz=boot, vmlinux=boot,
                      modules_dir=link, headers_dir=hdrs, config=hdrs / ".config",
                      name=str(image))
        text = json.dumps(k.to_json(), indent=2) + "\n"
        stamp = cache / STAMP
        if not stamp.exists() or stamp.read_text() != text:
            stamp.write_text(text)
    except OSError as e:
        raise RigError(f"cannot link kernel build {release}: {e.strerror} "
                       f"({e.filename}); linking into {MODULES_ROOT} needs root") from None
    return lab_kernel(release)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmrig.kernel",
                                 description="Fetch and show the nested lab VM's kernels.")
    ap.add_argument("action", choices=("fetch", "show"))
    ap.add_argument("--kernel", action="append", metavar="SPEC",
                    help="6.1, 6.12, an exact release, or a kernel image path "
                    f"(repeatable; default: {' and '.join(DEFAULT_KERNELS)})")
    ap.add_argument("--release", action="append", dest="kernel", help=argparse.SUPPRESS)
    ap.add_argument("--modules", metavar="DIR", help="a build's modules (with --kernel PATH)")
    ap.add_argument("--headers", metavar="DIR", help="a build's tree (with --kernel PATH)")
    args = ap.parse_args(argv)
    specs = args.kernel or list(DEFAULT_KERNELS)
    act = fetch_kernel if args.action == "fetch" else resolve_kernel
    failed = 0
    for spec in specs:
        try:
            if (args.modules or args.headers) and len(specs) > 1:
                raise RigError("--modules/--headers go with a single --kernel PATH")
            k = act(spec, args.modules, args.headers)
        except RigError as e:
            # print, not logging: a separate entry point whose only stderr
            # lines are these errors (stdout holds the paths).  vmrig sets no
            # handlers and cannot use slotscope's logsetup; a print always shows.
            print(f"vmrig.kernel: error: {e}", file=sys.stderr)
            failed += 1
            continue
        info = k.to_json()
        for key, val in [("name", info.pop("name")), *info.items()]:
            print(f"{key:12} {val}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
