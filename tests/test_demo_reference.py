"""The demo's reference run, as a new user gets it (``pytest -m slow``; ~10 minutes on 2 cores): every cell's
seeds agree (std below 5 points) and every seed of every method is clearly above chance."""

from __future__ import annotations

import pytest

from harness.api import TASKS
from harness.cli import main
from harness.plan import Cell, cell_state, plan_cells
from harness.store import Store
from harness.sweep import load_suite


@pytest.mark.slow
def test_reference_demo_run_is_stable(tmp_path):
    results = tmp_path / "results"
    assert main(["run", "--suite", "demo", "--results", str(results), "--no-progress"]) == 0
    suite, store = load_suite("demo"), Store(results)
    for cell in plan_cells(suite.methods, suite.tasks):
        state = cell_state(suite, cell, store)
        values = [r["metrics"]["eval"] for r in state.final_records]
        chance = 100.0 / TASKS.get(cell.task).num_classes
        assert len(values) == len(suite.seeds), cell.key
        spread = max(values) - min(values)
        assert spread / 2 < 5.0, f"{cell.key}: seeds {values}"  # population std of two seeds = half the spread
        assert min(values) >= max(chance + 10, 1.5 * chance), f"{cell.key}: seeds {values}, chance {chance:.1f}"
