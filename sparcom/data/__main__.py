"""Command line for HexaInst files.

python -m sparcom.data validate FILE [--skip-code] [--json]
python -m sparcom.data build --out FILE [--per-category 200] [--seed 0]
                             [--dolly PATH|HUB] [--gsm8k PATH|HUB] [--mbpp PATH|HUB]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from sparcom.data import CATEGORIES
from sparcom.data.build import SOURCES, build, write_jsonl
from sparcom.data.validate import format_report, summary_json, validate_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparcom.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "validate", help="check a HexaInst-schema JSONL file against every quality rule"
    )
    check.add_argument("file", type=Path)
    check.add_argument("--skip-code", action="store_true", help="do not execute code outputs")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    make = commands.add_parser("build", help="assemble a balanced variant from Dolly-15k, GSM8K and MBPP")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--per-category", type=int, default=200)
    make.add_argument("--seed", type=int, default=0)
    for name, source in SOURCES.items():
        make.add_argument(
            f"--{name}", default=None, help=f"local file/folder or hub name (default {source.hub_name})"
        )
    args = parser.parse_args(argv)

    if args.command == "validate":
        if not args.file.is_file():
            print(f"error: no such file: {args.file}", file=sys.stderr)
            return 2
        summary, errors = validate_file(args.file, run_code=not args.skip_code)
        print(summary_json(summary) if args.json else format_report(args.file, summary, errors))
        if args.json and errors:
            print("\n".join(str(e) for e in errors), file=sys.stderr)
        return 1 if errors else 0

    if args.per_category <= 0:
        print(f"error: --per-category must be a positive integer, got {args.per_category}", file=sys.stderr)
        return 2
    try:
        records = build({name: getattr(args, name) for name in SOURCES}, args.per_category, args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_jsonl(records, args.out)
    counts = Counter(r["category"] for r in records)
    print(f"wrote {len(records)} records to {args.out}: " + ", ".join(f"{c}={counts[c]}" for c in CATEGORIES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
