"""``harness table``: a paper-style table computed from the records on disk."""

from __future__ import annotations

import argparse
import sys

from harness.commands import add_suite_args, formatter, store_from_args, suite_from_args
from harness.errors import HarnessError
from harness.plan import select_names
from harness.table import EXTRA_COLUMNS, FORMATS
from harness.table_render import LAYOUTS

EXAMPLES = """\
examples:
  harness table --suite demo
  harness table --suite vtab --layout long          # a row per task: 19 tasks fit a terminal
  harness table --suite vtab --format latex --columns params,flops
  harness table --suite demo --epochs 2 --seeds 1 --grid-points 1   # the records of that smoke run
  harness table --suite demo --format csv > demo.csv
  harness table --suite fgvc --compare linear       # ‡: differs from linear beyond the seeds' noise
  harness table --suite fgvc --reference toast-paper              # + the paper's number and Δ under each row
  harness table --suite fgvc --reference toast-paper --reference-table 11 --format csv

Rows are methods, columns tasks grouped as the suite groups them, then group means and the mean over tasks
(--layout long turns it: a row per task, a column per method; the default does so when the wide table would not fit
the terminal). Tasks show as the papers print them (Clevr-Count, sNORB-Azim, CUB); csv keeps the registry's names.
LaTeX puts the columns under Natural / Specialized / Structured headers, each group's mean last in it.
Cells are mean ± std over the final seeds of the last-epoch metric; the best value per column is in bold;
(n/N) marks a cell with only n of N seeds recorded; – marks a missing cell; † marks a cell whose seeds disagree
far beyond their usual spread (one near chance, another far above; a footnote says which). '# params (M)' is the
trainable parameters without the task head. A cell counts exactly the finals of the current search winner (or the
fixed hyperparameters) under the current settings: records of old grids or earlier winners are never counted.
--compare M marks ‡, per task, the cells whose seeds differ from M's beyond their noise: Welch's t-test over the
per-seed values, p < --alpha (cells with fewer than 2 seeds on either side are not tested); csv gets
<task>_welch_p, <task>_differs, compare and alpha columns (and the footnote on stderr).
--reference SOURCE (see `harness reference ls`) adds two rows under each method: '↳ paper', the published number
(– where the paper has none), and '↳ Δ', ours minus the paper's; csv gets <column>_paper and <column>_delta. Only
the source's headline backbone is compared (TOAST: ViT-B/16 DeiT ImageNet-1k), the lowest table number winning
when two tables print a cell; --reference-table N takes table N's rows instead. A paper average fills a mean
column only when it averages exactly that column's tasks.
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("table", help="print a table computed from the records", description=__doc__,
                            epilog=EXAMPLES, formatter_class=formatter)
    add_suite_args(parser)
    parser.add_argument("--format", default="markdown", choices=FORMATS)
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS),
                        help="wide: a row per method, tasks as columns (the papers'); long: a row per task, a column "
                             "per method; auto (default): long when the wide table would not fit the terminal "
                             "(latex: wide; csv: always a row per method)")
    parser.add_argument("--columns", default="params",
                        help=f"cost columns, comma list of {', '.join(EXTRA_COLUMNS)} (or 'none')")
    parser.add_argument("--compare", metavar="METHOD",
                        help="mark the cells that differ from METHOD's beyond the seeds' noise (Welch's t-test)")
    parser.add_argument("--alpha", type=float, default=0.05, help="--compare's threshold on p (default: 0.05)")
    parser.add_argument("--reference", metavar="SOURCE",
                        help="add the published number and our delta per cell (e.g. toast-paper, vpt-paper)")
    parser.add_argument("--reference-table", metavar="N", help="with --reference: compare with this table only")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    suite = suite_from_args(args)
    methods, tasks = select_names(suite, args.methods, args.tasks)
    extra = tuple(c.strip() for c in args.columns.split(",") if c.strip() and c.strip() != "none")
    unknown = [c for c in extra if c not in EXTRA_COLUMNS]
    if unknown:
        raise HarnessError(f"unknown column '{unknown[0]}' (expected some of {', '.join(EXTRA_COLUMNS)})")
    from harness.table import build_table, coverage_note, other_settings_hint, override_flags

    store = store_from_args(args)
    missing: list[str] = []
    compare = None
    if args.compare:
        matched = select_names(suite, args.compare, None)[0]  # a typo gets did-you-mean
        if len(matched) != 1:
            raise HarnessError(f"--compare takes one method; '{args.compare}' matches {', '.join(matched)}")
        compare = matched[0]
    reference = None
    if args.reference_table and not args.reference:
        raise HarnessError("--reference-table needs --reference SOURCE")
    if args.reference:
        from harness.reference import Comparison, load, reference_backbone, select_table

        numbers = load(args.reference)  # an unknown source or table fails before any record is read
        if args.reference_table:
            select_table(numbers, args.reference, args.reference_table)
        reference = Comparison(args.reference, args.reference_table,
                               backbone=reference_backbone(args.reference, suite.backbone["name"]))
    options = dict(methods=methods, tasks=tasks, fmt=args.format, extra=extra, compare=compare, alpha=args.alpha,
                   reference=reference)
    print(build_table(suite, store, missing=missing, layout=args.layout, width=terminal_width(), **options))
    if compare is not None and args.format == "csv":  # csv has no footnotes: its columns say compare and alpha
        from harness.table import compare_footnote

        print(compare_footnote(compare, args.alpha), file=sys.stderr)
    if missing:
        print(coverage_note(suite, store, len(methods) * len(tasks), missing), file=sys.stderr)
        hint = other_settings_hint(suite, store, override_flags(suite.overrides))
        if hint:
            print(hint, file=sys.stderr)
    for problem in store.problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def terminal_width() -> int | None:
    """The terminal's width when the table goes to one (or ``$COLUMNS`` says it), else None: a file or a pipe has
    no width, and gets the wide layout."""
    import os
    import shutil

    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        return None
    return shutil.get_terminal_size().columns
