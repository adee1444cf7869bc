"""Starting QEMU's process: its own session, no stdin, stderr to a file,
and (unless it must outlive us) PR_SET_PDEATHSIG so that it dies even if
we are SIGKILLed.  ``on_spawn(pid)`` runs after the process exists and
before it execs QEMU, so a tracer can follow it from its first ioctl."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from vmrig.errors import RigError

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn_qemu(argv: list[str], stderr_path: Path, *, die_with_parent: bool,
               on_spawn: Callable[[int], None] | None = None) -> subprocess.Popen[bytes]:
    """QEMU running ``argv``; RigError if it cannot be executed."""
    run, hold = argv, None
    if on_spawn is not None:
        # A shell holds the new process until on_spawn returns, then execs
        # QEMU in place (same pid).  preexec_fn cannot wait: Popen itself
        # waits for the exec.
        hold = os.pipe()
        run = ["/bin/sh", "-c", 'read _ && exec "$@" </dev/null', "qemu-held", *argv]
    try:
        proc = subprocess.Popen(
            run, stdin=hold[0] if hold else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(stderr_path, "wb"),  # noqa: SIM115
            start_new_session=True, umask=0o077,
            preexec_fn=_die_with_parent if die_with_parent else None)
    except OSError as e:
        raise RigError(f"cannot run {argv[0]}: {e.strerror}") from None
    finally:
        if hold:
            os.close(hold[0])
    if hold:
        try:
            assert on_spawn is not None
            on_spawn(proc.pid)
            os.write(hold[1], b"go\n")
        except BaseException:
            proc.kill()  # the held shell, which never became QEMU
            proc.wait()
            raise
        finally:
            os.close(hold[1])
    return proc
