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
with dpkg or apt (debian.py says why and where its files go).  Everything
is idempotent, and quick once done.

    python -m vmrig.kernel fetch [--kernel SPEC ...]  # install what is missing
    python -m vmrig.kernel show [--kernel SPEC ...]   # print paths, exit 1 if absent
    python -m vmrig.kernel fetch --kernel ~/linux/arch/x86/boot/bzImage \\
        --modules ~/mods --headers ~/linux

Modules: labkernel (``LabKernel``, where its files live, the cache stamp),
specs (a spec to its kernel: ``resolve_kernel``, ``fetch_kernel``), debian
(Debian releases, their packages downloaded and unpacked), build (a user's
build linked in), image (bzImage/vmlinux: release, payload, PVH note), cli.
"""

from vmrig.kernel.build import link_build
from vmrig.kernel.debian import debian_release, fetch_lab_kernel
from vmrig.kernel.image import extract_vmlinux, has_pvh_note, image_release
from vmrig.kernel.labkernel import (
    BUILD_VERSION,
    CACHE_ROOT,
    DEFAULT_KERNELS,
    HEADERS_ROOT,
    MODULES_ROOT,
    STAMP,
    LabKernel,
    headers_release,
    lab_kernel,
)
from vmrig.kernel.specs import fetch_kernel, resolve_kernel

__all__ = [
    "BUILD_VERSION", "CACHE_ROOT", "DEFAULT_KERNELS", "HEADERS_ROOT", "MODULES_ROOT", "STAMP",
    "LabKernel", "debian_release", "extract_vmlinux", "fetch_kernel", "fetch_lab_kernel",
    "has_pvh_note", "headers_release", "image_release", "lab_kernel", "link_build",
    "resolve_kernel",
]
