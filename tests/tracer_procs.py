"""Processes the tracer tests drive: a micro-VMM held at its start line, and
a slotscope command waited on until its probes are attached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SLOTSCOPE = [sys.executable, "-m", "slotscope"]
SCHEDULE = "create:1,create:2,flags:1,move:2,flags:1,move:2,delete:1,delete:2,create:1"


class Workload:
    """A micro-VMM subprocess held at its start line until go()."""

    def __init__(self, n: int, schedule: str = SCHEDULE, pages: int = 3,
                 truth: Path | None = None, vcpus: int = 1, coalesced: bool = False,
                 native: bool = False) -> None:
        self.truth = truth
        args = [sys.executable, "-m", "vmrig.microvm", "-n", str(n), "--pages", str(pages),
                "--schedule", schedule, "--wait", "-o", str(truth or os.devnull),
                "--vcpus", str(vcpus), *(["--coalesced"] if coalesced else []),
                *(["--native"] if native else [])]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().startswith("ready")
        self.pid = self.proc.pid

    def start(self) -> None:
        """Let the waiting micro-VMM run."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def go(self) -> dict[str, Any]:
        """Run it to the end; its ground truth."""
        self.start()
        assert self.proc.wait(timeout=120) == 0
        return json.loads(self.truth.read_text()) if self.truth else {}


def start_tracer(*args: str) -> subprocess.Popen[str]:
    """Start a slotscope command and wait until its probes are attached."""
    p = subprocess.Popen([*SLOTSCOPE, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    line = p.stderr.readline()
    assert "backend" in line, line + p.stderr.read()
    return p
