"""Host checks for QEMU: binary, version, and whether each accelerator starts.

Checks start QEMU for real (drgn style: try it rather than guess from
versions) and talk raw QMP over the child's stdio, so they need nothing but
the standard library and can run from ``slotscope doctor``.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QEMU_BINARY = "qemu-system-x86_64"
# kvm_pvm hosts reject MSR 0x10a with -cpu host/max on some kernels; this model
# starts on every KVM we have met, so the rig uses it unless told otherwise.
KVM_SAFE_CPU = "qemu64,-cx16,-xsave"
MIN_VERSION = (7, 0)
DYNAMIC_MEMSLOTS_VERSION = (8, 2)

Check = tuple[str, str, str, str]


def qemu_binary(explicit: str | None = None) -> str | None:
    """The QEMU binary: an explicit path, $SLOTSCOPE_QEMU, else PATH."""
    name = explicit or os.environ.get("SLOTSCOPE_QEMU") or QEMU_BINARY
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name)


def qemu_version(binary: str, timeout: float = 10.0) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=timeout, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def device_properties(binary: str, driver: str, timeout: float = 10.0) -> set[str]:
    """Property names QEMU lists for ``-device DRIVER,help`` (empty if unknown)."""
    try:
        out = subprocess.run([binary, "-device", f"{driver},help"], capture_output=True,
                             text=True, timeout=timeout, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {m[1] for m in re.finditer(r"^\s+([\w-]+)=", out, re.M)}


@dataclass
class Probe:
    """What one short QEMU start showed."""

    ok: bool
    detail: str
    seconds: float = 0.0
    replies: dict[str, Any] = field(default_factory=dict)


def _read_json_line(proc: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    assert proc.stdout is not None
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            raise TimeoutError
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            raise EOFError
        buf += chunk
    return json.loads(buf)


def _command(proc: subprocess.Popen[bytes], cmd: str, deadline: float) -> Any:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps({"execute": cmd}).encode() + b"\n")
    proc.stdin.flush()
    while True:
        msg = _read_json_line(proc, deadline)
        if "event" in msg:
            continue
        if "error" in msg:
            raise RuntimeError(f"{cmd}: {msg['error'].get('desc')}")
        return msg.get("return")


def probe_accel(binary: str, accel: str, cpu: str = KVM_SAFE_CPU, run: float = 0.5,
                timeout: float = 10.0) -> Probe:
    """Start a diskless PC under ``accel``, let its firmware run for ``run``
    seconds and check over QMP that it is still running."""
    argv = [binary, "-accel", accel, "-machine", "pc", "-cpu", cpu, "-m", "64M",
            "-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none",
            "-qmp", "stdio", "-no-reboot"]
    start = time.monotonic()
    deadline = start + timeout
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as e:
        return Probe(False, f"cannot run {binary}: {e.strerror}")
    replies: dict[str, Any] = {}
    try:
        _read_json_line(proc, deadline)  # greeting
        _command(proc, "qmp_capabilities", deadline)
        replies["query-kvm"] = _command(proc, "query-kvm", deadline)
        time.sleep(run)
        replies["query-status"] = _command(proc, "query-status", deadline)
        _command(proc, "quit", deadline)
        proc.wait(max(0.1, deadline - time.monotonic()))
    except (TimeoutError, EOFError, RuntimeError, json.JSONDecodeError,
            subprocess.TimeoutExpired, BrokenPipeError) as e:
        proc.kill()
        _, err = proc.communicate()
        why = err.decode(errors="replace").strip().splitlines()
        reason = why[-1] if why else ("timed out" if isinstance(e, TimeoutError)
                                      else str(e) or type(e).__name__)
        return Probe(False, reason, time.monotonic() - start, replies)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f:
                f.close()
    seconds = time.monotonic() - start
    status = replies["query-status"].get("status")
    if status != "running":
        return Probe(False, f"guest {status} after {run:.1f} s", seconds, replies)
    if accel == "kvm" and not replies["query-kvm"].get("enabled"):
        return Probe(False, "query-kvm: KVM not enabled", seconds, replies)
    return Probe(True, f"starts (-cpu {cpu})", seconds, replies)


def kvm_flavour() -> str:
    """'kvm_pvm' when /dev/kvm comes from the PVM module (it emulates every
    guest instruction: Linux guests do not boot), else 'kvm'."""
    return "kvm_pvm" if Path("/sys/module/kvm_pvm").exists() else "kvm"


def qemu_checks(timeout: float = 10.0) -> list[Check]:
    """(name, 'OK'|'WARN'|'FAIL', detail, fix) rows for ``slotscope doctor``."""
    checks: list[Check] = []
    binary = qemu_binary()
    if binary is None:
        checks.append(("qemu binary", "FAIL", f"{QEMU_BINARY} not found",
                       "run ./setup.sh (apt qemu-system-x86) or set SLOTSCOPE_QEMU"))
        return checks
    checks.append(("qemu binary", "OK", binary, ""))
    version = qemu_version(binary, timeout)
    if version is None:
        checks.append(("qemu version", "FAIL", f"{binary} --version gave no version",
                       "reinstall qemu-system-x86"))
        return checks
    vtext = ".".join(map(str, version))
    if version[:2] < MIN_VERSION:
        checks.append(("qemu version", "FAIL", vtext,
                       f"the rig needs QEMU >= {'.'.join(map(str, MIN_VERSION))}"))
    else:
        checks.append(("qemu version", "OK", vtext, ""))
    if "dynamic-memslots" in device_properties(binary, "virtio-mem-pci", timeout):
        checks.append(("virtio-mem memslots", "OK", "dynamic-memslots supported", ""))
    else:
        checks.append(("virtio-mem memslots", "WARN",
                       f"no dynamic-memslots in QEMU {vtext}: a virtio-mem device is "
                       "one memslot, resizes change none",
                       "QEMU >= 8.2; pc-dimm workloads work anyway"))

    if not os.path.exists("/dev/kvm"):
        checks.append(("qemu -accel kvm", "WARN", "no /dev/kvm; the rig uses TCG",
                       "load kvm-intel/kvm-amd, or run on a KVM host"))
    elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
        checks.append(("qemu -accel kvm", "WARN", "/dev/kvm not read/writable; using TCG",
                       "run as root or join the kvm group"))
    else:
        p = probe_accel(binary, "kvm", timeout=timeout)
        if p.ok:
            detail = f"{p.detail}, {p.seconds:.1f} s"
            if kvm_flavour() == "kvm_pvm":
                checks.append(("qemu -accel kvm", "WARN", detail + "; kvm_pvm: the bare "
                               "guest runs, Linux guests use TCG",
                               "a hardware-virt KVM host (or the nested lab VM) for Linux"))
            else:
                checks.append(("qemu -accel kvm", "OK", detail, ""))
        else:
            checks.append(("qemu -accel kvm", "WARN", f"does not start: {p.detail}",
                           "the rig falls back to TCG; check dmesg for KVM errors"))
    p = probe_accel(binary, "tcg", timeout=timeout)
    if p.ok:
        checks.append(("qemu -accel tcg", "OK", f"{p.detail}, {p.seconds:.1f} s", ""))
    else:
        checks.append(("qemu -accel tcg", "FAIL", f"does not start: {p.detail}",
                       "reinstall qemu-system-x86"))
    return checks
