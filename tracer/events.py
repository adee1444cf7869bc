"""The event record the BPF programs emit (``struct event`` and ``enum
ev_type`` in bpf/common.bpf.c), as numpy sees it.

Declared once here for Python; tests/test_tracer_decode.py checks it against
the C struct, so a field added on one side only fails a unit test.
"""

from __future__ import annotations

import numpy as np

# struct event in common.bpf.c
EVENT_DTYPE = np.dtype([
    ("type", "<u4"), ("pid", "<u4"), ("tid", "<u4"), ("x", "<i4"),
    ("ns", "<u8"), ("ns2", "<u8"), ("a", "<u8"), ("b", "<u8"), ("c", "<u8"), ("d", "<u8"),
    ("e", "<u4"), ("f", "<u4"), ("g", "<u8"), ("h", "<u8"),
])
EV_MEMSLOT, EV_MMIO, EV_FAULT, EV_GEN, EV_ZAP, EV_VM, EV_SETMEM = range(1, 8)
LOST_KINDS = ("memslot_update", "mmio_access", "mmio_fault", "generation", "zap_all", "vm",
              "exit_hist")
# mmio_fault bits (struct event's c; F_* in common.bpf.c)
F_CHECKED, F_STALE, F_REMARKED, F_FAST_HIT, F_WRITE, F_TO_USER = (1 << i for i in range(6))
F_UNFINISHED = 1 << 8
EXIT_REASON_NONE = 0xFFFFFFFF
