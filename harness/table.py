"""Paper-style tables computed from records: rows are methods, columns tasks (grouped), group means, the overall
mean and cost columns. Each cell is the mean ± std of the final trials' last-epoch metric over seeds.

Only records whose suite-level spec (backbone, training budget, protocol, data settings, overrides) equals the
current suite's count, so a smoke run with ``--epochs 1`` never mixes with full-protocol numbers.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from tabulate import tabulate

from harness.api import TASKS
from harness.store import Store
from harness.sweep import Suite

FORMATS = ("markdown", "github", "latex", "csv")
EXTRA_COLUMNS = ("params", "flops", "throughput", "memory")
MISSING = "–"


def final_frame(suite: Suite, store: Store) -> pd.DataFrame:
    """One row per valid, ok final record of the suite that matches its current settings."""
    base = suite.spec_base()
    rows = []
    for record in store.scan(suite.name):
        spec = record["spec"]
        if spec.get("stage") != "final" or record["status"] != "ok":
            continue
        if any(spec.get(k) != v for k, v in base.items()):
            continue
        cost = record.get("cost") or {}
        rows.append({
            "method": spec["method"], "task": spec["task"], "seed": spec["seed"],
            "value": float(record["metrics"]["eval"]),
            "trainable": record["params"].get("trainable"), "head": record["params"].get("head"),
            "total": record["params"].get("total"), "flops": cost.get("forward_flops"),
            "throughput": cost.get("train_images_per_s"), "memory": cost.get("peak_memory_bytes"),
        })
    return pd.DataFrame(rows, columns=["method", "task", "seed", "value", "trainable", "head", "total", "flops",
                                       "throughput", "memory"])


def _task_group(task: str) -> str:
    try:
        return TASKS.get(task).group or ""
    except Exception:  # a record of a task no longer registered still tables, ungrouped
        return ""


def summarize(frame: pd.DataFrame, methods: list[str], tasks: list[str], n_seeds: int) -> dict[str, Any]:
    """Per (method, task): mean, std, n; group and overall means per method; cost per method."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for (method, task), rows in frame.groupby(["method", "task"]):
        values = rows.drop_duplicates("seed")["value"]
        cells[(method, task)] = {"mean": float(values.mean()), "std": float(values.std(ddof=0)),
                                 "n": int(values.size)}
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
    for method, rows in frame.groupby("method"):
        cost[method] = {k: rows[k].dropna().mean() if rows[k].notna().any() else None
                        for k in ("trainable", "head", "total", "flops", "throughput", "memory")}
    return {"cells": cells, "groups": groups, "means": means, "cost": cost, "n_seeds": n_seeds}


def build_table(suite: Suite, store: Store, methods: list[str] | None = None, tasks: list[str] | None = None,
                fmt: str = "markdown", extra: tuple[str, ...] = ("params",)) -> str:
    frame = final_frame(suite, store)
    tasks = tasks or suite.tasks
    if methods is None:
        seen = list(dict.fromkeys(frame["method"]))
        methods = [m for m in suite.methods if m in seen] + [m for m in seen if m not in suite.methods]
        methods = methods or suite.methods
    s = summarize(frame[frame["task"].isin(tasks)], methods, tasks, len(suite.seeds))
    ordered_tasks = [t for members in s["groups"].values() for t in members]
    group_cols = [g for g in s["groups"] if g and len(s["groups"]) > 1]

    if fmt == "csv":
        rows = []
        for method in methods:
            row: dict[str, Any] = {"method": method}
            for task in ordered_tasks:
                cell = s["cells"].get((method, task))
                row[task] = cell["mean"] if cell else None
                row[f"{task}_std"] = cell["std"] if cell else None
                row[f"{task}_n"] = cell["n"] if cell else 0
            for group in group_cols + ["mean"]:
                row[group] = s["means"].get((method, group))
            row.update(_cost_columns(s["cost"].get(method), extra, numeric=True))
            rows.append(row)
        return pd.DataFrame(rows).to_csv(index=False, float_format="%.4f")

    value_cols = ordered_tasks + [f"{g} (mean)" for g in group_cols] + ["mean"]
    numeric = {col: {} for col in value_cols}
    for method in methods:
        for task in ordered_tasks:
            if (method, task) in s["cells"]:
                numeric[task][method] = s["cells"][(method, task)]["mean"]
        for group in group_cols:
            if (method, group) in s["means"]:
                numeric[f"{group} (mean)"][method] = s["means"][(method, group)]
        if (method, "mean") in s["means"]:
            numeric["mean"][method] = s["means"][(method, "mean")]
    best = {col: max(vals.values()) for col, vals in numeric.items() if len(vals) > 1}

    def mark(text: str) -> str:
        return f"\\textbf{{{text}}}" if fmt == "latex" else f"**{text}**"

    rows = []
    for method in methods:
        row: dict[str, Any] = {"method": method}
        for col in value_cols:
            value = numeric[col].get(method)
            if value is None:
                row[col] = MISSING
                continue
            text = f"{value:.1f}"
            cell = s["cells"].get((method, col))
            if cell is not None and cell["n"] > 1:
                text += f" ± {cell['std']:.1f}"
            if cell is not None and cell["n"] < s["n_seeds"]:
                text += f" ({cell['n']}/{s['n_seeds']})"
            if col in best and math.isclose(value, best[col], abs_tol=1e-9):
                text = mark(text)
            row[col] = text
        row.update(_cost_columns(s["cost"].get(method), extra, numeric=False))
        rows.append(row)
    table = pd.DataFrame(rows)
    tablefmt = {"markdown": "pipe", "github": "github", "latex": "latex_raw"}[fmt]
    return tabulate(table, headers="keys", tablefmt=tablefmt, showindex=False, disable_numparse=True)


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
    return out
