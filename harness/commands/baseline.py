"""``harness baseline``: freeze a run's records (the latest run of the suite by default) as the baseline that
``harness regress`` compares later nights with: per cell (method/task) the mean, std and n over seeds of the
counted final records (as ``harness table`` counts them), their per-seed values, and the cost (training throughput,
peak memory, wall time per trial), plus the run id and the commit that produced them."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.commands import add_suite_args, formatter, suite_from_args
from harness.plan import select_names

EXAMPLES = """\
examples:
  harness baseline --suite nightly --out results/baselines/nightly.json             # the latest night
  harness baseline --suite nightly --run-id 2026-11-30T0300Z --out results/baselines/nightly.json

Without --run-id it reads the suite's latest run (<results>/_runs/<run id>/, see `harness run --run-id`); when the
suite has no run at all, the records under <results>/ (a plain `harness run`). Commit the file: it is the reference
every later `harness regress` compares with. Freeze a new one after an intended change of results or settings.
Records made by a tree with uncommitted changes are refused (--allow-dirty freezes them, marked so). Cost
(throughput, memory) compares only with records made the same way (device model, CPU threads and instruction set,
executor): keep one baseline per kind of machine, e.g. results/baselines/nightly-a100.json.
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("baseline", help="freeze a run's records as the regression baseline",
                            description=__doc__, epilog=EXAMPLES, formatter_class=formatter)
    add_suite_args(parser)
    parser.set_defaults(suite="nightly")
    parser.add_argument("--out", type=Path, required=True, help="the baseline file to write (JSON)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="freeze records made by a tree with uncommitted changes (refused by default); the "
                             "baseline and every report against it say so")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from harness.commands import results_dir
    from harness.regress import make_baseline, records_source, write_baseline

    suite = suite_from_args(args)
    methods, tasks = select_names(suite, args.methods, args.tasks)
    store, run = records_source(results_dir(args), suite, args.run_id)
    baseline, notes = make_baseline(suite, store, run, methods, tasks, allow_dirty=args.allow_dirty)
    path = write_baseline(baseline, args.out)
    source = f"run {run.run_id}" if run else str(store.root)
    git = baseline["git"]
    print(f"froze {len(baseline['cells'])} cell(s) of suite {suite.name} from {source} (commit "
          f"{str(git.get('commit') or 'unknown')[:12]}{' dirty' if git.get('dirty') else ''}) to {path}")
    print(f"  made on: {baseline['device']}")
    for key, cell in baseline["cells"].items():
        thr = f"{cell['throughput']:.0f} img/s" if cell["throughput"] is not None else "– img/s"
        print(f"  {key:<32} {cell['mean']:7.2f} ± {cell['std']:.2f}  n={cell['n']}  {thr}")
    for note in notes:
        print(f"note: {note}")
    for problem in store.problems:
        print(f"warning: {problem}")
    return 0
