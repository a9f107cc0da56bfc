"""The frozen-computation cache (harness/features.py): the linear probe trains its head on cached pooled features
where the task's training transforms are deterministic, with the same per-epoch metrics as without the cache, and
is refused, with the reason in the record, everywhere else."""

from __future__ import annotations

import pytest
from torch import nn

from harness.api import METHODS, TASKS


def _trial(make_suite, method: str = "linear", train: dict | None = None, hparams: dict | None = None):
    from harness.plan import Cell, final_specs, fixed_hparams
    from harness.sweep import load_suite

    fixed = {method: {"*": {"lr": 0.5, "weight_decay": 0.001, **(hparams or {})}}}
    suite = load_suite(str(make_suite(
        methods=[method], grids=None, fixed=fixed, train={"epochs": 3, **(train or {})},
        protocol={"kind": "fixed", "final": {"train": "train800", "eval": "val200"}, "seeds": [42]})))
    cell = Cell(method, "demo-digits")
    return final_specs(suite, cell, fixed_hparams(suite, cell))[0]


def test_a_linear_trial_gives_the_same_curve_with_and_without_the_cache(make_suite, tmp_path, capsys) -> None:
    from harness.train import TrialEnv, run_trial

    spec = _trial(make_suite)
    cache = tmp_path / "cache"
    cached = run_trial(spec, TrialEnv(cache_dir=cache, progress=True))
    assert "feature cache: computing demo-digits/train800" in capsys.readouterr().err  # size printed first
    plain = run_trial(spec, TrialEnv(cache_dir=cache, progress=False, feature_cache=False))
    assert cached["status"] == plain["status"] == "ok", (cached.get("error"), plain.get("error"))
    assert cached["feature_cache"] == "used" and plain["feature_cache"] == "off: --no-cache"
    assert len(cached["curve"]) == len(plain["curve"]) == 3
    for a, b in zip(cached["curve"], plain["curve"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["eval"] == pytest.approx(b["eval"], abs=1e-4)
    assert cached["params"] == plain["params"] and cached["cost"]["forward_flops"] == plain["cost"]["forward_flops"]

    files = sorted(p.name for p in (cache / "features").glob("*.npy"))
    assert len(files) == 4  # features + labels of the train and the eval split
    again = run_trial(spec, TrialEnv(cache_dir=cache, progress=True))  # read back, not rebuilt
    assert "computing" not in capsys.readouterr().err
    assert [e["eval"] for e in again["curve"]] == [e["eval"] for e in cached["curve"]]
    assert sorted(p.name for p in (cache / "features").glob("*.npy")) == files


def test_the_cache_is_refused_with_the_reason_in_the_record(make_suite, tmp_path) -> None:
    from harness.train import TrialEnv, run_trial

    env = TrialEnv(cache_dir=tmp_path / "cache", progress=False)
    off = run_trial(_trial(make_suite, train={"epochs": 1, "feature_cache": False}), env)
    assert off["feature_cache"] == "off: train.feature_cache: false"
    drop_path = run_trial(_trial(make_suite, train={"epochs": 1}, hparams={"frozen_eval": False}), env)
    assert drop_path["status"] == "ok"
    assert drop_path["feature_cache"].startswith("off: the frozen backbone runs in training mode")
    assert not (tmp_path / "cache" / "features").exists()


def test_refusals_name_the_method_and_the_task() -> None:
    from harness.features import refusal

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 2)

        def train(self, mode: bool = True):  # the frozen backbone stays in eval mode (frozen_eval)
            super().train(mode)
            self.backbone.eval()
            return self

    class Random:
        kind, name, deterministic_train = "classification", "fgvc-like", False

    linear, finetune = METHODS.get("linear"), METHODS.get("finetune")
    task = TASKS.get("demo-digits")
    assert task.deterministic_train and TASKS.get("vtab-cifar").deterministic_train
    assert not TASKS.get("fgvc-cub").deterministic_train
    assert refusal(linear, task, Model(), {}) is None
    assert refusal(finetune, task, Model(), {}) == "method finetune declares no cacheable frozen part"
    assert refusal(linear, Random(), Model(), {}) == "task fgvc-like's training transforms are not deterministic"
    assert refusal(linear, task, Model(), {}, enabled=False) == "--no-cache"
    trains = Model()
    trains.backbone.requires_grad_(True)
    assert refusal(linear, task, trains, {}) == "backbone weights train"
    assert refusal(linear, task, Model(), {"feature_cache": False}) == "train.feature_cache: false"
    assert refusal(linear, TASKS.get("seg-voc"), Model(), {}) == "segmentation task"
