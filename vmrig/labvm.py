"""The nested lab VM: a stock Debian 6.1 L1 hypervisor on the host's own filesystem.

The L1 is booted with virtme-ng (``vng``) on a read-only 9p view of the
host's root with tmpfs overlays, so it has the host's Python, bcc, the
project and its venv without building an image.  Its kernel comes from
vmrig.kernel (kprobes on, MMIO caching on, exact headers for bcc).  Inside,
udev loads kvm + kvm_amd/kvm_intel (nested) so /dev/kvm exists for L2s.

The output directory is shared read-write (``--rwdir``): what the command
writes there is on the host at once, so a hung or killed L1 leaves whatever
it already wrote readable.  Large scratch files belong in
``$SLOTSCOPE_LABVM_SCRATCH`` (a tmpfs inside the L1); copy results out.

Accelerator: KVM with ``-cpu host`` where the host's KVM is kvm_intel or
kvm_amd with nested virtualization on (checked by inspecting the module and
by starting QEMU with it); TCG with ``-cpu max`` (emulated SVM with NPT)
everywhere else, e.g. on hosts whose /dev/kvm is kvm_pvm.

One module of ~475 lines because it reads top to bottom as one L1's course:
what it needs (``choose_accel``, ``labvm_check``), the script it runs, the
vng command, the run with its deadline and the host's watch, and the faults
read off its console (``LabResult.fault``).  What it uses lives beside it:
``kernel/`` (the L1's kernels), ``labimage`` (the read-only disks of the
venv and headers), ``l1report`` (a hung L1's vCPUs), ``host`` (does QEMU
start) and ``labvm_cli``.  The next seam, if it grows: the
accelerator and readiness checks (~60 lines) into a module of their own.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from recording.hostfacts import FAIL, OK, Check, kvm_vendor_module, nested_vendor
from vmrig import config, guestbuild, host, l1report, labimage
from vmrig.errors import L1Fault, RigError
from vmrig.kernel import CACHE_ROOT, DEFAULT_KERNELS, LabKernel, lab_kernel, resolve_kernel

ACCELS = config.ACCELS
DEFAULT_TIMEOUT = 900.0
DEFAULT_MEMORY = "2G"
CONSOLE_TAIL = 30
# The in-L1 watchdog reports this long before the deadline, by the L1's
# uptime, which lags the host's clock by its start (23 s seen under load).
HANG_REPORT_S = 45
# The host reads the L1's vCPUs (vmrig.l1report) this long before the
# deadline, by the host's clock: it fires even when the L1's clock lags
# past HANG_REPORT_S (a livelocked TCG L1 did, by more than 45 s).
HOST_REPORT_S = 20
# What vng returns when the L1 never wrote the command's status (its rc file):
# the L1 died under the command.
NO_STATUS = 255
STATE_DIR = "labvm"  # inside the output directory: script, logs, result
# Inside the L1: the accelerator the L1 runs under (tcg, kvm): what the lab's
# inner side needs to tell a fault of TCG nesting (slotscope.labrun).
ACCEL_ENV = "SLOTSCOPE_LABVM_ACCEL"
# Under TCG the L1's boot check finds its TSCs unsynchronized and falls back
# to the HPET: every clock read (each BPF event's timestamp, every Python
# and QEMU timer in the L1) is then an emulated MMIO access.  TCG's TSC is
# one host-derived counter that never runs backwards across vCPUs (QEMU's
# cpu_get_ticks; a 2-vCPU lock-step test in the L1 saw 0 warps in 20M reads
# either way), so trust it.  Measured in the 6.1 L1: a clock read 15x
# cheaper, one wrap (262k memslot swaps) 33.9 -> 26.0 s untraced and
# 50.9 -> 39.2 s traced.  A KVM L1 keeps kvm-clock.
TCG_CMDLINE = "tsc=reliable"
# The project's venv: its bin/ holds vng, virtme-run and slotscope.
VENV_BIN = Path(sys.prefix) / "bin"


@dataclass
class LabResult:
    returncode: int | None   # COMMAND's exit status; None if the L1 hung
    accel: str
    elapsed_s: float         # launch to exit, host wall clock
    timed_out: bool
    outdir: Path
    console_tail: list[str] = field(default_factory=list)
    # L1 uptime when COMMAND started: the boot cost of this run.
    boot_s: float | None = None
    # "Kernel panic - not syncing: ... (task ...)" if the L1 panicked.
    panic: str = ""
    # The L1's last "soft lockup - CPU#n stuck for Ns! [task:pid]" report.
    lockup: str = ""
    timeout_s: float = 0.0   # the deadline it was given
    # Why the host killed it: the deadline, or what run_in_labvm's watch said.
    kill_reason: str = ""
    # Each L1 vCPU's RIP and symbol, read by the host before the kill.
    host_report: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def fault(self) -> L1Fault | None:
        """The L1's own failure, if it had one: a kernel panic, or at the
        deadline a soft lockup it reported, else a plain hang."""
        if self.panic:
            return L1Fault(f"L1 kernel panic: {self.panic}", "panic", self.panic)
        if self.lockup and (self.timed_out or self.returncode == NO_STATUS):
            # hung at the deadline, or died under the command (255: no rc
            # file) after reporting stopped CPUs
            return L1Fault(f"L1 soft lockup: {self.lockup}", "lockup", self.lockup)
        if self.timed_out:
            # The L1's last words, not QEMU's own note that we killed it.
            last = next((ln for ln in reversed(self.console_tail)
                         if ln.strip() and not ln.startswith("qemu-system")), "")
            where = "; ".join(ln.split(": ", 1)[1] for ln in self.host_report
                              if ln.startswith(f"sample {l1report.SAMPLES - 1} vCPU"))
            return L1Fault(f"lab VM hung: {self.kill_reason or 'killed'}; "
                           f"last console: {last.rstrip()}"
                           + (f"; vCPUs at {where}" if where else ""), "hang", last.rstrip())
        if self.returncode == NO_STATUS:
            # The L1 went away under the command with no panic or lockup on
            # its console (seen once in a nested lab CI run: an L2 virtio-mem
            # plug, then nothing): a reset or poweroff of the TCG L1.
            last = next((ln for ln in reversed(self.console_tail) if ln.strip()), "")
            return L1Fault("lab VM ended without the command's status and with no panic "
                           f"or lockup report; last console: {last.rstrip()}", "gone",
                           last.rstrip())
        return None


def _tool(name: str) -> str | None:
    p = VENV_BIN / name
    return str(p) if p.exists() else shutil.which(name)


def choose_accel(requested: str = "auto") -> tuple[str, str]:
    """(accel, why): kvm only where the host can really run a nested L1."""
    if requested not in ACCELS:
        raise RigError(f"unknown accelerator {requested!r} (choose from {', '.join(ACCELS)})")
    if requested == "tcg":
        return "tcg", "TCG as requested"
    why = ""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        why = "no read/write /dev/kvm"
    elif (vendor := nested_vendor()) is None:
        why = f"host {kvm_vendor_module() or 'no vendor module'} has no nested virt"
    else:
        # The QEMU vng will start ($SLOTSCOPE_QEMU or PATH's).  Its firmware must
        # still run after 3 s with -cpu host, which is what the L1 needs.
        qemu = host.qemu_binary()
        if qemu is None:
            why = "qemu -cpu host fails: qemu-system-x86_64 not found"
        else:
            p = host.probe_accel(qemu, "kvm", cpu="host", run=3.0)
            if p.ok:
                return "kvm", f"KVM -cpu host, nested {vendor}"
            why = f"qemu -cpu host fails: {p.detail}"
    if requested == "kvm":
        raise RigError(f"--accel kvm unavailable: {why}")
    return "tcg", f"TCG: {why}"


def _missing_parts() -> tuple[str, str] | None:
    """(what is missing, fix) for the pieces a lab VM needs, or None."""
    if _tool("vng") is None:
        return "virtme-ng (vng) not installed", "pip install -e '.[lab]' (./setup.sh)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not found", "apt-get install qemu-system-x86 (./setup.sh)"
    if shutil.which("busybox") is None:
        return "busybox not found", "apt-get install busybox-static (./setup.sh)"
    if not any(Path(p).exists() for p in ("/lib/systemd/systemd-udevd", "/sbin/udevd")):
        return ("udev not installed (the L1 needs udevd for /dev/virtio-ports)",
                "apt-get install udev (./setup.sh)")
    return None


def labvm_check(specs: Sequence[str] = DEFAULT_KERNELS) -> Check:
    """doctor's row for the nested lab VM, booting the kernels ``specs``
    (the lab's default axis unless a job names its own)."""
    name = "nested lab VM"
    missing = _missing_parts()
    if missing:
        return Check(name, FAIL, missing[0], missing[1])
    try:
        ks = [resolve_kernel(spec) for spec in specs]
    except RigError as e:
        return Check(name, FAIL, str(e), "sudo .venv/bin/python -m vmrig.kernel fetch")
    accel, why = choose_accel("auto")
    detail = f"{', '.join(k.release for k in ks)}; {why}"
    if len(detail) > 60:  # one doctor line: the accelerator, not its reason
        detail = f"{', '.join(k.release for k in ks)}; {accel.upper()}"
    return Check(name, OK, detail)


def _script(command: Sequence[str], outdir: Path, state: Path, cwd: Path, accel: str,
            timeout: float, images: Sequence[labimage.Image] = ()) -> str:
    """The L1's side: set up, run COMMAND as root, record its status.

    A watchdog reports, shortly before the host's deadline, what every task
    is doing (ps, blocked tasks, each CPU's backtrace) and the Python stacks
    of slotscope processes, so that a hang leaves its cause in console.log."""
    q = shlex.quote
    report_at = max(int(timeout) - HANG_REPORT_S, 1)
    chosen = os.environ.get("SLOTSCOPE_QEMU")
    qemu_env = f"export SLOTSCOPE_QEMU={q(chosen)}" if chosen else ""
    return f"""#!/bin/sh
# Generated by vmrig.labvm; runs inside the L1.
cat /proc/uptime > {q(str(state / 'guest-start'))}
# This boot's text symbols, for the host's report of a hung L1 (KASLR moves
# them; Debian's System.map is a stub).  In the background: a few seconds.
grep ' [tTwW] ' /proc/kallsyms > {q(str(state / 'kallsyms'))} 2>/dev/null &
export PATH={q(str(VENV_BIN))}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export SLOTSCOPE_LABVM=1 SLOTSCOPE_LABVM_OUT={q(str(outdir))} {ACCEL_ENV}={q(accel)}
export SLOTSCOPE_LABVM_SCRATCH=/run/labvm-scratch PYTHONDONTWRITEBYTECODE=1
{qemu_env}
mkdir -p "$SLOTSCOPE_LABVM_SCRATCH"
# The trees start-up reads most, from read-only disks rather than 9p (labimage)
{labimage.mount_script(images)}
[ -e /sys/kernel/tracing/events ] || mount -t tracefs tracefs /sys/kernel/tracing
# udev normally loads the vendor module; do it by hand if it did not.
[ -e /dev/kvm ] || modprobe kvm_amd nested=1 2>/dev/null || modprobe kvm_intel nested=1
cd {q(str(cwd))} || exit 125
( sleep $(( {report_at} - $(cut -d. -f1 /proc/uptime) )) 2>/dev/null
  echo "labvm: deadline in {HANG_REPORT_S} s: what every task is doing" >&2
  ps -eo pid,stat,wchan:24,pcpu,etimes,args >&2
  # The Python stacks first: they are the cheapest and say the most.  The
  # sysrq backtrace (l) waits up to 10 s per CPU for its NMI, and under
  # TCG the console drains slowly: stacks asked for after it were cut off
  # by the kill once (CI).  SIGUSR1 only where the stack dump is installed
  # (SigCgt bit 9): before that, it would kill the process.
  for p in $(pgrep -f '(bin/slotscope|-m slotscope) '); do
    c=$(awk '/^SigCgt/ {{print $2}}' /proc/$p/status 2>/dev/null)
    [ -n "$c" ] && [ $(( 0x$c & 0x200 )) -ne 0 ] && kill -USR1 $p
  done
  sleep 1
  echo w > /proc/sysrq-trigger; echo l > /proc/sysrq-trigger ) &
watchdog=$!
{shlex.join(command)}
rc=$?
kill $watchdog 2>/dev/null
echo $rc > {q(str(state / 'rc'))}
exit $rc
"""


def _vng_command(kernel: Path, accel: str, script: Path, outdir: Path, cwd: Path,
                 memory: str, cpus: int | None, qmp: Path,
                 images: Sequence[labimage.Image] = ()) -> list[str]:
    vng = _tool("vng")
    busybox = shutil.which("busybox")
    if vng is None or busybox is None:
        missing = _missing_parts() or ("vng or busybox missing", "./setup.sh")
        raise RigError(f"{missing[0]}; fix: {missing[1]}")
    guests = guestbuild.shared_dir()
    cmd = [vng, "--verbose", "--busybox", busybox, "--run", str(kernel), "--force-9p",
           "--user", "root", "--memory", memory, "--rwdir", str(outdir), "--cwd", str(cwd),
           # vng puts a tmpfs on /var/cache: the lab kernels (the L2's Linux
           # guest boots one) must still be seen inside, and the guests the
           # host built (the L2's initramfs: a gcc -static of ~11 s on a TCG
           # vCPU); the L1 builds what is missing beside them (guestbuild)
           *([f"--rodir={CACHE_ROOT}"] if CACHE_ROOT.is_dir() else []),
           *([f"--rodir={guests}"] if guests.is_dir() else []),
           "--exec", f"sh {shlex.quote(str(script))}",
           # a monitor for the host's report of a hung L1 (l1report)
           # "=": argparse takes a separate value starting with "-" for an option
           f"--qemu-opts=-qmp unix:{qmp},server=on,wait=off "
           + " ".join(labimage.qemu_opts(images))]
    qemu = host.qemu_binary()  # $SLOTSCOPE_QEMU or PATH's: the L0 and, inside, the L2's
    if qemu:
        cmd += ["--qemu", qemu]
    if accel == "tcg":
        cmd.insert(1, "--disable-kvm")
        cmd += ["--append", TCG_CMDLINE]
    if cpus:
        cmd += ["--cpus", str(cpus)]
    return cmd


def _pump(stream: TextIO, sinks: list[TextIO], tail: collections.deque[str] | None) -> None:
    for line in stream:
        for s in sinks:
            s.write(line)
            s.flush()
        if tail is not None:
            tail.append(line.rstrip("\n"))


def _kill_group(p: subprocess.Popen[str]) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_in_labvm(command: Sequence[str], *, accel: str = "auto",
                 kernel: str | os.PathLike[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT,
                 outdir: str | os.PathLike[str] | None = None,
                 cwd: str | os.PathLike[str] | None = None,
                 memory: str = DEFAULT_MEMORY, cpus: int | None = None,
                 echo: bool = True,
                 watch: Callable[[], str | None] | None = None,
                 state_dir: str = STATE_DIR) -> LabResult:
    """Boot the L1, run ``command`` as root inside, return its status.

    ``outdir`` (created; default ./labvm-out) is writable from inside at the
    same path and exported as $SLOTSCOPE_LABVM_OUT; ``cwd`` (default: outdir)
    is where the command starts.  ``outdir/labvm/`` keeps the generated
    script, ``stdout.log``, ``console.log`` (kernel console and the
    command's stderr) and ``result.json``.  After ``timeout`` seconds the VM
    is killed and the result says ``timed_out`` with the last console lines.
    ``echo`` copies the command's stdout (and stderr) to ours as it runs.
    ``watch``, called every second on the host, may end the run early: the
    reason it returns kills the VM as the deadline would (host report first).
    ``state_dir``: where under ``outdir`` the files above go (the lab keeps
    one per L1 boot).
    """
    if not command:
        raise RigError("no command given to run in the lab VM")
    if timeout <= 0:
        raise RigError(f"timeout must be positive, not {timeout}")
    accel, _why = choose_accel(accel)
    if kernel is None:
        k: LabKernel = lab_kernel()
        kernel_path = k.vmlinux
    else:
        kernel_path = Path(kernel)
        if not kernel_path.is_file():
            raise RigError(f"kernel image {kernel_path} not found")
    out = Path(outdir or "labvm-out").absolute()
    images = labimage.images(VENV_BIN.parent, kernel_path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        state = out / state_dir
        state.mkdir(parents=True, exist_ok=True)
        for stale in ("rc", "guest-start", "result.json"):
            (state / stale).unlink(missing_ok=True)
        script = state / "run.sh"
        work = Path(cwd).absolute() if cwd else out
        script.write_text(_script(command, out, state, work, accel, timeout, images))
    except OSError as e:
        raise RigError(f"cannot prepare output directory {out}: {e.strerror}") from None
    # unix socket paths are short (108 bytes): not under the output directory
    sockdir = tempfile.TemporaryDirectory(prefix="slotscope-l1-",
                                          dir="/run" if os.access("/run", os.W_OK) else None)
    qmp = Path(sockdir.name) / "qmp.sock"
    try:
        cmd = _vng_command(kernel_path, accel, script, out, work, memory, cpus, qmp, images)
    except BaseException:
        sockdir.cleanup()
        raise
    host_report: list[str] = []
    reporter = threading.Timer(max(timeout - HOST_REPORT_S, 1.0), lambda: host_report.extend(
        l1report.report(qmp, state / "kallsyms")))
    reporter.daemon = True
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    tail: collections.deque[str] = collections.deque(maxlen=CONSOLE_TAIL)
    t0 = time.monotonic()
    with sockdir, open(state / "stdout.log", "w") as so, open(state / "console.log", "w") as co:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, errors="replace", env=env,
                             cwd=work if work.is_dir() else out, start_new_session=True)
        assert p.stdout is not None and p.stderr is not None
        pumps = [
            threading.Thread(target=_pump, args=(p.stdout, [so] + ([sys.stdout] if echo
                                                                    else []), None)),
            threading.Thread(target=_pump, args=(p.stderr, [co], tail)),
        ]
        for t in pumps:
            t.daemon = True
            t.start()
        reporter.start()
        timed_out = False
        kill_reason = ""
        try:
            kill_reason = _wait(p, t0, timeout, watch)
            if kill_reason:
                timed_out = True
                reporter.cancel()
                reporter.join(timeout=HOST_REPORT_S)  # if it is reading, it has had its time
                if not host_report:  # killed before the deadline: the host report now
                    host_report.extend(l1report.report(qmp, state / "kallsyms"))
                _kill_group(p)
        except BaseException:
            _kill_group(p)
            raise
        finally:
            reporter.cancel()
        for t in pumps:
            t.join(timeout=5)
        if host_report:
            co.write(f"labvm: host report before the kill ({kill_reason}, host clock): "
                     "each L1 vCPU\n")
            co.writelines(f"labvm:   {ln}\n" for ln in host_report)
    elapsed = time.monotonic() - t0
    rc_file = state / "rc"
    rc: int | None = None
    if rc_file.exists():
        try:
            rc = int(rc_file.read_text().strip())
        except ValueError:
            rc = None
    elif not timed_out:
        rc = p.returncode if p.returncode != 0 else 255  # L1 died before COMMAND ended
    boot_s = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        boot_s = float((state / "guest-start").read_text().split()[0])
    result = LabResult(returncode=None if timed_out else rc, accel=accel,
                       kill_reason=kill_reason,
                       elapsed_s=round(elapsed, 3), timed_out=timed_out, outdir=out,
                       console_tail=list(tail), boot_s=boot_s,
                       panic=_panic(state / "console.log"),
                       lockup=_lockup(state / "console.log"), timeout_s=timeout,
                       host_report=host_report)
    (state / "result.json").write_text(json.dumps(
        {"returncode": result.returncode, "accel": accel, "elapsed_s": result.elapsed_s,
         "timed_out": timed_out, "kill_reason": kill_reason, "boot_s": boot_s,
         "kernel": str(kernel_path), "images": [str(i.path) for i in images],
         "command": list(command), "panic": result.panic, "lockup": result.lockup,
         "host_report": host_report},
        indent=2) + "\n")
    return result


def _wait(p: subprocess.Popen[str], t0: float, timeout: float,
          watch: Callable[[], str | None] | None) -> str:
    """Wait for the VM to end; '' if it did, else why it must be killed."""
    while (left := t0 + timeout - time.monotonic()) > 0:
        try:
            p.wait(timeout=min(left, 1.0) if watch else left)
            return ""
        except subprocess.TimeoutExpired:
            if watch is not None and (why := watch()):
                return why
    return f"killed after {timeout:.0f} s"


# The L1 kernel's own console lines (printk, with or without its time
# stamp), and what they say.  Other lines are the command's: lab-run quotes
# an L2's serial in its errors, and an L2 "Kernel panic" quoted there once
# marked a sound L1 as panicked.
_PRINTK = r"^(?:\[\s*\d+\.\d+\] )?"
_L1_PANIC = re.compile(_PRINTK + r"(Kernel panic - .*)")
_L1_STALL = re.compile(_PRINTK + r"(?:watchdog: BUG: )?(soft lockup - .*|rcu: .*detected "
                       r"stalls on CPUs.*)")


def _console_lines(console: Path) -> list[str]:
    try:
        return console.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _lockup(console: Path) -> str:
    """The L1's last soft-lockup report, '' if none: under TCG, L1 vCPUs
    have been seen stuck at one instruction for minutes (interrupts only)."""
    # an RCU stall report is the same kind of evidence: CPUs that stopped
    # (seen in a 6.12 L1 that then died under a virtio-mem L2)
    found = [m[1].strip() for ln in _console_lines(console) if (m := _L1_STALL.match(ln))]
    return found[-1] if found else ""


def _panic(console: Path) -> str:
    """The L1's panic line and the task it hit, '' if it did not panic
    (panic=-1 makes the L1 reboot at once, and -no-reboot ends QEMU)."""
    lines = _console_lines(console)
    for i, line in enumerate(lines):
        if m := _L1_PANIC.match(line):
            why = m[1].strip()
            task = next((m[1] for ln in lines[i + 1:i + 3]
                         if (m := re.search(r"Comm: (.+?) (?:Not tainted|Tainted)", ln))), "")
            return why + (f" (task {task})" if task else "")
    return ""
