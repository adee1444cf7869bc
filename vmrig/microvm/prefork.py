"""Micro-VMMs forked from one process that has imported them already.

The lab runs a micro-VMM per run, and in the TCG L1 each one's interpreter
start and imports took 2.6-4.3 s of its 8-11 s (``vmm_ready_s`` of the
default lab, 2026-12-03).  ``python -m vmrig.microvm.prefork`` pays that
once and forks one VMM per request.  Each child runs what
``python -m vmrig.microvm ARGV`` runs, in a process of its own: the pid the
tracer filters on, whose CPU times start at zero at the fork.

The conversation, a line each way, one VMM at a time::

    parent -> server   {"id": N, "argv": [...], "stderr": PATH}  (argv holds --wait)
    server -> parent   forked N PID
    child  -> parent   ready PID                    (the VMM's own line)
    parent -> child    go
    server -> parent   exit N PID CODE              (when the child ended)

The request's number ties the server's lines to it, so a late line of a
VMM given up on is never read as the next one's.

From the fork until it exits the child owns the server's stdin and stdout
(the server only waits for it); its stderr goes to PATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, NoReturn

__all__ = ["Forks", "Vmm", "serve"]


def serve() -> int:
    """The server: a VMM forked per request line, until stdin closes."""
    from vmrig.microvm.cli import main  # the imports every child shares
    while line := sys.stdin.readline():
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(main, req["argv"], req["stderr"])
        print(f"forked {req['id']} {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {req['id']} {pid} {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


def _child(main: Callable[[list[str]], int], argv: list[str], stderr: str) -> NoReturn:
    code = 1
    try:
        fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        code = main(argv)
    except SystemExit as e:  # argparse: it printed why
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        os._exit(code)  # not the server's exit path: its stdin is still ours


class Forks:
    """The parent's side: the server starts at once (its imports overlap
    whatever the caller does next) and again if it died."""

    def __init__(self) -> None:
        self._requests = 0
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "vmrig.microvm.prefork"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, self.lines), daemon=True,
                         name="microvm-prefork").start()

    def spawn(self, argv: Sequence[str]) -> Vmm:
        """A VMM for ``argv`` (the arguments of ``python -m vmrig.microvm``,
        --wait among them); wait for its ready line with ``Vmm.ready``."""
        if self.proc.poll() is not None:
            self._start()
        fd, err = tempfile.mkstemp(prefix="microvm-", suffix=".stderr")
        os.close(fd)
        self._requests += 1
        vmm = Vmm(self._requests, self.lines, self.proc.stdin, Path(err))
        vmm.say(json.dumps({"id": vmm.id, "argv": list(argv), "stderr": err}))
        return vmm

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.strip())
    lines.put(None)  # the server is gone


class Vmm:
    """One forked VMM, as far as its parent can see it."""

    def __init__(self, id: int, lines: queue.Queue[str | None], server: IO[str] | None,
                 stderr: Path) -> None:
        self.id = id
        self._lines = lines
        self._server = server
        self.stderr_path = stderr
        self.pid: int | None = None
        self.returncode: int | None = None
        self._ready: set[int] = set()  # pids that said ready (before or after "forked")

    def say(self, line: str) -> None:
        assert self._server is not None
        self._server.write(line + "\n")
        self._server.flush()

    def _take(self, timeout: float) -> bool:
        """Read one line (False: none within ``timeout``)."""
        try:
            line = self._lines.get(timeout=timeout) if timeout > 0 else self._lines.get_nowait()
        except queue.Empty:
            return False
        if line is None:  # the server is gone, and this VMM with it
            self._lines.put(None)  # for every later read too
            self.returncode = -1
            return True
        if not line:  # a blank line a VMM printed: no part of the conversation
            return True
        word, *rest = line.split()
        if word == "ready" and len(rest) == 1:
            self._ready.add(int(rest[0]))
        elif word == "forked" and len(rest) == 2 and rest[0] == str(self.id):
            self.pid = int(rest[1])
        elif word == "exit" and len(rest) == 3 and rest[0] == str(self.id):
            self.pid, self.returncode = int(rest[1]), int(rest[2])
        return True

    def ready(self, timeout: float) -> bool:
        """Wait for the VMM's ready line; False if it ended first or said
        nothing within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.returncode is None and not (self.pid is not None and self.pid in self._ready):
            left = deadline - time.monotonic()
            if left <= 0 or not self._take(left):
                return False
        return self.returncode is None

    def go(self) -> None:
        self.say("go")

    def poll(self) -> int | None:
        while self.returncode is None and self._take(0):
            pass
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._take(left):
                break
        return self.returncode

    def kill(self) -> None:
        """SIGKILL, then wait (up to 30 s) for the server to see it end."""
        deadline = time.monotonic() + 30
        while self.pid is None and self.returncode is None and time.monotonic() < deadline:
            self._take(deadline - time.monotonic())
        if self.pid is not None and self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait(30)

    def stderr_tail(self, chars: int = 200) -> str:
        """The end of the VMM's stderr; the file is removed."""
        try:
            text = self.stderr_path.read_text(errors="replace")
            self.stderr_path.unlink()
        except OSError:
            return ""
        return text.strip()[-chars:]


if __name__ == "__main__":
    from recording.nopandas import block_pandas
    block_pandas()  # as python -m vmrig.microvm: the VMM never analyses
    sys.exit(serve())
