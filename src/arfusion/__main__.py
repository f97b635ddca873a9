"""Command line: `python -m arfusion demo ...` (see `--help`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import __version__, bench, demo

    parser = argparse.ArgumentParser(prog="python -m arfusion", description=__doc__)
    parser.add_argument("--version", action="version", version=f"arfusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo.add_arguments(sub.add_parser(
        "demo", help="run every pattern on N local ranks and check it against the reference"))
    bench.add_arguments(sub.add_parser(
        "bench", help="time arfusion and its baselines on this machine (GPU)"))
    sub.add_parser("shim-path", help="print the folder to put on PYTHONPATH for the "
                   "flashinfer.comm opt-in (arfusion.shim, ARFUSION_FLASHINFER_COMM)")
    args = parser.parse_args(argv)
    if args.command == "shim-path":
        from .shim import startup_path

        print(startup_path())
        return 0
    return {"demo": demo.main, "bench": bench.main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
