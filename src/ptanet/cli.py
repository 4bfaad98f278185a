"""The `ptanet` command: one subcommand per job. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptanet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each _add_* registers one subcommand and sets `func` to its handler.
    for add in (_add_complexity,):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Library errors already name the file and the problem; print them without a traceback.
        print(f"ptanet {args.command}: error: {exc}", file=sys.stderr)
        return 2


# --- complexity -------------------------------------------------------------------------------
def _add_complexity(sub) -> None:
    p = sub.add_parser("complexity", help="parameters and multiply-adds per configuration (paper Table 4)")
    p.set_defaults(func=lambda a: print("not yet"))
