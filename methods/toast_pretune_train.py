"""The training of TOAST's pre-tuning stage (:mod:`methods.toast_pretune` decides when it runs and where its
result lives): the per-step DeiT-like learning-rate schedule, the objective (cross-entropy of the passes plus the
variational loss), AdamW over what the stage trains, and the run through the harness's one loop
(``harness.api.fit``), with its per-epoch summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import METHODS, Method
from harness.errors import HarnessError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from harness.api import FitResult
    from methods.toast_model import TopDownViT


def lr_at(step: int, total: int, warmup: int, cooldown: int, lr: float, min_lr: float) -> float:
    """Per-step DeiT-like schedule: linear warm-up, cosine down to ``min_lr``, then ``min_lr`` for the cool-down."""
    if step < warmup:
        return lr * (step + 1) / warmup
    decay = max(1, total - cooldown - warmup)
    if step >= warmup + decay:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / decay))


def pretune_objective(var_loss_weight: float, first_pass_ce: bool):
    """The stage's objective for ``harness.api.fit``: CE (the mean of both passes' CE when ``first_pass_ce`` and the
    first pass runs whole) + ``var_loss_weight`` x the variational loss. Logs ce, var, acc and, when there is a
    whole first pass, acc_first (the bottom-up features with the same head, for comparison)."""

    import torch
    import torch.nn.functional as F

    def objective(model: TopDownViT, images: torch.Tensor, labels: torch.Tensor):
        out = model.forward_detailed(images, var_loss=var_loss_weight > 0)
        logits = model.head(out.features).float()
        ce = F.cross_entropy(logits, labels)
        logs = {"acc": (logits.argmax(1) == labels).float().mean()}  # tensors: the loop reads them per epoch
        if out.first_features is not None:
            first_logits = model.head(out.first_features).float()
            logs["acc_first"] = (first_logits.argmax(1) == labels).float().mean()
            if first_pass_ce:
                ce = 0.5 * (ce + F.cross_entropy(first_logits, labels))
        var = out.var_loss.float() if out.var_loss is not None else torch.zeros((), device=images.device)
        logs.update(ce=ce.detach(), var=var.detach())
        return ce + var_loss_weight * var, logs

    return objective


def pretune_optimizer(model: TopDownViT, cfg: dict[str, Any], method: Method) -> torch.optim.AdamW:
    """AdamW over what pre-tuning trains (xi, the feedback path, the upstream head, and P with ``train_P``:
    :func:`methods.toast_model.train_top_down`), decaying what the method's rule decays under AdamW."""
    import torch

    from methods.toast_model import train_top_down

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in train_top_down(model, transform=bool(cfg["train_P"])):
        (decay if method.decays(name, param, "adamw") else no_decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": float(cfg["weight_decay"])},
                              {"params": no_decay, "weight_decay": 0.0}], lr=float(cfg["lr"]))


def pretune_model(model: TopDownViT, loader, cfg: dict[str, Any], device: str = "cpu", progress: bool = True,
                  desc: str = "pre-tuning TOAST", checkpoint: Path | None = None,
                  generator: torch.Generator | None = None, method: Method | None = None,
                  world: Any = None) -> "FitResult":
    """Train the top-down module of ``model`` (a TopDownViT with an upstream head, on ``device``) in place through
    ``harness.api.fit``; the result's history has one entry per epoch (means of ce, var, acc, acc_first). With
    ``checkpoint``, an interrupted run resumes from its last finished epoch (pass the loader's ``generator`` so the
    shuffling resumes too). ``method`` (default ``toast``) gives the decay rule. A non-finite loss is a
    HarnessError. ``world``: the data-parallel ranks (``loader`` is then this rank's part of each global batch)."""
    from harness.api import fit

    lr = float(cfg["lr"])
    if not lr > 0:
        raise HarnessError(f"pretune.lr: expected a positive learning rate, got {cfg['lr']!r}")
    optimizer = pretune_optimizer(model, cfg, method or METHODS.get("toast"))
    epochs, steps_per_epoch = int(cfg["epochs"]), len(loader)
    total = epochs * steps_per_epoch
    warmup, cooldown = int(cfg["warmup_epochs"]) * steps_per_epoch, int(cfg["cooldown_epochs"]) * steps_per_epoch
    min_lr = float(cfg["min_lr"])
    result = fit(model, loader, optimizer, epochs=epochs,
                 objective=pretune_objective(float(cfg["var_loss_weight"]), bool(cfg["first_pass_ce"])),
                 lr_factor=lambda step: lr_at(step, total, warmup, cooldown, lr, min_lr) / lr, per_step=True,
                 device=device, amp=bool(cfg.get("amp", True)), generator=generator, checkpoint=checkpoint,
                 progress=desc if progress else None, progress_images=True, **({"world": world} if world is not None else {}))
    if result.status != "ok":
        epoch = result.history[-1]["epoch"] if result.history else 1
        raise HarnessError(f"pre-tuning diverged in epoch {epoch} (non-finite loss; learning rate "
                           f"{result.history[-1]['lr'] if result.history else lr:.3g}); lower pretune.lr (now {lr})")
    return result


def epoch_summary(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-epoch means, rounded, of what the pre-tuning logs (plus its learning rate at the epoch's start)."""
    keys = ("ce", "var", "acc", "acc_first", "lr")
    return [{"epoch": h["epoch"], **{k: round(float(h[k]), 6) for k in keys if k in h}} for h in history]
