"""The lab job's progress: a rich progress bar on a terminal, plain
timestamped lines otherwise (cron, systemd, CI logs)."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """Rich progress on a terminal; plain timestamped lines otherwise (cron)."""

    def __init__(self, total: int) -> None:
        self.tty = sys.stdout.isatty()
        self.total = total
        self.done = 0
        self._rich: Any = None
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            self._rich = Progress(TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total}"),
                                  TimeElapsedColumn())
            self._task = self._rich.add_task("lab", total=total)
            self._rich.start()

    def log(self, msg: str) -> None:
        if self._rich is not None:
            self._rich.console.print(msg)
        else:
            print(f"{time.strftime('%H:%M:%S')} lab: {msg}", flush=True)

    def step(self, desc: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=desc)

    def advance(self) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)

    def close(self) -> None:
        """Idempotent: run_lab closes before its verdict lines, cmd_lab on any exit."""
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
