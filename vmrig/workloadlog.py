"""The ``workload`` table of a run directory as the rig writes it: one row per
action, ``begin_ns`` when a command was sent and ``end_ns`` when its reply
(or the awaited event) arrived, on CLOCK_MONOTONIC; events as
``event:NAME`` rows (begin = end = arrival).  The table and workload.json
are rewritten atomically every ``flush_interval``, so an interrupted run
keeps every finished action."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from recording.schema import SCHEMAS, monotonic_ns
from recording.writer import write_table, write_workload_config
from vmrig.errors import RigError

T = TypeVar("T")


class WorkloadLog:
    """Rows of the ``workload`` table, kept on disk in ``run_dir`` if given."""

    def __init__(self, run_dir: str | os.PathLike[str] | None = None,
                 config: dict[str, Any] | None = None, flush_interval: float = 0.5) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.rows: list[dict[str, Any]] = []
        self.config: dict[str, Any] = dict(config or {})
        self.flush_interval = flush_interval
        self._last_flush = 0.0
        self._ids = 0
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # An empty table now: the run dir is valid from the start, and
            # pyarrow's one-off ~0.4 s first-write setup stays out of the timings.
            self.flush()

    def new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{os.getpid()}x{self._ids}"

    def add(self, action: str, target: str, begin_ns: int, end_ns: int, size: int = 0,
            ok: bool = True, error: str = "", detail: dict[str, Any] | None = None) -> None:
        self.rows.append({"begin_ns": begin_ns, "end_ns": end_ns, "action": action,
                          "target": target, "size": size, "ok": ok, "error": error,
                          "detail": json.dumps(detail or {}, sort_keys=True)})
        now = monotonic_ns() / 1e9
        if now - self._last_flush >= self.flush_interval:
            self.flush()

    def event(self, name: str, target: str, ns: int, size: int = 0,
              detail: dict[str, Any] | None = None) -> None:
        self.add(f"event:{name}", target, ns, ns, size, detail=detail)

    async def step(self, action: str, target: str, call: Awaitable[T], size: int = 0,
                   detail: Callable[[T], dict[str, Any]] | None = None) -> T:
        """Await ``call`` and record it; a RigError is recorded, then re-raised."""
        begin = monotonic_ns()
        try:
            result = await call
        except RigError as e:
            self.add(action, target, begin, monotonic_ns(), size, ok=False, error=str(e))
            raise
        self.add(action, target, begin, monotonic_ns(), size,
                 detail=detail(result) if detail else None)
        return result

    def columns(self) -> dict[str, list[Any]]:
        return {name: [r[name] for r in self.rows] for name in SCHEMAS["workload"].names}

    def flush(self) -> None:
        self._last_flush = monotonic_ns() / 1e9
        if self.run_dir is None:
            return
        write_table(self.run_dir, "workload", self.columns())
        write_workload_config(self.run_dir, self.config)

    def __enter__(self) -> WorkloadLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    def actions(self, action: str, ok: bool | None = True) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["action"] == action and (ok is None or r["ok"] == ok)]
