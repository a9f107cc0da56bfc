"""One self-contained HTML page per suite (``harness report``): what a person reads before trusting a table.

The page holds the table (as ``harness table`` computes it, with each reference source's numbers beside ours where
the source covers the suite's tasks), the per-task and trade-off figures, the final trials' learning curves per
cell (small multiples), the search's learning rate x weight decay grid per cell with the winner marked, each
cell's stale, missing, diverged and failed counts, and where the counted records came from (commits, devices,
package versions). No script, nothing fetched: CSS inline, figures as base64 PNG.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.plan import Cell, cell_state
from harness.store import Store
from harness.sweep import Suite

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:26px 0 8px} p.note{font-size:13px;color:#555}
table{border-collapse:collapse;font-size:13px;margin:6px 0} th,td{border:1px solid #ddd;padding:4px 8px}
th{background:#f4f4f4;text-align:left} td{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{text-align:left} .figures{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0}
figcaption{font-size:13px;color:#444} img{border:1px solid #eee;max-width:100%}
"""


def _png(fig: Any) -> str:
    from harness.figures import figure_to_png_bytes

    return base64.b64encode(figure_to_png_bytes(fig)).decode()


def _figure_html(caption: str, fig: Any) -> str:
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{_png(fig)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _csv_table(text: str) -> str:
    """A ``harness table --format csv`` text as an HTML table (first column as names)."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return "<p class='note'>no table</p>"
    out = ["<table><tr>" + "".join(f"<th>{html.escape(_header(h))}</th>" for h in rows[0]) + "</tr>"]
    for row in rows[1:]:
        cells = [f"<td class='name'>{html.escape(row[0])}</td>"] + [f"<td>{html.escape(v)}</td>" for v in row[1:]]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _header(column: str) -> str:
    """A csv column as the page shows it: a task's columns by its display name (``vtab-dtd_std`` -> ``DTD std``)."""
    from harness.api import TASKS
    from harness.table_render import task_label

    name, _, part = column.partition("_")
    while name not in TASKS and part:  # task names may hold '_' (vtab-clevr_count)
        head, _, part = part.partition("_")
        name = f"{name}_{head}"
    return f"{task_label(name)} {part}".strip() if name in TASKS else column


def covering_sources(tasks: list[str]) -> list[str]:
    """The reference sources that print a number for at least one of ``tasks`` (our task names)."""
    from harness.reference import load, sources

    return [source for source in sources() if set(load(source)["our_task"]) & set(tasks)]


def cell_counts(suite: Suite, store: Store, methods: list[str], tasks: list[str]) -> list[dict[str, Any]]:
    """Per cell: counted finals of planned, missing, diverged, failed and stale records, and why it is blocked."""
    rows = []
    for method in methods:
        for task in tasks:
            state = cell_state(suite, Cell(method, task), store, stale=True)
            counts = state.counts
            rows.append({"cell": f"{method}/{task}", "finals": f"{len(state.final_records)} of {state.n_finals}",
                         "missing": counts["pending"], "diverged": counts["diverged"], "failed": counts["failed"],
                         "stale": len(state.stale), "note": state.blocked})
    return rows


def provenance_rows(suite: Suite, store: Store, methods: list[str], tasks: list[str]) -> list[tuple[str, str]]:
    """(what, values with their record counts) over the counted final records."""
    seen: dict[str, Counter] = {"commit": Counter(), "device": Counter(), "host": Counter()}
    packages: dict[str, Counter] = {}
    for method in methods:
        for task in tasks:
            for record in cell_state(suite, Cell(method, task), store, stale=False).final_records:
                prov = record.get("provenance") or {}
                git = prov.get("git") or {}
                seen["commit"][str(git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")] += 1
                seen["device"][str(prov.get("device_name") or prov.get("device") or "unknown")] += 1
                seen["host"][str(prov.get("hostname") or "unknown")] += 1
                for name, version in (prov.get("packages") or {}).items():
                    packages.setdefault(name, Counter())[str(version)] += 1
    rows = [(what, ", ".join(f"{v} ({n})" for v, n in counter.most_common()) or "–") for what, counter in seen.items()]
    rows += [(name, ", ".join(f"{v} ({n})" for v, n in counter.most_common())) for name, counter in packages.items()]
    return rows


def curves_figure(suite: Suite, store: Store, methods: list[str], tasks: list[str]) -> Any | None:
    """Small multiples: one panel per cell (rows methods, columns tasks), the evaluation metric per epoch of each
    counted final trial (one line per seed). None when no final has a curve."""
    from harness.figures import new_figure
    from harness.table_render import task_label

    finals = {(m, t): cell_state(suite, Cell(m, t), store, stale=False).final_records for m in methods for t in tasks}
    if not any(r.get("curve") for records in finals.values() for r in records):
        return None
    fig = new_figure(2.2 * len(tasks) + 1, 1.7 * len(methods) + 0.6, layout="constrained")
    axes = fig.subplots(len(methods), len(tasks), squeeze=False, sharex=True)
    for i, method in enumerate(methods):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            for record in finals[(method, task)]:
                points = [(e["epoch"], e["eval"]) for e in record.get("curve") or [] if e.get("eval") is not None]
                if points:
                    ax.plot(*zip(*points), marker=".", linewidth=1, label=f"seed {record['spec']['seed']}")
            ax.set_title(f"{method} / {task_label(task)}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.supxlabel("epoch", fontsize=9)
    fig.supylabel("evaluation metric", fontsize=9)
    return fig


def search_figure(suite: Suite, store: Store, method: str, task: str) -> Any | None:
    """The search of one cell as a heat map: learning rate x weight decay, the validation metric in each square
    (blank: no record; 'div': diverged), the winner outlined. None for a cell without a two-axis search or whose
    search has no record yet."""
    import numpy as np
    from matplotlib.patches import Rectangle

    from harness.figures import new_figure
    from harness.table_render import task_label

    state = cell_state(suite, Cell(method, task), store, stale=False)
    points = [(s.spec.hparams.get("lr"), s.spec.hparams.get("weight_decay"), s) for s in state.search]
    if not any(s.record is not None for *_, s in points) or any(lr is None or wd is None for lr, wd, _ in points):
        return None
    lrs = sorted({p[0] for p in points}, reverse=True)
    wds = sorted({p[1] for p in points}, reverse=True)
    grid = np.full((len(lrs), len(wds)), np.nan)
    fig = new_figure(1.1 * len(wds) + 1.8, 0.45 * len(lrs) + 1.2, layout="constrained")
    ax = fig.subplots()
    labels = {}
    for lr, wd, slot in points:
        i, j = lrs.index(lr), wds.index(wd)
        if slot.record is not None and slot.record["status"] == "ok":
            grid[i, j] = float(slot.record["metrics"]["eval"])
            labels[(i, j)] = f"{grid[i, j]:.1f}"
        elif slot.state == "diverged":
            labels[(i, j)] = "div"
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (i, j), text in labels.items():
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white")
    winner = state.hparams if state.winner is not None else {}  # the winning search point's hyperparameters
    if winner.get("lr") in lrs and winner.get("weight_decay") in wds:
        i, j = lrs.index(winner["lr"]), wds.index(winner["weight_decay"])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(wds)), [f"{w:g}" for w in wds], fontsize=7)
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=7)
    ax.set_xlabel("weight decay", fontsize=8)
    ax.set_ylabel("lr", fontsize=8)
    ax.set_title(f"{method} / {task_label(task)}: search (winner outlined)", fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def suite_page(suite: Suite, store: Store, methods: list[str], tasks: list[str], source: str = "") -> str:
    """The page (see the module docstring); ``source`` says where the records were read (results folder, run)."""
    from harness.figures import task_bars, tradeoff
    from harness.reference import Comparison, reference_backbone
    from harness.table import build_table, suite_summary
    from harness.table_render import task_label

    esc = html.escape
    summary = suite_summary(suite, store, methods, tasks)
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>suite {esc(suite.name)}</title><style>{CSS}</style></head><body>",
             f"<h1>Suite {esc(suite.name)}</h1>",
             f"<p class='note'>{esc(suite.raw.get('description') or '')} · records: {esc(source)}"
             + (f" · overrides {esc(str(suite.overrides))}" if suite.overrides else "") + "</p>",
             "<h2>Table</h2>", _csv_table(build_table(suite, store, methods, tasks, fmt="csv"))]
    for ref in covering_sources(tasks):
        compared = Comparison(ref, backbone=reference_backbone(ref, suite.backbone["name"]))
        parts += [f"<h2>Beside {esc(ref)}</h2>",
                  _csv_table(build_table(suite, store, methods, tasks, fmt="csv", reference=compared))]
    parts += ["<h2>Figures</h2><div class='figures'>",
              _figure_html("per task: seed mean, seeds' std as error bars", task_bars(summary, methods, tasks)),
              _figure_html("mean over tasks against trainable parameters", tradeoff(summary, methods)), "</div>"]
    curves = curves_figure(suite, store, methods, tasks)
    if curves is not None:
        parts += ["<h2>Learning curves of the final trials</h2><div class='figures'>",
                  _figure_html("evaluation metric per epoch, one line per seed", curves), "</div>"]
    searches = [(f"{m}/{task_label(t)}", fig) for m in methods for t in tasks if (fig := search_figure(suite, store, m, t))]
    if searches:
        parts.append("<h2>Searches</h2><div class='figures'>")
        parts += [_figure_html(f"{key}: validation metric per lr x weight decay", fig) for key, fig in searches]
        parts.append("</div>")
    counts = cell_counts(suite, store, methods, tasks)
    parts.append("<h2>Cells</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in counts[0]) + "</tr>")
    for row in counts:
        parts.append("<tr>" + "".join(f"<td class='name'>{esc(str(v))}</td>" if k in ("cell", "note") else
                                      f"<td>{esc(str(v))}</td>" for k, v in row.items()) + "</tr>")
    parts.append("</table><h2>Provenance of the counted records</h2><table>")
    parts += [f"<tr><th>{esc(what)}</th><td class='name'>{esc(values)}</td></tr>"
              for what, values in provenance_rows(suite, store, methods, tasks)]
    parts.append(f"</table><p class='note'>written {datetime.now(timezone.utc).isoformat(timespec='seconds')} by "
                 "harness report</p></body></html>")
    return "\n".join(parts)


def write_suite_page(suite: Suite, store: Store, methods: list[str], tasks: list[str], folder: Path,
                     source: str = "") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{suite.name}.html"
    path.write_text(suite_page(suite, store, methods, tasks, source))
    return path
