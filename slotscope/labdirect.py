"""Direct mode: each run a child process (``slotscope lab-run``) on the host,
whose kernel is the only one, with a deadline on the host's clock; a failed
run's error typed from what its rig left in the run directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vmrig.errors import RigError, read_record

from .errors import RunFailed
from .labprogress import Progress
from .labrun import PlannedRun, progress_failure, read_progress
from .labstatus import Reruns, RunStatus, write_status

VENV_BIN = Path(sys.executable).parent


def run_direct(todo: list[PlannedRun], kernel: str, statuses: dict[str, list[RunStatus]],
               progress: Progress) -> None:
    """Every run of ``todo`` on the host, one child process after another."""
    for r in todo:
        progress.step(f"{r.label}")
        progress.log(f"{kernel}/{r.label}: {r.scenario.workload} ...")
        st = run_one(r, kernel, r.timeout, progress.log)
        statuses[f"{kernel}/{r.scenario.name}"].append(st)
        state = "ok" if st.ok else f"FAILED: {st.error}"
        progress.log(f"{kernel}/{r.label}: {state} ({st.elapsed_s:.0f} s)")
        progress.advance()


def run_one(r: PlannedRun, kernel: str, timeout: float,
            log: Callable[[str], None] = print) -> RunStatus:
    """One repetition in direct mode, a child process on the host; a run
    lost to a TCG-nesting fault (a TCG L2) is done again."""
    t0 = time.monotonic()
    reruns = Reruns()
    while True:
        st = _attempt(r, kernel, timeout)
        if not reruns.again(st, r.dir, log):
            break
    st.elapsed_s = time.monotonic() - t0
    write_status(r.dir, st)
    return st


def _attempt(r: PlannedRun, kernel: str, timeout: float) -> RunStatus:
    if r.dir.exists():  # an unfinished earlier attempt: start clean
        shutil.rmtree(r.dir)
    r.dir.mkdir(parents=True)
    t0 = time.monotonic()
    plan = r.dir.parent / f".{r.dir.name}.plan.json"
    plan.write_text(json.dumps({"l0_qemu": None, "runs": [r.to_json()]}) + "\n")
    try:
        failure = _run_child([str(VENV_BIN / "slotscope"), "lab-run", "--plan", str(plan)],
                             r.dir, timeout)
    finally:
        plan.unlink(missing_ok=True)
    progress = read_progress(r.dir)
    if progress is not None and progress.get("state") == "failed":  # its own typed failure
        failure = progress_failure(r.dir, progress)
    # Direct mode: never a TCG-nested run, so no accel and no lab-fault rerun.
    return RunStatus(r.scenario.name, r.rep, failure is None, "direct",
                     time.monotonic() - t0, failure=failure, kernel=kernel)


def _exited(run_dir: Path, returncode: int | None, tail: str) -> RigError | RunFailed:
    """The failure of an inner run that exited non-zero: the typed error its
    rig left in the run directory (kind and all), in our words; RunFailed
    if it left none."""
    message = f"exit {returncode}: {tail}"
    return read_record(run_dir, message) or RunFailed(message, returncode)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _run_child(argv: list[str], run_dir: Path, timeout: float) -> RigError | RunFailed | None:
    """Run the inner command in its own process group; None, or why it failed."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, stderr = p.communicate(timeout=timeout)
    except BaseException as e:  # timeout, Ctrl-C, SIGTERM: take the group down
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            return RunFailed(f"run hung: killed after {timeout:.0f} s", None)
        raise
    return None if p.returncode == 0 else _exited(run_dir, p.returncode, _last_line(stderr))
