"""The lab job's scenario matrix: a TOML file, checked key by key.

Each TOML table becomes a frozen dataclass; every value is checked against
the field's annotation (``typing.get_type_hints``: int, float, str, bool or
a Literal of strings, or a list of strings) before the dataclass is made, so a bad file gives one
line naming the file, the table and the key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from vmrig.config import GuestKind, RigConfigError, parse_size
from vmrig.kernel import DEFAULT_KERNELS
from vmrig.microvm.wrap import MAX_WRAP_PAGES
from vmrig.workloads import WORKLOADS

from .errors import ConfigError

__all__ = ["ConfigError", "LabConfig", "Scenario", "Thresholds", "load"]

Mode = Literal["auto", "direct", "nested"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TABLES = ("lab", "thresholds", "scenario")


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: str                # a name in vmrig.workloads.WORKLOADS
    repetitions: int = 1
    mmio_pages: int = 2
    vcpus: int = 1
    duration: float = 20.0       # seconds, for time-bound workloads
    rate: float = 1.0            # workload actions per second
    size: str = "128M"           # hotplugged memory per action
    cycles: int = 3              # pc-dimm plug/unplug cycles; virtio-mem walks
    # virtio-mem: the requested sizes walked per cycle; empty: half of size,
    # then all and half again per cycle
    steps: tuple[str, ...] = ()
    guest: GuestKind = "bare"
    schedule: str = "create:1,flags:1,flags:1,move:1,delete:1"  # microvm
    mmio_accesses: int = 20000   # microvm
    native: bool = False         # microvm: the exit loop in C (vmrig/microvm/native.py)
    # microvm: instead of the schedule, the generation-wrap workload through
    # this many wraps of the masked MMIO generation (vmrig/microvm/wrap.py)
    wraps: int = 0
    run_timeout: float = 0.0     # seconds per run; 0: the [lab] table's
    aggregate: bool = False      # MMIO faults as kernel histograms (record --aggregate)

    def __post_init__(self) -> None:
        # a plan read back from JSON gives a list: keep the scenario hashable
        object.__setattr__(self, "steps", tuple(self.steps))

    @property
    def size_bytes(self) -> int:
        return parse_size(self.size, "size")  # checked when the config was read

    def virtio_mem_sizes(self) -> list[int]:
        """The requested sizes a virtio-mem run walks: ``steps`` per cycle,
        else half of ``size``, then all and half again per cycle."""
        if self.steps:
            return [parse_size(x, "steps") for x in self.steps] * self.cycles
        top = self.size_bytes
        return [top // 2] + [top, top // 2] * self.cycles


@dataclass(frozen=True)
class Thresholds:
    slow_share_increase: float = 0.10
    update_cost_p50_ratio: float = 2.0
    mmio_latency_p99_ratio: float = 2.0
    lost_events: int = 0


@dataclass(frozen=True)
class LabTable:
    """The ``[lab]`` table."""

    mode: Mode = "auto"
    run_timeout: float = 420.0
    # nested mode: the L1 kernels, each a vmrig.kernel spec ("6.1", "6.12",
    # a Debian release, a kernel image path); every scenario runs on each
    kernels: tuple[str, ...] = DEFAULT_KERNELS


@dataclass(frozen=True)
class LabConfig:
    scenarios: tuple[Scenario, ...]
    thresholds: Thresholds = field(default_factory=Thresholds)
    mode: Mode = "auto"
    run_timeout: float = 420.0
    source: str = "<default>"
    kernels: tuple[str, ...] = DEFAULT_KERNELS


def _typed(where: str, key: str, value: Any, want: Any) -> Any:
    """``value`` as the annotation ``want`` asks, or a ConfigError."""
    if get_origin(want) is Literal:
        choices = get_args(want)
        if value not in choices:
            raise ConfigError(f"{where}: {key} {value!r} is not one of "
                              f"{', '.join(map(str, choices))}", key)
        return value
    if want == tuple[str, ...]:
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: {key} must be a non-empty list of strings, "
                              f"not {value!r}", key)
        return tuple(value)
    if want not in (int, float, str, bool):
        raise TypeError(f"no TOML check for {key}: {want!r}")  # a new field's type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is an int to isinstance: a TOML true is no count, 1 is no flag.
    if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
        raise ConfigError(f"{where}: {key} must be {want.__name__}, not {value!r}", key)
    if want in (int, float) and value < 0:
        raise ConfigError(f"{where}: {key} must not be negative", key)
    return value


def _build(cls: type, where: str, table: Any) -> Any:
    """The dataclass ``cls`` from a TOML table, every key checked."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(known)})", key)
    for f in fields(cls):
        if f.name not in table and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{where}: missing key {f.name}", f.name)
    return cls(**{key: _typed(where, key, value, hints[key]) for key, value in table.items()})


def _check_scenario(where: str, s: Scenario) -> None:
    if not NAME_RE.match(s.name):
        raise ConfigError(f"{where}: name {s.name!r} must be letters, digits, - _ .", "name")
    if s.workload not in WORKLOADS:
        raise ConfigError(f"{where}: workload {s.workload!r} is not one of "
                          f"{', '.join(WORKLOADS)}", "workload")
    if s.mmio_pages < 2:
        raise ConfigError(f"{where}: mmio_pages must be >= 2 (KVM's per-vCPU MMIO cache "
                          "hides a loop on one page)", "mmio_pages")
    for key in ("repetitions", "vcpus"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{where}: {key} must be >= 1", key)
    try:
        parse_size(s.size, "size")
    except RigConfigError as e:
        raise ConfigError(f"{where}: {e}", "size") from None
    if s.rate <= 0:
        raise ConfigError(f"{where}: rate must be > 0", "rate")
    if s.workload == "virtio-mem" and s.guest != "linux":
        raise ConfigError(f"{where}: workload virtio-mem needs guest = \"linux\" (its "
                          "driver plugs the blocks)", "guest")
    if s.steps and s.workload != "virtio-mem":
        raise ConfigError(f"{where}: steps needs workload \"virtio-mem\"", "steps")
    for step in s.steps:
        try:
            if parse_size(step, "steps") > s.size_bytes:
                raise ConfigError(f"{where}: steps: {step} exceeds size {s.size}", "steps")
        except RigConfigError as e:
            raise ConfigError(f"{where}: {e}", "steps") from None
    if s.wraps and s.workload != "microvm":
        raise ConfigError(f"{where}: wraps needs workload \"microvm\"", "wraps")
    if s.native and (s.workload != "microvm" or s.wraps):
        raise ConfigError(f"{where}: native needs workload \"microvm\" without wraps (the "
                          "wrap's loop is its ioctls)", "native")
    if s.wraps and s.mmio_pages > MAX_WRAP_PAGES:
        raise ConfigError(f"{where}: mmio_pages must be <= {MAX_WRAP_PAGES} with wraps "
                          "(two page sets)", "mmio_pages")


def parse(text: str, source: str) -> LabConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    for key in doc:
        if key not in TABLES:
            raise ConfigError(f"{source}: unknown table {key!r} (known: {', '.join(TABLES)})",
                              key)
    lab = _build(LabTable, f"{source}: [lab]", doc.get("lab", {}))
    thresholds = _build(Thresholds, f"{source}: [thresholds]", doc.get("thresholds", {}))
    raw = doc.get("scenario")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: no [[scenario]] tables", "scenario")
    scenarios = []
    for i, table in enumerate(raw):
        name = table.get("name", f"#{i + 1}") if isinstance(table, dict) else f"#{i + 1}"
        where = f"{source}: scenario {name}"
        s = _build(Scenario, where, table)
        _check_scenario(where, s)
        scenarios.append(s)
    names = [s.name for s in scenarios]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{source}: scenario names repeat: {', '.join(sorted(dup))}", "name")
    return LabConfig(tuple(scenarios), thresholds, lab.mode, lab.run_timeout, source,
                     lab.kernels)


def default_text() -> str:
    return resources.files("slotscope").joinpath("lab.toml").read_text()


def load(path: str | Path | None) -> LabConfig:
    if path is None:
        return parse(default_text(), "lab.toml (default)")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return parse(text, str(path))
