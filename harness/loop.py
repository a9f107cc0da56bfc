"""The one training loop. Every training in the harness goes through :func:`fit`: a trial (harness/train.py),
TOAST's pre-tuning stage and the demo backbone's pre-training (through ``harness.api.fit``). So mixed precision,
seeding, progress, checkpoint/resume and divergence handling exist once.

What differs between those is passed in:

* ``objective(model, images, labels) -> (loss, logs)``: the loss to minimise and per-step numbers to average
  (cross-entropy; TOAST's CE + variational loss);
* ``lr_factor(i)``: the learning-rate multiplier at epoch ``i`` (``per_step=False``) or optimiser step ``i``
  (``per_step=True``), applied through ``LambdaLR``;
* ``evaluate(model) -> dict``: numbers recorded after each epoch (a trial's validation/test metric), or only after
  every ``evaluate_every``-th and the last;
* ``max_steps``: an iteration budget (segmentation's ``train.iters``): training stops after that many optimiser
  steps, in the middle of a pass over the data if need be; ``epochs`` is then the number of passes it takes;
* ``checkpoint``: where the resumable state goes (trainable weights, optimiser, schedule, RNG, history);
  the run resumes from it when it exists and it is removed when the run ends;
* ``world``: the data-parallel group (:mod:`harness.distributed`; default one process). With N ranks the loader is
  this rank's part of each global batch (:func:`harness.distributed.shard_loader`), gradients are averaged over
  the global batch before every step, the epoch's numbers are summed over ranks, and rank 0 alone writes the
  checkpoint (every rank reads it back).

A non-finite loss stops the run with ``status="diverged"``; the caller decides what that means (a trial records it,
pre-tuning refuses to write a checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.distributed import SINGLE, World
from harness.metrics import METRICS

#: ``(loss, logs)``: a log may be a number or a 0-d tensor (read once the epoch ends, as the loss is)
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, float | torch.Tensor]]"]


def pick_device() -> str:
    """``$HARNESS_DEVICE`` if set, else CUDA when present, else the CPU."""
    override = os.environ.get("HARNESS_DEVICE")
    if override:
        return override
    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def warmup_cosine(i: int, warmup: int, total: int) -> float:
    """The lr factor at 0-based epoch (or step) ``i``: linear from 0 over ``warmup``, then cosine down to 0
    (VPT's WarmupCosineSchedule: the factor is 0 in the first epoch when there is warmup)."""
    if i < warmup:
        return i / max(1, warmup)
    progress = (i - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_poly(i: int, warmup: int, total: int, power: float = 1.0, warmup_ratio: float = 1e-6) -> float:
    """The lr factor at 0-based step ``i`` of mmcv's poly schedule with linear warmup (mmsegmentation's
    ``policy='poly'``, ``min_lr=0``): ``(1 - i/total)^power``, multiplied during the first ``warmup`` steps by
    ``1 - (1 - i/warmup)(1 - warmup_ratio)`` (so it starts at ``warmup_ratio``)."""
    factor = max(0.0, 1.0 - i / max(1, total)) ** power
    if i < warmup:
        factor *= 1.0 - (1.0 - i / warmup) * (1.0 - warmup_ratio)
    return factor


def autocast_for(device: str, amp: bool = True):
    """bf16 autocast on CUDA (when ``amp``), nothing on the CPU."""
    if amp and str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cross_entropy(label_smoothing: float = 0.0) -> Objective:
    """The classification objective: cross-entropy of ``model(images)`` (it logs nothing besides the loss)."""
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images).float()
        loss = criterion(logits, labels)
        return loss, {}

    return objective



@dataclass
class FitResult:
    status: str  # "ok" or "diverged"
    #: one entry per epoch: epoch (1-based), train_loss, lr, the objective's logs (means), evaluate()'s numbers
    history: list[dict[str, Any]] = field(default_factory=list)
    train_images: int = 0
    train_seconds: float = 0.0
    memory: dict[str, Any] = field(default_factory=dict)
    resumed_from: int = 0  # the epoch a checkpoint resumed from (0: started fresh)
    #: wall seconds by part: ``data`` (waiting for batches), ``steps``, ``evaluation``, ``checkpoints``
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float | None:
        return self.train_images / self.train_seconds if self.train_seconds else None


def train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train(mode)``, keeping what the model declares frozen in eval mode while it trains: the submodules
    named in its ``frozen_modules`` (dotted names, e.g. ``("backbone",)``) run in eval mode (no dropout, drop-path or
    BatchNorm updates in frozen weights), except modules inside them whose last name part is in
    ``trains_in_frozen`` (an adapter's own dropout, e.g. peft's ``lora_dropout``). Methods declare; the engine
    switches models to training only through here, so no model overrides ``train()``."""
    model.train(mode)
    if mode:
        exempt = set(getattr(model, "trains_in_frozen", ()))
        for name in getattr(model, "frozen_modules", ()):
            frozen = model.get_submodule(name).eval()
            if exempt:
                for sub, module in frozen.named_modules():
                    if sub.rsplit(".", 1)[-1] in exempt:
                        module.train()
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def to_device(batch: Any, device: str) -> Any:
    """A batch's inputs on ``device``: a tensor, or a tuple of tensors (cached frozen outputs)."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(item, device) for item in batch)
    return batch.to(device, non_blocking=True)


def evaluate(model: nn.Module, loader: Any, device: str, metric: str, num_classes: int, amp: bool = True,
             world: World = SINGLE) -> float:
    """A classification metric (:data:`harness.metrics.METRICS`) of the arg-max predictions over a whole split.
    With several ranks each scores its part of the split (``loader``) and the predictions of all ranks are
    gathered before the metric is computed once, over every image exactly once."""
    model.eval()
    preds, labels = [torch.zeros(0, dtype=torch.long, device=device)], [torch.zeros(0, dtype=torch.long)]
    with torch.inference_mode():
        for images, targets in loader:
            with autocast_for(device, amp):
                logits = model(to_device(images, device))
            preds.append(logits.float().argmax(dim=1))  # on the device: moved once, not one wait per batch
            labels.append(torch.as_tensor(targets).long())
    pairs = world.gather_objects((torch.cat(preds).cpu(), torch.cat(labels)))
    return METRICS[metric](torch.cat([p for p, _ in pairs]), torch.cat([t for _, t in pairs]), num_classes)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, images: Any,
               labels: Any, device: str = "cpu", amp: bool = True, world: World = SINGLE
               ) -> tuple[torch.Tensor, dict[str, float], bool]:
    """One optimiser step (inputs already on ``device``): the objective under autocast, backward, step. Returns
    the loss, the objective's logs and whether the loss was finite; a non-finite loss takes no step. :func:`fit`
    and ``harness bench`` (:mod:`harness.bench`) step through this one function.

    With several ranks (``world``) the images are this rank's slice of the global batch (None: an empty slice);
    the gradients are averaged over the global batch (:meth:`harness.distributed.World.average_gradients`) and
    no rank steps when any rank's loss is not finite."""
    if not world.distributed:
        with autocast_for(device, amp):
            loss, logs = objective(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # read the loss only once the backward is queued: on a GPU reading it waits for the device, and before the
        # backward that wait would leave the device idle while the backward's kernels are launched
        if not torch.isfinite(loss):
            return loss, logs, False  # no step: the gradients are discarded with the diverged trial
        optimizer.step()
        return loss, logs, True
    optimizer.zero_grad(set_to_none=True)
    n = 0 if labels is None else int(labels.shape[0])
    loss, logs, finite = torch.zeros(()), {}, True
    if n:
        with autocast_for(device, amp):
            loss, logs = objective(model, images, labels)
        finite = bool(torch.isfinite(loss))
        if finite:
            (loss * n).backward()  # weighted by images: the all-reduce divides by the global count
    params = [p for group in optimizer.param_groups for p in group["params"]]
    finite, _ = world.average_gradients(params, n, finite)
    if finite:
        optimizer.step()
    return loss, logs, finite


@dataclass
class EpochTotals:
    """One pass over the training data: images seen, loss and objective logs summed per image, the optimiser
    steps taken so far (all epochs), and whether a non-finite loss stopped it."""

    steps: int
    seen: int = 0
    loss: float = 0.0
    logs: dict[str, float] = field(default_factory=dict)
    diverged: bool = False
    #: wall seconds this rank waited for batches (loading, moving them to the device) and spent in steps
    data_s: float = 0.0
    step_s: float = 0.0

    def means(self) -> dict[str, float]:
        """``train_loss`` and each log as per-image means (the epoch's entry in the history)."""
        n = max(1, self.seen)
        return {"train_loss": self.loss / n, **{k: v / n for k, v in self.logs.items()}}

    def summed(self, world: World) -> "EpochTotals":
        """The totals of every rank (images, loss and logs summed); itself for one process."""
        if not world.distributed:
            return self
        parts = world.gather_objects((self.seen, self.loss, self.logs, self.diverged))
        out = EpochTotals(steps=self.steps, diverged=any(p[3] for p in parts))
        for seen, loss, logs, _ in parts:
            out.seen += seen
            out.loss += loss
            for key, value in logs.items():
                out.logs[key] = out.logs.get(key, 0.0) + value
        return out


def adaptive_hooks(model: nn.Module) -> list[Callable[[int], Any]]:
    """The ``after_optimizer_step`` hooks of modules that adapt themselves as they train (harness.api.Method),
    wherever they sit: inside a segmentation wrapper, or the method's model held (not registered) by the
    frozen-feature or decoded-input wrapper as ``_model``, whose children the wrapper registers as its own."""
    hooks: list[Callable[[int], Any]] = []
    seen: set[int] = set()
    pending = [model]
    while pending:
        module = pending.pop()
        for m in module.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            if callable(hook := getattr(m, "after_optimizer_step", None)):
                hooks.append(hook)
            if isinstance(inner := m.__dict__.get("_model"), nn.Module):
                pending.append(inner)
    return hooks


def train_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, objective: Objective, scheduler: Any,
                memory: Any, *, device: str, amp: bool, per_step: bool, steps: int,
                max_steps: int | None, world: World = SINGLE,
                on_batch: Callable[[int], None] | None = None) -> EpochTotals:
    """One epoch of :func:`fit`: a :func:`train_step` per batch (the schedule stepped per step when ``per_step``),
    until the data ends, ``max_steps`` optimiser steps were taken in all, or the loss is not finite. With several
    ranks the totals are this rank's (:meth:`EpochTotals.summed` adds them up). ``on_batch(n)``: after each step,
    with the number of images this rank trained on (a progress bar's count)."""
    train_mode(model)
    totals = EpochTotals(steps=steps)
    after_step = adaptive_hooks(model)
    unread: list[tuple[int, torch.Tensor, dict[str, Any]]] = []
    clock = time.perf_counter()
    for batch in loader:
        if max_steps is not None and totals.steps >= max_steps:
            break
        images, labels = (None, None) if batch is None else batch  # None: this rank's slice is empty
        if labels is not None:
            images = to_device(images, device)
            labels = labels.to(device, non_blocking=True)
        now = time.perf_counter()
        totals.data_s += now - clock
        clock = now
        with memory.step(model, optimizer):
            loss, logs, finite = train_step(model, optimizer, objective, images, labels, device, amp, world)
        if not finite:
            totals.diverged = True
            break
        for hook in after_step:
            hook(totals.steps)
        totals.steps += 1
        if per_step:
            scheduler.step()
        if labels is None:  # an empty slice of the batch: its step (the gradient exchange) ends here
            now = time.perf_counter()
            totals.step_s += now - clock
            clock = now
            continue
        n = labels.shape[0]
        if on_batch is not None:
            on_batch(n)
        # kept on the device and read once the epoch ends: reading a loss per step would wait for the device to
        # finish the step, leaving it idle while the next batch is fetched and its forward launched
        unread.append((n, loss.detach(), {k: v.detach() if torch.is_tensor(v) else v for k, v in logs.items()}))
        now = time.perf_counter()
        totals.step_s += now - clock
        clock = now
    read_losses(totals, unread)
    totals.step_s += time.perf_counter() - clock  # the read waits for the device to finish the last steps
    return totals


def read_losses(totals: EpochTotals, unread: list[tuple[int, torch.Tensor, dict[str, Any]]]) -> None:
    """Adds the epoch's per-step losses and logs, weighted by images, to ``totals``, in step order (the same sums as
    reading each as it came)."""
    if not unread:
        return
    losses = torch.stack([loss.float() for _, loss, _ in unread]).tolist()  # one wait for the device, not one per step
    for (n, _, logs), loss in zip(unread, losses):
        totals.loss += loss * n
        totals.seen += n
        for key, value in logs.items():
            totals.logs[key] = totals.logs.get(key, 0.0) + float(value) * n


def fit(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    objective: Objective | None = None,
    lr_factor: Callable[[int], float] = lambda i: 1.0,
    per_step: bool = False,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    device: str = "cpu",
    amp: bool = True,
    generator: torch.Generator | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 1,
    progress: str | None = None,
    progress_images: bool = False,
    max_steps: int | None = None,
    evaluate_every: int = 1,
    world: World = SINGLE,
) -> FitResult:
    """Train ``model`` (already on ``device``) for ``epochs`` over ``loader``; see the module docstring.
    ``progress``: a progress bar's label; per epoch, or with ``progress_images`` (long epochs: a pre-tuning on
    ImageNet) per image over the whole run, so it shows images/s and the time left."""
    from harness.cost import PeakMemory

    objective = objective or cross_entropy()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    result = FitResult(status="ok")
    start = 0
    world.broadcast_module(model)
    if checkpoint is not None and world.broadcast_object(checkpoint.exists()):
        start, result.history = _load_checkpoint(checkpoint, model, optimizer, scheduler, generator, world)
        result.resumed_from = start
    progress = progress if world.main else None
    steps = int(result.history[-1].get("steps", 0)) if result.history else 0
    epoch_iter: Any = range(start, epochs)
    bar = None
    on_batch = None
    per_epoch = len(getattr(loader, "dataset", ())) if progress_images else 0
    if progress and per_epoch:
        from tqdm.auto import tqdm

        bar = tqdm(desc=progress, leave=False, unit="img", unit_scale=True, dynamic_ncols=True, smoothing=0.05,
                   initial=start * per_epoch, total=epochs * per_epoch)
        on_batch = lambda n: bar.update(n * world.size)  # noqa: E731 - this rank's images x ranks: the global count
    elif progress:
        from tqdm.auto import tqdm

        bar = tqdm(epoch_iter, desc=progress, leave=False, unit="ep", dynamic_ncols=True,
                   initial=start, total=epochs)
        epoch_iter = bar
    try:
        with PeakMemory(device) as memory:
            for epoch in epoch_iter:
                t0 = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                totals = train_epoch(model, loader, optimizer, objective, scheduler, memory, device=device, amp=amp,
                                     per_step=per_step, steps=steps, max_steps=max_steps,
                                     world=world, on_batch=on_batch).summed(world)
                steps = totals.steps
                result.train_seconds += time.perf_counter() - t0
                _add(result.phases, "data", totals.data_s)
                _add(result.phases, "steps", totals.step_s)
                result.train_images += totals.seen
                entry: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
                if max_steps is not None:
                    entry["steps"] = steps
                last = epoch + 1 == epochs or (max_steps is not None and steps >= max_steps)
                if totals.diverged:
                    result.status = "diverged"
                    entry["train_loss"] = float("nan")
                    result.history.append(entry)
                    break
                entry.update(totals.means())
                if evaluate is not None and (last or (epoch + 1) % max(1, evaluate_every) == 0):
                    t_eval = time.perf_counter()
                    entry.update(evaluate(model))
                    _add(result.phases, "evaluation", time.perf_counter() - t_eval)
                result.history.append(entry)
                if not per_step:
                    scheduler.step()
                if bar is not None:
                    if on_batch is not None:  # the exact count at the epoch's end (ranks' slices differ by one)
                        bar.n = min((epoch + 1) * per_epoch, bar.total)
                        entry_shown = {"epoch": f"{epoch + 1}/{epochs}"}
                    else:
                        entry_shown = {}
                    bar.set_postfix({**entry_shown, **{k: f"{v:.3g}" for k, v in entry.items()
                                                       if k not in ("epoch", "lr")}})
                if last:
                    break
                if checkpoint is not None and (epoch + 1) % checkpoint_every == 0:
                    t_save = time.perf_counter()
                    _save_checkpoint(checkpoint, epoch + 1, result.history, model, optimizer, scheduler, generator,
                                     world)
                    _add(result.phases, "checkpoints", time.perf_counter() - t_save)
        result.memory = memory.result()
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None and world.main and checkpoint.exists():
        checkpoint.unlink()
    return result


def _add(phases: dict[str, float], name: str, seconds: float) -> None:
    phases[name] = phases.get(name, 0.0) + seconds


def _save_checkpoint(path: Path, epoch: int, history: list, model: nn.Module, optimizer, scheduler,
                     generator: torch.Generator | None, world: World = SINGLE) -> None:
    """Only tensors and plain types, so the file loads with ``weights_only=True``. With several ranks rank 0
    writes it (the weights and optimiser are the same on every rank), with every rank's RNG state, and the others
    wait until it is there."""
    rngs = world.gather_objects(torch.get_rng_state())
    if world.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        state = {"epoch": epoch, "history": history, "model": trainable_state(model),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "torch_rng": rngs[0]}
        if world.distributed:
            state["torch_rng_ranks"] = rngs
        if generator is not None:
            state["generator"] = generator.get_state()
        torch.save(state, tmp)
        os.replace(tmp, path)
    world.barrier()


def _load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler,
                     generator: torch.Generator | None, world: World = SINGLE) -> tuple[int, list]:
    """Every rank reads the same file; each takes its own RNG state when the file has one per rank of this many
    ranks (else rank 0's)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    rngs = state.get("torch_rng_ranks")
    torch.set_rng_state(rngs[world.rank] if rngs and len(rngs) == world.size else state["torch_rng"])
    return int(state["epoch"]), list(state["history"])
