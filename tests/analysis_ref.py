"""An independent reading of a run's raw rows for the analysis tests.

Deliberately naive (Python loops over pyarrow rows, no pandas, no numpy): it
restates the classification and attribution rules one fault at a time, so a
vectorisation or join mistake in ``analysis`` cannot hide behind itself.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recording.reader import read_table


@dataclass
class Reference:
    classes: list[str] = field(default_factory=list)
    causes: list[int] = field(default_factory=list)          # update row or -1
    openers: list[int] = field(default_factory=list)         # update row or -1
    n_slow: dict[int, int] = field(default_factory=dict)     # update row -> faults charged
    cost: dict[int, float] = field(default_factory=dict)     # update row -> extra ns
    counts: dict[str, int] = field(default_factory=dict)


def rows(run_dir: Path, event: str) -> list[dict[str, Any]]:
    return read_table(run_dir, event).to_pylist()


def reference(run_dir: Path) -> Reference:
    updates = rows(run_dir, "memslot_update")
    faults = rows(run_dir, "mmio_fault")
    zaps = rows(run_dir, "zap_all")
    ok = [(i, u) for i, u in enumerate(updates) if (u["ret"] or 0) == 0]
    first_seen: dict[tuple[int, int], int] = {}
    for f in faults:
        k = (f["vm"], f["gfn"])
        first_seen[k] = min(first_seen.get(k, f["exit_ns"]), f["exit_ns"])
    fast_lat: dict[tuple[int, int], list[int]] = defaultdict(list)
    fast_vm: dict[int, list[int]] = defaultdict(list)
    for f in faults:
        if f["fast_hit"]:
            fast_lat[(f["vm"], f["vcpu"])].append(f["latency_ns"])
            fast_vm[f["vm"]].append(f["latency_ns"])
    any_evidence = any(f["fast_hit"] or f["stale"] or f["remarked"] for f in faults)
    ref = Reference()
    for f in faults:
        t, vm = f["exit_ns"], f["vm"]
        ended = [(u["end_ns"], i) for i, u in ok if u["vm"] == vm and u["end_ns"] <= t]
        opener = max(ended)[1] if ended else -1
        running = [i for i, u in ok if u["vm"] == vm and u["begin_ns"] <= t < u["end_ns"]]
        zap_times = [z["ns"] for z in zaps if z["vm"] == vm and z["ns"] <= t]
        fast, stale, remarked = bool(f["fast_hit"]), bool(f["stale"]), bool(f["remarked"])
        if fast:
            c = "fast"
        elif not (stale or remarked):
            c = "vcpu_cache" if any_evidence else "unknown"
        elif running:
            c = "during_update"
        elif stale:
            c = "stale"
        elif zap_times and first_seen[(vm, f["gfn"])] < max(zap_times):
            c = "after_zap"
        else:
            c = "first_touch"
        cause = running[0] if c == "during_update" else \
            opener if c in ("stale", "after_zap") else -1
        ref.classes.append(c)
        ref.causes.append(cause)
        ref.openers.append(opener)
        ref.counts[c] = ref.counts.get(c, 0) + 1
        if cause >= 0:
            ref.n_slow[cause] = ref.n_slow.get(cause, 0) + 1
            base = fast_lat.get((vm, f["vcpu"])) or fast_vm.get(vm)
            if base:
                extra = f["latency_ns"] - statistics.median(base)
                ref.cost[cause] = ref.cost.get(cause, 0.0) + extra
    return ref
