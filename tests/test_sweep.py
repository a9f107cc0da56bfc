"""Suite files: loading, validation messages with file and line, overrides."""

from __future__ import annotations

import pytest

from harness.errors import HarnessError
from harness.sweep import load_suite


def test_demo_suite_loads():
    suite = load_suite("demo")
    assert suite.name == "demo"
    assert suite.protocol["kind"] == "search-then-final"
    assert set(suite.tasks) <= {"demo-digits", "demo-textures", "demo-position", "demo-count"}


def test_unknown_suite_suggests():
    with pytest.raises(HarnessError, match="unknown suite 'dmeo'; did you mean: demo"):
        load_suite("dmeo")


def test_malformed_key_names_file_line_and_key(make_suite):
    path = make_suite(train={"epochs": "many"})
    with pytest.raises(HarnessError) as err:
        load_suite(str(path))
    message = str(err.value)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "epochs" in text)
    assert f"{path}:{line}: train.epochs: expected" in message


def test_unknown_top_level_key_is_named_with_suggestion(make_suite):
    path = make_suite(gridz={"linear": {"lr": [1]}})
    with pytest.raises(HarnessError, match=r"gridz: unknown key; did you mean: grids"):
        load_suite(str(path))


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("suite: x\ntasks: [a, b\nmethods: []\n")
    with pytest.raises(HarnessError, match=r"broken.yaml:\d+: not valid YAML"):
        load_suite(str(path))


def test_grid_axes_must_be_lists(make_suite):
    path = make_suite(grids={"linear": {"lr": 0.1}})
    with pytest.raises(HarnessError, match=r"grids.linear.lr: expected a non-empty list"):
        load_suite(str(path))


def test_overrides_change_the_suite_and_are_recorded(make_suite):
    suite = load_suite(str(make_suite()), epochs=3, seeds=1, grid_points=1,
                       sets={"train.batch_size": 16}, data_root="/somewhere")
    assert suite.train["epochs"] == 3 and suite.train["batch_size"] == 16
    assert suite.seeds == [42]
    assert suite.overrides == {"epochs": 3, "seeds": 1, "grid_points": 1, "set": {"train.batch_size": 16}}
    assert "root" not in suite.spec_base()["data"]  # where data lives is not part of a trial


def test_set_values_are_validated_again(make_suite):
    # the file is fine; the problem is the override's, so it names --set instead of a line of the file
    with pytest.raises(HarnessError, match=r"^--set: train\.epochs: expected an integer > 0, got 'x'$"):
        load_suite(str(make_suite()), sets={"train.epochs": "x"})


def test_missing_required_sections_are_named(make_suite):
    path = make_suite(train=None, protocol=None)
    with pytest.raises(HarnessError) as err:
        load_suite(str(path))
    assert f"{path}:" in str(err.value) and "train: expected a mapping, got null" in str(err.value)
    raw = path.read_text().replace("suite: tiny\n", "")
    path.write_text(raw)
    with pytest.raises(HarnessError, match=rf"{path}: suite: missing required section"):
        load_suite(str(path))


def test_set_on_where_to_run_keys_is_not_a_trial_override(make_suite):
    suite = load_suite(str(make_suite()), sets={"slurm.partition": "gpu", "data.roots.demo-digits": "/x",
                                                "train.epochs": 2})
    assert suite.raw["slurm"]["partition"] == "gpu"
    assert suite.overrides == {"set": {"train.epochs": 2}}


def test_lr_step_moves_the_epoch_schedule_after_every_step():
    """``train.lr_step: step`` keeps the warm-up + cosine over the same epochs but moves it per optimiser step: the
    warm-up ramps within its epoch instead of spending it at factor 0, and the cosine meets the per-epoch one at
    each epoch boundary. A value other than epoch/step is refused by the schema."""
    from harness.api import METHODS
    from harness.train import _schedule

    method = METHODS.get("linear")
    train = {"epochs": 4, "warmup_epochs": 1}
    epochs, per_epoch, stepped = _schedule(train, method, None, batches=10)
    assert (epochs, stepped) == (4, False) and per_epoch(0) == 0.0 and per_epoch(1) == 1.0
    epochs, per_step, stepped = _schedule({**train, "lr_step": "step"}, method, None, batches=10)
    assert (epochs, stepped) == (4, True)
    assert [per_step(i) for i in (0, 5, 10)] == [0.0, 0.5, 1.0]  # the warm-up inside the first epoch
    for epoch in range(1, 5):
        assert per_step(10 * epoch) == pytest.approx(per_epoch(epoch))
    assert per_step(15) < per_step(10) and per_step(40) == pytest.approx(0.0)
    with pytest.raises(HarnessError, match="lr_step: expected one of epoch, step"):
        load_suite("demo", sets={"train.lr_step": "iteration"})


def test_eval_every_scores_fewer_epochs_and_reports_the_same_number(fixed_suite, tmp_path, capsys):
    """``train.eval_every: 3`` over 3 epochs scores the evaluation split once, after the last epoch, and that number
    and the training losses are those of the every-epoch run (evaluation changes neither weights nor random
    numbers). A non-positive value is refused by the schema."""
    import json

    from harness.cli import main

    curves = {}
    for every in (1, 3):
        results = tmp_path / f"every-{every}"
        suite = fixed_suite(methods=["finetune"], tasks=["demo-digits"],
                            protocol={"kind": "fixed", "final": {"train": "train800val200", "eval": "test"},
                                      "seeds": [42]},
                            fixed={"finetune": {"*": {"lr": 0.01, "weight_decay": 0.0}}},
                            train={"epochs": 3, "batch_size": 100, "eval_batch_size": 500,
                                   "lr_scaling": "batch/256", "warmup_epochs": 0, "eval_every": every})
        assert main(["run", "--suite", suite, "--results", str(results), "--no-progress"]) == 0
        (record,) = [json.loads(p.read_text()) for p in results.rglob("final-*.json")]
        curves[every] = record["curve"]
    assert [("eval" in e) for e in curves[1]] == [True, True, True]
    assert [("eval" in e) for e in curves[3]] == [False, False, True]
    assert curves[3][-1]["eval"] == curves[1][-1]["eval"]
    assert [e["train_loss"] for e in curves[3]] == [e["train_loss"] for e in curves[1]]
    with pytest.raises(HarnessError, match="eval_every"):
        load_suite("demo", sets={"train.eval_every": 0})
