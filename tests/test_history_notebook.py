"""The history notebook runs top to bottom (nbclient, the venv's own
interpreter as the kernel): on the demo dataset it makes itself from the
committed recordings, and on a dataset named by SLOTSCOPE_HISTORY.  Every
count and figure it prints equals what DuckDB and analysis.history return for
that dataset, computed here."""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from recording import history as fmt

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "analysis" / "notebooks" / "history.ipynb"
DATA = ROOT / "tests" / "data"
HIVE_TYPES = "{'host': VARCHAR, 'kernel': VARCHAR, 'scenario': VARCHAR, 'year': INTEGER}"


def execute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Run the notebook; its HISTORY lines by step.  Fails on any error output
    and unless it drew at least one PNG."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager

    # The kernel must be this interpreter (jupyter_client maps a native
    # kernelspec's "python" to sys.executable), so it sees this checkout.
    argv = KernelSpecManager().get_kernel_spec("python3").argv
    assert argv[0] in ("python", "python3", sys.executable), argv
    # The kernel inherits the environment: a demo dataset lands under tmp_path.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, "\n".join(f"{o.ename}: {o.evalue}" for o in errors)
    pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert pngs and all(base64.b64decode(p).startswith(b"\x89PNG") for p in pngs)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    got = {}
    for line in text.splitlines():
        if line.startswith("HISTORY "):
            d = json.loads(line.split(" ", 1)[1])
            got[d["step"]] = d
    return got


def check(dataset: Path, got: dict[str, dict[str, Any]]) -> None:
    """What the notebook printed against DuckDB and analysis.history, here."""
    import duckdb

    from analysis import history
    assert Path(got["dataset"]["dataset"]) == dataset
    figure = got["duckdb"]["figure"]
    glob = f"{dataset}/*=*/**/*.parquet".replace("'", "''")
    src = f"read_parquet('{glob}', hive_partitioning = true, hive_types = {HIVE_TYPES})"
    con = duckdb.connect()
    rows, nights, series = con.execute(
        f"SELECT count(*), count(DISTINCT night_id), count(DISTINCT (host, kernel, scenario))"
        f" FROM {src}").fetchone()
    per_night = f"SELECT any_value({figure}) AS v, kernel FROM {src} " \
                "GROUP BY host, kernel, scenario, night_id"
    median, = con.execute(f"SELECT median(v) FROM ({per_night})").fetchone()
    assert rows > 0 and nights > 1
    for step in ("duckdb", "pandas"):  # the same answers both ways
        g = got[step]
        assert (g["rows"], g["nights"], g["series"]) == (rows, nights, series), step
        assert g["median"] == pytest.approx(median, rel=1e-12), step

    trend = history.trend(dataset, figure)
    assert got["trend"]["rows"] == len(trend)
    assert got["trend"]["series"] == len({(r["scenario"], r["host"], r["kernel"]) for r in trend})
    assert got["trend"]["last"] == pytest.approx(trend[-1]["value"])

    # compare: the two kernels with the most nights, A the earlier
    kernels = con.execute(
        f"SELECT kernel, count(DISTINCT (host, scenario, night_id)) AS n, min(date) AS first "
        f"FROM {src} GROUP BY kernel ORDER BY n DESC, first, kernel").fetchall()
    a, b = sorted(kernels[:2], key=lambda k: (k[2], k[0]))
    c = got["compare"]
    assert (c["a"], c["b"]) == (a[0], b[0])
    want = history.compare(dataset, a[0], b[0], figure)
    assert c["rows"] == len(want)
    assert c["diff"] == pytest.approx({r["scenario"]: r["diff"] for r in want})

    names = sorted(k[0] for k in kernels)
    assert got["changes"]["kernels"] == names
    found = [[x["host"], x["scenario"], x["kernel_after"], x["date"]]
             for k in names for x in history.changes(dataset, [figure], kernel=k)]
    assert got["changes"]["changes"] == found
    panels = len({r["scenario"] for r in trend})
    assert (got["plot"]["panels"], got["plot"]["lines"]) == (panels, got["trend"]["series"])


def test_notebook_on_its_demo_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not (DATA / "host-microvm" / "manifest.json").exists():
        pytest.skip("no committed recording under tests/data")
    monkeypatch.delenv("SLOTSCOPE_HISTORY", raising=False)
    got = execute(monkeypatch, tmp_path)
    assert got["dataset"]["demo"] is True
    dataset = Path(got["dataset"]["dataset"])
    assert dataset.is_relative_to(tmp_path)
    # built by the real ingest: a ledger entry per night it reports
    assert len(list((dataset / fmt.LEDGER).glob("*.json"))) == got["duckdb"]["nights"]
    check(dataset, got)
    assert got["changes"]["changes"]  # the step the demo says it plants is found


def given_dataset(root: Path) -> Path:
    """Two hosts, three kernels (one from night 6 on; a number-like name and
    one with '/'), two scenarios of two repetitions, nights across a new year;
    written in two batches by the real writer, then compacted."""
    import numpy as np
    rng = np.random.default_rng(9)
    day0 = dt.datetime(2025, 12, 25, 3, 0, tzinfo=dt.UTC)
    batches: list[list[dict[str, Any]]] = [[], []]
    for night in range(12):
        when = day0 + dt.timedelta(days=night)
        for host in ("h1", "h2"):
            for kernel in ("6", "6.12", "6.13-rc1/x")[:2 + (night >= 6)]:
                for scenario in ("alpha", "beta"):
                    value = float(rng.lognormal(13, 0.2))
                    batches[night >= 6] += [{
                        "history_version": fmt.HISTORY_VERSION, "night_id": f"{host}-{night}",
                        "date": when.date(), "finished_wall": when.timestamp(),
                        "host": host, "kernel": kernel, "scenario": scenario,
                        "year": str(when.year), "rep": rep, "run_ok": True,
                        "mmio_latency_p99_ns": value, "memslot_updates": 6}
                        for rep in (1, 2)]
    for rows in batches:
        fmt.write_rows(root, rows)
    fmt.compact(root)
    return root


def test_notebook_on_a_given_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dataset = given_dataset(tmp_path / "given")
    monkeypatch.setenv("SLOTSCOPE_HISTORY", str(dataset))
    got = execute(monkeypatch, tmp_path)
    assert got["dataset"]["demo"] is False
    assert not list(tmp_path.glob("slotscope-history-*"))  # no demo made beside it
    check(dataset, got)
