"""``harness status``: per cell, how many trials are done, diverged, failed or pending (from the records)."""

from __future__ import annotations

import argparse

from tabulate import tabulate

from harness.commands import add_suite_args, formatter, store_from_args, suite_from_args
from harness.plan import plan_cells, select_names
from harness.runner import cell_status

EXAMPLES = """\
examples:
  harness status --suite demo
  harness status --suite vtab --methods 'toast*'
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("status", help="progress of a suite's grid", description=__doc__, epilog=EXAMPLES,
                            formatter_class=formatter)
    add_suite_args(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    suite = suite_from_args(args)
    methods, tasks = select_names(suite, args.methods, args.tasks)
    store = store_from_args(args)
    rows = []
    for cell in plan_cells(methods, tasks):
        counts = cell_status(suite, cell, store)
        state = "done" if counts["pending"] == 0 and counts["failed"] == 0 else (
            "failed" if counts["failed"] else "pending")
        rows.append({"cell": cell.key, "state": state, **counts})
    print(tabulate(rows, headers="keys", tablefmt="simple"))
    totals = {k: sum(r[k] for r in rows) for k in ("done", "diverged", "failed", "pending")}
    print(f"\n{len(rows)} cells: " + ", ".join(f"{v} {k}" for k, v in totals.items()))
    for problem in store.problems:
        print(f"warning: {problem}")
    return 0
