"""The per-fault columns of a Correlation (epoch, class, cause, extra
latency), computed chunk by chunk.

A fault's columns depend on the fault alone plus a few small per-run
tables: its VM's updates and zap-alls (AsOf joins), the first time each
page was seen and the per-vCPU fast-hit medians.  So the tables are built
once and the 10M rows then go by in chunks of CHUNK rows, two threads side
by side (numpy releases the GIL in its loops), each writing its slice of
the final column arrays: the temporaries of a chunk stay in cache and take
megabytes, not the gigabyte that whole-table passes did.  The rules are
those of epochs.py (its docstring says why); tests/analysis_ref.py restates
them one fault at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .joins import AsOf, as_numpy, group_ids, group_medians, vm_keys

CLASSES = ("fast", "vcpu_cache", "stale", "first_touch", "during_update", "after_zap",
           "unknown")
FAST, VCPU_CACHE, STALE, FIRST_TOUCH, DURING, AFTER_ZAP, UNKNOWN = range(len(CLASSES))
CAUSED_CLASS = np.isin(np.arange(len(CLASSES)), [STALE, DURING, AFTER_ZAP])
CHUNK = 1 << 18
THREADS = 2
_NEVER = np.iinfo(np.int64).max


@dataclass
class FaultColumns:
    """One value per fault row; ``*_na`` are the nullable columns' masks."""

    klass: np.ndarray        # int8 codes into CLASSES
    opener: np.ndarray       # update row whose end opened the fault's epoch, -1
    since: np.ndarray        # ns since that end, -1
    epoch_gen: np.ndarray    # the opener's gen_after (0 where NA)
    epoch_gen_na: np.ndarray
    cause: np.ndarray        # update row charged with the fault, -1
    zap: np.ndarray          # last zap-all of the VM at or before it, -1
    baseline: np.ndarray     # median fast hit of its vCPU (else VM), NaN
    extra: np.ndarray        # latency - baseline


def _chunks(n: int, fn: Callable[[slice], None]) -> None:
    """fn over [0, n) in CHUNK slices, THREADS at a time; re-raises the
    first failure."""
    slices = [slice(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    if len(slices) <= 1:
        for s in slices:
            fn(s)
        return
    with ThreadPoolExecutor(THREADS) as pool:
        for _ in pool.map(fn, slices):
            pass


def _per_run_any(mask: np.ndarray, run: np.ndarray, nruns: int) -> np.ndarray:
    """Per run code: whether any of its rows is set."""
    if len(run) and run.min() == run.max():  # one run: no gather
        out = np.zeros(nruns, bool)
        out[int(run[0])] = bool(mask.any())
        return out
    return np.bincount(run[mask], minlength=nruns) > 0


class _Baseline:
    """Median fast-hit latency per (run, VM, vCPU), else per (run, VM)."""

    def __init__(self, fk: np.ndarray, vcpu: np.ndarray, fast: np.ndarray,
                 lat: np.ndarray) -> None:
        self.fk, self.vcpu, self.fast, self.lat = fk, vcpu, fast, lat
        self.v0 = int(vcpu.min()) if len(vcpu) else 0
        self.nv = int(vcpu.max()) - self.v0 + 1 if len(vcpu) else 1
        self.any = bool(fast.any())
        self.by_vcpu = self._vcpu_table() if self.any else None

    def _vcpu_key(self, s: slice) -> np.ndarray:
        return self.fk[s] * self.nv + (self.vcpu[s] - self.v0)

    def _table(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return group_medians(key[self.fast], self.lat[self.fast])

    def _vcpu_table(self) -> tuple[np.ndarray, np.ndarray]:
        """group_medians of the fast hits by (run, VM, vCPU), its sort key
        key << 40 | latency built chunk by chunk into one array: no 10M-row
        key, masked copies or sorted copy next to it."""
        nk = (int(self.fk.max()) + 1) * self.nv
        lat_ok = self.lat.min() >= 0 and self.lat.max() < 1 << 40
        if nk >= 2**23 or not lat_ok:
            return self._table(self._vcpu_key(slice(None)))
        comb = np.empty(int(self.fast.sum()), np.int64)
        counts = np.zeros(nk, np.int64)
        at = 0
        for a in range(0, len(self.fk), CHUNK):
            s = slice(a, a + CHUNK)
            sel = self.fast[s]
            key = self._vcpu_key(s)[sel]
            counts += np.bincount(key, minlength=nk)
            comb[at:at + len(key)] = (key << 40) | self.lat[s][sel]
            at += len(key)
        comb.sort()
        comb &= (1 << 40) - 1  # the latencies, in order within each group
        ids = np.flatnonzero(counts)
        n = counts[ids]
        starts = np.concatenate([[0], np.cumsum(n)[:-1]])
        # as group_medians: the middle one or two of each group
        return ids, (comb[starts + (n - 1) // 2] + comb[starts + n // 2]) / 2

    @staticmethod
    def _find(table: tuple[np.ndarray, np.ndarray], key: np.ndarray) -> np.ndarray:
        ids, meds = table
        if len(key) and key.max() < 2**24:  # dense ids: a lookup table, one gather
            dense = np.full(int(max(key.max(), ids.max())) + 1, np.nan)
            dense[ids] = meds
            return dense[key]
        pos = np.minimum(np.searchsorted(ids, key), len(ids) - 1)
        return np.where(ids[pos] == key, meds[pos], np.nan)

    def __call__(self, s: slice) -> np.ndarray:
        if self.by_vcpu is None:
            return np.full(len(self.fk[s]), np.nan)
        return self._find(self.by_vcpu, self._vcpu_key(s))

    def by_vm(self, rows: np.ndarray) -> np.ndarray:
        """The (run, VM) medians, for rows whose vCPU has no fast hit."""
        return self._find(self._table(self.fk), self.fk[rows])


class _FirstSeen:
    """When each (run, VM, page) was first faulted on: a dense table when
    the gfns span little, else hashed page ids."""

    def __init__(self, fk: np.ndarray, gfn: np.ndarray, t: np.ndarray) -> None:
        self.fk, self.gfn = fk, gfn
        lo, hi = (int(gfn.min()), int(gfn.max())) if len(gfn) else (0, 0)
        self.g0, span = lo, hi - lo + 1
        nk = int(fk.max()) + 1 if len(fk) else 1
        self.codes = None
        if hi < 2**62 and nk * span <= 1 << 24:
            self.span = span
            self.first = np.full(nk * span, _NEVER)
            for a in range(0, len(t), CHUNK):  # no 10M-row page ids
                s = slice(a, a + CHUNK)
                np.minimum.at(self.first, self._dense(s), t[s])
            return
        gi = gfn.astype(np.int64)  # two's complement: distinct stays distinct
        page = (fk << 40) | gi if hi < (1 << 40) and nk < (1 << 22) else group_ids(fk, gi)[0]
        self.codes, uniq = pd.factorize(page)
        self.first = np.full(len(uniq), _NEVER)
        np.minimum.at(self.first, self.codes, t)

    def _dense(self, s: slice | np.ndarray) -> np.ndarray:
        return self.fk[s] * self.span + (self.gfn[s].astype(np.int64) - self.g0)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.first[self.codes[rows] if self.codes is not None else self._dense(rows)]


def fault_columns(f: pd.DataFrame, u: pd.DataFrame, zap: pd.DataFrame,
                  nruns: int) -> FaultColumns:
    """The per-fault columns of ``f`` (finished faults) against ``u`` (the
    completed updates) and ``zap`` (zap-alls); see epochs.correlate."""
    n = len(f)
    fk, uk, zk = vm_keys(f, u, zap)
    nkeys = int(max(fk.max() if n else 0, uk.max() if len(uk) else 0,
                    zk.max() if len(zk) else 0)) + 1
    t = as_numpy(f["exit_ns"])
    fast = as_numpy(f["fast_hit"], bool, False)
    stale = as_numpy(f["stale"], bool, False)
    remarked = as_numpy(f["remarked"], bool, False)
    lat = as_numpy(f["latency_ns"])
    run = as_numpy(f["run"])

    # The small tables.  The per-update ones carry a pad at -1: a fault
    # without an opener (j = -1) reads "none" from them without a where().
    u_begin = np.r_[as_numpy(u["begin_ns"]), _NEVER]
    u_end = np.r_[as_numpy(u["end_ns"]), 0]
    uidx = np.r_[u.index.to_numpy(), -1]
    # The epoch's generation as the float it was read as (so that a value
    # past 2**53 rounds as it always did), NA where unknown.
    gen_after = np.r_[u["gen_after"].to_numpy(dtype=np.float64, na_value=np.nan)
                      if len(u) else np.zeros(0), np.nan]
    gen_na = np.isnan(gen_after)
    gen_int = np.where(gen_na, 0, gen_after).astype(np.int64)
    zap_ns = as_numpy(zap["ns"])
    epoch = AsOf(uk, u_end[:-1], nkeys)
    zapped = AsOf(zk, zap_ns, nkeys)
    evidence_runs = _per_run_any(fast | stale | remarked, run, nruns)
    one_run = len(run) > 0 and run.min() == run.max()

    def tables() -> tuple[_Baseline, _FirstSeen | None]:
        # Two global passes, one per thread: medians sort the fast hits,
        # first sightings scatter every fault's time into its page.
        with ThreadPoolExecutor(2) as pool:
            base = pool.submit(_Baseline, fk, as_numpy(f["vcpu"], np.int64, -1), fast, lat)
            seen = (pool.submit(_FirstSeen, fk, as_numpy(f["gfn"], np.uint64, 0), t)
                    if len(zap_ns) and (remarked & ~stale).any() else None)
            return base.result(), seen.result() if seen is not None else None

    baseline, first_seen = tables() if n else (None, None)
    out = FaultColumns(
        klass=np.empty(n, np.int8), opener=np.empty(n, np.int64), since=np.empty(n, np.int64),
        epoch_gen=np.empty(n, np.int64), epoch_gen_na=np.empty(n, bool),
        cause=np.empty(n, np.int64), zap=np.empty(n, np.int64),
        baseline=np.empty(n, np.float64), extra=np.empty(n, np.float64))

    def rows(s: slice) -> None:
        k, ts = fk[s], t[s]
        fa, st, rm = fast[s], stale[s], remarked[s]
        # Epoch opener: the last update ended at or before the fault.  An
        # update in progress: windows of one VM do not overlap, so it can
        # only be the VM's next update after the opener.
        j, q = epoch(k, ts)
        opener = uidx[j]
        out.opener[s] = opener
        out.since[s] = np.where(j >= 0, ts - u_end[j], -1)
        np.take(gen_na, j, out=out.epoch_gen_na[s])
        np.take(gen_int, j, out=out.epoch_gen[s])
        inprog = u_begin[q] <= ts
        zj = zapped(k, ts, want_next=False)[0]
        out.zap[s] = zj
        # Re-marked without a stale check, on a page seen before its VM's
        # last zap-all, outside an update.
        after_zap = np.zeros(len(ts), bool)
        if first_seen is not None:
            cand = np.flatnonzero(rm & ~st & (zj >= 0) & ~inprog)
            rows_ = cand + (s.start or 0)
            after_zap[cand] = first_seen[rows_] < zap_ns[zj[cand]]
        # No MMIO SPTE evidence (no check/mark/fast-path event for the
        # fault, e.g. kvm.mmio_caching=N): unclassified, whatever its timing.
        if one_run:
            kl = np.full(len(ts), VCPU_CACHE if evidence_runs[run[s.start]] else UNKNOWN,
                         np.int8)
        else:
            kl = np.where(evidence_runs[run[s]], VCPU_CACHE, UNKNOWN).astype(np.int8)
        during = inprog & (st | rm) & ~fa
        for mask, code in ((rm, FIRST_TOUCH), (after_zap, AFTER_ZAP), (st, STALE),
                           (during, DURING), (fa, FAST)):  # later rules win
            np.copyto(kl, code, where=mask)
        out.klass[s] = kl
        # Charged: stale, during an update (to that update), after a zap-all
        # (to the epoch's update); a stale fault before any update: nobody.
        cause = out.cause[s]
        cause[:] = opener
        d = np.flatnonzero(during)
        cause[d] = uidx[q[d]]
        np.copyto(cause, -1, where=~CAUSED_CLASS[kl])
        b = baseline(s)
        out.baseline[s] = b
        out.extra[s] = lat[s] - b

    _chunks(n, rows)
    if n and baseline is not None and baseline.any:
        # A vCPU without a single fast hit: its VM's median instead.
        missing = np.flatnonzero(np.isnan(out.baseline))
        if len(missing):
            out.baseline[missing] = baseline.by_vm(missing)
            out.extra[missing] = lat[missing] - out.baseline[missing]
    return out
