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


def _print_table(rows: list[dict], columns: list, fmt: str, out: str | None = None) -> None:
    """Print rows as markdown (people) or JSON/CSV (machines); optionally also write all three."""
    import csv
    import json

    from ptanet.tables import to_markdown, write_table

    if fmt == "markdown":
        print(to_markdown(rows, columns))
    elif fmt == "json":
        print(json.dumps(rows, indent=2))
    else:
        writer = csv.DictWriter(sys.stdout, fieldnames=[c[0] for c in columns], extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    if out:
        paths = write_table(rows, columns, out)
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("markdown", "json", "csv"), default="markdown", help="output format (default: markdown)")


# --- complexity -------------------------------------------------------------------------------
def _add_complexity(sub) -> None:
    p = sub.add_parser(
        "complexity",
        help="parameters and multiply-adds per configuration (paper Table 4)",
        description="Parameters in use and multiply-adds (ptflops) for No PTA and PTA configurations; "
        "--latency adds CPU latency measured here (median, ratio to No PTA).",
    )
    p.add_argument("--all", action="store_true", help="all 27 configurations instead of the paper's six")
    p.add_argument("--configs", help="comma-separated configurations, e.g. HHH,LLL (default: the paper's)")
    p.add_argument("--size", type=int, default=128, help="input size in pixels (default: 128, the paper's)")
    p.add_argument("--latency", action="store_true", help="also measure CPU latency (batch 1, 1 thread)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model and round for --latency")
    p.add_argument("--out", help="also write OUT.md, OUT.json and OUT.csv")
    _add_format(p)
    p.set_defaults(func=_cmd_complexity)


def _cmd_complexity(args) -> int:
    from ptanet.bench import COMPLEXITY_COLUMNS, LATENCY_COLUMNS, complexity_table, latency_table
    from ptanet.models import parse_configs

    configs = parse_configs("all" if args.all else args.configs)
    rows = complexity_table(configs, size=args.size)
    columns = list(COMPLEXITY_COLUMNS)
    if args.latency:
        latency = {r["model"]: r for r in latency_table(configs, size=args.size, runs=args.runs)}
        for row in rows:
            row.update({k: latency[row["model"]][k] for k in ("latency_ms", "relative_latency")})
        columns += LATENCY_COLUMNS
    _print_table(rows, columns, args.format, args.out)
    return 0
