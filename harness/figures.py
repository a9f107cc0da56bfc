"""Figures computed from the same summary the table prints (:func:`harness.table.suite_summary`), never from the
records directly: per-task bars with the seeds' spread, the accuracy / trainable-parameter trade-off PEFT papers
draw, and a cell's value night after night against its baseline (for the nightly regression report).

matplotlib is imported inside the functions (``harness --help`` must not pay for it), and figures are plain
:class:`matplotlib.figure.Figure` objects on the Agg canvas: no pyplot state, no GUI backend, nothing to close.
"""

from __future__ import annotations

import io
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

#: one colour per method, the same in every figure of a suite
PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
           "#64B5CD")
DPI = 150


def new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    """A figure on the Agg canvas (no pyplot state), at the size in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _methods(summary: dict[str, Any], methods: list[str] | None) -> list[str]:
    if methods:
        return list(methods)
    if summary.get("methods"):
        return list(summary["methods"])
    return list(dict.fromkeys(m for m, _ in summary["cells"]))


def _tasks(summary: dict[str, Any], tasks: list[str] | None) -> list[str]:
    ordered = [t for members in summary.get("groups", {}).values() for t in members]
    ordered = ordered or list(summary.get("tasks") or dict.fromkeys(t for _, t in summary["cells"]))
    return [t for t in ordered if t in tasks] if tasks else ordered


def _colours(methods: list[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


def task_bars(summary: dict[str, Any], methods: list[str] | None = None, tasks: list[str] | None = None,
              title: str | None = None, ncols: int | None = None, ylabel: str = "test metric (%)") -> Figure:
    """One panel per task (in the table's group order), one bar per method at its seed mean with the seeds' std as
    error bar. A missing cell leaves its slot empty ("–"); a cell with fewer seeds than the protocol's is hatched.
    Each panel's y axis is zoomed to its bars (methods often differ by a point or two), starting at 0 only when
    the values come near it. A bar's height is exactly the table's cell mean."""
    from harness.table_render import task_label  # the paper's short names (VTAB's Clevr-Count)

    methods, tasks = _methods(summary, methods), _tasks(summary, tasks)
    colours, cells, n_seeds = _colours(methods), summary["cells"], summary.get("n_seeds") or 0
    ncols = ncols or min(len(tasks), 4) or 1
    nrows = max(1, math.ceil(len(tasks) / ncols))
    panel_w = max(2.4, 0.3 * len(methods) + 0.9)
    width = max(panel_w * ncols, 5.0)
    fig = new_figure(width, 2.3 * nrows + 1.0, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    partial = zoomed = False
    for index, ax in enumerate(axes.flat):
        if index >= len(tasks):
            ax.set_visible(False)
            continue
        task = tasks[index]
        lows, highs = [], []
        for x, method in enumerate(methods):
            cell = cells.get((method, task))
            if cell is None:
                ax.text(x, 0.03, "n/a", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=6,
                        color="0.4", rotation=90)
                continue
            short = n_seeds and cell["n"] < n_seeds
            partial = partial or bool(short)
            std = cell["std"] if cell["n"] > 1 else 0.0
            ax.bar(x, cell["mean"], width=0.75, color=colours[method], edgecolor="white", linewidth=0.5,
                   hatch="///" if short else None, label=method, gid=f"{method}/{task}")
            if cell["n"] > 1:
                ax.errorbar(x, cell["mean"], yerr=std, color="0.15", capsize=2.5, linewidth=1.0, capthick=1.0)
            lows.append(cell["mean"] - std)
            highs.append(cell["mean"] + std)
        ax.set_title(task_label(task), fontsize=9)
        ax.set_xticks([])
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", color="0.9", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if highs:
            low, high = min(lows), max(highs)
            pad = max(1.0, 0.12 * (high - low))
            bottom = 0.0 if low - 3 * pad <= 0 else low - 3 * pad
            ax.set_ylim(bottom, high + pad)
            zoomed = zoomed or bottom > 0
        if index % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colours[m], label=m) for m in methods]
    if partial:
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///", label="fewer seeds"))
    legend_cols = min(len(handles), max(1, int(width / 1.4)))
    # the title heads the legend: a suptitle and an "outside" legend collide under constrained layout
    fig.legend(handles=handles, loc="outside upper center", ncol=legend_cols, fontsize=8, frameon=False,
               title=title, title_fontproperties={"size": 10})
    fig.supxlabel("bars: mean over seeds; error bars: std over seeds" + ("; y axes zoomed (not from 0)" if zoomed
                  else ""), fontsize=7, color="0.35")
    fig.get_layout_engine().set(w_pad=0.06, h_pad=0.08, wspace=0.04, hspace=0.06)
    return fig


def tradeoff(summary: dict[str, Any], methods: list[str] | None = None, title: str | None = None) -> Figure:
    """Mean accuracy over the tasks against trainable parameters (log x; the task head included, as PEFT papers
    count "# params"), one labelled point per method, with the Pareto front (no method both smaller and better)
    dashed. A method without every task's cell, or without a parameter count, has no point: it is named below
    the axes instead."""
    methods = _methods(summary, methods)
    colours = _colours(methods)
    points, left_out = [], []
    for method in methods:
        mean = summary["means"].get((method, "mean"))
        cost = summary["cost"].get(method) or {}
        params = _number(cost.get("trainable"))
        params = params + (_number(cost.get("head")) or 0.0) if params is not None else None
        if mean is None or not params:
            left_out.append(method)
            continue
        points.append((params / 1e6, mean, method))
    fig = new_figure(6.4, 4.4)
    ax = fig.add_subplot()
    for x, y, method in points:
        ax.scatter([x], [y], s=46, color=colours[method], edgecolor="0.2", linewidth=0.6, zorder=3, label=method)
    front = _pareto(points)
    if len(front) > 1:
        line, = ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="--", color="0.6", linewidth=1.0,
                        zorder=2)
        ax.legend([line], ["Pareto front"], loc="lower right", fontsize=7, frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters incl. head (M, log scale)", fontsize=9)
    ax.set_ylabel(f"mean accuracy over {len(_tasks(summary, None))} tasks (%)", fontsize=9)
    ax.grid(True, which="major", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.set_xlim(min(xs) / 2.5, max(xs) * 2.5)
        span = max(ys) - min(ys)
        pad = max(1.0, 0.15 * span)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    else:
        ax.text(0.5, 0.5, "no method has a value on every task", transform=ax.transAxes, ha="center", color="0.4")
    if title:
        ax.set_title(title, fontsize=10)
    if left_out:
        fig.text(0.01, 0.01, "not shown (missing cells or parameter counts): " + ", ".join(left_out),
                 fontsize=7, color="0.4", ha="left", va="bottom")
    fig.subplots_adjust(left=0.12, right=0.97, top=0.92 if title else 0.96, bottom=0.17 if left_out else 0.13)
    _label_points(fig, ax, points)
    return fig


def history_figure(nights: list[dict], baseline: dict | None, title: str) -> Figure:
    """A cell's value per night: the mean with the seeds' std as error bar (``run_id``, ``time`` as an ISO string,
    ``mean``, ``std``, ``n`` per night), the baseline's mean as a horizontal line and, when the baseline has a
    ``tolerance``, the band mean ± tolerance; nights outside the band are drawn red. A night without a mean (the
    cell failed) is drawn as a grey x on the axis."""
    from matplotlib import dates as mdates

    fig = new_figure(7.0, 3.4)
    ax = fig.add_subplot()
    nights = sorted(nights, key=lambda n: _when(n["time"]))
    low = high = None
    if baseline is not None and baseline.get("mean") is not None:
        ref = float(baseline["mean"])
        tol = baseline.get("tolerance")
        if tol is not None:
            low, high = ref - float(tol), ref + float(tol)
            ax.axhspan(low, high, color="#4C72B0", alpha=0.12, linewidth=0,
                       label=f"baseline ± {float(tol):.2f} (tolerance)")
        ax.axhline(ref, color="#4C72B0", linestyle="--", linewidth=1.2, label=f"baseline {ref:.1f}")
    ok = [n for n in nights if _number(n.get("mean")) is not None]
    failed = [n for n in nights if _number(n.get("mean")) is None]
    for night in ok:
        mean, std = float(night["mean"]), _number(night.get("std"))
        outside = low is not None and not (low <= mean <= high)
        colour = "#C44E52" if outside else "0.15"
        ax.errorbar([_when(night["time"])], [mean], yerr=[std] if std and (night.get("n") or 0) > 1 else None,
                    fmt="o", color=colour, markersize=4.5, capsize=2.5, linewidth=1.0, zorder=3)
    if len(ok) > 1:
        ax.plot([_when(n["time"]) for n in ok], [float(n["mean"]) for n in ok], color="0.55", linewidth=0.8,
                zorder=2)
    if failed:
        ax.plot([_when(n["time"]) for n in failed], [0.02] * len(failed), "x", color="0.5", markersize=6,
                transform=ax.get_xaxis_transform(), label="no value", clip_on=False)
    if not nights:
        ax.text(0.5, 0.5, "no nights recorded", transform=ax.transAxes, ha="center", color="0.4")
    else:
        locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        if len({_when(n["time"]) for n in nights}) == 1:  # one night: give the axis a day's width
            only = mdates.date2num(_when(nights[0]["time"]))
            ax.set_xlim(only - 0.5, only + 0.5)
    values = [float(n["mean"]) for n in ok] + [v for v in (low, high) if v is not None]
    if values:
        pad = max(0.5, 0.15 * (max(values) - min(values)))
        ax.set_ylim(min(values) - pad, max(values) + pad)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("value", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(axis="y", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False, loc="best")
    fig.subplots_adjust(left=0.1, right=0.98, top=0.88, bottom=0.18)
    return fig


def figure_to_png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (for a report that embeds it)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def save(fig: Figure, path_stem: str | Path) -> list[Path]:
    """Write ``<path_stem>.png`` and ``<path_stem>.pdf`` (folders made as needed); returns the two paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_name(f"{stem.name}.{ext}")
        fig.savefig(path, format=ext, dpi=DPI)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------- helpers
def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _when(text: str) -> datetime:
    """An ISO time as a naive UTC datetime (aware and naive times may mix in a history; 'Z' is accepted)."""
    when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return when.astimezone(timezone.utc).replace(tzinfo=None) if when.tzinfo else when


def _pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both axes (fewer parameters and higher accuracy), by parameters."""
    front, best = [], -math.inf
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


def _label_points(fig: Figure, ax, points: list[tuple[float, float, str]]) -> None:
    """Name each point next to it, trying a few offsets so that labels overlap neither each other nor the points
    (greedy, in display space; enough for the ten-odd methods of a suite)."""
    renderer = fig.canvas.get_renderer()
    marker = 5.0  # half a marker, in points
    dots = [ax.transData.transform((x, y)) for x, y, _ in points]
    placed = []
    scale = fig.dpi / 72.0
    for (x, y, method), dot in sorted(zip(points, dots), key=lambda item: item[0][0]):
        candidates = [(7, 4, "left", "bottom"), (7, -4, "left", "top"), (-7, 4, "right", "bottom"),
                      (-7, -4, "right", "top"), (0, 8, "center", "bottom"), (0, -8, "center", "top"),
                      (12, 14, "left", "bottom"), (12, -14, "left", "top"), (-12, 14, "right", "bottom"),
                      (-12, -14, "right", "top")]
        chosen = None
        for dx, dy, ha, va in candidates:
            text = ax.annotate(method, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                               fontsize=8, color="0.1")
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            axes_box = ax.get_window_extent(renderer)
            clash = any(box.overlaps(other) for other in placed)
            clash = clash or any(box.x0 - marker * scale < d[0] < box.x1 + marker * scale
                                 and box.y0 - marker * scale < d[1] < box.y1 + marker * scale
                                 for d, p in zip(dots, points) if p[2] != method)
            clash = clash or box.x0 < axes_box.x0 or box.x1 > axes_box.x1 or box.y1 > axes_box.y1
            if not clash or (dx, dy) == candidates[-1][:2]:
                chosen = (text, box)
                if clash:  # nothing fits: keep the first candidate rather than the last
                    text.remove()
                    dx, dy, ha, va = candidates[0]
                    text = ax.annotate(method, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha,
                                       va=va, fontsize=8, color="0.1")
                    chosen = (text, text.get_window_extent(renderer))
                break
            text.remove()
        placed.append(chosen[1])
