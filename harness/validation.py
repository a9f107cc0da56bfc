"""A suite's content checked whole: every problem (not the first) against the schema (:mod:`harness.schema`: the
sections and their keys) and the method and task registries (names, each method's hyperparameters and their
values, the sections methods read, per-task keys). :func:`harness.sweep.validate` locates each problem in the file.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from harness.api import METHODS, TASKS, Method
from harness.errors import did_you_mean
from harness.schema import DATA_KEYS, NO_DEFAULT, SECTIONS, Key, SuiteProblem, check_mapping, flaky_pair, key_for


def suite_problems(raw: dict[str, Any]) -> list[SuiteProblem]:
    """Every problem of a suite's content (all of them, not the first). Method modules are imported only for the
    methods named under grids, settings and fixed (and, for a section such as ``pretune``, the suite's methods);
    task modules only for the tasks whose data keys are needed."""
    ok, problems = _sections(raw)
    for name in ("backbone", "train", "protocol", "executor", "slurm"):
        if name in ok:
            problems += check_mapping(SECTIONS[name].keys or {}, ok[name], (name,))
    if "protocol" in ok:
        problems += _protocol_problems(ok["protocol"])
    if "train" in ok:
        problems += _budget_problems(ok["train"])

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


def _sections(raw: dict[str, Any]) -> tuple[dict[str, Any], list[SuiteProblem]]:
    """(the sections present and of the right type, the problems of the others: unknown, missing or mistyped)."""
    problems: list[SuiteProblem] = []
    for name in raw:
        if name not in SECTIONS:
            problems.append(((str(name),), f"unknown key{did_you_mean(str(name), SECTIONS)} "
                                           f"(known: {', '.join(SECTIONS)})"))
    ok: dict[str, Any] = {}
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
    return ok, problems


def _budget_problems(train: dict[str, Any]) -> list[SuiteProblem]:
    """The training budget: ``epochs`` or ``iters`` (an integer > 0, or a mapping task -> integer > 0)."""
    problems: list[SuiteProblem] = []
    if "epochs" not in train and "iters" not in train:
        problems.append((("train",), "missing required key 'epochs' (training epochs per trial; or iters, an "
                                     "iteration budget)"))
    iters = train.get("iters")
    if isinstance(iters, int) and not isinstance(iters, bool) and iters < 1:
        problems.append((("train", "iters"), f"expected an integer > 0 or a mapping task -> integer > 0, got {iters}"))
    if isinstance(iters, dict):
        problems += _task_key_problems(iters, ("train", "iters"))
        problems += [(("train", "iters", str(t)), f"expected an integer > 0, got {v!r}") for t, v in iters.items()
                     if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    return problems


def _flaky_problems(entries: list[Any]) -> list[SuiteProblem]:
    """``flaky:`` entries that are not a method/task pair, or name no registered method or task."""
    problems: list[SuiteProblem] = []
    for entry in entries:
        pair = flaky_pair(entry)
        if pair is None:
            problems.append((("flaky",), f"expected 'method:task' (or {{method: M, task: T}}), got {entry!r}"))
            continue
        problems += _names_problems([pair[0]], METHODS.names(), "method", ("flaky",))
        problems += _names_problems([pair[1]], TASKS.names(), "task", ("flaky",))
    return problems


def _protocol_problems(protocol: dict[str, Any]) -> list[SuiteProblem]:
    problems: list[SuiteProblem] = []
    if protocol.get("kind") == "search-then-final" and "search" not in protocol:
        problems.append((("protocol",), "missing required key 'search' (the search stage of search-then-final)"))
    seeds = protocol.get("seeds")
    if isinstance(seeds, list):
        repeated = sorted({s for s in seeds if isinstance(s, int) and seeds.count(s) > 1})
        if repeated:
            problems.append((("protocol", "seeds"), f"seed(s) listed twice: {', '.join(map(str, repeated))}"))
    return problems


def _names_problems(items: list[Any], names: list[str], kind: str, where: tuple[str, ...]) -> list[SuiteProblem]:
    """Names, or fnmatch patterns, that name nothing registered (``TASKS.match`` and ``METHODS.match`` would refuse
    them later, after the suite was accepted)."""
    problems: list[SuiteProblem] = []
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


def _data_problems(data: dict[str, Any], tasks: list[str]) -> list[SuiteProblem]:
    extra: set[str] = set()
    if any(key not in DATA_KEYS for key in data):  # import task modules only when a key needs them
        for name in tasks:
            extra.update(TASKS.get(name).data_keys)
    note = f"; the suite's tasks read: {', '.join(sorted(extra))}" if extra else "; the suite's tasks read no others"
    problems = check_mapping(DATA_KEYS, data, ("data",), extra=sorted(extra), extra_note=note)
    if isinstance(data.get("roots"), dict):
        problems += _task_key_problems(data["roots"], ("data", "roots"))
    return problems


def _task_key_problems(mapping: dict[str, Any], where: tuple[str, ...], star: bool = False) -> list[SuiteProblem]:
    """Keys of ``mapping`` that are not task names (``'*'`` allowed when ``star``)."""
    names = TASKS.names()
    return [((*where, str(task)), f"unknown task{did_you_mean(str(task), names)}")
            for task in mapping if not (star and task == "*") and task not in names]


def _hparam_problems(method: Method, values: dict[str, Any], where: tuple[str, ...],
                     lists: bool = False) -> list[SuiteProblem]:
    """Unknown hyperparameters of ``method`` (with a did-you-mean) and values of the wrong type or range. With
    ``lists``, every value is a non-empty list of values (a grid)."""
    accepted = sorted(method.accepted_hparams())
    problems: list[SuiteProblem] = []
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


def _grid_problems(method: Method, grid: dict[str, Any], where: tuple[str, ...]) -> list[SuiteProblem]:
    return _hparam_problems(method, grid, where, lists=True)


def _settings_problems(method: Method, entry: dict[str, Any], where: tuple[str, ...]) -> list[SuiteProblem]:
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


def _fixed_problems(method: Method, entry: dict[str, Any], where: tuple[str, ...]) -> list[SuiteProblem]:
    problems = _task_key_problems(entry, where, star=True)
    for task, values in entry.items():
        problems += _values_problems(method, values, (*where, str(task)))
    return problems


def _values_problems(method: Method, values: Any, where: tuple[str, ...]) -> list[SuiteProblem]:
    if values is None:
        return []
    if not isinstance(values, dict):
        return [(where, f"expected a mapping of hyperparameter -> value, got {values!r}")]
    return _hparam_problems(method, values, where)


def _method_section_problems(name: str, section: dict[str, Any], candidates: list[str]) -> list[SuiteProblem]:
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
    problems: list[SuiteProblem] = []
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
