"""The frozen-computation cache: a model whose trainable part sits on top of a frozen one is trained on the frozen
part's outputs, computed once and kept on disk, instead of running the frozen backbone on every image of every
epoch, grid point and seed.

A method declares it (:attr:`harness.api.Method.frozen_features`): ``"pooled"`` says its model is
``head(backbone(x))`` with every backbone weight frozen (the linear probe). The engine then computes
``backbone(x)`` (the pooled features) for a split once per (backbone weights fingerprint, task, data fingerprint,
split, train/eval transform, image size, normalisation and preprocessing, precision), writes them under
``<cache>/features/`` as ``.npy`` (temporary file + rename, under a file lock, so two processes building the same
features at once produce one file), reads them memory-mapped, and trains and evaluates ``model.head`` on them
through the same loop, batches and shuffling as the images would give: the per-epoch metrics are those of the
uncached trial up to float rounding (the frozen forward runs at another batch size).

It is exact only where the frozen part is deterministic, so it is refused, with the reason in the record
(``"feature_cache": "off: <reason>"``), when the task's training transforms are random
(:attr:`harness.api.Task.deterministic_train` false: FGVC's crops and flips), when the frozen backbone runs in
training mode (``frozen_eval: false``: drop-path), when anything in the backbone trains, for a task that is not
classification, and when turned off (``harness run --no-cache``, or the suite's ``train.feature_cache: false``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness.files import atomic_save_npy, file_lock
from harness.loop import autocast_for

#: bump when what a cached file holds changes
FEATURES_VERSION = 1


def refusal(method: Any, task: Any, model: nn.Module, train: dict[str, Any], enabled: bool = True) -> str | None:
    """Why the cache cannot serve this trial (None: it can)."""
    if not enabled:
        return "--no-cache"
    if train.get("feature_cache", True) is False:
        return "train.feature_cache: false"
    kind = getattr(method, "frozen_features", None)
    if kind != "pooled":
        return f"method {method.name} declares no cacheable frozen part"
    if task.kind != "classification":
        return f"{task.kind} task"
    if not getattr(task, "deterministic_train", False):
        return f"task {task.name}'s training transforms are not deterministic"
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Module):
        return "the model has no backbone and head to split"
    if any(p.requires_grad for p in backbone.parameters()):
        return "backbone weights train"
    was_training = model.training
    model.train()
    training = any(m.training for m in backbone.modules())
    model.train(was_training)
    if training:
        return "the frozen backbone runs in training mode (frozen_eval: false: drop-path is random)"
    return None


class OnFeatures(nn.Module):
    """The model's head alone, applied to cached features; its parameter names are the full model's
    (``head.weight``, ...), so checkpoints and kept weights fit either."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def module_fingerprint(module: nn.Module) -> str:
    """A hash of every tensor of the module's state (names, shapes, dtypes, values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def features_key(parts: dict[str, Any]) -> str:
    text = json.dumps({"version": FEATURES_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class _MappedFeatures(Dataset):
    """Items ``(feature row, label)`` from memory-mapped ``.npy`` arrays."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.features[i])), int(self.labels[i])


def cached_features(backbone: nn.Module, dataset: Dataset, path: Path, *, batch_size: int, device: str,
                    amp: bool, progress: bool = True, label: str = "") -> Dataset:
    """The dataset's pooled features under ``path`` (``<path>.npy`` and ``<path>.labels.npy``), computed now if
    missing, as a dataset of ``(features, label)`` items read memory-mapped."""
    features_file = path.with_name(path.name + ".npy")
    labels_file = path.with_name(path.name + ".labels.npy")
    if not (features_file.exists() and labels_file.exists()):
        with file_lock(path.with_name(path.name + ".lock")):
            if not (features_file.exists() and labels_file.exists()):  # another process may have built them
                _build(backbone, dataset, features_file, labels_file, batch_size, device, amp, progress, label)
    features = np.load(features_file, mmap_mode="r")
    labels = np.load(labels_file, mmap_mode="r")
    return _MappedFeatures(features, labels)


def _build(backbone: nn.Module, dataset: Dataset, features_file: Path, labels_file: Path, batch_size: int,
           device: str, amp: bool, progress: bool, label: str) -> None:
    n = len(dataset)
    dim = int(getattr(backbone, "num_features", 0) or getattr(backbone, "embed_dim", 0))
    if progress:
        size = f"{n * dim * 4 / 2**20:.1f} MB" if dim else f"{n} rows"
        print(f"feature cache: computing {label} ({n} images -> {size}) into {features_file.parent}",
              file=sys.stderr)
    was_training = backbone.training
    backbone.eval()
    chunks, targets = [], []
    try:
        with torch.inference_mode():
            for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                with autocast_for(device, amp):
                    out = backbone(images.to(device))
                chunks.append(out.float().cpu().numpy())
                targets.append(np.asarray(labels, dtype=np.int64))
    finally:
        backbone.train(was_training)
    atomic_save_npy(labels_file, np.concatenate(targets))
    atomic_save_npy(features_file, np.concatenate(chunks).astype(np.float32))  # written last: its presence = done


def feature_loaders(model: nn.Module, loaders: dict[str, DataLoader], keys: dict[str, dict[str, Any]],
                    cache_dir: Path, device: str, amp: bool, progress: bool = True
                    ) -> tuple[nn.Module, dict[str, DataLoader]]:
    """The head (:class:`OnFeatures`) and, for each image loader, a loader over the cached features with the same
    batch size, shuffling, generator, drop_last and workers, so the head sees the batches the images would give."""
    backbone = model.backbone
    out: dict[str, DataLoader] = {}
    for name, loader in loaders.items():
        key = features_key(keys[name])
        dataset = cached_features(backbone, loader.dataset, cache_dir / "features" / key,
                                  batch_size=max(1, int(loader.batch_size or 1)), device=device, amp=amp,
                                  progress=progress, label=f"{keys[name].get('task')}/{keys[name].get('split')}")
        shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
        out[name] = DataLoader(dataset, batch_size=loader.batch_size, shuffle=shuffle, generator=loader.generator,
                               drop_last=loader.drop_last, num_workers=0, pin_memory=loader.pin_memory)
    return OnFeatures(model.head), out
