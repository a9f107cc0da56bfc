"""TOAST's pre-tuning stage (paper §3.2, appendix A.2) and the ``toast-pretuned`` artifact.

The backbone stays frozen; xi, P and the feedback path (plus a throw-away head for the upstream classes) train with

    loss = CE + var_loss_weight * sum_l MSE(decoders[l].linear(out_l.detach()), in_l.detach())

where CE is the mean over the two passes' cross-entropies (AbSViT's ``engine.py``, the only released top-down training
loop; ``first_pass_ce: false`` keeps only the second pass's) and in_l/out_l are block l's second-pass input/output.
Recipe defaults are the paper's: AdamW, lr 5e-4, 30 epochs, 3 warm-up and 3 cool-down epochs, no mixup/cutmix,
variational-loss weight 0.03 (the official code hard-codes 0.1). Where the paper is silent we take DeiT's values (its
backbone recipe): weight decay 0.05 on matrices, min lr 1e-5, batch 512.

Training goes through the harness's one loop (``harness.api.fit``): per-step learning-rate schedule, bf16 autocast on
GPUs (``amp``), and a resumable checkpoint next to the output (``<output>.ckpt.pt``), so an interrupted pre-tuning
(a preempted job, Ctrl-C) continues from its last finished epoch when run again with the same settings.

The inputs are the ones the suite's trials see (``ArtifactRequest.data``: image size and the resolved ``data.normalize``
mean/std), for an ``image_folder`` as for a registered task, so the module is pre-tuned on the statistics it is later
tuned with.

A suite's ``pretune:`` section configures it::

    pretune:
      task: demo-upstream        # any registered task; or image_folder: /path/to/imagenet/train (ImageFolder)
      split: train
      epochs: 30                 # and any other key of DEFAULTS
      auto: false                # true (the demo): pre-tune on first use, cached
      checkpoint: null           # a file from `harness pretune --output` or an official TOAST checkpoint

Resolution of ``toast-pretuned`` for a trial (``make=False``): ``checkpoint`` if given; else the cached file for
(backbone, section, feedback span, inputs) if it exists; else pre-tune now when ``auto``; else a HarnessError naming
the ``harness pretune`` command that makes the file (it writes to the same path, so the next run finds it).
``harness pretune`` asks with ``make=True``: the stage runs now (again with ``force``) and prints its summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from harness.api import ARTIFACTS, METHODS, TASKS, ArtifactRequest, DataContext, data_identity
from harness.errors import HarnessError, did_you_mean
from methods.toast_pretune_train import epoch_summary, pretune_model

# torch and the model modules are imported where they train: listing methods, validating a suite and reading
# records import this module (the artifact's version, the pretune section's defaults) without torch
if TYPE_CHECKING:  # pragma: no cover
    import torch

    from harness.api import FitResult
    from methods.toast_model import TopDownViT

#: the stage's version: bump it when a change alters the pre-tuned module. It is in the cache key (a new file is made)
#: and, as the provider's ``version``, in the specs of the trials that load it (their older records become stale).
#: 2: trained through harness.api.fit (per-epoch means), inputs (size, mean, std) in the key and the metadata
PRETUNE_VERSION = 2
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
    "amp": True,
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


def inputs_of(data: DataContext) -> dict[str, Any]:
    """What the pre-tuning's inputs are (not where they live): size, normalisation and the data settings."""
    settings = data_identity(data.settings)
    return {"image_size": int(data.image_size), "mean": [float(m) for m in data.mean],
            "std": [float(s) for s in data.std], "settings": settings}


def cache_key(backbone: dict[str, Any], cfg: dict[str, Any], architecture: dict[str, Any],
              data: DataContext) -> str:
    content = {"backbone": backbone, "pretune": {k: v for k, v in cfg.items() if k not in NOT_IN_KEY},
               "architecture": architecture, "inputs": inputs_of(data), "version": PRETUNE_VERSION}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "artifacts" / f"toast-pretuned-{key}.pt"


def resume_path(output: Path) -> Path:
    """Where an interrupted pre-tuning for ``output`` keeps its resumable state (removed when it finishes)."""
    return Path(str(output) + ".ckpt.pt")


class TopDownMethod(Protocol):
    """What the stage asks of a TOAST method (:class:`methods.toast.ToastMethod`; this module does not import it:
    the methods use the stage, not the other way round)."""

    name: str
    feedback: str  # the feedback span: what a pre-tuned module must match
    pretuned: bool  # False: the method starts from a random top-down module

    def make_model(self, backbone: torch.nn.Module, num_classes: int, hparams: dict[str, Any]) -> TopDownViT: ...

    def decays(self, param_name: str, param: torch.nn.Parameter, optimizer: str | None = None) -> bool: ...


def toast_method(name: str) -> TopDownMethod:
    """The registered TOAST method ``name`` (any method with a top-down architecture), or a clear error."""
    method = METHODS.get(name)
    if not all(hasattr(method, attr) for attr in ("make_model", "feedback", "pretuned")):
        raise HarnessError(f"'{name}' is not a TOAST method; pre-tuning is for toast, toast-early, toast-late, ...")
    return method


def pretune_architecture(method: TopDownMethod) -> dict[str, Any]:
    """What a pre-tuned checkpoint must match: the feedback span (token selection on or off shares one module)."""
    return {"feedback": method.feedback}


def pretune_command(suite: str, method: str, overrides: dict[str, Any] | None = None) -> str:
    """The command line that makes the checkpoint a trial of ``method`` looks for (same suite and overrides)."""
    parts = ["harness pretune", f"--suite {suite}", f"--method {method}"]
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
def toast_pretuned(request: ArtifactRequest) -> Path:
    """The pre-tuned top-down module for ``request.method`` (see the module docstring for the order); with
    ``request.make`` the stage runs now (see :func:`make_pretuned`)."""
    method = request.method or "toast"
    toast = toast_method(method)
    command = pretune_command(request.suite, method, request.overrides)
    if not toast.pretuned:
        raise HarnessError(f"method {method} starts from a random top-down module; it has nothing to pre-tune")
    if request.sections.get("pretune") is None:
        raise HarnessError(
            f"method {method} needs a pre-tuned top-down module, but suite '{request.suite}' has no pretune section: "
            "add `pretune: {image_folder: <ImageNet train folder>}` (or `{task: <upstream task>}`) to the suite and "
            f"run `{command}`, or add `pretune: {{checkpoint: <official TOAST checkpoint>}}`")
    cfg = section_of(request.sections["pretune"])
    if cfg["checkpoint"]:
        path = Path(os.path.expanduser(str(cfg["checkpoint"])))
    else:
        key = cache_key(request.backbone, cfg, pretune_architecture(toast), _data_of(request))
        path = default_path(request.cache_dir, key)
    if request.make:
        return make_pretuned(request, cfg, method, path)
    if path.exists():
        return path
    if cfg["checkpoint"]:
        raise HarnessError(f"pretune.checkpoint {path} does not exist; make it with `{command} --output {path}` "
                           "or point it at an official TOAST checkpoint")
    if not cfg["auto"] and not (cfg["task"] or cfg["image_folder"]):
        raise HarnessError(
            f"no pre-tuned TOAST checkpoint for suite '{request.suite}': set pretune.image_folder (an ImageNet-style "
            f"train folder) in the suite file and run `{command}`, or set pretune.checkpoint to an official TOAST "
            "checkpoint")
    if not cfg["auto"]:
        raise HarnessError(
            f"no pre-tuned TOAST checkpoint for suite '{request.suite}' (looked for {path}): run `{command}` first, "
            "or set pretune.checkpoint to an official TOAST checkpoint"
            + made_elsewhere(request.cache_dir, method, request.backbone, pretune_architecture(toast), cfg))
    from harness.api import file_lock

    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            run_pretune(request.backbone, cfg, method, path, data=_data_of(request), resolve=_resolver(request),
                        progress=request.progress)
    return path


toast_pretuned.version = PRETUNE_VERSION  # type: ignore[attr-defined]  # recorded in trial specs (harness.api)


def made_elsewhere(cache_dir: Path, method: str, backbone: dict[str, Any], architecture: dict[str, Any],
                   cfg: dict[str, Any]) -> str:
    """A hint for a run that does not find its pre-tuned module: the modules of the same architecture and backbone
    made under other pretune settings (their JSON sidecars), each with the ``--set`` flags that would find it
    (a pre-tuning started with ``--set pretune.image_folder=...`` is found only by runs given the same setting)."""
    hints = []
    for sidecar in sorted((Path(cache_dir) / "artifacts").glob("toast-pretuned-*.json")):
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("architecture") != architecture or meta.get("backbone") != json.loads(
                json.dumps(backbone, default=str)):
            continue
        theirs = meta.get("pretune") or {}
        differ = {k: theirs.get(k) for k in sorted(set(theirs) | set(cfg))
                  if k not in NOT_IN_KEY and theirs.get(k) != cfg.get(k)}
        flags = " ".join(f"--set pretune.{k}={v if isinstance(v, str) else json.dumps(v)}"
                         for k, v in differ.items())
        hints.append(f"{sidecar.with_suffix('.pt')} (pre-tuned by {meta.get('method')}; "
                     + (f"add `{flags}` to find it" if differ else "its inputs differ: image size or normalisation")
                     + ")")
    if not hints:
        return ""
    return (f". A pre-tuned module for {method}'s architecture on this backbone exists under other pretune settings: "
            + "; ".join(hints[:3]) + (f"; and {len(hints) - 3} more" if len(hints) > 3 else ""))


def make_pretuned(request: ArtifactRequest, cfg: dict[str, Any], method: str, lookup: Path) -> Path:
    """``harness pretune``: pre-tune now into ``request.output`` (default ``lookup``, where trials look), unless the
    file exists and ``request.force`` is off; print what was made and how trials find it. Data-parallel
    (``request.world``): every rank trains, rank 0 holds the lock, decides and writes."""
    import contextlib

    from harness.api import file_lock

    world = request.world
    main = world is None or world.main
    output = Path(request.output) if request.output else lookup
    # a parallel job making the same file: wait for it, then reuse (one lock per group of ranks: rank 0's)
    with file_lock(output.with_suffix(".lock")) if main else contextlib.nullcontext():
        done = output.exists() and not request.force
        if world is not None:
            done = world.broadcast_object(done)
        if done:
            if main:
                print(f"already pre-tuned: {output} (--force to redo)")
            return output
        meta = run_pretune(request.backbone, cfg, method, output, data=_data_of(request), resolve=_resolver(request),
                           progress=request.progress, world=world)
    if not main:
        return output
    print(summary(meta))
    print(f"wrote {output} (+ {output.with_suffix('.json').name})")
    if output != lookup:
        print(f"use it with: pretune.checkpoint: {output}  (in the suite file, or --set pretune.checkpoint={output})")
    else:
        print(f"the trials of {method} in suite '{request.suite}' find it there")
    return output


def summary(meta: dict[str, Any]) -> str:
    """One line about a finished pre-tuning: time, images, last epoch's losses and accuracies."""
    last = meta["epochs"][-1] if meta["epochs"] else {}
    nan = float("nan")
    text = (f"pre-tuned {meta['method']}'s top-down module in {meta['seconds']:.1f} s on {meta['data']['images']} "
            f"images: last epoch ce {last.get('ce', nan):.3f}, var {last.get('var', nan):.4f}, "
            f"train acc {100 * last.get('acc', nan):.1f}%")
    if "acc_first" in last:
        text += f" (bottom-up first pass, same head: {100 * last['acc_first']:.1f}%)"
    if meta.get("resumed_from_epoch"):
        text += f"; resumed from epoch {meta['resumed_from_epoch']}"
    return text


def _data_of(request: ArtifactRequest) -> DataContext:
    if request.data is None:
        raise HarnessError(f"artifact {request.name} for suite '{request.suite}': the request carries no data "
                           "context (ArtifactRequest.data), so the pre-tuning's inputs (image size, normalisation) "
                           "are unknown; the engine passes the one its trials use")
    return request.data


def _resolver(request: ArtifactRequest) -> Callable[[str], Path]:
    """Resolves the artifacts the pre-tuning itself needs (e.g. ``artifact:`` backbone weights) as a trial would:
    found or auto-made, never forced or redirected to ``request.output``."""
    def resolve(name: str) -> Path:
        nested = dataclasses.replace(request, name=name, make=False, force=False, output=None)
        return Path(os.path.expanduser(str(ARTIFACTS.get(name)(nested))))

    return resolve


# ---------------------------------------------------------------------------------------------------- data
def pretune_dataset(cfg: dict[str, Any], data: DataContext,
                    backbone: torch.nn.Module) -> tuple[torch.utils.data.Dataset, int, str]:
    """(dataset, number of classes, fingerprint) from ``image_folder`` (ImageNet-style) or a registered task, with
    the size and normalisation of ``data`` (what the suite's trials use)."""
    if cfg["image_folder"]:
        from timm.data import create_transform, resolve_data_config
        from methods.image_folder import CachedImageFolder

        root = Path(os.path.expanduser(str(cfg["image_folder"])))
        if not root.is_dir():
            raise HarnessError(f"pretune.image_folder {root} is not a folder (expected <root>/<class>/<image> files)")
        size = int(data.image_size)
        # the backbone's interpolation and crop; the trials' mean/std, not timm's pretrained config's
        config = resolve_data_config({"input_size": (3, size, size)}, model=backbone)
        config.update(mean=tuple(data.mean), std=tuple(data.std))
        # DeiT-style training crops and flips; no mixup/cutmix (paper A.2)
        transform = create_transform(**config, is_training=True)
        dataset = CachedImageFolder(str(root), transform=transform, cache_dir=data.cache_dir)
        return dataset, len(dataset.classes), f"imagefolder:{root}:{len(dataset)}"
    if not cfg["task"]:
        raise HarnessError("pretune: set 'task' (a registered task, e.g. demo-upstream) or 'image_folder'")
    task = TASKS.get(cfg["task"])
    if cfg["split"] not in task.splits:
        raise HarnessError(f"pretune.split: task {task.name} has splits {', '.join(task.splits)}, not '{cfg['split']}'")
    return task.dataset(cfg["split"], data, train=True), task.num_classes, task.fingerprint(cfg["split"], data)


def run_pretune(backbone_spec: dict[str, Any], cfg: dict[str, Any], method: str, output: Path, *,
                data: DataContext, resolve: Callable[[str], Path] | None = None, device: str | None = None,
                progress: bool = True, world: Any = None) -> dict[str, Any]:
    """Pre-tune the top-down module of ``method``'s architecture on the suite's backbone and write ``output``
    (a torch file ``{"model": official-key state, "harness": metadata}``) plus a JSON sidecar; returns the metadata.

    The inputs are ``data`` (the trials' DataContext). While it runs, ``<output>.ckpt.pt`` holds the resumable state
    (with ``<output>.ckpt.json`` naming the settings it belongs to): running again with the same settings resumes
    from it; a leftover of other settings is discarded.

    Data-parallel (``world``, from ``harness pretune --devices N``): each rank trains on its part of every global
    batch of ``batch_size`` (the one-process batches), and rank 0 alone writes the checkpoints and the result."""
    from harness.api import build_backbone, pick_device, seed_everything, shard_loader

    main = world is None or world.main
    device = device or (world.device if world is not None else pick_device())
    toast = toast_method(method)
    output = Path(output)
    key = cache_key(backbone_spec, cfg, pretune_architecture(toast), data)
    checkpoint, checkpoint_key = _resume_files(output, key, discard=main)
    output.parent.mkdir(parents=True, exist_ok=True)

    seed_everything(int(cfg["seed"]))
    backbone = build_backbone(backbone_spec, resolve)
    dataset, num_classes, fingerprint = pretune_dataset(cfg, data, backbone)
    model = toast.make_model(backbone, num_classes, {"v_bias_twice": bool(cfg["v_bias_twice"]),
                                                     "frozen_eval": cfg["frozen_eval"]})
    import torch  # here, not at the top: the module's declarations are read without torch

    # the upstream head is thrown away: timm's ViT head init (trunc-normal 0.02, zero bias) starts it at chance
    # level instead of the downstream head's large kaiming init, so the first steps train the top-down module
    torch.nn.init.trunc_normal_(model.head.weight, std=0.02)
    torch.nn.init.zeros_(model.head.bias)
    model = model.to(device)
    generator = torch.Generator().manual_seed(int(cfg["seed"]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(cfg["batch_size"]), shuffle=True, drop_last=False,
                                         num_workers=int(cfg["num_workers"]), generator=generator)
    if world is not None:
        loader = shard_loader(loader, world)
    t0 = time.perf_counter()
    if main:
        checkpoint_key.write_text(json.dumps({"key": key, "output": str(output)}))
    try:
        result = pretune_model(model, loader, cfg, device, desc=f"pre-tuning TOAST ({method}, once)",
                               progress=progress and main, checkpoint=checkpoint, generator=generator,
                               method=toast, world=world)
    finally:
        if main and not checkpoint.exists():  # finished, diverged, or stopped before its first checkpoint
            checkpoint_key.unlink(missing_ok=True)
    source = {"task": cfg["task"], "split": cfg["split"], "image_folder": cfg["image_folder"],
              "images": len(dataset), "classes": num_classes, "fingerprint": fingerprint}
    meta = pretune_metadata(method, toast, key, backbone_spec, cfg, data, source, resolve, device, result,
                            time.perf_counter() - t0)
    if world is not None:
        meta["distributed"] = world.describe(int(cfg["batch_size"]))
    if main:
        _write_pretuned(output, model, meta)
    if world is not None:
        world.barrier()  # the file is there before any rank goes on
    return meta


def _resume_files(output: Path, key: str, discard: bool = True) -> tuple[Path, Path]:
    """(resumable state, its settings file) of a pre-tuning into ``output``; a leftover state of other settings
    (another ``key``) is discarded (by one rank only: ``discard``)."""
    checkpoint = resume_path(output)
    checkpoint_key = checkpoint.with_name(checkpoint.name.removesuffix(".pt") + ".json")
    if discard and checkpoint.exists():
        made_for = json.loads(checkpoint_key.read_text()).get("key") if checkpoint_key.is_file() else None
        if made_for != key:
            print(f"discarding {checkpoint}: it is the state of a pre-tuning with other settings")
            checkpoint.unlink()
    return checkpoint, checkpoint_key


def pretune_metadata(method: str, toast: TopDownMethod, key: str, backbone_spec: dict[str, Any],
                     cfg: dict[str, Any], data: DataContext, source: dict[str, Any],
                     resolve: Callable[[str], Path] | None, device: str, result: "FitResult",
                     seconds: float) -> dict[str, Any]:
    """What a pre-tuned file says about itself (plain types only: loadable with ``weights_only=True``): ``source``
    is the data it was pre-tuned on, ``data`` the inputs' settings."""
    from harness.api import file_fingerprint, provenance, resolve_weights

    weights = resolve_weights(backbone_spec, resolve)
    meta = {
        "format": "toast-pretuned", "version": PRETUNE_VERSION, "method": method, "key": key,
        "architecture": pretune_architecture(toast),
        "backbone": backbone_spec,
        "backbone_weights": file_fingerprint(weights) if isinstance(weights, Path) else weights,
        "pretune": {k: v for k, v in cfg.items() if k != "checkpoint"},
        "settings": {"v_bias_twice": bool(cfg["v_bias_twice"]), "train_P": bool(cfg["train_P"])},
        "inputs": inputs_of(data),
        "data": source,
        "epochs": epoch_summary(result.history),
        "seconds": round(seconds, 2),
        "created_at": datetime.now(timezone.utc).isoformat(),
        "provenance": provenance(device),
    }
    if result.resumed_from:
        meta["resumed_from_epoch"] = result.resumed_from
    return json.loads(json.dumps(meta, default=str))


def _write_pretuned(output: Path, model: TopDownViT, meta: dict[str, Any]) -> None:
    """The torch file (atomically: temp file + rename) and its JSON sidecar."""
    import torch

    from methods.toast_checkpoint import top_down_state

    tmp = output.with_name(output.name + ".tmp")
    torch.save({"model": top_down_state(model), "harness": meta}, tmp)
    os.replace(tmp, output)
    output.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True))
