"""Suites: ``sweeps/<suite>.yaml`` loaded with ``yaml.safe_load``, validated, and overridden from the command line.

A suite file says which tasks and (default) methods it has, the backbone, data settings, the training budget,
the protocol and per-method search grids. Every error names the file, the key and its line.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessError, did_you_mean

REPO_ROOT = Path(__file__).resolve().parents[1]

#: top-level keys and what they must be
SCHEMA: dict[str, type | tuple[type, ...]] = {
    "suite": str,
    "description": str,
    "tasks": list,
    "task_lists": dict,
    "methods": list,
    "backbone": dict,
    "data": dict,
    "train": dict,
    "protocol": dict,
    "grids": dict,
    "settings": dict,
    "fixed": dict,
    "executor": dict,
    "slurm": dict,
    "pretune": dict,
}
REQUIRED = ("suite", "tasks", "methods", "backbone", "train", "protocol")
TRAIN_KEYS = {
    "epochs": int, "batch_size": int, "eval_batch_size": int, "lr_scaling": str, "warmup_epochs": int,
    "num_workers": int, "label_smoothing": (int, float), "amp": bool,
}
PROTOCOL_KINDS = ("search-then-final", "fixed")
LR_SCALINGS = ("none", "batch/256")


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
        # where data lives (root, per-task roots) does not change what a trial computes
        data = {k: v for k, v in self.data.items() if k not in ("root", "roots")}
        return {
            "suite": self.name,
            "backbone": self.backbone,
            "train": self.train,
            "data": data,
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
NOT_TRIAL_KEYS = ("description", "task_lists", "executor", "slurm", "data.root", "data.roots")


def _outside_trials(dotted: str) -> bool:
    return any(dotted == key or dotted.startswith(key + ".") for key in NOT_TRIAL_KEYS)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as YAML (numbers, lists, booleans)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise HarnessError(f"--set expects key=value (e.g. train.epochs=3), got '{item}'")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
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
    """Load, override and validate a suite. The overrides that change what a trial is are kept in
    ``suite.overrides`` and go into every trial spec, so smoke runs never mix with full-protocol records."""
    path = suite_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise HarnessError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: expected a mapping of suite settings at the top level")
    suite = Suite(name=str(raw.get("suite") or path.stem), path=path, raw=raw)
    validate(suite)

    overrides: dict[str, Any] = {}
    if epochs is not None:
        raw["train"]["epochs"] = overrides["epochs"] = int(epochs)
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
    if weights is not None:
        raw["backbone"]["weights"] = weights
        overrides["weights"] = weights
    if sets:
        for key, value in sets.items():
            _set_dotted(raw, key, value)
        trial_sets = {k: v for k, v in sets.items() if not _outside_trials(k)}
        if trial_sets:
            overrides["set"] = dict(sorted(trial_sets.items()))
    if data_root is not None:  # not an override of the trial: only where the data lives
        raw.setdefault("data", {})["root"] = data_root
    suite.overrides = overrides
    validate(suite)
    return suite


def validate(suite: Suite) -> None:
    raw, path = suite.raw, suite.path

    def fail(keys: tuple[str, ...], message: str) -> None:
        line = _key_line(path, keys)
        where = f"{path}:{line}" if line else str(path)
        raise HarnessError(f"{where}: {'.'.join(keys)}: {message}")

    for key in raw:
        if key not in SCHEMA:
            fail((key,), f"unknown key{did_you_mean(key, SCHEMA)} (known: {', '.join(SCHEMA)})")
    for key in REQUIRED:
        if key not in raw:
            raise HarnessError(f"{path}: missing required key '{key}'")
    for key, kind in SCHEMA.items():
        if key in raw and raw[key] is not None and not isinstance(raw[key], kind):
            fail((key,), f"expected {getattr(kind, '__name__', kind)}, got {type(raw[key]).__name__}")
    if not raw["tasks"]:
        fail(("tasks",), "expected at least one task")
    if not all(isinstance(t, str) for t in raw["tasks"]):
        fail(("tasks",), "expected a list of task names")
    if "name" not in raw["backbone"]:
        fail(("backbone",), "expected a 'name' (a timm model name)")
    for key, value in raw["train"].items():
        if key not in TRAIN_KEYS:
            fail(("train", key), f"unknown key{did_you_mean(key, TRAIN_KEYS)}")
        if not isinstance(value, TRAIN_KEYS[key]) or isinstance(value, bool) and TRAIN_KEYS[key] is int:
            fail(("train", key), f"expected {TRAIN_KEYS[key]}, got {value!r}")
    for key in ("epochs", "batch_size"):
        if key not in raw["train"]:
            fail(("train",), f"missing '{key}'")
        if raw["train"][key] < 1:
            fail(("train", key), f"expected a positive integer, got {raw['train'][key]}")
    if raw["train"].get("lr_scaling", "none") not in LR_SCALINGS:
        fail(("train", "lr_scaling"), f"expected one of {', '.join(LR_SCALINGS)}")
    proto = raw["protocol"]
    kind = proto.get("kind")
    if kind not in PROTOCOL_KINDS:
        fail(("protocol", "kind"), f"expected one of {', '.join(PROTOCOL_KINDS)}, got {kind!r}")
    seeds = proto.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        fail(("protocol", "seeds"), "expected a non-empty list of integer seeds")
    stages = ("search", "final") if kind == "search-then-final" else ("final",)
    for stage in stages:
        section = proto.get(stage)
        if not isinstance(section, dict) or not {"train", "eval"} <= set(section):
            fail(("protocol", stage), "expected a mapping with 'train' and 'eval' split names")
    for method, grid in (raw.get("grids") or {}).items():
        if not isinstance(grid, dict):
            fail(("grids", method), "expected a mapping of hyperparameter -> list of values")
        for axis, values in grid.items():
            if not isinstance(values, list) or not values:
                fail(("grids", method, axis), f"expected a non-empty list of values, got {values!r}")
    if kind == "fixed" and not raw.get("fixed"):
        fail(("fixed",), "protocol 'fixed' needs a 'fixed' section: method -> task -> hyperparameters")
