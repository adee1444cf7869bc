"""The run manifest (``manifest.json``): every key, its type, its one writer,
and the accessors the analysis reads keys through.

Each key has exactly one writer, named by the TypedDict that declares it.
RunWriter writes its own keys and refuses any key not declared here, or one
of its own passed in by a caller (errors.UndeclaredKeys).  The rig's side is
``workload.json`` (writer.write_workload_config), read back under
``workload``, so the tracer's flushes never clobber it.

Every key but ``schema_version`` (reader.read_manifest checks it) may be
absent: a run written without the tracer (the simulator, a bench) lacks the
tracer's keys, and a recording made before a key existed lacks that key (the
committed v1 recordings have no ``mmio_gen_bits`` or ``address_spaces``).
Each accessor below names its default for an absent key once; there are no
alternative key names.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from .schema import MMIO_GEN_BITS_DEFAULT


class HostInfo(TypedDict):
    hostname: str
    kernel: str
    machine: str
    clocksource: NotRequired[str | None]  # absent before 2026-12-03


class WriterFields(TypedDict, total=False):
    """Written by recording.writer.RunWriter itself."""

    schema_version: int            # schema.SCHEMA_VERSION when written; reader checks it
    host: HostInfo                 # the recording host
    start_ns: int                  # CLOCK_MONOTONIC when the run opened
    start_wall: float              # time.time() at the same moment
    stop_ns: int | None            # null while live or after a crash
    complete: bool                 # every table compacted by a clean close
    rows: dict[str, int]           # rows on disk per table, as of this write
    error: str                     # why the run ended badly: close(error=) or a failed write


class TracerFields(TypedDict, total=False):
    """Written by tracer.recorder.Recorder (``stop_reason``: tracer.cli)."""

    backend: str                   # kprobe, tracepoint, ...
    backend_reason: str
    missing_data: list[str]        # what this backend/host cannot record, one line each
    filters: dict[str, list[int]]  # {"pids": [...]}, empty: every process
    kernel: str
    kvm_module: str | None         # the vendor module providing /dev/kvm
    kvm_params: dict[str, str]     # 'module.param' -> sysfs value (hostfacts.KVM_PARAMS)
    emit_mmio_access: bool
    mode: Literal["stream", "aggregate"]
    mmio_fault_interval: str       # what an mmio_fault latency spans
    address_spaces: int | None     # generation step per memslot swap; null: BTF had no answer
    address_spaces_source: str
    mmio_gen_bits: int             # width of the generation MMIO SPTEs keep
    mmio_gen_bits_source: str
    vcpu_fds_seeded: int
    buffer: str                    # ringbuf or perf
    probes_attached: list[str]
    probes_missing: list[str]
    btf_offsets: dict[str, int]
    bpf_prog_ids: list[int]
    tracer_pid: int
    attach_ns: int
    detach_ns: int
    lost: dict[str, int]           # records lost per kind, cumulative
    events: dict[str, int]         # rows emitted per event type
    mmio_faults_aggregated: int    # aggregate mode: MMIO intervals in mmio_hist
    tracer_cpu_s: float
    drain: dict[str, float]        # ring-buffer drain statistics
    stop_reason: str               # duration, targets exited, interrupted
    # One tracer session (one compile and attach) recorded several runs, one
    # directory each (Recorder.begin_run): {"run": n (1-based), "attach_ns":
    # the session's attach, "load_s": its compile + attach seconds}.  Counts
    # (events, lost, tracer_cpu_s) are this run's alone.
    session: dict[str, Any]


class LabFields(TypedDict, total=False):
    """Written by slotscope.labrun (through Recorder.close)."""

    scenario: dict[str, Any]       # the lab scenario this run recorded
    # QEMU versions: "l0" runs the nested lab VM (null in direct mode),
    # "l1" is the one the run's rig started (null for the micro-VMM).
    qemu: dict[str, str | None]


class SimulatorFields(TypedDict, total=False):
    """Written by analysis.simulator, which imitates the tracer's keys too."""

    synthetic: bool


class RigFields(TypedDict, total=False):
    """Written by the rig into workload.json; read back under this key."""

    workload: dict[str, Any]       # {"workload": name, ...its parameters and counts}


class Manifest(WriterFields, TracerFields, LabFields, SimulatorFields, RigFields, total=False):
    """A manifest as read back: every writer's keys."""


def _keys(owner: type) -> frozenset[str]:
    return frozenset(owner.__annotations__)


OWNERS: dict[str, frozenset[str]] = {
    "recording.writer": _keys(WriterFields), "tracer": _keys(TracerFields),
    "slotscope.labrun": _keys(LabFields), "analysis.simulator": _keys(SimulatorFields),
    "vmrig (workload.json)": _keys(RigFields),
}
WRITER_KEYS = OWNERS["recording.writer"]
KEYS = frozenset(Manifest.__annotations__)

# ---------------------------------------------------------------- accessors
ADDRESS_SPACES_DEFAULT = 2  # x86 with SMM: generation += 2 per swap


def gen_bits(m: Manifest, default: int = MMIO_GEN_BITS_DEFAULT) -> int:
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
    return dict(m.get("host") or {})


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
