"""``harness nightly``: one night of the regression check in one command. It starts a new run (a store of its own,
``<results>/_runs/<run id>/``, so every trial trains again with today's code), runs the suite's grid in it and then
compares the night with the baseline, writing report.md, report.json and report.html into --report-dir.

With ``--executor slurm`` nothing waits on the login node: the grid goes out as job arrays and a small report job
is submitted with an ``afterany`` dependency on them, so SLURM starts it once the arrays have ended (whatever their
outcome) and it writes the report; the command returns 0 once both are submitted, and the report job ends FAILED
when the night regressed or could not be compared. With ``--executor local`` or ``inline`` it runs the night here,
then the comparison, and its exit status is the comparison's: 0 clean, 1 regression, 2 could not compare.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.commands import add_suite_args, formatter, results_dir, suite_from_args
from harness.commands.regress import add_tolerance_args, tolerances_from_args
from harness.commands.run import add_cluster_args
from harness.plan import plan_cells, select_names

EXAMPLES = """\
examples:
  harness nightly --suite nightly --baseline results/baselines/nightly.json --report-dir results/nightly-report
  harness nightly --suite nightly --baseline results/baselines/nightly.json --report-dir ~/public_html/nightly \\
      --executor slurm --partition gpu --gpus 1 --time 120
  harness nightly --suite nightly --baseline ... --report-dir ... --run-id 2026-11-30T0300Z   # resume that night

The first baseline: run a night by hand (`harness run --suite nightly --run-id auto`), check its table, then
`harness baseline --suite nightly --out results/baselines/nightly.json`. A cron line, at 03:00 every night:
  0 3 * * * cd /path/to/harness && .venv/bin/harness nightly --suite nightly --baseline results/baselines/nightly.json --report-dir results/nightly-report --executor slurm
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("nightly", help="run a night of a suite in a run of its own, then compare it",
                            description=__doc__, epilog=EXAMPLES, formatter_class=formatter)
    add_suite_args(parser)
    parser.set_defaults(suite="nightly")
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline file (`harness baseline --out`)")
    parser.add_argument("--report-dir", type=Path, required=True,
                        help="where report.md, report.json and report.html are written")
    parser.add_argument("--executor", default="inline",
                        help="inline (default) or local: run here, then compare; slurm: submit the grid and a "
                             "report job that starts after it (afterany) and return")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-table", action="store_true", help="do not print the night's table")
    add_tolerance_args(parser)
    add_cluster_args(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from harness.commands import run as run_command
    from harness.errors import HarnessError, did_you_mean
    from harness.executors import EXECUTORS
    from harness.executors.report import ReportJob, run_report
    from harness.regress import load_baseline
    from harness.reports import outcome_lines
    from harness.runs import check_run_id, new_run_id, runs_root

    if args.executor not in EXECUTORS:
        raise HarnessError(f"unknown executor '{args.executor}'{did_you_mean(args.executor, EXECUTORS)}")
    suite = suite_from_args(args)
    methods, tasks = select_names(suite, args.methods, args.tasks)
    tol = tolerances_from_args(args)
    load_baseline(args.baseline, suite)  # no baseline: say so now, not after a night of training
    results = results_dir(args)
    args.run_id = new_run_id() if args.run_id in (None, "auto") else check_run_id(args.run_id)
    for name, value in (("dry_run", False), ("keep_weights", False)):
        setattr(args, name, value)
    report_dir = Path(args.report_dir)

    if args.executor != "slurm":
        code = run_command.main(args)
        outcome = run_report(suite, results, args.run_id, args.baseline, report_dir, tol, methods, tasks)
        print()
        if code:
            print(f"the night's run ended with exit status {code} (see above); comparing what it recorded")
        for line in outcome_lines(outcome):
            print(line)
        return outcome.exit_code

    from harness.executors.ledger import Ledger
    from harness.executors.settings import settings_from
    from harness.executors.slurm import array_ids, live_jobs, submit_after

    folder = (runs_root(results) / args.run_id / suite.name / "_jobs").resolve()
    before = len(Ledger(folder).entries())
    run_command.main(args)
    new = Ledger(folder).entries()[before:]
    waits = list(dict.fromkeys(array_ids(new) + array_ids(live_jobs(folder, suite, plan_cells(methods, tasks)))))
    job = ReportJob(suite, results, args.run_id, args.baseline, report_dir, tol, methods, tasks)
    job_id = submit_after(job, folder, f"harness-{suite.name}-report", settings_from(suite, args), waits)
    print(f"report job {job_id}: starts after " + (f"job(s) {', '.join(waits)} end (afterany)" if waits else
                                                   "nothing (no job of this night is queued)")
          + f"; writes {report_dir.resolve() / 'report.md'} (.json, .html); log: {folder / 'slurm' / job_id}/")
    return 0
