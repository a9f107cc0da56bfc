"""Suites: ``sweeps/<suite>.yaml`` loaded with ``yaml.safe_load``, validated, and overridden from the command line.

A suite file says which tasks and (default) methods it has, the backbone, data settings, the training budget,
the protocol and per-method search grids. It is validated whole before anything runs, against the schema in
:mod:`harness.schema` and the method and task registries; every problem is reported at once, each with the file,
its line and the dotted key (or the flag that set it), with a did-you-mean where a name is close.
"""

from __future__ import annotations

import copy
import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from harness.api import METHODS, TASKS, Task
from harness.errors import HarnessError, did_you_mean
from harness.inputs import LOCATION_KEYS, data_identity
from harness.schema import DATA_KEYS, NO_DEFAULT, Key, SECTIONS, Problem, check_mapping, flaky_pair, key_for

if TYPE_CHECKING:  # pragma: no cover
    from harness.api import Method

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
    #: dotted key -> the flag that set it, so that a problem it causes names the flag
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
    suite.overrides = overrides
    if sources:
        validate(suite, sources)
    return suite


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


def suite_problems(raw: dict[str, Any]) -> list[Problem]:
    """Every problem of a suite's content (all of them, not the first). Method modules are imported only for the
    methods named under grids, settings and fixed (and, for a section such as ``pretune``, the suite's methods);
    task modules only for the tasks whose data keys are needed."""
    problems: list[Problem] = []
    for name in raw:
        if name not in SECTIONS:
            problems.append(((str(name),), f"unknown key{did_you_mean(str(name), SECTIONS)} "
                                           f"(known: {', '.join(SECTIONS)})"))
    ok: dict[str, Any] = {}  # the sections present, of the right type
    for name, section in SECTIONS.items():
        if name not in raw:
            if section.required:
                problems.append(((name,), f"missing required section ({section.meaning})"))
            continue
        if raw[name] is None and not section.required:
            continue
        message = section.check(raw[name])
        if message:
            problems.append(((name,), message))
        else:
            ok[name] = raw[name]

    for name in ("backbone", "train", "protocol", "executor", "slurm"):
        if name in ok:
            problems += check_mapping(SECTIONS[name].keys or {}, ok[name], (name,))
    if "protocol" in ok:
        problems += _protocol_problems(ok["protocol"])
    if "train" in ok and "epochs" not in ok["train"] and "iters" not in ok["train"]:
        problems.append((("train",), "missing required key 'epochs' (training epochs per trial; or iters, an "
                                     "iteration budget)"))
    iters = ok.get("train", {}).get("iters")
    if isinstance(iters, int) and not isinstance(iters, bool) and iters < 1:
        problems.append((("train", "iters"), f"expected an integer > 0 or a mapping task -> integer > 0, got {iters}"))
    if isinstance(iters, dict):
        problems += _task_key_problems(iters, ("train", "iters"))
        problems += [(("train", "iters", str(t)), f"expected an integer > 0, got {v!r}") for t, v in iters.items()
                     if isinstance(v, bool) or not isinstance(v, int) or v < 1]

    problems += _names_problems(ok.get("tasks", []), TASKS.names(), "task", ("tasks",))
    for list_name, members in (ok.get("task_lists") or {}).items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            problems.append((("task_lists", str(list_name)), f"expected a list of task names, got {members!r}"))
        else:
            problems += _names_problems(members, TASKS.names(), "task", ("task_lists", str(list_name)))
    problems += _names_problems(ok.get("methods", []), METHODS.names(), "method", ("methods",))
    if "data" in ok:
        problems += _data_problems(ok["data"], _selected_tasks(ok))

    named: list[str] = []  # the known methods named under grids, settings and fixed
    for name, check in (("grids", _grid_problems), ("settings", _settings_problems), ("fixed", _fixed_problems)):
        for method, entry in (ok.get(name) or {}).items():
            where = (name, str(method))
            if method not in METHODS:
                problems.append((where, f"unknown method{did_you_mean(str(method), METHODS.names())}"))
                continue
            if entry is None:
                continue
            if not isinstance(entry, dict):
                problems.append((where, f"expected a mapping, got {entry!r}"))
                continue
            if method not in named:
                named.append(method)
            problems += check(METHODS.get(method), entry, where)
    if ok.get("protocol", {}).get("kind") == "fixed" and not ok.get("fixed"):
        problems.append((("fixed",), "protocol 'fixed' needs a 'fixed' section: method -> task -> hyperparameters"))

    patterns = [p for p in ok.get("methods", []) if isinstance(p, str)]
    candidates = named + [m for m in METHODS.names() if m not in named and any(fnmatch.fnmatchcase(m, p)
                                                                             for p in patterns)]
    for name, section in SECTIONS.items():
        if section.from_methods and isinstance(ok.get(name), dict):
            problems += _method_section_problems(name, ok[name], candidates)
    problems += _flaky_problems(ok.get("flaky") or [])
    return problems


def _flaky_problems(entries: list[Any]) -> list[Problem]:
    """``flaky:`` entries that are not a method/task pair, or name no registered method or task."""
    problems: list[Problem] = []
    for entry in entries:
        pair = flaky_pair(entry)
        if pair is None:
            problems.append((("flaky",), f"expected 'method:task' (or {{method: M, task: T}}), got {entry!r}"))
            continue
        problems += _names_problems([pair[0]], METHODS.names(), "method", ("flaky",))
        problems += _names_problems([pair[1]], TASKS.names(), "task", ("flaky",))
    return problems


def _protocol_problems(protocol: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    if protocol.get("kind") == "search-then-final" and "search" not in protocol:
        problems.append((("protocol",), "missing required key 'search' (the search stage of search-then-final)"))
    seeds = protocol.get("seeds")
    if isinstance(seeds, list):
        repeated = sorted({s for s in seeds if isinstance(s, int) and seeds.count(s) > 1})
        if repeated:
            problems.append((("protocol", "seeds"), f"seed(s) listed twice: {', '.join(map(str, repeated))}"))
    return problems


def _names_problems(items: list[Any], names: list[str], kind: str, where: tuple[str, ...]) -> list[Problem]:
    """Names, or fnmatch patterns, that name nothing registered (``TASKS.match`` and ``METHODS.match`` would refuse
    them later, after the suite was accepted)."""
    problems: list[Problem] = []
    for item in items:
        if not isinstance(item, str):
            continue  # the list's type check reports it
        if any(ch in item for ch in "*?["):
            if not fnmatch.filter(names, item):
                problems.append((where, f"no {kind} matches '{item}'{did_you_mean(item, names)}"))
        elif item not in names:
            problems.append((where, f"unknown {kind} '{item}'{did_you_mean(item, names)}"))
    return problems


def _selected_tasks(ok: dict[str, Any]) -> list[str]:
    """The known tasks a run of this suite can select: its tasks and the members of its task lists."""
    patterns = [p for p in ok.get("tasks", []) if isinstance(p, str)]
    for members in (ok.get("task_lists") or {}).values():
        patterns += [p for p in members if isinstance(p, str)] if isinstance(members, list) else []
    return [n for n in TASKS.names() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def task_data_keys(task: Task) -> tuple[str, ...]:
    """The ``data:`` keys a task reads besides the engine's: exactly its ``Task.data_keys``."""
    return tuple(task.data_keys)


def _data_problems(data: dict[str, Any], tasks: list[str]) -> list[Problem]:
    extra: set[str] = set()
    if any(key not in DATA_KEYS for key in data):  # import task modules only when a key needs them
        for name in tasks:
            extra.update(task_data_keys(TASKS.get(name)))
    note = f"; the suite's tasks read: {', '.join(sorted(extra))}" if extra else "; the suite's tasks read no others"
    problems = check_mapping(DATA_KEYS, data, ("data",), extra=sorted(extra), extra_note=note)
    if isinstance(data.get("roots"), dict):
        problems += _task_key_problems(data["roots"], ("data", "roots"))
    return problems


def _task_key_problems(mapping: dict[str, Any], where: tuple[str, ...], star: bool = False) -> list[Problem]:
    """Keys of ``mapping`` that are not task names (``'*'`` allowed when ``star``)."""
    names = TASKS.names()
    return [((*where, str(task)), f"unknown task{did_you_mean(str(task), names)}")
            for task in mapping if not (star and task == "*") and task not in names]


def _hparam_problems(method: Method, values: dict[str, Any], where: tuple[str, ...],
                     lists: bool = False) -> list[Problem]:
    """Unknown hyperparameters of ``method`` (with a did-you-mean) and values of the wrong type or range. With
    ``lists``, every value is a non-empty list of values (a grid)."""
    accepted = sorted(method.accepted_hparams())
    problems: list[Problem] = []
    for key, value in values.items():
        at = (*where, str(key))
        if key not in accepted:
            problems.append((at, f"unknown hyperparameter of {method.name}{did_you_mean(str(key), accepted)} "
                                 f"(accepted: {', '.join(accepted)})"))
            continue
        if lists and (not isinstance(value, list) or not value):
            problems.append((at, f"expected a non-empty list of values, got {value!r}"))
            continue
        example = method.defaults[key] if key in method.defaults else (method.grid.get(key) or [NO_DEFAULT])[0]
        rule = key_for(str(key), example)
        if key in method.hparam_choices:
            choices = method.hparam_choices[key]
            rule = Key(type(choices[0]), "", choices=tuple(choices))
        for item in value if lists else [value]:
            message = rule.check(item) if rule else None
            if message:
                problems.append((at, message))
                break
    return problems


def _grid_problems(method: Method, grid: dict[str, Any], where: tuple[str, ...]) -> list[Problem]:
    return _hparam_problems(method, grid, where, lists=True)


def _settings_problems(method: Method, entry: dict[str, Any], where: tuple[str, ...]) -> list[Problem]:
    problems = _hparam_problems(method, {k: v for k, v in entry.items() if k != "per_task"}, where)
    per_task = entry.get("per_task")
    if per_task is None:
        return problems
    if not isinstance(per_task, dict):
        return problems + [((*where, "per_task"), f"expected a mapping of task -> hyperparameters, got {per_task!r}")]
    problems += _task_key_problems(per_task, (*where, "per_task"))
    for task, values in per_task.items():
        problems += _values_problems(method, values, (*where, "per_task", str(task)))
    return problems


def _fixed_problems(method: Method, entry: dict[str, Any], where: tuple[str, ...]) -> list[Problem]:
    problems = _task_key_problems(entry, where, star=True)
    for task, values in entry.items():
        problems += _values_problems(method, values, (*where, str(task)))
    return problems


def _values_problems(method: Method, values: Any, where: tuple[str, ...]) -> list[Problem]:
    if values is None:
        return []
    if not isinstance(values, dict):
        return [(where, f"expected a mapping of hyperparameter -> value, got {values!r}")]
    return _hparam_problems(method, values, where)


def _method_section_problems(name: str, section: dict[str, Any], candidates: list[str]) -> list[Problem]:
    """A section whose keys the methods that read it declare (``Method.suite_sections``/``section_keys``): the
    readers among the suite's methods, or, when the suite names none, every registered reader."""
    readers = [m for m in candidates if name in METHODS.get(m).suite_sections]
    if not readers:
        readers = [m for m in METHODS.names() if name in METHODS.get(m).suite_sections]
    if not readers:
        return [((name,), "no registered method reads this section")]
    keys: dict[str, Any] = {}
    for method in readers:
        keys.update(METHODS.get(method).section_keys(name))
    if not keys:
        return []  # its readers do not say which keys they take
    problems: list[Problem] = []
    for key, value in section.items():
        at = (name, str(key))
        if key not in keys:
            problems.append((at, f"unknown key{did_you_mean(str(key), keys)} (known: {', '.join(keys)}; "
                                 f"read by {', '.join(readers)})"))
            continue
        rule = key_for(str(key), keys[key])
        message = rule.check(value) if rule else None
        if message:
            problems.append((at, message))
    return problems
