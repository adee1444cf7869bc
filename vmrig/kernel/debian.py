"""Debian's kernels: which release a spec names, and its packages
downloaded and unpacked (headers, image, modules), never installed.

A kernel package's hooks would touch the host's bootloader and initramfs,
and 6.12's headers package depends on its image package.  Headers go to
/usr/src (and their kbuild to /usr/lib) unless installed already, as 6.1's
are by setup.sh's linux-headers-amd64.  Modules go to
``/lib/modules/<release>`` (a lab VM on the host's filesystem loads them
from there); the bzImage, config and an uncompressed PVH ``vmlinux`` (boots
to /init in about half the time under TCG) stay in the cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from vmrig import RigError

from .image import extract_vmlinux, has_pvh_note
from .labkernel import (
    DEFAULT_KERNELS,
    HEADERS_ROOT,
    MODULES_ROOT,
    RELEASE,
    SHORT_NAME,
    STAMP,
    LabKernel,
    cache_dir,
    dpkg_field,
    headers_release,
    lab_kernel,
    relink,
    run_tool,
)


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
        names = run_tool(["apt-cache", "pkgnames", f"linux-headers-{series}."]).split()
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


def _candidate(pkg: str) -> str | None:
    """The version apt would fetch for ``pkg``, None if it knows none."""
    m = re.search(r"Candidate: (\S+)", run_tool(["apt-cache", "policy", pkg]))
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
        run_tool(["apt-get", "update", "-q"])
        version = _candidate(pkg)
    if version is None:
        raise RigError(f"{pkg} is not in the apt lists (is {release} a Debian release? "
                       "6.12 needs bookworm-security or bookworm-backports in the sources)")
    show = run_tool(["apt-cache", "show", f"{pkg}={version}"])
    depends = next((ln.split(":", 1)[1] for ln in show.splitlines()
                    if ln.startswith("Depends:")), "")
    wanted = [f"{pkg}={version}"]
    for name, exact in re.findall(r"(linux-(?:headers-[^\s,|]+-common|kbuild-[^\s,|]+))"
                                  r"(?: \(= ([^)]+)\))?", depends):
        if dpkg_field(name, "Version") is not None:
            continue  # a shared kbuild the host has (6.1's): never overwrite
        dep = exact or _candidate(name)
        if not dep:
            raise RigError(f"{name} ({pkg} needs it) is not in the apt lists")
        wanted.append(f"{name}={dep}")
    debs = tmp / "headers"
    debs.mkdir()
    os.chmod(debs, 0o755)  # apt-get download drops privileges to _apt
    run_tool(["apt-get", "download", "-q", *wanted], cwd=debs,
         what=f"apt-get download {pkg}")
    tree = tmp / "headers-tree"
    for deb in sorted(debs.glob("*.deb")):
        run_tool(["dpkg-deb", "-x", str(deb), str(tree)])
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
            run_tool(["apt-get", "update", "-q"])
        for pkg in (f"linux-image-{release}-unsigned", f"linux-image-{release}"):
            try:
                run_tool(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=dest)
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
    run_tool(["depmod", "-a", release])
    return dst


def _link_headers(release: str) -> Path:
    headers = HEADERS_ROOT / f"linux-headers-{release}"
    if not (headers / "Makefile").exists():
        raise RigError(f"{headers} missing (apt-get install linux-headers-{release})")
    mod = MODULES_ROOT / release
    mod.mkdir(parents=True, exist_ok=True)
    common = HEADERS_ROOT / f"linux-headers-{release.removesuffix('-amd64')}-common"
    for name, target in (("build", headers), ("source", common)):
        if target.exists():
            relink(mod / name, target)
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
        version = dpkg_field(f"linux-headers-{release}", "Version")
    cache = cache_dir(release)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp_s:
        tmp = Path(tmp_s)
        os.chmod(tmp, 0o755)  # apt-get download drops privileges to _apt
        if version is None:
            version = _unpack_headers(release, tmp)
        deb = _download_image(release, version, tmp)
        tree = tmp / "tree"
        run_tool(["dpkg-deb", "-x", str(deb), str(tree)])
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

