"""The decoded-input cache: a split whose inputs are the same every epoch (VTAB-1k's resize-only training split, the
demo, every task's evaluation splits) is decoded, resized and stored once as uint8 at the input size, memory-mapped,
and each batch is scaled and normalised on the device, instead of decoding and resizing every JPEG in every epoch
of every grid point and seed.

A task declares it (:meth:`harness.api.Task.decoded_dataset`: the split's uint8 3 x H x W inputs before
normalisation, and :meth:`harness.api.Task.input_normalization`: the mean and std its ``dataset`` applies); the
engine knows no task by name. The cache rides the frozen-computation cache's engine (:mod:`harness.features`): the
same key style (a hash of the task, its version, the data fingerprint, split, image size, data settings and root),
the same files under ``<cache>/decoded/`` (``<key>.0.npy`` filled in place through a memory map and renamed, the
labels beside it, the manifest last), the same build under a file lock (one process builds, the others wait and
read), the same refusal when the disk would not hold it (said once; the trial runs from the images), and the record's
``decoded_cache`` field says whether it served and why not: ``"used"``, ``"eval only: <why the training split is
not>"`` or ``"off: <reason>"``.

It changes nothing a trial computes: the model sees ``(x.float() / 255 - mean) / std``, the float32 operations of
``ToTensor`` and ``Normalize`` (tests/test_decoded_cache.py: the same per-epoch metrics with and without it). The
training loader keeps the images' batch size, shuffling generator and drop_last. Where the frozen-computation cache
serves a trial it is not needed, and is not used. ``harness run --no-cache`` and ``train.decoded_cache: false`` turn
it off.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness.features import CacheRefused, SplitCache, _whole_batch, ensure_room, features_key, human_bytes
from harness.files import atomic_save_npy, atomic_write_json, file_lock
from harness.loop import train_mode

#: bump when what a decoded file holds changes
DECODED_VERSION = 1
_SAID: set[str] = set()  # refusals already printed in this process (a disk too small is said once)


def refusal(task: Any, train: dict[str, Any], enabled: bool = True) -> str | None:
    """Why no split of this trial may be served decoded (None: the evaluation split at least may)."""
    if not enabled:
        return "--no-cache"
    if train.get("decoded_cache", True) is False:
        return "train.decoded_cache: false"
    if task.kind != "classification":
        return f"{task.kind} task"
    if task.collate(True) is not None or task.collate(False) is not None:
        return f"task {task.name} collates its own batches"
    return None


class DecodedSplit(Dataset):
    """A split's uint8 inputs, memory-mapped; ``__getitems__`` reads a whole batch with one fancy index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.images[i])), int(self.labels[i])

    def __getitems__(self, indices: list[int]):
        idx = np.asarray(indices, dtype=np.int64)
        return (torch.from_numpy(np.ascontiguousarray(self.images[idx])),
                torch.from_numpy(np.asarray(self.labels[idx], dtype=np.int64)))


def open_split(cache: SplitCache) -> DecodedSplit:
    return DecodedSplit(np.load(cache.array(0), mmap_mode="r"), np.load(cache.labels, mmap_mode="r"))


class Normalized(nn.Module):
    """The model with its inputs normalised on the device: a uint8 batch becomes ``(x / 255 - mean) / std`` in
    float32 before ``model``; a float batch (a split not served decoded) passes as it is. Its submodules and
    parameters are the model's own under the same names (as :class:`harness.features.OnFrozen`), so the optimiser,
    checkpoints and kept weights see one model."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_stats", (torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1),
                                            torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)))
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats
        if mean.device != x.device:  # moved once, not per batch
            mean, std = mean.to(x.device), std.to(x.device)
            object.__setattr__(self, "_stats", (mean, std))
        return x.to(torch.float32).div(255).sub_(mean).div_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model(self.normalize(x) if x.dtype == torch.uint8 else x)

    def train(self, mode: bool = True) -> "Normalized":
        train_mode(self._model, mode)
        self.training = mode
        return self


def build_split(dataset: Dataset, cache: SplitCache, shape: tuple[int, ...], progress: bool,
                workers: int = 0) -> None:
    """Decode one split into ``cache`` (the caller holds the lock): filled in place through a memory map under a
    temporary name and renamed; labels next, the manifest last."""
    from tqdm.auto import tqdm

    n = len(dataset)
    tmp = cache.folder / f".{cache.key}.0.npy.tmp"
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *shape))
    labels = np.empty(n, dtype=np.int64)
    bar = tqdm(total=n, desc=f"decoding {cache.label}", unit="img", leave=False, disable=not progress,
               dynamic_ncols=True)
    try:
        start = 0
        for batch, targets in DataLoader(dataset, batch_size=64, shuffle=False, num_workers=workers):
            stop = start + batch.shape[0]
            if batch.dtype != torch.uint8 or tuple(batch.shape[1:]) != shape:
                raise CacheRefused(f"{cache.label}: decoded inputs are not uint8 {shape} "
                                   f"({batch.dtype} {tuple(batch.shape[1:])})")
            images[start:stop] = batch.numpy()
            labels[start:stop] = np.asarray(targets, dtype=np.int64)
            bar.update(stop - start)
            start = stop
        images.flush()
        del images
        os.replace(tmp, cache.array(0))
        atomic_save_npy(cache.labels, labels)
        atomic_write_json(cache.manifest, {"version": DECODED_VERSION, "arrays": 1, "count": n,
                                           "shapes": [list(shape)], "dtype": "uint8"})
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)


def _workers(item_seconds: float) -> int:
    """Decoding workers for a build: the CPUs this process may use, up to 8; none where an item is read in under
    a millisecond (generated tensors: forking workers would cost more than it saves)."""
    if item_seconds < 1e-3:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus) if cpus > 1 else 0


def split_caches(folder: Path, keys: dict[str, dict[str, Any]]) -> dict[str, SplitCache]:
    return {name: SplitCache(folder, features_key({"decoded": DECODED_VERSION, **key}),
                             f"{key.get('task')}/{key.get('split')}", "uint8") for name, key in keys.items()}


def ensure_built(datasets: dict[str, Dataset], caches: dict[str, SplitCache], progress: bool = True) -> None:
    """Build the splits not cached yet (their size printed first); :class:`CacheRefused` when the disk would not
    hold them (said once per folder and process)."""
    missing = [name for name, cache in caches.items() if not cache.built()]
    if not missing:
        return
    folder = caches[missing[0]].folder
    shapes, item_seconds = {}, 0.0
    for name in missing:
        t0 = time.perf_counter()
        shapes[name] = tuple(datasets[name][0][0].shape)
        item_seconds = max(item_seconds, time.perf_counter() - t0)
    sizes = {name: (int(np.prod(shapes[name])) + 8) * len(datasets[name]) for name in missing}
    ensure_room(folder, sum(sizes.values()), "decoded cache", "reading the images instead", said=_SAID)
    for name in missing:
        cache = caches[name]
        with file_lock(cache.lock):
            if cache.built():  # another process built it while this one waited
                continue
            print(f"decoded cache: decoding {cache.label} ({len(datasets[name])} images -> "
                  f"{human_bytes(sizes[name])}, uint8) into {folder}", file=sys.stderr)
            build_split(datasets[name], cache, shapes[name], progress, _workers(item_seconds))


def decoded_loaders(model: nn.Module, task: Any, ctx: Any, splits: dict[str, str], loaders: dict[str, DataLoader],
                    keys: dict[str, dict[str, Any]], cache_dir: Path, progress: bool = True
                    ) -> tuple[nn.Module, dict[str, DataLoader], str]:
    """(the model to fit, its loaders, the record's ``decoded_cache``): each loader of ``loaders`` (``train``,
    ``eval``, on the splits ``splits`` names) that may be served decoded is replaced by one over the cached uint8
    inputs with the same batch size, shuffling, generator and drop_last, and the model normalises them on the
    device (:class:`Normalized`). Raises :class:`CacheRefused` when no split can be served."""
    why_not_train = None if getattr(task, "deterministic_train", False) else \
        f"task {task.name}'s training transforms are not deterministic"
    wanted = [name for name in loaders if name != "train" or why_not_train is None]
    datasets = {}
    for name in wanted:
        found = task.decoded_dataset(splits[name], ctx, train=name == "train")
        if found is None:
            raise CacheRefused(f"task {task.name} gives no decoded inputs")
        datasets[name] = found
    folder = Path(cache_dir) / "decoded"
    folder.mkdir(parents=True, exist_ok=True)
    caches = split_caches(folder, {name: keys[name] for name in wanted})
    ensure_built(datasets, caches, progress)
    out = dict(loaders)
    for name in wanted:
        loader = loaders[name]
        shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
        out[name] = DataLoader(open_split(caches[name]), batch_size=loader.batch_size, shuffle=shuffle,
                               generator=loader.generator, drop_last=loader.drop_last, collate_fn=_whole_batch,
                               num_workers=0, pin_memory=loader.pin_memory)
    mean, std = task.input_normalization(ctx)
    return Normalized(model, mean, std), out, "used" if why_not_train is None else f"eval only: {why_not_train}"


def decoded_dataset_for_bench(task: Any, split: str, ctx: Any, train: bool, dataset: Dataset,
                              cache_dir: Path | None = None) -> Dataset | None:
    """``harness bench --loader``: the split's decoded cache (built first where missing; ``dataset`` may be the
    first N items of the split, then only those are cached), or None where the task gives no decoded inputs or a
    training split is not deterministic."""
    if train and not getattr(task, "deterministic_train", False):
        return None
    decoded = task.decoded_dataset(split, ctx, train)
    if decoded is None:
        return None
    if isinstance(dataset, torch.utils.data.Subset):
        decoded = torch.utils.data.Subset(decoded, dataset.indices)
    key = {"task": task.name, "split": split, "train": train, "bench_items": len(decoded),
           "data": task.fingerprint(split, ctx), "image_size": ctx.image_size, "settings": ctx.settings,
           "data_root": str(ctx.data_root)}
    folder = Path(cache_dir or ctx.cache_dir) / "decoded"
    folder.mkdir(parents=True, exist_ok=True)
    caches = split_caches(folder, {"split": key})
    ensure_built({"split": decoded}, caches, progress=False)
    return open_split(caches["split"])
