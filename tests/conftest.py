"""Shared test fixtures: offline hub, a per-session cache, and tiny suites on the demo tasks."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let timm/peft reach for a hub (each retry costs ~50 s)
os.environ.setdefault("HARNESS_DEVICE", "cpu")

#: a tiny timm ViT for 32x32 images: fast enough for many trials per test
TINY_BACKBONE: dict[str, Any] = {
    "name": "vit_tiny_patch16_224",
    "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "weights": None,
}

#: a TOAST pre-tuning stage small enough for a test: 1 epoch on the 1,000 upstream validation images
TINY_PRETUNE: dict[str, Any] = {"task": "demo-upstream", "split": "val", "epochs": 1, "batch_size": 250, "lr": 0.001,
                                "warmup_epochs": 0, "cooldown_epochs": 0, "auto": True, "checkpoint": None}

TINY_SUITE: dict[str, Any] = {
    "suite": "tiny",
    "tasks": ["demo-digits", "demo-position"],
    "methods": ["linear", "finetune"],
    "backbone": TINY_BACKBONE,
    "data": {"image_size": 32},
    "train": {"epochs": 1, "batch_size": 100, "eval_batch_size": 500, "lr_scaling": "batch/256",
              "warmup_epochs": 0},
    "protocol": {"kind": "search-then-final", "search": {"train": "train800", "eval": "val200", "seed": 42},
                 "final": {"train": "train800val200", "eval": "test"}, "seeds": [42, 44]},
    "grids": {"linear": {"lr": [1.0, 0.1], "weight_decay": [0.0]},
              "finetune": {"lr": [0.001, 0.0001], "weight_decay": [0.0]}},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's waiting threads slow
    every op ~10x. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: demo backbones pre-trained by earlier pytest runs on this machine. A file's name is the hash of its recipe (model,
#: upstream data version, schedule, normalisation), so a later run may reuse it instead of pre-training again; a
#: changed recipe is a new name. ``HARNESS_TEST_ARTIFACTS`` moves the folder; a fresh machine (CI) pre-trains once.
KEPT_ARTIFACTS = Path(os.environ.get("HARNESS_TEST_ARTIFACTS",
                                     Path.home() / ".cache" / "harness-tests" / "artifacts"))
KEPT_PATTERN = "demo-backbone-*.pth"


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("harness-cache")
    artifacts = cache / "artifacts"
    artifacts.mkdir()
    for kept in KEPT_ARTIFACTS.glob(KEPT_PATTERN):
        shutil.copyfile(kept, artifacts / kept.name)
    yield cache
    try:
        KEPT_ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for made in artifacts.glob(KEPT_PATTERN):
            if not (KEPT_ARTIFACTS / made.name).exists():
                partial = KEPT_ARTIFACTS / f".{made.name}.{os.getpid()}.tmp"
                shutil.copyfile(made, partial)
                os.replace(partial, KEPT_ARTIFACTS / made.name)
    except OSError:  # a read-only home only costs the next run its pre-training
        pass


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, session_cache, tmp_path):
    """Every test gets its own results folder and shares one cache (generated datasets, demo weights)."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(session_cache))
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))


@pytest.fixture
def make_suite(tmp_path):
    """Write a suite file: ``make_suite(**changes)`` deep-merges changes into TINY_SUITE; returns its path."""

    def make(name: str = "tiny", **changes: Any) -> Path:
        raw = copy.deepcopy(TINY_SUITE)
        raw["suite"] = name
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key].update(value)
            else:
                raw[key] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


@pytest.fixture
def fixed_suite(make_suite):
    """A suite with the fixed protocol (as FGVC): its finals' hyperparameters are known without a search
    (``make(**changes)`` returns its path; fill cells with ``records.put``)."""
    from records import FIXED

    def make(**changes):
        return str(make_suite(**{**FIXED, **changes}))

    return make
