"""Running cells: a cell's search trials, the selection, then its final trials, each landing as its own record.

Rerunning is resuming: a trial whose valid record exists is skipped, so a killed run picks up at the first missing
trial, and a finished grid is a no-op. Executors (inline, local processes, SLURM) all call :func:`run_cell`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.api import TASKS
from harness.plan import Cell, final_specs, fixed_hparams, search_specs, select_best
from harness.store import Store
from harness.sweep import Suite

TrialRunner = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class CellOutcome:
    cell: Cell
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    selected: dict[str, Any] | None = None
    note: str = ""
    final_records: list[dict[str, Any]] = field(default_factory=list)


def _run_or_reuse(spec: dict[str, Any], store: Store, run: TrialRunner, outcome: CellOutcome) -> dict[str, Any]:
    record = store.finished(spec)
    if record is not None:
        outcome.skipped += 1
        return record
    record = run(spec)
    store.write(record)
    outcome.ran += 1
    if record["status"] == "failed":
        outcome.failed += 1
    return record


def run_cell(suite: Suite, cell: Cell, store: Store, run: TrialRunner) -> CellOutcome:
    """Run what is missing of one cell's protocol, in order."""
    outcome = CellOutcome(cell)
    if suite.protocol["kind"] == "search-then-final":
        records = [_run_or_reuse(spec, store, run, outcome) for spec in search_specs(suite, cell)]
        best = select_best(records, TASKS.get(cell.task).higher_is_better)
        if best is None:
            outcome.note = "no search trial finished (all diverged or failed); final trials not run"
            return outcome
        hparams = best["spec"]["hparams"]
        outcome.selected = {"hparams": hparams, "search_trial": best["id"], "score": best["metrics"]["eval"]}
    else:
        hparams = fixed_hparams(suite, cell)
        outcome.selected = {"hparams": hparams, "search_trial": None, "score": None}
    for spec in final_specs(suite, cell, hparams):
        outcome.final_records.append(_run_or_reuse(spec, store, run, outcome))
    return outcome


def cell_status(suite: Suite, cell: Cell, store: Store) -> dict[str, Any]:
    """Counts of a cell's trials by state, from records alone (nothing runs)."""
    counts = {"done": 0, "diverged": 0, "failed": 0, "pending": 0}

    def count(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found = []
        for spec in specs:
            record = store.read(spec)
            if record is None:
                counts["pending"] += 1
            else:
                counts[{"ok": "done"}.get(record["status"], record["status"])] += 1
                found.append(record)
        return found

    searched: list[dict[str, Any]] = []
    if suite.protocol["kind"] == "search-then-final":
        specs = search_specs(suite, cell)
        searched = count(specs)
        best = select_best(searched, TASKS.get(cell.task).higher_is_better) if len(searched) == len(specs) else None
        if best is None:  # final hparams not known yet: all final trials pending
            counts["pending"] += len(suite.seeds)
            return counts
        hparams = best["spec"]["hparams"]
    else:
        hparams = fixed_hparams(suite, cell)
    count(final_specs(suite, cell, hparams))
    return counts
