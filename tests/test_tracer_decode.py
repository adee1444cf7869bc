"""Record decoding and change-type inference (pure user space; no kernel needed).

The kernel side is tested live in test_tracer.py; here the decoder is fed
records laid out as common.bpf.h's struct event, including the kprobe
backend's EV_SETMEM that only the nested lab VM produces.
"""

from __future__ import annotations

import numpy as np

from tracer.decode import Decoder, SlotTracker
from tracer.events import EV_GEN, EV_SETMEM, EVENT_DTYPE

VM = 1234 << 32 | 7


def test_slot_tracker_known_vm() -> None:
    t = SlotTracker()
    t.vm_created(VM)
    assert t.update(VM, 1, 0x1000, 0x2000, 0, 0) == "create"
    assert t.update(VM, 1, 0x1000, 0x2000, 1, 0) == "flags_only"
    assert t.update(VM, 1, 0x9000, 0x2000, 1, 0) == "move"
    assert t.update(VM, 1, 0x9000, 0x2000, 1, 0) == "unknown"   # no-op: KVM changes nothing
    assert t.update(VM, 1, 0x9000, 0, 1, 0) == "delete"
    assert t.update(VM, 1, 0x9000, 0x2000, 0, 0) == "create"
    # a failed ioctl is classified but does not change the state
    assert t.update(VM, 1, 0x5000, 0x2000, 0, -22) == "move"
    assert t.update(VM, 1, 0x5000, 0x2000, 0, 0) == "move"


def test_slot_tracker_vm_seen_late() -> None:
    t = SlotTracker()
    other = 99 << 32 | 4
    assert t.update(other, 3, 0x1000, 0x1000, 0, 0) == "unknown"  # create? move? flags?
    assert t.update(other, 3, 0x1000, 0x1000, 1, 0) == "flags_only"
    assert t.update(other, 3, 0x1000, 0, 1, 0) == "delete"
    assert t.update(other, 3, 0x1000, 0x1000, 0, 0) == "create"


def test_kprobe_memslot_and_generation_rows() -> None:
    ev = np.zeros(3, EVENT_DTYPE)
    ev[0] = (EV_SETMEM, 10, 11, 0, 100, 250, 0x100, 0x10, 0x7F0000, VM,
             1 << 16 | 5, 1 | 2 << 24, 40, 44)  # as_id 1, slot 5, MOVE, dirty log
    inval = 44 | 1 << 63
    ev[1] = (EV_GEN, 10, 11, 0, 120, 0, inval, 0, 0, VM, 3, 0, 0, 0)
    ev[2] = (EV_GEN, 10, 11, 0, 130, 0, 1 << 19, 0, 0, VM, 3, 0, 0, 0)  # masked gen wraps
    out = Decoder().decode(ev)
    m = out["memslot_update"].to_pylist()[0]
    assert (m["as_id"], m["slot_id"], m["change"], m["flags"]) == (1, 5, "move", 1)
    assert (m["base_gfn"], m["npages"], m["gen_before"], m["gen_after"]) == (0x100, 0x10, 40, 44)
    assert (m["begin_ns"], m["end_ns"], m["vm"]) == (100, 250, VM)
    g = out["generation"].to_pylist()
    assert g[0]["gen"] == 44 and g[0]["in_progress"] and g[0]["mmio_gen"] == 44
    assert g[0]["source"] == "invalidate" and not g[0]["zap_all"]
    assert g[1]["mmio_gen"] == 0 and g[1]["zap_all"]


def test_event_layout_matches_the_c_struct() -> None:
    """tracer/events.py and bpf/common.bpf.c declare the same record: fields in
    order with their widths, event type numbers, lost kinds and fault bits."""
    import re
    from pathlib import Path

    from tracer import events
    c = (Path(events.__file__).parent / "bpf" / "common.bpf.c").read_text()
    body = re.search(r"struct event \{(.*?)\};", c, re.S)
    assert body is not None
    ctypes_ = {"u32": "<u4", "s32": "<i4", "u64": "<u8"}
    fields = [(name, ctypes_[t]) for t, names in re.findall(r"(\w+) ([\w, ]+);", body.group(1))
              for name in (n.strip() for n in names.split(","))]
    assert fields == [(n, EVENT_DTYPE[n].str) for n in EVENT_DTYPE.names]
    kinds = dict(re.findall(r"\b(EV_\w+) = (\d+)", c))
    assert {k: int(v) for k, v in kinds.items()} == {
        k: getattr(events, k) for k in kinds}
    lost = re.search(r"enum lost_kind \{([^}]*)\}", c)
    assert lost is not None
    assert len([x for x in lost.group(1).split(",") if x.strip() != "LOST_MAX"]) == len(
        events.LOST_KINDS)
    bits = {k: int(v) for k, v in re.findall(r"#define (F_\w+) +\(1 << (\d+)\)", c)}
    # F_ACCESS and F_SYNTH steer the programs only; they never reach Python
    shared = {k: 1 << v for k, v in bits.items() if k not in ("F_ACCESS", "F_SYNTH")}
    assert len(shared) == 7 and shared == {k: getattr(events, k) for k in shared}
