"""The demo suite's final trials at its own budget: every seed of every default method ends clearly above chance on
every demo task, and each cell's two seeds agree.

This is the real demo path: the backbone pre-trained by the harness on generated glyphs (and, for TOAST, its
pre-tuned top-down module), the demo's schedule, epochs and seeds. The search stage is left out (the nightly test
runs selection on the same backbone; tests/test_plan.py and test_cli.py cover search -> final): each method trains
at its grid's first point, the largest learning rate of its demo grid, where a seed is likeliest to go astray. A seed
that collapses to chance while the other learns (lora and toast did at the demo's former lr 1.0 without warm-up)
fails it. The cells run as two local worker processes, one per core.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict

import torch
import yaml

from harness.api import METHODS, TASKS
from harness.cli import main
from harness.sweep import load_suite, suite_path


def clearly_above_chance(accuracy: float, num_classes: int) -> bool:
    """At least 10 points above chance and 1.5x chance: far outside what a 1,000-image test split gives a model
    that guesses (its standard error is about 1 point)."""
    chance = 100.0 / num_classes
    return accuracy >= max(chance + 10, 1.5 * chance)


#: the most a cell's seed std (population, as the table prints it) may be: the bound the README's demo table keeps
#: (tests/test_demo_reference.py checks the whole run with search, pytest -m slow)
MAX_SEED_STD = 5.0


def demo_finals_suite(tmp_path) -> str:
    """sweeps/demo.yaml with a fixed protocol: each method's first grid point, the demo's final split and seeds.
    The test split is scored once, after the last epoch (``train.eval_every``): the same reported number as the
    demo's per-epoch curve gives (tests/test_sweep.py), a fifth less time."""
    raw = yaml.safe_load(suite_path("demo").read_text())
    raw["train"]["eval_every"] = raw["train"]["epochs"]
    first = {method: {key: values[0] for key, values in grid.items()} for method, grid in raw["grids"].items()}
    raw["protocol"] = {"kind": "fixed", "final": raw["protocol"]["final"], "seeds": raw["protocol"]["seeds"]}
    raw["fixed"] = {method: {"*": point} for method, point in first.items()}
    del raw["grids"]
    path = tmp_path / "demo-finals.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_every_seed_of_every_default_method_beats_chance_and_seeds_agree(tmp_path, capsys):
    # the backbone's pre-training runs in this process before the workers start: give it the threads a user's run
    # has (conftest's fixture restores one thread afterwards); each worker then takes one core
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    suite = load_suite("demo")
    methods = [m for m in suite.methods if m in METHODS]
    results = tmp_path / "results"
    code = main(["run", "--suite", demo_finals_suite(tmp_path), "--results", str(results), "--no-progress",
                 "--executor", "local", "--workers", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    finals = [json.loads(p.read_text()) for p in results.rglob("final-*.json")]
    assert len(finals) == len(suite.seeds) * len(methods) * len(suite.tasks)
    assert {r["spec"]["train"]["epochs"] for r in finals} == {suite.train["epochs"]}
    below, by_cell = [], defaultdict(list)
    for record in finals:
        by_cell[record["spec"]["method"], record["spec"]["task"]].append(record["metrics"]["eval"])
        task = TASKS.get(record["spec"]["task"])
        accuracy = record["metrics"]["eval"]
        if record["status"] != "ok" or not clearly_above_chance(accuracy, task.num_classes):
            below.append(f"{record['spec']['method']}/{task.name}: {record['status']} {accuracy}")
    assert not below, "not clearly above chance:\n" + "\n".join(below) + "\n" + out
    spread = {f"{m}/{t}": values for (m, t), values in by_cell.items() if statistics.pstdev(values) >= MAX_SEED_STD}
    assert not spread, f"seeds disagree (std >= {MAX_SEED_STD}): {spread}"
