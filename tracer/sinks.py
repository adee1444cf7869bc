"""Recorder sinks besides the run directory: JSON lines and the live view."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import pyarrow as pa

from recording.schema import hist_quantile

_LIVE_COLUMNS = {"latency_ns", "vm", "vcpu", "stale", "mmio_gen", "count", "log2_ns",
                 "reentered"}


class JsonLines:
    """One JSON object per row: {"event": type, column: value, ...}."""

    def __init__(self, out: IO[str] | None = None, events: set[str] | None = None) -> None:
        self.out = out or sys.stdout
        self.events = events
        self.rows = 0

    def write(self, event: str, rows: pa.Table) -> None:
        if self.events is not None and event not in self.events:
            return
        lines = []
        for row in rows.to_pylist():
            lines.append(json.dumps({"event": event, **row}, separators=(",", ":")))
        self.rows += len(lines)
        if lines:
            self.out.write("\n".join(lines) + "\n")

    def flush(self) -> None:
        self.out.flush()


@dataclass
class _Vcpu:
    faults: int = 0
    stale: int = 0
    accesses: int = 0
    lat: list[np.ndarray] = field(default_factory=list)
    hist: dict[int, int] = field(default_factory=dict)  # aggregate mode: log2 ns -> n


    def quantiles(self) -> tuple[float | None, float | None]:
        """p50, p99 latency ns: exact from rows, from log2 buckets when aggregated."""
        if self.lat:
            lat = np.concatenate(self.lat)
            return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
        ks, ns = list(self.hist), list(self.hist.values())
        return hist_quantile(ks, ns, .5), hist_quantile(ks, ns, .99)


@dataclass
class _Vm:
    memslots: int = 0
    gen: int | None = None
    vcpus: dict[int, _Vcpu] = field(default_factory=dict)


class LiveStats:
    """Per VM and vCPU counts over the current interval (reset by ``take``)."""

    def __init__(self) -> None:
        self.vms: dict[int, _Vm] = {}
        self.lost = 0

    def _vm(self, vm: int) -> _Vm:
        return self.vms.setdefault(vm, _Vm())

    def write(self, event: str, rows: pa.Table) -> None:
        cols = {name: rows.column(name).to_pylist() for name in rows.column_names
                if name in _LIVE_COLUMNS}
        if event == "mmio_fault":
            lat = np.asarray(cols["latency_ns"], dtype=np.int64)
            for i, (vm, vcpu) in enumerate(zip(cols["vm"], cols["vcpu"], strict=True)):
                v = self._vm(vm).vcpus.setdefault(vcpu, _Vcpu())
                v.faults += 1
                v.stale += bool(cols["stale"][i])
                if cols["reentered"][i]:  # a thread's cut-short last exit: no latency
                    v.lat.append(lat[i:i + 1])
        elif event == "mmio_hist":
            for vm, vcpu, k, n, stale, done in zip(
                    cols["vm"], cols["vcpu"], cols["log2_ns"], cols["count"], cols["stale"],
                    cols["reentered"], strict=True):
                v = self._vm(vm).vcpus.setdefault(vcpu, _Vcpu())
                v.faults += n
                v.stale += n if stale else 0
                if done:
                    v.hist[k] = v.hist.get(k, 0) + n
        elif event == "mmio_access":
            for vm, vcpu in zip(cols["vm"], cols["vcpu"], strict=True):
                self._vm(vm).vcpus.setdefault(vcpu, _Vcpu()).accesses += 1
        elif event == "memslot_update":
            for vm in cols["vm"]:
                self._vm(vm).memslots += 1
        elif event == "generation":
            for vm, g in zip(cols["vm"], cols["mmio_gen"], strict=True):
                self._vm(vm).gen = g
        elif event == "lost":
            self.lost += sum(cols["count"])

    def take(self, seconds: float) -> list[str]:
        """Lines (< 80 columns) for the interval, then reset the counters."""
        head = (f"{'VM':>14} {'VCPU':>4} {'FAULT/s':>8} {'STALE%':>6} {'P50us':>7} "
                f"{'P99us':>7} {'MMIO/s':>8} {'SLOT/s':>6} {'GEN':>6}")
        lines = [head]
        for vm_id, vm in sorted(self.vms.items()):
            first = True
            for vcpu_id, v in sorted(vm.vcpus.items()) or [(-1, _Vcpu())]:
                p50, p99 = (f"{q / 1e3:7.1f}" if q is not None else f"{'-':>7}"
                            for q in v.quantiles())
                stale = f"{100 * v.stale / v.faults:6.1f}" if v.faults else f"{'-':>6}"
                slots = f"{vm.memslots / seconds:6.1f}" if first else f"{'':>6}"
                gen = f"{vm.gen:6x}" if first and vm.gen is not None else f"{'-':>6}"
                vm_s = _vm_name(vm_id) if first else ""
                vcpu_s = str(vcpu_id) if vcpu_id >= 0 else "-"
                lines.append(f"{vm_s:>14} {vcpu_s:>4} {v.faults / seconds:8.0f} {stale} "
                             f"{p50} {p99} {v.accesses / seconds:8.0f} {slots} {gen}")
                first = False
        lines.append(f"lost events: {self.lost}")
        for vm in self.vms.values():
            vm.memslots = 0
            vm.vcpus.clear()
        self.lost = 0
        return lines


def _vm_name(vm: int) -> str:
    """pid/fd for ioctl-derived ids; hex for kernel pointers."""
    if vm >> 48:
        return f"{vm:#x}"[-14:]
    return f"{vm >> 32}/{vm & 0xFFFFFFFF}"
