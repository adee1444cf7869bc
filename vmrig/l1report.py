"""What a hung L1's vCPUs are doing, read from the host on the host's clock.

The L1's own watchdog (labvm's run.sh) sleeps on the L1's clock, which lags
the host's by more than its margin when both L1 vCPUs spin under TCG: twice
it printed nothing before the kill.  This report needs nothing from the
guest: QEMU's monitor gives every vCPU's registers (``info registers -a``
over QMP's human-monitor-command), read twice a second apart, and each RIP
is named from the L1's own /proc/kallsyms, which labvm's run.sh copies out
at boot (Debian ships no usable System.map, and KASLR moves the kernel: the
copy has the addresses of this boot).  A RIP that does not move is a vCPU
stuck in one place; one that moves within a function is spinning.
"""

from __future__ import annotations

import asyncio
import bisect
import re
import time
from dataclasses import dataclass
from pathlib import Path

from vmrig.errors import RigError
from vmrig.qmp import Qmp

SAMPLES = 2
SAMPLE_GAP_S = 1.0
_CPU = re.compile(r"^CPU#(\d+)", re.M)
_RIP = re.compile(r"\b[RE]IP=([0-9a-fA-F]+)")  # EIP below long mode
_HALTED = re.compile(r"\bHLT=(\d)")


@dataclass(frozen=True)
class Symbols:
    """Text symbols of a kernel (kallsyms or System.map format), for naming
    addresses."""

    addrs: list[int]
    names: list[str]

    @classmethod
    def load(cls, path: Path | None) -> Symbols:
        pairs: list[tuple[int, str]] = []
        if path is not None and path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                f = line.split()  # address, type, name[, [module]]
                if len(f) >= 3 and f[1] in ("t", "T", "w", "W"):
                    name = f[2] + (f" {f[3]}" if len(f) > 3 else "")
                    pairs.append((int(f[0], 16), name))
        pairs.sort()
        return cls([a for a, _ in pairs], [n for _, n in pairs])

    def name(self, addr: int) -> str:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or addr - self.addrs[i] > 0x100000:  # not in the kernel's text
            return "?"
        return f"{self.names[i]}+{addr - self.addrs[i]:#x}"


def parse_registers(text: str) -> dict[int, tuple[int, bool]]:
    """``info registers -a`` -> {vCPU: (RIP, halted)}."""
    out: dict[int, tuple[int, bool]] = {}
    starts = [(int(m.group(1)), m.start()) for m in _CPU.finditer(text)]
    for k, (cpu, start) in enumerate(starts):
        block = text[start:starts[k + 1][1] if k + 1 < len(starts) else len(text)]
        rip, hlt = _RIP.search(block), _HALTED.search(block)
        if rip:
            out[cpu] = (int(rip.group(1), 16), bool(hlt and hlt.group(1) == "1"))
    return out


async def _sample(socket: Path, samples: int, gap: float) -> list[str]:
    qmp = Qmp("slotscope-l1report", timeout=10.0)
    await qmp.connect(str(socket))
    try:
        texts = []
        for i in range(samples):
            if i:
                await asyncio.sleep(gap)
            texts.append(await qmp.execute("human-monitor-command",
                                           {"command-line": "info registers -a"}))
        return texts
    finally:
        await qmp.close()


def report(socket: Path, symbols: Path | None, samples: int = SAMPLES,
           gap: float = SAMPLE_GAP_S) -> list[str]:
    """One line per vCPU and sample: RIP, its symbol, halted or not; or one
    line saying why the registers could not be read."""
    t = time.monotonic()
    try:
        texts = asyncio.run(_sample(socket, samples, gap))
    except (RigError, OSError) as e:
        return [f"no vCPU registers: {e}"]
    syms = Symbols.load(symbols)
    lines = []
    for i, text in enumerate(texts):
        regs = parse_registers(text)
        if not regs:
            lines.append(f"sample {i}: no registers in the monitor's answer")
        for cpu, (rip, halted) in sorted(regs.items()):
            lines.append(f"sample {i} vCPU {cpu}: RIP {rip:#018x} {syms.name(rip)}"
                         + (" (halted)" if halted else ""))
    lines.append(f"read in {time.monotonic() - t:.1f} s")
    return lines
