"""``harness plot``: the table's numbers as figures (PNG and PDF): per-task bars and the accuracy / parameter
trade-off."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.commands import add_suite_args, formatter, store_from_args, suite_from_args
from harness.errors import HarnessError
from harness.plan import select_names

EXAMPLES = """\
examples:
  harness plot --suite demo                         # results/figures/demo-tasks.png/.pdf, demo-tradeoff.png/.pdf
  harness plot --suite vtab --methods 'toast*,lora,linear' --out paper/figures
  harness plot --suite demo --epochs 2 --seeds 1 --grid-points 1   # the records of that smoke run

The figures show exactly the cells `harness table` prints with the same flags (the same summary): per task one
panel with one bar per method at its seed mean and the seeds' std as error bar (hatched: fewer seeds than the
protocol's; –: no value), and the mean over tasks against trainable parameters (task head included, log scale)
with the Pareto front dashed. A method missing a task has no trade-off point (named under the plot).
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("plot", help="draw figures (PNG and PDF) from the records", description=__doc__,
                            epilog=EXAMPLES, formatter_class=formatter)
    add_suite_args(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the figures (default: <results folder>/figures, i.e. results/figures)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    suite = suite_from_args(args)
    methods, tasks = select_names(suite, args.methods, args.tasks)
    from harness.figures import save, task_bars, tradeoff
    from harness.table import other_settings_hint, override_flags, suite_summary

    store = store_from_args(args)
    summary = suite_summary(suite, store, methods=methods, tasks=tasks)
    for problem in store.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not summary["cells"]:
        hint = other_settings_hint(suite, store, override_flags(suite.overrides))
        raise HarnessError(f"no final records of suite {suite.name} for these methods and tasks: nothing to plot"
                           + (f"\n{hint}" if hint else ""))
    out = args.out if args.out is not None else store.root / "figures"
    paths = save(task_bars(summary, title=f"{suite.name}: accuracy per task"), out / f"{suite.name}-tasks")
    paths += save(tradeoff(summary, title=f"{suite.name}: accuracy vs. trainable parameters"),
                  out / f"{suite.name}-tradeoff")
    for path in paths:
        print(path)
    return 0
