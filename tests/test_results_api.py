"""harness.results, the notebook side: the same trials and numbers as `harness table`, from the same protocol
state, with stale records left out unless asked for."""

from __future__ import annotations

import io
import subprocess
import sys

import pandas as pd
import pytest
import yaml

import records
from harness.store import Store
from harness.sweep import load_suite
from harness.table import build_table


@pytest.fixture
def planted(make_suite, tmp_path):
    """Two cells with finals of the current fixed lr, and stale finals of an earlier lr (the suite file edited
    after they were made): the table counts only the current ones."""
    path = make_suite(methods=["linear", "finetune"], grids=None, **records.FIXED)
    results = tmp_path / "results"
    store = Store(results)
    raw = yaml.safe_load(path.read_text())
    raw["fixed"]["linear"]["*"]["lr"] = 0.5
    path.write_text(yaml.safe_dump(raw))
    records.put(store, load_suite(str(path)), "linear", "demo-digits", [10.0, 12.0])  # lr 0.5: stale soon
    raw["fixed"]["linear"]["*"]["lr"] = 0.1
    path.write_text(yaml.safe_dump(raw))
    suite = load_suite(str(path))
    records.put(store, suite, "linear", "demo-digits", [50.0, 52.5])
    records.put(store, suite, "linear", "demo-position", [40.123456789, 41.0])
    records.put(store, suite, "finetune", "demo-digits", [70.0, 71.0, 99.0])  # a third seed: not planned
    return str(path), results, suite, store


def test_summary_equals_the_table_to_the_last_digit_with_stale_records_present(planted):
    import harness.results as hr

    path, results, suite, store = planted
    table = pd.read_csv(io.StringIO(build_table(suite, store, fmt="csv"))).set_index("method")
    numbers = hr.summary(path, results=results)
    cells = numbers[numbers["kind"] == "cell"].set_index(["method", "task"])
    for (method, task), row in cells.iterrows():
        expected = table.loc[method, task]
        if pd.isna(expected):
            assert row["n"] == 0 and pd.isna(row["mean"])
        else:
            assert f"{row['mean']:.4f}" == f"{expected:.4f}" and row["n"] == table.loc[method, f"{task}_n"]
    assert cells.loc[("linear", "demo-digits"), "mean"] == 51.25  # the stale 10 and 12 are not in it
    means = numbers[numbers["kind"] == "mean"].set_index(["method", "task"])
    assert means.loc[("linear", "mean"), "mean"] == pytest.approx((51.25 + 40.5617283945) / 2)
    assert ("finetune", "mean") not in means.index  # the table prints no mean for a row with an empty cell


def test_load_has_one_row_per_counted_trial_and_stale_ones_on_request(planted):
    import harness.results as hr

    path, results, _, _ = planted
    trials = hr.load(path, results=results, methods="linear")
    assert len(trials) == 4 and set(trials["stage"]) == {"final"} and not trials["stale"].any()
    digits = trials[trials["task"] == "demo-digits"]
    assert digits["value"].mean() == 51.25 and set(digits["hp.lr"]) == {0.1}
    assert all(p.endswith(".json") for p in trials["path"]) and set(trials["group"]) == {"natural", "structured"}
    with_stale = hr.load(path, results=results, methods=["linear"], tasks=["demo-digits"], stale=True)
    old = with_stale[with_stale["stale"]]
    assert sorted(old["value"]) == [10.0, 12.0] and set(old["hp.lr"]) == {0.5} and old["stale_reason"].notna().all()


def test_curves_are_long_form_and_the_module_imports_without_torch(planted):
    import harness.results as hr

    path, results, suite, store = planted
    from harness.plan import Cell, final_specs, fixed_hparams

    cell = Cell("finetune", "demo-position")
    spec = final_specs(suite, cell, fixed_hparams(suite, cell))[0]
    record = records.ok_record(spec, 60.0)
    record["curve"] = [{"epoch": 1, "train_loss": 2.0, "eval": 30.0}, {"epoch": 2, "train_loss": 1.0, "eval": 60.0}]
    store.write(record)
    frame = hr.curves(path, results=results, methods="finetune", tasks="demo-position")
    assert list(frame[frame["name"] == "eval"]["value"]) == [30.0, 60.0]
    assert list(frame[frame["name"] == "train_loss"]["epoch"]) == [1, 2]
    probe = "import sys, harness.results; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
