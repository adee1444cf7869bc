"""A lab run's status (``lab-run.json`` beside its data) and the lab-fault
reruns: which failures are the lab's own (TCG-nested L1/L2 faults) and are
run again, decided by the failure's type, never by its message."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from vmrig.errors import GuestFault, L1Fault, RigError

from .errors import RunFailed

STATUS = "lab-run.json"
# TCG-nested L2 faults come in streaks: the pcdimm L2 of the nested lab test
# faulted on the first attempt in 3 of 5 full test runs here, in 1 of 19
# lab-runs looped in one L1.  Two reruns keep a CI run from failing on them.
LAB_FAULT_RERUNS = 2


@dataclass
class RunStatus:
    scenario: str
    rep: int
    ok: bool
    mode: str
    elapsed_s: float
    error: str | None = None
    accel: str | None = None
    # Why earlier attempts were thrown away (TCG-nested L1/L2 faults), " | "-joined.
    retried: str | None = None
    # The failure's type and kind, e.g. "guest_fault:reset", "l1_fault:lockup".
    kind: str | None = None
    # The kinds of the attempts thrown away, in the order of ``retried``.
    retried_kinds: list[str] = field(default_factory=list)
    kernel: str | None = None  # the L1's release (nested) or the host's (direct)
    # The typed failure itself, in the process that met it; lab-run.json
    # keeps its message (``error``) and ``kind``.
    failure: RigError | RunFailed | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.failure is not None:
            self.error = str(self.failure)
            self.kind = self.failure.kind_tag


def read_status(run_dir: Path) -> RunStatus | None:
    try:
        return RunStatus(**json.loads((run_dir / STATUS).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_status(run_dir: Path, st: RunStatus) -> None:
    tmp = run_dir / f".{STATUS}.tmp"
    record = {f.name: getattr(st, f.name) for f in fields(st) if f.name != "failure"}
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, run_dir / STATUS)


def lab_fault(accel: str | None, f: Exception | None) -> bool:
    """An L1 panic or soft lockup, or an L2 guest fault the rig names, under
    TCG-emulated nesting: not the scenario's doing.  An L1 that merely hung
    (no lockup report) may have been waiting on the run itself: not rerun."""
    return accel == "tcg" and (
        isinstance(f, GuestFault) or (isinstance(f, L1Fault) and f.kind != "hang"))


class Reruns:
    """The lab-fault reruns of each run: why each attempt was thrown away."""

    def __init__(self) -> None:
        self.why: dict[Path, list[str]] = {}
        self.kinds: dict[Path, list[str]] = {}

    def count(self, run_dir: Path) -> int:
        """The attempts at ``run_dir`` thrown away so far."""
        return len(self.why.get(run_dir, []))

    def took(self, run_dir: Path, attempts: list[dict[str, str]]) -> None:
        """Attempts the inner side threw away and ran again itself (an L2
        fault in a sound L1, slotscope.labrun), each {"error", "kind"}."""
        self.why.setdefault(run_dir, []).extend(a["error"] for a in attempts)
        self.kinds.setdefault(run_dir, []).extend(a["kind"] for a in attempts)

    def again(self, st: RunStatus, run_dir: Path, log: Callable[[str], None]) -> bool:
        """True if ``st`` is a lab fault to run again (its directory kept as
        ``<rep>.fault<n>``); else ``st`` gets the reruns' history."""
        why = self.why.setdefault(run_dir, [])
        kinds = self.kinds.setdefault(run_dir, [])
        if lab_fault(st.accel, st.failure) and len(why) < LAB_FAULT_RERUNS:
            assert st.error is not None and st.kind is not None
            why.append(st.error)
            kinds.append(st.kind)
            log(f"{st.kernel}/{st.scenario}/{st.rep}: lab fault ({st.kind}), run again: "
                f"{st.error}")
            kept = run_dir.with_name(f"{run_dir.name}.fault{len(why)}")
            shutil.rmtree(kept, ignore_errors=True)
            run_dir.rename(kept)
            return True
        st.retried = " | ".join(why) or None
        st.retried_kinds = list(kinds)
        return False
