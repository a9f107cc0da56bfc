"""From a suite to work: cells (method x task), grid points, immutable trial specs and their ids, and the
protocol that decides which trials a cell runs and how the winner is chosen.

The protocol never lets a search decision read the final evaluation split: search trials train on the search
split and score on the validation split; :func:`select_best` refuses records that are not search records.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import ARTIFACTS, METHODS, TASKS, Method, Task
from harness.errors import HarnessError
from harness.sweep import Suite

if TYPE_CHECKING:  # pragma: no cover
    from harness.store import Store

#: 2: specs are TrialSpec dataclasses; suite sections a method reads moved under ``sections``
SPEC_VERSION = 2
#: the code versions in a spec, with the value a record made before specs carried them reads as (a missing
#: version is version 1, a missing artifact version is none). At these values they are left out of the id, so
#: those records keep their ids and stay counted.
UNVERSIONED: dict[str, Any] = {"method_version": 1, "task_version": 1, "artifact_versions": {}}


def without_unversioned(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` without the version fields that are at their :data:`UNVERSIONED` values: what a key or id made
    before versions existed hashed, so it stays the same."""
    return {k: v for k, v in payload.items() if k not in UNVERSIONED or v != UNVERSIONED[k]}


def trial_id(spec: "TrialSpec | dict[str, Any]") -> str:
    """A stable id: the first 16 hex digits of the sha256 of the spec's canonical JSON (without the versions
    that are at their :data:`UNVERSIONED` values)."""
    payload = without_unversioned(spec.to_dict() if isinstance(spec, TrialSpec) else spec)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    method: str
    task: str

    @property
    def key(self) -> str:
        return f"{self.method}/{self.task}"


@dataclass(frozen=True)
class TrialSpec:
    """Everything that defines what one trial computes, and nothing else (where data lives, devices and
    progress bars are not in it). Its id is the hash of :meth:`to_dict`, so the same spec always lands in the same
    record file and rerunning is resuming. Records carry ``to_dict()``; :meth:`from_dict` reads it back."""

    suite: str
    method: str
    task: str
    stage: str  # "search" (scored on the validation split) or "final" (reported on the test split)
    train_split: str
    eval_split: str
    hparams: dict[str, Any]
    seed: int
    backbone: dict[str, Any]
    train: dict[str, Any]
    data: dict[str, Any]  # data settings that change what is computed (image_size, normalize, preprocess, ...)
    protocol: dict[str, Any]
    overrides: dict[str, Any]
    #: the suite sections the method declared in ``suite_sections`` (e.g. TOAST's ``pretune``)
    sections: dict[str, Any] = field(default_factory=dict)
    #: the versions of the code the trial runs (:func:`code_versions`); a bump makes older records stale
    method_version: int = 1
    task_version: int = 1
    #: the version of each artifact the method ``needs`` whose provider is a stage (TOAST: ``toast-pretuned``)
    artifact_versions: dict[str, int] = field(default_factory=dict)
    spec_version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @functools.cached_property
    def id(self) -> str:
        """:func:`trial_id`, computed once per spec (reading a VTAB suite's records asks it thousands of times)."""
        return trial_id(self)

    @property
    def cell(self) -> Cell:
        return Cell(self.method, self.task)

    def label(self) -> str:
        return f"{self.method}/{self.task} {self.stage} {self.id} hparams={self.hparams} seed={self.seed}"


def select_names(suite: Suite, methods: str | None, tasks: str | None) -> tuple[list[str], list[str]]:
    """Methods and tasks picked with comma lists and wildcards; defaults are the suite's own lists."""
    method_names = METHODS.match(methods) if methods else METHODS.match(suite.methods)
    return method_names, select_tasks(suite, tasks)


def select_tasks(suite: Suite, tasks: str | None) -> list[str]:
    """The suite's tasks, or a comma list (wildcards allowed) in which the suite's ``task_lists`` (e.g.
    ``vtab-paper``) expand to their members."""
    if not tasks:
        return TASKS.match(suite.tasks)
    lists = suite.raw.get("task_lists") or {}
    patterns: list[str] = []
    for pattern in tasks.split(","):
        patterns += lists.get(pattern.strip(), [pattern])
    return TASKS.match(patterns)


def plan_cells(method_names: list[str], task_names: list[str]) -> list[Cell]:
    return [Cell(m, t) for m in method_names for t in task_names]


def search_grid(method: Method, suite: Suite) -> dict[str, list]:
    """The method's default grid, with axes replaced by the suite's grid for it."""
    grid = {k: list(v) for k, v in method.grid.items()}
    grid.update({k: list(v) for k, v in (suite.grid_for(method.name) or {}).items()})
    return grid


def parameter_grid(grid: dict[str, list]) -> list[dict[str, Any]]:
    """The points of a search grid in scikit-learn's ``ParameterGrid`` order (axes sorted by name, the last axis
    varying fastest; an empty grid is one empty point), without importing scikit-learn (~1 s): the read commands
    expand grids on every cell. Axes are non-empty lists (the suite schema refuses an empty one);
    tests/test_grid_order.py compares the two on several grids."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def grid_points(method: Method, task: Task, suite: Suite) -> list[dict[str, Any]]:
    """All hyperparameter points of a cell's search, in ParameterGrid order, cut to ``--grid-points``."""
    fixed = method.defaults_for(task)
    fixed.update(suite.settings_for(method.name, task.name))
    grid = search_grid(method, suite)
    for axis in grid:
        fixed.pop(axis, None)
    points = [dict(fixed, **point) for point in parameter_grid(grid)]
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


def code_versions(cell: Cell) -> dict[str, Any]:
    """The versions of the code a cell's trials run, as spec fields: the method's, the task's, and those of the
    artifacts the method needs (a provider's ``version`` attribute, default 1)."""
    method = METHODS.get(cell.method)
    return {"method_version": int(method.version), "task_version": int(TASKS.get(cell.task).version),
            "artifact_versions": {name: int(getattr(ARTIFACTS.get(name), "version", 1)) for name in method.needs}}


def version_changes(spec: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How a record's code versions differ from ``current`` (:func:`code_versions`), e.g.
    ``["method_version 1 -> 2"]``; a field the record lacks reads as in :data:`UNVERSIONED`."""
    old = {key: spec.get(key, default) for key, default in UNVERSIONED.items()}
    changes = [f"{key} {old[key]} -> {current[key]}" for key in ("method_version", "task_version")
               if old[key] != current[key]]
    before, now = old["artifact_versions"], current["artifact_versions"]
    changes += [f"{name} version {before.get(name, 'none')} -> {now.get(name, 'none')}"
                for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
    return changes


def make_spec(suite: Suite, cell: Cell, stage: str, hparams: dict[str, Any], seed: int) -> TrialSpec:
    section = suite.protocol["search" if stage == "search" else "final"]
    base = suite.spec_base()
    return TrialSpec(
        suite=base["suite"], method=cell.method, task=cell.task, stage=stage,
        train_split=section["train"], eval_split=section["eval"],
        hparams=dict(sorted(hparams.items())), seed=int(seed),
        backbone=base["backbone"], train=base["train"], data=base["data"], protocol=base["protocol"],
        overrides=base["overrides"],
        sections={key: suite.raw.get(key) for key in METHODS.get(cell.method).suite_sections},
        **code_versions(cell),
    )


def search_specs(suite: Suite, cell: Cell) -> list[TrialSpec]:
    if suite.protocol["kind"] != "search-then-final":
        return []
    method, task = METHODS.get(cell.method), TASKS.get(cell.task)
    seed = int(suite.protocol["search"].get("seed", suite.seeds[0]))
    return [make_spec(suite, cell, "search", hp, seed) for hp in grid_points(method, task, suite)]


def final_specs(suite: Suite, cell: Cell, hparams: dict[str, Any]) -> list[TrialSpec]:
    return [make_spec(suite, cell, "final", hparams, seed) for seed in suite.seeds]


def fixed_hparams(suite: Suite, cell: Cell) -> dict[str, Any]:
    return final_hparams_fixed(METHODS.get(cell.method), TASKS.get(cell.task), suite)


def planned_trial_count(suite: Suite, cell: Cell) -> tuple[int, int]:
    """(search trials, final trials) for a cell."""
    return len(search_specs(suite, cell)), len(suite.seeds)


def goodness(value: float, higher_is_better: bool = True) -> float:
    """``value`` oriented so that larger is better (a lower-is-better metric's negated): the one rule for a metric's
    direction, which picks a search winner, marks a table's best cell and tells a regression's drop from a gain."""
    return value if higher_is_better else -value


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
        candidates.append((-goodness(value, higher_is_better), float(spec["hparams"].get("lr", 0.0)), order, record))
    if not candidates:
        return None
    return min(candidates, key=lambda c: c[:3])[3]


# ---------------------------------------------------------------------------------------------- protocol state
#: record status (every status a record may have) -> the word status tables use
STATE_OF_STATUS = {"ok": "done", "diverged": "diverged", "failed": "failed"}
#: statuses that mean "this trial is done; do not run it again". A failed trial (an exception) is retried.
FINISHED_STATUSES = ("ok", "diverged")


def is_finished(record: dict[str, Any]) -> bool:
    """Whether a (valid) record finishes its trial: the one rule for what is not run again."""
    return record["status"] in FINISHED_STATUSES


@dataclass
class Slot:
    """One planned trial and its valid record, if any."""

    spec: TrialSpec
    record: dict[str, Any] | None

    @property
    def state(self) -> str:
        """done / diverged / failed / pending."""
        return "pending" if self.record is None else STATE_OF_STATUS[self.record["status"]]

    @property
    def finished(self) -> bool:
        """Done or diverged: not run again (:func:`is_finished`)."""
        return self.record is not None and is_finished(self.record)


@dataclass(frozen=True)
class StaleRecord:
    """A record of a cell's current settings that its plan no longer has, and why (never counted)."""

    path: Path
    reason: str  # e.g. "method_version 1 -> 2", or NOT_PLANNED


#: why a stale record whose code versions are current is stale
NOT_PLANNED = "not in the plan (an edited grid, or an earlier winner's finals)"


@dataclass
class CellState:
    """Where one cell stands in its protocol, computed from records alone by :func:`cell_state`.

    ``hparams`` are the final trials' hyperparameters: the search winner's, or the suite's fixed ones; None while
    the search is unfinished (a failed trial is retried before anything is selected, so a retried trial can never
    change the winner after finals ran) or when no search trial finished (every point diverged).
    """

    cell: Cell
    search: list[Slot]
    winner: dict[str, Any] | None
    hparams: dict[str, Any] | None
    finals: list[Slot]
    n_finals: int  # planned final trials (the protocol's seeds), known before the winner is
    blocked: str = ""  # why the finals are not planned yet ("" when they are)
    stale: list[StaleRecord] = field(default_factory=list)  # records of these settings the plan no longer has

    @property
    def slots(self) -> list[Slot]:
        return self.search + self.finals

    @property
    def counts(self) -> dict[str, int]:
        counts = {"done": 0, "diverged": 0, "failed": 0, "pending": 0}
        for slot in self.slots:
            counts[slot.state] += 1
        if self.hparams is None:
            counts["pending"] += self.n_finals
        return counts

    @property
    def dead_end(self) -> bool:
        """Every search trial finished and none is usable (all diverged): the cell cannot produce a number."""
        return bool(self.search) and all(s.finished for s in self.search) and self.winner is None

    @property
    def complete(self) -> bool:
        """The winner's (or the fixed) final trials all have finished records."""
        return self.hparams is not None and all(s.finished for s in self.finals)

    def to_run(self) -> list[TrialSpec]:
        """The trials a run would start now, in order (unfinished search trials, else unfinished finals)."""
        pending_search = [s.spec for s in self.search if not s.finished]
        if pending_search or self.hparams is None:
            return pending_search
        return [s.spec for s in self.finals if not s.finished]

    @property
    def final_records(self) -> list[dict[str, Any]]:
        """The ok final records of the current plan: exactly what a table counts."""
        return [s.record for s in self.finals if s.record is not None and s.record["status"] == "ok"]

    @property
    def failed_records(self) -> list[dict[str, Any]]:
        return [s.record for s in self.slots if s.record is not None and s.record["status"] == "failed"]

    @property
    def planned_ids(self) -> set[str]:
        return {s.spec.id for s in self.slots}


def cell_token(suite: Suite, cell: Cell) -> str:
    """What a cell computes: the ids of its planned trials (final ones without their selected hyperparameters, as
    those are not known before the search). Two submissions with the same token run the same trials; a smoke run
    (other overrides) has another token."""
    hparams = fixed_hparams(suite, cell) if suite.protocol["kind"] == "fixed" else {}
    ids = [s.id for s in search_specs(suite, cell)] + [s.id for s in final_specs(suite, cell, hparams)]
    return hashlib.sha256(json.dumps([cell.key, ids]).encode()).hexdigest()[:16]


def cell_state(suite: Suite, cell: Cell, store: "Store", stale: bool = True) -> CellState:
    """The one place that says, for a cell, which search trials exist, which point won and which final trials
    belong to it. ``harness run``, ``status``, the executors and ``table`` all ask this. With ``stale``, also
    lists the cell's records that have this suite's settings but are not part of the current plan (old grid
    points, finals of an earlier winner, records of an older method, task or artifact version), each with its
    reason: they are never counted."""
    task = TASKS.get(cell.task)
    search = [Slot(spec, store.read(spec)) for spec in search_specs(suite, cell)]
    winner, hparams, blocked = None, None, ""
    if suite.protocol["kind"] == "search-then-final":
        unfinished = [s for s in search if not s.finished]
        if unfinished:
            failed = sum(s.state == "failed" for s in unfinished)
            blocked = (f"search unfinished: {len(unfinished) - failed} pending, {failed} failed (retried on the next "
                       "run); finals wait for the whole search")
        else:
            winner = select_best([s.record for s in search], task.higher_is_better)
            if winner is None:
                blocked = "no search trial finished (all diverged); final trials not run"
            else:
                hparams = winner["spec"]["hparams"]
    else:
        hparams = fixed_hparams(suite, cell)
    finals = [Slot(spec, store.read(spec)) for spec in final_specs(suite, cell, hparams)] if hparams is not None else []
    state = CellState(cell, search, winner, hparams, finals, n_finals=len(suite.seeds), blocked=blocked)
    if stale:
        current = code_versions(cell)
        state.stale = [StaleRecord(path, ", ".join(version_changes(record["spec"], current)) or NOT_PLANNED)
                       for path, record in store.unplanned(suite, cell, state.planned_ids)]
    return state
