"""What analysis reads from a run's manifest: one accessor per key.

The manifest is a JSON dict written by ``schema.RunWriter`` (and the tracer
that extends it), with the rig's ``workload.json`` under ``workload``.  Every
key analysis uses is read here and nowhere else, so a key's name, default and
meaning have one home.  Defaults exist only for recordings whose writer
predates a key (the committed recordings have no ``mmio_gen_bits`` and no
``address_spaces``) or where the writer leaves it null (a live run's
``stop_ns``, ``address_spaces`` without BTF).
"""

from __future__ import annotations

from typing import Any

from . import schema

Manifest = dict[str, Any]

ADDRESS_SPACES_DEFAULT = 2  # x86 with SMM: generation += 2 per swap


def gen_bits(m: Manifest, default: int = schema.MMIO_GEN_BITS_DEFAULT) -> int:
    """The kernel's MMIO generation width: from the manifest, else 19 (5.5+)."""
    v = m.get("mmio_gen_bits")
    return int(v) if v is not None else default


def address_spaces(m: Manifest) -> int:
    """How far one memslot swap moves the generation (null: BTF had no answer)."""
    v = m.get("address_spaces")
    return int(v) if v is not None else ADDRESS_SPACES_DEFAULT


def start_ns(m: Manifest) -> int | None:
    return m.get("start_ns")


def stop_ns(m: Manifest) -> int | None:
    """None while the recording is live or after a crash."""
    return m.get("stop_ns")


def start_wall(m: Manifest) -> float | None:
    v = m.get("start_wall")
    return v if isinstance(v, int | float) else None


def complete(m: Manifest) -> bool:
    return bool(m.get("complete"))


def backend(m: Manifest) -> str | None:
    return m.get("backend")


def host(m: Manifest) -> dict[str, Any]:
    """hostname, kernel and machine of the recording host."""
    return m.get("host") or {}


def rows(m: Manifest) -> dict[str, int]:
    """Rows written per event type, as of the last manifest write."""
    return m.get("rows") or {}


def lost(m: Manifest) -> dict[str, int]:
    """Events the tracer counted as lost, per event type."""
    man = m.get("lost") or {}
    out: dict[str, int] = {}
    if isinstance(man, dict):
        for k, v in man.items():
            try:
                out[str(k)] = int(v)
            except (TypeError, ValueError):
                continue
    return out


def mmio_caching_off(m: Manifest) -> bool:
    """kvm.mmio_caching=N on the recording host: KVM keeps no MMIO SPTEs."""
    caching = (m.get("kvm_params") or {}).get("kvm.mmio_caching")
    return str(caching).upper().startswith(("N", "0", "FALSE"))


def missing_data(m: Manifest) -> list[str]:
    """What the tracer said it could not record, one line each."""
    out = []
    for item in m.get("missing_data") or []:
        out.append(item if isinstance(item, str) else
                   ", ".join(f"{k}: {v}" for k, v in dict(item).items()))
    return out


def workload_name(m: Manifest) -> str | None:
    """The rig workload that ran (from workload.json), if any."""
    wl = m.get("workload")
    return wl.get("workload") if isinstance(wl, dict) else None
