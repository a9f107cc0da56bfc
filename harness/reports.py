"""The regression report: the whole step of ``harness regress`` (compare a run with the baseline, add the flagged
cells' history, write the reports) and its formats: ``report.json`` (the comparison itself), ``report.md``, a
self-contained ``report.html`` (tables, and history figures of the flagged cells inlined as base64 PNG) and the
lines the command prints. The comparison is :mod:`harness.regress`'.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.files import atomic_write_json
from harness.regress import (EXIT_CANNOT_COMPARE, EXIT_REGRESSION, REPORT_SCHEMA, VERDICT_ORDER, Tolerances,
                             finite_number, compare, history, load_baseline, records_source)
from harness.sweep import Suite


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
    paths = {}
    if report_dir is not None:
        from harness.suite_report import write_suite_page

        source = str(store.root) + (f" (run {run.run_id})" if run is not None else "")
        page = write_suite_page(suite, store, methods, tasks, Path(report_dir), source)
        report["suite_page"] = page.name  # beside the report: the night's table, curves and provenance
        paths = {**write_reports(report, report_dir, baseline), "suite_page": page}
    return Outcome(report["exit_code"], report, paths)


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


def report_bases(report: dict[str, Any]) -> dict[str, Any]:
    """Cell key -> the baseline's cell, from a report's rows."""
    return {row["cell"]: row["baseline"] for row in report.get("cells", [])}


def _fmt(value: Any, spec: str = ".2f") -> str:
    number = finite_number(value)
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
            "flags": ", ".join(f["kind"] for f in row["flags"]),
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
        ("this run", f"run {run.get('run_id')}, commit {_commit(run.get('git') or {})}, started {run.get('time')}"
                     if run.get("run_id") else
                     f"the records in {run.get('folder')} (not a run: no start time or commit of their own; "
                     "each record carries its commit)"),
    ]


def _tolerance_line(report: dict[str, Any]) -> str:
    tol = report["tolerances"]
    drop = (f"a drop counts beyond max({tol['abs_tol']:g}, {tol['k']:g} × the baseline's seed std) points"
            if tol["abs_tol"] is not None and tol["k"] is not None else "drops are not checked")
    cost = (f"throughput lower by more than max({tol['cost_tol']:.0%}, {tol['k']:g} × the spread of the baseline's "
            f"own trials), peak memory higher by more than {tol['cost_tol']:.0%}"
            if tol["cost_tol"] is not None and tol["k"] is not None else "cost not checked (--cost-tol inf)")
    return f"{drop}; {cost}; flaky cells never fail"


def cost_lines(report: dict[str, Any]) -> list[str]:
    """Per cost measure, on how many cells it was compared and why not on the others (the report's header)."""
    lines = []
    for measure, counts in (report.get("cost") or {}).items():
        total = counts["compared"] + sum(counts["not_compared"].values())
        if not total:
            continue
        text = f"{measure} compared on {counts['compared']} of {total} cell(s)"
        reasons = [f"{n} on accuracy only: {why}" for why, n in counts["not_compared"].items()]
        lines.append(text + ("; " + "; ".join(reasons) if reasons else ""))
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    from tabulate import tabulate

    lines = [f"# Nightly regression report: suite {report['suite']}", "", f"**{_headline(report)}** "
             f"(exit {report['exit_code']})", ""]
    lines += [f"- {name}: {text}" for name, text in _sides(report)]
    lines += [f"- rule: {_tolerance_line(report)}", "- cells: " + ", ".join(
        f"{v} {k}" for k, v in sorted(report["counts"].items(), key=lambda kv: VERDICT_ORDER.index(kv[0])))]
    lines += [f"- cost: {line}" for line in cost_lines(report)]
    lines += [f"- note: {note}" for note in report["notes"]]
    if report.get("suite_page"):
        lines.append(f"- suite page: [{report['suite_page']}]({report['suite_page']}): the night's table, learning "
                     "curves and provenance")
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
    for line in cost_lines(report):
        parts.append(f"<dt>cost</dt><dd>{esc(line)}</dd>")
    for note in report["notes"]:
        parts.append(f"<dt>note</dt><dd>{esc(note)}</dd>")
    if report.get("suite_page"):
        parts.append(f"<dt>suite page</dt><dd><a href='{esc(report['suite_page'])}'>{esc(report['suite_page'])}</a>: "
                     "the night's table, learning curves and provenance</dd>")
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


def summary_lines(outcome: Outcome) -> list[str]:
    """What ``harness regress`` prints: the verdict, both sides, the flagged cells, where the reports are."""
    report = outcome.report
    lines = [f"{_headline(report)} (exit {report['exit_code']})"]
    lines += [f"  {name}: {text}" for name, text in _sides(report)]
    lines.append(f"  rule: {_tolerance_line(report)}")
    lines += [f"  cost: {line}" for line in cost_lines(report)]
    for row in report["cells"]:
        if row["flags"]:
            lines.append(f"  {row['verdict']}: {row['cell']}: "
                         + "; ".join(f"{f['kind']}: {f['message']}" for f in row["flags"]))
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    for kind, path in outcome.paths.items():
        lines.append(f"  {kind}: {path}")
    return lines


def outcome_lines(outcome: Outcome) -> list[str]:
    if outcome.report.get("exit_code") == EXIT_CANNOT_COMPARE and "cells" not in outcome.report:
        return [f"could not compare (exit 2): {outcome.report['message']}"] + [
            f"  {kind}: {path}" for kind, path in outcome.paths.items()]
    return summary_lines(outcome)
