"""The transcribed reference numbers (results/reference/*.csv) are checked against the papers' own arithmetic, so a
transcription slip fails; the name maps point at registered methods and tasks; `table --reference` and
`reference show` print the right numbers in the right places."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest

from harness import reference
from harness.api import METHODS, TASKS
from harness.cli import main
from harness.plan import Cell, final_specs, fixed_hparams
from harness.reference import COLUMNS, INCONSISTENT, METHOD_NAMES, TASK_NAMES, is_mean, our_method, our_task
from harness.store import Store
from harness.sweep import load_suite

ROOT = Path(__file__).resolve().parents[1] / "results" / "reference"
SOURCES = ("toast-paper", "vpt-paper", "vpetl-bench")


def rows(source: str) -> list[dict[str, str]]:
    with open(ROOT / f"{source}.csv", newline="") as f:
        return list(csv.DictReader(f))


def all_rows() -> list[dict[str, str]]:
    return [r for source in SOURCES for r in rows(source)]


def decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def group_of(task: str) -> str:
    return TASKS.get(task).group or ""


def test_files_are_tidy():
    assert reference.sources() == sorted(SOURCES)
    for source in SOURCES:
        with open(ROOT / f"{source}.csv", newline="") as f:
            assert tuple(next(csv.reader(f))) == COLUMNS
        seen = set()
        for row in rows(source):
            assert row["source"] == source
            float(row["value"])
            key = (row["table"], row["backbone"], row["method"], row["benchmark"], row["task"])
            assert key not in seen, key
            seen.add(key)
    assert len(rows("toast-paper")) > 300 and len(rows("vpt-paper")) > 100 and len(rows("vpetl-bench")) == 234


def test_printed_averages_match_the_cells():
    """Every printed average (FGVC 'Avg', VTAB group means, Alpaca 'Avg') is the mean of its row's cells within what
    the rounding allows: half a unit of the cells' last printed digit plus half of the average's. An average the
    paper itself gets wrong is accepted only when its note says so - and such a note must be needed."""
    by_row = defaultdict(list)
    for row in all_rows():
        by_row[(row["source"], row["table"], row["backbone"], row["method"], row["benchmark"])].append(row)
    checked = 0
    for key, cells in by_row.items():
        for mean_row in cells:
            task = our_task(mean_row["benchmark"], mean_row["task"])
            if not is_mean(task):
                continue
            members = [r for r in cells if not is_mean(our_task(r["benchmark"], r["task"]))]
            if task != "mean":
                group = task[:-len("-mean")]
                members = [r for r in members if group_of(our_task(r["benchmark"], r["task"])) == group]
            if not members:  # Table 8/9 print only averages: test_the_same_number_agrees_across_tables
                continue
            recomputed = sum(float(r["value"]) for r in members) / len(members)
            tolerance = (0.5 * 10 ** -max(decimals(r["value"]) for r in members)
                         + 0.5 * 10 ** -decimals(mean_row["value"]) + 1e-9)
            consistent = abs(recomputed - float(mean_row["value"])) <= tolerance
            documented = mean_row["note"].startswith(INCONSISTENT)
            assert consistent != documented, (key, mean_row["task"], recomputed, mean_row["value"], mean_row["note"])
            checked += 1
    assert checked >= 25  # TOAST Tables 1, 4, 5, 6, 10, 11, 14 and VPT's FGVC means and group means


def test_the_same_number_agrees_across_tables():
    """A number the paper prints in two tables (Table 1 vs 11, 2 vs 12, 3 vs 13, 6 vs 10, 9 vs 1/4/11/14) is
    transcribed the same in both, unless both rows document the paper's own contradiction."""
    seen: dict[tuple, dict[str, str]] = {}
    params: dict[tuple, tuple[str, str]] = {}
    compared = 0
    for row in all_rows():
        method, task = our_method(row["method"]), our_task(row["benchmark"], row["task"])
        key = (row["source"], row["backbone"], method, row["benchmark"], task, row["metric"])
        if key in seen:
            first = seen[key]
            compared += 1
            if float(first["value"]) != float(row["value"]):
                assert first["note"].startswith(INCONSISTENT) and row["note"].startswith(INCONSISTENT), key
        else:
            seen[key] = row
        if row["params_m"]:
            pkey = (row["source"], row["backbone"], method, row["benchmark"])
            assert params.setdefault(pkey, (row["params_m"], row["table"]))[0] == row["params_m"], pkey
    assert compared >= 60


@pytest.mark.parametrize("table, best_on", [("2", 6), ("3", 5)])
def test_the_papers_claims_about_its_vtab_tables(table, best_on):
    """'TOAST has the best performances on 6 out of 10 tasks' (Table 2) and '5 out of 8' (Table 3)."""
    cells = [r for r in rows("toast-paper") if r["table"] == table]
    best = defaultdict(lambda: ("", -1.0))
    for r in cells:
        if float(r["value"]) > best[r["task"]][1]:
            best[r["task"]] = (r["method"], float(r["value"]))
    assert sum(1 for method, _ in best.values() if method == "TOAST") == best_on


def test_every_mapped_name_is_registered():
    assert set(METHOD_NAMES.values()) <= set(METHODS.names())
    for benchmark, names in TASK_NAMES.items():
        for ours in names.values():
            assert is_mean(ours) or ours in TASKS, (benchmark, ours)
    for row in all_rows():  # every method, FGVC and VTAB column of the transcriptions is mapped
        assert our_method(row["method"]) in METHODS, row["method"]
        if row["benchmark"] in ("fgvc", "vtab-1k"):
            task = our_task(row["benchmark"], row["task"])
            assert is_mean(task) or task in TASKS, (row["table"], row["task"])


def test_vpt_in_the_toast_paper_is_vpt_deep():
    assert our_method("VPT") == "vpt-deep" and our_method("VPT-shallow") == "vpt-shallow"
    assert our_task("fgvc", "Flower") == "fgvc-flowers" and our_task("vtab-1k", "Flowers") == "vtab-oxford_flowers102"


def test_show_prints_the_transcription_as_the_paper_does(capsys):
    assert main(["reference", "show", "toast-paper", "--table", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    toast = next(line for line in lines if line.startswith("| TOAST "))
    cells = dict(zip(columns, (c.strip() for c in toast.strip("|").split("|"))))
    assert cells["Car"] == "84.9" and cells["CUB"] == "85.0" and cells["Avg"] == "86.2"
    assert columns == ["method", "CUB", "Bird", "Flower", "Dog", "Car", "Avg"]
    assert main(["reference", "show", "toast-paper", "--table", "11"]) == 0
    out = capsys.readouterr().out
    assert "| TOAST-Lite | 0.9 " in out and "84.5" in out and INCONSISTENT in out
    assert main(["reference", "ls"]) == 0
    out = capsys.readouterr().out
    assert "toast-paper" in out and "vpt-paper" in out and "convnext-b" in out


def test_unknown_source_or_table_is_exit_2_with_did_you_mean(capsys):
    assert main(["reference", "show", "toast-papr", "--table", "1"]) == 2
    assert "did you mean: toast-paper" in capsys.readouterr().err
    assert main(["reference", "show", "toast-paper", "--table", "15"]) == 2
    assert "no table '15'" in capsys.readouterr().err
    assert main(["table", "--suite", "demo", "--reference", "vpt-papr"]) == 2
    assert "did you mean: vpt-paper" in capsys.readouterr().err


FGVC = ["fgvc-cub", "fgvc-nabirds", "fgvc-flowers", "fgvc-dogs", "fgvc-cars"]
FIXED = {"protocol": {"kind": "fixed", "final": {"train": "train", "eval": "test"}, "seeds": [42, 44]},
         "fixed": {"linear": {"*": {"lr": 0.1, "weight_decay": 0.0}},
                   "finetune": {"*": {"lr": 0.1, "weight_decay": 0.0}}}}


def put(store, suite, method, task, values):
    cell = Cell(method, task)
    for spec, value in zip(final_specs(suite, cell, fixed_hparams(suite, cell)), values):
        store.write({"spec": spec, "status": "ok", "metrics": {"eval": value}, "curve": [],
                     "params": {"trainable": 1000, "head": 10, "total": 5000}, "provenance": {}, "cost": {}})


def table_lines(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_table_reference_adds_the_paper_and_delta(make_suite, tmp_path, capsys):
    path = str(make_suite(tasks=FGVC, methods=["linear", "finetune"], **FIXED))
    suite, results = load_suite(path), tmp_path / "results"
    store = Store(results)
    for task, values in zip(FGVC, ([80.0, 78.0], [50.0, 50.0], [80.0, 80.0], [97.0, 97.0], [60.0, 60.0])):
        put(store, suite, "linear", task, values)
    put(store, suite, "finetune", "fgvc-cars", [84.0, 84.4])

    assert main(["table", "--suite", path, "--results", str(results), "--reference", "toast-paper"]) == 0
    out = capsys.readouterr().out
    header, body = table_lines(out)
    col = {name: i for i, name in enumerate(header)}
    labels = [r[0] for r in body]
    assert labels == ["linear", "↳ paper", "↳ Δ", "finetune", "↳ paper", "↳ Δ"]
    linear_paper, linear_delta = body[1], body[2]
    assert linear_paper[col["CUB"]] == "76.8" and linear_delta[col["CUB"]] == "+2.2"  # 79.0 - 76.8
    assert linear_paper[col["mean"]] == "72.8"  # all five tasks: the paper's Avg is comparable
    assert linear_delta[col["mean"]] == f"{(79 + 50 + 80 + 97 + 60) / 5 - 72.8:+.1f}"
    finetune_paper, finetune_delta = body[4], body[5]
    assert finetune_paper[col["Cars"]] == "83.2" and finetune_delta[col["Cars"]] == "+1.0"
    assert finetune_delta[col["CUB"]] == "–" and finetune_paper[col["CUB"]] == "80.5"  # no record: no Δ
    assert finetune_paper[col["# params (M)"]] == "87"  # Table 11's '# Params'
    assert "toast-paper Tables 1, 11" in out or "toast-paper Table 1" in out

    # a subset of the tasks: the paper's 5-dataset average is not comparable, so it is MISSING
    assert main(["table", "--suite", path, "--results", str(results), "--tasks", "fgvc-cub,fgvc-cars",
                 "--reference", "toast-paper"]) == 0
    header, body = table_lines(capsys.readouterr().out)
    assert body[1][header.index("mean")] == "–"

    # --reference-table picks another table, whatever its backbone (Table 5: ConvNeXt-B)
    assert main(["table", "--suite", path, "--results", str(results), "--reference", "toast-paper",
                 "--reference-table", "5", "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[0].split(",")
    finetune = dict(zip(header, out[2].split(",")))
    assert float(finetune["fgvc-cars_paper"]) == 87.7
    assert float(finetune["fgvc-cars_delta"]) == pytest.approx(84.2 - 87.7, abs=1e-3)
    linear = dict(zip(header, out[1].split(",")))
    assert linear["fgvc-cub_paper"] == "" and linear["mean_paper"] == ""  # Table 5 has no linear row
