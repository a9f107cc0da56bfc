"""The one training loop. It knows nothing about particular methods or tasks: it builds the backbone, asks the
method for a model, asks the task for data, and trains whatever the method left trainable.

Schedule: linear warmup then cosine, stepped per epoch (VPT's WarmupCosineSchedule: the factor is 0 in the first
epoch when there is warmup). Learning rate = base lr x batch/256 when the suite says ``lr_scaling: batch/256``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness.api import ARTIFACTS, METHODS, TASKS, ArtifactRequest, BuildContext, DataContext
from harness.cost import PeakMemory, forward_flops, parameter_counts
from harness.errors import HarnessError
from harness.metrics import METRICS
from harness.plan import trial_id
from harness.provenance import provenance


def pick_device() -> str:
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


def warmup_cosine(epoch: int, warmup: int, total: int) -> float:
    """The lr factor for a 0-based epoch: linear from 0 over ``warmup`` epochs, then cosine down to 0."""
    if epoch < warmup:
        return epoch / max(1, warmup)
    progress = (epoch - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrialEnv:
    """Everything a trial needs that is not part of its spec (it does not change what the trial computes)."""

    cache_dir: Path
    data_root: Path | None = None
    data_settings: dict[str, Any] = field(default_factory=dict)
    device: str = field(default_factory=pick_device)
    progress: bool = True
    #: save the trained (trainable) weights next to the record, for attention maps after a run
    keep_weights: bool = False
    #: where a trial in flight keeps its resumable state (set by the SLURM executor); None: no checkpoints
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 1
    #: the results folder, so kept weights land next to their record
    results_root: Path | None = None

    def resolve_artifact(self, spec: dict[str, Any]):
        def resolve(name: str) -> Path:
            provider = ARTIFACTS.get(name)
            return Path(provider(ArtifactRequest(name=name, suite=spec["suite"], cache_dir=self.cache_dir,
                                                 backbone=spec["backbone"], spec=spec, data_root=self.data_root)))

        return resolve

    def data_context(self, spec: dict[str, Any]) -> DataContext:
        data = dict(spec.get("data") or {})
        image_size = int(data.pop("image_size", 224))
        data.update(self.data_settings)
        return DataContext(data_root=self.data_root, cache_dir=self.cache_dir, image_size=image_size, settings=data)


def build_model(spec: dict[str, Any], env: TrialEnv) -> nn.Module:
    """Backbone + method, seeded with the trial's seed so heads and prompts start the same every time."""
    from methods.backbone import build_backbone

    method, task = METHODS.get(spec["method"]), TASKS.get(spec["task"])
    resolve = env.resolve_artifact(spec)
    seed_everything(spec["seed"])
    backbone = build_backbone(spec["backbone"], resolve)
    ctx = BuildContext(hparams=spec["hparams"], suite=spec["suite"], cache_dir=env.cache_dir, device=env.device,
                       resolve_artifact=resolve)
    return method.build(backbone, task.num_classes, ctx)


def make_optimizer(method, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if method.decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if method.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    if method.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"method {method.name}: unknown optimizer {method.optimizer!r}")


def evaluate(model: nn.Module, loader: DataLoader, device: str, metric: str, num_classes: int,
             autocast) -> float:
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for images, targets in loader:
            with autocast():
                logits = model(images.to(device, non_blocking=True))
            preds.append(logits.float().argmax(dim=1).cpu())
            labels.append(targets)
    return METRICS[metric](torch.cat(preds), torch.cat(labels), num_classes)


def run_trial(spec: dict[str, Any], env: TrialEnv) -> dict[str, Any]:
    """Train and evaluate one trial; return its record. Bad user input raises HarnessError; a non-finite loss
    gives a ``diverged`` record; any other exception gives a ``failed`` record with its traceback."""
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"id": trial_id(spec), "spec": spec, "started_at": started.isoformat()}
    try:
        record.update(_train(spec, env))
    except (HarnessError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - recorded, not swallowed: status failed + traceback
        record.update(status="failed", metrics={"eval": None}, curve=[], params={},
                      error={"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()})
    record["wall_time_s"] = round(time.perf_counter() - t0, 3)
    record["finished_at"] = datetime.now(timezone.utc).isoformat()
    record["provenance"] = provenance(env.device)
    return record


def _train(spec: dict[str, Any], env: TrialEnv) -> dict[str, Any]:
    method, task = METHODS.get(spec["method"]), TASKS.get(spec["task"])
    device = env.device
    train_cfg, hp = spec["train"], spec["hparams"]
    epochs, batch_size = int(train_cfg["epochs"]), int(train_cfg["batch_size"])
    warmup = int(train_cfg.get("warmup_epochs", method.warmup_epochs))
    base_lr, weight_decay = float(hp["lr"]), float(hp.get("weight_decay", 0.0))
    lr = base_lr * batch_size / 256 if train_cfg.get("lr_scaling", "none") == "batch/256" else base_lr
    use_amp = device.startswith("cuda") and train_cfg.get("amp", True)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()

    dctx = env.data_context(spec)
    train_set = task.dataset(spec["train_split"], dctx, train=True)
    eval_set = task.dataset(spec["eval_split"], dctx, train=False)
    data_fingerprint = {s: task.fingerprint(s, dctx) for s in (spec["train_split"], spec["eval_split"])}
    workers = int(train_cfg.get("num_workers", 0))
    generator = torch.Generator().manual_seed(spec["seed"])
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                              num_workers=workers, pin_memory=device.startswith("cuda"), drop_last=False,
                              worker_init_fn=_seed_worker if workers else None)
    eval_loader = DataLoader(eval_set, batch_size=int(train_cfg.get("eval_batch_size", 2 * batch_size)),
                             shuffle=False, num_workers=workers)

    model = build_model(spec, env).to(device)
    params = parameter_counts(model)
    image_size = dctx.image_size
    flops = forward_flops(model, image_size, device)
    optimizer = make_optimizer(method, model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: warmup_cosine(e, warmup, epochs))
    criterion = nn.CrossEntropyLoss(label_smoothing=float(train_cfg.get("label_smoothing", 0.0)))

    curve: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt = _checkpoint_path(spec, env)
    if ckpt is not None and ckpt.exists():
        start_epoch, curve = _load_checkpoint(ckpt, model, optimizer, scheduler, generator)

    status, train_images, train_seconds = "ok", 0, 0.0
    bar = _progress(range(start_epoch, epochs), env, desc=f"{spec['method']}/{spec['task']} {spec['stage']}")
    with PeakMemory(device) as memory:
        for epoch in bar:
            model.train()
            t_epoch = time.perf_counter()
            total_loss, seen = 0.0, 0
            for images, targets in train_loader:
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                with autocast():
                    loss = criterion(model(images).float(), targets)
                if not torch.isfinite(loss):
                    status = "diverged"
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * images.shape[0]
                seen += images.shape[0]
                memory.sample()
            train_seconds += time.perf_counter() - t_epoch
            train_images += seen
            if status == "diverged":
                curve.append({"epoch": epoch + 1, "train_loss": float("nan"), "lr": scheduler.get_last_lr()[0]})
                break
            value = evaluate(model, eval_loader, device, task.metric, task.num_classes, autocast)
            curve.append({"epoch": epoch + 1, "train_loss": total_loss / max(1, seen), "eval": value,
                          "lr": scheduler.get_last_lr()[0]})
            scheduler.step()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total_loss / max(1, seen):.3f}", **{task.metric: f"{value:.1f}"})
            if ckpt is not None and (epoch + 1) % env.checkpoint_every == 0 and epoch + 1 < epochs:
                _save_checkpoint(ckpt, epoch + 1, curve, model, optimizer, scheduler, generator)

    result: dict[str, Any] = {
        "status": status,
        "metrics": {"eval": curve[-1].get("eval") if status == "ok" else None, "metric": task.metric,
                    "eval_split": spec["eval_split"], "higher_is_better": task.higher_is_better,
                    "lr": lr},
        "curve": curve,
        "params": params,
        "cost": {"forward_flops": flops, "train_images_per_s": train_images / train_seconds if train_seconds else None,
                 "train_seconds": round(train_seconds, 3), **memory.result()},
        "data_fingerprint": data_fingerprint,
        "weights_fingerprint": _weights_fingerprint(spec, env),
    }
    if env.keep_weights and status == "ok":
        result["weights_file"] = str(_save_trained_weights(spec, env, model))
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return result


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _progress(iterable, env: TrialEnv, desc: str):
    if not env.progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, unit="ep", dynamic_ncols=True)


def _weights_fingerprint(spec: dict[str, Any], env: TrialEnv) -> str | None:
    from methods.backbone import file_fingerprint, resolve_weights

    weights = resolve_weights(spec["backbone"], env.resolve_artifact(spec))
    return file_fingerprint(weights) if isinstance(weights, Path) else weights


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def weights_path(record_path: Path) -> Path:
    return record_path.with_suffix(".weights.pt")


def _save_trained_weights(spec: dict[str, Any], env: TrialEnv, model: nn.Module) -> Path:
    from harness.store import Store

    if env.results_root is not None:
        path = weights_path(Store(env.results_root).path_for(spec))
    else:
        path = env.cache_dir / "weights" / f"{trial_id(spec)}.weights.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trainable_state(model), path)
    return path


def _checkpoint_path(spec: dict[str, Any], env: TrialEnv) -> Path | None:
    return env.checkpoint_dir / f"{trial_id(spec)}.ckpt.pt" if env.checkpoint_dir else None


def _save_checkpoint(path, epoch, curve, model, optimizer, scheduler, generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"epoch": epoch, "curve": curve, "model": trainable_state(model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path, model, optimizer, scheduler, generator) -> tuple[int, list]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), list(state["curve"])
