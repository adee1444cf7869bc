"""What ``slotscope rig up`` leaves behind so that later commands
(``hotplug``, ``status``, ``down``) can find its QEMU: ``state.json`` in
the state directory (its config is rebuilt by vmrig.config.config_from_dict)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmrig.errors import RigError

STATE_FILE = "state.json"


def default_state_dir() -> Path:
    """Where ``rig up`` keeps a running rig for later commands."""
    env = os.environ.get("SLOTSCOPE_RIG_DIR")
    if env:
        return Path(env)
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    return base / "slotscope" / "rig"


@dataclass
class RigState:
    """A detached rig: its QEMU (pid and start time, so a recycled pid is
    never signalled), QMP socket, private directory and config."""

    pid: int
    create_time: float
    accel: str
    guest: str
    qmp_socket: str
    private_dir: str
    tap: str | None
    argv: list[str]
    boot_s: float
    vcpu_tids: dict[int, int]
    config: dict[str, Any] = field(default_factory=dict)

    def write(self, d: Path) -> None:
        tmp = d / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, d / STATE_FILE)

    @classmethod
    def read(cls, d: Path) -> RigState:
        try:
            raw = json.loads((d / STATE_FILE).read_text())
        except FileNotFoundError:
            raise RigError(f"no rig is up ({d}); run: slotscope rig up") from None
        except (OSError, json.JSONDecodeError) as e:
            raise RigError(f"{d / STATE_FILE}: unreadable ({e})") from None
        state = cls(**raw)
        state.vcpu_tids = {int(k): v for k, v in state.vcpu_tids.items()}  # JSON keys
        return state
