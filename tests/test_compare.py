"""`harness table --compare METHOD` marks ‡, per task, the cells whose seeds differ from METHOD's beyond their
noise (Welch's t-test, p < --alpha), with a footnote saying so, in every format; cells with fewer than 2 seeds
on either side are never marked."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from harness.cli import main
from harness.store import Store
from harness.sweep import load_suite
from harness.table import build_table, suite_summary, welch_tests
from records import FIXED, put


@pytest.fixture
def suite_and_store(fixed_suite, tmp_path):
    """Three seeds per cell. On demo-digits finetune's seeds are far from linear's (→ marked); on demo-position
    they overlap (→ not marked); lora has one seed on demo-digits (→ never tested)."""
    path = fixed_suite(methods=["linear", "finetune", "lora"], protocol={**FIXED["protocol"], "seeds": [42, 43, 44]},
                       fixed={**FIXED["fixed"], "lora": {"*": {"lr": 0.1, "weight_decay": 0.0}}})
    suite, store = load_suite(path), Store(tmp_path / "results")
    put(store, suite, "linear", "demo-digits", [60.0, 61.0, 59.5])
    put(store, suite, "finetune", "demo-digits", [80.0, 81.5, 79.0])
    put(store, suite, "linear", "demo-position", [40.0, 45.0, 50.0])
    put(store, suite, "finetune", "demo-position", [42.0, 47.0, 44.0])
    put(store, suite, "lora", "demo-digits", [99.0])
    return path, suite, store


def row(text: str, method: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {method} "))


def test_separated_seeds_are_marked_overlapping_ones_not(suite_and_store):
    path, suite, store = suite_and_store
    p = welch_tests(suite_summary(suite, store), "linear")
    assert p[("finetune", "demo-digits")] < 0.001 and p[("finetune", "demo-position")] > 0.5
    assert ("lora", "demo-digits") not in p and ("linear", "demo-digits") not in p
    text = build_table(suite, store, compare="linear")
    cells = [c.strip() for c in row(text, "finetune").split("|")[1:-1]]
    assert cells[1] == "80.2 ± 1.0‡" and cells[2] == "44.3 ± 2.1"  # lora (1 seed) and linear are best
    assert "‡" not in row(text, "linear") and "‡" not in row(text, "lora")
    assert ("‡ differs from linear beyond the seeds' noise: Welch's t-test over the per-seed values, p < 0.05; "
            "cells with fewer than 2 seeds on either side are not tested") in text
    assert "‡" not in build_table(suite, store)  # only when asked


def test_alpha_sets_the_threshold(suite_and_store):
    path, suite, store = suite_and_store
    p = welch_tests(suite_summary(suite, store), "linear")[("finetune", "demo-digits")]
    assert "‡" not in row(build_table(suite, store, compare="linear", alpha=p / 2), "finetune")
    assert "p < 0.01" in build_table(suite, store, compare="linear", alpha=0.01)


def test_every_format_carries_marks_and_footnote(suite_and_store):
    path, suite, store = suite_and_store
    github = build_table(suite, store, fmt="github", compare="linear")
    assert "80.2 ± 1.0‡" in github and "Welch's t-test" in github
    latex = build_table(suite, store, fmt="latex", compare="linear")
    assert "80.2 $\\pm$ 1.0$^\\ddagger$" in latex and "$^\\ddagger$ differs from linear" in latex
    csv = build_table(suite, store, fmt="csv", compare="linear")
    frame = pd.read_csv(io.StringIO(csv)).set_index("method")  # still one plain table
    assert len(frame) == 3 and set(frame["compare"]) == {"linear"} and set(frame["alpha"]) == {0.05}
    assert frame.loc["finetune", "demo-digits_differs"] and not frame.loc["finetune", "demo-position_differs"]
    assert frame.loc["finetune", "demo-digits_welch_p"] < 0.001 and frame.loc["finetune", "demo-position_welch_p"] > 0.5
    assert not frame.loc["lora", "demo-digits_differs"] and pd.isna(frame.loc["lora", "demo-digits_welch_p"])
    assert "welch" not in build_table(suite, store, fmt="csv")  # unchanged without --compare


def test_compare_through_the_cli(suite_and_store, capsys):
    path, suite, store = suite_and_store
    argv = ["table", "--suite", path, "--results", str(store.root)]
    assert main(argv + ["--compare", "linear", "--alpha", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "80.2 ± 1.0‡" in out and "p < 0.01" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "‡" in rows["finetune"] and "‡" not in rows["linear"]  # the reference method is never marked
    assert main(argv + ["--compare", "linaer"]) == 2
    assert "linear" in capsys.readouterr().err  # did-you-mean
    assert main(argv + ["--compare", "linear", "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert "finetune" in captured.out and "Welch's t-test" in captured.err  # the footnote beside the csv
    assert main(argv + ["--methods", "finetune,lora", "--compare", "linear"]) == 2
    assert "add it to --methods" in capsys.readouterr().err
