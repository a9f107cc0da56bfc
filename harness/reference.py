"""Reference numbers: the published tables (TOAST's, VPT's, V-PETL Bench's) transcribed as tidy CSVs under ``results/reference/``,
one file per source (``<source>.csv``), and the one place that maps the papers' names to ours.

Each CSV row is one printed number: ``source, table, benchmark, backbone, method, task, metric, value, params_m,
flops_rel, note``. ``method`` and ``task`` are spelled as the paper prints them (so ``harness reference show`` reads
like the PDF); :data:`METHOD_NAMES` and :data:`TASK_NAMES` translate them. A paper's average columns are rows too, and
map to our table's mean columns (``mean``, ``<group>-mean``), so tests recompute them from the transcribed cells. A
``note`` starting with ``paper-inconsistent:`` documents a number the paper itself contradicts (an average that does
not match its cells, one cell printed differently in two tables).

``harness table --reference SOURCE`` compares a suite's table with a source: :class:`Comparison`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import TASKS
from harness.errors import HarnessError, UnknownNameError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: the committed transcriptions; HARNESS_REFERENCE_DIR points elsewhere (tests, a private copy)
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "results" / "reference"
COLUMNS = ("source", "table", "benchmark", "backbone", "method", "task", "metric", "value", "params_m", "flops_rel",
           "note")
#: a note that documents the paper contradicting itself starts with this
INCONSISTENT = "paper-inconsistent:"
MISSING = "–"

#: paper method name (as printed, any source) -> our method name. Unmapped names stay as printed.
METHOD_NAMES: dict[str, str] = {
    "Linear": "linear",
    "Fine-tune": "finetune",
    "Full": "finetune",  # VPT paper
    "Fine-tune (ViT-L)": "finetune",  # TOAST Table 10; its backbone column says ViT-L
    "Alpaca": "finetune",  # TOAST Tables 4/14: Alpaca is LLaMA-7B fully fine-tuned
    # TOAST's text (section 4) describes its VPT baseline as deep prompts ("the input as well as each intermediate
    # layer"); its code had deep prompts disabled until after the paper (docs/protocol.md §4.1, §11)
    "VPT": "vpt-deep",
    "VPT-deep": "vpt-deep",
    "VPT-shallow": "vpt-shallow",
    "LoRA": "lora",
    "TOAST": "toast",
    "TOAST-Lite": "toast-lite",
    "TOAST-Early": "toast-early",
    "TOAST-Late": "toast-late",
    "w/o pre-tuning": "toast-nopretune",  # TOAST Table 8 ablations
    "w/o token att": "toast-notoken",
    "w/o channel att": "toast-nochannel",
    # V-PETL Bench README (vpetl-bench): its FGVC and VTAB-1k tables' row names
    "Full fine-tuning": "finetune",
    "Linear probing": "linear",
    "VPT-Shallow": "vpt-shallow",
    "VPT-Deep": "vpt-deep",
    "BitFit": "bitfit",
    "Adapter": "adapter",
    "AdaptFormer": "adaptformer",
    "SSF": "ssf",
}

_FGVC = {"CUB": "fgvc-cub", "Bird": "fgvc-nabirds", "Birds": "fgvc-nabirds", "NABirds": "fgvc-nabirds",
         "Flower": "fgvc-flowers", "Flowers": "fgvc-flowers", "Dog": "fgvc-dogs", "Dogs": "fgvc-dogs",
         "Car": "fgvc-cars", "Cars": "fgvc-cars",
         "Avg": "mean", "Mean": "mean", "FGVC Acc": "mean", "FGVC Avg Acc": "mean",
         # V-PETL Bench README
         "CUB-200-2011": "fgvc-cub", "Oxford Flowers": "fgvc-flowers", "Stanford Dogs": "fgvc-dogs",
         "Stanford Cars": "fgvc-cars"}
_VTAB = {
    # TOAST paper (Tables 2, 3, 12, 13)
    "CIFAR100": "cifar", "Caltech": "caltech101", "EuroSAT": "eurosat", "Flowers": "oxford_flowers102",
    "Camelyon": "patch_camelyon", "SUN": "sun397", "DTD": "dtd", "Pet": "oxford_iiit_pet", "SVHN": "svhn",
    "Diabetes": "diabetic_retinopathy", "CLEVR-distance": "clevr_dist", "CLEVR-dis": "clevr_dist",
    "CLEVR-count": "clevr_count", "CLEVR-cnt": "clevr_count", "Kitti": "kitti", "Dmlab": "dmlab",
    "NORB-azi": "smallnorb_azi", "NORB-ele": "smallnorb_ele", "dSprites-pos": "dsprites_loc",
    "dSprites-ori": "dsprites_ori",
    # VPT paper (its tables' column names, abbreviated as its Table 1 prints them)
    "cifar": "cifar", "caltech": "caltech101", "dtd": "dtd", "flowers": "oxford_flowers102",
    "pets": "oxford_iiit_pet", "svhn": "svhn", "sun": "sun397", "camelyon": "patch_camelyon", "eurosat": "eurosat",
    "resisc": "resisc45", "retino": "diabetic_retinopathy", "clevr-count": "clevr_count", "clevr-dist": "clevr_dist",
    "dmlab": "dmlab", "kitti": "kitti", "dspr-loc": "dsprites_loc", "dspr-ori": "dsprites_ori",
    "snorb-azi": "smallnorb_azi", "snorb-ele": "smallnorb_ele",
    # V-PETL Bench README (its VTAB table's header; EuroSAT as TOAST's)
    "CIFAR-100": "cifar", "Caltech101": "caltech101", "DTD": "dtd", "Flowers102": "oxford_flowers102",
    "Pets": "oxford_iiit_pet", "SVHN": "svhn", "Sun397": "sun397", "Patch Camelyon": "patch_camelyon",
    "Resisc45": "resisc45", "Retinopathy": "diabetic_retinopathy", "Clevr/count": "clevr_count",
    "Clevr/distance": "clevr_dist", "DMLab": "dmlab", "KITTI/distance": "kitti", "dSprites/loc": "dsprites_loc",
    "dSprites/ori": "dsprites_ori", "SmallNORB/azi": "smallnorb_azi", "SmallNORB/ele": "smallnorb_ele",
}
#: benchmark -> paper task (column) name -> our task name, or our table's mean column: ``mean`` (over all the
#: table's tasks) or ``<group>-mean``. Unmapped names (segmentation, Alpaca) stay as printed.
TASK_NAMES: dict[str, dict[str, str]] = {
    "fgvc": _FGVC,
    "alpaca": {"Avg": "mean", "Alpaca Score": "mean"},  # its categories (Generic, ...) are no tasks of ours
    "vtab-1k": {**{paper: f"vtab-{ours}" for paper, ours in _VTAB.items()},
                "Natural": "natural-mean", "Specialized": "specialized-mean", "Structured": "structured-mean",
                "Mean": "mean"},  # V-PETL Bench: the mean of all 19 tasks
}

#: source -> the backbone of its headline tables: what `harness table --reference` compares by default
DEFAULT_BACKBONE: dict[str, str] = {"toast-paper": "vit-b16-deit-in1k", "vpt-paper": "vit-b16-in21k",
                                    "vpetl-bench": "vit-b16-in21k"}
#: a suite's timm architecture (its backbone name before the tag) -> the reference sources' backbone label: a suite
#: on one of these is compared with the rows of that backbone (fgvc-convnext with Table 5, fgvc-vitl with Table 6)
SUITE_BACKBONES: dict[str, str] = {"convnext_base": "convnext-b", "vit_large_patch16_224": "vit-l16-in21k",
                                   "deit_base_patch16_224": "vit-b16-deit-in1k"}


def reference_backbone(source: str, timm_name: str) -> str | None:
    """The backbone label of ``source``'s rows a suite on ``timm_name`` is compared with: the architecture's
    (:data:`SUITE_BACKBONES`) when the source prints rows for it, else None (the source's default)."""
    label = SUITE_BACKBONES.get(str(timm_name).split(".", 1)[0])
    if label is None or label not in set(load(source)["backbone"]):
        return None
    return label


def our_method(name: str) -> str:
    return METHOD_NAMES.get(name, name)


def our_task(benchmark: str, name: str) -> str:
    return TASK_NAMES.get(benchmark, {}).get(name, name)


def is_mean(task: str) -> bool:
    """Whether ``task`` (one of our names) is a mean column: ``mean`` or ``<group>-mean``."""
    return task == "mean" or task.endswith("-mean")


def reference_dir() -> Path:
    return Path(os.environ.get("HARNESS_REFERENCE_DIR") or REFERENCE_DIR)


def sources() -> list[str]:
    return sorted(p.stem for p in reference_dir().glob("*.csv"))


def load(source: str) -> pd.DataFrame:
    """One source's rows, text as written (``value_text``), ``value``/``params_m``/``flops_rel`` as floats, and
    ``our_method``/``our_task`` added. An unknown source gets a did-you-mean."""
    import pandas as pd

    if source not in sources():
        raise UnknownNameError("reference source", source, sources())
    path = reference_dir() / f"{source}.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if tuple(frame.columns) != COLUMNS:
        raise HarnessError(f"{path}: columns {', '.join(frame.columns)}; expected {', '.join(COLUMNS)}")
    wrong = frame[frame["source"] != source]
    if len(wrong):
        raise HarnessError(f"{path}:{int(wrong.index[0]) + 2}: source '{wrong['source'].iloc[0]}', expected '{source}'")
    frame["value_text"] = frame["value"]
    for column in ("value", "params_m", "flops_rel"):
        frame[column] = pd.to_numeric(frame[column].where(frame[column] != ""), errors="raise")  # "" -> NaN
    frame["our_method"] = frame["method"].map(our_method)
    frame["our_task"] = [our_task(b, t) for b, t in zip(frame["benchmark"], frame["task"])]
    return frame


def tables(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["table"].unique(), key=_table_key)


def _table_key(table: str) -> tuple[int, str]:
    return (int(table), "") if table.isdigit() else (10**9, table)


def select_table(frame: pd.DataFrame, source: str, table: str) -> pd.DataFrame:
    known = tables(frame)
    if table not in known:
        raise HarnessError(f"{source} has no table '{table}'{did_you_mean(table, known)} (tables: {', '.join(known)})")
    return frame[frame["table"] == table]


def listing() -> str:
    """``harness reference ls``: every source's tables with what they hold."""
    from tabulate import tabulate

    rows = []
    for source in sources():
        frame = load(source)
        for table in tables(frame):
            part = frame[frame["table"] == table]
            rows.append({"source": source, "table": table,
                         "benchmark": ", ".join(part["benchmark"].unique()),
                         "backbone": ", ".join(part["backbone"].unique()),
                         "metric": ", ".join(part["metric"].unique()),
                         "methods": ", ".join(part["method"].unique()),
                         "columns": part["task"].nunique()})
    if not rows:
        return f"no reference numbers under {reference_dir()}"
    return tabulate(rows, headers="keys", tablefmt="simple", disable_numparse=True)


def show(source: str, table: str, fmt: str = "markdown", our_names: bool = False) -> str:
    """One printed table, methods x columns as in the paper (values as transcribed), and its notes."""
    import pandas as pd
    from tabulate import tabulate

    part = select_table(load(source), source, table)
    if fmt == "csv":
        return part[list(COLUMNS)].to_csv(index=False)
    task_col = "our_task" if our_names else "task"
    benchmarks = list(part["benchmark"].unique())
    labels = {m: our_method(m) if our_names else m for m in part["method"].unique()}
    taken = list(labels.values())
    for method, label in labels.items():  # two paper rows under one of our names: say which backbone
        if taken.count(label) > 1:
            labels[method] = f"{label} ({part.loc[part['method'] == method, 'backbone'].iloc[0]})"
    rows = []
    for method, label in labels.items():
        mine = part[part["method"] == method]
        row: dict[str, Any] = {"method": label}
        if part["flops_rel"].notna().any():
            flops = mine["flops_rel"].dropna()
            row["FLOPS (x ViT-B)"] = f"{flops.iloc[0]:g}x" if len(flops) else MISSING
        for benchmark in benchmarks:
            if part.loc[part["benchmark"] == benchmark, "params_m"].notna().any():
                params = mine.loc[mine["benchmark"] == benchmark, "params_m"].dropna()
                header = "# params (M)" + (f" {benchmark}" if len(benchmarks) > 1 else "")
                row[header] = f"{params.iloc[0]:g}" if len(params) else MISSING
        for task in part[task_col].unique():
            cell = mine[mine[task_col] == task]
            row[task] = cell["value_text"].iloc[0] if len(cell) else MISSING
        rows.append(row)
    title = (f"{source} Table {table}: {', '.join(benchmarks)}; metric {', '.join(part['metric'].unique())}; "
             f"backbone {', '.join(part['backbone'].unique())}")
    tablefmt = {"markdown": "pipe", "github": "github"}[fmt]
    text = title + "\n\n" + tabulate(pd.DataFrame(rows), headers="keys", tablefmt=tablefmt, showindex=False,
                                     disable_numparse=True)
    by_note: dict[str, list[str]] = {}
    for _, r in part[part["note"] != ""].iterrows():
        by_note.setdefault(r["note"], []).append(f"{labels[r['method']]} / {r[task_col]}")
    notes = [f"{'all cells' if len(cells) == len(part) else '; '.join(cells)}: {note}"
             for note, cells in by_note.items()]
    if notes:
        text += "\n\nnotes:\n" + "\n".join(f"  {n}" for n in notes)
    return text


@dataclass(frozen=True)
class PaperCell:
    value: float
    table: str
    text: str = ""  # as printed (keeps the paper's decimals)
    params_m: float | None = None


@dataclass(frozen=True)
class Comparison:
    """A source's numbers to print beside a table's cells (``harness table --reference``). Without ``table``, the
    rows of the source's default backbone (its headline ViT-B) from every table, the lowest table number winning
    when two tables print the same cell; with ``table``, that table's rows, its default-backbone rows winning."""

    source: str
    table: str | None = None
    #: the source's rows of this backbone instead of its default (:func:`reference_backbone`)
    backbone: str | None = None

    def cells(self, methods: list[str], groups: dict[str, list[str]]) -> dict[tuple[str, str], PaperCell]:
        """(our method, our table's column) -> the paper's number. Columns are task names, ``<group> (mean)`` and
        ``mean`` as :func:`harness.table.build_table` names them. A paper average is given for a mean column only
        when it averages exactly the column's tasks."""
        frame = load(self.source)
        default = self.backbone or DEFAULT_BACKBONE.get(self.source)
        if self.table is not None:
            frame = select_table(frame, self.source, self.table)
        elif default is not None:
            frame = frame[frame["backbone"] == default]
        all_tasks = {t for members in groups.values() for t in members}
        columns = {"mean": all_tasks}
        columns.update({f"{g}-mean": set(members) for g, members in groups.items() if g})
        frame = frame.assign(_order=[(b != default, _table_key(t), i)
                                     for i, (b, t) in enumerate(zip(frame["backbone"], frame["table"]))])
        out: dict[tuple[str, str], PaperCell] = {}
        for _, row in frame.sort_values("_order").iterrows():
            method, task = row["our_method"], row["our_task"]
            if method not in methods:
                continue
            if is_mean(task):
                if task not in columns or _mean_members(frame, row) != columns[task]:
                    continue
                column = "mean" if task == "mean" else f"{task[:-len('-mean')]} (mean)"
            elif task in all_tasks:
                column = task
            else:
                continue
            if (method, column) not in out:
                out[(method, column)] = PaperCell(float(row["value"]), row["table"], row["value_text"])
        # '# params (M)': the first printed for the method on a benchmark the compared cells come from
        benchmarks = set(frame.loc[frame["our_task"].isin(all_tasks), "benchmark"])
        printed = frame[frame["benchmark"].isin(benchmarks) & frame["params_m"].notna()].sort_values("_order")
        params = dict(zip(printed["our_method"][::-1], printed["params_m"][::-1]))  # the first wins
        return {key: replace(cell, params_m=None if key[0] not in params else float(params[key[0]]))
                for key, cell in out.items()}

    def describe(self, cells: dict[tuple[str, str], PaperCell]) -> str:
        used = sorted({c.table for c in cells.values()}, key=_table_key)
        where = f"Table {self.table}" if self.table else (f"Table{'s' if len(used) > 1 else ''} {', '.join(used)}"
                                                           if used else "no table")
        backbone = "" if self.table else f", backbone {self.backbone or DEFAULT_BACKBONE.get(self.source, 'any')}"
        return (f"paper: {self.source} {where}{backbone} (harness reference show {self.source} --table N); "
                f"Δ = ours − paper")


def _mean_members(frame: pd.DataFrame, row: pd.Series) -> set[str]:
    """Our tasks a paper's average row averages: the same table, backbone, method and benchmark's other cells
    (for a group mean, those of that group)."""
    same = frame[(frame["table"] == row["table"]) & (frame["backbone"] == row["backbone"])
                 & (frame["method"] == row["method"]) & (frame["benchmark"] == row["benchmark"])]
    members = {t for t in same["our_task"] if not is_mean(t) and t in TASKS}
    if row["our_task"] != "mean":
        group = row["our_task"][:-len("-mean")]
        members = {t for t in members if (TASKS.get(t).group or "") == group}
    return members


def our_columns(summary: dict[str, Any], method: str, tasks: list[str], groups: list[str]) -> dict[str, float | None]:
    """``method``'s values in a table summary (:func:`harness.table.summarize`), keyed as the text table's columns:
    task names, ``<group> (mean)``, ``mean``."""
    out: dict[str, float | None] = {}
    for task in tasks:
        cell = summary["cells"].get((method, task))
        out[task] = None if cell is None else cell["mean"]
    for group in groups:
        out[f"{group} (mean)"] = summary["means"].get((method, group))
    out["mean"] = summary["means"].get((method, "mean"))
    return out


def reference_rows(method: str, summary: dict[str, Any], tasks: list[str], groups: list[str],
                   paper: dict[tuple[str, str], PaperCell], blank: dict[str, str]) -> list[dict[str, Any]]:
    """The two rows a text table gets under ``method``'s: the paper's numbers (``↳ paper``) and ours minus the
    paper's (``↳ Δ``); a column without a paper number (or without ours, for Δ) shows MISSING. ``blank`` holds the
    cost columns' placeholders; the paper row's '# params (M)' is the paper's where it prints one."""
    ours = our_columns(summary, method, tasks, groups)
    paper_row: dict[str, Any] = {"method": "↳ paper"}
    delta_row: dict[str, Any] = {"method": "↳ Δ"}
    for column, mine in ours.items():
        cell = paper.get((method, column))
        paper_row[column] = MISSING if cell is None else cell.text or f"{cell.value:g}"
        delta_row[column] = MISSING if cell is None or mine is None else f"{mine - cell.value:+.1f}"
    for key, placeholder in blank.items():
        paper_row[key] = delta_row[key] = placeholder
    params = [c.params_m for (m, _), c in paper.items() if m == method and c.params_m is not None]
    if "# params (M)" in blank and params:
        paper_row["# params (M)"] = f"{params[0]:g}"
    return [paper_row, delta_row]


def reference_csv(method: str, summary: dict[str, Any], tasks: list[str], groups: list[str],
                  paper: dict[tuple[str, str], PaperCell]) -> dict[str, Any]:
    """The csv columns ``<column>_paper`` and ``<column>_delta`` (ours minus the paper's; empty where the paper has
    no number), for each task, group mean (``<group>_paper``) and ``mean``."""
    out: dict[str, Any] = {}
    for column, mine in our_columns(summary, method, tasks, groups).items():
        name = column[:-len(" (mean)")] if column.endswith(" (mean)") else column
        cell = paper.get((method, column))
        out[f"{name}_paper"] = None if cell is None else cell.value
        out[f"{name}_delta"] = None if cell is None or mine is None else mine - cell.value
    return out
