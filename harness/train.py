"""One trial: build the backbone and the method's model, read the task's data, train through the one loop
(:func:`harness.loop.fit`), evaluate every epoch, and return the trial's record. It knows nothing about particular
methods or tasks: it trains whatever the method left trainable, with the optimiser the method asks for.

Schedule (docs/protocol.md): linear warmup then cosine, stepped per epoch (VPT's WarmupCosineSchedule). Learning
rate = base lr x batch/256 when the suite says ``lr_scaling: batch/256``. The record carries the last-epoch metric
of the evaluation split, the per-epoch curve, parameter counts, cost, the input normalisation used, and provenance.

An iteration budget (``train.iters``, segmentation's protocol) trains that many optimiser steps instead of
``epochs``, stepping the schedule per step (``train.schedule``: ``cosine`` or mmseg's ``poly``, with
``warmup_iters``), drawing full batches, and evaluating once at the end. ``train.optimizer`` may replace the method's
optimiser kind for a whole suite, and ``train.no_decay`` its weight-decay rule (no decay on parameters whose name
contains any of the listed strings). What the model is, its loss and its metric come from the task's kind
(:mod:`harness.kinds`: classification, or segmentation for a ``SegmentationTask``) unless the task overrides them.
"""

from __future__ import annotations

import math
import os
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness import kinds
from harness.api import METHODS, TASKS, BuildContext, DataContext, Method, Task
from harness.backbone import build_backbone, file_fingerprint, resolve_weights
from harness.cost import forward_flops, parameter_counts
from harness.distributed import SINGLE, World, shard_loader, sync_batchnorm
from harness.errors import HarnessError
from harness.features import CacheRefused, frozen_loaders, module_fingerprint, refusal, storage_dtype
from harness.inputs import artifact_resolver, data_context
from harness.loop import fit, pick_device, seed_everything, trainable_state, warmup_cosine, warmup_poly
from harness.plan import TrialSpec, without_unversioned
from harness.provenance import next_trial_in_process, provenance
from harness.sweep import Suite


@dataclass
class TrialEnv:
    """Everything a trial needs that is not part of its spec (it does not change what the trial computes)."""

    cache_dir: Path
    data_root: Path | None = None
    #: task name -> its own folder (the suite's ``data.roots``): where data lives, so not in the spec
    data_roots: dict[str, str] = field(default_factory=dict)
    device: str = field(default_factory=pick_device)
    progress: bool = True
    #: save the trained (trainable) weights next to the record, for attention maps after a run
    keep_weights: bool = False
    #: where a trial in flight keeps its resumable state (set by the SLURM executor); None: no checkpoints
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 1
    #: the results folder, so kept weights land next to their record
    results_root: Path | None = None
    #: the frozen-computation cache (:mod:`harness.features`) where a method and task allow it (``--no-cache``)
    feature_cache: bool = True
    #: this process's place in a data-parallel trial (:mod:`harness.distributed`); one process by default
    world: World = field(default_factory=lambda: SINGLE)
    #: experiment trackers each finished trial is also sent to (``--log``; :mod:`harness.trackers`)
    trackers: tuple[str, ...] = ()

    @classmethod
    def for_suite(cls, suite: Suite, cache_dir: Path, **options: Any) -> "TrialEnv":
        """The environment of a suite's trials: where its data lives (``data.root``, the per-task ``data.roots``)
        plus ``options`` (device, progress, feature_cache, ...)."""
        return cls(cache_dir=Path(cache_dir), data_root=suite.data_root,
                   data_roots=dict(suite.data.get("roots") or {}), **options)

    def data_context(self, spec: TrialSpec) -> DataContext:
        data = dict(spec.data)
        if self.data_roots:
            data["roots"] = dict(self.data_roots)
        return data_context(data, spec.backbone, self.cache_dir, self.data_root)

    def resolver(self, spec: TrialSpec):
        return artifact_resolver(suite=spec.suite, backbone=spec.backbone, cache_dir=self.cache_dir,
                                 method=spec.method, sections=spec.sections, data=self.data_context(spec),
                                 overrides=spec.overrides, data_root=self.data_root, progress=self.progress)


def backbone_spec_for(method: Method, backbone: dict[str, Any], hparams: dict[str, Any],
                      task_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """A backbone spec with the method's extra model arguments for these ``hparams`` (drop-path when
    ``frozen_eval`` is off) and the task's (``task_args``: a segmentation task's dynamic input size); an explicit
    ``backbone.model_args`` entry wins."""
    backbone = dict(backbone)
    backbone["model_args"] = {**(task_args or {}), **method.backbone_args(hparams),
                              **(backbone.get("model_args") or {})}
    return backbone


def assemble_model(method: Method, backbone: dict[str, Any], hparams: dict[str, Any], *, cache_dir: Path,
                   device: str = "cpu", suite: str = "", task: Task | None = None, num_classes: int | None = None,
                   data: DataContext | None = None, resolve: Callable[[str], Path] | None = None,
                   random_init: bool = False, train_steps: int | None = None) -> nn.Module:
    """Backbone + method, the way every trial builds them (no data is read): the timm backbone of ``backbone``
    with the method's and the task's model arguments, then the task's model of the method (:mod:`harness.kinds`),
    or without a task ``method.build`` with a ``num_classes`` head. ``random_init``: built to be measured only
    (``harness bench``), so the method resolves no artifact (TOAST's pre-tuned module) and starts from its random
    initialisation. ``train_steps``: the optimiser steps the trial will take (``BuildContext.train_steps``). The
    caller seeds."""
    task_args = task.backbone_args(data) if task is not None and data is not None else {}
    model_backbone = build_backbone(backbone_spec_for(method, backbone, hparams, task_args), resolve)
    extra = {"resolve_artifact": resolve} if resolve is not None else {}
    ctx = BuildContext(hparams=hparams, suite=suite, cache_dir=cache_dir, device=device, task=task, data=data,
                       random_init=random_init, train_steps=train_steps, **extra)
    if task is not None:
        return kinds.build_model(method, task, model_backbone, ctx)
    if num_classes is None:
        raise ValueError("assemble_model: num_classes is needed when no task is given")
    return method.build(model_backbone, num_classes, ctx)


def build_model(spec: TrialSpec, env: TrialEnv, train_steps: int | None = None) -> nn.Module:
    """Backbone + method, seeded with the trial's seed so heads and prompts start the same every time."""
    method, task = METHODS.get(spec.method), TASKS.get(spec.task)
    resolve = env.resolver(spec)
    dctx = env.data_context(spec)
    seed_everything(spec.seed)
    return assemble_model(method, spec.backbone, spec.hparams, cache_dir=env.cache_dir, device=env.device,
                          suite=spec.suite, task=task, data=dctx, resolve=resolve, train_steps=train_steps)


def make_optimizer(method: Method, model: nn.Module, lr: float, hparams: dict[str, Any],
                   train: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """The method's optimiser over exactly the trainable parameters; no decay where the method says so. A suite's
    ``train.optimizer`` (other than ``method``) replaces the method's kind, and ``train.no_decay`` (name
    substrings) replaces its decay rule."""
    kind, weight_decay = method.optimizer_for(hparams)
    train = train or {}
    kind = kind if train.get("optimizer", "method") == "method" else str(train["optimizer"])
    exempt = train.get("no_decay")

    def decays(name: str, p: torch.nn.Parameter) -> bool:
        return method.decays(name, p) if exempt is None else not any(key in name for key in exempt)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    fused = {"fused": True} if train.get("fused_optimizer", False) and on_cuda else {}  # train.fused_optimizer
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, **fused)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, **fused)
    raise ValueError(f"method {method.name}: unknown optimizer {kind!r}")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a SLURM job's allocation, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def loader_workers(requested: int, device: str | None = None) -> int:
    """Data-loader worker processes: as the suite asks, capped at the CPUs this process may use (8 workers on a
    2-CPU machine only thrash, and torch warns on every trial); none when training on the CPU (``device``), where
    the model's own threads already use every core and workers would only compete with them."""
    if device is not None and not str(device).startswith("cuda"):
        return 0
    return max(0, min(int(requested), usable_cpus()))


def loader_options(requested: int, device: str) -> dict[str, Any]:
    """A trial's data-loader settings on ``device``: worker processes (:func:`loader_workers`) and pinned memory on
    CUDA only."""
    workers = loader_workers(requested, device)
    return {"num_workers": workers, "pin_memory": str(device).startswith("cuda"), "persistent_workers": workers > 0}


def run_trial(spec: TrialSpec, env: TrialEnv) -> dict[str, Any]:
    """Train and evaluate one trial; return its record. Bad user input raises HarnessError; a non-finite loss
    gives a ``diverged`` record; any other exception gives a ``failed`` record with its traceback. In a
    data-parallel trial every rank returns the record (rank 0's is written); a failed one names the rank that
    failed and why, and is marked ``distributed.broken``: the group is gone and the command stops."""
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    trial_in_process = next_trial_in_process()
    record: dict[str, Any] = {"id": spec.id, "spec": spec.to_dict(), "started_at": started.isoformat()}
    world = env.world
    try:
        record.update(_train(spec, env))
    except (HarnessError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - recorded, not swallowed: status failed + traceback
        record.update(status="failed", metrics={"eval": None}, curve=[], params={},
                      error={"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()})
        if world.distributed:
            world.note_failure(err)
            found = world.failure(err) if world.main else {"failed_rank": world.rank, "why": str(err)}
            record["error"].update(rank=found["failed_rank"], message=found["why"])
            record["distributed"] = {**world.describe_local(), **found, "broken": True}
    record["wall_time_s"] = round(time.perf_counter() - t0, 3)
    record["finished_at"] = datetime.now(timezone.utc).isoformat()
    record["provenance"] = provenance(env.device, trial_in_process, plugins=plugin_origins(spec))
    if env.trackers and world.main:  # one trial, one run in the tracker: rank 0's, as its record
        from harness.trackers import log_trial

        log_trial(record, env.trackers, env.results_root)
    return record


def plugin_origins(spec: TrialSpec) -> dict[str, dict[str, str]] | None:
    """The installed plug-in packages (distribution, version, entry point) that gave the trial's method or task;
    None when both are built in."""
    found = {"method": METHODS.origin(spec.method), "task": TASKS.origin(spec.task)}
    return {role: origin for role, origin in found.items() if origin} or None


def _train(spec: TrialSpec, env: TrialEnv) -> dict[str, Any]:
    method, task = METHODS.get(spec.method), TASKS.get(spec.task)
    device, world = env.device, env.world
    progress = env.progress and world.main
    train_cfg, hp = spec.train, spec.hparams
    batch_size = int(train_cfg["batch_size"])
    iters = iteration_budget(train_cfg, task.name)
    base_lr = float(hp["lr"])
    lr = base_lr * batch_size / 256 if train_cfg.get("lr_scaling", "none") == "batch/256" else base_lr
    amp = bool(train_cfg.get("amp", True))

    clock = PhaseClock()
    dctx = env.data_context(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    train_loader, eval_loader = _loaders(spec, task, dctx, device, generator, full_batches=iters is not None)
    data_fingerprint = {s: task.fingerprint(s, dctx) for s in (spec.train_split, spec.eval_split)}
    epochs, lr_factor, per_step = _schedule(train_cfg, method, iters, len(train_loader))
    clock.mark("data_setup")

    steps = iters if iters is not None else epochs * len(train_loader)
    model = sync_batchnorm(build_model(spec, env, train_steps=steps), world).to(device)
    if world.rank > 0:  # dropout and augmentation draw differently per rank (rank 0 draws as one process does)
        seed_everything(spec.seed + 1_000_003 * world.rank)
    clock.mark("model_build")
    params = parameter_counts(model)
    flops = forward_flops(model, task.input_size(dctx), device)
    clock.mark("cost_accounting")
    optimizer = make_optimizer(method, model, lr, hp, train_cfg)
    fit_model, loaders, feature_cache = _on_frozen(spec, env, method, task, model, dctx, data_fingerprint,
                                                   {"train": train_loader, "eval": eval_loader}, amp)
    fit_model, loaders, decoded_cache = _on_decoded(spec, env, task, fit_model, dctx, data_fingerprint, loaders,
                                                    feature_cache == "used")
    if train_cfg.get("compile", False):  # train.compile: in place, so parameter names stay the model's
        fit_model.compile()
    clock.mark("feature_cache")
    own_eval = world.distributed and kinds.own_evaluation(task)  # not split: rank 0 scores the whole split
    whole_eval = loaders["eval"]
    train_loader = shard_loader(loaders["train"], world, train=True)
    eval_loader = whole_eval if own_eval else shard_loader(loaders["eval"], world, train=False)
    checkpoint = env.checkpoint_dir / f"{spec.id}.ckpt.pt" if env.checkpoint_dir else None
    details: dict[str, Any] = {}  # what the last evaluation kept besides the number (per-class IoU)

    def eval_metric(trained: nn.Module) -> dict[str, float]:
        if own_eval:
            found = world.broadcast_object(kinds.evaluate(task, trained, whole_eval, device, dctx, amp)
                                           if world.main else None)
        else:
            found = kinds.evaluate(task, trained, eval_loader, device, dctx, amp, world)
        details.clear()
        details.update({k: v for k, v in found.items() if k != "eval"})
        return {"eval": found["eval"]}

    result = fit(fit_model, train_loader, optimizer, epochs=epochs, objective=kinds.objective(task, train_cfg, dctx),
                 lr_factor=lr_factor, per_step=per_step, evaluate=eval_metric, device=device,
                 amp=amp, generator=generator, checkpoint=checkpoint, checkpoint_every=env.checkpoint_every,
                 progress=f"{spec.method}/{spec.task} {spec.stage}" if progress else None,
                 max_steps=iters,
                 evaluate_every=epochs if iters is not None else int(train_cfg.get("eval_every", 1)), world=world)
    fit_seconds = clock.mark("fit")
    clock.seconds.pop("fit")
    for name, seconds in result.phases.items():
        clock.seconds[name] = seconds
    clock.seconds["loop_other"] = max(0.0, fit_seconds - sum(result.phases.values()))
    curve = result.history
    status = result.status
    out: dict[str, Any] = {
        "status": status,
        "metrics": {"eval": curve[-1].get("eval") if status == "ok" and curve else None, "metric": task.metric,
                    "eval_split": spec.eval_split, "higher_is_better": task.higher_is_better, "lr": lr,
                    **(details if status == "ok" else {})},
        "curve": curve,
        "params": params,
        "cost": {"forward_flops": flops, "train_images_per_s": result.images_per_s,
                 "train_seconds": round(result.train_seconds, 3), **result.memory},
        "inputs": {"image_size": dctx.image_size, "normalize": spec.data.get("normalize", "backbone"),
                   "mean": list(dctx.mean), "std": list(dctx.std), "train_input": list(task.input_size(dctx))},
        "data_fingerprint": data_fingerprint,
        "weights_fingerprint": _weights_fingerprint(spec, env),
        "feature_cache": feature_cache,
        "decoded_cache": decoded_cache,
        "distributed": world.describe(batch_size),
    }
    clock.mark("record")
    out["cost"]["phases_s"] = clock.rounded()
    settings = getattr(model, "checkpoint_settings", None)
    if settings:  # settings a loaded checkpoint brought with it (e.g. TOAST's v_bias_twice)
        out["checkpoint_settings"] = dict(settings)
    if result.resumed_from:
        out["resumed_from_epoch"] = result.resumed_from
    if env.keep_weights and status == "ok" and world.main:
        out["weights_file"] = str(_save_trained_weights(spec, env, model))
    return out


class PhaseClock:
    """Wall seconds of a trial's parts (``cost.phases_s``): :meth:`mark` ends the part running since the last
    mark (or the start) under ``name`` and returns its seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        spent = now - self.t
        self.seconds[name] = self.seconds.get(name, 0.0) + spent
        self.t = now
        return spent

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, 4) for name, seconds in self.seconds.items()}


def _loaders(spec: TrialSpec, task: Task, dctx: DataContext, device: str, generator: torch.Generator,
             full_batches: bool) -> tuple[DataLoader, DataLoader]:
    """The trial's training loader (shuffled by ``generator``; only full batches under an iteration budget,
    ``full_batches``) and its evaluation loader, with the task kind's collate."""
    train_cfg = spec.train
    batch_size = int(train_cfg["batch_size"])
    train_set = task.dataset(spec.train_split, dctx, train=True)
    eval_set = task.dataset(spec.eval_split, dctx, train=False)
    loading = loader_options(int(train_cfg.get("num_workers", 0)), device)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                              drop_last=full_batches and len(train_set) >= batch_size,
                              collate_fn=kinds.collate(task, True),
                              worker_init_fn=_seed_worker if loading["num_workers"] else None, **loading)
    eval_loader = DataLoader(eval_set, batch_size=int(train_cfg.get("eval_batch_size", 2 * batch_size)),
                             shuffle=False, collate_fn=kinds.collate(task, False), **loading)
    return train_loader, eval_loader


def _schedule(train_cfg: dict[str, Any], method: Method, iters: int | None,
              batches: int) -> tuple[int, Callable[[int], float], bool]:
    """(epochs, lr_factor, per_step): per-epoch warmup + cosine (or ``poly``) over ``epochs``; under an iteration
    budget (``iters``) stepped per optimiser step over as many passes of ``batches`` as it takes."""
    if iters is not None:  # an iteration budget: per-step schedule, as many passes as it takes, one evaluation
        epochs = math.ceil(iters / max(1, batches))
        warmup, total, per_step = int(train_cfg.get("warmup_iters", 0)), iters, True
    else:
        epochs = int(train_cfg["epochs"])
        warmup, total, per_step = int(train_cfg.get("warmup_epochs", method.warmup_epochs)), epochs, False
        if train_cfg.get("lr_step", "epoch") == "step":  # the same schedule, moved after every optimiser step
            warmup, total, per_step = warmup * max(1, batches), epochs * max(1, batches), True
    if str(train_cfg.get("schedule", "cosine")) == "poly":
        power, ratio = float(train_cfg.get("poly_power", 1.0)), float(train_cfg.get("warmup_ratio", 1e-6))
        return epochs, lambda i: warmup_poly(i, warmup, total, power, ratio), per_step
    return epochs, lambda i: warmup_cosine(i, warmup, total), per_step


def _on_frozen(spec: TrialSpec, env: TrialEnv, method: Method, task: Task, model: nn.Module, dctx: DataContext,
               data_fingerprint: dict[str, str], loaders: dict[str, DataLoader],
               amp: bool) -> tuple[nn.Module, dict[str, DataLoader], str]:
    """(the model to fit, its loaders, the record's ``feature_cache``): the model's trainable rest on its frozen
    part's cached outputs where the cache may serve the trial (:func:`harness.features.refusal`), else the model on
    images with the reason it may not."""
    reason = refusal(method, task, model, spec.train, env.feature_cache)
    if reason is None and not all(data_fingerprint.values()):
        reason = f"task {task.name} gives no data fingerprint"
    if reason is None:
        try:
            on_frozen, cached = frozen_loaders(
                model, loaders, _feature_keys(spec, env, method, task, model, dctx, data_fingerprint, amp),
                env.cache_dir, env.device, amp, storage_dtype(spec.train), env.progress)
            return on_frozen, cached, "used"
        except CacheRefused as refused:
            reason = str(refused)
    return model, loaders, f"off: {reason}"


def _on_decoded(spec: TrialSpec, env: TrialEnv, task: Task, model: nn.Module, dctx: DataContext,
                data_fingerprint: dict[str, str], loaders: dict[str, DataLoader],
                frozen_cached: bool) -> tuple[nn.Module, dict[str, DataLoader], str]:
    """(the model to fit, its loaders, the record's ``decoded_cache``): the task's inputs served decoded from
    :mod:`harness.decoded` where it allows (not needed where the frozen-computation cache serves)."""
    from harness import decoded

    reason = "the frozen-computation cache serves" if frozen_cached else decoded.refusal(task, spec.train,
                                                                                           env.feature_cache)
    if reason is None and not all(data_fingerprint.values()):
        reason = f"task {task.name} gives no data fingerprint"
    if reason is None:
        versions = without_unversioned({"task_version": spec.task_version})
        splits = {"train": spec.train_split, "eval": spec.eval_split}
        keys = {name: {"task": task.name, **versions, "split": split, "train": name == "train",
                       "data": data_fingerprint[split], "image_size": dctx.image_size, "settings": dctx.settings,
                       "data_root": str(dctx.data_root)} for name, split in splits.items()}
        try:
            return decoded.decoded_loaders(model, task, dctx, splits, loaders, keys, env.cache_dir,
                                           env.progress and env.world.main)
        except CacheRefused as refused:
            reason = str(refused)
    return model, loaders, f"off: {reason}"


def _feature_keys(spec: TrialSpec, env: TrialEnv, method: Method, task: Task, model: nn.Module, dctx: DataContext,
                  data_fingerprint: dict[str, str], amp: bool) -> dict[str, dict[str, Any]]:
    """What defines the cached features of the train and eval splits: the backbone's weights (their values) and
    spec, the task's data and split, the transform, the inputs' size and normalisation, the precision, and the
    method's and task's versions (a bump may change the frozen computation or the transforms; at version 1 they
    are left out, so caches made before versions existed stay valid)."""
    versions = without_unversioned({"method_version": spec.method_version, "task_version": spec.task_version})
    base = {"task": task.name, "frozen": method.frozen_features, "weights": module_fingerprint(model.backbone),
            **versions,
            "backbone": backbone_spec_for(method, spec.backbone, spec.hparams, task.backbone_args(dctx)),
            "image_size": dctx.image_size, "mean": list(dctx.mean), "std": list(dctx.std),
            "settings": dctx.settings, "data_root": str(dctx.data_root),
            "precision": "bf16" if amp and env.device.startswith("cuda") else "fp32"}
    return {"train": {**base, "split": spec.train_split, "data": data_fingerprint[spec.train_split], "train": True},
            "eval": {**base, "split": spec.eval_split, "data": data_fingerprint[spec.eval_split], "train": False}}


def iteration_budget(train: dict[str, Any], task: str) -> int | None:
    """``train.iters`` for this task (an integer for every task, or a mapping task -> steps); None: train
    ``epochs``."""
    iters = train.get("iters")
    if isinstance(iters, dict):
        iters = iters.get(task)
        if iters is None and train.get("epochs") is None:
            raise HarnessError(f"train.iters has no entry for task {task} and train.epochs is not set")
    return int(iters) if iters else None


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _weights_fingerprint(spec: TrialSpec, env: TrialEnv) -> str | None:
    weights = resolve_weights(spec.backbone, env.resolver(spec))
    return file_fingerprint(weights) if isinstance(weights, Path) else weights


def weights_path(record_path: Path) -> Path:
    return record_path.with_suffix(".weights.pt")


def _save_trained_weights(spec: TrialSpec, env: TrialEnv, model: nn.Module) -> Path:
    from harness.store import Store

    if env.results_root is not None:
        path = weights_path(Store(env.results_root).path_for(spec))
    else:
        path = env.cache_dir / "weights" / f"{spec.id}.weights.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trainable_state(model), path)
    return path
