"""From a suite to work: cells (method x task), grid points, immutable trial specs and their ids, and the
protocol that decides which trials a cell runs and how the winner is chosen.

The protocol never lets a search decision read the final evaluation split: search trials train on the search
split and score on the validation split; :func:`select_best` refuses records that are not search records.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from sklearn.model_selection import ParameterGrid

from harness.api import METHODS, TASKS, Method, Task
from harness.errors import HarnessError
from harness.sweep import Suite

SPEC_VERSION = 1


def trial_id(spec: dict[str, Any]) -> str:
    """A stable id: the first 16 hex digits of the sha256 of the spec's canonical JSON."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    method: str
    task: str

    @property
    def key(self) -> str:
        return f"{self.method}/{self.task}"


def select_names(suite: Suite, methods: str | None, tasks: str | None) -> tuple[list[str], list[str]]:
    """Methods and tasks picked with comma lists and wildcards; defaults are the suite's own lists. Tasks named
    in a suite's ``task_lists`` (e.g. ``vtab-paper``) expand to their members."""
    method_names = METHODS.match(methods) if methods else METHODS.match(suite.methods)
    lists = suite.raw.get("task_lists") or {}
    if tasks:
        patterns: list[str] = []
        for pattern in tasks.split(","):
            patterns += lists.get(pattern.strip(), [pattern])
        task_names = TASKS.match(patterns)
    else:
        task_names = TASKS.match(suite.tasks)
    return method_names, task_names


def plan_cells(method_names: list[str], task_names: list[str]) -> list[Cell]:
    return [Cell(m, t) for m in method_names for t in task_names]


def search_grid(method: Method, suite: Suite) -> dict[str, list]:
    """The method's default grid, with axes replaced by the suite's grid for it."""
    grid = {k: list(v) for k, v in method.grid.items()}
    grid.update({k: list(v) for k, v in (suite.grid_for(method.name) or {}).items()})
    return grid


def grid_points(method: Method, task: Task, suite: Suite) -> list[dict[str, Any]]:
    """All hyperparameter points of a cell's search, in ParameterGrid order, cut to ``--grid-points``."""
    fixed = method.defaults_for(task)
    fixed.update(suite.settings_for(method.name, task.name))
    grid = search_grid(method, suite)
    for axis in grid:
        fixed.pop(axis, None)
    points = [dict(fixed, **point) for point in ParameterGrid(grid)] if grid else [dict(fixed)]
    limit = suite.overrides.get("grid_points")
    return points[:limit] if limit else points


def final_hparams_fixed(method: Method, task: Task, suite: Suite) -> dict[str, Any]:
    """Hyperparameters of a ``fixed`` protocol cell (FGVC in the paper): defaults, suite settings, fixed table."""
    hp = method.defaults_for(task)
    hp.update(suite.settings_for(method.name, task.name))
    chosen = suite.fixed_for(method.name, task.name)
    if chosen is None:
        raise HarnessError(
            f"{suite.line_of('fixed')}: no fixed hyperparameters for method '{method.name}' on task "
            f"'{task.name}' (expected fixed.{method.name}.{task.name} or fixed.{method.name}.'*')"
        )
    hp.update(chosen)
    return hp


def make_spec(suite: Suite, cell: Cell, stage: str, hparams: dict[str, Any], seed: int) -> dict[str, Any]:
    section = suite.protocol["search" if stage == "search" else "final"]
    spec = {"spec_version": SPEC_VERSION, **suite.spec_base()}
    spec.update(
        method=cell.method,
        task=cell.task,
        stage=stage,
        train_split=section["train"],
        eval_split=section["eval"],
        hparams=dict(sorted(hparams.items())),
        seed=int(seed),
    )
    for key in METHODS.get(cell.method).suite_sections:
        spec[key] = suite.raw.get(key)
    return spec


def search_specs(suite: Suite, cell: Cell) -> list[dict[str, Any]]:
    if suite.protocol["kind"] != "search-then-final":
        return []
    method, task = METHODS.get(cell.method), TASKS.get(cell.task)
    seed = int(suite.protocol["search"].get("seed", suite.seeds[0]))
    return [make_spec(suite, cell, "search", hp, seed) for hp in grid_points(method, task, suite)]


def final_specs(suite: Suite, cell: Cell, hparams: dict[str, Any]) -> list[dict[str, Any]]:
    return [make_spec(suite, cell, "final", hparams, seed) for seed in suite.seeds]


def fixed_hparams(suite: Suite, cell: Cell) -> dict[str, Any]:
    return final_hparams_fixed(METHODS.get(cell.method), TASKS.get(cell.task), suite)


def planned_trial_count(suite: Suite, cell: Cell) -> tuple[int, int]:
    """(search trials, final trials) for a cell."""
    return len(search_specs(suite, cell)), len(suite.seeds)


def select_best(records: list[dict[str, Any]], higher_is_better: bool = True) -> dict[str, Any] | None:
    """The winning search record: best last-epoch validation metric; ties go to the smaller learning rate.

    Diverged and failed trials are skipped. Returns None when no search trial finished. Only search records
    are accepted, so the final evaluation split can never influence the choice.
    """
    candidates = []
    for order, record in enumerate(records):
        spec = record["spec"]
        if spec["stage"] != "search":
            raise ValueError(f"selection was given a {spec['stage']} record ({record['id']}); only search records")
        if record.get("status") != "ok":
            continue
        value = record["metrics"]["eval"]
        if value is None or not math.isfinite(value):
            continue
        score = -value if higher_is_better else value
        candidates.append((score, float(spec["hparams"].get("lr", 0.0)), order, record))
    if not candidates:
        return None
    return min(candidates, key=lambda c: c[:3])[3]
