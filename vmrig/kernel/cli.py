"""``python -m vmrig.kernel fetch|show``."""

from __future__ import annotations

import argparse
import sys

from vmrig import RigError

from .labkernel import DEFAULT_KERNELS
from .specs import fetch_kernel, resolve_kernel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmrig.kernel",
                                 description="Fetch and show the nested lab VM's kernels.")
    ap.add_argument("action", choices=("fetch", "show"))
    ap.add_argument("--kernel", action="append", metavar="SPEC",
                    help="6.1, 6.12, an exact release, or a kernel image path "
                    f"(repeatable; default: {' and '.join(DEFAULT_KERNELS)})")
    ap.add_argument("--release", action="append", dest="kernel", help=argparse.SUPPRESS)
    ap.add_argument("--modules", metavar="DIR", help="a build's modules (with --kernel PATH)")
    ap.add_argument("--headers", metavar="DIR", help="a build's tree (with --kernel PATH)")
    args = ap.parse_args(argv)
    specs = args.kernel or list(DEFAULT_KERNELS)
    act = fetch_kernel if args.action == "fetch" else resolve_kernel
    failed = 0
    for spec in specs:
        try:
            if (args.modules or args.headers) and len(specs) > 1:
                raise RigError("--modules/--headers go with a single --kernel PATH")
            k = act(spec, args.modules, args.headers)
        except RigError as e:
            # print, not logging: a separate entry point whose only stderr
            # lines are these errors (stdout holds the paths).  vmrig sets no
            # handlers and cannot use slotscope's logsetup; a print always shows.
            print(f"vmrig.kernel: error: {e}", file=sys.stderr)
            failed += 1
            continue
        info = k.to_json()
        for key, val in [("name", info.pop("name")), *info.items()]:
            print(f"{key:12} {val}")
    return 1 if failed else 0

