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
from .errors import ConfigError, LabError

# Each command and the module whose register(subparsers) adds it; its
# parsers set ``func(args) -> int``.  Only the module of the command given is
# imported (all of them for --help or an unknown command): lab-run must
# start its probe compile before pyarrow loads (slotscope.labrun), and
# ``slotscope analyze`` works on a laptop without bcc.
COMMANDS = {
    "doctor": "slotscope.doctor",
    "record": "tracer.cli",
    "stream": "tracer.cli",
    "live": "tracer.cli",
    "rig": "vmrig.cli",
    "labvm": "vmrig.labvm_cli",
    "analyze": "analysis.cli",
    "report": "analysis.cli",
    "lab": "slotscope.lab",
    "lab-run": "slotscope.labrun",
    "history": "slotscope.history",
}
USER_ERRORS: tuple[type[Exception], ...] = (
    RecordingError, TracerError, RigError, LabError, ConfigError)
log = logging.getLogger(__name__)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: its command's module only, or every one."""
    parser = argparse.ArgumentParser(
        prog="slotscope", description="Trace what KVM memslot updates cost guest MMIO.")
    parser.add_argument("--version", action="version", version=f"slotscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    given = next((a for a in (sys.argv[1:] if argv is None else argv)
                  if not a.startswith("-")), None)
    wanted = [COMMANDS[given]] if given in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in wanted:
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
    args = build_parser(argv).parse_args(argv)
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
