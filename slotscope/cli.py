"""The ``slotscope`` command: subcommands registered by each layer's cli module."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import io
import logging
import signal
import sys
from collections.abc import Sequence

from recording.errors import RecordingError
from tracer import TracerError
from vmrig import RigError

from . import __version__, logsetup
from .errors import LabError
from .labconfig import ConfigError

# Each module has register(subparsers); its parsers set ``func(args) -> int``.
# Handlers import their heavy dependencies (bcc, pandas) lazily so that,
# e.g., ``slotscope analyze`` works on a laptop without bcc.
COMMAND_MODULES = (
    "slotscope.doctor",
    "tracer.cli",
    "vmrig.cli",
    "vmrig.labvm_cli",
    "analysis.cli",
    "slotscope.lab",
    "slotscope.history",
)
USER_ERRORS: tuple[type[Exception], ...] = (
    RecordingError, TracerError, RigError, LabError, ConfigError)
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slotscope", description="Trace what KVM memslot updates cost guest MMIO.")
    parser.add_argument("--version", action="version", version=f"slotscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real import error inside the module
                raise
            continue
        module.register(sub)
    return parser


def _sigterm(signum: int, frame: object) -> None:
    # SIGTERM takes the same clean path as Ctrl-C: finalize, detach, exit.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    # kill -USR1 prints every thread's Python stack on stderr: where a stuck
    # run is (the lab VM's deadline watchdog does this before the kill).
    # Not where stderr has no fd (main() called in-process, output captured).
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    # The composition root: the one place handlers are set (slotscope/logsetup.py).
    with logsetup.configured():
        try:
            return int(args.func(args) or 0)
        except USER_ERRORS as e:
            # one line, no traceback: the message says what to fix
            log.error("slotscope %s: error: %s", args.command, e)
            return 1
        except KeyboardInterrupt:
            log.warning("slotscope %s: interrupted", args.command)
            return 130
        except BrokenPipeError:
            return 141


if __name__ == "__main__":
    sys.exit(main())
