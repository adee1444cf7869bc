"""Generic numpy kernels for joining event tables by key and time.

Nothing here knows about memslots or MMIO: dense group ids for integer keys,
a per-key as-of join (what pandas.merge_asof does with ``by``, vectorised with
searchsorted), per-key medians and successors.  They are written for
10M-row tables: no per-row Python, no multi-column factorizing, no copies
where a view will do.
"""

from __future__ import annotations

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


def rows_of(df: pd.DataFrame, run: str) -> pd.DataFrame:
    """The rows of one run; the frame itself (no copy) when it holds only
    that run, which matters with 10M-row fault tables."""
    cats = df["run"].cat.categories
    if run not in cats:
        return df.iloc[:0]
    codes = df["run"].cat.codes.to_numpy()
    code = cats.get_loc(run)
    sel = codes == code
    return df if sel.all() else df[sel]


def nullable_int(values: np.ndarray, mask: np.ndarray) -> pd.arrays.IntegerArray:
    """Int64 with NA where ``mask`` (no per-element pandas assignment)."""
    return pd.arrays.IntegerArray(values.astype(np.int64, copy=False), mask)


def partition(keys: np.ndarray) -> list[tuple[int, np.ndarray | slice]]:
    """Row positions per key (small dense ids), computed once per table."""
    present = np.flatnonzero(np.bincount(keys)) if len(keys) else []
    if len(present) == 1:
        return [(int(present[0]), slice(None))]
    return [(int(k), np.flatnonzero(keys == k)) for k in present]


def asof_index(keys: np.ndarray, t: np.ndarray, ref_keys: np.ndarray, ref_t: np.ndarray,
               strict: bool = False,
               parts: list[tuple[int, np.ndarray | slice]] | None = None) -> np.ndarray:
    """For each (key, t): the row of ref with the same key and the greatest
    ref_t <= t (< t when ``strict``), or -1.  A per-key as-of join (what
    pandas.merge_asof does with ``by``), vectorised with searchsorted; each
    key's needles stay in time order, which keeps the searches cache-friendly.
    ``parts``: partition(keys), when the caller joins the same table often."""
    out = np.full(len(t), -1, dtype=np.int64)
    if not len(t) or not len(ref_t):
        return out
    keys, ref_keys = keys.astype(np.int64, copy=False), ref_keys.astype(np.int64, copy=False)
    order = np.lexsort((ref_t, ref_keys))
    rk, rt = ref_keys[order], ref_t[order]
    side = "left" if strict else "right"
    nkeys = int(max(rk.max(), keys.max())) + 1
    bounds = np.searchsorted(rk, np.arange(nkeys + 1))
    for k, sel in parts if parts is not None else partition(keys):
        lo, hi = bounds[k], bounds[k + 1]
        if lo == hi:
            continue
        pos = np.searchsorted(rt[lo:hi], t[sel], side=side) - 1
        out[sel] = np.where(pos >= 0, order[lo + np.maximum(pos, 0)], -1)
    return out


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


def next_by_key(keys: np.ndarray, t: np.ndarray,
                nkeys: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the next row of the same key in ``t`` order (-1 if none);
    per key id below ``nkeys``: its first row (-1 if none)."""
    nxt = np.full(len(keys), -1, np.int64)
    first = np.full(nkeys, -1, np.int64)
    if len(keys):
        order = np.lexsort((t, keys))
        same = keys[order][1:] == keys[order][:-1]
        nxt[order[:-1][same]] = order[1:][same]
        starts = np.r_[True, ~same]
        first[keys[order][starts]] = order[starts]
    return nxt, first
