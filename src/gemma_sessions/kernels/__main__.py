"""``python -m gemma_sessions.kernels build [--all | --variant NAME ...]``: compile the CPU kernels into the cache at
install time (``make serve`` and ``make test`` run it), so that no request waits on a compiler; ``info`` says what
this CPU runs and what is built.

``build`` compiles the variant this process would load (the best this CPU executes, or the one
``GEMMA_SESSIONS_CPU_CAPABILITY`` asks for); ``--all`` every variant this CPU executes (the kernel tests run each);
``--variant`` names them (any, also one this CPU cannot execute: building never loads). A build already in the cache
(same sources, flags, compiler and torch) is reused. Without a compiler it says so and exits 0: the package then
runs every op's torch equivalent, slower.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from . import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_sessions.kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the kernels into the cache")
    b.add_argument("--all", action="store_true", help="every variant this CPU executes")
    b.add_argument("--variant", action="append", choices=sorted(build.BY_NAME), help="a variant to build")
    b.add_argument("--force", action="store_true", help="rebuild even when the cache has it")
    sub.add_parser("info", help="this CPU's variants and the cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "info":
        chosen = build.select()
        for v in build.VARIANTS if build.x86() else (build.NATIVE,):
            lacking = build.missing(v.name)
            state = "built" if build.find_library(v.name) is not None else "not built"
            runs = "runs here" if not lacking else f"needs {' '.join(sorted(lacking))}"
            print(f"{'*' if v.name == chosen else ' '} {v.name:12} {runs:40} {state}")
        return 0
    names = args.variant or (build.runnable() if args.all else [build.select()])
    names = [n for n in names if n is not None]
    if build.compiler() is None:
        print("gemma-sessions: no C++ compiler (c++ or $CXX): the CPU kernels are not built. Everything still runs,\n"
              "on torch's ops, several times slower; install g++ (or clang++) and run\n"
              "  python -m gemma_sessions.kernels build", file=sys.stderr)
        return 0
    if not names:
        print("gemma-sessions: no kernel variant runs on this CPU (it needs x86-64 with AVX2, or arm64); the torch "
              "ops serve instead", file=sys.stderr)
        return 0
    for name in names:
        t0 = time.monotonic()
        so = build.build(name, force=args.force)
        print(f"{name}: {so} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
