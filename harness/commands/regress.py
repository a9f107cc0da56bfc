"""``harness regress``: compare a run of a suite (the latest by default) with a frozen baseline, per cell
(method/task), and write a markdown, a JSON and a self-contained HTML report.

A cell regresses when its mean over seeds drops by more than max(--abs-tol, --k x the baseline's seed std), when
it is missing (the baseline has it, the run has no counted final record) or has fewer seeds, when a trial failed or
diverged, or when its training throughput fell / its peak memory rose by more than --cost-tol (relative; compared
only on the same kind of device). Cells the suite's `flaky:` list names are reported, never failing. Reports list
the commits on both sides and the largest changes first.

Exit status: 0 clean, 1 a regression, 2 could not compare (no baseline file, no run, a baseline of another suite).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.commands import add_suite_args, formatter, results_dir, suite_from_args
from harness.plan import select_names

EXAMPLES = """\
examples:
  harness regress --suite nightly --baseline results/baselines/nightly.json                # the latest night
  harness regress --suite nightly --baseline results/baselines/nightly.json --report-dir results/nightly-report
  harness regress --suite nightly --baseline results/baselines/nightly.json --run-id 2026-11-30T0300Z
  harness regress --suite nightly --baseline results/baselines/nightly.json --since 2026-11-01   # + each cell's history
"""


def add_tolerance_args(parser: argparse.ArgumentParser) -> None:
    from harness.regress import ABS_TOL, COST_TOL, K_STD

    group = parser.add_argument_group("tolerances")
    group.add_argument("--abs-tol", type=float, default=ABS_TOL, metavar="POINTS",
                       help=f"a drop counts only beyond this many metric points (default: {ABS_TOL:g})")
    group.add_argument("--k", type=float, default=K_STD,
                       help=f"... and beyond K x the baseline's seed std (default: {K_STD:g}); the tolerance is "
                            "max(abs-tol, k x std)")
    group.add_argument("--cost-tol", type=float, default=COST_TOL, metavar="FRACTION",
                       help=f"throughput lower / peak memory higher by more than this fraction counts (default: "
                            f"{COST_TOL:g}, i.e. {COST_TOL * 100:.0f}%%; 'inf' turns the cost check off)")


def add_parser(sub) -> None:
    parser = sub.add_parser("regress", help="compare a run with the baseline: exit 0 clean, 1 regression",
                            description=__doc__, epilog=EXAMPLES, formatter_class=formatter)
    add_suite_args(parser)
    parser.set_defaults(suite="nightly")
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline file (`harness baseline --out`)")
    parser.add_argument("--report-dir", type=Path,
                        help="write report.md, report.json and report.html here (default: the run's folder, "
                             "<results>/_runs/<run id>/report)")
    parser.add_argument("--since", metavar="DATE",
                        help="also print each cell's history over the runs since DATE (e.g. 2026-11-01)")
    add_tolerance_args(parser)
    parser.set_defaults(func=main)


def tolerances_from_args(args: argparse.Namespace):
    from harness.regress import Tolerances

    return Tolerances(abs_tol=args.abs_tol, k=args.k, cost_tol=args.cost_tol).check()


def main(args: argparse.Namespace) -> int:
    from harness.regress import load_baseline, records_source
    from harness.reports import history_lines, regress, report_bases, summary_lines
    from harness.runs import parse_time

    suite = suite_from_args(args)
    methods, tasks = select_names(suite, args.methods, args.tasks)
    tol = tolerances_from_args(args)
    since = parse_time(args.since) if args.since else None
    results = results_dir(args)
    load_baseline(args.baseline, suite)  # a missing or foreign baseline is said first
    report_dir = args.report_dir
    if report_dir is None:
        _, run = records_source(results, suite, args.run_id)
        report_dir = (run.folder if run is not None else results / suite.name) / "report"
    outcome = regress(suite, results, args.baseline, args.run_id, methods, tasks, tol, report_dir, since)
    if since is not None:
        print(f"history since {since.date()} ({len(next(iter(outcome.report['history'].values()), []))} run(s)):")
        for line in history_lines(outcome.report["history"], report_bases(outcome.report)):
            print(f"  {line}")
        print()
    for line in summary_lines(outcome):
        print(line)
    return outcome.exit_code
