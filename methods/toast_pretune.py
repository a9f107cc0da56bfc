"""TOAST's pre-tuning stage (paper §3.2, appendix A.2) and the ``toast-pretuned`` artifact.

The backbone stays frozen; xi, P and the feedback path (plus a throw-away head for the upstream classes) train with

    loss = CE + var_loss_weight * sum_l MSE(decoders[l].linear(out_l.detach()), in_l.detach())

where CE is the mean over the two passes' cross-entropies (AbSViT's ``engine.py``, the only released top-down training
loop; ``first_pass_ce: false`` keeps only the second pass's) and in_l/out_l are block l's second-pass input/output.
Recipe defaults are the paper's: AdamW, lr 5e-4, 30 epochs, 3 warm-up and 3 cool-down epochs, no mixup/cutmix,
variational-loss weight 0.03 (the official code hard-codes 0.1). Where the paper is silent we take DeiT's values (its
backbone recipe): weight decay 0.05 on matrices, min lr 1e-5, batch 512.

A suite's ``pretune:`` section configures it::

    pretune:
      task: demo-upstream        # any registered task; or image_folder: /path/to/imagenet/train (ImageFolder)
      split: train
      epochs: 30                 # and any other key of DEFAULTS
      auto: false                # true (the demo): pre-tune on first use, cached
      checkpoint: null           # a file from `harness pretune --output` or an official TOAST checkpoint

Resolution of ``toast-pretuned`` for a trial: ``checkpoint`` if given; else the cached file for (backbone, section,
feedback span) if it exists; else pre-tune now when ``auto``; else a HarnessError naming the ``harness pretune``
command that makes the file (it writes to the same cache path, so the next run finds it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from harness.api import ARTIFACTS, METHODS, TASKS, ArtifactRequest, DataContext
from harness.errors import HarnessError, did_you_mean

PRETUNE_VERSION = 1
DEFAULTS: dict[str, Any] = {
    "task": None,
    "split": "train",
    "image_folder": None,
    "epochs": 30,
    "batch_size": 512,
    "lr": 5e-4,
    "min_lr": 1e-5,
    "weight_decay": 0.05,
    "warmup_epochs": 3,
    "cooldown_epochs": 3,
    "var_loss_weight": 0.03,
    "first_pass_ce": True,
    "train_P": True,
    "v_bias_twice": False,
    "frozen_eval": True,
    "seed": 0,
    "num_workers": 0,
    "auto": False,
    "checkpoint": None,
}
#: keys that say where the result comes from, not what it is: left out of the cache key
NOT_IN_KEY = ("auto", "checkpoint", "num_workers")


def section_of(raw: dict[str, Any] | None) -> dict[str, Any]:
    """The pretune section with defaults filled in; unknown keys are an error with a did-you-mean."""
    raw = dict(raw or {})
    for key in raw:
        if key not in DEFAULTS:
            raise HarnessError(f"pretune.{key}: unknown key{did_you_mean(key, DEFAULTS)} "
                               f"(known: {', '.join(DEFAULTS)})")
    return {**DEFAULTS, **raw}


def cache_key(backbone: dict[str, Any], cfg: dict[str, Any], architecture: dict[str, Any], image_size: int) -> str:
    content = {"backbone": backbone, "pretune": {k: v for k, v in cfg.items() if k not in NOT_IN_KEY},
               "architecture": architecture, "image_size": image_size, "version": PRETUNE_VERSION}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "artifacts" / f"toast-pretuned-{key}.pt"


def toast_method(name: str):
    """The registered TOAST method ``name`` (any method with a top-down architecture), or a clear error."""
    from methods.toast import ToastMethod

    method = METHODS.get(name)
    if not isinstance(method, ToastMethod):
        raise HarnessError(f"'{name}' is not a TOAST method; pre-tuning is for toast, toast-early, toast-late, ...")
    return method


def pretune_command(suite: str, method: str, overrides: dict[str, Any] | None = None) -> str:
    """The command line that makes the checkpoint a trial of ``method`` looks for (same suite and overrides)."""
    from methods.toast import pretune_architecture

    parts = ["harness pretune", f"--suite {suite}"]
    if pretune_architecture(toast_method(method)) != pretune_architecture(toast_method("toast")):
        parts.append(f"--method {method}")
    overrides = overrides or {}
    if overrides.get("backbone"):
        parts.append(f"--backbone {overrides['backbone']}")
    if overrides.get("weights"):
        parts.append(f"--weights {overrides['weights']}")
    for key, value in (overrides.get("set") or {}).items():
        if key.split(".")[0] in ("pretune", "backbone", "data"):
            parts.append(f"--set {key}={json.dumps(value) if not isinstance(value, str) else value}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------- artifact
@ARTIFACTS.register("toast-pretuned")
def toast_pretuned(request: ArtifactRequest) -> Path:
    """The pre-tuned top-down module for the requesting trial (see the module docstring for the order)."""
    spec = request.spec or {}
    method = spec.get("method", "toast")
    command = pretune_command(request.suite, method, spec.get("overrides"))
    if spec.get("pretune") is None:
        raise HarnessError(
            f"method {method} needs a pre-tuned top-down module, but suite '{request.suite}' has no pretune section: "
            "add `pretune: {image_folder: <ImageNet train folder>}` (or `{task: <upstream task>}`) to the suite and "
            f"run `{command}`, or add `pretune: {{checkpoint: <official TOAST checkpoint>}}`")
    cfg = section_of(spec["pretune"])
    if cfg["checkpoint"]:
        path = Path(os.path.expanduser(str(cfg["checkpoint"])))
        if not path.is_file():
            raise HarnessError(f"pretune.checkpoint {path} does not exist; make it with `{command} --output {path}` "
                               "or point it at an official TOAST checkpoint")
        return path
    from methods.toast import pretune_architecture

    image_size = int((spec.get("data") or {}).get("image_size", 224))
    key = cache_key(request.backbone, cfg, pretune_architecture(toast_method(method)), image_size)
    path = default_path(request.cache_dir, key)
    if path.exists():
        return path
    if not cfg["auto"] and not (cfg["task"] or cfg["image_folder"]):
        raise HarnessError(
            f"no pre-tuned TOAST checkpoint for suite '{request.suite}': set pretune.image_folder (an ImageNet-style "
            f"train folder) in the suite file and run `{command}`, or set pretune.checkpoint to an official TOAST "
            "checkpoint")
    if not cfg["auto"]:
        raise HarnessError(
            f"no pre-tuned TOAST checkpoint for suite '{request.suite}' (looked for {path}): run `{command}` first, "
            "or set pretune.checkpoint to an official TOAST checkpoint")
    from harness.store import file_lock

    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            run_pretune(request.backbone, cfg, method, path, cache_dir=request.cache_dir,
                        data_root=request.data_root, data=spec.get("data") or {}, resolve=_resolver(request))
    return path


def _resolver(request: ArtifactRequest) -> Callable[[str], Path]:
    def resolve(name: str) -> Path:
        provider = ARTIFACTS.get(name)
        return Path(provider(ArtifactRequest(name=name, suite=request.suite, cache_dir=request.cache_dir,
                                             backbone=request.backbone, spec=request.spec,
                                             data_root=request.data_root)))

    return resolve


# ---------------------------------------------------------------------------------------------------- data
def pretune_dataset(cfg: dict[str, Any], cache_dir: Path, data_root: Path | None, data: dict[str, Any],
                    backbone) -> tuple[torch.utils.data.Dataset, int, str]:
    """(dataset, number of classes, fingerprint) from ``image_folder`` (ImageNet-style) or a registered task."""
    data = dict(data)
    image_size = int(data.pop("image_size", 224))
    if cfg["image_folder"]:
        from timm.data import create_transform, resolve_data_config
        from torchvision.datasets import ImageFolder

        root = Path(os.path.expanduser(str(cfg["image_folder"])))
        if not root.is_dir():
            raise HarnessError(f"pretune.image_folder {root} is not a folder (expected <root>/<class>/<image> files)")
        config = resolve_data_config({"input_size": (3, image_size, image_size)}, model=backbone)
        # DeiT-style training crops and flips; no mixup/cutmix (paper A.2)
        transform = create_transform(**config, is_training=True)
        dataset = ImageFolder(str(root), transform=transform)
        return dataset, len(dataset.classes), f"imagefolder:{root}:{len(dataset)}"
    if not cfg["task"]:
        raise HarnessError("pretune: set 'task' (a registered task, e.g. demo-upstream) or 'image_folder'")
    task = TASKS.get(cfg["task"])
    if cfg["split"] not in task.splits:
        raise HarnessError(f"pretune.split: task {task.name} has splits {', '.join(task.splits)}, not '{cfg['split']}'")
    ctx = DataContext(data_root=data_root, cache_dir=cache_dir, image_size=image_size, settings=data)
    return task.dataset(cfg["split"], ctx, train=True), task.num_classes, task.fingerprint(cfg["split"], ctx)


# ---------------------------------------------------------------------------------------------------- training
def lr_at(step: int, total: int, warmup: int, cooldown: int, lr: float, min_lr: float) -> float:
    """Per-step DeiT-like schedule: linear warm-up, cosine down to ``min_lr``, then ``min_lr`` for the cool-down."""
    if step < warmup:
        return lr * (step + 1) / warmup
    decay = max(1, total - cooldown - warmup)
    if step >= warmup + decay:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / decay))


def trainable_for_pretune(model, train_P: bool) -> list[torch.nn.Parameter]:
    """Freeze everything but xi, P (if ``train_P``), the feedback path and the (upstream) head."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [model.prompt, *model.decoders.parameters(), *model.head.parameters()]
    if train_P:
        params.append(model.top_down_transform)
    for p in params:
        p.requires_grad_(True)
    return params


def pretune_model(model, loader, cfg: dict[str, Any], device: str = "cpu", progress: bool = True,
                  desc: str = "pre-tuning TOAST") -> list[dict[str, float]]:
    """Train the top-down module of ``model`` (a TopDownViT with an upstream head) in place; per-step history."""
    params = trainable_for_pretune(model, bool(cfg["train_P"]))
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(cfg["weight_decay"])},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=float(cfg["lr"]))
    steps_per_epoch = len(loader)
    total = int(cfg["epochs"]) * steps_per_epoch
    warmup, cooldown = int(cfg["warmup_epochs"]) * steps_per_epoch, int(cfg["cooldown_epochs"]) * steps_per_epoch
    weight, both = float(cfg["var_loss_weight"]), bool(cfg["first_pass_ce"])
    history: list[dict[str, float]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
    model.train()
    step = 0
    for epoch in range(int(cfg["epochs"])):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, cooldown, float(cfg["lr"]), float(cfg["min_lr"]))
            out = model.forward_detailed(images, var_loss=weight > 0)
            logits = model.head(out.features)
            ce = F.cross_entropy(logits, labels)
            if both and out.first_features is not None:
                ce = 0.5 * (ce + F.cross_entropy(model.head(out.first_features), labels))
            var = out.var_loss if out.var_loss is not None else torch.zeros((), device=images.device)
            loss = ce + weight * var
            if not torch.isfinite(loss):
                raise HarnessError(f"pre-tuning diverged at step {step} (loss {loss.item()}); lower pretune.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            acc = (logits.argmax(1) == labels).float().mean().item()
            record = {"epoch": epoch + 1, "step": step, "ce": ce.item(), "var": var.item(), "acc": acc,
                      "lr": optimizer.param_groups[0]["lr"]}
            if out.first_features is not None:  # the bottom-up pass with the same head, for comparison
                record["acc_first"] = (model.head(out.first_features).argmax(1) == labels).float().mean().item()
            history.append(record)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ep=epoch + 1, ce=f"{ce.item():.3f}", var=f"{var.item():.3f}", acc=f"{acc:.2f}")
    if bar is not None:
        bar.close()
    return history


def epoch_summary(history: list[dict[str, float]]) -> list[dict[str, float]]:
    out = []
    for epoch in sorted({h["epoch"] for h in history}):
        rows = [h for h in history if h["epoch"] == epoch]
        keys = [k for k in ("ce", "var", "acc", "acc_first") if k in rows[0]]
        out.append({"epoch": epoch, **{k: round(sum(r[k] for r in rows) / len(rows), 5) for k in keys}})
    return out


def run_pretune(backbone_spec: dict[str, Any], cfg: dict[str, Any], method: str, output: Path, *, cache_dir: Path,
                data_root: Path | None = None, data: dict[str, Any] | None = None,
                resolve: Callable[[str], Path] | None = None, device: str | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Pre-tune the top-down module of ``method``'s architecture on the suite's backbone and write ``output``
    (a torch file ``{"model": official-key state, "harness": metadata}``) plus a JSON sidecar; returns the metadata."""
    from harness.provenance import provenance
    from harness.train import pick_device, seed_everything
    from methods.backbone import build_backbone, file_fingerprint, resolve_weights
    from methods.toast import pretune_architecture, top_down_state

    device = device or pick_device()
    toast = toast_method(method)
    seed_everything(int(cfg["seed"]))
    backbone = build_backbone(backbone_spec, resolve)
    dataset, num_classes, fingerprint = pretune_dataset(cfg, cache_dir, data_root, data or {}, backbone)
    model = toast.make_model(backbone, num_classes, {"v_bias_twice": cfg["v_bias_twice"],
                                                     "frozen_eval": cfg["frozen_eval"]})
    # the upstream head is thrown away: timm's ViT head init (trunc-normal 0.02, zero bias) starts it at chance
    # level instead of the downstream head's large kaiming init, so the first steps train the top-down module
    torch.nn.init.trunc_normal_(model.head.weight, std=0.02)
    torch.nn.init.zeros_(model.head.bias)
    model = model.to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(cfg["batch_size"]), shuffle=True, drop_last=False,
                                         num_workers=int(cfg["num_workers"]),
                                         generator=torch.Generator().manual_seed(int(cfg["seed"])))
    t0 = time.perf_counter()
    history = pretune_model(model, loader, cfg, device, desc=f"pre-tuning TOAST ({method}, once)", progress=progress)
    weights = resolve_weights(backbone_spec, resolve)
    meta = {
        "format": "toast-pretuned", "version": PRETUNE_VERSION, "method": method,
        "architecture": pretune_architecture(toast),
        "backbone": backbone_spec,
        "backbone_weights": file_fingerprint(weights) if isinstance(weights, Path) else weights,
        "pretune": {k: v for k, v in cfg.items() if k != "checkpoint"},
        "settings": {"v_bias_twice": bool(cfg["v_bias_twice"]), "train_P": bool(cfg["train_P"])},
        "data": {"task": cfg["task"], "split": cfg["split"], "image_folder": cfg["image_folder"],
                 "images": len(dataset), "classes": num_classes, "fingerprint": fingerprint},
        "epochs": epoch_summary(history),
        "seconds": round(time.perf_counter() - t0, 2),
        "created_at": datetime.now(timezone.utc).isoformat(),
        "provenance": provenance(device),
    }
    meta = json.loads(json.dumps(meta, default=str))  # plain types only: loadable with weights_only=True
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    torch.save({"model": top_down_state(model), "harness": meta}, tmp)
    os.replace(tmp, output)
    sidecar = output.with_suffix(".json")
    sidecar.write_text(json.dumps(meta, indent=1, sort_keys=True))
    return meta
