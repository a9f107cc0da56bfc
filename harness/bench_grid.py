"""``harness bench --grid``: a whole linear-probe search of one cell timed end to end, without and with the
frozen-computation cache (:mod:`harness.features`), and the largest difference of their per-epoch metrics."""

from __future__ import annotations

import time
from typing import Any

from harness.api import METHODS
from harness.bench import progress_bar
from harness.errors import HarnessError
from harness.plan import Cell, search_specs, select_tasks
from harness.store import default_cache_dir
from harness.sweep import load_suite

#: the CSV's columns of ``--grid``
GRID_COLUMNS = ("mode", "method", "task", "suite", "points", "epochs", "seconds", "seconds_per_point", "speedup",
                "feature_cache", "max_eval_diff", "failed")


def run_grid(suite_name: str = "demo", task: str | None = None, grid_points: int | None = None,
             data_root: str | None = None, progress: bool = True, method: str = "linear",
             full_grid: bool = False, epochs: int | None = None) -> list[dict[str, Any]]:
    """Time one cell's whole linear-probe search end to end (every grid point of the suite's protocol, one after the
    other: building, training, evaluating each trial), without and then with the frozen-computation cache; one row
    each. The cached pass builds the features first where they are not cached yet. ``max_eval_diff``: the largest
    difference between the two passes' per-epoch metrics. ``full_grid``: the method's own grid (the linear probe's
    40 points) instead of the suite's; ``epochs`` overrides the suite's. Nothing is recorded in the results."""
    from harness.train import TrialEnv, run_trial

    sets = {f"grids.{method}": METHODS.get(method).grid} if full_grid else None
    suite = load_suite(suite_name, grid_points=grid_points, data_root=data_root, sets=sets, epochs=epochs)
    task = select_tasks(suite, task)[0]
    specs = search_specs(suite, Cell(method, task))
    if not specs:
        raise HarnessError(f"suite {suite.name} has no search stage for {method}/{task} (protocol "
                           f"{suite.protocol['kind']})")
    bar = progress_bar(progress, total=2 * len(specs), unit="trial")
    rows, curves = [], []
    try:
        for cache in (False, True):
            bar.set_description(f"{method}/{task} {'cache' if cache else 'no cache'}")
            env = TrialEnv.for_suite(suite, default_cache_dir(), progress=False, feature_cache=cache)
            t0 = time.perf_counter()
            records = []
            for spec in specs:
                records.append(run_trial(spec, env))
                bar.update(1)
            seconds = time.perf_counter() - t0
            rows.append({"mode": "cache" if cache else "no cache", "method": method, "task": task,
                         "suite": suite.name, "points": len(specs), "epochs": specs[0].train.get("epochs"),
                         "seconds": seconds,
                         "seconds_per_point": seconds / len(specs), "feature_cache": records[0].get("feature_cache"),
                         "failed": sum(r["status"] != "ok" for r in records)})
            curves.append([[e.get("eval") for e in r.get("curve", [])] for r in records])
    finally:
        bar.close()
    diffs = [abs(a - b) for ra, rb in zip(*curves) for a, b in zip(ra, rb) if a is not None and b is not None]
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"] if rows[1]["seconds"] else None
    rows[1]["max_eval_diff"] = max(diffs) if diffs else None
    return [{column: row.get(column) for column in GRID_COLUMNS} for row in rows]


def grid_table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    lines = [{"mode": r["mode"], "points": r["points"], "seconds": f"{r['seconds']:.1f}",
              "s/point": f"{r['seconds_per_point']:.2f}",
              "speed-up": "–" if r["speedup"] is None else f"x{r['speedup']:.1f}",
              "feature cache": r["feature_cache"], "max |Δ metric|": "–" if r["max_eval_diff"] is None
              else f"{r['max_eval_diff']:.2g}", "failed": r["failed"]} for r in rows]
    first = rows[0]
    return (tabulate(lines, headers="keys", tablefmt="simple", disable_numparse=True)
            + f"\n\n{first['method']} search on {first['task']} (suite {first['suite']}, {first['epochs']} epochs per "
              "trial), end to end; the cached pass builds the features first where they are not cached yet.")
