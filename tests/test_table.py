"""Tables are computed from records: means and stds over seeds, group means, best marked, missing shown."""

from __future__ import annotations

from harness.plan import Cell, final_specs
from harness.store import Store
from harness.sweep import load_suite
from harness.table import build_table


def put(store, suite, method, task, values, trainable=1000):
    for spec, value in zip(final_specs(suite, Cell(method, task), {"lr": 0.1}), values):
        store.write({"spec": spec, "status": "ok", "metrics": {"eval": value}, "curve": [],
                     "params": {"trainable": trainable, "head": 10, "total": 5000}, "provenance": {},
                     "cost": {"forward_flops": 2e9, "train_images_per_s": 100.0}})


def test_table_values_come_from_records(make_suite, tmp_path):
    suite = load_suite(str(make_suite(tasks=["demo-digits", "demo-textures", "demo-position"])))
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


def test_partial_seeds_are_marked(make_suite, tmp_path):
    suite = load_suite(str(make_suite()))
    store = Store(tmp_path)
    put(store, suite, "linear", "demo-digits", [60.0])
    assert "60.0 (1/2)" in build_table(suite, store)


def test_records_of_other_settings_do_not_mix(make_suite, tmp_path):
    path = str(make_suite())
    store = Store(tmp_path)
    put(store, load_suite(path, epochs=5), "linear", "demo-digits", [10.0, 10.0])
    put(store, load_suite(path), "linear", "demo-digits", [60.0, 80.0])
    assert "70.0 ± 10.0" in build_table(load_suite(path), store)
    assert "10.0 ± 0.0" in build_table(load_suite(path, epochs=5), store)


def test_csv_and_latex(make_suite, tmp_path):
    suite = load_suite(str(make_suite()))
    store = Store(tmp_path)
    put(store, suite, "linear", "demo-digits", [60.0, 70.0])
    put(store, suite, "finetune", "demo-digits", [20.0, 30.0])
    csv = build_table(suite, store, fmt="csv").splitlines()
    assert csv[0].startswith("method,demo-digits,demo-digits_std,demo-digits_n")
    assert csv[1].startswith("linear,65.0000,5.0000,2")
    latex = build_table(suite, store, fmt="latex")
    assert "\\textbf{65.0 ± 5.0}" in latex and "\\begin{tabular}" in latex
