"""Guest snapshots: boot a Linux guest once, restore it for every run.

In the TCG lab VM a Linux L2 takes 13-15 s from QEMU's start to its ready
line, and the lab boots one per run.  Saved right after that line and
restored instead, the same guest runs again in ~3 s (measured 2026-12-03 in
a Debian 6.1 L1 under QEMU 10.0.2 TCG, the L2 256 MB: save 1.6 s, 68 MB on
disk; three restores 3.2 s each from QEMU's start to a running guest, the
guest's _OST for a pc-dimm plugged after each).  A restored guest is a new
KVM VM: its memslots are created afresh and no SPTE survives, which is the
state a fresh boot reaches; every run restored from one file also starts
from the same guest state.

The file is QEMU's own migration stream written to a file with the
``mapped-ram`` capability (QEMU >= 9.0): every RAM page at a fixed offset,
zero pages left as holes, loaded by plain reads (a restore of the plain
stream took 5.6-6.8 s).  ``Snapshots`` keeps them by QEMU's command line,
the rig's private directory left out, so every run of one configuration
finds the same file.  ``vmrig.rig.Rig(snapshots=...)`` uses it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmrig.errors import SnapshotError
from vmrig.qmp import Qmp

__all__ = ["MIN_QEMU", "Snapshots", "restore", "save", "supported"]

MIN_QEMU = (9, 0)  # mapped-ram
_CAPS = {"capabilities": [{"capability": "mapped-ram", "state": True}]}
_POLL_S = 0.05


def supported(version: dict[str, Any]) -> bool:
    """Whether the QEMU of a QMP greeting (``Qmp.version``) can take a
    snapshot of this kind."""
    return (int(version.get("major", 0)), int(version.get("minor", 0))) >= MIN_QEMU


class Snapshots:
    """Snapshot files in ``directory`` (the caller's, e.g. a temporary
    directory for one lab-run process), one per QEMU command line."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.failed: set[Path] = set()  # configurations whose save failed: not tried again

    def path_for(self, argv: Sequence[str], private_dir: Path) -> Path:
        """Where the snapshot of a guest started with ``argv`` is kept.
        Paths under the rig's ``private_dir`` (sockets, logs, the kernel's
        copy) differ from run to run and are left out of the key."""
        own = str(private_dir)
        key = hashlib.sha256("\0".join(a.replace(own, "@") for a in argv).encode())
        return self.directory / f"{key.hexdigest()[:16]}.mig"


async def _migration_status(qmp: Qmp, what: str, timeout: float) -> dict[str, Any]:
    """query-migrate's answer once the migration has ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = dict(await qmp.execute("query-migrate"))
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if loop.time() > deadline:
            raise SnapshotError(what, f"not done after {timeout:g} s ({info.get('status')})")
        await asyncio.sleep(_POLL_S)


async def save(qmp: Qmp, path: Path, timeout: float) -> None:
    """Pause the guest and write it to ``path``; the guest stays paused.
    A partial file never takes ``path``'s name."""
    part = path.with_name(path.name + ".part")
    await qmp.execute("stop")
    await qmp.execute("migrate-set-capabilities", _CAPS)
    await qmp.execute("migrate", {"uri": f"file:{part}"})
    info = await _migration_status(qmp, "save", timeout)
    if info.get("status") != "completed":
        part.unlink(missing_ok=True)
        raise SnapshotError("save", str(info.get("error-desc") or info.get("status")))
    os.replace(part, path)


async def restore(qmp: Qmp, path: Path, timeout: float) -> None:
    """Load ``path`` into a QEMU started with ``-incoming defer`` and run it.
    The guest was paused when saved, so QEMU leaves it paused once loaded."""
    await qmp.execute("migrate-set-capabilities", _CAPS)
    await qmp.execute("migrate-incoming", {"uri": f"file:{path}"})
    info = await _migration_status(qmp, "restore", timeout)
    if info.get("status") != "completed":
        raise SnapshotError("restore", str(info.get("error-desc") or info.get("status")))
    status = (await qmp.execute("query-status"))["status"]
    if status != "paused":
        raise SnapshotError("restore", f"the guest is {status!r} after the load, not paused")
    await qmp.execute("cont")
