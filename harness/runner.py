"""Running cells: a cell's search trials, the selection, then its final trials, each landing as its own record.

Which trials exist and which have run comes from :func:`harness.plan.cell_state` alone. Rerunning is resuming: a
trial whose finished record exists is skipped, so a killed run picks up at the first missing trial and a finished
grid is a no-op. Every executor (inline, local processes, SLURM) runs cells through :func:`run_cell`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.distributed import SINGLE, GroupBroken, World
from harness.plan import Cell, CellState, TrialSpec, cell_state
from harness.store import Store
from harness.sweep import Suite

TrialRunner = Callable[[TrialSpec], dict[str, Any]]


@dataclass
class CellOutcome:
    cell: Cell
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    #: the cell's state after the run: complete, or why not (state.blocked)
    state: CellState | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.state is not None and self.state.complete

    @property
    def note(self) -> str:
        return "" if self.state is None or self.complete else self.state.blocked


def run_cell(suite: Suite, cell: Cell, store: Store, run: TrialRunner, world: World = SINGLE) -> CellOutcome:
    """Run what is missing of one cell's protocol, in order: the search, then (once every search trial has
    finished) the winner's finals. A trial that fails is recorded as failed and not retried within this run.

    Data-parallel (``world``): every rank runs the same trials; rank 0 writes each record and the others wait for
    it before they read the store again. A failed data-parallel trial ends the run (:class:`GroupBroken`) once
    its record is written: its process group is gone, and a rerun resumes it from its epoch checkpoint."""
    outcome = CellOutcome(cell)
    attempted: set[str] = set()
    while True:
        state = cell_state(suite, cell, store, stale=False)
        todo = [spec for spec in state.to_run() if spec.id not in attempted]
        if not todo:
            break
        for spec in todo:
            attempted.add(spec.id)
            record = run(spec)
            if world.main:
                store.write(record)
            if (record.get("distributed") or {}).get("broken"):
                raise GroupBroken(f"{spec.label()} failed on {world.size} processes: {record['error']['message']}"
                                  " (recorded; rerun the same command to resume from its last epoch checkpoint)")
            world.barrier()
            outcome.ran += 1
            outcome.records.append(record)
            if record["status"] == "failed":
                outcome.failed += 1
    outcome.state = state
    outcome.skipped = sum(s.finished for s in state.slots) - sum(r["status"] != "failed" for r in outcome.records)
    return outcome
