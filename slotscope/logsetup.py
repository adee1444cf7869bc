"""Where status lines go: the one place that gives slotscope's loggers handlers.

Every layer logs its status lines through ``logging.getLogger(__name__)``
at INFO (errors at ERROR) and never configures logging itself: tracer/ and
vmrig/ cannot import slotscope/, and a library used in-process (a notebook,
a test, the lab's own code) must not print.  With no handler configured,
logging's last resort shows WARNING and above only, so INFO status stays
silent there.  The ``slotscope`` command (cli.main) wraps its run in
``configured()``:

- stderr, every layer's status and error lines: a ``rich`` handler (time
  and level columns) on a terminal; otherwise the bare message, so a pipe,
  a file or the lab VM's console.log gets the very lines the ad-hoc prints
  wrote ("slotscope record: kprobe backend ...", "lab-run: +1.2 s ...").
  Callers, tests and the lab read those verbatim.
- stdout, the lab job's progress lines (slotscope/labprogress.py): they were
  always on stdout and the nested lab test reads its first one there, so
  they stay: "HH:MM:SS lab: msg" when stdout is not a terminal, rich on
  the console the progress bar draws on when it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TextIO

# The layers' top-level loggers: records of any module below them arrive here.
LAYERS = ("slotscope", "tracer", "vmrig", "analysis", "recording")
# The lab job's progress channel (labprogress.Progress logs to it): stdout.
PROGRESS = "slotscope.labprogress"
# Set in the nested lab VM (vmrig/labvm.py's script).  There the command's
# stderr becomes console.log, which the lab parses; in virtme-ng's fallback
# it is the serial console, a terminal, and must still get plain lines.
PLAIN_ENV = "SLOTSCOPE_LABVM"


class _StdHandler(logging.StreamHandler[TextIO]):
    """A plain handler on sys.stdout or sys.stderr as they are at each record.

    Looked up per record, not bound once: main() may run in-process under a
    test's captured streams, and a stream bound at setup may since be closed.
    """

    def __init__(self, name: str, fmt: logging.Formatter) -> None:
        super().__init__(getattr(sys, name))
        self._name = name
        self.setFormatter(fmt)

    def emit(self, record: logging.LogRecord) -> None:
        # handle() holds the handler's lock around emit(): safe to rebind here.
        self.stream = getattr(sys, self._name)
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        # These lines replaced print(): a failed write (EPIPE from
        # `slotscope lab | head`) ends the command as print's did (main()
        # maps BrokenPipeError to 141) instead of a "Logging error" dump.
        if isinstance(sys.exc_info()[1], OSError):
            raise  # emit() calls this from its except block: re-raises that
        super().handleError(record)


class _LiveStderr:
    """sys.stderr at each write, for the terminal handler's rich console.

    A rich Console on stderr writes past rich's stream proxy to the real
    stderr; while the lab's progress bar is live (it redirects sys.stderr
    through that proxy onto its own console) such lines would land inside
    the bar.  Through sys.stderr as it stands, they print above it.
    """

    @property
    def encoding(self) -> str:
        return getattr(sys.stderr, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    def fileno(self) -> int:
        return sys.stderr.fileno()


def _plain(stream_name: str) -> bool:
    stream = getattr(sys, stream_name)
    try:
        tty = stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        tty = False
    return not tty or bool(os.environ.get(PLAIN_ENV))


def stderr_handler() -> logging.Handler:
    """Status and error lines: rich on a terminal, the bare message otherwise."""
    if _plain("stderr"):
        return _StdHandler("stderr", logging.Formatter("%(message)s"))
    from rich.console import Console
    from rich.logging import RichHandler
    # show_path off: each message names its command ("slotscope record: ...").
    return RichHandler(console=Console(file=_LiveStderr()),  # type: ignore[arg-type]
                       show_path=False, log_time_format="[%X]")


def progress_handler() -> logging.Handler:
    """The lab's progress lines on stdout: timestamped plain lines (cron,
    systemd, CI logs), or rich above the progress bar on a terminal."""
    if _plain("stdout"):
        # local time, as time.strftime gave it
        fmt = logging.Formatter("%(asctime)s lab: %(message)s", "%H:%M:%S")
        return _StdHandler("stdout", fmt)
    from rich import get_console
    from rich.logging import RichHandler
    # The global console is the one labprogress's rich.progress.Progress
    # draws on, so these lines print above the bar instead of through it.
    return RichHandler(console=get_console(), show_path=False, log_time_format="[%X]")


@contextlib.contextmanager
def configured() -> Iterator[None]:
    """Handlers on the layers' loggers for the duration of one command.

    Taken off again on exit, so that main() called in-process (tests do)
    leaves later library use in that process silent, as it was.
    """
    err, out = stderr_handler(), progress_handler()
    saved: list[tuple[logging.Logger, int, bool]] = []
    for name, handler, propagate in ([(n, err, True) for n in LAYERS]
                                     + [(PROGRESS, out, False)]):
        log = logging.getLogger(name)
        saved.append((log, log.level, log.propagate))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        # Progress lines go to stdout only, not also up to slotscope's stderr.
        log.propagate = propagate
    try:
        yield
    finally:
        for log, level, propagate in saved:
            log.removeHandler(err)
            log.removeHandler(out)
            log.setLevel(level)
            log.propagate = propagate
