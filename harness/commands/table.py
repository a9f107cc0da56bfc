"""``harness table``: a paper-style table computed from the records on disk."""

from __future__ import annotations

import argparse
import sys

from harness.commands import add_suite_args, formatter, store_from_args, suite_from_args
from harness.errors import HarnessError
from harness.plan import select_names
from harness.table import EXTRA_COLUMNS, FORMATS

EXAMPLES = """\
examples:
  harness table --suite demo
  harness table --suite vtab --format latex --columns params,flops
  harness table --suite demo --epochs 2 --seeds 1 --grid-points 1   # the records of that smoke run
  harness table --suite demo --format csv > demo.csv

Rows are methods, columns tasks grouped as the suite groups them, then group means and the mean over tasks.
Cells are mean ± std over the final seeds of the last-epoch metric; the best value per column is in bold;
(n/N) marks a cell with only n of N seeds recorded; – marks a missing cell; † marks a cell whose seeds disagree
far beyond their usual spread (one near chance, another far above; a footnote says which). '# params (M)' is the
trainable parameters without the task head. A cell counts exactly the finals of the current search winner (or the
fixed hyperparameters) under the current settings: records of old grids or earlier winners are never counted.
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("table", help="print a table computed from the records", description=__doc__,
                            epilog=EXAMPLES, formatter_class=formatter)
    add_suite_args(parser)
    parser.add_argument("--format", default="markdown", choices=FORMATS)
    parser.add_argument("--columns", default="params",
                        help=f"cost columns, comma list of {', '.join(EXTRA_COLUMNS)} (or 'none')")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    suite = suite_from_args(args)
    methods, tasks = select_names(suite, args.methods, args.tasks)
    extra = tuple(c.strip() for c in args.columns.split(",") if c.strip() and c.strip() != "none")
    unknown = [c for c in extra if c not in EXTRA_COLUMNS]
    if unknown:
        raise HarnessError(f"unknown column '{unknown[0]}' (expected some of {', '.join(EXTRA_COLUMNS)})")
    from harness.table import build_table, other_settings_hint, override_flags

    store = store_from_args(args)
    missing: list[str] = []
    print(build_table(suite, store, methods=methods, tasks=tasks, fmt=args.format, extra=extra, missing=missing))
    if missing:
        hint = other_settings_hint(suite, store, override_flags(suite.overrides))
        if hint:
            print(hint, file=sys.stderr)
    for problem in store.problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 0
