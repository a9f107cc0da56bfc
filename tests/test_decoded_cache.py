"""The decoded-input cache (harness/decoded.py) and `harness bench --trial`'s parts: the same trial gives exactly the
same per-epoch curve with and without the decoded cache (the demo, a generated VTAB-1k tree of real JPEGs); the
record says whether it served and why not; a disk that would not hold it is said once and the trial runs on images."""

from __future__ import annotations

import pytest

from conftest import TINY_BACKBONE


def _spec(make_suite, task: str = "demo-digits", method: str = "finetune", **changes):
    from harness.plan import Cell, final_specs, fixed_hparams
    from harness.sweep import load_suite

    fixed = {method: {"*": {"lr": 0.01, "weight_decay": 0.0}}}
    raw = dict(methods=[method], tasks=[task], grids=None, fixed=fixed, train={"epochs": 2, "batch_size": 200},
               protocol={"kind": "fixed", "final": {"train": "train800", "eval": "val200"}, "seeds": [42]})
    raw.update(changes)
    suite = load_suite(str(make_suite(**raw)))
    cell = Cell(method, task)
    return suite, final_specs(suite, cell, fixed_hparams(suite, cell))[0]


def _same(a: dict, b: dict) -> None:
    assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
    assert [(e["train_loss"], e["eval"]) for e in a["curve"]] == [(e["train_loss"], e["eval"]) for e in b["curve"]]


def test_a_demo_trial_is_the_same_with_and_without_the_decoded_cache(make_suite, tmp_path, capsys) -> None:
    from harness.train import TrialEnv, run_trial

    _suite, spec = _spec(make_suite, train={"epochs": 2, "batch_size": 400})
    env = TrialEnv(cache_dir=tmp_path / "cache", progress=False)
    cached = run_trial(spec, env)
    assert "decoded cache: decoding demo-digits/train800 (800 images -> " in capsys.readouterr().err
    plain = run_trial(spec, TrialEnv(cache_dir=tmp_path / "cache", progress=False, feature_cache=False))
    assert cached["decoded_cache"] == "used" and plain["decoded_cache"] == "off: --no-cache"
    _same(cached, plain)
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npy"))) == 4  # images + labels of two splits
    phases = cached["cost"]["phases_s"]
    assert {"data_setup", "model_build", "cost_accounting", "data", "steps", "evaluation", "record"} <= set(phases)
    assert sum(phases.values()) <= cached["wall_time_s"] + 0.05
    again = run_trial(spec, env)  # read back, not rebuilt
    assert "decoded cache: decoding" not in capsys.readouterr().err
    _same(again, plain)


def test_a_vtab_trial_of_real_jpegs_is_the_same_with_and_without_it(make_suite, tmp_path) -> None:
    from test_vtab import make_vtab_tree

    from harness.train import TrialEnv, run_trial

    root = make_vtab_tree(tmp_path / "vtab-1k", folders=("dtd",), classes=3,
                          sizes={"train800": 24, "val200": 12, "train800val200": 0, "test": 0})
    suite, spec = _spec(make_suite, task="vtab-dtd", data={"image_size": 32, "strict_counts": False, "root": str(root)},
                        train={"epochs": 2, "batch_size": 8}, backbone=TINY_BACKBONE)
    cached = run_trial(spec, TrialEnv.for_suite(suite, tmp_path / "cache", progress=False))
    plain = run_trial(spec, TrialEnv.for_suite(suite, tmp_path / "cache", progress=False, feature_cache=False))
    assert cached["decoded_cache"] == "used"
    _same(cached, plain)


def test_the_record_says_why_not_and_a_full_disk_is_said_once(make_suite, tmp_path, monkeypatch, capsys) -> None:
    import shutil
    from collections import namedtuple

    from harness.train import TrialEnv, run_trial

    _suite, spec = _spec(make_suite, method="linear", train={"epochs": 1, "batch_size": 100})
    record = run_trial(spec, TrialEnv(cache_dir=tmp_path / "c0", progress=False))
    assert record["decoded_cache"] == "off: the frozen-computation cache serves"
    _suite, spec = _spec(make_suite, train={"epochs": 1, "batch_size": 100, "decoded_cache": False})
    assert run_trial(spec, TrialEnv(cache_dir=tmp_path / "c1", progress=False))["decoded_cache"] == \
        "off: train.decoded_cache: false"

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1, 1, 1000))
    _suite, spec = _spec(make_suite, train={"epochs": 1, "batch_size": 100})
    first = run_trial(spec, TrialEnv(cache_dir=tmp_path / "c2", progress=False))
    second = run_trial(spec, TrialEnv(cache_dir=tmp_path / "c2", progress=False))
    assert first["status"] == "ok" and first["decoded_cache"].startswith("off: the disk would not hold it")
    assert second["decoded_cache"] == first["decoded_cache"]
    assert capsys.readouterr().err.count("decoded cache: the disk would not hold it") == 1


def test_normalized_keeps_the_models_names_and_passes_floats() -> None:
    import torch
    from torch import nn

    from harness.decoded import Normalized

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    wrapped = Normalized(model, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = torch.randint(0, 256, (2, 3, 2, 2), dtype=torch.uint8)
    from torchvision.transforms import functional as F

    expected = torch.stack([F.normalize(F.to_tensor(F.to_pil_image(i)), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
                            for i in x])
    assert torch.equal(wrapped.normalize(x), expected)
    assert torch.equal(wrapped(expected), model(expected))


@pytest.mark.slow
def test_bench_loader_and_trial_run(tmp_path, capsys) -> None:
    from harness.cli import main

    assert main(["bench", "--loader", "--suite", "demo", "--task", "demo-digits", "--workers", "0",
                 "--out", str(tmp_path / "l.csv")]) == 0
    assert main(["bench", "--trial", "--suite", "demo", "--method", "linear", "--task", "demo-digits", "--epochs",
                 "1", "--no-progress", "--out", str(tmp_path / "t.json")]) == 0
    assert "steps" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["vtab-dtd", "fgvc-cub"])
def test_a_tasks_decoded_transform_normalised_is_its_transform(name) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from harness.api import TASKS, DataContext
    from harness.decoded import Normalized

    task = TASKS.get(name)
    ctx = DataContext(data_root=None, cache_dir=None, image_size=32, settings={}, mean=(0.5, 0.4, 0.3),
                      std=(0.2, 0.25, 0.3))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8))
    decoded = task.decoded_transform(ctx, False)(image)
    assert decoded.dtype == torch.uint8
    wrapped = Normalized(torch.nn.Identity(), *task.input_normalization(ctx))
    assert torch.equal(wrapped(decoded[None])[0], task.transform(ctx, False)(image))
    assert (task.decoded_transform(ctx, True) is None) == (not task.deterministic_train)


def test_random_training_transforms_leave_only_the_evaluation_split_decoded(make_suite, tmp_path,
                                                                             monkeypatch) -> None:
    from harness.api import TASKS
    from harness.train import TrialEnv, run_trial

    _suite, spec = _spec(make_suite, train={"epochs": 1, "batch_size": 200})
    monkeypatch.setattr(TASKS.get("demo-digits"), "deterministic_train", False)
    cached = run_trial(spec, TrialEnv(cache_dir=tmp_path / "cache", progress=False))
    plain = run_trial(spec, TrialEnv(cache_dir=tmp_path / "cache", progress=False, feature_cache=False))
    assert cached["decoded_cache"] == "eval only: task demo-digits's training transforms are not deterministic"
    _same(cached, plain)
