"""Memslot changes: what each kind asks of KVM, and the schedule that orders them.

Every kind of change lives in CHANGES, under its name in the recording
schema (recording.schema.CHANGE_TYPES): the region it passes to
KVM_SET_USER_MEMORY_REGION, the slot state it leaves, and how many memslot
swaps it costs KVM (each swap moves the memslot generation one step).
A schedule names changes on extra slots 1..64; "flags" is accepted for
"flags_only", the spelling it had before the schema's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from vmrig.microvm.errors import ScheduleError
from vmrig.microvm.kvmapi import KVM_MEM_LOG_DIRTY_PAGES

# Extra slot k lives at SLOT_HOME + k * SLOT_STRIDE, far above RAM and MMIO;
# MOVE alternates it between home and home + SLOT_MOVE_OFFSET.
SLOT_HOME = 0x10000000
SLOT_STRIDE = 0x1000000
SLOT_MOVE_OFFSET = 0x800000
SLOT_IDS = range(1, 65)  # 0 is RAM


@dataclass(frozen=True)
class SlotState:
    """An extra slot as this VMM last registered it."""

    sid: int
    size: int
    gpa: int
    flags: int = 0
    live: bool = False

    @property
    def home(self) -> int:
        return slot_home(self.sid)


@dataclass(frozen=True)
class Region:
    """The gpa, memory_size and flags of one KVM_SET_USER_MEMORY_REGION."""

    gpa: int
    size: int
    flags: int


@dataclass(frozen=True)
class ChangeKind:
    name: str          # the schema's change type
    on_live: bool      # applies to a registered slot (else: to one not registered)
    swaps: int         # memslot swaps KVM does for it (DELETE, MOVE: invalidate first)
    plan: Callable[[SlotState], tuple[Region, SlotState]]  # ioctl, state if it succeeds


def _create(s: SlotState) -> tuple[Region, SlotState]:
    return Region(s.gpa, s.size, s.flags), replace(s, live=True)


def _delete(s: SlotState) -> tuple[Region, SlotState]:
    return Region(s.gpa, 0, s.flags), replace(s, live=False, flags=0)


def _move(s: SlotState) -> tuple[Region, SlotState]:
    gpa = s.home + SLOT_MOVE_OFFSET if s.gpa == s.home else s.home
    return Region(gpa, s.size, s.flags), replace(s, gpa=gpa)


def _flags_only(s: SlotState) -> tuple[Region, SlotState]:
    flags = s.flags ^ KVM_MEM_LOG_DIRTY_PAGES
    return Region(s.gpa, s.size, flags), replace(s, flags=flags)


CHANGES: dict[str, ChangeKind] = {k.name: k for k in (
    ChangeKind("create", on_live=False, swaps=1, plan=_create),
    ChangeKind("delete", on_live=True, swaps=2, plan=_delete),
    ChangeKind("move", on_live=True, swaps=2, plan=_move),
    ChangeKind("flags_only", on_live=True, swaps=1, plan=_flags_only),
)}
ALIASES = {"flags": "flags_only"}

Schedule = list[tuple[str, int]]  # (change name, extra slot id), in order


def slot_home(sid: int) -> int:
    return SLOT_HOME + sid * SLOT_STRIDE


def new_slot(sid: int, size: int) -> SlotState:
    return SlotState(sid, size, slot_home(sid))


def parse_schedule(text: str) -> Schedule:
    """'create:1,flags:1,move:1,delete:1' -> [(change, slot id), ...] with
    schema names; a missing slot id means 1."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        change, _, slot = item.partition(":")
        name = _name(change, item)
        try:
            sid = int(slot) if slot else 1
        except ValueError:
            raise ScheduleError(f"schedule item {item!r}: slot must be an integer") from None
        out.append((name, _sid(sid, item)))
    return out


def normalise(schedule: Iterable[tuple[str, int]]) -> Schedule:
    """A schedule given as pairs, checked and with schema names."""
    return [(_name(c, f"{c}:{sid}"), _sid(sid, f"{c}:{sid}")) for c, sid in schedule]


def kind(change: str, item: str = "") -> ChangeKind:
    """The kind a schedule's change name (or alias) means."""
    k = CHANGES.get(ALIASES.get(change, change))
    if k is None:
        aliases = ", ".join(f"{a} for {n}" for a, n in ALIASES.items())
        raise ScheduleError(f"schedule item {item or change!r}: change must be one of "
                            f"{', '.join(CHANGES)} (or {aliases})")
    return k


def _name(change: str, item: str) -> str:
    return kind(change, item).name


def _sid(sid: int, item: str) -> int:
    if sid not in SLOT_IDS:
        raise ScheduleError(f"schedule item {item!r}: extra slot ids are 1..64 (0 is RAM)")
    return sid
