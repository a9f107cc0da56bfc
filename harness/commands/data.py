"""``harness data check``: is a suite's data on disk, in the layout its tasks read?

For each task and split it reports the folder and split files found or missing, entries per split against the
expected count, malformed lines (file:line and the line), labels outside [0, classes), listed images that are absent,
duplicate entries and, with ``--deep``, a sample of images that fail to decode. The problems are exactly what each
task's ``check()`` returns, which ``harness run`` also calls before planning and refuses with.

Exit status: 0 when every checked task is clean, 1 when any problem was found, 2 for a usage error (unknown suite
or task, bad flag). Notes (e.g. split sizes that differ from the protocol's under ``data.strict_counts=false``) are
printed but do not fail the check.

A task may offer ``inspect(ctx, deep)`` returning an object with ``rows`` (one dict per split), ``problems`` and
``notes``; the table is printed for tasks that do, the problems alone for tasks that only have ``check``.
"""

from __future__ import annotations

import argparse

from harness.api import TASKS, DataContext, Task
from harness.commands import cache_dir, formatter
from harness.errors import HarnessError
from harness.plan import select_tasks
from harness.sweep import Suite, load_suite, parse_set

EXAMPLES = """\
examples:
  harness data check --suite vtab --data-root ~/data/vtab-1k
  harness data check --suite vtab --data-root ~/data/vtab-1k --tasks vtab-dtd,vtab-structured --deep
  harness data check --suite fgvc --data-root ~/data/fgvc --deep --sample 0      # decode every image
  harness data check --suite fgvc --tasks fgvc-cub --set data.roots.fgvc-cub=/scratch/CUB_200_2011

exit status: 0 clean, 1 problems found, 2 usage error
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("data", help="check datasets on disk", description=__doc__, epilog=EXAMPLES,
                            formatter_class=formatter)
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION")
    actions.required = True
    check = actions.add_parser("check", help="check a suite's datasets: folders, split files, labels, images",
                               description=__doc__, epilog=EXAMPLES, formatter_class=formatter)
    check.add_argument("--suite", required=True, help="suite name (fgvc, vtab, ...) or a suite file path")
    check.add_argument("--data-root", help="where the suite's datasets live (default: the suite's data.root)")
    check.add_argument("--tasks", help="comma list of tasks or task lists, wildcards allowed (default: the suite's)")
    check.add_argument("--deep", action="store_true", help="also decode a sample of each split's images")
    check.add_argument("--sample", type=int, default=100,
                       help="images decoded per split with --deep (default 100; 0 decodes all)")
    check.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                       help="override a suite key, dotted (e.g. data.strict_counts=false); repeatable")
    check.set_defaults(func=main)


def data_context(suite: Suite, sample: int) -> DataContext:
    """The same context ``harness run`` gives a task's check, plus the deep-check sample size."""
    from harness.inputs import suite_data_context

    ctx = suite_data_context(suite, cache_dir())
    ctx.settings["deep_sample"] = sample
    return ctx


def check_task(task: Task, ctx: DataContext, deep: bool) -> tuple[str, list[str], list[str]]:
    """(text to print, problems, notes) for one task."""
    from tabulate import tabulate

    inspect = getattr(task, "inspect", None)
    if inspect is None:
        problems, notes, lines = task.check(ctx, deep=deep), [], [task.name]
    else:
        report = inspect(ctx, deep)
        problems, notes = list(report.problems), list(report.notes)
        lines = [f"{task.name}  ({getattr(report, 'root', None) or 'no folder'})"]
        if report.rows:
            lines += ["  " + row for row in tabulate(report.rows, headers="keys", tablefmt="simple").splitlines()]
    lines += [f"  problem: {p}" for p in problems]
    lines += [f"  note: {n}" for n in notes]
    if not problems:
        lines.append("  clean" + (" (images decoded)" if deep else ""))
    return "\n".join(lines), problems, notes


def main(args: argparse.Namespace) -> int:
    if args.sample < 0:
        raise HarnessError(f"--sample expects 0 (all) or a positive number, got {args.sample}")
    suite = load_suite(args.suite, data_root=args.data_root, sets=parse_set(args.set))
    names = select_tasks(suite, args.tasks)
    ctx = data_context(suite, args.sample)
    dirty = total = 0
    for name in names:
        text, problems, _ = check_task(TASKS.get(name), ctx, args.deep)
        print(text)
        print()
        dirty += bool(problems)
        total += len(problems)
    if dirty:
        print(f"{len(names)} task(s) checked: {len(names) - dirty} clean, {dirty} with problems ({total} in all)")
        return 1
    print(f"{len(names)} task(s) checked: all clean")
    return 0
