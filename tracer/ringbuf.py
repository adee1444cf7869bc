"""Reading the BPF ring buffer through its mmap, a batch at a time."""

from __future__ import annotations

import mmap
import time

import numpy as np

from .events import EVENT_DTYPE


class RingReader:
    """Consumes the BPF ring buffer through its mmap, a batch at a time.

    Every record is one ``struct event``, so the committed span between the
    consumer and producer positions is an array of fixed-size slots: numpy
    reads it without a Python call per record (bcc's callback path costs
    ~10 us a record, which on a 2-CPU host slows the traced VM).
    """

    HDR = 8
    BUSY, DISCARD = 1 << 31, 1 << 30

    def __init__(self, fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.size, self.mask = size, size - 1
        self.slot = (EVENT_DTYPE.itemsize + self.HDR + 7) & ~7
        self.cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        # producer page, then the data area mapped twice (wrap-around is linear)
        self.prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                              offset=page)
        self.data = np.frombuffer(self.prod, dtype=np.uint8, offset=page)
        # positions as one 8-byte load/store each: struct's byte-wise copy can
        # tear, and a torn consumer_pos makes the kernel's reserve fail (lost)
        self._cpos = np.frombuffer(self.cons, dtype=np.uint64, count=1)
        self._ppos = np.frombuffer(self.prod, dtype=np.uint64, count=1)
        self.records = 0
        self.max_fill = 0.0        # highest fraction of the ring found in use
        self.last_fill = 0.0       # the fraction the last read found
        self.max_gap_s = 0.0       # longest time between two reads
        self._last = time.monotonic()

    def read(self) -> np.ndarray:
        now = time.monotonic()
        self.max_gap_s = max(self.max_gap_s, now - self._last)
        self._last = now
        cpos = int(self._cpos[0])
        ppos = int(self._ppos[0])
        self.last_fill = (ppos - cpos) / self.size
        self.max_fill = max(self.max_fill, self.last_fill)
        n = (ppos - cpos) // self.slot
        if n <= 0:
            return np.empty(0, EVENT_DTYPE)
        start = cpos & self.mask
        raw = self.data[start:start + n * self.slot].reshape(n, self.slot)
        hdr = raw[:, :4].copy().view("<u4").ravel()
        busy = np.flatnonzero(hdr & self.BUSY)
        if len(busy):  # reserved, not yet committed: stop before it
            n = int(busy[0])
            raw, hdr = raw[:n], hdr[:n]
        keep = (hdr & self.DISCARD) == 0
        out = np.ascontiguousarray(raw[keep, self.HDR:self.HDR + EVENT_DTYPE.itemsize])
        self._cpos[0] = cpos + n * self.slot
        self.records += len(out)
        return out.view(EVENT_DTYPE).ravel()

    def close(self) -> None:
        del self.data, self._cpos, self._ppos
        self.prod.close()
        self.cons.close()
