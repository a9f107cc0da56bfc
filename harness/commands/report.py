"""``harness report``: one self-contained HTML page per suite (no network, figures inline): the table, the reference
numbers beside ours where a source covers the suite, the per-task and trade-off figures, the final trials' learning
curves, each cell's search grid with its winner, the stale / missing / diverged counts and where the records came
from (commits, devices, package versions). What a person reads before trusting a table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.commands import add_suite_args, formatter, store_from_args, suite_from_args
from harness.plan import select_names

EXAMPLES = """\
examples:
  harness report --suite demo                      # results/report/demo.html
  harness report --suite vtab --out paper/report   # paper/report/vtab.html
  harness report --suite nightly --run-id latest   # the latest night's records

The page's table is `harness table --format csv`'s with the same flags; every figure is embedded as PNG.
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("report", help="one self-contained HTML page of a suite's results",
                            description=__doc__, epilog=EXAMPLES, formatter_class=formatter)
    add_suite_args(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for <suite>.html (default: <results folder>/report)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    suite = suite_from_args(args)
    methods, tasks = select_names(suite, args.methods, args.tasks)
    from harness.suite_report import write_suite_page

    store = store_from_args(args)
    source = str(store.root) + (f" (run {args.run_id})" if args.run_id else "")
    path = write_suite_page(suite, store, methods, tasks, args.out or store.root / "report", source)
    for problem in store.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(path)
    return 0
