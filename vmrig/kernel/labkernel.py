"""A lab kernel: what it is (``LabKernel``), where its files go, and the
stamp in the cache that records a fetched or linked one.

Every lab kernel comes with its exact headers and modules: bcc inside the L1
compiles against ``/lib/modules/<release>/build``.  The bzImage, config and
an uncompressed PVH ``vmlinux`` stay in the cache, ``<cache>/<release>``,
beside a stamp (``STAMP``) that user builds get too.  The tools the other
modules of this package run (apt, dpkg, depmod) go through ``run_tool``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
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


def run_tool(cmd: list[str], cwd: Path | None = None, what: str | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    except FileNotFoundError:
        raise RigError(f"{cmd[0]} not found (Debian host needed; run ./setup.sh)") from None
    if p.returncode:
        last = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise RigError(f"{what or ' '.join(cmd[:3])} failed: {last}")
    return p.stdout


def dpkg_field(pkg: str, field: str) -> str | None:
    p = subprocess.run(["dpkg-query", "-W", "-f", f"${{Status}}|${{{field}}}", pkg],
                       capture_output=True, text=True, check=False)
    if p.returncode or not p.stdout.startswith("install ok installed|"):
        return None
    return p.stdout.split("|", 1)[1]


def headers_release() -> tuple[str, str]:
    """(release, version) of the default (6.1) lab kernel: linux-headers-amd64's."""
    depends = dpkg_field(HEADERS_META, "Depends")
    if depends is None:
        raise RigError(f"{HEADERS_META} is not installed (run ./setup.sh)")
    m = re.search(r"linux-headers-(\S+-amd64)", depends)
    if not m:
        raise RigError(f"cannot find the headers release in {HEADERS_META}: {depends!r}")
    release = m.group(1)
    version = dpkg_field(f"linux-headers-{release}", "Version")
    if version is None:
        raise RigError(f"linux-headers-{release} is not installed (run ./setup.sh)")
    return release, version


def cache_dir(release: str) -> Path:
    return CACHE_ROOT / release


def lab_kernel(release: str | None = None) -> LabKernel:
    """The fetched lab kernel (default 6.1); RigError naming the fix if absent."""
    if release is None:
        release = headers_release()[0]
    stamp = cache_dir(release) / STAMP
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


def relink(link: Path, target: Path) -> None:
    """Point the symlink ``link`` at ``target`` unless it already does."""
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise RigError(f"{link} is a directory, not a link to {target}; remove it")
    link.symlink_to(target)

