"""The lab job's progress: a rich progress bar on a terminal, and progress
lines through logging (slotscope/logsetup.py puts them on stdout: rich above
the bar on a terminal, plain "HH:MM:SS lab: msg" lines otherwise, for cron,
systemd and CI logs)."""

from __future__ import annotations

import logging
import sys
from typing import Any

# logsetup.PROGRESS names this logger: it alone goes to stdout.
_log = logging.getLogger(__name__)


class Progress:
    """Rich progress bar on a terminal; the log lines in every case."""

    def __init__(self, total: int) -> None:
        self.tty = sys.stdout.isatty()
        self.total = total
        self.done = 0
        self._rich: Any = None
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            # No console given: rich's global one, which logsetup's terminal
            # handler prints on too, so log lines land above the bar.
            self._rich = Progress(TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total}"),
                                  TimeElapsedColumn())
            self._task = self._rich.add_task("lab", total=total)
            self._rich.start()

    def log(self, msg: str) -> None:
        _log.info("%s", msg)

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
