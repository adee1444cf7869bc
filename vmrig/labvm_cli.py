"""``slotscope labvm run``: a command as root inside the nested lab VM."""

from __future__ import annotations

import argparse
import logging

from vmrig import RigError
from vmrig.config import ACCELS

HANG_EXIT = 124  # like timeout(1)
# Its lines on stderr through logging: handlers are the slotscope command's
# (slotscope/logsetup.py, plain lines off a terminal); vmrig sets none.
log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labvm", help="run a command inside the nested lab VM (L1)",
                       description="Boot an L1 hypervisor (Debian 6.1 by default, 6.12, or "
                       "your own kernel build) on this host's filesystem (virtme-ng) and run a "
                       "command in it as root.")
    lsub = p.add_subparsers(dest="labvm_command", metavar="ACTION", required=True)
    r = lsub.add_parser("run", help="boot the L1, run COMMAND, power off",
                        usage="slotscope labvm run [options] -- COMMAND...")
    r.add_argument("--accel", default="auto", choices=ACCELS,
                   help="auto: KVM where the host has nested virt, else TCG")
    r.add_argument("--kernel", metavar="SPEC",
                   help="L1 kernel: 6.1 (default), 6.12, an exact Debian release, or the "
                   "path of a kernel build's bzImage/vmlinux (python -m vmrig.kernel fetch)")
    r.add_argument("--modules", metavar="DIR",
                   help="with --kernel PATH: the build's modules (INSTALL_MOD_PATH or "
                   "lib/modules/<release>)")
    r.add_argument("--headers", metavar="DIR",
                   help="with --kernel PATH: the build tree bcc compiles against")
    r.add_argument("--timeout", type=float, default=900.0, metavar="S",
                   help="kill the L1 after S seconds (default 900)")
    r.add_argument("-o", "--outdir", default="labvm-out", metavar="OUTDIR",
                   help="directory shared read-write with the L1 (default ./labvm-out)")
    r.add_argument("--memory", default="2G", help="L1 memory (default 2G)")
    r.add_argument("--cpus", type=int, help="L1 vCPUs (default: host CPUs)")
    # Not dest "command": that is the top-level subcommand, which names the
    # tool in error lines ("slotscope labvm: error: ...").
    r.add_argument("run_command", nargs=argparse.REMAINDER, metavar="COMMAND")
    r.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from vmrig.kernel import resolve_kernel
    from vmrig.labvm import run_in_labvm

    command = list(args.run_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise RigError("no COMMAND given (slotscope labvm run -- COMMAND...)")
    # The default (None) is run_in_labvm's own: the fetched Debian 6.1.
    kernel = None
    if args.kernel or args.modules or args.headers:
        kernel = resolve_kernel(args.kernel, args.modules, args.headers).vmlinux
    res = run_in_labvm(command, accel=args.accel, kernel=kernel, timeout=args.timeout,
                       outdir=args.outdir, memory=args.memory, cpus=args.cpus)
    boot = f", command started at L1 uptime {res.boot_s:.1f} s" if res.boot_s else ""
    if res.timed_out:
        for line in res.console_tail[-15:]:
            log.info("  | %s", line)
        # The error last, one line: callers read the last stderr line.
        log.error("slotscope labvm: error: L1 hung: no exit within %s s (%s%s); VM killed; "
                  "last console lines above, full log %s/labvm/console.log",
                  f"{args.timeout:g}", res.accel, boot, res.outdir)
        return HANG_EXIT
    if res.panic:
        log.error("slotscope labvm: error: the L1 kernel panicked after %.1f s: %s; "
                  "full log %s/labvm/console.log", res.elapsed_s, res.panic, res.outdir)
        return 1
    log.info("slotscope labvm: exit %s after %.1f s (%s%s); output in %s",
             res.returncode, res.elapsed_s, res.accel, boot, res.outdir)
    if res.returncode is None:
        return 1
    return res.returncode
