"""Grid expansion, trial ids, and the protocol (selection never sees the test split; ties go to the smaller lr)."""

from __future__ import annotations

import dataclasses

import pytest

from harness.errors import HarnessError
from harness.plan import Cell, TrialSpec, cell_state, final_specs, search_specs, select_best, trial_id
from harness.runner import run_cell
from harness.store import Store
from harness.sweep import load_suite


def fake_record(spec, value, status="ok"):
    return {"id": trial_id(spec), "spec": spec.to_dict(), "status": status, "metrics": {"eval": value}, "curve": [],
            "params": {}, "provenance": {}}


def test_grid_is_the_product_of_axes_with_fixed_settings(make_suite):
    suite = load_suite(str(make_suite(grids={"linear": {"lr": [1.0, 0.5, 0.1], "weight_decay": [0.0, 0.01]}},
                                      settings={"linear": {"frozen_eval": False}})))
    specs = search_specs(suite, Cell("linear", "demo-digits"))
    points = [(s.hparams["lr"], s.hparams["weight_decay"]) for s in specs]
    assert points == [(1.0, 0.0), (1.0, 0.01), (0.5, 0.0), (0.5, 0.01), (0.1, 0.0), (0.1, 0.01)]
    assert all(s.hparams["frozen_eval"] is False for s in specs)
    assert all(s.train_split == "train800" and s.eval_split == "val200" for s in specs)
    assert len({trial_id(s) for s in specs}) == 6


def test_method_default_grid_is_used_when_the_suite_has_none(make_suite):
    suite = load_suite(str(make_suite(grids=None)))
    assert len(search_specs(suite, Cell("linear", "demo-digits"))) == 10 * 4  # docs/protocol.md §5.5


def test_ids_are_stable_and_content_addressed(make_suite):
    suite = load_suite(str(make_suite()))
    cell = Cell("linear", "demo-digits")
    first = [trial_id(s) for s in search_specs(suite, cell)]
    assert first == [trial_id(s) for s in search_specs(load_suite(str(make_suite())), cell)]
    spec = search_specs(suite, cell)[0]
    assert trial_id(dataclasses.replace(spec, seed=7)) != trial_id(spec)
    assert trial_id(dict(reversed(list(spec.to_dict().items())))) == trial_id(spec)  # key order does not matter
    assert TrialSpec.from_dict(spec.to_dict()) == spec and spec.id == trial_id(spec.to_dict())


def test_overrides_never_share_ids_with_the_full_protocol(make_suite):
    path = str(make_suite())
    cell = Cell("linear", "demo-digits")
    full = {trial_id(s) for s in search_specs(load_suite(path), cell)}
    smoke = search_specs(load_suite(path, grid_points=1), cell)
    assert len(smoke) == 1 and trial_id(smoke[0]) not in full


def test_final_trials_use_all_protocol_seeds_on_train_plus_val_and_test(make_suite):
    suite = load_suite(str(make_suite(protocol={**load_suite("demo").protocol, "seeds": [42, 44, 82, 100, 800]})))
    specs = final_specs(suite, Cell("linear", "demo-digits"), {"lr": 0.1, "weight_decay": 0.0})
    assert [s.seed for s in specs] == [42, 44, 82, 100, 800]
    assert {(s.train_split, s.eval_split) for s in specs} == {("train800val200", "test")}


def test_selection_ties_go_to_the_smaller_lr(make_suite):
    suite = load_suite(str(make_suite(grids={"linear": {"lr": [1.0, 0.5, 0.1], "weight_decay": [0.0]}})))
    specs = search_specs(suite, Cell("linear", "demo-digits"))
    records = [fake_record(specs[0], 80.0), fake_record(specs[1], 90.0), fake_record(specs[2], 90.0)]
    assert select_best(records)["spec"]["hparams"]["lr"] == 0.1
    records[2]["status"] = "diverged"  # diverged trials are skipped
    assert select_best(records)["spec"]["hparams"]["lr"] == 0.5
    assert select_best([dict(r, status="diverged") for r in records]) is None


def test_selection_refuses_final_records(make_suite):
    suite = load_suite(str(make_suite()))
    spec = final_specs(suite, Cell("linear", "demo-digits"), {"lr": 0.1})[0]
    with pytest.raises(ValueError, match="only search records"):
        select_best([fake_record(spec, 50.0)])


def test_no_search_decision_ever_reads_the_test_split(make_suite, tmp_path):
    """Run the whole protocol with a fake trainer whose test scores are the reverse of its val scores: the
    winner must be the best on val, and no search trial may be trained or scored on the test split."""
    suite = load_suite(str(make_suite(grids={"linear": {"lr": [1.0, 0.5, 0.1, 0.05], "weight_decay": [0.0]}})))
    val_score = {1.0: 10.0, 0.5: 70.0, 0.1: 40.0, 0.05: 20.0}
    test_score = {lr: 100.0 - v for lr, v in val_score.items()}  # adversarial: best on test = worst on val
    seen = []

    def trainer(spec):
        seen.append(spec)
        lr = spec.hparams["lr"]
        value = test_score[lr] if spec.eval_split == "test" else val_score[lr]
        return fake_record(spec, value)

    outcome = run_cell(suite, Cell("linear", "demo-digits"), Store(tmp_path / "res"), trainer)
    searches = [s for s in seen if s.stage == "search"]
    finals = [s for s in seen if s.stage == "final"]
    assert searches and all("test" not in (s.train_split, s.eval_split) for s in searches)
    assert outcome.state.hparams["lr"] == 0.5 and outcome.complete
    assert {s.hparams["lr"] for s in finals} == {0.5}
    assert [s.eval_split for s in finals] == ["test"] * len(suite.seeds)
    # the selection step itself only ever gets search records
    assert seen.index(finals[0]) == len(searches)


def test_rerun_is_resume(make_suite, tmp_path):
    suite = load_suite(str(make_suite()))
    store = Store(tmp_path / "res")
    calls = []

    def trainer(spec):
        calls.append(spec)
        return fake_record(spec, float(spec.hparams["lr"]))

    first = run_cell(suite, Cell("linear", "demo-digits"), store, trainer)
    assert first.ran == len(calls) == 2 + 2
    second = run_cell(suite, Cell("linear", "demo-digits"), store, trainer)
    assert second.ran == 0 and second.skipped == 4 and len(calls) == 4


def test_fixed_protocol_runs_only_final_trials_with_the_table_hparams(make_suite, tmp_path):
    protocol = {"kind": "fixed", "final": {"train": "train800val200", "eval": "test"}, "seeds": [42]}
    suite = load_suite(str(make_suite(protocol=protocol, fixed={"linear": {"*": {"lr": 0.3, "weight_decay": 0.0}}})))
    seen = []
    run_cell(suite, Cell("linear", "demo-digits"), Store(tmp_path / "r"),
             lambda spec: seen.append(spec) or fake_record(spec, 1.0))
    assert [(s.stage, s.hparams["lr"]) for s in seen] == [("final", 0.3)]
    with pytest.raises(HarnessError, match="no fixed hyperparameters for method 'finetune'"):
        run_cell(suite, Cell("finetune", "demo-digits"), Store(tmp_path / "r"), lambda s: fake_record(s, 1.0))


def test_a_failed_search_trial_blocks_the_finals_until_it_is_retried(make_suite, tmp_path):
    """The retried trial may win: running finals before it finished is how two winners' finals end up on disk."""
    suite = load_suite(str(make_suite(grids={"linear": {"lr": [1.0, 0.1], "weight_decay": [0.0]}})))
    cell, store = Cell("linear", "demo-digits"), Store(tmp_path / "res")
    attempts = {"n": 0}

    def flaky(spec):
        if spec.hparams["lr"] == 0.1 and attempts["n"] == 0:
            attempts["n"] += 1
            return fake_record(spec, None, status="failed")
        return fake_record(spec, 90.0 if spec.hparams["lr"] == 0.1 else 50.0)

    first = run_cell(suite, cell, store, flaky)
    assert first.failed == 1 and not first.complete and "1 failed" in first.note
    assert cell_state(suite, cell, store).finals == []  # no final trial ran for a provisional winner
    second = run_cell(suite, cell, store, flaky)
    state = cell_state(suite, cell, store)
    assert second.complete and state.hparams["lr"] == 0.1
    assert {r["spec"]["hparams"]["lr"] for r in state.final_records} == {0.1} and len(state.final_records) == 2


def test_a_search_where_every_point_diverged_is_a_dead_end(make_suite, tmp_path):
    suite = load_suite(str(make_suite()))
    cell, store = Cell("linear", "demo-digits"), Store(tmp_path / "res")
    outcome = run_cell(suite, cell, store, lambda spec: fake_record(spec, None, status="diverged"))
    state = cell_state(suite, cell, store)
    assert state.dead_end and not outcome.complete and "all diverged" in outcome.note
    assert state.counts == {"done": 0, "diverged": 2, "failed": 0, "pending": 2}
