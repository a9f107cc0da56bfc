"""The frozen-computation cache: a model whose trainable part sits on top of a frozen one is trained on the frozen
part's outputs, computed once and kept on disk, instead of running the frozen weights on every image of every
epoch, grid point and seed.

A method declares it (:attr:`harness.api.Method.frozen_features`, a name for what is frozen: ``"pooled"`` for the
linear probe's ``head(backbone(x))``, ``"first-pass"`` for TOAST's first pass) and its model splits itself in two:
``frozen_forward(images)`` (a tensor or a tuple of tensors per batch, computed by ``model.backbone``'s frozen weights
alone) and ``from_frozen(*tensors)`` (the rest: the model's output). The engine owns everything else, so a new
method gets the cache by declaring, not by writing cache code:

* it computes ``frozen_forward`` over a split once per (frozen part, backbone weights fingerprint, task, data
  fingerprint, split, transform, image size, normalisation and preprocessing, precision, storage dtype), with the
  model in eval mode under ``inference_mode``, and writes it under ``<cache>/features/<key>.<i>.npy`` (one array per
  tensor, written in place through a memory map, then renamed), the labels beside it and ``<key>.json`` last (its
  presence means done), all under a file lock, so two processes or SLURM jobs asking at once get one build: the
  first builds, the others wait and read;
* it prints the size before it builds, and refuses (the trial runs uncached) when the disk would not hold it;
* it reads the arrays memory-mapped and trains and evaluates :class:`OnFrozen` (the same parameters under the same
  names) through the same loop, batch size, shuffling generator and drop_last as the images would give, so the
  per-epoch metrics are the uncached trial's up to float rounding (the frozen part runs at another batch size).

Storage is float32 by default (exact). ``train.feature_cache_dtype: float16`` halves the disk and the reads; values
are read back as float32, and ``tests/test_feature_cache.py`` bounds what it changes (a build whose values leave
float16's range is refused).

It is exact only where the frozen part is deterministic, so it is refused, with the reason in the record
(``"feature_cache": "off: <reason>"``), when the task's training transforms are random
(:attr:`harness.api.Task.deterministic_train` false: FGVC's crops and flips), when the frozen backbone runs in
training mode (``frozen_eval: false``: drop-path), when a backbone weight trains, for a task that is not
classification, and when turned off (``harness run --no-cache``, or the suite's ``train.feature_cache: false``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness.files import atomic_save_npy, atomic_write_json, file_lock
from harness.loop import autocast_for, train_mode

#: bump when what a cached file holds changes
FEATURES_VERSION = 2
#: ``train.feature_cache_dtype`` values and their numpy storage type
STORAGE_DTYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16}
#: free disk kept beyond the cache's own size when deciding whether it fits
DISK_MARGIN_BYTES = 512 * 2**20


class CacheRefused(Exception):
    """The cache cannot serve this trial after all (its message is the reason recorded); the trial runs uncached."""


def ensure_room(folder: Path, needed: int, cache: str, instead: str, hint: str = "",
                said: set[str] | None = None) -> None:
    """Refuse a cache build (:class:`CacheRefused`, its reason for the record) when the disk under ``folder`` would
    not hold ``needed`` bytes and a margin; the reason goes to stderr with what the trial does ``instead``, once per
    folder when ``said`` (the folders already said in this process) is given."""
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN_BYTES <= free:
        return
    reason = f"the disk would not hold it: {human_bytes(needed)} needed in {folder}, {human_bytes(free)} free{hint}"
    if said is None or str(folder) not in said:
        if said is not None:
            said.add(str(folder))
        print(f"{cache}: {reason}; {instead}", file=sys.stderr)
    raise CacheRefused(reason)


def setting_refusal(train: dict[str, Any], enabled: bool = True) -> str | None:
    """Why the run's settings turn the cache off (``--no-cache``: ``enabled`` false; ``train.feature_cache``)."""
    if not enabled:
        return "--no-cache"
    if train.get("feature_cache", True) is False:
        return "train.feature_cache: false"
    return None


def method_refusal(method: Any) -> str | None:
    """Why the cache cannot serve any trial of ``method`` (it declares no frozen part)."""
    if not getattr(method, "frozen_features", None):
        return f"method {method.name} declares no cacheable frozen part"
    return None


def task_refusal(task: Any) -> str | None:
    """Why the cache cannot serve any trial on ``task`` (not classification, or random training transforms)."""
    if task.kind != "classification":
        return f"{task.kind} task"
    if not getattr(task, "deterministic_train", False):
        return f"task {task.name}'s training transforms are not deterministic"
    return None


def refusal(method: Any, task: Any, model: nn.Module, train: dict[str, Any], enabled: bool = True) -> str | None:
    """Why the cache cannot serve this trial (None: it can): the run's settings, the method and the task (known
    before any trial, as ``harness run``'s header says), then the built model (known only in the trial)."""
    reason = setting_refusal(train, enabled) or method_refusal(method) or task_refusal(task)
    if reason is not None:
        return reason
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module) or not all(
            callable(getattr(model, hook, None)) for hook in ("frozen_forward", "from_frozen")):
        return f"the model of {method.name} has no backbone, frozen_forward and from_frozen to split it by"
    if any(p.requires_grad for p in backbone.parameters()):
        return "backbone weights train"
    was_training = model.training
    train_mode(model)
    training = any(m.training for m in backbone.modules())
    train_mode(model, was_training)
    if training:
        return "the frozen backbone runs in training mode (frozen_eval: false: drop-path is random)"
    return None


def storage_dtype(train: dict[str, Any]) -> str:
    return str(train.get("feature_cache_dtype", "float32"))


class OnFrozen(nn.Module):
    """The model's trainable rest, applied to cached frozen outputs: ``forward(tensors) = model.from_frozen(*tensors)``.
    Its submodules and parameters are the model's own under the same names, so the optimiser, checkpoints and kept
    weights see one model either way; ``train``/``eval`` switch the model as the loop would
    (:func:`harness.loop.train_mode`: its declared frozen modules stay in eval mode)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: its children are registered below instead
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer)

    def forward(self, frozen: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self._model.from_frozen(*frozen)

    def train(self, mode: bool = True) -> "OnFrozen":
        # the loop switches modes every epoch; walking the whole backbone each time cost a cached linear-probe
        # trial 15 % of its time, so only a change is passed on (all switches of the model come through here)
        if getattr(self, "_applied", None) is not mode:
            train_mode(self._model, mode)
            object.__setattr__(self, "_applied", mode)
        self.training = mode
        return self


def as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


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


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


class CachedSplit(Dataset):
    """A split's cached frozen outputs, memory-mapped: item ``i`` is ``(tuple of float32 tensors, label)``;
    ``__getitems__`` reads a whole batch with one fancy index per array (the data loader calls it)."""

    def __init__(self, arrays: list[np.ndarray], labels: np.ndarray):
        self.arrays, self.labels = arrays, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return tuple(torch.from_numpy(np.asarray(a[i], dtype=np.float32)) for a in self.arrays), int(self.labels[i])

    def __getitems__(self, indices: list[int]):
        idx = np.asarray(indices, dtype=np.int64)
        return (tuple(torch.from_numpy(np.asarray(a[idx], dtype=np.float32)) for a in self.arrays),
                torch.from_numpy(np.asarray(self.labels[idx], dtype=np.int64)))


def _whole_batch(batch: Any) -> Any:
    """collate_fn for :class:`CachedSplit`: its ``__getitems__`` already returns a batch."""
    return batch


@dataclass
class SplitCache:
    """Where one split's frozen outputs live (``<folder>/<key>...``) and what they hold."""

    folder: Path
    key: str
    label: str
    dtype: str

    @property
    def manifest(self) -> Path:
        return self.folder / f"{self.key}.json"

    def array(self, i: int) -> Path:
        return self.folder / f"{self.key}.{i}.npy"

    @property
    def labels(self) -> Path:
        return self.folder / f"{self.key}.labels.npy"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.key}.lock"

    def built(self) -> bool:
        return self.manifest.exists()

    def open(self) -> CachedSplit:
        meta = json.loads(self.manifest.read_text())
        arrays = [np.load(self.array(i), mmap_mode="r") for i in range(int(meta["arrays"]))]
        return CachedSplit(arrays, np.load(self.labels, mmap_mode="r"))


def item_shapes(model: nn.Module, dataset: Dataset, device: str, amp: bool) -> list[tuple[int, ...]]:
    """The shapes of one item's frozen outputs (one image through ``frozen_forward``)."""
    image = dataset[0][0]
    with _evaluating(model), torch.inference_mode(), autocast_for(device, amp):
        out = as_tuple(model.frozen_forward(image.unsqueeze(0).to(device)))
    return [tuple(t.shape[1:]) for t in out]


def split_bytes(shapes: list[tuple[int, ...]], count: int, dtype: str) -> int:
    per_item = sum(int(np.prod(s, dtype=np.int64)) for s in shapes) * np.dtype(STORAGE_DTYPES[dtype]).itemsize
    return per_item * count + 8 * count  # + the int64 labels


class _evaluating:
    """The model in eval mode for the block, then back to what it was."""

    def __init__(self, model: nn.Module):
        self.model, self.was = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        train_mode(self.model, self.was)


def build_split(model: nn.Module, dataset: Dataset, cache: SplitCache, shapes: list[tuple[int, ...]], *,
                batch_size: int, device: str, amp: bool, progress: bool) -> None:
    """Compute and write one split's frozen outputs (the caller holds the lock). Each array is filled in place
    through a memory map under a temporary name and renamed; the manifest goes last."""
    n, dtype = len(dataset), STORAGE_DTYPES[cache.dtype]
    tmp = [cache.folder / f".{cache.key}.{i}.npy.tmp" for i in range(len(shapes))]
    arrays = [np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, *shape))
              for path, shape in zip(tmp, shapes)]
    labels = np.empty(n, dtype=np.int64)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"caching {cache.label}", unit="img", leave=False, disable=not progress,
               dynamic_ncols=True)
    try:
        start = 0
        with _evaluating(model), torch.inference_mode():
            for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                with autocast_for(device, amp):
                    out = as_tuple(model.frozen_forward(images.to(device)))
                stop = start + images.shape[0]
                for array, tensor in zip(arrays, out):
                    values = tensor.float().cpu().numpy().astype(dtype)
                    if not np.isfinite(values).all():
                        raise CacheRefused(f"frozen outputs leave {cache.dtype}'s range (use float32)")
                    array[start:stop] = values
                labels[start:stop] = np.asarray(targets, dtype=np.int64)
                bar.update(stop - start)
                start = stop
        for i, (array, path) in enumerate(zip(arrays, tmp)):
            array.flush()
            os.replace(path, cache.array(i))  # the open map follows the renamed file
        arrays.clear()
        atomic_save_npy(cache.labels, labels)
        atomic_write_json(cache.manifest, {"version": FEATURES_VERSION, "arrays": len(shapes), "count": n,
                                           "shapes": [list(s) for s in shapes], "dtype": cache.dtype})
    finally:
        bar.close()
        arrays.clear()
        for path in tmp:
            path.unlink(missing_ok=True)


def frozen_loaders(model: nn.Module, loaders: dict[str, DataLoader], keys: dict[str, dict[str, Any]],
                   cache_dir: Path, device: str, amp: bool, dtype: str = "float32", progress: bool = True
                   ) -> tuple[nn.Module, dict[str, DataLoader]]:
    """:class:`OnFrozen` and, for each image loader, a loader over the cached frozen outputs with the same batch
    size, shuffling, generator and drop_last, so the rest of the model sees the batches the images would give.
    Splits not cached yet are built first (their size printed before); raises :class:`CacheRefused` when the disk
    would not hold them."""
    if dtype not in STORAGE_DTYPES:
        raise CacheRefused(f"train.feature_cache_dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    folder = cache_dir / "features"
    folder.mkdir(parents=True, exist_ok=True)
    caches = {name: SplitCache(folder, features_key({**keys[name], "dtype": dtype}),
                               f"{keys[name].get('task')}/{keys[name].get('split')}", dtype) for name in loaders}
    missing = [name for name, cache in caches.items() if not cache.built()]
    if missing:
        shapes = item_shapes(model, loaders[missing[0]].dataset, device, amp)
        sizes = {name: split_bytes(shapes, len(loaders[name].dataset), dtype) for name in missing}
        ensure_room(folder, sum(sizes.values()), "feature cache", "training on images instead",
                    hint=" (train.feature_cache_dtype: float16 halves it)" if dtype == "float32" else "")
        for name in missing:
            cache = caches[name]
            with file_lock(cache.lock):
                if cache.built():  # another process built it while this one waited
                    continue
                print(f"feature cache: computing {cache.label} ({len(loaders[name].dataset)} images -> "
                      f"{human_bytes(sizes[name])}, {dtype}) into {folder}", file=sys.stderr)
                build_split(model, loaders[name].dataset, cache, shapes,
                            batch_size=max(1, int(loaders[name].batch_size or 1)), device=device, amp=amp,
                            progress=progress)
    out: dict[str, DataLoader] = {}
    for name, loader in loaders.items():
        shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
        out[name] = DataLoader(caches[name].open(), batch_size=loader.batch_size, shuffle=shuffle,
                               generator=loader.generator, drop_last=loader.drop_last, collate_fn=_whole_batch,
                               num_workers=0, pin_memory=loader.pin_memory)
    return OnFrozen(model), out
