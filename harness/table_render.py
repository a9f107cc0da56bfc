"""How a computed table is laid out: the tasks' printed names, the long layout (a row per task, for terminals
narrower than a suite), and LaTeX (booktabs; VTAB's columns under Natural / Specialized / Structured). The numbers
come from :mod:`harness.table`; nothing here reads a record."""

from __future__ import annotations

from typing import Any

from harness.api import TASKS

#: a cell with no value; a cell that differs from ``--compare``'s method beyond the seeds' noise
MISSING = "–"
DIFFERS = "‡"

#: ``--layout``: a row per method (the papers') or a row per task; ``auto`` (the CLI's default): ``long`` when the
#: wide table would not fit the terminal
LAYOUTS = ("wide", "long")


def task_label(task: str) -> str:
    """What a table, figure or report prints for a task: its display name (:attr:`harness.api.Task.label`), or the
    name itself for a task the registry does not know."""
    return TASKS.get(task).label if task in TASKS else task


def column_labels(columns: list[str], groups: dict[str, list[str]]) -> dict[str, str]:
    """Printed header per column: a task's display name (its registry name where two tasks would print the same),
    the other columns as they are."""
    tasks = [t for members in groups.values() for t in members]
    shown = {t: task_label(t) for t in tasks}
    clashes = {label for label in shown.values() if list(shown.values()).count(label) > 1}
    return {c: (shown[c] if shown[c] not in clashes else c) if c in shown else c for c in columns}


def long_rows(rows: list[dict[str, Any]], columns: list[str],
              labels: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """The table turned a quarter: (header, body) with a row per value column (tasks, group means, mean, cost) and a
    column per row of the wide table (each method; with ``--reference`` its '↳ paper' and '↳ Δ' rows become
    '<method> paper' and '<method> Δ' columns)."""
    names, owner = [], ""
    for row in rows:
        name = str(row["method"])
        if name.startswith("↳ "):
            name = f"{owner} {name[2:]}"
        else:
            owner = name
        names.append(name)
    header = ["task", *names]
    body = [[labels[c], *[str(row.get(c, "")) for row in rows]] for c in columns[1:]]
    return header, body


def wide_fits(text: str, width: int) -> bool:
    """Whether every line of a rendered table fits ``width`` columns."""
    return max((len(line) for line in text.splitlines()), default=0) <= width


#: LaTeX's special characters, and the table's own marks, as pdflatex reads them (no package beyond booktabs)
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "#": r"\#", "%": r"\%", "&": r"\&", "_": r"\_", "$": r"\$",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "†": r"$^\dagger$", DIFFERS: r"$^\ddagger$", MISSING: "--", "<": r"$<$", ">": r"$>$",
                 "|": r"\textbar{}", "Δ": r"$\Delta$", "↳": r"$\hookrightarrow$", "−": r"$-$"}


def latex_escape(text: str) -> str:
    """``text`` as LaTeX source that typesets as ``text``; ``**x**`` (the best value's mark) becomes \\textbf."""
    if len(text) > 4 and text.startswith("**") and text.endswith("**"):
        return f"\\textbf{{{latex_escape(text[2:-2])}}}"
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex_table(rows: list[dict[str, Any]], columns: list[str], labels: dict[str, str],
                groups: dict[str, list[str]], footnotes: list[str], layout: str = "wide") -> str:
    """A booktabs tabular (\\usepackage{booktabs}); footnotes follow it as small text, for a table float.

    Wide: with more than one group the columns stand under their group's header (``\\multicolumn`` over the
    group's tasks and its mean, ``\\cmidrule`` under it: Natural / Specialized / Structured, as the paper's VTAB
    table), then the overall mean and the cost columns. Long: a row per task under a group heading row, each
    group's mean after its tasks, then the overall mean and the cost rows."""
    grouped = [g for g in groups if g and len(groups) > 1]
    mean_of = {f"{g} (mean)": g for g in grouped}
    names = [str(r["method"]) for r in rows]
    if layout == "long":
        lines = [f"\\begin{{tabular}}{{l{'c' * len(rows)}}}", "\\toprule",
                 " & ".join(["", *(latex_escape(n) for n in names)]) + r" \\", "\\midrule"]

        def line(column: str, label: str) -> str:
            return " & ".join([latex_escape(label), *(latex_escape(str(r.get(column, ""))) for r in rows)]) + r" \\"

        for group in grouped:
            title = latex_escape(group.capitalize())
            lines.append(f"\\multicolumn{{{len(rows) + 1}}}{{l}}{{\\textit{{{title}}}}} \\\\")
            lines += [line(t, labels[t]) for t in groups[group] if t in labels]
            if f"{group} (mean)" in labels:
                lines.append(line(f"{group} (mean)", "Mean"))
            lines.append("\\midrule")
        rest = [c for c in columns[1:] if c not in mean_of and not any(c in groups[g] for g in grouped)]
        lines += [line(c, "Mean" if c == "mean" and grouped else labels[c]) for c in rest]
        lines += ["\\bottomrule", "\\end{tabular}"]
    else:
        order = ["method"]
        spans: list[tuple[str, int, int]] = []  # (group, first column, last column), 1-based as LaTeX counts
        for group in grouped:
            members = [t for t in groups[group] if t in columns] + [c for c in columns if mean_of.get(c) == group]
            if members:
                spans.append((group, len(order) + 1, len(order) + len(members)))
                order += members
        order += [c for c in columns if c not in order]
        header = [latex_escape("Mean" if mean_of.get(c) or (c == "mean" and grouped) else labels[c]) for c in order]
        header[0] = latex_escape(labels["method"])
        lines = [f"\\begin{{tabular}}{{l{'c' * (len(order) - 1)}}}", "\\toprule"]
        if spans:
            cells, at = [], 1
            for group, first, last in spans:
                title = latex_escape(group.capitalize())
                cells += [""] * (first - at) + [f"\\multicolumn{{{last - first + 1}}}{{c}}{{{title}}}"]
                at = last + 1
            cells += [""] * (len(order) + 1 - at)
            lines.append(" & ".join(cells) + r" \\")
            lines.append(" ".join(f"\\cmidrule(lr){{{first}-{last}}}" for _, first, last in spans))
        lines += [" & ".join(header) + r" \\", "\\midrule"]
        for row in rows:
            lines.append(" & ".join(latex_escape(str(row.get(c, ""))) for c in order) + r" \\")
        lines += ["\\bottomrule", "\\end{tabular}"]
    if footnotes:
        lines += ["", "\\smallskip", "{\\footnotesize"] + [latex_escape(f) + r"\par" for f in footnotes] + ["}"]
    return "\n".join(lines)
