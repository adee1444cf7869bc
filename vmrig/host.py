"""Host checks for QEMU: binary, version, and whether each accelerator starts.

Checks start QEMU for real (drgn style: try it rather than guess from
versions) and talk to it over QMP with qemu.qmp (vmrig.qmp), so they can run
from ``slotscope doctor``; each reports a ``recording.hostfacts.Check`` row.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from recording.hostfacts import FAIL, OK, WARN, Check, pvm_host
from vmrig import RigError
from vmrig.config import KVM_SAFE_CPU
from vmrig.qmp import QemuGone, Qmp

QEMU_BINARY = "qemu-system-x86_64"
MIN_VERSION = (7, 0)
LAB_VERSION = (8, 2)  # what the lab wants: dynamic-memslots, a TCG that runs the L1


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


def version_text(binary: str | None = None, timeout: float = 10.0) -> str | None:
    """The QEMU version ("10.0.2") of ``binary`` (default: qemu_binary()),
    None without a QEMU: what the lab's manifests and summary record."""
    path = qemu_binary(binary)
    v = qemu_version(path, timeout) if path else None
    return ".".join(map(str, v)) if v else None


# (binary, its mtime, driver) -> properties: every virtio-mem run asks, and
# in the TCG L1 each answer cost ~0.45 s of QEMU start-up (lab-run's runs
# share one process).  Only answers are kept, not a failure to get one.
_PROPERTIES: dict[tuple[str, int, str], frozenset[str]] = {}


def device_properties(binary: str, driver: str, timeout: float = 10.0) -> frozenset[str]:
    """Property names QEMU lists for ``-device DRIVER,help`` (empty if unknown)."""
    try:
        key: tuple[str, int, str] | None = (binary, os.stat(binary).st_mtime_ns, driver)
    except OSError:
        key = None  # e.g. a name on PATH: asked, not kept
    if key in _PROPERTIES:
        return _PROPERTIES[key]
    try:
        out = subprocess.run([binary, "-device", f"{driver},help"], capture_output=True,
                             text=True, timeout=timeout, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    props = frozenset(m[1] for m in re.finditer(r"^\s+([\w-]+)=", out, re.M))
    if props and key is not None:
        _PROPERTIES[key] = props
    return props


@dataclass
class Probe:
    """What one short QEMU start showed."""

    ok: bool
    detail: str
    seconds: float = 0.0
    replies: dict[str, Any] = field(default_factory=dict)


def probe_accel(binary: str, accel: str, cpu: str = KVM_SAFE_CPU, run: float = 0.5,
                timeout: float = 10.0) -> Probe:
    """Start a diskless PC under ``accel``, let its firmware run for ``run``
    seconds and check over QMP that it is still running.  The one "does
    QEMU start" check; synchronous (it runs its own event loop)."""
    return asyncio.run(_probe_accel(binary, accel, cpu, run, timeout))


async def _probe_accel(binary: str, accel: str, cpu: str, run: float,
                       timeout: float) -> Probe:
    # QMP on one end of a socket pair, QEMU holding the other: no socket
    # file to wait for or clean up.
    ours, theirs = socket.socketpair()
    argv = [binary, "-accel", accel, "-machine", "pc", "-cpu", cpu, "-m", "64M",
            "-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none",
            "-chardev", f"socket,id=qmp,fd={theirs.fileno()}",
            "-mon", "chardev=qmp,mode=control", "-no-reboot"]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, pass_fds=[theirs.fileno()])
    except OSError as e:
        ours.close()
        return Probe(False, f"cannot run {binary}: {e.strerror}")
    finally:
        theirs.close()
    qmp = Qmp("slotscope-probe", timeout=timeout)
    replies: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            await qmp.connect(ours)
            replies["query-kvm"] = await qmp.execute("query-kvm")
            await asyncio.sleep(run)
            replies["query-status"] = await qmp.execute("query-status")
            with contextlib.suppress(QemuGone):  # QEMU may hang up before replying
                await qmp.execute("quit")
        await asyncio.to_thread(proc.wait, max(0.1, start + timeout - time.monotonic()))
    except (RigError, TimeoutError, subprocess.TimeoutExpired) as e:
        exited = proc.poll()
        proc.kill()
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a child of it holds stderr open
            err = b""
        why = err.decode(errors="replace").strip().splitlines()
        # QEMU's own last words (e.g. "unable to find CPU model") say more
        # than the QMP side of its exit.
        if why:
            reason = why[-1]
        elif exited is not None:
            reason = f"{binary} exited with status {exited}"
        else:
            reason = "timed out" if isinstance(e, TimeoutError) else str(e)
        return Probe(False, reason, time.monotonic() - start, replies)
    finally:
        await qmp.close()
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    seconds = time.monotonic() - start
    status = replies["query-status"].get("status")
    if status != "running":
        return Probe(False, f"guest {status} after {run:.1f} s", seconds, replies)
    if accel == "kvm" and not replies["query-kvm"].get("enabled"):
        return Probe(False, "query-kvm: KVM not enabled", seconds, replies)
    return Probe(True, f"starts (-cpu {cpu})", seconds, replies)


def qemu_checks(timeout: float = 10.0) -> list[Check]:
    """The QEMU rows of ``slotscope doctor``."""
    binary = qemu_binary()
    if binary is None:
        return [Check("qemu binary", FAIL, f"{QEMU_BINARY} not found",
                      "run ./setup.sh (apt qemu-system-x86) or set SLOTSCOPE_QEMU")]
    checks = [Check("qemu binary", OK, binary)]
    version = qemu_version(binary, timeout)
    if version is None:
        return [*checks, Check("qemu version", FAIL, f"{binary} --version gave no version",
                               "reinstall qemu-system-x86")]
    vtext = ".".join(map(str, version))
    if version[:2] < MIN_VERSION:
        checks.append(Check("qemu version", FAIL, vtext,
                            f"the rig needs QEMU >= {'.'.join(map(str, MIN_VERSION))}"))
    elif version[:2] < LAB_VERSION:
        checks.append(Check(
            "qemu version", WARN, f"{vtext}: no virtio-mem dynamic-memslots, and under its "
            "TCG a traced nested L1 livelocked in 2 of 3 runs (QEMU 10: 0 of 4)",
            f"QEMU >= {'.'.join(map(str, LAB_VERSION))} (./setup.sh: bookworm-backports on "
            "Debian 12)"))
    else:
        checks.append(Check("qemu version", OK, vtext))
    if "dynamic-memslots" in device_properties(binary, "virtio-mem-pci", timeout):
        checks.append(Check("virtio-mem memslots", OK, "dynamic-memslots supported"))
    else:
        checks.append(Check("virtio-mem memslots", WARN,
                            f"no dynamic-memslots in QEMU {vtext}: a virtio-mem device is "
                            "one memslot, resizes change none",
                            "QEMU >= 8.2; pc-dimm workloads work anyway"))
    checks.append(_kvm_check(binary, timeout))
    p = probe_accel(binary, "tcg", timeout=timeout)
    if p.ok:
        checks.append(Check("qemu -accel tcg", OK, f"{p.detail}, {p.seconds:.1f} s"))
    else:
        checks.append(Check("qemu -accel tcg", FAIL, f"does not start: {p.detail}",
                            "reinstall qemu-system-x86"))
    return checks


def _kvm_check(binary: str, timeout: float) -> Check:
    name = "qemu -accel kvm"
    if not os.path.exists("/dev/kvm"):
        return Check(name, WARN, "no /dev/kvm; the rig uses TCG",
                     "load kvm-intel/kvm-amd, or run on a KVM host")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Check(name, WARN, "/dev/kvm not read/writable; using TCG",
                     "run as root or join the kvm group")
    p = probe_accel(binary, "kvm", timeout=timeout)
    if not p.ok:
        return Check(name, WARN, f"does not start: {p.detail}",
                     "the rig falls back to TCG; check dmesg for KVM errors")
    detail = f"{p.detail}, {p.seconds:.1f} s"
    if pvm_host():
        return Check(name, WARN, detail + "; kvm_pvm: the bare guest runs, Linux guests use TCG",
                     "a hardware-virt KVM host (or the nested lab VM) for Linux")
    return Check(name, OK, detail)
