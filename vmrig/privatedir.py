"""The private directories of rigs: who owns one, and the sweep of stale ones.

Each rig keeps its QMP socket, serial log, guest image and pidfile in a
directory of its own (``slotscope-rig-*`` in the temp dir, mode 0700).  Its
owner file names the process that made it (and a TAP it made), so that a
later rig can remove what a SIGKILLed one left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import psutil

from vmrig.errors import RigError
from vmrig.rigstate import STATE_FILE

PRIVATE_PREFIX = "slotscope-rig-"
OWNER_FILE = "owner.json"


def make_private_dir(path: Path | None) -> Path:
    """A new private directory (owned by us, for the sweep), or ``path``
    (``rig up``'s state directory) made 0700; RigError if a rig is up there."""
    if path is None:
        d = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX))
        write_owner(d, None)
        return d
    if (path / STATE_FILE).exists():
        raise RigError(f"a rig is already up ({path}); run: slotscope rig down")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_owner(d: Path, tap_name: str | None) -> None:
    """Name this process (and the TAP it is about to make) as ``d``'s owner."""
    me = psutil.Process()
    (d / OWNER_FILE).write_text(json.dumps({"pid": me.pid, "create_time": me.create_time(),
                                            "tap": tap_name}))


def _alive(pid: int, create_time: float | None = None) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and (
            create_time is None or p.create_time() == create_time)
    except psutil.Error:
        return False


def sweep_stale(root: Path | None = None) -> list[Path]:
    """Remove private dirs (and their TAPs) left by rigs whose owner was
    SIGKILLed: the owner is gone and so is its QEMU (PR_SET_PDEATHSIG)."""
    removed = []
    for d in (root or Path(tempfile.gettempdir())).glob(PRIVATE_PREFIX + "*"):
        try:
            owner = json.loads((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(owner["pid"]), owner.get("create_time")):
            continue
        try:
            qpid = int((d / "qemu.pid").read_text())
        except (OSError, ValueError):
            qpid = 0
        if qpid and _alive(qpid):
            continue
        if owner.get("tap"):
            from vmrig import tap
            with contextlib.suppress(RigError, OSError):
                tap.delete(owner["tap"])
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
