"""Facts about the KVM host that both the tracer and the rig read, and the
row in which any layer reports a host check to ``slotscope doctor``.

Why this module sits in ``recording/``: the tracer and vmrig may not import
each other, and both import the recording format, whose manifests record
these very facts (``kvm_module``, ``kvm_params``).  So "which vendor module
provides /dev/kvm" and "is nested virtualization on" get one home in the
layer both may use.  It needs only the standard library; on a laptop
without KVM the answers are simply "none".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

Status = Literal["OK", "WARN", "FAIL"]
OK: Final = "OK"
WARN: Final = "WARN"
FAIL: Final = "FAIL"


@dataclass(frozen=True)
class Check:
    """One doctor row: what was checked, how it went, what was seen, and the
    fix (empty when OK)."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    @classmethod
    def of(cls, name: str, ok: bool, detail: str, fix: str, bad: Status = WARN) -> Check:
        """The usual row: OK when ``ok``, else ``bad`` with ``fix``."""
        return cls(name, OK if ok else bad, detail, "" if ok else fix)


SYS_MODULE = Path("/sys/module")
# Modules that provide /dev/kvm, in the order a report names them.  kvm_pvm
# (PVM) emulates every guest instruction: bare guests run, Linux guests do not.
KVM_VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")
# The module parameters slotscope reports, per module.
KVM_PARAMS = {
    "kvm": ("mmio_caching", "tdp_mmu"),
    "kvm_intel": ("nested", "ept"),
    "kvm_amd": ("nested", "npt"),
}


def loaded_vendor_modules() -> tuple[str, ...]:
    """Every KVM vendor module loaded here (usually one)."""
    return tuple(m for m in KVM_VENDOR_MODULES if (SYS_MODULE / m).exists())


def kvm_vendor_module() -> str | None:
    """The vendor module that provides /dev/kvm, or None."""
    loaded = loaded_vendor_modules()
    return loaded[0] if loaded else None


def pvm_host() -> bool:
    """Whether /dev/kvm may come from PVM (Linux guests need TCG there)."""
    return "kvm_pvm" in loaded_vendor_modules()


def param_on(value: str) -> bool:
    """A boolean module parameter as sysfs shows it: Y/N or 1/0."""
    return value.strip().upper() in ("Y", "1")


def kvm_params() -> dict[str, str]:
    """'module.param' -> value for every KVM_PARAMS entry this host has."""
    out = {}
    for module, names in KVM_PARAMS.items():
        for n in names:
            try:
                out[f"{module}.{n}"] = (SYS_MODULE / module / "parameters" / n).read_text().strip()
            except OSError:
                continue
    return out


def nested_vendor() -> str | None:
    """The vendor module with nested virtualization on (kvm_intel or
    kvm_amd), or None."""
    params = kvm_params()
    for module in KVM_VENDOR_MODULES:
        if param_on(params.get(f"{module}.nested", "")):
            return module
    return None
