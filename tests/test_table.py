"""Tables are computed from records: means and stds over seeds, group means, best marked, missing shown."""

from __future__ import annotations

import pytest

from harness.cli import main
from harness.plan import Cell, final_specs, search_specs
from harness.store import Store
from harness.sweep import load_suite
from harness.table import build_table
from records import put

def test_table_values_come_from_records(fixed_suite, tmp_path):
    suite = load_suite(fixed_suite(tasks=["demo-digits", "demo-textures", "demo-position"]))
    store = Store(tmp_path)
    put(store, suite, "linear", "demo-digits", [60.0, 70.0])
    put(store, suite, "linear", "demo-textures", [50.0, 50.0])
    put(store, suite, "linear", "demo-position", [30.0, 40.0])
    put(store, suite, "finetune", "demo-digits", [90.0, 80.0], trainable=250_000)
    text = build_table(suite, store, extra=("params", "flops"))
    lines = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    linear, finetune = lines["linear"], lines["finetune"]
    assert "65.0 ± 5.0" in linear and "50.0 ± 0.0" in linear and "35.0 ± 5.0" in linear
    assert linear.split("|")[-4].strip() == "50.0"  # mean over the three tasks: (65 + 50 + 35) / 3
    assert "**85.0 ± 5.0**" in finetune  # best in its column
    assert finetune.count("–") >= 3  # missing cells are shown, not dropped; no group/overall mean for it
    assert "| 0.25 " in finetune and "| 0.001 " in linear  # '# params (M)', 3 significant digits
    assert "2.000" in linear  # GFLOPs/img
    header = text.splitlines()[0]
    assert header.index("demo-digits") < header.index("natural (mean)") < header.index("| mean")



def test_the_best_cell_follows_the_metrics_direction(fixed_suite, tmp_path, monkeypatch):
    """On a lower-is-better task the smallest value is bold, and a mean over tasks of both directions is not
    marked (it has no better side)."""
    from harness.api import TASKS

    monkeypatch.setattr(TASKS.get("demo-digits"), "higher_is_better", False)  # an error rate, say
    suite = load_suite(fixed_suite(tasks=["demo-digits", "demo-textures"]))
    store = Store(tmp_path)
    put(store, suite, "linear", "demo-digits", [20.0, 20.0])
    put(store, suite, "finetune", "demo-digits", [10.0, 10.0])
    put(store, suite, "linear", "demo-textures", [50.0, 50.0])
    put(store, suite, "finetune", "demo-textures", [60.0, 60.0])
    lines = {line.split("|")[1].strip(): line.split("|") for line in build_table(suite, store).splitlines()[2:]}
    header = [h.strip() for h in build_table(suite, store).splitlines()[0].split("|")]
    digits, textures, mean = header.index("demo-digits"), header.index("demo-textures"), header.index("mean")
    assert lines["finetune"][digits].strip() == "**10.0 ± 0.0**" and lines["linear"][digits].strip() == "20.0 ± 0.0"
    assert lines["finetune"][textures].strip() == "**60.0 ± 0.0**"
    assert "**" not in lines["finetune"][mean] + lines["linear"][mean]

def test_partial_seeds_are_marked(fixed_suite, tmp_path):
    suite = load_suite(fixed_suite())
    store = Store(tmp_path)
    put(store, suite, "linear", "demo-digits", [60.0])
    assert "60.0 (1/2)" in build_table(suite, store)


def test_records_of_other_settings_do_not_mix(fixed_suite, tmp_path):
    path = fixed_suite()
    store = Store(tmp_path)
    put(store, load_suite(path, epochs=5), "linear", "demo-digits", [10.0, 10.0])
    put(store, load_suite(path), "linear", "demo-digits", [60.0, 80.0])
    assert "70.0 ± 10.0" in build_table(load_suite(path), store)
    assert "10.0 ± 0.0" in build_table(load_suite(path, epochs=5), store)


def test_csv_and_latex(fixed_suite, tmp_path):
    suite = load_suite(fixed_suite())
    store = Store(tmp_path)
    put(store, suite, "linear", "demo-digits", [60.0, 70.0])
    put(store, suite, "finetune", "demo-digits", [20.0, 30.0])
    csv = build_table(suite, store, fmt="csv").splitlines()
    assert csv[0].startswith("method,demo-digits,demo-digits_std,demo-digits_n")
    assert csv[1].startswith("linear,65.0000,5.0000,2")
    latex = build_table(suite, store, fmt="latex")
    assert "\\textbf{65.0 $\\pm$ 5.0}" in latex and "\\begin{tabular}" in latex


# ----------------------------------------------------------------------------- the table follows the protocol
def search_record(spec, value, status="ok"):
    return {"spec": spec, "status": status, "metrics": {"eval": value}, "curve": [], "params": {},
            "provenance": {}}


def final_record(spec, value):
    return {"spec": spec, "status": "ok", "metrics": {"eval": value}, "curve": [],
            "params": {"trainable": 1, "head": 1, "total": 2}, "provenance": {}}


def test_only_the_current_winners_finals_are_counted(make_suite, tmp_path):
    """Two winners' finals on disk (a failed search trial was retried and won): the table shows the current
    winner's only, and status calls the other finals stale."""
    suite = load_suite(str(make_suite(grids={"linear": {"lr": [1.0, 0.1], "weight_decay": [0.0]}})))
    cell, store = Cell("linear", "demo-digits"), Store(tmp_path)
    first, second = search_specs(suite, cell)
    store.write(search_record(first, 50.0))
    store.write(search_record(second, 0.0, status="failed"))
    for spec, value in zip(final_specs(suite, cell, first.hparams), (11.0, 13.0)):  # finals of the old winner
        store.write(final_record(spec, value))
    store.write(search_record(second, 80.0))  # the retried trial succeeds and now wins
    for spec, value in zip(final_specs(suite, cell, second.hparams), (61.0, 63.0)):
        store.write(final_record(spec, value))
    text = build_table(suite, store, methods=["linear"], tasks=["demo-digits"])
    assert "62.0 ± 1.0" in text and "12.0" not in text and "37.0" not in text


def test_editing_a_grid_changes_what_is_counted(make_suite, tmp_path, capsys):
    path = make_suite(grids={"linear": {"lr": [1.0, 0.1], "weight_decay": [0.0]}})
    suite = load_suite(str(path))
    cell, store = Cell("linear", "demo-digits"), Store(tmp_path / "results")
    for spec, value in zip(search_specs(suite, cell), (70.0, 20.0)):
        store.write(search_record(spec, value))
    for spec, value in zip(final_specs(suite, cell, search_specs(suite, cell)[0].hparams), (71.0, 73.0)):
        store.write(final_record(spec, value))
    assert "72.0 ± 1.0" in build_table(suite, store, methods=["linear"], tasks=["demo-digits"])

    text = path.read_text().replace("- 1.0\n", "- 0.5\n")  # the grid's lr 1.0 becomes 0.5: a new search point
    path.write_text(text)
    edited = load_suite(str(path))
    assert [s.hparams["lr"] for s in search_specs(edited, cell)] == [0.5, 0.1]
    assert "72.0" not in build_table(edited, store, methods=["linear"], tasks=["demo-digits"])

    assert main(["status", "--suite", str(path), "--methods", "linear", "--tasks", "demo-digits",
                 "--results", str(tmp_path / "results"), "--stale"]) == 0
    out = capsys.readouterr().out
    stale = [line for line in out.splitlines() if line.startswith("stale: ")]
    assert len(stale) == 3  # the old lr=1.0 search record and its two finals
    assert all("lr" not in line for line in stale) and "3 stale record(s)" in out


def test_seeds_that_disagree_are_marked_with_a_footnote(fixed_suite, tmp_path):
    suite = load_suite(fixed_suite())
    store = Store(tmp_path)
    put(store, suite, "linear", "demo-digits", [11.0, 68.0])  # chance is 10%: one seed learned nothing
    put(store, suite, "finetune", "demo-digits", [60.0, 68.0])  # an ordinary spread
    text = build_table(suite, store)
    linear = next(line for line in text.splitlines() if line.startswith("| linear"))
    finetune = next(line for line in text.splitlines() if line.startswith("| finetune"))
    assert "†" in linear and "†" not in finetune
    assert "† linear/demo-digits: seeds disagree: a seed at 11.0 (chance 10.0) while another reached 68.0" in text
    assert "$^\\dagger$ linear/demo-digits: seeds disagree" in build_table(suite, store, fmt="latex")
    csv = build_table(suite, store, fmt="csv")
    assert "demo-digits_disagree" in csv.splitlines()[0] and ",True" in csv.splitlines()[1]


def test_table_points_to_records_made_with_other_settings(fixed_suite, tmp_path, capsys):
    path = fixed_suite()
    store = Store(tmp_path / "results")
    put(store, load_suite(path, epochs=2, seeds=1), "linear", "demo-digits", [55.0])
    assert main(["table", "--suite", path, "--results", str(tmp_path / "results")]) == 0
    captured = capsys.readouterr()
    assert "55.0" not in captured.out
    assert "1 final record(s)" in captured.err
    assert f"harness table --suite tiny --epochs 2 --seeds 1" in captured.err
