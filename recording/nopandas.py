"""Keep pandas out of processes that only write recordings.

pyarrow imports pandas on its first numpy conversion, to ask whether the
array is a pandas object: about 1.5 s on a host and 33 s in a TCG-nested L1
(profiled: a third of the lab VM's tracer start, and most of a micro-VMM
run's tail, since the micro-VMM writes its workload table with pyarrow too).
A process that never analyses (``slotscope lab-run``, the micro-VMM) blocks
the import; pyarrow then takes pandas for absent, as it does where pandas
is not installed.  Never call it in a process that may analyse.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

__all__ = ["block_pandas"]


class _NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"{name}: blocked in this process (recording.nopandas)",
                                      name=name)
        return None


def block_pandas() -> None:
    """From now on ``import pandas`` fails in this process (a no-op if pandas
    is already imported: then it costs nothing more)."""
    if "pandas" in sys.modules or any(isinstance(f, _NoPandas) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _NoPandas())
