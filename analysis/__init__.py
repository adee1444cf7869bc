"""Correlate memslot generations with MMIO fault latency (no root, no bcc).

Notebook API (imported lazily, so ``import analysis`` stays light; no
submodule shares a name with a function, so ``analysis.load`` is always the
function)::

    import analysis
    rec = analysis.load("runs/a")              # typed DataFrames
    corr = analysis.correlate(rec)             # epochs, classes, per-update cost
    corr = analysis.correlate_runs("runs/a")   # the same from dirs; a Correlation as is
    analysis.summarize("runs/a")               # one dict per run
    analysis.wrap_verdicts(corr)               # per generation wrap: the zap-all invariant
    analysis.report.write_report(["runs/a", "runs/b"], "report.html")
    corr = analysis.correlate_cluster(dirs, workers=2)   # on Dask: the same Correlation
    an = analysis.analyze(dirs)                # summaries + comparison (what `analyze` prints)
    an = analysis.analyze_cluster(dirs, workers=2)   # the same, reduced on the Dask workers
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "load": "frames", "Recording": "frames",
    "correlate": "epochs", "Correlation": "epochs",
    "correlate_runs": "epochs", "generation_timeline": "timeline", "CLASSES": "epochs",
    "wrap_forecast": "forecast", "correlate_cluster": "cluster", "wrap_verdicts": "wrap",
    "analyze_cluster": "cluster", "analyze": "reduce",
    "summarize": "summary", "summarize_all": "summary", "summary_tables": "summary",
    "compare": "summary",
    "EmptyRun": "errors", "AnalysisFailed": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
