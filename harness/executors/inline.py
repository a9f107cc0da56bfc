"""``--executor inline``: run the cells in this process, one after another, under one progress bar of trials.

Nothing is written to the terminal while the bar is open except the bar itself: diverged and failed trials and
cells that could not finish are collected and printed once the bar is closed.
"""

from __future__ import annotations

import argparse
from typing import Any

from harness import train
from harness.executors import EXIT_COMPLETE, EXIT_UNFINISHED, unfinished
from harness.plan import Cell, TrialSpec
from harness.runner import CellOutcome, run_cell
from harness.store import Store
from harness.sweep import Suite
from harness.train import TrialEnv


def run_inline(suite: Suite, cells: list[Cell], store: Store, env: TrialEnv, args: argparse.Namespace,
               total_pending: int | None = None) -> int:
    """Run what is missing of every cell here and now. Returns 0 when every cell is complete, else 1."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_pending, desc="trials", unit="trial", disable=not (env.progress and env.world.main),
               dynamic_ncols=True)
    messages: list[str] = []
    outcomes: list[CellOutcome] = []

    def run(spec: TrialSpec) -> dict[str, Any]:
        bar.set_description(f"{spec.method}/{spec.task} {spec.stage}")
        record = train.run_trial(spec, env)
        bar.update(1)
        if record["status"] == "failed":
            messages.append(f"failed: {spec.label()}: {record['error']['type']}: {record['error']['message']}")
        elif record["status"] == "diverged":
            messages.append(f"diverged: {spec.label()} (recorded; selection skips it)")
        return record

    try:
        for cell in cells:
            outcome = run_cell(suite, cell, store, run, env.world)
            outcomes.append(outcome)
            if outcome.state is not None and (line := unfinished(outcome.state)):
                messages.append(line)
    finally:
        bar.close()
        for line in messages:
            print(line)
    return EXIT_COMPLETE if all(o.complete for o in outcomes) else EXIT_UNFINISHED
