"""Generic numpy kernels for joining event tables by key and time.

Nothing here knows about memslots or MMIO: dense group ids for integer keys,
a per-key as-of join (what pandas.merge_asof does with ``by``: a merge when
the needles are in time order, else searchsorted per key) and per-key
medians.  They are written for
10M-row tables: no per-row Python, no multi-column factorizing, no copies
where a view will do.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import pandas as pd


def as_numpy(s: pd.Series, dtype: Any = np.int64, na: Any = -1) -> np.ndarray:
    """A column as a plain numpy array (nulls -> ``na``)."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.codes.to_numpy()
    return s.to_numpy(dtype=dtype, na_value=na)


def group_ids(*keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense group ids for rows keyed by several integer columns (hashing,
    O(n): np.unique(axis=0) sorts and is far slower on 10M rows)."""
    n = len(keys[0])
    gid = np.zeros(n, np.int64)
    ng = 1
    for k in keys:
        codes, uniq = pd.factorize(k)
        gid, u = pd.factorize(gid * len(uniq) + codes)
        ng = len(u)
    return gid.astype(np.int64, copy=False), (ng if n else 0)


def vm_keys(*frames: pd.DataFrame) -> list[np.ndarray]:
    """Dense (run, vm) ids shared by several frames: run code * #VMs + the
    VM's rank.  One hash pass per frame (factorize), then a gather; no
    multi-column factorizing of 10M-row keys."""
    per = [pd.factorize(as_numpy(df["vm"], np.uint64, 0)) for df in frames]
    vms = np.unique(np.concatenate([np.asarray(u, np.uint64) for _, u in per])) \
        if frames else np.zeros(0, np.uint64)
    nv = max(len(vms), 1)
    out = []
    for df, (codes, uniq) in zip(frames, per, strict=True):
        idx = np.searchsorted(vms, np.asarray(uniq, np.uint64)).astype(np.int64)[codes]
        run = as_numpy(df["run"])
        if len(run) and run.min() == run.max():  # one run: no per-row arithmetic
            out.append(idx + int(run[0]) * nv if run[0] else idx)
        else:
            out.append(run.astype(np.int64) * nv + idx)
    return out


# Per frame, where each run's rows are, found in one pass over its run
# column and kept while the frame and that column live: the summary and the
# comparison look up each run's rows in the same 10M-row tables, and a pass
# per lookup made reducing R runs cost R x rows (issue #14).
_RUN_ROWS: dict[int, tuple[weakref.ref[Any], list[slice | np.ndarray]]] = {}


def _run_rows(df: pd.DataFrame) -> list[slice | np.ndarray]:
    """Per run category: its rows' positions in ``df`` (a slice when they
    are contiguous, as frames.load leaves them; else in row order)."""
    cat = df["run"].array
    hit = _RUN_ROWS.get(id(df))
    if hit is not None and hit[0]() is cat:
        return hit[1]
    codes = np.asarray(cat.codes)
    ncat = len(cat.categories)
    counts = np.bincount(codes + 1, minlength=ncat + 1)[1:]  # code -1 (null): no run
    # The stretches of equal codes: a run in one stretch is a slice.
    edges = np.r_[0, np.flatnonzero(codes[1:] != codes[:-1]) + 1] if len(codes) else \
        np.zeros(0, np.int64)
    edges = edges[codes[edges] >= 0]
    stretches = np.bincount(codes[edges], minlength=ncat)
    starts = np.zeros(ncat, np.int64)
    starts[codes[edges]] = edges  # only read for runs in one stretch
    rows: list[slice | np.ndarray] = []
    order = first = None
    for k in range(ncat):
        a, n = int(starts[k]), int(counts[k])
        if n == 0:
            rows.append(slice(0, 0))
        elif stretches[k] == 1:
            rows.append(slice(a, a + n))
        else:
            if order is None:  # a run in pieces: group the rows by one stable sort
                order = np.argsort(codes, kind="stable")
                first = np.searchsorted(codes[order], np.arange(ncat))
            rows.append(order[first[k]:first[k] + n])
    if id(df) not in _RUN_ROWS:
        weakref.finalize(df, _RUN_ROWS.pop, id(df), None)
    _RUN_ROWS[id(df)] = (weakref.ref(cat), rows)
    return rows


def rows_of(df: pd.DataFrame, run: str) -> pd.DataFrame:
    """The rows of one run, in frame order; the frame itself (no copy) when
    it holds only that run, a view when its rows are contiguous."""
    cats = df["run"].cat.categories
    if run not in cats:
        return df.iloc[:0]
    rows = _run_rows(df)[cats.get_loc(run)]
    if isinstance(rows, slice):
        return df if rows.stop - rows.start == len(df) else df.iloc[rows]
    return df.take(rows)


def nullable_int(values: np.ndarray, mask: np.ndarray) -> pd.arrays.IntegerArray:
    """Int64 with NA where ``mask`` (no per-element pandas assignment)."""
    return pd.arrays.IntegerArray(values.astype(np.int64, copy=False), mask)


# Per-key lookup tables (AsOf) up to this many cells: 4M int64 = 32 MB, so
# that a run with a few VMs and millions of updates still merges.
TABLE_CELLS = 1 << 22
SORTED_BLOCKS = 16  # needles in at most this many time-ordered stretches merge


def sorted_blocks(t: np.ndarray, limit: int = SORTED_BLOCKS) -> list[tuple[int, int]] | None:
    """Bounds of the maximal non-decreasing stretches of ``t`` (a recording's
    events are in time order, several runs one after another), or None when
    there are more than ``limit``."""
    if len(t) < 2:
        return [(0, len(t))]
    breaks = np.flatnonzero(t[1:] < t[:-1])
    if len(breaks) >= limit:
        return None
    edges = [0, *(int(b) + 1 for b in breaks), len(t)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class AsOf:
    """A per-key as-of join (what pandas.merge_asof does with ``by``),
    prepared once on the reference side and applied to needles chunk by
    chunk: per needle (key, t), the reference row with the same key and the
    greatest ref_t <= t (< t when ``strict``), and the key's next reference
    after it (its first when there is none), or -1.  Ties between equal
    ref_t go to the later row.

    Needles in time order (a recording's events are) merge: one searchsorted
    of the references into the needles gives each needle the number of
    references before it, and a table per key (the key's last reference
    among the first g by time, and its next one) two gathers, no binary
    search per needle.  Unordered needles, or too many keys x references
    for the tables, search per key."""

    def __init__(self, ref_keys: np.ndarray, ref_t: np.ndarray, nkeys: int,
                 strict: bool = False) -> None:
        ref_keys = np.asarray(ref_keys).astype(np.int64, copy=False)
        ref_t = np.asarray(ref_t).astype(np.int64, copy=False)
        self.m, self.nkeys, self.strict = len(ref_t), max(nkeys, 1), strict
        self.side = "left" if strict else "right"
        # By key, then time, then row: the per-key search.
        self.order = np.lexsort((ref_t, ref_keys))
        self.rt = ref_t[self.order]
        self.bounds = np.searchsorted(ref_keys[self.order], np.arange(self.nkeys + 1))
        # By time, then row: the merge.
        by_time = np.argsort(ref_t, kind="stable")
        self.t_sorted = ref_t[by_time]
        self.last = self.next = None
        if self.nkeys * (self.m + 1) <= TABLE_CELLS:
            self.last, self.next = self._tables(ref_keys[by_time], by_time)

    def _tables(self, keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """last[k, c]: the row of key k's last reference among the first c by
        time; next[k, c]: its first reference from the c-th on (-1: none)."""
        m = self.m
        # Flat, so that a needle's cell is one take(); int32 indices fit
        # (TABLE_CELLS) and halve the traffic of the 10M-row gathers.
        last = np.full((self.nkeys, m + 1), -1, np.int64)
        nxt = np.full((self.nkeys, m + 1), -1, np.int64)
        pos = np.arange(m)
        rows_pad = np.r_[rows, -1]  # position m (none) -> -1
        for k in np.unique(keys) if m else []:
            mine = keys == k
            last[k, 1:] = rows_pad[np.maximum.accumulate(np.where(mine, pos, -1))]
            b = np.minimum.accumulate(np.where(mine, pos, m)[::-1])[::-1]
            nxt[k, :m] = rows_pad[b]
        return last.ravel(), nxt.ravel()

    def __call__(self, keys: np.ndarray, t: np.ndarray,
                 want_next: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(reference row, the key's next reference row) per needle, -1 none
        (the second all -1 unless ``want_next``)."""
        keys = np.asarray(keys)
        j = np.full(len(t), -1, np.int64)
        q = np.full(len(t), -1, np.int64)
        if not len(t) or not self.m:
            return j, q
        inside = keys < self.nkeys  # keys without references stay -1
        if not inside.all():
            sel = np.flatnonzero(inside)
            j[sel], q[sel] = self(keys[sel], t[sel], want_next)
            return j, q
        blocks = sorted_blocks(t) if self.last is not None else None
        if blocks is None:
            self._search(keys.astype(np.int64, copy=False), t, j, q)
            return j, q
        for lo, hi in blocks:
            cell = self._cells(keys[lo:hi], t[lo:hi])
            np.take(self.last, cell, out=j[lo:hi])
            if want_next:
                np.take(self.next, cell, out=q[lo:hi])
        return j, q

    def _cells(self, keys: np.ndarray, t: np.ndarray) -> np.ndarray:
        """For needles in time order: their table cells, key * (m + 1) plus
        how many references (of any key) each one is at or after (strictly
        after when ``strict``)."""
        lo, hi = (int(np.searchsorted(self.t_sorted, v, self.side)) for v in (t[0], t[-1]))
        # Where each of the references in between first counts.
        p = np.searchsorted(t, self.t_sorted[lo:hi], "right" if self.strict else "left")
        cell = np.repeat(np.arange(lo, hi + 1, dtype=np.int32), np.diff(np.r_[0, p, len(t)]))
        cell += keys.astype(np.int32) * np.int32(self.m + 1)
        return cell

    def _search(self, keys: np.ndarray, t: np.ndarray, j: np.ndarray, q: np.ndarray) -> None:
        present = np.flatnonzero(np.bincount(keys, minlength=self.nkeys))
        if len(present) == 1:
            groups: list[tuple[int, Any]] = [(int(present[0]), slice(None))]
        elif len(present) <= 8:  # a few VMs: one comparison pass each
            groups = [(int(k), np.flatnonzero(keys == k)) for k in present]
        else:  # many: group the rows by one stable sort
            perm = np.argsort(keys, kind="stable")
            cuts = np.searchsorted(keys[perm], present)
            groups = [(int(k), perm[a:b]) for k, a, b in
                      zip(present, cuts, np.r_[cuts[1:], len(perm)], strict=True)]
        for k, sel in groups:
            lo, hi = self.bounds[k], self.bounds[k + 1]
            if lo == hi:
                continue
            pos = np.searchsorted(self.rt[lo:hi], t[sel], self.side) - 1
            j[sel] = np.where(pos >= 0, self.order[lo + np.maximum(pos, 0)], -1)
            q[sel] = np.where(pos + 1 < hi - lo, self.order[np.minimum(lo + pos + 1, hi - 1)],
                              -1)


def asof_index(keys: np.ndarray, t: np.ndarray, ref_keys: np.ndarray, ref_t: np.ndarray,
               strict: bool = False) -> np.ndarray:
    """For each (key, t): the row of ref with the same key and the greatest
    ref_t <= t (< t when ``strict``), or -1 (see AsOf)."""
    if not len(t) or not len(ref_t):
        return np.full(len(t), -1, dtype=np.int64)
    keys = np.asarray(keys).astype(np.int64, copy=False)
    nkeys = int(max(np.max(ref_keys), keys.max())) + 1
    return AsOf(ref_keys, ref_t, nkeys, strict)(keys, t)[0]


def group_medians(key: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median of ``val`` (int ns) per ``key`` (small ints): one sort of
    key << 40 | val puts every group in order, the medians are its middles."""
    if len(val) and key.max() < 2**23 and val.min() >= 0 and val.max() < 2**40:
        comb = np.sort((key << 40) | val)
        counts = np.bincount(key)
        ids = np.flatnonzero(counts)
        n = counts[ids]
        starts = np.concatenate([[0], np.cumsum(n)[:-1]])
        low = comb & ((1 << 40) - 1)
        return ids, (low[starts + (n - 1) // 2] + low[starts + n // 2]) / 2
    med = pd.Series(val).groupby(key).median()
    return med.index.to_numpy(), med.to_numpy()
