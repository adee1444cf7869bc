"""Status lines through ``logging`` (slotscope/logsetup.py): plain lines,
byte for byte the old prints, on a pipe; rich's columns on a terminal (a
real pty); nothing from in-process library use.  Real subprocesses: the
handlers are chosen by what the command's own stderr/stdout are."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from conftest import needs_bcc, needs_kvm, needs_root
from tracer_procs import SLOTSCOPE, Workload, start_tracer

from recording.reader import read_manifest
from slotscope import logsetup

REPO = Path(__file__).resolve().parent.parent
# rich's "[HH:MM:SS] INFO     message" row (the time left blank when it
# repeats; a live bar's redraw, ANSI stripped, may precede it on the line);
# "HH:MM:SS lab: message" is the plain one
RICH_ROW = re.compile(r"(\[\d\d:\d\d:\d\d\]| ) +(INFO|WARNING|ERROR) +")
PLAIN_LAB = re.compile(r"\d\d:\d\d:\d\d lab: ")


def _env() -> dict[str, str]:
    env = dict(os.environ, TERM="xterm-256color", PYTHONPATH=str(REPO))
    # plain-forcing in the lab VM (this suite may run there); rich's overrides
    for name in (logsetup.PLAIN_ENV, "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE",
                 "TTY_INTERACTIVE", "COLUMNS", "LINES"):
        env.pop(name, None)
    return env


def _on_pty(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run argv with stdout and stderr on a fresh pty (200 columns, so rich
    does not wrap); its returncode and everything it wrote, ANSI stripped."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                         env=_env(), cwd=REPO)
    os.close(slave)  # the child holds it: EOF (EIO) on the master once it exits
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every slave fd closed
                break
            if not data:
                break
            chunks.append(data)
        rc = p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    return rc, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


# -- plain lines on a pipe: what the tests, the lab and cron read ---------------
def _attach_line(what: str, run: Path) -> str:
    """The attach line as the print it replaced built it, from the manifest."""
    m = read_manifest(run)
    mode = ", aggregate" if m.get("mode") == "aggregate" else ""
    return (f"slotscope {what}: {m['backend']} backend ({m['buffer']}{mode}), "
            f"{len(m['probes_attached'])} probes, pids {m['filters']['pids'] or 'all'}\n")


@needs_root
@needs_kvm
@needs_bcc
def test_record_lines_on_a_pipe_are_the_old_prints(tmp_path: Path) -> None:
    """Read as tests/tracer_procs.py and the lab do: the attach line arrives
    (flushed) before the workload starts; then the tally; nothing else."""
    wl = Workload(300, "create:1,delete:1", pages=2)
    run = tmp_path / "run"
    p = subprocess.Popen([*SLOTSCOPE, "record", "-p", str(wl.pid), "-o", str(run)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stderr is not None
    first = p.stderr.readline()
    wl.go()
    out, rest = p.communicate(timeout=60)
    assert p.returncode == 0, first + rest
    assert first == _attach_line("record", run) and first.endswith(f"pids [{wl.pid}]\n")
    assert re.fullmatch(r"slotscope record: targets exited; \d+ events, 0 lost\n", rest), rest
    assert out == ""


@needs_root
@needs_kvm
@needs_bcc
def test_stream_keeps_stdout_for_data(tmp_path: Path) -> None:
    wl = Workload(300, "create:1,delete:1", pages=2)
    p = start_tracer("stream", "-p", str(wl.pid), "-e", "memslot_update")  # up to "backend"
    wl.go()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    # slot 0 (guest memory), then the schedule's create and delete
    assert [json.loads(line)["change"] for line in out.splitlines()] == [
        "create", "create", "delete"]
    assert err == ""  # the attach line was the only status line


@needs_root
@needs_kvm
@needs_bcc
def test_all_pids_attach_line_byte_for_byte(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = subprocess.run([*SLOTSCOPE, "record", "-d", "0.3", "-o", str(run)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    attached = _attach_line("record", run)
    assert attached.endswith("pids all\n") and p.stderr.startswith(attached), p.stderr
    assert re.fullmatch(r"slotscope record: duration; \d+ events, \d+ lost\n",
                        p.stderr[len(attached):]), p.stderr
    assert p.stdout == ""


def test_error_is_one_plain_line_on_a_pipe(tmp_path: Path) -> None:
    # as root "duration must be positive", otherwise "needs root": one line each
    p = subprocess.run([*SLOTSCOPE, "record", "-d", "0", "-o", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 1 and p.stdout == ""
    assert re.fullmatch(r"slotscope record: error: [^\n]+\n", p.stderr), p.stderr


@needs_root
@needs_kvm
@needs_bcc
def test_lab_run_phases_on_a_pipe(tmp_path: Path) -> None:
    """`slotscope lab-run` (what the lab runs, on the host or in the lab VM,
    whose console.log is parsed): its phase lines, as the old print wrote them."""
    scenario = {"name": "mv", "workload": "microvm", "mmio_accesses": 300,
                "schedule": "create:1,delete:1"}
    p = subprocess.run([*SLOTSCOPE, "lab-run", "--scenario", json.dumps(scenario),
                        "-o", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=180, cwd=REPO)
    assert p.returncode == 0, p.stderr
    phases = [re.fullmatch(r"lab-run: \+\d+\.\d s (.+)", line) for line in
              p.stderr.splitlines()]
    assert all(phases), p.stderr
    said = [ph[1] for ph in phases if ph]
    assert len(said) == 3, said
    assert re.fullmatch(r"probes compiled and attached \(tracepoint, \d+\.\d s\)", said[0])
    assert said[1] == "start mv/1 (microvm)"
    assert re.fullmatch(r"mv/1 ok \(\d+\.\d s\)", said[2])
    assert p.stdout == ""


_PROGRESS = """
from slotscope import labrun, logsetup
from slotscope.labprogress import Progress
with logsetup.configured():
    p = Progress(1)
    p.log("mode: direct (a test)")
    labrun._phase("probes attached")
    p.advance()
    p.close()
"""


def test_lab_progress_plain_lines_on_stdout() -> None:
    """Off a terminal the lab's progress lines stay on stdout, timestamped
    (the nested lab test reads "lab: mode: ..." there); phases on stderr."""
    p = subprocess.run([sys.executable, "-c", _PROGRESS], capture_output=True, text=True,
                       timeout=60, cwd=REPO, env=_env())
    assert p.returncode == 0, p.stderr
    assert re.fullmatch(r"\d\d:\d\d:\d\d lab: mode: direct \(a test\)\n", p.stdout), p.stdout
    assert re.fullmatch(r"lab-run: \+\d+\.\d s probes attached\n", p.stderr), p.stderr


# -- a terminal: rich -------------------------------------------------------------
def test_lab_progress_on_a_terminal_is_rich() -> None:
    rc, text = _on_pty([sys.executable, "-c", _PROGRESS])
    assert rc == 0, text
    rows = [line for line in text.splitlines() if RICH_ROW.search(line)]
    assert any("mode: direct (a test)" in row for row in rows), text
    assert any("lab-run: +" in row and "probes attached" in row for row in rows), text
    assert not PLAIN_LAB.search(text), text


def test_error_on_a_terminal_is_rich(tmp_path: Path) -> None:
    rc, text = _on_pty([*SLOTSCOPE, "record", "-d", "0", "-o", str(tmp_path / "r")])
    assert rc == 1, text
    assert re.search(r"ERROR +slotscope record: error: ", text), text
    assert "Traceback" not in text


@needs_root
@needs_kvm
@needs_bcc
def test_record_on_a_terminal_is_rich(tmp_path: Path) -> None:
    rc, text = _on_pty([*SLOTSCOPE, "record", "-d", "0.3", "-o", str(tmp_path / "r")])
    assert rc == 0, text
    rows = [line for line in text.splitlines() if RICH_ROW.search(line)]
    assert any(re.search(r"INFO +slotscope record: \w+ backend \(", row) for row in rows), text
    assert any("slotscope record: duration; " in row for row in rows), text


def test_forced_plain_in_the_lab_vm() -> None:
    """$SLOTSCOPE_LABVM: plain lines even on a terminal (virtme-ng's console
    fallback is a tty, and the lab parses what the command writes there)."""
    master, slave = pty.openpty()
    try:
        env = dict(_env(), **{logsetup.PLAIN_ENV: "1"})
        p = subprocess.run([sys.executable, "-c", _PROGRESS], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=slave, env=env, cwd=REPO,
                           timeout=60, text=True)
        os.close(slave)
        slave = -1
        err = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert p.returncode == 0
    assert re.fullmatch(r"lab-run: \+\d+\.\d s probes attached\r\n", err.decode()), err


# -- in-process: silent --------------------------------------------------------------
_IN_PROCESS = """
import os, sys
from slotscope.cli import build_parser, main
from tracer.recorder import Recorder
run = sys.argv[1]
with Recorder(run + "/lib1", pids=[os.getpid()]):
    pass
args = build_parser().parse_args(["record", "-d", "0.2", "-o", run + "/lib2"])
assert args.func(args) == 0             # a command's function, called as a library
assert main(["record", "-d", "0.2", "-o", run + "/cli"]) == 0   # the command: prints
with Recorder(run + "/lib3", pids=[os.getpid()]):   # after main(): silent again
    pass
"""


@needs_root
@needs_kvm
@needs_bcc
def test_in_process_use_prints_no_status(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(tmp_path)],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert p.returncode == 0, p.stderr
    status = [line for line in p.stderr.splitlines() if line.startswith("slotscope ")]
    # only main()'s two lines: attached and the tally
    assert len(status) == 2 and "backend" in status[0] and "duration;" in status[1], p.stderr
    assert all((tmp_path / d / "manifest.json").exists() for d in ("lib1", "lib2", "cli", "lib3"))


def test_handlers_are_taken_off_after_main() -> None:
    import logging
    before = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level)
              for n in (*logsetup.LAYERS, logsetup.PROGRESS)}
    with logsetup.configured():
        assert all(logging.getLogger(n).handlers for n in logsetup.LAYERS)
        assert not logging.getLogger(logsetup.PROGRESS).propagate
    after = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level)
             for n in (*logsetup.LAYERS, logsetup.PROGRESS)}
    assert after == before and logging.getLogger(logsetup.PROGRESS).propagate
