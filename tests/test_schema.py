"""The recording format round-trips through real Parquet files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recording import schema
from recording.errors import RecordingError
from recording.reader import read_run
from recording.writer import RunWriter, write_table, write_workload_config


def _update(i: int) -> dict:
    return {"begin_ns": 1000 + i, "end_ns": 2000 + i, "pid": 7, "tid": 8, "vm": 7 << 32 | 5,
            "as_id": i % 2, "slot_id": 10 + i, "change": schema.CHANGE_TYPES[i % 4],
            "base_gfn": 0x100000 + i, "npages": 256, "flags": 1, "userspace_addr": 0x7F00,
            "gen_before": None, "gen_after": None, "ret": 0}


def test_round_trip_and_compaction(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunWriter(run, {"backend": "tracepoint"}) as w:
        for i in range(3):
            w["memslot_update"].append(_update(i))
        w.flush()
        w["memslot_update"].append(_update(3))
        w["lost"].append({"ns": 5, "event": "mmio_fault", "count": 0})
        # Live: the first flush is readable before the writer closes.
        live = read_run(run)
        assert live.tables["memslot_update"].num_rows == 3
        assert not live.complete
    done = read_run(run)
    assert done.complete and done.manifest["backend"] == "tracepoint"
    assert done.manifest["rows"]["memslot_update"] == 4
    # the clock every timestamp came from, as this host's sysfs names it
    assert done.manifest["host"]["clocksource"] == Path(
        "/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip()
    t = done.tables["memslot_update"].to_pandas()
    assert list(t["slot_id"]) == [10, 11, 12, 13]
    assert list(t["change"].astype(str)) == ["create", "delete", "move", "flags_only"]
    assert t["gen_before"].isna().all()
    # One Parquet file per event type after a clean stop, no segment dirs.
    for event in schema.TRACE_EVENTS:
        assert pq.read_schema(run / f"{event}.parquet").equals(
            schema.SCHEMAS[event], check_metadata=False)
        assert not (run / f"{event}.parts").exists()


@pytest.mark.parametrize("keep", [True, False])
def test_compaction_writes_the_segments_it_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               keep: bool) -> None:
    """Compaction writes the segments from memory while they fit KEEP_BYTES
    (here the files on disk are truncated first: it never reads them), and
    reads them back once they do not; the file is the same either way."""
    from recording import writer
    if not keep:
        monkeypatch.setattr(writer, "KEEP_BYTES", 0)
    run = tmp_path / "run"
    w = RunWriter(run, {"backend": "kprobe"})
    for i in range(6):
        w["memslot_update"].append(_update(i))
        w.flush()
    parts = sorted((run / "memslot_update.parts").glob("*.parquet"))
    assert len(parts) == 6
    if keep:
        for seg in parts:
            seg.write_bytes(b"")
    w.close()
    t = pq.read_table(run / "memslot_update.parquet")
    assert t.num_rows == 6 and t.column("slot_id").to_pylist() == list(range(10, 16))
    meta = pq.ParquetFile(run / "memslot_update.parquet").metadata
    assert meta.num_row_groups == 6
    assert read_run(run).complete
    # Dictionary pages only for the dictionary columns (parquet_options).
    group = meta.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings
                 for i in range(group.num_columns)}
    assert "RLE_DICTIONARY" in encodings["change"], encodings["change"]
    assert not {"RLE_DICTIONARY", "PLAIN_DICTIONARY"} & set(encodings["slot_id"]), encodings


def test_refuses_unknown_schema_version(tmp_path: Path) -> None:
    RunWriter(tmp_path / "r", {}).close()
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    m["schema_version"] = 999
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RecordingError, match="schema version 999"):
        read_run(tmp_path / "r")


def test_not_a_run_dir(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="no manifest.json"):
        read_run(tmp_path)


def test_wrong_columns_are_refused(tmp_path: Path) -> None:
    w = RunWriter(tmp_path / "r", {})
    w["lost"].append({"ns": 1, "event": "x", "count": 1, "bogus": 1})  # extra key ignored
    w["lost"].flush()
    with pytest.raises(RecordingError, match="missing"):
        write_table(tmp_path / "r", "workload", {"action": ["x"]})


def test_workload_table_and_config_survive_tracer_close(tmp_path: Path) -> None:
    run = tmp_path / "r"
    w = RunWriter(run, {"backend": "tracepoint"})
    write_table(run, "workload", {
        "begin_ns": [1], "end_ns": [2], "action": ["device_add"], "target": ["dimm0"],
        "size": [128 << 20], "ok": [True], "error": [None], "detail": ["{}"]})
    write_workload_config(run, {"workload": "hotplug", "cycles": 1})
    w.close()
    r = read_run(run)
    assert r.tables["workload"].num_rows == 1
    assert r.manifest["workload"] == {"workload": "hotplug", "cycles": 1}


def test_sigkilled_writer_is_readable_to_last_flush(tmp_path: Path) -> None:
    run = tmp_path / "r"
    code = textwrap.dedent(f"""
        import time
        from recording.writer import RunWriter
        w = RunWriter({str(run)!r}, {{}})
        for i in range(5):
            w["lost"].append({{"ns": i, "event": "e", "count": i}})
        w.flush()
        w["lost"].append({{"ns": 99, "event": "unflushed", "count": 0}})
        print("flushed", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "flushed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    r = read_run(run)
    assert not r.complete
    assert r.tables["lost"].column("ns").to_pylist() == [0, 1, 2, 3, 4]


def test_unwritable_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(RecordingError, match="cannot write run directory"):
        RunWriter(target / "run", {})


def test_monotonic_clock_is_the_bpf_clock() -> None:
    a = schema.monotonic_ns()
    time.sleep(0.001)
    assert schema.monotonic_ns() - a >= 1_000_000


DATA = Path(__file__).parent / "data"


def test_every_manifest_key_has_one_declared_writer() -> None:
    """recording.manifest names each key's writer once; every key of the
    committed recordings (v1, written by the tracer) is declared there."""
    from itertools import combinations

    from recording import manifest
    for (a, ka), (b, kb) in combinations(manifest.OWNERS.items(), 2):
        assert not ka & kb, f"{a} and {b} both write {sorted(ka & kb)}"
    assert frozenset().union(*manifest.OWNERS.values()) == manifest.KEYS
    runs = [d for d in DATA.iterdir() if (d / schema.MANIFEST).exists()]
    assert runs
    for d in runs:
        assert set(read_run(d).manifest) <= manifest.KEYS, d.name


def test_writer_refuses_undeclared_and_its_own_keys(tmp_path: Path) -> None:
    from recording.errors import UndeclaredKeys
    typo: dict = {"backend": "kprobe", "bakend": "kprobe"}
    with pytest.raises(UndeclaredKeys) as e:
        RunWriter(tmp_path / "a", typo)
    assert e.value.keys == ["bakend"]
    with pytest.raises(UndeclaredKeys) as e:
        RunWriter(tmp_path / "b", {"start_ns": 5})
    assert e.value.keys == ["start_ns"]
    w = RunWriter(tmp_path / "c", {"backend": "kprobe"}, start_ns=5)
    with pytest.raises(UndeclaredKeys):
        w.flush({"complete": True})
    w.close(stop_ns=9, error="probes failed to load")
    m = read_run(tmp_path / "c").manifest
    assert (m["start_ns"], m["stop_ns"], m["error"]) == (5, 9, "probes failed to load")


def test_read_errors_carry_their_cause(tmp_path: Path) -> None:
    from recording import errors
    with pytest.raises(errors.NoManifest) as nm:
        read_run(tmp_path)
    assert nm.value.run_dir == tmp_path
    RunWriter(tmp_path / "r", {}).close()
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    (tmp_path / "r" / "manifest.json").write_text(json.dumps({**m, "schema_version": 999}))
    with pytest.raises(errors.UnknownVersion) as uv:
        read_run(tmp_path / "r")
    assert uv.value.version == 999 and uv.value.readable == schema.READABLE_VERSIONS
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "r" / "lost.parquet").write_bytes(b"not parquet")
    with pytest.raises(errors.CorruptTable) as ct:
        read_run(tmp_path / "r")
    assert ct.value.event == "lost" and ct.value.run_dir == tmp_path / "r"


def test_background_flushes_write_in_order(tmp_path: Path) -> None:
    """The tracer's path: Arrow tables added, segments and manifest written
    by the Flusher thread, compacted at close."""
    run = tmp_path / "r"
    w = RunWriter(run, {"backend": "kprobe"}, background=True)
    for i in range(3):
        w["lost"].add(schema.columns_table("lost", {"ns": [i], "event": ["e"], "count": [i]}))
        w.flush({"lost": {"e": i}}, wait=i == 0)
    w.close({"stop_reason": "duration"})
    r = read_run(run)
    assert r.complete and r.manifest["lost"] == {"e": 2} and r.manifest["rows"]["lost"] == 3
    assert r.manifest["stop_reason"] == "duration"
    assert r.tables["lost"].column("ns").to_pylist() == [0, 1, 2]


def _imported_roots(package: str) -> dict[str, set[str]]:
    import ast
    out: dict[str, set[str]] = {}
    for f in sorted((Path(__file__).parents[1] / package).rglob("*.py")):
        roots = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
        out[f.name] = roots
    return out


def test_layers_import_only_what_they_may() -> None:
    """recording: stdlib, numpy and pyarrow only; analysis: no tracer, vmrig
    or slotscope (it runs on a laptop with pyarrow and pandas)."""
    allowed = set(sys.stdlib_module_names) | {"numpy", "pyarrow", "recording", "__future__"}
    for name, roots in _imported_roots("recording").items():
        assert roots <= allowed, f"recording/{name} imports {sorted(roots - allowed)}"
    for name, roots in _imported_roots("analysis").items():
        assert not roots & {"tracer", "vmrig", "slotscope"}, f"analysis/{name}: {roots}"
