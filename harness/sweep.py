"""Suites: ``sweeps/<suite>.yaml`` loaded with ``yaml.safe_load``, validated, and overridden from the command line.

A suite file says which tasks and (default) methods it has, the backbone, data settings, the training budget,
the protocol and per-method search grids. It is validated whole before anything runs, against the schema in
:mod:`harness.schema` and the method and task registries; every problem is reported at once, each with the file,
its line and the dotted key (or the flag that set it), with a did-you-mean where a name is close.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessError, did_you_mean
from harness.inputs import LOCATION_KEYS, data_identity
from harness.validation import suite_problems

REPO_ROOT = Path(__file__).resolve().parents[1]


def sweeps_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("HARNESS_SWEEPS", "").split(os.pathsep) if p]
    return extra + [REPO_ROOT / "sweeps"]


def available_suites() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in sweeps_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def suite_path(name_or_path: str) -> Path:
    """A suite name (``demo``) or a path to a suite file."""
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise HarnessError(f"suite file not found: {path}")
        return path
    suites = available_suites()
    if name_or_path not in suites:
        raise HarnessError(f"unknown suite '{name_or_path}'{did_you_mean(name_or_path, suites)}")
    return suites[name_or_path]


def _key_line(path: Path, keys: tuple[str, ...]) -> int | None:
    """1-based line of a nested key in a YAML file (the deepest key found), for error messages."""
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == key:
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


@dataclass
class Suite:
    """A validated suite, after command-line overrides."""

    name: str
    path: Path
    raw: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)

    # -- views ---------------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.raw["tasks"])

    @property
    def methods(self) -> list[str]:
        return list(self.raw["methods"])

    @property
    def backbone(self) -> dict[str, Any]:
        return dict(self.raw["backbone"])

    @property
    def train(self) -> dict[str, Any]:
        return dict(self.raw["train"])

    @property
    def protocol(self) -> dict[str, Any]:
        return dict(self.raw["protocol"])

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.raw.get("data") or {})

    @property
    def data_root(self) -> Path | None:
        root = self.data.get("root")
        return Path(os.path.expanduser(str(root))) if root else None

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.protocol["seeds"]]

    def grid_for(self, method: str) -> dict[str, list] | None:
        return (self.raw.get("grids") or {}).get(method)

    def settings_for(self, method: str, task: str) -> dict[str, Any]:
        """Fixed hyperparameters a suite sets for a method, with per-task entries under ``per_task``."""
        entry = copy.deepcopy((self.raw.get("settings") or {}).get(method) or {})
        per_task = entry.pop("per_task", {}) or {}
        entry.update(per_task.get(task) or {})
        return entry

    def fixed_for(self, method: str, task: str) -> dict[str, Any] | None:
        by_task = (self.raw.get("fixed") or {}).get(method) or {}
        return by_task.get(task, by_task.get("*"))

    def spec_base(self) -> dict[str, Any]:
        """The parts of every trial spec that come from the suite (not from the cell or the grid point)."""
        return {
            "suite": self.name,
            "backbone": self.backbone,
            "train": self.train,
            "data": data_identity(self.data),
            "protocol": self.protocol,
            "overrides": self.overrides,
        }

    def line_of(self, *keys: str) -> str:
        line = _key_line(self.path, keys)
        return f"{self.path}:{line}" if line else str(self.path)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


#: suite keys that say where or how to run, not what a trial computes: --set on them is not a trial override
NOT_TRIAL_KEYS = ("description", "task_lists", "executor", "slurm", "flaky", *(f"data.{k}" for k in LOCATION_KEYS))


def _outside_trials(dotted: str) -> bool:
    return any(dotted == key or dotted.startswith(key + ".") for key in NOT_TRIAL_KEYS)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as YAML (numbers, lists, booleans). Whether a dotted key exists
    is checked against the suite's schema when the suite is loaded (:func:`load_suite`'s ``sets``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise HarnessError(f"--set expects key=value (e.g. train.epochs=3), got '{item}'")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key or not all(part.strip() for part in key.split(".")):
            raise HarnessError(f"--set expects a dotted key such as train.epochs before '=', got '{item}'")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise HarnessError(f"--set {key}: cannot parse value '{value}'") from None
    return out


def load_suite(
    name_or_path: str,
    *,
    epochs: int | None = None,
    seeds: int | None = None,
    grid_points: int | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    data_root: str | None = None,
    sets: dict[str, Any] | None = None,
) -> Suite:
    """Load, validate and override a suite. The file is validated whole first, then again with the overrides, whose
    problems name the flag (``--set``, ``--epochs``, ...) instead of a line. The overrides that change what a trial
    is are kept in ``suite.overrides`` and go into every trial spec, so smoke runs never mix with full-protocol
    records."""
    suite = read_suite(suite_path(name_or_path))
    validate(suite)
    overrides, sources = apply_overrides(suite.raw, epochs=epochs, seeds=seeds, grid_points=grid_points,
                                         backbone=backbone, weights=weights, data_root=data_root, sets=sets)
    suite.overrides = overrides
    if sources:
        validate(suite, sources)
    return suite


def read_suite(path: Path) -> Suite:
    """The suite file as read (YAML, a mapping at the top level), not yet validated."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise HarnessError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: expected a mapping of suite settings at the top level")
    return Suite(name=str(raw.get("suite") or path.stem), path=path, raw=raw)


def apply_overrides(raw: dict[str, Any], *, epochs: int | None = None, seeds: int | None = None,
                    grid_points: int | None = None, backbone: str | None = None, weights: str | None = None,
                    data_root: str | None = None,
                    sets: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply the command line's overrides to a suite's ``raw`` content in place. Returns (the overrides that change
    what a trial is, for ``Suite.overrides``; dotted key -> the flag that set it, so a problem it causes names the
    flag)."""
    overrides: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if epochs is not None:
        raw["train"]["epochs"] = overrides["epochs"] = int(epochs)
        sources["train.epochs"] = "--epochs"
    if seeds is not None:
        if seeds < 1:
            raise HarnessError("--seeds must be at least 1")
        raw["protocol"]["seeds"] = raw["protocol"]["seeds"][:seeds]
        overrides["seeds"] = int(seeds)
    if grid_points is not None:
        if grid_points < 1:
            raise HarnessError("--grid-points must be at least 1")
        overrides["grid_points"] = int(grid_points)
    if backbone is not None:
        raw["backbone"] = {"name": backbone, "weights": weights if weights is not None else "timm"}
        overrides["backbone"] = backbone
        sources["backbone"] = "--backbone"
    if weights is not None:
        raw["backbone"]["weights"] = weights
        overrides["weights"] = weights
        sources.setdefault("backbone.weights", "--weights")
    if sets:
        for key, value in sets.items():
            _set_dotted(raw, key, value)
            sources.setdefault(key, "--set")
        trial_sets = {k: v for k, v in sets.items() if not _outside_trials(k)}
        if trial_sets:
            overrides["set"] = dict(sorted(trial_sets.items()))
    if data_root is not None:  # not an override of the trial: only where the data lives
        if not isinstance(raw.get("data"), dict):
            raw["data"] = {}
        raw["data"]["root"] = data_root
        sources.setdefault("data.root", "--data-root")
    return overrides, sources


# -- validation ------------------------------------------------------------------------------------------------------
def validate(suite: Suite, sources: dict[str, str] | None = None) -> None:
    """Check the whole suite against the schema (:mod:`harness.schema`) and the method and task registries; raise
    one HarnessError listing every problem, one per line, as ``file:line: dotted.key: message``. A problem under a
    key that a flag set (``sources``: dotted key -> flag) names the flag instead of a line."""
    problems = suite_problems(suite.raw)
    if not problems:
        return
    located = []
    for keys, message in problems:
        flag, line = _source_of(keys, sources or {}), None
        if flag is None:
            line = _key_line(suite.path, keys)
        where = flag or (f"{suite.path}:{line}" if line else str(suite.path))
        located.append((line or 0, f"{where}: {'.'.join(keys)}: {message}"))
    located.sort(key=lambda item: item[0])
    raise HarnessError("\n".join(text for _, text in located))


def _source_of(keys: tuple[str, ...], sources: dict[str, str]) -> str | None:
    """The flag that set ``keys``, one of its parents (``--backbone``) or one of its children (``--set
    grids.linaer.lr=...`` makes the problem ``grids.linaer``)."""
    for dotted, flag in sources.items():
        parts = tuple(dotted.split("."))
        n = min(len(parts), len(keys))
        if parts[:n] == keys[:n]:
            return flag
    return None
