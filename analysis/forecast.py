"""When the masked MMIO generation wraps: the zap-all forecast.

A memslot swap adds the number of address spaces to the generation; MMIO
SPTEs keep only its low ``mmio_gen_bits``, and when those wrap to 0 KVM zaps
every shadow page (kvm_mmu_invalidate_mmio_sptes).  From the recorded
generations (or, without them, the update rate times the swaps each change
type makes) this says how often that happens at the recorded update rate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recording.manifest import address_spaces, gen_bits

from .epochs import Correlation
from .frames import run_span_ns
from .joins import as_numpy

# Memslot swaps per change type: DELETE and MOVE swap twice (first to a set
# with the old slot marked invalid, then to the final set).
SWAPS = {"create": 1, "flags_only": 1, "delete": 2, "move": 2}


def wrap_forecast(corr: Correlation, bits: int | None = None) -> pd.DataFrame:
    """Per run and VM: update rate, generation units per second, swaps per
    wrap, and when the masked MMIO generation wraps (zap-all) next."""
    rec = corr.recording
    upd = corr.updates[corr.updates["ok"]]
    rows = []
    for (run, vm), g in upd.groupby(["run", "vm"], observed=True):
        m = rec.manifests[str(run)]
        w = bits or gen_bits(m)
        asn = address_spaces(m)
        span_s = run_span_ns(rec, str(run)) / 1e9
        period = 1 << w
        per_change = g["change"].value_counts()
        units_est = float(sum(SWAPS.get(str(c), 1) * int(k) for c, k in per_change.items())
                          * asn)
        gens = g["gen_after"].dropna()
        first = g["gen_before"].dropna()
        known = len(gens) > 0 and len(first) > 0 and int(gens.max()) > 0
        units = float(int(gens.max()) - int(first.min())) if known else units_est
        rate_upd = len(g) / span_s if span_s > 0 else float("nan")
        rate_units = units / span_s if span_s > 0 else float("nan")
        cur = int(gens.iloc[np.argmax(as_numpy(g.loc[gens.index, "end_ns"]))]) if known else None
        if cur is not None:
            pos = (cur & (period - 1)) & ~(asn - 1)
            remaining = period - pos
        else:
            remaining = None
        eta = remaining / rate_units if remaining is not None and rate_units > 0 else None
        rows.append({
            "run": str(run), "vm": int(vm), "gen_bits": w, "address_spaces": asn,
            "updates": len(g), "span_s": span_s, "updates_per_s": rate_upd,
            "gen_units_per_s": rate_units, "gen_from": "recorded" if known else "estimated",
            "current_gen": cur, "wrap_period_s": period / rate_units if rate_units > 0 else None,
            "next_zap_all_s": eta, "swaps_per_wrap": period // asn,
        })
    out = pd.DataFrame(rows)
    if len(out):
        # A generation is an integer, whether or not another run's is
        # unknown: a None among the rows would make the column float (16.0),
        # so a run's figures would depend on the runs beside it.
        out["current_gen"] = pd.array([r["current_gen"] for r in rows], dtype="Int64")
    return out


def forecast_of(corr: Correlation) -> pd.DataFrame:
    """wrap_forecast of a Correlation, computed once: each run's summary
    takes its rows from it, and a forecast of all runs per run made
    reducing R runs cost R x updates (issue #14)."""
    memo = corr.__dict__
    if "_wrap_forecast" not in memo:
        memo["_wrap_forecast"] = wrap_forecast(corr)
    return memo["_wrap_forecast"]
