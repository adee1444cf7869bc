"""The lab job's error tree: what ``slotscope`` prints as one line (LabError,
ConfigError) and a run's failure that no rig typed (RunFailed)."""

from __future__ import annotations


class LabError(Exception):
    """The lab job cannot start or finish; one line for the user."""


class RunFailed(LabError):
    """A run's inner command failed without a typed report from the rig: it
    exited non-zero (``returncode``) or, in direct mode, hung (None)."""

    kind_tag = "run_failed"

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class ConfigError(Exception):
    """A malformed lab config (slotscope.labconfig).  The message is one line
    naming the file and the key; ``key`` holds the key ('' when the fault is
    not one key's)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key
