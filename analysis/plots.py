"""matplotlib figures of a correlated run (Figure objects, no pyplot state,
so they work headless, in reports and inline in notebooks)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from recording import manifest

from .epochs import CLASSES, Correlation, class_codes
from .fault_columns import CHUNK, THREADS
from .joins import rows_of
from .latency import CDF_POINTS, cdf_points
from .summary import latency_figures_of

COLORS = {"fast": "#4c72b0", "vcpu_cache": "#64b5cd", "stale": "#dd8452", "first_touch": "#55a868",
          "during_update": "#c44e52", "after_zap": "#8172b3", "unknown": "#937860"}
CHANGE_COLORS = {"create": "#55a868", "delete": "#c44e52", "move": "#8172b3",
                 "flags_only": "#dd8452", "unknown": "#937860"}
SCATTER_MAX = 30_000  # above this many faults the latency panel is a density map
SHADE_MAX = 3_000     # above this many updates their windows become a rug
CDF_SAMPLE = 500_000  # a comparison's CDF curves are drawn from a uniform sample this large


def _sample(x: np.ndarray, n: int = CDF_SAMPLE) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.random.default_rng(0).choice(len(x), n, replace=False)]


def _cdf(ax, x: np.ndarray, **kw) -> None:
    """Empirical CDF of x: exact steps when small, else CDF_POINTS quantiles
    of a uniform sample (drawing a million vertices costs seconds, shows
    nothing more)."""
    v = np.sort(_sample(x))
    ax.plot(*cdf_points(v), drawstyle="steps-post" if len(v) <= CDF_POINTS else "default",
            **kw)


def _t0(corr: Correlation, run: str) -> int:
    """Time zero of a run: its first event (a tracer's start can precede the
    workload by its whole setup), else the manifest's start."""
    cands = []
    for df, col in ((corr.updates, "begin_ns"), (corr.faults, "exit_ns"),
                    (corr.recording.mmio_access, "ns"), (corr.recording.workload, "begin_ns")):
        v = rows_of(df, run)[col]
        if len(v):
            cands.append(int(v.min()))
    start = manifest.start_ns(corr.recording.manifests[run])
    return min(cands) if cands else int(start or 0)


def _span(corr: Correlation, run: str, t0: int) -> float:
    """Seconds from t0 to the run's last event (at least 1 us)."""
    last = t0
    for df, col in ((corr.updates, "end_ns"), (corr.faults, "exit_ns"),
                    (corr.recording.mmio_access, "ns")):
        v = rows_of(df, run)[col]
        if len(v):
            last = max(last, int(v.max()))
    return max((last - t0) / 1e9, 1e-6)


def _sec(ns: np.ndarray, t0: int) -> np.ndarray:
    return (np.asarray(ns, dtype=np.int64) - t0) / 1e9


def _us_floor(lat_ns: np.ndarray) -> np.ndarray:
    """Latency in us for a log axis (at least 1 ns)."""
    return np.maximum(lat_ns / 1000, 1e-3)


def _density(ns: np.ndarray, lat_ns: np.ndarray, t0: int, nx: int,
             ny: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Faults per (time, log latency) bin, nx x ny, and the grid's x0, x1,
    y0, y1 (s, log10 us).  Chunk by chunk: each fault's bin by the same
    formula as on whole columns, without their ten 10M-row temporaries;
    the edges come from the extreme rows (the transforms are monotonic)."""
    lo, hi = int(ns.argmin()), int(ns.argmax())
    x0, x1 = _sec(ns[lo:lo + 1], t0)[0], _sec(ns[hi:hi + 1], t0)[0] + 1e-9
    ly = np.log10(_us_floor(lat_ns[[int(lat_ns.argmin()), int(lat_ns.argmax())]]))
    y0, y1 = ly[0], ly[1] + 1e-9

    def counts(a: int) -> np.ndarray:
        x = _sec(ns[a:a + CHUNK], t0)
        ly = np.log10(_us_floor(lat_ns[a:a + CHUNK]))
        ix = ((x - x0) / (x1 - x0) * nx).astype(np.int64)
        iy = ((ly - y0) / (y1 - y0) * ny).astype(np.int64)
        return np.bincount(ix * ny + iy, minlength=nx * ny)

    with ThreadPoolExecutor(THREADS) as pool:  # numpy's loops release the GIL
        h = sum(pool.map(counts, range(0, len(ns), CHUNK)), np.zeros(nx * ny, np.int64))
    return h.reshape(nx, ny).astype(float), (x0, x1, y0, y1)


# Titles at the top edge as placed by default, without matplotlib working
# out the tick labels' extent on every draw to see whether they would
# collide (a quarter of a figure's drawing; nothing is drawn above these
# axes).  Not for the timeline, whose stacked axes do need it.
_FIXED_TITLES = rc_context({"axes.titley": 1.0})

_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")
_MINOR = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")


def _log_y(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PLAIN)
    ax.yaxis.set_minor_formatter(_MINOR)


def _log_x(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_PLAIN)
    ax.xaxis.set_minor_formatter(_MINOR)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,
            fontsize=9, color="#555555", wrap=True)


def _rug(ax, x: np.ndarray, color: str, label: str, frac: float) -> None:
    """Event times along the bottom ``frac`` of an axis: lines when few, a
    per-bin count (one polygon, cheap to draw) when many."""
    ylo, yhi = ax.get_ylim()
    if len(x) <= SHADE_MAX:
        ax.vlines(x, ylo, ylo + frac * (yhi - ylo), color=color, lw=0.6, alpha=0.5,
                  label=label)
    else:
        counts, edges = np.histogram(x, bins=400)
        top = ylo + counts / max(counts.max(), 1) * frac * (yhi - ylo)
        ax.fill_between(edges[:-1], ylo, top, step="post", color=color, alpha=0.5, lw=0,
                        label=label)
    ax.set_ylim(ylo, yhi)


def timeline(corr: Correlation, run: str) -> Figure:
    """Generation steps (with in-progress windows), workload actions and MMIO
    latency on one time axis."""
    rec = corr.recording
    t0 = _t0(corr, run)
    # Fixed margins: constrained layout costs more than the drawing itself.
    fig = Figure(figsize=(11, 7))
    fig.subplots_adjust(left=0.12, right=0.9, top=0.94, bottom=0.08, hspace=0.12)
    ax_gen, ax_wl, ax_lat = fig.subplots(3, 1, sharex=True,
                                         gridspec_kw={"height_ratios": [2.2, 0.8, 3]})
    fig.suptitle(f"{run}: memslot generations, workload and MMIO latency")

    span = _span(corr, run, t0)
    tl = rows_of(corr.timeline, run)
    upd = rows_of(corr.updates, run)
    upd = upd[upd["ok"]]
    vms = list(pd.unique(tl["vm"])) if len(tl) else []
    use_gen = len(tl) and bool(tl["gen"].notna().all()) and bool((tl["gen"] > 0).any())
    for i, vm in enumerate(vms[:6]):
        s = tl[tl["vm"] == vm]
        x = _sec(s["ns"].to_numpy(), t0)
        y = (s["gen"].to_numpy(dtype=np.float64) if use_gen
             else s["epoch"].to_numpy(dtype=np.float64))
        ax_gen.step(x, y, where="post", lw=1.2, label=f"VM {int(vm):#x}"[-14:] if
                    len(vms) > 1 else None, color=f"C{i}")
        z = s[s["zap_all"].to_numpy(dtype=bool)]
        if len(z):
            ax_gen.plot(_sec(z["ns"].to_numpy(), t0), z["gen"].to_numpy(dtype=np.float64),
                        "x", color="black", ms=7, label="zap-all (wrap)")
    if len(upd):
        b = _sec(upd["begin_ns"].to_numpy(), t0)
        # Windows of microseconds stay visible: at least 0.2% of the axis.
        w = np.maximum(_sec(upd["end_ns"].to_numpy(), t0) - b, 0.002 * span)
        ylo, yhi = ax_gen.get_ylim() if len(vms) else (0, 1)
        if len(upd) <= SHADE_MAX:
            ax_gen.broken_barh(list(zip(b, w, strict=True)), (ylo, yhi - ylo),
                               facecolors="#c44e52", alpha=0.25, label="update in progress")
        else:  # too many windows to shade: how many updates start per time bin
            _rug(ax_gen, b, "#c44e52", f"updates per bin ({len(upd):,})", 0.15)
        ax_gen.set_ylim(ylo, yhi)
    zaps = rows_of(corr.zaps, run)
    if len(zaps):
        _rug(ax_gen, _sec(zaps["ns"].to_numpy(), t0), "#8172b3",
             f"zap-all ({len(zaps):,})", 1.0 if len(zaps) <= SHADE_MAX else 0.1)
    ax_gen.set_ylabel("generation" if use_gen else "updates done")
    if not len(vms):
        _note(ax_gen, "no memslot updates recorded")
    else:
        ax_gen.legend(loc="upper left", fontsize=8, ncol=3)

    wl = rows_of(rec.workload, run)
    if len(wl):
        acts = sorted(set(wl["action"].astype(str)))
        for k, a in enumerate(acts):
            s = wl[wl["action"].astype(str) == a]
            b = _sec(s["begin_ns"].to_numpy(), t0)
            w = np.maximum(_sec(s["end_ns"].to_numpy(np.int64, na_value=0), t0) - b,
                           0.002 * span)
            ax_wl.broken_barh(list(zip(b, w, strict=True)), (k - 0.4, 0.8),
                              facecolors=f"C{k % 10}")
        ax_wl.set_yticks(range(len(acts)), acts, fontsize=8)
    else:
        _note(ax_wl, "no workload table")
        ax_wl.set_yticks([])
    ax_wl.set_title("workload actions", fontsize=9, loc="left", pad=2)

    f = rows_of(corr.faults, run)
    if len(f):
        ns, lat = f["exit_ns"].to_numpy(), f["latency_ns"].to_numpy(np.float64)
        kl = class_codes(f)
        if len(f) > SCATTER_MAX:
            # Density: counts on a 400 x 120 grid (log latency), by bincount.
            nx, ny = 400, 120
            h, (x0, x1, y0, y1) = _density(ns, lat, t0, nx, ny)
            h[h == 0] = np.nan
            m = ax_lat.pcolormesh(np.linspace(x0, x1, nx + 1), np.logspace(y0, y1, ny + 1),
                                  h.T, norm=LogNorm(vmin=1), cmap="viridis", rasterized=True)
            fig.colorbar(m, cax=ax_lat.inset_axes((1.01, 0, 0.015, 1)),
                         label="faults per bin")
            slow = np.flatnonzero(kl != CLASSES.index("fast"))  # everything but the bulk
            if len(slow) > 5000:
                slow = np.random.default_rng(0).choice(slow, 5000, replace=False)
            for i, c in enumerate(CLASSES[1:], start=1):
                sel = slow[kl[slow] == i]
                if len(sel):
                    ax_lat.scatter(_sec(ns[sel], t0), _us_floor(lat[sel]), s=3,
                                   color=COLORS[c], alpha=0.6, label=f"{c} (sample)")
        else:
            for i, c in enumerate(CLASSES):
                sel = kl == i
                if sel.any():
                    bulk = c in ("fast", "vcpu_cache", "unknown")
                    # The few slow faults go on top, larger, or the bulk hides them.
                    ax_lat.scatter(_sec(ns[sel], t0), _us_floor(lat[sel]), s=3 if bulk else 16,
                                   color=COLORS[c],
                                   label=f"{c} ({sel.sum()})", alpha=0.45 if bulk else 0.9,
                                   lw=0, zorder=2 if bulk else 3)
        _log_y(ax_lat)
        ax_lat.set_ylabel("MMIO exit latency (us)")
        ax_lat.legend(loc="upper right", fontsize=8, markerscale=2, ncol=3)
    else:
        acc = rows_of(rec.mmio_access, run)
        if len(acc):
            x = _sec(acc["ns"].to_numpy(), t0)
            counts, edges = np.histogram(x, bins=min(400, max(10, len(acc) // 20)))
            width = np.diff(edges)
            ax_lat.step(edges[:-1], counts / width, where="post", color="#4c72b0")
            ax_lat.set_ylabel("kvm_mmio accesses/s")
            ax_lat.text(0.01, 0.95, "no MMIO fault events: access rate shown instead",
                        transform=ax_lat.transAxes, fontsize=8, va="top", color="#555555")
        else:
            _note(ax_lat, "no MMIO events recorded")
    ax_lat.set_xlabel("time since the first event (s)")
    return fig


@_FIXED_TITLES
def latency_cdf(corr: Correlation, run: str) -> Figure:
    """MMIO exit latency CDF per fault class (log x)."""
    fig = Figure(figsize=(7, 4.5))
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)
    ax = fig.subplots()
    f = rows_of(corr.faults, run)
    kl = class_codes(f)
    figs = latency_figures_of(corr, run)
    counts = np.bincount(kl, minlength=len(CLASSES))
    for i, c in enumerate(CLASSES):
        if not counts[i]:
            continue
        label = f"{c} (n={counts[i]:,})"
        if figs is not None:  # every fault's latency, exact points
            x, y = figs.cdf[i]
            ax.plot(x / 1000, y, color=COLORS[c], label=label, lw=1.6,
                    drawstyle="steps-post" if counts[i] <= CDF_POINTS else "default")
        else:
            _cdf(ax, f["latency_ns"].to_numpy(np.float64)[kl == i] / 1000, color=COLORS[c],
                 label=label, lw=1.6)
    if not len(f):
        _note(ax, "no MMIO fault events: no latency to plot")
    else:
        _log_x(ax)
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("MMIO exit latency (us)")
    ax.set_ylabel("fraction of faults")
    ax.set_title(f"{run}: MMIO latency by fault class")
    ax.grid(alpha=0.3)
    return fig


@_FIXED_TITLES
def update_cost(corr: Correlation, run: str) -> Figure:
    """Per-update extra MMIO latency by change type, next to the updates'
    own duration (the ioctl), which every backend records."""
    fig = Figure(figsize=(10, 4.5))
    fig.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=0.14, wspace=0.25)
    ax_c, ax_d = fig.subplots(1, 2)
    u = rows_of(corr.updates, run)
    u = u[u["ok"]]
    changes = [c for c in CHANGE_COLORS if (u["change"] == c).any()]
    rng = np.random.default_rng(0)
    for ax, col, label in ((ax_c, "cost_ns", "extra MMIO latency per update (us)"),
                           (ax_d, "duration_ns", "update duration (us)")):
        data, names = [], []
        for c in changes:
            v = u.loc[u["change"] == c, col].to_numpy(np.float64, na_value=np.nan) / 1000
            v = v[~np.isnan(v)]
            if len(v):
                data.append(v)
                names.append(f"{c}\n(n={len(v)})")
        if not data:
            _note(ax, "no MMIO fault events:\nper-update cost unavailable"
                  if col == "cost_ns" else "no memslot updates")
        else:
            ax.boxplot(data, showfliers=False, widths=0.5)
            ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
            for i, v in enumerate(data, start=1):
                pts = v if len(v) <= 1500 else rng.choice(v, 1500, replace=False)
                few = len(pts) < 50
                ax.scatter(i + rng.uniform(-0.15, 0.15, len(pts)), pts, s=30 if few else 5,
                           alpha=0.9 if few else 0.5, color=CHANGE_COLORS[changes[i - 1]],
                           lw=0, zorder=3)
            if col == "cost_ns" and min(x.min() for x in data) < 0:
                ax.axhline(0, color="#888888", lw=0.8)
            if all(x.min() > 0 for x in data) and \
                    max(x.max() for x in data) > 50 * min(x.min() for x in data):
                _log_y(ax)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    ax_c.set_title(f"{run}: what each memslot update cost MMIO")
    ax_d.set_title("memslot update duration")
    return fig


@_FIXED_TITLES
def comparison(corr: Correlation) -> Figure:
    """Several runs: MMIO latency CDFs and per-update cost side by side."""
    fig = Figure(figsize=(11, 4.5))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.92, bottom=0.2, wspace=0.22)
    ax_l, ax_c = fig.subplots(1, 2)
    runs = corr.recording.runs
    data, names = [], []
    for i, run in enumerate(runs):
        lat = rows_of(corr.faults, run)["latency_ns"].to_numpy(np.float64)
        if len(lat):
            _cdf(ax_l, lat / 1000, label=f"{run} (n={len(lat):,})", color=f"C{i % 10}")
        u = rows_of(corr.updates, run)
        u = u[u["ok"]]
        v = u["cost_ns"].to_numpy(np.float64, na_value=np.nan) / 1000
        v = v[~np.isnan(v)]
        if len(v):
            data.append(v)
            names.append(run)
    if ax_l.lines:
        _log_x(ax_l)
        ax_l.legend(fontsize=7)
    else:
        _note(ax_l, "no run has MMIO fault events")
    ax_l.set_xlabel("MMIO exit latency (us)")
    ax_l.set_ylabel("fraction of faults")
    ax_l.grid(alpha=0.3)
    ax_l.set_title("MMIO latency by run")
    if data:
        ax_c.boxplot(data, showfliers=False)
        ax_c.set_xticks(range(1, len(names) + 1), names, fontsize=7, rotation=20)
    else:
        _note(ax_c, "no run has per-update costs")
    ax_c.set_ylabel("extra MMIO latency per update (us)")
    ax_c.set_title("per-update cost by run")
    ax_c.grid(alpha=0.3, axis="y")
    return fig


def figures(corr: Correlation, run: str) -> dict[str, Figure]:
    return {"timeline": timeline(corr, run), "latency_cdf": latency_cdf(corr, run),
            "update_cost": update_cost(corr, run)}


def save(fig: Figure, base: str | Path, dpi: int = 110) -> list[Path]:
    """``base``.png and ``base``.svg."""
    base = Path(base)
    out = []
    for ext in ("png", "svg"):
        p = base.with_suffix(f".{ext}")
        fig.savefig(p, dpi=dpi)
        out.append(p)
    return out


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
