"""A kernel spec (``6.1``, ``6.12``, an exact release, an image path) to the
lab kernel it names: resolved (``resolve_kernel``) or fetched first
(``fetch_kernel``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from vmrig import RigError

from .build import link_build
from .debian import debian_release, fetch_lab_kernel
from .labkernel import DEFAULT_KERNELS, RELEASE, SHORT_NAME, LabKernel, lab_kernel


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
        return dataclasses.replace(link_build(Path(spec).expanduser(), modules, headers),
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

