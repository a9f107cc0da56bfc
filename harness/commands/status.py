"""``harness status``: per cell, how many trials are done, diverged, failed or pending (from the records), merged
with the cell's latest local/SLURM job (squeue, sacct and its log): done / running / pending / failed. For a failed
cell it prints the job's log path and the last lines of its error. It never waits on a job."""

from __future__ import annotations

import argparse

from tabulate import tabulate

from harness.commands import add_suite_args, formatter, store_from_args, suite_from_args
from harness.plan import plan_cells, select_names
from harness.slurm import cell_reports

EXAMPLES = """\
examples:
  harness status --suite demo
  harness status --suite vtab --methods 'toast*'
  harness status --suite demo --epochs 2 --seeds 1 --grid-points 1     # the same overrides as the run
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
    reports, warning = cell_reports(suite, plan_cells(methods, tasks), store)
    with_jobs = any(r.job for r in reports)
    rows = []
    for r in reports:
        row = {"cell": r.cell.key, "state": r.state, **r.counts}
        if with_jobs:
            row["job"] = f"{r.job.job_id} {r.job.state}" if r.job else ""
        rows.append(row)
    print(tabulate(rows, headers="keys", tablefmt="simple"))
    states = {s: sum(r.state == s for r in reports) for s in ("done", "running", "pending", "failed")}
    totals = {k: sum(r.counts[k] for r in reports) for k in ("done", "diverged", "failed", "pending")}
    print(f"\n{len(rows)} cells: " + ", ".join(f"{v} {k}" for k, v in totals.items()))
    print("cells by state: " + ", ".join(f"{v} {k}" for k, v in states.items() if v))
    for r in reports:
        if r.state == "failed":
            print(f"\nfailed: {r.cell.key}: {r.reason}")
            for line in r.details:
                print(f"    {line}")
    if warning:
        print(f"warning: {warning}")
    for problem in store.problems:
        print(f"warning: {problem}")
    return 0
