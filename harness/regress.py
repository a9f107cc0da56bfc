"""Nightly regression: freeze a run's records as a baseline, compare a later run with it, and each cell's history.

A *baseline* (``harness baseline``) is one JSON file: per cell (method/task) the mean, std (over seeds, as the
table computes them: :func:`harness.table.summarize`), n and the per-seed values of the counted final records, the
cost (training throughput in images/s, peak memory, wall time per trial), and where the numbers came from (run id,
commit). :func:`compare` reads the same cells of a run (the latest by default) and flags, per cell:

* ``drop``: the mean fell by more than ``max(abs_tol, k x the baseline's seed std)`` (the metric's direction is
  the task's: lower is worse for top-1);
* ``missing``: the baseline has the cell and the run has no counted final record; ``seeds``: fewer seeds than
  the baseline;
* ``failed`` / ``diverged``: a trial of the cell failed (an exception) or diverged (a non-finite loss);
* ``throughput``: training throughput lower than the baseline's by more than ``max(cost_tol, k x the relative std
  of the baseline's own trials)``, compared only when both sides ran the same way (:mod:`harness.cost_context`: device
  model, CPU threads and instruction set, executor, whether trials shared a process); otherwise the report says
  once why not, never a regression;
* ``memory``: peak memory higher by more than ``cost_tol`` and ``MEMORY_FLOOR`` bytes, compared only when both
  sides ran on the same device model and measured it the same exact way (CUDA's allocator peak, or the CPU's
  tensor peak, which does not depend on what ran before in the process, so the executor may differ:
  :class:`harness.cost.PeakMemory`).

A cell with a flag is a *regression*, unless the suite's ``flaky:`` list names it: then it is reported as
``flaky`` and never fails. Exit status: 0 clean, 1 a regression, 2 could not compare (no baseline, no run, a
baseline of another suite) - :class:`harness.errors.HarnessError`. The reports (``report.md``, ``report.json``,
``report.html``) and the whole step (compare, history, write) are :mod:`harness.reports`'; the SLURM job that runs
the step after a night is :mod:`harness.executors.report`'s.
"""

from __future__ import annotations

import fnmatch
import json
import math
import statistics
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.cost_context import (MEMORY_FLOOR, cell_context, cost_summary, describe_context, memory_not_compared,
                                   throughput_not_compared)
from harness.errors import HarnessError
from harness.files import atomic_write_json
from harness.plan import Cell, cell_state, goodness
from harness.runs import Run, latest_run, list_runs, open_run, runs_root, runs_since
from harness.schema import flaky_pair
from harness.store import Store
from harness.sweep import Suite

BASELINE_KIND = "harness-baseline"
BASELINE_SCHEMA = 1
REPORT_SCHEMA = 1

EXIT_CLEAN, EXIT_REGRESSION, EXIT_CANNOT_COMPARE = 0, 1, 2

#: defaults of ``harness regress`` (stated in its --help)
ABS_TOL = 1.0
K_STD = 3.0
COST_TOL = 0.25
#: history figures: at most this many nights per cell
HISTORY_NIGHTS = 60

#: flags that make a cell a regression; the first group counts before any drop when ordering the report
HARD_FLAGS = ("missing", "failed", "diverged", "seeds")
VERDICT_ORDER = ("regression", "flaky", "improved", "ok", "new", "not in baseline")


@dataclass(frozen=True)
class Tolerances:
    """How far a cell may move before it counts: a drop beyond ``max(abs_tol, k * baseline std)`` metric points,
    a throughput drop or a peak-memory rise beyond ``cost_tol`` (relative)."""

    abs_tol: float = ABS_TOL
    k: float = K_STD
    cost_tol: float = COST_TOL

    def drop(self, std: float | None) -> float:
        return max(self.abs_tol, self.k * float(std or 0.0))

    def throughput(self, values: list[float] | None) -> float:
        """The relative throughput drop that counts: ``cost_tol``, or more where the baseline's own trials
        (seeds) varied: ``k x`` their relative std."""
        values = [v for v in values or [] if v]
        spread = statistics.pstdev(values) / statistics.fmean(values) if len(values) >= 2 else 0.0
        return max(self.cost_tol, self.k * spread)

    def check(self) -> "Tolerances":
        for name, value in asdict(self).items():
            if not value >= 0:  # NaN too
                raise HarnessError(f"--{name.replace('_', '-')}: expected a number >= 0, got {value}")
        return self


# ------------------------------------------------------------------------------------------------- reading cells
def finite_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def read_cells(suite: Suite, store: Store, methods: list[str], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per cell key (``method/task``): what the table counts (:func:`harness.table.final_frame` and
    :func:`~harness.table.summarize`: mean, std, n, values by seed) plus cost, failures and provenance, all read
    through the one protocol state (:func:`harness.plan.cell_state`)."""
    from harness.api import TASKS
    from harness.table import final_frame, summarize

    states = {Cell(m, t): cell_state(suite, Cell(m, t), store, stale=False) for m in methods for t in tasks}
    frame = final_frame(suite, store, methods, tasks, states)
    summary = summarize(frame, methods, tasks, len(suite.seeds))
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        for task in tasks:
            state = states[Cell(method, task)]
            stats = summary["cells"].get((method, task)) or {}
            rows = frame[(frame["method"] == method) & (frame["task"] == task)]
            finals = state.final_records
            devices = sorted({str((r.get("provenance") or {}).get("device_name") or "") for r in finals} - {""})
            kinds = sorted({str((r.get("cost") or {}).get("peak_memory_kind") or "") for r in finals} - {""})
            commits = sorted({str(((r.get("provenance") or {}).get("git") or {}).get("commit") or "")
                              for r in finals} - {""})
            info = TASKS.get(task)
            memory = [finite_number(v) for v in rows["memory"]]
            out[f"{method}/{task}"] = {
                "method": method, "task": task,
                "mean": stats.get("mean"), "std": stats.get("std"), "n": int(stats.get("n", 0)),
                "planned": state.n_finals,
                "values": {str(int(s)): float(v) for s, v in zip(rows["seed"], rows["value"])},
                "metric": info.metric, "higher_is_better": bool(info.higher_is_better),
                "throughput": _mean([finite_number(v) for v in rows["throughput"]]),
                "throughput_values": [v for v in (finite_number(x) for x in rows["throughput"]) if v is not None],
                "context": cell_context(finals),
                "peak_memory_bytes": max([m for m in memory if m is not None], default=None),
                "memory_kind": kinds[0] if len(kinds) == 1 else ("mixed" if kinds else None),
                "wall_time_s": _mean([finite_number(r.get("wall_time_s")) for r in finals]),
                "failed": [f"{r['spec']['stage']} seed {r['spec']['seed']}: {r['error']['type']}: "
                           f"{r['error']['message']}" for r in state.failed_records],
                "diverged": [f"{s.spec.stage} seed {s.spec.seed}" for s in state.slots if s.state == "diverged"],
                "blocked": state.blocked,
                "commits": commits,
                "dirty": any(((r.get("provenance") or {}).get("git") or {}).get("dirty") for r in finals),
                "device": devices[0] if len(devices) == 1 else (", ".join(devices) or None),
            }
    return out


def settings_of(suite: Suite) -> dict[str, Any]:
    """What a trial computes, as far as the suite decides it (backbone, budget, data, protocol, overrides, fixed
    hyperparameters): a baseline frozen with other settings compares other trials."""
    base = suite.spec_base()
    base.pop("suite", None)
    return json.loads(json.dumps({**base, "fixed": suite.raw.get("fixed"), "settings": suite.raw.get("settings")},
                                 default=str))


def _commit_of(cells: dict[str, dict[str, Any]], run: Run | None) -> dict[str, Any]:
    """The commit that produced the records: theirs when they agree, else the run's (with the list)."""
    commits = sorted({c for cell in cells.values() for c in cell["commits"]})
    dirty = any(cell["dirty"] for cell in cells.values())
    if len(commits) == 1:
        return {"commit": commits[0], "dirty": dirty, "commits": commits}
    git = run.git if run is not None else {}
    return {"commit": git.get("commit"), "dirty": bool(git.get("dirty")) or dirty, "commits": commits}


def records_source(results: Path, suite: Suite, run_id: str | None) -> tuple[Store, Run | None]:
    """The store to read: run ``run_id`` (``latest``: the suite's most recent run). With the default ``latest``
    and no run at all, the normal store (records of ``harness run`` without ``--run-id``)."""
    run_id = run_id or "latest"
    if run_id == "latest" and latest_run(results, suite.name) is None:
        store = Store(Path(results))
        if (store.root / suite.name).is_dir():
            return store, None
        raise HarnessError(f"no run of suite '{suite.name}' under {runs_root(results)} and no records under "
                           f"{Path(results) / suite.name} (start one with `harness run --suite {suite.name} "
                           "--run-id auto` or `harness nightly`)")
    run = open_run(results, run_id, suite.name)
    return run.store, run


def _source(store: Store, run: Run | None) -> dict[str, Any]:
    if run is not None:
        return run.summary()
    return {"run_id": None, "time": None, "git": {}, "folder": str(store.root)}


# ------------------------------------------------------------------------------------------------------ baseline
def make_baseline(suite: Suite, store: Store, run: Run | None, methods: list[str],
                  tasks: list[str], allow_dirty: bool = False) -> tuple[dict, list[str]]:
    """The baseline of the selected cells (those with counted final records) and notes on the cells left out.
    Records made by a tree with uncommitted changes are refused unless ``allow_dirty`` (the baseline then says so):
    a baseline must name code that can be checked out."""
    cells = read_cells(suite, store, methods, tasks)
    kept = {key: cell for key, cell in cells.items() if cell["n"] > 0}
    dirty = sorted(key for key, cell in kept.items() if cell["dirty"])
    if dirty and not allow_dirty:
        commits = sorted({c for key in dirty for c in kept[key]["commits"]})
        raise HarnessError(f"{len(dirty)} cell(s) of the records to freeze were made by a tree with uncommitted "
                           f"changes (commit {', '.join(c[:12] for c in commits) or 'unknown'} + edits), e.g. "
                           f"{dirty[0]}: a baseline must name code that can be checked out. Commit, rerun the "
                           "suite and freeze that, or pass --allow-dirty to freeze these marked as dirty")
    if not kept:
        other = store.other_settings(suite)
        raise HarnessError(f"nothing to freeze: no counted final records of suite '{suite.name}' in {store.root}"
                           + (f" (run {run.run_id})" if run else "")
                           + (f"; {sum(g['records'] for g in other)} final record(s) there were made with other "
                              f"settings (differ in: {', '.join(other[0]['differs'])})" if other else ""))
    notes = [f"not in the baseline: {key}: no counted final records" + (f" ({cell['blocked']})" if cell["blocked"]
                                                                        else "")
             for key, cell in cells.items() if cell["n"] == 0]
    notes += [f"{key}: {cell['n']} of {cell['planned']} seeds" for key, cell in kept.items()
              if cell["n"] < cell["planned"]]
    contexts = {json.dumps(cell["context"], sort_keys=True) for cell in kept.values()}
    source = {k: v for k, v in _source(store, run).items() if k != "folder"}  # no path of the machine it ran on
    baseline = {
        "kind": BASELINE_KIND, "schema": BASELINE_SCHEMA, "suite": suite.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": source, "git": _commit_of(kept, run), "settings": settings_of(suite),
        "device": (describe_context(next(iter(kept.values()))["context"] or {}) if len(contexts) == 1
                   else f"{len(contexts)} contexts: see each cell's"),
        "cells": kept,
    }
    return baseline, notes


def write_baseline(baseline: dict[str, Any], path: Path) -> Path:
    atomic_write_json(Path(path), baseline)
    return Path(path)


def load_baseline(path: Path, suite: Suite) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"no baseline file {path} (freeze one with `harness baseline --suite {suite.name} --out "
                           f"{path}`)")
    try:
        baseline = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HarnessError(f"{path}: not a readable baseline ({err.__class__.__name__}: {err})") from None
    if not isinstance(baseline, dict) or baseline.get("kind") != BASELINE_KIND or not isinstance(
            baseline.get("cells"), dict):
        raise HarnessError(f"{path}: not a baseline written by `harness baseline`")
    if baseline.get("suite") != suite.name:
        raise HarnessError(f"{path}: a baseline of suite '{baseline.get('suite')}', not '{suite.name}'")
    return baseline


# ------------------------------------------------------------------------------------------------------- compare
def flaky_patterns(suite: Suite) -> list[tuple[str, str]]:
    return [pair for entry in suite.raw.get("flaky") or [] if (pair := flaky_pair(entry)) is not None]


def is_flaky(patterns: list[tuple[str, str]], method: str, task: str) -> bool:
    return any(fnmatch.fnmatchcase(method, m) and fnmatch.fnmatchcase(task, t) for m, t in patterns)


def _relative(new: float | None, old: float | None) -> float | None:
    return (new - old) / old if new is not None and old not in (None, 0) else None


def compare_cell(key: str, base: dict[str, Any] | None, cur: dict[str, Any], tol: Tolerances,
                 flaky: bool) -> dict[str, Any]:
    """One row of the report: both sides, the change, the tolerance, the flags and the verdict."""
    flags: list[dict[str, str]] = []

    def flag(kind: str, message: str) -> None:
        flags.append({"kind": kind, "message": message})

    row: dict[str, Any] = {"cell": key, "method": cur["method"], "task": cur["task"], "flaky": flaky,
                           "baseline": base, "current": cur, "delta": None, "change": None, "tolerance": None,
                           "throughput_change": None, "throughput_tolerance": None, "memory_change": None}
    if cur["failed"]:
        flag("failed", f"{len(cur['failed'])} failed trial(s): {cur['failed'][0]}")
    if cur["diverged"]:
        flag("diverged", f"{len(cur['diverged'])} diverged trial(s): {', '.join(cur['diverged'][:3])}")
    if base is not None:
        if cur["n"] == 0:
            flag("missing", f"no counted final record (the baseline has {base['n']})"
                 + (f": {cur['blocked']}" if cur["blocked"] else ""))
        elif cur["n"] < base["n"]:
            flag("seeds", f"{cur['n']} of the baseline's {base['n']} seeds")
        if cur["n"] and base.get("mean") is not None:
            delta = float(cur["mean"]) - float(base["mean"])
            change = goodness(delta, base.get("higher_is_better", True))
            tolerance = tol.drop(base.get("std"))
            row.update(delta=delta, change=change, tolerance=tolerance)
            if -change > tolerance:
                flag("drop", f"{base['mean']:.2f} -> {cur['mean']:.2f} ({delta:+.2f}; tolerance {tolerance:.2f} = "
                             f"max({tol.abs_tol:g}, {tol.k:g} x std {float(base.get('std') or 0):.2f}))")
        if cur["n"]:
            _compare_cost(row, base, cur, tol, flag)
    row["flags"] = flags
    if flags:
        row["verdict"] = "flaky" if flaky else "regression"
    elif base is None:
        row["verdict"] = "new" if cur["n"] else "not in baseline"
    elif row["change"] is not None and row["change"] > row["tolerance"]:
        row["verdict"] = "improved"
    else:
        row["verdict"] = "ok"
    row["severity"] = _severity(row, tol)
    return row


def _compare_cost(row: dict[str, Any], base: dict[str, Any], cur: dict[str, Any], tol: Tolerances, flag) -> None:
    """Throughput and peak memory of one cell, each only where both sides measured it alike (else the reason goes
    to ``row["cost_not_compared"]``)."""
    row["cost_not_compared"] = {}
    why = throughput_not_compared(base, cur)
    if why is not None:
        row["cost_not_compared"]["throughput"] = why
    else:
        thr = _relative(cur["throughput"], base.get("throughput"))
        allowed = tol.throughput(base.get("throughput_values"))
        row.update(throughput_change=thr, throughput_tolerance=allowed)
        if thr is not None and thr < -allowed:
            spread = "" if allowed == tol.cost_tol else " (the baseline's own seeds varied that much)"
            flag("throughput", f"training throughput {base['throughput']:.0f} -> {cur['throughput']:.0f} img/s "
                               f"({thr:+.0%}; tolerance -{allowed:.0%}{spread})")
    why = memory_not_compared(base, cur)
    if why is not None:
        row["cost_not_compared"]["memory"] = why
        return
    mem = _relative(cur["peak_memory_bytes"], base.get("peak_memory_bytes"))
    row["memory_change"] = mem
    grew = (cur["peak_memory_bytes"] or 0) - (base.get("peak_memory_bytes") or 0)
    if mem is not None and mem > tol.cost_tol and grew > MEMORY_FLOOR:
        flag("memory", f"peak memory {base['peak_memory_bytes'] / 2**20:.1f} -> "
                       f"{cur['peak_memory_bytes'] / 2**20:.1f} MiB ({mem:+.0%}; tolerance +{tol.cost_tol:.0%})")


def _severity(row: dict[str, Any], tol: Tolerances) -> float:
    """How far a row moved, in tolerances: a missing, failed or diverged cell first, then the larger change."""
    kinds = {f["kind"] for f in row["flags"]}
    if kinds & set(HARD_FLAGS):
        return 1000.0
    scores = [0.0]
    if row["change"] is not None and row["tolerance"]:
        scores.append(abs(row["change"]) / row["tolerance"])
    if "throughput" in kinds and row.get("throughput_tolerance"):
        scores.append(abs(row["throughput_change"]) / row["throughput_tolerance"])
    if "memory" in kinds and tol.cost_tol > 0:
        scores.append(abs(row["memory_change"]) / tol.cost_tol)
    return max(scores)


def order_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Regressions first, then flaky, improved, ok, new; within each the largest change first."""
    return sorted(rows, key=lambda r: (VERDICT_ORDER.index(r["verdict"]), -r["severity"],
                                       -abs(r["change"] or 0.0), r["cell"]))


def compare(suite: Suite, baseline: dict[str, Any], store: Store, run: Run | None, methods: list[str],
            tasks: list[str], tol: Tolerances = Tolerances()) -> dict[str, Any]:
    """The report (a JSON-able dict): both sides with their commits, the tolerances, one row per selected cell
    (largest changes first) and the exit code."""
    cells = read_cells(suite, store, methods, tasks)
    patterns = flaky_patterns(suite)
    rows = [compare_cell(key, baseline["cells"].get(key), cur, tol, is_flaky(patterns, cur["method"], cur["task"]))
            for key, cur in cells.items()]
    rows = order_rows(rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    notes = []
    ours, theirs = settings_of(suite), baseline.get("settings") or {}
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        notes.append(f"the suite's settings differ from the baseline's ({', '.join(differ)}): the cells compare "
                     "other trials; freeze a new baseline if the change is intended")
    git = baseline.get("git") or {}
    if git.get("dirty"):
        notes.append(f"the baseline was frozen from records of a tree with uncommitted changes (commit "
                     f"{str(git.get('commit') or 'unknown')[:12]} + edits, `harness baseline --allow-dirty`): the code "
                     "it measured cannot be checked out")
    outside = sorted(set(baseline["cells"]) - set(cells))
    if outside:
        notes.append(f"{len(outside)} baseline cell(s) not selected: {', '.join(outside[:8])}"
                     + (" ..." if len(outside) > 8 else ""))
    exit_code = EXIT_REGRESSION if counts.get("regression") else EXIT_CLEAN
    return {
        "kind": "harness-regression-report", "schema": REPORT_SCHEMA, "suite": suite.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exit_code": exit_code, "verdict": "regression" if exit_code else "clean",
        "baseline": {"file": baseline.get("file"), "created": baseline.get("created"), **(baseline.get("run") or {}),
                     "git": baseline.get("git") or {}},
        "run": {**_source(store, run), "git": _commit_of(cells, run)},
        "tolerances": {k: (v if math.isfinite(v) else None) for k, v in asdict(tol).items()},  # None: off
        "memory_floor_bytes": MEMORY_FLOOR, "cost": cost_summary(rows),
        "counts": counts, "notes": notes, "cells": rows, "history": {},
    }


# ------------------------------------------------------------------------------------------------------- history
def history(suite: Suite, results: Path, methods: list[str], tasks: list[str],
            since: datetime | None = None, keys: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per cell key, one entry per run of the suite (since ``since``; else all), oldest first: run id, time, the
    commit, and the cell's mean, std and n in that run (mean None when it has no counted record)."""
    from harness.table import final_frame, summarize

    runs = runs_since(results, suite.name, since) if since is not None else list_runs(results, suite.name)
    out: dict[str, list[dict[str, Any]]] = {}
    wanted = [(m, t) for m in methods for t in tasks if keys is None or f"{m}/{t}" in keys]
    for run in runs[-HISTORY_NIGHTS:]:
        frame = final_frame(suite, run.store, sorted({m for m, _ in wanted}), sorted({t for _, t in wanted}))
        summary = summarize(frame, methods, tasks, len(suite.seeds))
        for method, task in wanted:
            stats = summary["cells"].get((method, task)) or {}
            out.setdefault(f"{method}/{task}", []).append({
                "run_id": run.run_id, "time": run.time.isoformat(), "commit": run.git.get("commit"),
                "mean": stats.get("mean"), "std": stats.get("std"), "n": int(stats.get("n", 0))})
    return out
