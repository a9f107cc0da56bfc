"""What ``harness status`` shows per cell: the protocol state from the records (:func:`harness.plan.cell_state`:
counts, failed trials, dead ends, stale records) merged with the cell's latest job from the ledger and the queue.

State words: ``done`` (complete), ``no result`` (every search trial diverged: the cell cannot produce a number),
``running`` / ``pending`` (its job is alive, or nothing has run it yet), ``failed`` (failed trials, or its job ended
without finishing the cell; the reason names the job's log and its last error lines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.executors.ledger import Ledger, jobs_dir
from harness.executors.queue import ENDED_STATES, JobView, QueueUnavailable, job_views, log_tail
from harness.plan import Cell, StaleRecord, cell_state, cell_token
from harness.store import Store
from harness.sweep import Suite


@dataclass
class CellReport:
    cell: Cell
    state: str  # done / no result / running / pending / failed
    counts: dict[str, int]  # the protocol state's counts: done, diverged, failed, pending
    job: JobView | None = None
    reason: str = ""
    details: list[str] = field(default_factory=list)
    #: records of the cell's current settings that its plan no longer has (never counted), with the reason
    stale: int = 0
    stale_records: list[StaleRecord] = field(default_factory=list)


def cell_reports(suite: Suite, cells: list[Cell], store: Store) -> tuple[list[CellReport], str | None]:
    """Per cell: its protocol state merged with its latest submitted job. Returns the reports and a warning when
    the queue could not be asked (states then come from records and logs alone)."""
    entries = list(Ledger(jobs_dir(store, suite)).latest().values())
    warning = None
    try:
        views = job_views(entries)
    except QueueUnavailable as err:
        warning = f"queue state unknown ({err}); showing records only"
        views = {}
    reports = []
    for cell in cells:
        state = cell_state(suite, cell, store)
        counts = state.counts
        job = views.get(cell_token(suite, cell)) if views else None
        report = CellReport(cell, "pending", counts, job, stale=len(state.stale), stale_records=list(state.stale))
        if state.complete:
            report.state = "done"
        elif state.dead_end:
            report.state, report.reason = "no result", state.blocked
        elif job is not None and (job.alive or job.state not in (*ENDED_STATES, "UNKNOWN")):
            report.state = "running" if job.running else "pending"
        elif state.failed_records or (job is not None and job.ended):
            report.state = "failed"
            if job is not None and job.state == "COMPLETED":  # it ran but left trials missing: its output says why
                report.reason = (f"job {job.job_id} COMPLETED with {counts['pending']} trial(s) missing: log "
                                 f"{job.entry['stdout']}")
                report.details = log_tail(job.entry["stdout"], 2)
            elif job is not None:
                report.reason = f"job {job.job_id} {job.state}: log {job.entry['stderr']}"
                report.details = log_tail(job.entry["stderr"])
            else:
                err = state.failed_records[0]["error"]
                report.reason = f"{len(state.failed_records)} failed trial(s), e.g. {err['type']}: {err['message']}"
        reports.append(report)
    return reports, warning
