"""The lab job's scenario matrix: a TOML file, checked key by key."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from vmrig.config import RigConfigError, parse_size
from vmrig.workloads import WORKLOADS

MODES = ("auto", "direct", "nested")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(Exception):
    """A malformed lab config; the message names the file and the key."""


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: str
    repetitions: int = 1
    mmio_pages: int = 2
    vcpus: int = 1
    duration: float = 20.0       # seconds, for time-bound workloads
    rate: float = 1.0            # workload actions per second
    size: str = "128M"           # hotplugged memory per action
    cycles: int = 3              # pc-dimm plug/unplug cycles
    guest: str = "bare"          # bare | linux
    schedule: str = "create:1,flags:1,flags:1,move:1,delete:1"  # microvm
    mmio_accesses: int = 20000   # microvm
    aggregate: bool = False      # MMIO faults as kernel histograms (record --aggregate)

    @property
    def size_bytes(self) -> int:
        return parse_size(self.size, "size")  # checked when the config was read


@dataclass(frozen=True)
class Thresholds:
    slow_share_increase: float = 0.10
    update_cost_p50_ratio: float = 2.0
    mmio_latency_p99_ratio: float = 2.0
    lost_events: int = 0


@dataclass(frozen=True)
class LabConfig:
    scenarios: tuple[Scenario, ...]
    thresholds: Thresholds = field(default_factory=Thresholds)
    mode: str = "auto"
    run_timeout: float = 420.0
    source: str = "<default>"


def _typed(where: str, key: str, value: Any, want: type) -> Any:
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
        raise ConfigError(f"{where}: {key} must be {want.__name__}, not {value!r}")
    if want in (int, float) and value < 0:
        raise ConfigError(f"{where}: {key} must not be negative")
    return value


def _build(cls: type, where: str, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    known = {f.name: f for f in fields(cls)}
    for key in table:
        if key not in known or key == "source":
            raise ConfigError(f"{where}: unknown key {key!r} "
                              f"(known: {', '.join(k for k in known if k != 'source')})")
    kwargs = {}
    for key, value in table.items():
        want = {"int": int, "float": float, "str": str, "bool": bool}.get(
            str(known[key].type), str)
        kwargs[key] = _typed(where, key, value, want)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        missing = str(e).rsplit(":", 1)[-1].strip().strip("'")
        raise ConfigError(f"{where}: missing key {missing}") from None


def _check_scenario(where: str, s: Scenario) -> None:
    if not NAME_RE.match(s.name):
        raise ConfigError(f"{where}: name {s.name!r} must be letters, digits, - _ .")
    if s.workload not in WORKLOADS:
        raise ConfigError(f"{where}: workload {s.workload!r} is not one of "
                          f"{', '.join(WORKLOADS)}")
    if s.mmio_pages < 2:
        raise ConfigError(f"{where}: mmio_pages must be >= 2 (KVM's per-vCPU MMIO cache "
                          "hides a loop on one page)")
    if s.repetitions < 1 or s.vcpus < 1:
        raise ConfigError(f"{where}: repetitions and vcpus must be >= 1")
    try:
        parse_size(s.size, "size")
    except RigConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if s.guest not in ("bare", "linux"):
        raise ConfigError(f"{where}: guest must be bare or linux")
    if s.rate <= 0:
        raise ConfigError(f"{where}: rate must be > 0")


def parse(text: str, source: str) -> LabConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    for key in doc:
        if key not in ("lab", "thresholds", "scenario"):
            raise ConfigError(f"{source}: unknown table {key!r} (known: lab, thresholds, "
                              "scenario)")
    lab = doc.get("lab", {})
    if not isinstance(lab, dict):
        raise ConfigError(f"{source}: [lab] must be a table")
    for key in lab:
        if key not in ("mode", "run_timeout"):
            raise ConfigError(f"{source}: [lab]: unknown key {key!r} (known: mode, run_timeout)")
    mode = _typed(f"{source}: [lab]", "mode", lab.get("mode", "auto"), str)
    if mode not in MODES:
        raise ConfigError(f"{source}: [lab]: mode {mode!r} is not one of {', '.join(MODES)}")
    timeout = _typed(f"{source}: [lab]", "run_timeout", lab.get("run_timeout", 420.0), float)
    thresholds = _build(Thresholds, f"{source}: [thresholds]", doc.get("thresholds", {}))
    raw = doc.get("scenario")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: no [[scenario]] tables")
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
        raise ConfigError(f"{source}: scenario names repeat: {', '.join(sorted(dup))}")
    return LabConfig(tuple(scenarios), thresholds, mode, timeout, source)


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
