"""Paper-style tables computed from records: rows are methods, columns tasks (grouped), group means, the overall
mean and cost columns. Each cell is the mean ± std of the final trials' last-epoch metric over seeds.

A cell counts exactly the final trials the protocol state (:func:`harness.plan.cell_state`) assigns to it: the
current search winner's (or the suite's fixed hyperparameters'), with the current settings. Finals of an earlier
winner, of an edited grid, or of a smoke run with other overrides are never counted.

A cell whose seeds disagree far beyond the usual spread (one seed near chance while another learned) is marked †
with a footnote, in every format: a mean over such seeds describes neither.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import TYPE_CHECKING, Any

from harness.api import TASKS
from harness.plan import Cell, cell_state, goodness
from harness.reference import Comparison, reference_csv, reference_rows
from harness.store import Store
from harness.sweep import Suite
from harness.table_render import (DIFFERS, LAYOUTS, MISSING, column_labels, latex_table, long_rows,
                                  task_label, wide_fits)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

FORMATS = ("markdown", "github", "latex", "csv")
EXTRA_COLUMNS = ("params", "flops", "throughput", "memory", "step")


FRAME_COLUMNS = ["method", "task", "seed", "value", "trainable", "head", "total", "flops", "throughput", "memory"]


def final_frame(suite: Suite, store: Store, methods: list[str], tasks: list[str],
                states: dict[Cell, Any] | None = None) -> pd.DataFrame:
    """One row per ok final record that the protocol state counts for the given cells (``states``: the cells'
    :func:`~harness.plan.cell_state`, when the caller has them already), as a pandas frame."""
    import pandas as pd  # lazy: pandas costs ~0.3 s; the text table (final_rows) does without it

    return pd.DataFrame(final_rows(suite, store, methods, tasks, states), columns=FRAME_COLUMNS)


def final_rows(suite: Suite, store: Store, methods: list[str], tasks: list[str],
               states: dict[Cell, Any] | None = None) -> list[dict[str, Any]]:
    """:func:`final_frame`'s rows as dicts (what :func:`summarize` needs, without importing pandas)."""
    rows = []
    for method in methods:
        for task in tasks:
            cell = Cell(method, task)
            state = states[cell] if states is not None else cell_state(suite, cell, store, stale=False)
            for record in state.final_records:
                spec, cost = record["spec"], record.get("cost") or {}
                rows.append({
                    "method": method, "task": task, "seed": spec["seed"],
                    "value": float(record["metrics"]["eval"]),
                    "trainable": record["params"].get("trainable"), "head": record["params"].get("head"),
                    "total": record["params"].get("total"), "flops": cost.get("forward_flops"),
                    "throughput": cost.get("train_images_per_s"), "memory": cost.get("peak_memory_bytes"),
                })
    return rows


def _task_group(task: str) -> str:
    return TASKS.get(task).group or "" if task in TASKS else ""


def chance_level(task: str) -> float | None:
    """The metric a random guess gets (top-1 over C classes: 100/C); None when not known."""
    if task not in TASKS:
        return None
    info = TASKS.get(task)
    return 100.0 / info.num_classes if info.metric == "top1" and info.num_classes else None


#: a seed counts as "at chance" within this many points of it, and "learned" this far above it
NEAR_CHANCE, LEARNED = 5.0, 20.0


def seeds_disagree(values: list[float], chance: float | None) -> str:
    """Why a cell's seeds disagree far beyond their usual spread, or '' when they do not: one seed within
    NEAR_CHANCE points of chance while another is LEARNED points above it."""
    if len(values) < 2 or chance is None:
        return ""
    low, high = min(values), max(values)
    if low <= chance + NEAR_CHANCE and high >= chance + LEARNED:
        return f"a seed at {low:.1f} (chance {chance:.1f}) while another reached {high:.1f}"
    return ""


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def summarize(frame: pd.DataFrame | list[dict[str, Any]], methods: list[str], tasks: list[str],
              n_seeds: int) -> dict[str, Any]:
    """Per (method, task): mean, std, n; group and overall means per method; cost per method. ``frame``:
    :func:`final_frame`'s frame or :func:`final_rows`' rows (the same numbers; rows need no pandas)."""
    rows = frame if isinstance(frame, list) else frame.to_dict("records")
    by_cell: dict[tuple[str, str], list[float]] = {}
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_cell.setdefault((row["method"], row["task"]), []).append(float(row["value"]))
        by_method.setdefault(row["method"], []).append(row)
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for (method, task), values in sorted(by_cell.items()):
        cells[(method, task)] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values),
                                 "n": len(values), "values": values,
                                 "disagree": seeds_disagree(values, chance_level(task))}
    groups: dict[str, list[str]] = {}
    for task in tasks:
        groups.setdefault(_task_group(task), []).append(task)
    means: dict[tuple[str, str], float] = {}
    for method in methods:
        for group, members in groups.items():
            vals = [cells[(method, t)]["mean"] for t in members if (method, t) in cells]
            if group and len(groups) > 1 and len(vals) == len(members):
                means[(method, group)] = sum(vals) / len(vals)
        vals = [cells[(method, t)]["mean"] for t in tasks if (method, t) in cells]
        if vals and len(vals) == len(tasks):
            means[(method, "mean")] = sum(vals) / len(vals)
    cost = {}
    for method, method_rows in sorted(by_method.items()):
        cost[method] = {}
        for k in ("trainable", "head", "total", "flops", "throughput", "memory"):
            present = [float(r[k]) for r in method_rows if _present(r.get(k))]
            cost[method][k] = statistics.fmean(present) if present else None
    return {"cells": cells, "groups": groups, "means": means, "cost": cost, "n_seeds": n_seeds,
            "methods": list(methods), "tasks": list(tasks)}


def suite_summary(suite: Suite, store: Store, methods: list[str] | None = None,
                  tasks: list[str] | None = None) -> dict[str, Any]:
    """The summary a table (and a figure) is computed from: :func:`summarize` over the counted final records."""
    tasks = tasks or suite.tasks
    methods = methods or suite.methods
    return summarize(final_rows(suite, store, methods, tasks), methods, tasks, len(suite.seeds))


#: the mark of a cell that differs from ``--compare``'s method beyond the seeds' noise


def welch_tests(summary: dict[str, Any], reference: str, alpha: float = 0.05) -> dict[tuple[str, str], float]:
    """Per (method, task) with at least 2 seeds on both sides: the p-value of Welch's t-test (unequal variances)
    between its per-seed values and ``reference``'s on the same task. A cell differs when p < ``alpha``; cells with
    fewer seeds are absent (untested). Seeds with zero spread on both sides and different means give p = 0."""
    import warnings

    from scipy.stats import ttest_ind

    out: dict[tuple[str, str], float] = {}
    cells = summary["cells"]
    for (method, task), cell in cells.items():
        ref = cells.get((reference, task))
        if method == reference or ref is None or cell["n"] < 2 or ref["n"] < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # identical seeds: scipy warns, p is nan (or 0)
            p = float(ttest_ind(cell["values"], ref["values"], equal_var=False).pvalue)
        out[(method, task)] = 1.0 if math.isnan(p) else p
    return out


def compare_footnote(reference: str, alpha: float) -> str:
    return (f"{DIFFERS} differs from {reference} beyond the seeds' noise: Welch's t-test over the per-seed values, "
            f"p < {alpha:g}; cells with fewer than 2 seeds on either side are not tested")


def higher_is_better(tasks: list[str]) -> bool | None:
    """The direction of a column over ``tasks`` (its task, or the tasks a mean averages): the tasks' shared
    ``higher_is_better``; None when they disagree (such a mean has no better side)."""
    directions = {TASKS.get(t).higher_is_better if t in TASKS else True for t in tasks}
    return directions.pop() if len(directions) == 1 else None


def best_values(numeric: dict[str, dict[str, float]], members: dict[str, list[str]]) -> dict[str, float]:
    """Per column with more than one value: the best value in its metric's direction (:func:`harness.plan.goodness`
    over the tasks in ``members[column]``); a column of mixed directions has none."""
    best = {}
    for col, values in numeric.items():
        direction = higher_is_better(members[col])
        if len(values) > 1 and direction is not None:
            best[col] = max(values.values(), key=lambda v: goodness(v, direction))
    return best


def csv_row(method: str, s: dict[str, Any], tasks: list[str], group_cols: list[str], extra: tuple[str, ...],
            pvalues: dict[tuple[str, str], float] | None, differs: set[tuple[str, str]],
            reference: Comparison | None, paper: dict) -> dict[str, Any]:
    """One method's CSV row: per task its mean, std, n and marks (``pvalues``: the ``--compare`` test's, when
    given), the group and overall means, the paper's numbers (``reference``) and the cost columns."""
    row: dict[str, Any] = {"method": method}
    for task in tasks:
        cell = s["cells"].get((method, task))
        row[task] = cell["mean"] if cell else None
        row[f"{task}_std"] = cell["std"] if cell else None
        row[f"{task}_n"] = cell["n"] if cell else 0
        row[f"{task}_disagree"] = bool(cell and cell["disagree"])
        if pvalues is not None:
            row[f"{task}_welch_p"] = pvalues.get((method, task))
            row[f"{task}_differs"] = (method, task) in differs
    for group in group_cols + ["mean"]:
        row[group] = s["means"].get((method, group))
    if reference is not None:
        row.update(reference_csv(method, s, tasks, group_cols, paper))
    row.update(_cost_columns(s["cost"].get(method), extra, numeric=True))
    return row


def column_values(s: dict[str, Any], methods: list[str], tasks: list[str],
                  group_cols: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """The printed table's value columns in order (tasks, group means, the overall mean), each method -> value,
    and the tasks each column's value comes from (for its metric's direction)."""
    numeric: dict[str, dict[str, float]] = {}
    members: dict[str, list[str]] = {}
    for task in tasks:
        numeric[task] = {m: s["cells"][(m, task)]["mean"] for m in methods if (m, task) in s["cells"]}
        members[task] = [task]
    for group, col in [(g, f"{g} (mean)") for g in group_cols] + [("mean", "mean")]:
        numeric[col] = {m: s["means"][(m, group)] for m in methods if (m, group) in s["means"]}
        members[col] = s["groups"][group] if group != "mean" else tasks
    return numeric, members


def cell_text(value: float, cell: dict[str, Any] | None, n_seeds: int, differs: bool, best: bool) -> str:
    """A printed value: ``mean ± std``, ``(n/N)`` when seeds are missing, † when they disagree, ‡ when it differs
    from ``--compare``'s method, bold (``**``, LaTeX's renderer makes it \\textbf) when the column's best."""
    text = f"{value:.1f}"
    if cell is not None and cell["n"] > 1:
        text += f" ± {cell['std']:.1f}"
    if cell is not None and cell["n"] < n_seeds:
        text += f" ({cell['n']}/{n_seeds})"
    if cell is not None and cell["disagree"]:
        text += "†"
    if differs:
        text += DIFFERS
    return f"**{text}**" if best else text


def build_table(suite: Suite, store: Store, methods: list[str] | None = None, tasks: list[str] | None = None,
                fmt: str = "markdown", extra: tuple[str, ...] = ("params",), missing: list[str] | None = None,
                compare: str | None = None, alpha: float = 0.05, reference: Comparison | None = None,
                layout: str = "wide", width: int | None = None) -> str:
    """The table as text. ``missing``, when given, receives the keys of the cells that have no value. ``compare``
    names a method: per task, the cells whose seeds differ from its seeds beyond their noise (Welch's t-test,
    p < ``alpha``) are marked ‡ with a footnote. ``reference`` adds the paper's number and our delta per cell: two
    rows under each method (``↳ paper``, ``↳ Δ``), or ``<column>_paper`` / ``<column>_delta`` csv columns.

    Tasks are shown by their display names (:attr:`harness.api.Task.label`: VTAB's "Clevr-Count"), except in csv,
    whose columns stay the registry's names (what scripts and ``harness.results`` key on). ``layout``: ``wide``
    (a row per method, tasks as columns, as the papers print it) or ``long`` (a row per task, group means and cost,
    a column per method: what fits a terminal when a suite has many tasks), or ``auto``: long when the wide table is
    wider than ``width`` (None: no limit; LaTeX: wide); csv is always one row per method. In LaTeX's wide layout the
    columns stand under their group's header (Natural / Specialized / Structured, as the paper's VTAB table), each
    group's mean last in it."""
    from tabulate import tabulate

    if layout not in (*LAYOUTS, "auto"):
        from harness.errors import HarnessError
        raise HarnessError(f"unknown layout '{layout}' (expected one of {', '.join(LAYOUTS)})")
    tasks = tasks or suite.tasks
    methods = methods or suite.methods
    s = summarize(final_rows(suite, store, methods, tasks), methods, tasks, len(suite.seeds))
    footnotes = [f"† {m}/{task_label(t)}: seeds disagree: {c['disagree']}" for (m, t), c in s["cells"].items()
                 if c["disagree"]]
    if compare is not None and compare not in methods:
        from harness.errors import HarnessError
        raise HarnessError(f"--compare {compare}: not one of the table's methods ({', '.join(methods)}); "
                           "add it to --methods")
    pvalues = welch_tests(s, compare, alpha) if compare is not None else {}
    differs = {key for key, p in pvalues.items() if p < alpha}
    if compare is not None:
        footnotes.append(compare_footnote(compare, alpha))
    if missing is not None:
        missing += [f"{m}/{t}" for m in methods for t in tasks if (m, t) not in s["cells"]]
    ordered_tasks = [t for members in s["groups"].values() for t in members]
    group_cols = [g for g in s["groups"] if g and len(s["groups"]) > 1]
    paper = reference.cells(methods, s["groups"]) if reference is not None else {}
    if reference is not None:
        footnotes.append(reference.describe(paper))
    if "step" in extra:
        footnotes.append(attach_bench(s, store.root / "bench", str(suite.backbone["name"]), methods))

    if fmt == "csv":
        rows = [csv_row(method, s, ordered_tasks, group_cols, extra, pvalues if compare is not None else None,
                        differs, reference, paper) for method in methods]
        if compare is not None:  # the footnote's content as columns: the CSV stays one table (the CLI prints it)
            for row in rows:
                row.update({"compare": compare, "alpha": alpha})
        import pandas as pd  # lazy: only csv needs it (its number formatting)

        return pd.DataFrame(rows).to_csv(index=False, float_format="%.4f")

    numeric, members = column_values(s, methods, ordered_tasks, group_cols)
    best = best_values(numeric, members)
    rows = []
    for method in methods:
        row: dict[str, Any] = {"method": method}
        for col, values in numeric.items():
            value = values.get(method)
            bold = col in best and value is not None and math.isclose(value, best[col], abs_tol=1e-9)
            row[col] = MISSING if value is None else cell_text(value, s["cells"].get((method, col)), s["n_seeds"],
                                                               (method, col) in differs, bold)
        row.update(_cost_columns(s["cost"].get(method), extra, numeric=False))
        rows.append(row)
        if reference is not None:
            rows += reference_rows(method, s, ordered_tasks, group_cols, paper,
                                   blank=_cost_columns(None, extra, numeric=False))
    columns = ["method", *numeric, *_cost_columns(None, extra, numeric=False)]
    labels = column_labels(columns, s["groups"])
    if fmt == "latex":
        return latex_table(rows, columns, labels, s["groups"], footnotes, "long" if layout == "long" else "wide")
    tablefmt = {"markdown": "pipe", "github": "github"}[fmt]
    text = tabulate([[row.get(c, "") for c in columns] for row in rows], headers=[labels[c] for c in columns],
                    tablefmt=tablefmt, disable_numparse=True)
    if layout == "long" or (layout == "auto" and width is not None and not wide_fits(text, width)):
        header, body = long_rows(rows, columns, labels)
        text = tabulate(body, headers=header, tablefmt=tablefmt, disable_numparse=True)
    if footnotes:
        text += "\n\n" + "\n".join(footnotes)
    return text


def coverage_note(suite: Suite, store: Store, cells: int, missing: list[str]) -> str:
    """One line for a table with missing cells (on stderr): how many of its ``cells`` have final records, where they
    were looked for (the store's folder: the results folder, or a run's) and under which settings, and what to
    run next. :func:`other_settings_hint` adds the records made under other settings, when there are some."""
    where = store.root / suite.name
    settings = override_flags(suite.overrides) or "the suite file's settings"
    status = f"harness status --suite {suite.name}" + (f" {override_flags(suite.overrides)}"
                                                         if suite.overrides else "")
    if len(missing) == cells:
        return (f"note: no final records for these {cells} cells of suite {suite.name} in {where} under "
                f"{settings}; `{status}` shows each cell's progress, `harness run --suite {suite.name}` makes them")
    return (f"note: {cells - len(missing)} of {cells} cells have final records in {where} under {settings}; "
            f"– marks the {len(missing)} missing, `{status}` says why")


def other_settings_hint(suite: Suite, store: Store, flags: str) -> str:
    """When this suite has final records under other settings (a smoke run's overrides), say so and how to see
    them: a table that is empty for the current settings should not look like nothing ever ran."""
    groups = store.other_settings(suite)
    if not groups:
        return ""
    lines = [f"note: {sum(g['records'] for g in groups)} final record(s) of suite {suite.name} were made with other "
             f"settings than {flags or 'the suite file'}; to show them:"]
    for group in groups[:5]:
        command = override_flags(group["overrides"])
        differs = ", ".join(group["differs"])
        lines.append(f"  harness table --suite {suite.name} {command}".rstrip()
                     + f"    # {group['records']} record(s); differ in: {differs}")
    return "\n".join(lines)


def override_flags(overrides: dict[str, Any]) -> str:
    """Command-line flags that recreate recorded overrides (the inverse of ``load_suite``'s)."""
    parts = []
    for key, flag in (("epochs", "--epochs"), ("seeds", "--seeds"), ("grid_points", "--grid-points"),
                      ("backbone", "--backbone"), ("weights", "--weights")):
        if overrides.get(key) is not None:
            parts.append(f"{flag} {overrides[key]}")
    for key, value in (overrides.get("set") or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"--set '{key}={text}'")
    return " ".join(parts)


def attach_bench(summary: dict[str, Any], folder, backbone: str, methods: list[str]) -> str:
    """Put the newest ``harness bench`` record's step times for ``backbone``'s architecture into the summary's cost
    (``step_ms``, ``step_vs_finetune``, ``cached_step_ms``); the footnote says which run they come from."""
    from harness.bench_records import architecture, latest_record

    found = latest_record(folder, backbone)
    if found is None:
        return (f"step: no harness bench record for {architecture(backbone)} in {folder} (run `harness bench "
                f"--backbone {architecture(backbone)}`)")
    path, record = found
    rows = {row.get("method"): row for row in record.get("rows", []) if row.get("status") == "ok"}
    for method in methods:
        row = rows.get(method)
        if row:
            summary["cost"].setdefault(method, {}).update(
                step_ms=row.get("step_ms"), step_vs_finetune=row.get("vs_finetune"),
                cached_step_ms=row.get("cached_step_ms"))
    return (f"step: one training step, from harness bench ({record.get('backbone')}, random weights, batch "
            f"{record.get('batch')}, {record.get('device')}, {str(record.get('created_at'))[:10]}; {path}); "
            "cached: the step on the feature cache's frozen outputs")


def _cost_columns(cost: dict[str, Any] | None, extra: tuple[str, ...], numeric: bool) -> dict[str, Any]:
    cost = cost or {}
    out: dict[str, Any] = {}

    def fmt(value, scale: float, digits: int | str):
        """``digits`` decimals, or a format spec such as '.3g' (small demo models have thousands of parameters,
        which three decimals of millions would show as 0.000)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None if numeric else MISSING
        spec = digits if isinstance(digits, str) else f".{digits}f"
        return value / scale if numeric else format(value / scale, spec)

    if "params" in extra:
        out["# params (M)"] = fmt(cost.get("trainable"), 1e6, ".3g")
    if "flops" in extra:
        out["GFLOPs/img"] = fmt(cost.get("flops"), 1e9, 3)
    if "throughput" in extra:
        out["train img/s"] = fmt(cost.get("throughput"), 1, 0)
    if "memory" in extra:
        out["peak mem (MB)"] = fmt(cost.get("memory"), 2**20, 0)
    if "step" in extra:
        out["step (ms)"] = fmt(cost.get("step_ms"), 1, 1)
        out["step x finetune"] = fmt(cost.get("step_vs_finetune"), 1, 2)
        out["cached step (ms)"] = fmt(cost.get("cached_step_ms"), 1, 1)
    return out
