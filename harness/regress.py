"""Nightly regression: freeze a run's records as a baseline, compare a later run with it, and write the report.

A *baseline* (``harness baseline``) is one JSON file: per cell (method/task) the mean, std (over seeds, as the
table computes them: :func:`harness.table.summarize`), n and the per-seed values of the counted final records, the
cost (training throughput in images/s, peak memory, wall time per trial), and where the numbers came from (run id,
commit). :func:`compare` reads the same cells of a run (the latest by default) and flags, per cell:

* ``drop``: the mean fell by more than ``max(abs_tol, k x the baseline's seed std)`` (the metric's direction is
  the task's: lower is worse for top-1);
* ``missing``: the baseline has the cell and the run has no counted final record; ``seeds``: fewer seeds than
  the baseline;
* ``failed`` / ``diverged``: a trial of the cell failed (an exception) or diverged (a non-finite loss);
* ``throughput`` / ``memory``: training throughput lower, or peak memory higher, than the baseline's by more than
  ``cost_tol`` (relative; memory changes under ``MEMORY_FLOOR`` bytes are noise and ignored; cost is compared only
  when both sides ran on the same kind of device).

A cell with a flag is a *regression*, unless the suite's ``flaky:`` list names it: then it is reported as
``flaky`` and never fails. Exit status: 0 clean, 1 a regression, 2 could not compare (no baseline, no run, a
baseline of another suite) - :class:`harness.errors.HarnessError`. Reports: ``report.md``, ``report.json`` and a
self-contained ``report.html`` (tables, and history figures of the flagged cells inlined as base64 PNG).
"""

from __future__ import annotations

import base64
import fnmatch
import html
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
#: peak-memory changes smaller than this are noise (on the CPU the peak is the growth of the process RSS)
MEMORY_FLOOR = 32 * 2**20
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

    def check(self) -> "Tolerances":
        for name, value in asdict(self).items():
            if not value >= 0:  # NaN too
                raise HarnessError(f"--{name.replace('_', '-')}: expected a number >= 0, got {value}")
        return self


# ------------------------------------------------------------------------------------------------- reading cells
def _number(value: Any) -> float | None:
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
            memory = [_number(v) for v in rows["memory"]]
            out[f"{method}/{task}"] = {
                "method": method, "task": task,
                "mean": stats.get("mean"), "std": stats.get("std"), "n": int(stats.get("n", 0)),
                "planned": state.n_finals,
                "values": {str(int(s)): float(v) for s, v in zip(rows["seed"], rows["value"])},
                "metric": info.metric, "higher_is_better": bool(info.higher_is_better),
                "throughput": _mean([_number(v) for v in rows["throughput"]]),
                "peak_memory_bytes": max([m for m in memory if m is not None], default=None),
                "memory_kind": kinds[0] if len(kinds) == 1 else ("mixed" if kinds else None),
                "wall_time_s": _mean([_number(r.get("wall_time_s")) for r in finals]),
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
def freeze(suite: Suite, store: Store, run: Run | None, methods: list[str], tasks: list[str]) -> tuple[dict, list[str]]:
    """The baseline of the selected cells (those with counted final records) and notes on the cells left out."""
    cells = read_cells(suite, store, methods, tasks)
    kept = {key: cell for key, cell in cells.items() if cell["n"] > 0}
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
    baseline = {
        "kind": BASELINE_KIND, "schema": BASELINE_SCHEMA, "suite": suite.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": _source(store, run), "git": _commit_of(kept, run), "settings": settings_of(suite),
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
                           "throughput_change": None, "memory_change": None, "notes": []}
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
        same_device = (base.get("memory_kind") == cur["memory_kind"] and base.get("device") == cur["device"])
        if cur["n"] and not same_device:
            row["notes"].append(f"cost not compared: baseline on {base.get('device')} ({base.get('memory_kind')}), "
                                f"this run on {cur['device']} ({cur['memory_kind']})")
        elif cur["n"]:
            thr = _relative(cur["throughput"], base.get("throughput"))
            row["throughput_change"] = thr
            if thr is not None and thr < -tol.cost_tol:
                flag("throughput", f"training throughput {base['throughput']:.0f} -> {cur['throughput']:.0f} img/s "
                                   f"({thr:+.0%}; tolerance -{tol.cost_tol:.0%})")
            mem = _relative(cur["peak_memory_bytes"], base.get("peak_memory_bytes"))
            row["memory_change"] = mem
            grew = (cur["peak_memory_bytes"] or 0) - (base.get("peak_memory_bytes") or 0)
            if mem is not None and mem > tol.cost_tol and grew > MEMORY_FLOOR:
                flag("memory", f"peak memory {base['peak_memory_bytes'] / 2**20:.0f} -> "
                               f"{cur['peak_memory_bytes'] / 2**20:.0f} MiB ({mem:+.0%}; tolerance +{tol.cost_tol:.0%})")
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


def _severity(row: dict[str, Any], tol: Tolerances) -> float:
    """How far a row moved, in tolerances: a missing, failed or diverged cell first, then the larger change."""
    kinds = {f["kind"] for f in row["flags"]}
    if kinds & set(HARD_FLAGS):
        return 1000.0
    scores = [0.0]
    if row["change"] is not None and row["tolerance"]:
        scores.append(abs(row["change"]) / row["tolerance"])
    for name in ("throughput_change", "memory_change"):
        value = row[name]
        if value is not None and tol.cost_tol > 0 and f"{name.split('_')[0]}" in kinds:
            scores.append(abs(value) / tol.cost_tol)
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
        "memory_floor_bytes": MEMORY_FLOOR,
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


def history_lines(hist: dict[str, list[dict[str, Any]]], bases: dict[str, Any] | None = None) -> list[str]:
    """The history as text, one block per cell (``bases``: cell key -> the baseline's cell, for the header)."""
    lines = []
    for key, nights in hist.items():
        base = (bases or {}).get(key)
        head = f"{key}" + (f"  (baseline {base['mean']:.2f} ± {base['std']:.2f}, n={base['n']})" if base else "")
        lines.append(head)
        for night in nights:
            value = (f"{night['mean']:6.2f} ± {night['std']:.2f} (n={night['n']})" if night["mean"] is not None
                     else "     – (no record)")
            lines.append(f"  {night['run_id']:<22} {str(night['commit'] or '')[:10]:<10}  {value}")
    return lines


# ------------------------------------------------------------------------------------------------------- reports
def report_bases(report: dict[str, Any]) -> dict[str, Any]:
    """Cell key -> the baseline's cell, from a report's rows."""
    return {row["cell"]: row["baseline"] for row in report.get("cells", [])}


def _fmt(value: Any, spec: str = ".2f") -> str:
    number = _number(value)
    return "–" if number is None else format(number, spec)


def _side(side: dict[str, Any] | None) -> str:
    if not side or side.get("mean") is None:
        return "–"
    text = f"{side['mean']:.2f} ± {float(side.get('std') or 0):.2f}"
    return text + (f" (n={side['n']})" if side.get("n") is not None else "")


def _commit(git: dict[str, Any]) -> str:
    commit = str(git.get("commit") or "unknown")[:12]
    return commit + (" (dirty)" if git.get("dirty") else "")


def _table_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for row in report["cells"]:
        cur, base = row["current"], row["baseline"] or {}
        rows.append({
            "cell": row["cell"] + (" (flaky)" if row["flaky"] else ""),
            "verdict": row["verdict"],
            "baseline": _side(base),
            "now": _side(cur) if cur["n"] else "–",
            "Δ": _fmt(row["delta"], "+.2f"),
            "tolerance": _fmt(row["tolerance"]),
            "img/s": f"{_fmt(base.get('throughput'), '.0f')} → {_fmt(cur.get('throughput'), '.0f')}",
            "peak MiB": f"{_fmt((base.get('peak_memory_bytes') or 0) / 2**20 if base.get('peak_memory_bytes') is not None else None, '.0f')}"
                        f" → {_fmt(cur['peak_memory_bytes'] / 2**20 if cur.get('peak_memory_bytes') is not None else None, '.0f')}",
            "wall s/trial": f"{_fmt(base.get('wall_time_s'), '.1f')} → {_fmt(cur.get('wall_time_s'), '.1f')}",
            "flags": ", ".join(f["kind"] for f in row["flags"]) or "; ".join(row["notes"]),
        })
    return rows


def _headline(report: dict[str, Any]) -> str:
    counts = report["counts"]
    if report["exit_code"] == EXIT_REGRESSION:
        return f"REGRESSION: {counts.get('regression', 0)} cell(s) regressed"
    extra = f" ({counts['flaky']} flaky cell(s) flagged, not failing)" if counts.get("flaky") else ""
    return "clean: no regression" + extra


def _sides(report: dict[str, Any]) -> list[tuple[str, str]]:
    base, run = report["baseline"], report["run"]
    return [
        ("baseline", f"run {base.get('run_id') or base.get('folder')}, commit {_commit(base.get('git') or {})}, "
                     f"frozen {base.get('created')}" + (f" from {base['file']}" if base.get("file") else "")),
        ("this run", f"run {run.get('run_id') or run.get('folder')}, commit {_commit(run.get('git') or {})}, "
                     f"started {run.get('time')}"),
    ]


def _tolerance_line(report: dict[str, Any]) -> str:
    tol = report["tolerances"]
    drop = (f"a drop counts beyond max({tol['abs_tol']:g}, {tol['k']:g} × the baseline's seed std) points"
            if tol["abs_tol"] is not None and tol["k"] is not None else "drops are not checked")
    cost = (f"cost beyond {tol['cost_tol']:.0%} (throughput lower, peak memory higher)" if tol["cost_tol"] is not None
            else "cost not checked (--cost-tol inf)")
    return f"{drop}; {cost}; flaky cells never fail"


def markdown_report(report: dict[str, Any]) -> str:
    from tabulate import tabulate

    lines = [f"# Nightly regression report: suite {report['suite']}", "", f"**{_headline(report)}** "
             f"(exit {report['exit_code']})", ""]
    lines += [f"- {name}: {text}" for name, text in _sides(report)]
    lines += [f"- rule: {_tolerance_line(report)}", f"- cells: " + ", ".join(
        f"{v} {k}" for k, v in sorted(report["counts"].items(), key=lambda kv: VERDICT_ORDER.index(kv[0])))]
    lines += [f"- note: {note}" for note in report["notes"]]
    flagged = [r for r in report["cells"] if r["flags"]]
    if flagged:
        lines += ["", "## Flagged cells (largest first)", ""]
        for row in flagged:
            lines.append(f"- **{row['cell']}** ({row['verdict']}): "
                         + "; ".join(f"{f['kind']}: {f['message']}" for f in row["flags"]))
    lines += ["", "## All cells (largest changes first)", "",
              tabulate(_table_rows(report), headers="keys", tablefmt="github", disable_numparse=True)]
    if report.get("history"):
        lines += ["", "## History", "", "```", *history_lines(report["history"], report_bases(report)), "```"]
    return "\n".join(lines) + "\n"


CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:24px 0 8px}
.banner{padding:10px 14px;border-radius:6px;font-size:18px;font-weight:600;margin:8px 0 12px}
.banner.regression{background:#fde2e1;color:#8a1c17;border:1px solid #f3b0ac}
.banner.clean{background:#e3f4e6;color:#1d5e2a;border:1px solid #b5dfbd}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0;font-size:14px} dt{font-weight:600}
table{border-collapse:collapse;font-size:13px;margin:6px 0} th,td{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.regression td{background:#fdecea} tr.flaky td{background:#fff6de} tr.improved td{background:#eef8ef}
.v{font-weight:600} .v.regression{color:#a61b14} .v.flaky{color:#8a6100} .v.improved{color:#1d6a2c}
.notes{font-size:13px;color:#555} .figures{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:560px} figcaption{font-size:13px;color:#444} img{width:100%;border:1px solid #eee}
"""


def _png_figures(report: dict[str, Any], baseline: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of a history figure per flagged cell, when there is a history to draw."""
    hist = report.get("history") or {}
    flagged = [r for r in report["cells"] if r["flags"] and hist.get(r["cell"])]
    if not flagged:
        return []
    try:
        from harness.figures import figure_to_png_bytes, history_figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency; the module ships with the harness
        return []
    out = []
    for row in flagged:
        base = row["baseline"]
        ref = {"mean": base.get("mean"), "std": base.get("std"), "tolerance": row["tolerance"]} if base else None
        fig = history_figure(hist[row["cell"]], ref, f"{row['cell']} ({row['verdict']})")
        out.append((f"{row['cell']}: " + "; ".join(f["kind"] for f in row["flags"]),
                    base64.b64encode(figure_to_png_bytes(fig)).decode()))
    return out


def html_report(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """One self-contained page: inline CSS, HTML tables, figures as base64 PNG; no script, nothing fetched."""
    esc = html.escape
    verdict = "regression" if report["exit_code"] == EXIT_REGRESSION else "clean"
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>{esc(_headline(report))} - suite {esc(report['suite'])}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>Nightly regression report: suite {esc(report['suite'])}</h1>",
             f"<div class='banner {verdict}'>{esc(_headline(report))} (exit {report['exit_code']})</div><dl>"]
    for name, text in _sides(report):
        parts.append(f"<dt>{esc(name)}</dt><dd>{esc(text)}</dd>")
    parts.append(f"<dt>rule</dt><dd>{esc(_tolerance_line(report))}</dd>")
    parts.append("<dt>cells</dt><dd>" + esc(", ".join(
        f"{v} {k}" for k, v in sorted(report["counts"].items(), key=lambda kv: VERDICT_ORDER.index(kv[0])))) + "</dd>")
    for note in report["notes"]:
        parts.append(f"<dt>note</dt><dd>{esc(note)}</dd>")
    parts.append("</dl>")
    flagged = [r for r in report["cells"] if r["flags"]]
    if flagged:
        parts.append("<h2>Flagged cells (largest first)</h2><table><tr><th>cell</th><th>verdict</th><th>why</th></tr>")
        for row in flagged:
            why = "<br>".join(f"<b>{esc(f['kind'])}</b>: {esc(f['message'])}" for f in row["flags"])
            parts.append(f"<tr class='{row['verdict']}'><td>{esc(row['cell'])}</td>"
                         f"<td class='v {row['verdict']}'>{esc(row['verdict'])}</td><td>{why}</td></tr>")
        parts.append("</table>")
    figures = _png_figures(report, baseline)
    if figures:
        parts.append("<h2>History of the flagged cells</h2><div class='figures'>")
        for caption, data in figures:
            parts.append(f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("<h2>All cells (largest changes first)</h2><table><tr>")
    rows = _table_rows(report)
    headers = list(rows[0]) if rows else []
    parts.append("".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
    numeric = {"baseline", "now", "Δ", "tolerance", "img/s", "peak MiB", "wall s/trial"}
    for row, cells in zip(report["cells"], rows):
        tds = []
        for h in headers:
            cls = " class='num'" if h in numeric else (f" class='v {row['verdict']}'" if h == "verdict" else "")
            tds.append(f"<td{cls}>{esc(cells[h])}</td>")
        parts.append(f"<tr class='{row['verdict']}'>" + "".join(tds) + "</tr>")
    parts.append("</table>")
    if report.get("history"):
        parts.append("<h2>History</h2><pre>" + esc("\n".join(history_lines(report["history"], report_bases(report))))
                     + "</pre>")
    parts.append(f"<p class='notes'>written {esc(report['created'])} by harness regress</p></body></html>")
    return "\n".join(parts)


def write_reports(report: dict[str, Any], folder: Path, baseline: dict[str, Any] | None = None) -> dict[str, Path]:
    """``report.md``, ``report.json`` and ``report.html`` in ``folder`` (made as needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "report.md", "json": folder / "report.json", "html": folder / "report.html"}
    atomic_write_json(paths["json"], report)
    paths["markdown"].write_text(markdown_report(report))
    paths["html"].write_text(html_report(report, baseline))
    return paths


def failure_report(suite: str, message: str) -> dict[str, Any]:
    """The report of a comparison that could not be made (exit 2)."""
    return {"kind": "harness-regression-report", "schema": REPORT_SCHEMA, "suite": suite,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "exit_code": EXIT_CANNOT_COMPARE,
            "verdict": "could not compare", "message": message}


def write_failure_report(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "report.md", "json": folder / "report.json", "html": folder / "report.html"}
    atomic_write_json(paths["json"], report)
    text = f"could not compare (exit 2): {report['message']}"
    paths["markdown"].write_text(f"# Nightly regression report: suite {report['suite']}\n\n**{text}**\n")
    paths["html"].write_text(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>could not compare"
                             f"</title><style>{CSS}</style></head><body><h1>Nightly regression report: suite "
                             f"{html.escape(report['suite'])}</h1><div class='banner regression'>"
                             f"{html.escape(text)}</div></body></html>")
    return paths


# ------------------------------------------------------------------------------------------------- the whole step
@dataclass
class Outcome:
    exit_code: int
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def regress(suite: Suite, results: Path, baseline_file: Path, run_id: str | None = "latest",
            methods: list[str] | None = None, tasks: list[str] | None = None, tol: Tolerances = Tolerances(),
            report_dir: Path | None = None, since: datetime | None = None) -> Outcome:
    """Compare run ``run_id`` of ``suite`` with the baseline file, write the reports (when ``report_dir``) and
    return the exit code. Raises HarnessError (exit 2) when there is nothing to compare."""
    tol = tol.check()
    methods = methods or suite.methods
    tasks = tasks or suite.tasks
    baseline = load_baseline(baseline_file, suite)
    baseline["file"] = str(baseline_file)
    store, run = records_source(results, suite, run_id)
    report = compare(suite, baseline, store, run, methods, tasks, tol)
    flagged = [row["cell"] for row in report["cells"] if row["flags"]]
    if since is not None or flagged:
        keys = None if since is not None else flagged
        hist = history(suite, results, methods, tasks, since=since, keys=keys)
        report["history"] = {k: v for k, v in hist.items() if since is not None or k in flagged}
    paths = write_reports(report, report_dir, baseline) if report_dir is not None else {}
    return Outcome(report["exit_code"], report, paths)


def summary_lines(outcome: Outcome) -> list[str]:
    """What ``harness regress`` prints: the verdict, both sides, the flagged cells, where the reports are."""
    report = outcome.report
    lines = [f"{_headline(report)} (exit {report['exit_code']})"]
    lines += [f"  {name}: {text}" for name, text in _sides(report)]
    lines.append(f"  rule: {_tolerance_line(report)}")
    for row in report["cells"]:
        if row["flags"]:
            lines.append(f"  {row['verdict']}: {row['cell']}: "
                         + "; ".join(f"{f['kind']}: {f['message']}" for f in row["flags"]))
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    for kind, path in outcome.paths.items():
        lines.append(f"  {kind}: {path}")
    return lines


class ReportJob:
    """The nightly report as a job (``harness nightly --executor slurm``): runs after the night's array ends
    (``afterany``), compares, writes the reports. It returns the exit code when the night is clean, and raises
    when it regressed or could not compare, so the job's state (COMPLETED / FAILED) says which."""

    def __init__(self, suite: Suite, results: Path, run_id: str, baseline: Path, report_dir: Path,
                 tol: Tolerances, methods: list[str], tasks: list[str], since: datetime | None = None):
        self.suite, self.results, self.run_id = suite, Path(results).resolve(), run_id
        self.baseline, self.report_dir = Path(baseline).resolve(), Path(report_dir).resolve()
        self.tol, self.methods, self.tasks, self.since = tol, methods, tasks, since

    def __call__(self) -> int:
        outcome = run_report(self.suite, self.results, self.run_id, self.baseline, self.report_dir, self.tol,
                             self.methods, self.tasks, self.since)
        for line in outcome_lines(outcome):
            print(line, flush=True)
        if outcome.exit_code != EXIT_CLEAN:
            raise RuntimeError(f"nightly {self.suite.name} run {self.run_id}: "
                               + ("regression" if outcome.exit_code == EXIT_REGRESSION else "could not compare")
                               + f" (exit {outcome.exit_code}); report: {self.report_dir / 'report.md'}")
        return outcome.exit_code


def run_report(suite: Suite, results: Path, run_id: str, baseline: Path, report_dir: Path, tol: Tolerances,
               methods: list[str], tasks: list[str], since: datetime | None = None) -> Outcome:
    """:func:`regress` for a night: a comparison that cannot be made still writes a report (saying why, exit 2)."""
    try:
        return regress(suite, results, baseline, run_id, methods, tasks, tol, report_dir, since)
    except HarnessError as err:
        report = failure_report(suite.name, str(err))
        return Outcome(EXIT_CANNOT_COMPARE, report, write_failure_report(report, report_dir))


def outcome_lines(outcome: Outcome) -> list[str]:
    if outcome.report.get("exit_code") == EXIT_CANNOT_COMPARE and "cells" not in outcome.report:
        return [f"could not compare (exit 2): {outcome.report['message']}"] + [
            f"  {kind}: {path}" for kind, path in outcome.paths.items()]
    return summary_lines(outcome)
