"""The nightly report as a SLURM job (``harness nightly --executor slurm``): it starts after the night's arrays end
and runs :func:`run_report`, which writes a report even when the comparison cannot be made."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from harness.errors import HarnessError
from harness.regress import EXIT_CANNOT_COMPARE, EXIT_CLEAN, EXIT_REGRESSION, Tolerances
from harness.reports import Outcome, failure_report, outcome_lines, regress, write_failure_report
from harness.sweep import Suite


class ReportJob:
    """The nightly report as a job (``harness nightly --executor slurm``): runs after the night's array ends
    (``afterany``), compares, writes the reports. It returns the exit code when the night is clean, and raises
    when it regressed or could not compare, so the job's state (COMPLETED / FAILED) says which."""

    def __init__(self, suite: Suite, results: Path, run_id: str, baseline: Path, report_dir: Path,
                 tol: Tolerances, methods: list[str], tasks: list[str], since: datetime | None = None):
        self.suite, self.results, self.run_id = suite, Path(results).resolve(), run_id
        self.baseline, self.report_dir = Path(baseline).resolve(), Path(report_dir).resolve()
        self.tol, self.methods, self.tasks, self.since = tol, methods, tasks, since

    def __call__(self) -> int:
        outcome = run_report(self.suite, self.results, self.run_id, self.baseline, self.report_dir, self.tol,
                             self.methods, self.tasks, self.since)
        for line in outcome_lines(outcome):
            print(line, flush=True)
        if outcome.exit_code != EXIT_CLEAN:
            raise RuntimeError(f"nightly {self.suite.name} run {self.run_id}: "
                               + ("regression" if outcome.exit_code == EXIT_REGRESSION else "could not compare")
                               + f" (exit {outcome.exit_code}); report: {self.report_dir / 'report.md'}")
        return outcome.exit_code


def run_report(suite: Suite, results: Path, run_id: str, baseline: Path, report_dir: Path, tol: Tolerances,
               methods: list[str], tasks: list[str], since: datetime | None = None) -> Outcome:
    """:func:`regress` for a night: a comparison that cannot be made still writes a report (saying why, exit 2)."""
    try:
        return regress(suite, results, baseline, run_id, methods, tasks, tol, report_dir, since)
    except HarnessError as err:
        report = failure_report(suite.name, str(err))
        return Outcome(EXIT_CANNOT_COMPARE, report, write_failure_report(report, report_dir))
