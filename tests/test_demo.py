"""The demo suite on a reduced setting: every default method ends clearly above chance on every demo task.

This is the real demo path: the backbone pre-trained by the harness on generated glyphs (and, for TOAST, its
pre-tuned top-down module), the suite's own grids cut to their first point, one seed, fewer epochs.
"""

from __future__ import annotations

import json

from harness.api import METHODS, TASKS
from harness.cli import main
from harness.sweep import load_suite

def clearly_above_chance(accuracy: float, num_classes: int) -> bool:
    """At least 10 points above chance and 1.5x chance: far outside what a 1,000-image test split gives a model
    that guesses (its standard error is about 1 point)."""
    chance = 100.0 / num_classes
    return accuracy >= max(chance + 10, 1.5 * chance)


def test_every_default_method_beats_chance_on_every_demo_task(tmp_path, capsys):
    suite = load_suite("demo")
    methods = [m for m in suite.methods if m in METHODS]
    results = tmp_path / "results"
    code = main(["run", "--suite", "demo", "--methods", ",".join(methods), "--results", str(results),
                 "--seeds", "1", "--grid-points", "1", "--epochs", "5", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    finals = [json.loads(p.read_text()) for p in results.rglob("final-*.json")]
    assert len(finals) == len(methods) * len(suite.tasks)
    below = []
    for record in finals:
        task = TASKS.get(record["spec"]["task"])
        accuracy = record["metrics"]["eval"]
        if record["status"] != "ok" or not clearly_above_chance(accuracy, task.num_classes):
            below.append(f"{record['spec']['method']}/{task.name}: {record['status']} {accuracy}")
    assert not below, "not clearly above chance:\n" + "\n".join(below) + "\n" + out
