"""`harness table --format latex` is LaTeX that compiles: specials escaped in headers and cells, booktabs rules,
± and the footnote marks in math mode. The compile check needs pdflatex (.ci/run installs it) and is skipped
without it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from harness.store import Store
from harness.sweep import load_suite
from harness.table import build_table
from harness.table_render import latex_escape
from records import put

DOCUMENT = "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n%s\n\\end{document}\n"


def test_specials_are_escaped():
    assert latex_escape("# params (M)") == r"\# params (M)"
    assert latex_escape("a_b & 5% {x} $y ~ ^ \\") == (r"a\_b \& 5\% \{x\} \$y \textasciitilde{} "
                                                      r"\textasciicircum{} \textbackslash{}")
    assert latex_escape("65.0 ± 5.0†‡") == r"65.0 $\pm$ 5.0$^\dagger$$^\ddagger$"
    assert latex_escape("**65.0 ± 5.0**") == r"\textbf{65.0 $\pm$ 5.0}"
    assert latex_escape("–") == "--"


@pytest.fixture
def latex(fixed_suite, tmp_path):
    """A table with everything LaTeX could trip on: '#' in a header, ±, bold, a partial cell, a missing mean,
    the † of seeds that disagree and the ‡ of --compare, with their footnotes."""
    suite = load_suite(fixed_suite())
    store = Store(tmp_path / "results")
    put(store, suite, "linear", "demo-digits", [60.0, 61.0])
    put(store, suite, "finetune", "demo-digits", [90.0, 90.5])  # ‡: far from linear's seeds
    put(store, suite, "linear", "demo-position", [12.0, 68.0])  # † (chance is 11.1)
    put(store, suite, "finetune", "demo-position", [50.0])  # (1/2): not tested
    return build_table(suite, store, fmt="latex", extra=("params", "flops", "memory"), compare="linear")


def test_latex_table_is_booktabs_with_escaped_text(latex):
    lines = latex.splitlines()
    assert lines[0].startswith("\\begin{tabular}{l") and lines[1] == "\\toprule" and lines[5] == "\\midrule"
    assert "\\bottomrule" in lines and "\\hline" not in latex
    # two groups (natural, structured): a header row of groups over the tasks and their means
    assert lines[2].startswith(" & \\multicolumn{2}{c}{Natural} & \\multicolumn{2}{c}{Structured}")
    assert lines[3] == "\\cmidrule(lr){2-3} \\cmidrule(lr){4-5}"
    assert "\\# params (M)" in lines[4] and "GFLOPs/img" in lines[4]
    assert "# params" not in latex.replace("\\# params", "")
    assert "±" not in latex and "†" not in latex and "‡" not in latex and "–" not in latex
    assert "40.0 $\\pm$ 28.0$^\\dagger$" in latex and "\\textbf{50.0 (1/2)}" in latex
    assert "\\textbf{90.2 $\\pm$ 0.2$^\\ddagger$}" in latex  # best, and differs from linear
    assert "$^\\dagger$ linear/demo-position: seeds disagree" in latex
    assert "$^\\ddagger$ differs from linear beyond the seeds' noise: Welch's t-test" in latex


@pytest.mark.skipif(shutil.which("pdflatex") is None,
                    reason="pdflatex is not installed (apt-get install texlive-latex-base "
                           "texlive-latex-recommended; .ci/run does)")
def test_latex_table_compiles(latex, tmp_path):
    tex = tmp_path / "table.tex"
    tex.write_text(DOCUMENT % latex)
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "table.pdf").read_bytes().startswith(b"%PDF-")
    log = (tmp_path / "table.log").read_text(errors="replace")
    assert "Missing character" not in log  # nothing silently dropped from the output


@pytest.fixture
def vtab_latex(fixed_suite, tmp_path):
    """The VTAB table as the paper prints it: every task, in both layouts."""
    from tasks.vtab import VTAB_TASKS

    tasks = [f"vtab-{folder}" for folder in VTAB_TASKS]  # the paper's order
    suite = load_suite(fixed_suite(tasks=tasks))
    store = Store(tmp_path / "results")
    for i, task in enumerate(tasks):
        put(store, suite, "linear", task, [50.0 + i, 51.0 + i])
        put(store, suite, "finetune", task, [60.0, 62.0])
    return {layout: build_table(suite, store, fmt="latex", layout=layout) for layout in ("wide", "long")}


def test_vtab_latex_groups_columns_under_the_papers_headers(vtab_latex):
    wide = vtab_latex["wide"].splitlines()
    assert wide[2] == (" & \\multicolumn{8}{c}{Natural} & \\multicolumn{5}{c}{Specialized} & "
                       "\\multicolumn{9}{c}{Structured} &  &  \\\\")
    assert wide[3] == "\\cmidrule(lr){2-9} \\cmidrule(lr){10-14} \\cmidrule(lr){15-23}"
    header = [h.strip() for h in wide[4].removesuffix("\\\\").split("&")]
    assert header[1:9] == ["Cifar", "Caltech101", "DTD", "Flowers102", "Pets", "SVHN", "Sun397", "Mean"]
    assert header[9:14] == ["Camelyon", "EuroSAT", "Resisc45", "Retinopathy", "Mean"]
    assert header[14:23] == ["Clevr-Count", "Clevr-Dist", "DMLab", "KITTI", "dSpr-Loc", "dSpr-Ori", "sNORB-Azim",
                             "sNORB-Elev", "Mean"]
    assert "vtab-" not in vtab_latex["wide"] and "vtab-" not in vtab_latex["long"]
    long = vtab_latex["long"]
    assert "\\multicolumn{3}{l}{\\textit{Specialized}} \\\\\nCamelyon & 57.5 $\\pm$ 0.5" in long


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_vtab_latex_compiles(vtab_latex, tmp_path):
    for layout, text in vtab_latex.items():
        tex = tmp_path / f"{layout}.tex"
        tex.write_text(DOCUMENT % text)
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:]
