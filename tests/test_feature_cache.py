"""The frozen-computation cache (harness/features.py): the linear probe trains its head on cached pooled features
and TOAST its top-down part on the cached first pass where the task's training transforms are deterministic, with
the same per-epoch metrics as without the cache; it is refused, with the reason in the record, everywhere else.

Stated tolerances: float32 storage is exact up to float rounding (the frozen part runs at another batch size):
train loss within 1e-4 relative and the metric within 1e-4 points for the linear probe, and within one evaluation
image (0.5 points of 200) for TOAST, whose second pass sees the rounding. float16 storage: the metric within 1 point
and the train loss within 1 % each epoch.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from harness.api import METHODS, TASKS


def _trial(make_suite, method: str = "linear", train: dict | None = None, hparams: dict | None = None,
           epochs: int = 3):
    from conftest import TINY_PRETUNE
    from harness.plan import Cell, final_specs, fixed_hparams
    from harness.sweep import load_suite

    fixed = {method: {"*": {"lr": 0.5, "weight_decay": 0.001, **(hparams or {})}}}
    stage = {"pretune": TINY_PRETUNE} if METHODS.get(method).needs else {}  # toast: pre-tuned once, cached
    suite = load_suite(str(make_suite(
        methods=[method], grids=None, fixed=fixed, train={"epochs": epochs, **(train or {})},
        protocol={"kind": "fixed", "final": {"train": "train800", "eval": "val200"}, "seeds": [42]}, **stage)))
    cell = Cell(method, "demo-digits")
    return final_specs(suite, cell, fixed_hparams(suite, cell))[0]


def _assert_same_curve(a: dict, b: dict, loss_rel: float, metric_abs: float) -> None:
    assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
    assert len(a["curve"]) == len(b["curve"]) > 0
    for x, y in zip(a["curve"], b["curve"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=loss_rel)
        assert x["eval"] == pytest.approx(y["eval"], abs=metric_abs)


def test_a_linear_trial_gives_the_same_curve_with_and_without_the_cache(make_suite, tmp_path, capsys) -> None:
    from harness.train import TrialEnv, run_trial

    spec = _trial(make_suite)
    cache = tmp_path / "cache"
    cached = run_trial(spec, TrialEnv(cache_dir=cache, progress=True))
    err = capsys.readouterr().err
    assert "feature cache: computing demo-digits/train800 (800 images -> " in err  # size printed first
    plain = run_trial(spec, TrialEnv(cache_dir=cache, progress=False, feature_cache=False))
    assert cached["feature_cache"] == "used" and plain["feature_cache"] == "off: --no-cache"
    _assert_same_curve(cached, plain, loss_rel=1e-4, metric_abs=1e-4)
    assert cached["params"] == plain["params"] and cached["cost"]["forward_flops"] == plain["cost"]["forward_flops"]

    files = sorted(p.name for p in (cache / "features").glob("*.npy"))
    assert len(files) == 4  # features + labels of the train and the eval split
    again = run_trial(spec, TrialEnv(cache_dir=cache, progress=True))  # read back, not rebuilt
    assert "computing" not in capsys.readouterr().err
    assert [e["eval"] for e in again["curve"]] == [e["eval"] for e in cached["curve"]]
    assert sorted(p.name for p in (cache / "features").glob("*.npy")) == files


@pytest.mark.parametrize("method", ["toast-nopretune", "toast-late"])
def test_a_toast_trial_gives_the_same_curve_on_the_cached_first_pass(method, make_suite, tmp_path) -> None:
    """TOAST's first pass (and toast-late's shared lower half) comes from the cache; what follows it trains."""
    from harness.train import TrialEnv, run_trial

    from harness.store import default_cache_dir

    spec = _trial(make_suite, method, epochs=2)
    cache = default_cache_dir()  # the session's: toast-late's pre-tuned module is built there once
    cached = run_trial(spec, TrialEnv(cache_dir=cache, progress=False))
    plain = run_trial(spec, TrialEnv(cache_dir=cache, progress=False, feature_cache=False))
    assert cached["feature_cache"] == "used", cached["feature_cache"]
    assert plain["feature_cache"] == "off: --no-cache"
    _assert_same_curve(cached, plain, loss_rel=1e-3, metric_abs=0.5)
    arrays = list((cache / "features").glob("*.1.npy"))  # (shared, top) per split: arrays .0 and .1
    assert len(arrays) >= 2


def test_toast_variants_with_the_same_first_pass_share_one_cache(make_suite, tmp_path) -> None:
    from harness.train import TrialEnv, run_trial

    env = TrialEnv(cache_dir=tmp_path / "cache", progress=False)
    first = run_trial(_trial(make_suite, "toast-nopretune", epochs=1), env)
    folder = tmp_path / "cache" / "features"
    built = sorted(p.name for p in folder.glob("*.json"))
    assert first["feature_cache"] == "used" and len(built) == 2
    assert METHODS.get("toast-nopretune").frozen_features == METHODS.get("toast").frozen_features
    assert METHODS.get("toast-late").frozen_features != METHODS.get("toast").frozen_features


def test_float16_storage_stays_within_its_stated_tolerance(make_suite, tmp_path) -> None:
    from harness.train import TrialEnv, run_trial

    for method in ("linear", "toast-nopretune"):
        env = TrialEnv(cache_dir=tmp_path / method, progress=False)
        exact = run_trial(_trial(make_suite, method, epochs=2), env)
        half = run_trial(_trial(make_suite, method, train={"feature_cache_dtype": "float16"}, epochs=2), env)
        assert half["feature_cache"] == exact["feature_cache"] == "used"
        _assert_same_curve(half, exact, loss_rel=1e-2, metric_abs=1.0)
        sizes = {p.name.split(".")[0]: p.stat().st_size for p in (tmp_path / method / "features").glob("*.0.npy")}
        assert len(sizes) == 4  # float32 and float16 files are separate cache entries
        small, large = sorted(sizes.values())[:2], sorted(sizes.values())[2:]
        assert max(small) < 0.6 * min(large)


def test_a_disk_that_would_not_hold_the_cache_gives_a_message_and_an_uncached_trial(make_suite, tmp_path,
                                                                                     monkeypatch, capsys) -> None:
    import harness.features as features
    from harness.train import TrialEnv, run_trial

    class Usage:
        total, used, free = 10**9, 10**9 - 1000, 1000

    monkeypatch.setattr(features.shutil, "disk_usage", lambda path: Usage())
    record = run_trial(_trial(make_suite, epochs=1), TrialEnv(cache_dir=tmp_path / "cache", progress=False))
    assert record["status"] == "ok"
    assert record["feature_cache"].startswith("off: the disk would not hold it: ")
    assert "1000 B free" in record["feature_cache"] and "float16 halves it" in record["feature_cache"]
    assert "training on images instead" in capsys.readouterr().err
    assert not list((tmp_path / "cache" / "features").glob("*.npy"))


def test_two_processes_asking_at_once_build_the_features_once(tmp_path, monkeypatch) -> None:
    """Threads stand in for processes: the lock is an flock on a file, which two opens contend for either way."""
    from torch.utils.data import DataLoader, TensorDataset

    import harness.features as features

    builds: list[str] = []
    real = features.build_split

    def slow_counting(model, dataset, cache, *args, **kwargs):
        builds.append(cache.key)
        threading.Event().wait(0.3)  # the other thread arrives while this one builds
        return real(model, dataset, cache, *args, **kwargs)

    monkeypatch.setattr(features, "build_split", slow_counting)
    model = _Split()
    data = TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)))
    keys = {"train": {"task": "t", "split": "train"}, "eval": {"task": "t", "split": "eval"}}
    got: list = []

    def ask() -> None:
        loaders = {"train": DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)),
                   "eval": DataLoader(data, batch_size=16)}
        got.append(features.frozen_loaders(model, loaders, keys, tmp_path, "cpu", amp=False, progress=False))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and len(builds) == 2 and len(set(builds)) == 2  # each split built once, by one of them
    batches = [next(iter(loaders["train"])) for _, loaders in got]
    assert torch.equal(batches[0][0][0], batches[1][0][0])  # both read the same features in the same order
    with torch.no_grad():
        expected = model.backbone(data.tensors[0])
    first, labels = next(iter(got[0][1]["eval"]))
    assert torch.allclose(first[0], expected[:16]) and torch.equal(labels, data.tensors[1][:16])


def test_the_cache_is_refused_with_the_reason_in_the_record(make_suite, tmp_path) -> None:
    from harness.train import TrialEnv, run_trial

    env = TrialEnv(cache_dir=tmp_path / "cache", progress=False)
    off = run_trial(_trial(make_suite, train={"feature_cache": False}, epochs=1), env)
    assert off["feature_cache"] == "off: train.feature_cache: false"
    drop_path = run_trial(_trial(make_suite, hparams={"frozen_eval": False}, epochs=1), env)
    assert drop_path["status"] == "ok"
    assert drop_path["feature_cache"].startswith("off: the frozen backbone runs in training mode")
    assert not (tmp_path / "cache" / "features").exists()


class _Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 2)
        self.prompt = nn.Parameter(torch.zeros(4))
        self.frozen_modules = ("backbone",)  # the frozen backbone stays in eval mode (frozen_eval)

    def frozen_forward(self, x):
        return self.backbone(x)

    def from_frozen(self, features):
        return self.head(features + self.prompt)


def test_refusals_name_the_method_and_the_task() -> None:
    from harness.features import refusal

    class Random:
        kind, name, deterministic_train = "classification", "fgvc-like", False

    class Unsplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 2)

    linear, finetune = METHODS.get("linear"), METHODS.get("finetune")
    task = TASKS.get("demo-digits")
    assert task.deterministic_train and TASKS.get("vtab-cifar").deterministic_train
    assert not TASKS.get("fgvc-cub").deterministic_train
    assert refusal(linear, task, _Split(), {}) is None
    assert refusal(METHODS.get("toast"), task, _Split(), {}) is None
    assert refusal(finetune, task, _Split(), {}) == "method finetune declares no cacheable frozen part"
    assert refusal(linear, Random(), _Split(), {}) == "task fgvc-like's training transforms are not deterministic"
    assert refusal(linear, task, _Split(), {}, enabled=False) == "--no-cache"
    assert refusal(linear, task, Unsplit(), {}).startswith("the model of linear has no backbone, frozen_forward")
    trains = _Split()
    trains.backbone.requires_grad_(True)
    assert refusal(linear, task, trains, {}) == "backbone weights train"
    assert refusal(linear, task, _Split(), {"feature_cache": False}) == "train.feature_cache: false"
    assert refusal(linear, TASKS.get("seg-voc"), _Split(), {}) == "segmentation task"


def test_the_model_on_cached_outputs_is_the_same_model() -> None:
    """OnFrozen holds the model's own parameters under the model's names, so the optimiser (built on the model),
    resumable checkpoints and kept weights fit either; train() keeps the frozen backbone in eval mode."""
    from harness.features import OnFrozen

    model = _Split()
    on = OnFrozen(model)
    assert [(n, id(p)) for n, p in on.named_parameters()] == [(n, id(p)) for n, p in model.named_parameters()]
    assert list(on.state_dict()) == list(model.state_dict())
    on.train()
    assert on.training and model.training and not model.backbone.training
    x = torch.randn(3, 4)
    assert torch.equal(on((model.frozen_forward(x),)), model.from_frozen(model.backbone(x)))


def test_the_run_header_says_which_methods_and_tasks_the_cache_can_serve(make_suite, tmp_path, capsys) -> None:
    from harness.cli import main
    from harness.commands.run import describe_cache
    from harness.sweep import load_suite
    from harness.train import TrialEnv

    suite = make_suite(methods=["linear", "finetune"])
    assert main(["run", "--suite", str(suite), "--dry-run"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("frozen-computation cache:"))
    assert line.startswith("frozen-computation cache: linear on every task (float32, ")  # finetune declares none
    assert main(["run", "--suite", str(suite), "--dry-run", "--no-cache"]) == 0
    assert "frozen-computation cache: off (--no-cache)" in capsys.readouterr().out.splitlines()
    loaded, env = load_suite(str(suite)), TrialEnv(cache_dir=tmp_path)
    assert describe_cache(loaded, env, ["linear"], ["fgvc-cub"]) == (
        "frozen-computation cache: not used (no task here has deterministic training transforms)")
    assert describe_cache(loaded, env, ["linear", "toast"], ["demo-digits", "fgvc-cub"]).startswith(
        "frozen-computation cache: linear, toast on 1 of 2 tasks")


def test_the_schema_offers_exactly_the_storage_dtypes_the_cache_writes() -> None:
    """harness/schema.py lists them by hand (it must not import numpy); the two lists must not drift."""
    from harness.features import STORAGE_DTYPES
    from harness.schema import TRAIN

    assert set(TRAIN["feature_cache_dtype"].choices) == set(STORAGE_DTYPES)
