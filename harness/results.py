"""Results for notebooks: the trials a table counts, as pandas frames, chosen by the same protocol state.

    import harness.results as hr
    trials = hr.load("demo")                      # one row per counted trial (search and final)
    table = hr.summary("demo")                    # the table's numbers: one row per cell, then the means
    curve = hr.curves("demo", methods="toast")    # per-epoch curves in long form

The selectors are ``harness table``'s flags as keywords: ``methods``, ``tasks`` (comma strings or lists, wildcards
as on the command line), ``results``, ``run_id``, ``epochs``, ``seeds``, ``grid_points``, ``backbone``, ``weights``,
``set`` (a dict or ``"key=value"`` strings) and ``stale``: with ``stale=True`` the records the plan no longer counts
(another grid, an older method version, ...) come too, marked in the ``stale`` column with the reason. The mean of
a cell computed from :func:`load` equals the table's to the last digit: both are the protocol state's final
records (:func:`harness.plan.cell_state`). Importing this module does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import TASKS
from harness.plan import Cell, cell_state, select_names
from harness.store import Store, default_results_dir
from harness.sweep import Suite, load_suite, parse_set

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: the fixed columns of :func:`load`; each hyperparameter adds a column ``hp.<name>``
TRIAL_COLUMNS = ["method", "task", "group", "stage", "seed", "value", "metric", "higher_is_better", "status",
                 "trainable", "head", "total", "flops", "throughput", "memory", "wall_time_s", "method_version",
                 "task_version", "commit", "dirty", "stale", "stale_reason", "path"]


def _names(value: str | list[str] | None) -> str | None:
    return ",".join(value) if isinstance(value, (list, tuple)) else value


def _selection(suite: str | Path, methods: str | list[str] | None = None, tasks: str | list[str] | None = None,
               results: str | Path | None = None, run_id: str | None = None, epochs: int | None = None,
               seeds: int | None = None, grid_points: int | None = None, backbone: str | None = None,
               weights: str | None = None, set: dict[str, Any] | list[str] | None = None,  # noqa: A002 - the flag
               ) -> tuple[Suite, Store, list[str], list[str]]:
    """The suite with its overrides, the store (a run's with ``run_id``) and the selected methods and tasks,
    exactly as ``harness table`` resolves its flags."""
    sets = dict(set) if isinstance(set, dict) else parse_set(list(set or []))
    loaded = load_suite(str(suite), epochs=epochs, seeds=seeds, grid_points=grid_points, backbone=backbone,
                        weights=weights, sets=sets)
    root = Path(results) if results is not None else default_results_dir()
    if run_id:
        from harness.runs import open_run

        store = open_run(root, run_id, loaded.name).store
    else:
        store = Store(root)
    method_names, task_names = select_names(loaded, _names(methods), _names(tasks))
    return loaded, store, method_names, task_names


def _row(record: dict[str, Any], cell: Cell, path: Path, stale: str | None = None) -> dict[str, Any]:
    spec, cost, params = record["spec"], record.get("cost") or {}, record.get("params") or {}
    git = (record.get("provenance") or {}).get("git") or {}
    task = TASKS.get(cell.task) if cell.task in TASKS else None
    metrics = record.get("metrics") or {}
    row = {
        "method": cell.method, "task": cell.task, "group": task.group if task else "", "stage": spec["stage"],
        "seed": spec["seed"], "value": metrics.get("eval"), "metric": metrics.get("metric"),
        "higher_is_better": metrics.get("higher_is_better"), "status": record["status"],
        "trainable": params.get("trainable"), "head": params.get("head"), "total": params.get("total"),
        "flops": cost.get("forward_flops"), "throughput": cost.get("train_images_per_s"),
        "memory": cost.get("peak_memory_bytes"), "wall_time_s": record.get("wall_time_s"),
        "method_version": spec.get("method_version", 1), "task_version": spec.get("task_version", 1),
        "commit": git.get("commit"), "dirty": git.get("dirty"), "stale": stale is not None, "stale_reason": stale,
        "path": str(path),
    }
    row.update({f"hp.{k}": v for k, v in (spec.get("hparams") or {}).items()})
    return row


def load(suite: str | Path, *, stale: bool = False, **selectors: Any) -> pd.DataFrame:
    """One row per counted trial of the selected cells: the current plan's search trials with a record (ok or
    diverged) and its counted final trials (ok), in method, task, stage, seed order. ``stale=True`` adds the stale
    records the plan no longer counts (``stale`` True, ``stale_reason`` why)."""
    import json

    import pandas as pd

    loaded, store, methods, tasks = _selection(suite, **selectors)
    rows = []
    for method in methods:
        for task in tasks:
            cell = Cell(method, task)
            state = cell_state(loaded, cell, store, stale=stale)
            for slot in state.search:
                if slot.record is not None and slot.record["status"] != "failed":
                    rows.append(_row(slot.record, cell, store.path_for(slot.spec)))
            for slot in state.finals:
                if slot.record is not None and slot.record["status"] == "ok":  # what the table counts
                    rows.append(_row(slot.record, cell, store.path_for(slot.spec)))
            for old in state.stale:
                try:
                    record = json.loads(Path(old.path).read_text())
                except (OSError, ValueError):
                    continue
                rows.append(_row(record, cell, Path(old.path), stale=old.reason))
    frame = pd.DataFrame(rows)
    hp = sorted(c for c in frame.columns if c.startswith("hp."))
    return frame.reindex(columns=TRIAL_COLUMNS + hp)


def summary(suite: str | Path, **selectors: Any) -> pd.DataFrame:
    """The table's numbers: one row per (method, task) cell with mean, std (over seeds, population as the table
    prints it), n and the group, then per method its group means and overall mean (rows with ``task`` ``<group>
    mean`` and ``mean``, present only where the table prints them)."""
    import pandas as pd

    from harness.table import suite_summary

    loaded, store, methods, tasks = _selection(suite, **selectors)
    numbers = suite_summary(loaded, store, methods, tasks)
    rows = []
    for method in methods:
        for task in tasks:
            cell = numbers["cells"].get((method, task))
            rows.append({"method": method, "task": task, "group": TASKS.get(task).group if task in TASKS else "",
                         "mean": cell["mean"] if cell else None, "std": cell["std"] if cell else None,
                         "n": cell["n"] if cell else 0, "kind": "cell"})
        for (name, key), value in numbers["means"].items():
            if name == method:
                rows.append({"method": method, "task": "mean" if key == "mean" else f"{key} mean", "group": key,
                             "mean": value, "std": None, "n": None, "kind": "mean"})
    return pd.DataFrame(rows, columns=["method", "task", "group", "kind", "mean", "std", "n"])


def curves(suite: str | Path, *, stage: str = "final", **selectors: Any) -> pd.DataFrame:
    """The per-epoch curves of the counted trials of ``stage`` (final or search) in long form: one row per trial,
    epoch and logged quantity (train_loss, eval, lr, ...), with method, task, seed and the record's path."""
    import pandas as pd

    loaded, store, methods, tasks = _selection(suite, **selectors)
    rows = []
    for method in methods:
        for task in tasks:
            cell = Cell(method, task)
            state = cell_state(loaded, cell, store, stale=False)
            records = state.final_records if stage == "final" else [
                s.record for s in state.search if s.record is not None and s.record["status"] != "failed"]
            for record in records:
                for entry in record.get("curve") or []:
                    for name, value in entry.items():
                        if name != "epoch":
                            rows.append({"method": method, "task": task, "seed": record["spec"]["seed"],
                                         "epoch": entry.get("epoch"), "name": name, "value": value})
    return pd.DataFrame(rows, columns=["method", "task", "seed", "epoch", "name", "value"])


__all__ = ["load", "summary", "curves"]
