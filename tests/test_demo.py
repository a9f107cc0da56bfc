"""The demo suite on a reduced setting: every seed of every default method ends clearly above chance on every demo
task, and each cell's two seeds agree.

This is the real demo path: the backbone pre-trained by the harness on generated glyphs (and, for TOAST, its
pre-tuned top-down module), the suite's own grids cut to their first point, two seeds, fewer epochs. A seed that
collapses to chance while the other learns (lora and toast did at the demo's former lr 1.0) fails it.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

from harness.api import METHODS, TASKS
from harness.cli import main
from harness.sweep import load_suite

def clearly_above_chance(accuracy: float, num_classes: int) -> bool:
    """At least 10 points above chance and 1.5x chance: far outside what a 1,000-image test split gives a model
    that guesses (its standard error is about 1 point)."""
    chance = 100.0 / num_classes
    return accuracy >= max(chance + 10, 1.5 * chance)


#: the most a cell's seed std (population, as the table prints it) may be on the reduced setting. Five of the demo's
#: eight epochs do not converge every cell (vpt-deep/demo-textures: 61.6 and 49.1 here), so the bound is looser
#: than the full reference run's 5 points (tests/test_demo_reference.py, pytest -m slow); a seed stuck at chance
#: while the other learns is far beyond both.
MAX_SEED_STD = 8.0


def test_every_seed_of_every_default_method_beats_chance_and_seeds_agree(tmp_path, capsys):
    suite = load_suite("demo")
    methods = [m for m in suite.methods if m in METHODS]
    results = tmp_path / "results"
    code = main(["run", "--suite", "demo", "--methods", ",".join(methods), "--results", str(results),
                 "--seeds", "2", "--grid-points", "1", "--epochs", "5", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    finals = [json.loads(p.read_text()) for p in results.rglob("final-*.json")]
    assert len(finals) == 2 * len(methods) * len(suite.tasks)
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
