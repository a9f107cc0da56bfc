"""``harness status``: per cell, how many trials are done, diverged, failed or pending (from the records, through
the one protocol state), merged with the cell's latest local/SLURM job (squeue, sacct and its log): done / running /
pending / failed / no result. For a failed cell it prints the job's log path and the last lines of its error. It
never waits on a job.

Records that have the suite's current settings but that the plan no longer has (an edited grid's old points, the
finals of an earlier winner, records of an older method, task or pre-tuning version) are *stale*: never counted in
tables. The ``stale`` column counts them per cell and ``--stale`` lists their files with the reason (e.g.
``method_version 1 -> 2``), so you can inspect or delete them.
"""

from __future__ import annotations

import argparse

from harness.commands import add_suite_args, formatter, store_from_args, suite_from_args
from harness.plan import plan_cells, select_names

EXAMPLES = """\
examples:
  harness status --suite demo
  harness status --suite vtab --methods 'toast*'
  harness status --suite demo --epochs 2 --seeds 1 --grid-points 1     # the same overrides as the run
  harness status --suite demo --stale                                  # list records no plan counts any more
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("status", help="progress of a suite's grid", description=__doc__, epilog=EXAMPLES,
                            formatter_class=formatter)
    add_suite_args(parser)
    parser.add_argument("--stale", action="store_true",
                        help="list the files of stale records (current settings, no longer in the plan), each "
                             "with the reason")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness.executors.status import cell_reports

    suite = suite_from_args(args)
    methods, tasks = select_names(suite, args.methods, args.tasks)
    store = store_from_args(args)
    reports, warning = cell_reports(suite, plan_cells(methods, tasks), store)
    with_jobs = any(r.job for r in reports)
    with_stale = any(r.stale for r in reports)
    rows = []
    for r in reports:
        row = {"cell": r.cell.key, "state": r.state, **r.counts}
        if with_stale:
            row["stale"] = r.stale
        if with_jobs:
            row["job"] = f"{r.job.job_id} {r.job.state}" if r.job else ""
        rows.append(row)
    print(tabulate(rows, headers="keys", tablefmt="simple"))
    states: dict[str, int] = {}
    for r in reports:
        states[r.state] = states.get(r.state, 0) + 1
    totals = {k: sum(r.counts[k] for r in reports) for k in ("done", "diverged", "failed", "pending")}
    print(f"\n{len(rows)} cells: " + ", ".join(f"{v} {k}" for k, v in totals.items()))
    print("cells by state: " + ", ".join(f"{v} {k}" for k, v in states.items() if v))
    stale = sum(r.stale for r in reports)
    if stale:
        print(f"{stale} stale record(s): made with these settings but no longer in the plan (an edited grid, an "
              "earlier winner, an older method or task version); never counted"
              + ("" if args.stale else "; list them with --stale"))
    if args.stale:
        for r in reports:
            for record in r.stale_records:
                print(f"stale: {record.path} ({record.reason})")
    for r in reports:
        if r.reason:
            print(f"\n{r.state}: {r.cell.key}: {r.reason}")
            for line in r.details:
                print(f"    {line}")
    if warning:
        print(f"warning: {warning}")
    for problem in store.problems:
        print(f"warning: {problem}")
    return 0
