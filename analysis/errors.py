"""The analysis layer's errors: a small tree whose classes carry the cause.

    RecordingError          (recording/errors.py: a run that cannot be read or written)
    ├── EmptyRun            a run directory without a single trace event
    ├── AnalysisFailed      an unexpected exception while analysing
    ├── DatasetError        a history dataset that cannot be queried
    └── ClusterUnavailable  no Dask scheduler answered (or no local cluster)

Callers decide by class (``except EmptyRun``), never by the message; the
message is for people and stays one line, as the CLI prints it.
"""

from __future__ import annotations

import os
from pathlib import Path

from recording.errors import RecordingError

__all__ = ["AnalysisFailed", "ClusterUnavailable", "DatasetError", "EmptyRun",
           "RecordingError"]


class EmptyRun(RecordingError):
    """A run whose tables hold no trace events: nothing to analyse."""

    def __init__(self, path: str | os.PathLike[str], missing: str = "trace events") -> None:
        self.path = Path(path)
        self.missing = missing
        super().__init__(f"{self.path}: empty run: no {missing} recorded")


class AnalysisFailed(RecordingError):
    """An unexpected exception while analysing ``what`` (a run, a report):
    a bug or a resource limit, not bad input.  ``cause`` is the exception."""

    def __init__(self, what: str, cause: BaseException) -> None:
        self.what = what
        self.cause = cause
        if isinstance(cause, MemoryError):
            text = f"{what}: out of memory while analysing"
        else:
            text = (f"{what}: analysis failed: {type(cause).__name__}: {cause} "
                    "(SLOTSCOPE_DEBUG=1 shows the traceback)")
        super().__init__(text)


class DatasetError(RecordingError):
    """A history dataset that cannot be queried: absent, empty, or a file
    in it that is not Parquet; one line naming what."""


class ClusterUnavailable(RecordingError):
    """The Dask scheduler cannot be reached (or a local cluster not started)."""

    def __init__(self, where: str, cause: BaseException) -> None:
        self.where = where
        if isinstance(cause, OSError | ValueError) and str(cause):
            text = str(cause).splitlines()[0]
        else:  # something answered, in no protocol the Client could read
            text = f"no Dask scheduler answered ({type(cause).__name__})"
        super().__init__(f"cannot reach the Dask scheduler at {where}: {text}")
