"""The example notebook runs top to bottom on the committed recordings (nbclient,
the venv's own interpreter as the kernel) and reproduces the report's figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import analysis

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "analysis" / "notebooks" / "slotscope-analysis.ipynb"
DATA = ROOT / "tests" / "data"


def test_notebook_executes(monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager

    choices = (("nested-microvm", "labvm-microvm-kprobe"), ("host-microvm",))
    runs = [next(DATA / n for n in names if (DATA / n / "manifest.json").exists())
            for names in choices if any((DATA / n / "manifest.json").exists() for n in names)]
    if not runs:
        pytest.skip("no committed recording under tests/data yet")
    # The kernel must be this interpreter (jupyter_client maps a native
    # kernelspec's "python" to sys.executable), so it sees this checkout.
    argv = KernelSpecManager().get_kernel_spec("python3").argv
    assert argv[0] in ("python", "python3", sys.executable), argv
    monkeypatch.delenv("SLOTSCOPE_RUNS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3 * len(runs)  # timeline, latency CDF, per-update cost per run
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    got = {d["run"]: d for d in (json.loads(line.split("SUMMARY ", 1)[1])
                                 for line in text.splitlines() if line.startswith("SUMMARY "))}
    for run in runs:
        s = analysis.summarize(run)
        assert got[run.name]["mmio_faults"] == s["mmio_faults"]
        assert got[run.name]["memslot_updates"] == s["memslot_updates"]
        assert got[run.name]["slow_faults"] == s["slow_faults"]
