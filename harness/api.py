"""The plug-in interface: what a method and a task declare, the registries they are listed in, and the engine
services a plug-in may use.

A method file (``methods/<family>.py``) subclasses :class:`Method`; a task file (``tasks/<suite family>.py``)
subclasses :class:`Task`. The method's name is written once, in ``methods/__init__.py``'s ``INDEX``
(``"linear": "methods.linear:LinearProbe"``); the registry instantiates the class and gives it that name. The
engine only talks to these interfaces, and plug-ins import only this module and :mod:`harness.errors`.

Engine services for plug-ins (imported lazily on first use, so ``import harness.api`` stays free of torch):
``fit`` and ``FitResult`` (the one training loop), ``warmup_cosine``, ``seed_everything``, ``pick_device``, ``build_backbone``,
``resolve_weights``, ``file_fingerprint``, ``file_lock``, ``atomic_write_json``, ``provenance``, ``cls_attention``,
``segmentation_model`` (the engine's ViT segmentation model, for a method that overrides
:meth:`Method.build_segmentation`), ``data_identity`` (a data section without where the data lives: what an
artifact's key may hold), ``shard_loader`` (a loader as one rank's part of each global batch, for a stage run
data-parallel: see :attr:`ArtifactRequest.world`).

Task kinds: a :class:`Task` is a classification task (items ``(image, int label)``, one logit vector per image). A
:class:`SegmentationTask` (``kind = "segmentation"``) has items ``(image, label map)`` and the metric mIoU; a method
gives its segmentation model through :meth:`Method.build_segmentation`, whose default (None) lets the engine wrap
the method's own model, so the method's trainable set plugs in unchanged.

This module declares; the engine acts. The hooks the engine asks while it trains a trial (``Task.build_model``,
``objective``, ``evaluate``, ``collate``; ``Method.build_segmentation``) return None by default, meaning "the
engine's behaviour for this task's ``kind``" (:mod:`harness.kinds`); a plug-in overrides one to replace it. So the
interface imports nothing of the engine but :mod:`harness.registry` and :mod:`harness.errors`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: the input size when a suite's ``data.image_size`` says nothing (ViT-B/16's 224)
DEFAULT_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

#: engine services plug-ins may use: name -> "module:attr", imported on first access (PEP 562)
_SERVICES = {
    "fit": "harness.loop:fit",
    "FitResult": "harness.loop:FitResult",
    "seed_everything": "harness.loop:seed_everything",
    "warmup_cosine": "harness.loop:warmup_cosine",
    "pick_device": "harness.loop:pick_device",
    "build_backbone": "harness.backbone:build_backbone",
    "resolve_weights": "harness.backbone:resolve_weights",
    "file_fingerprint": "harness.backbone:file_fingerprint",
    "file_lock": "harness.files:file_lock",
    "atomic_write_json": "harness.files:atomic_write_json",
    "provenance": "harness.provenance:provenance",
    "cls_attention": "harness.attention:cls_attention",
    "segmentation_model": "harness.segmentation:segmentation_model",
    "data_identity": "harness.inputs:data_identity",
    "shard_loader": "harness.distributed:shard_loader",
}


def __getattr__(name: str) -> Any:
    if name in _SERVICES:
        import importlib

        module, attr = _SERVICES[name].split(":")
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harness.api' has no attribute '{name}'")


@dataclass
class BuildContext:
    """What a method may ask the engine for while it builds a model."""

    hparams: dict[str, Any]
    suite: str
    cache_dir: Path
    device: str = "cpu"
    #: the task the model is built for (per-task defaults; its ``kind`` says what the model must output)
    task: "Task | None" = None
    #: True when the model is built only to be inspected (parameter counts, FLOPs): a method must then not
    #: resolve artifacts such as pre-tuned checkpoints, and builds with its random initialisation instead
    random_init: bool = False
    #: the data as the trial sees it (a segmentation task's crop and decoder settings live in its settings)
    data: "DataContext | None" = None
    #: the optimiser steps the trial will take (epochs x batches per epoch, or the iteration budget), for a method
    #: whose schedule depends on it (AdaLoRA's rank budget); None when the model is built outside a trial
    train_steps: int | None = None
    resolve_artifact: Callable[[str], Path] = lambda name: (_ for _ in ()).throw(KeyError(name))  # noqa: E731


class Method(abc.ABC):
    """A transfer-learning method.

    Subclasses set the class attributes and implement :meth:`build`. Which parameters train is whatever
    ``build`` leaves with ``requires_grad=True``; the training loop optimises exactly those.

    ``version`` is part of every trial spec: bump it when a change alters what a trial computes (a fixed bug, a
    new initialisation, another default), so the method's earlier records become stale and ``harness run``
    trains its cells again. A change that computes the same numbers (a rename, a faster path) keeps it.
    """

    name: str = ""
    #: the version of what this method computes (see the class docstring); records carry it as ``method_version``
    version: int = 1
    family: str = ""
    #: the heading ``harness ls methods`` lists it under: ``headline`` (the paper's six), ``petl`` (the PETL
    #: baselines), ``toast-variant``; empty: ``plug-in`` for a method from an installed package, else ``other``
    group: str = ""
    description: str = ""
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adamw" (betas 0.9/0.999, eps 1e-6)
    warmup_epochs: int = 10  # the official code's per-method warmup (docs/protocol.md §5.3)
    #: default search grid: axes are lists (base learning rate and weight decay at least)
    grid: dict[str, list] = {}
    #: fixed hyperparameters with their defaults (e.g. VPT's prompt length); a sweep may override them
    defaults: dict[str, Any] = {}
    #: artifacts the method needs resolved before it can build (e.g. a pre-tuned top-down checkpoint)
    needs: tuple[str, ...] = ()
    #: the backbone families the method can run on (:func:`harness.backbone.backbone_family` of the suite's timm
    #: name: ``vit``, ``convnext``, ...; e.g. VPT's prompt tokens need a ViT: ``("vit",)``); empty: any. A run on
    #: another family is refused before its first trial, with one line naming the method, backbone and families
    backbones: tuple[str, ...] = ()
    # What of the model runs in eval mode while it trains is the model's declaration, and the engine keeps it so
    # (harness.loop.train_mode; a model writes no ``train()`` override): ``model.frozen_modules`` names the frozen
    # submodules (dotted, e.g. ``("backbone",)``; none when absent), ``model.trains_in_frozen`` the modules inside
    # them that still train, by the last part of their name (an adapter's own dropout: ``("lora_dropout",)``).
    # A model that adapts itself as it trains (AdaLoRA's rank budget) has ``after_optimizer_step(step)`` (on itself or
    # a submodule, so a wrapper such as the segmentation model keeps it): the engine calls it after every optimiser
    # step of a trial (``step`` counts from 0 over the whole trial), while the step's
    # gradients are still in place; ``BuildContext.train_steps`` says how many steps there will be.

    #: what of the model is frozen and may be computed once and cached (:mod:`harness.features`), as a name that
    #: is part of the cache key (methods whose frozen parts compute the same thing share it): ``"pooled"`` for the
    #: linear probe, ``"first-pass"`` for TOAST. The model then offers ``frozen_forward(images)`` (a tensor or a
    #: tuple of tensors, computed by the frozen ``model.backbone`` alone) and ``from_frozen(*tensors)`` (the
    #: model's output from them), and the engine trains on cached ``frozen_forward`` outputs where the task's
    #: training transforms are deterministic. None: nothing (the model runs on images)
    frozen_features: str | None = None
    #: top-level suite sections this method reads (e.g. TOAST's ``pretune``); they are copied into its trial
    #: specs, so changing them changes its trial ids and nobody else's
    suite_sections: tuple[str, ...] = ()

    #: hyperparameter keys the method accepts besides its grid axes, its defaults, lr and weight_decay (suite
    #: files are validated against these: a typo such as ``prompt_lenght`` is refused)
    hparam_keys: tuple[str, ...] = ()
    #: the values a hyperparameter may take, where it is a choice (e.g. finetune's ``optimizer``); suite files and
    #: ``--set`` are checked against them before anything runs
    hparam_choices: dict[str, tuple[Any, ...]] = {}

    def accepted_hparams(self) -> set[str]:
        return {"lr", "weight_decay", *self.grid, *self.defaults, *self.hparam_keys}

    def section_keys(self, section: str) -> dict[str, Any]:
        """The keys one of this method's ``suite_sections`` accepts, with their defaults (for validation)."""
        return {}

    def check_stage(self, request: "ArtifactRequest") -> Path | None:
        """Before ``harness pretune --executor slurm`` submits the stage that makes ``request.name`` (one of
        :attr:`needs`) as a job: raise a HarnessError for what would stop it at its start (its settings, a data
        folder that is not there), and return where its result will land (None: the provider decides later)."""
        return None

    def backbone_args(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """Extra ``timm.create_model`` arguments this trial's backbone is built with. ``frozen_eval: false`` (the
        official TOAST code's choice) trains with drop-path ``drop_path`` (default 0.1) in the frozen backbone;
        the default ``frozen_eval: true`` keeps the frozen backbone in eval mode with no drop-path."""
        if hparams.get("frozen_eval", True) is False:
            return {"drop_path_rate": float(hparams.get("drop_path", 0.1))}
        return {}

    def optimizer_for(self, hparams: dict[str, Any]) -> tuple[str, float]:
        """(optimizer kind, weight decay) for a trial: ``"sgd"`` (momentum 0.9) or ``"adamw"``. Override when a
        setting changes the optimiser (e.g. the official fine-tuning code's AdamW/SGD switch)."""
        return self.optimizer, float(hparams.get("weight_decay", 0.0))

    def defaults_for(self, task: "Task") -> dict[str, Any]:
        """Fixed hyperparameters for one task (override for per-task defaults such as VPT's prompt length)."""
        return dict(self.defaults)

    @abc.abstractmethod
    def build(self, backbone: "nn.Module", num_classes: int, ctx: BuildContext) -> "nn.Module":
        """Return the model to train: ``forward(images) -> logits``, with a ``head`` attribute (the task head)."""

    def build_segmentation(self, backbone: "nn.Module", task: "SegmentationTask",
                           ctx: BuildContext) -> "nn.Module | None":
        """The model for a segmentation task: ``forward(images) -> B x C x H x W`` logits. Default (None): the
        engine's segmentation model (:func:`harness.segmentation.segmentation_model`) around this method's own
        model from :meth:`build`: features of evenly spaced blocks (2, 5, 8, 11 of 12) are read from the backbone's
        blocks while the method's model runs, its classification head is dropped, and a UPerNet decode head and an
        auxiliary FCN head (both always trained) turn them into logits. Whatever ``build`` left trainable trains.
        Override to give the engine other features (TOAST: its second pass's, through the ``segmentation_model``
        service)."""
        return None

    def decays(self, param_name: str, param: "torch.nn.Parameter", optimizer: str | None = None) -> bool:
        """Whether weight decay applies to a trainable parameter under ``optimizer`` (default: the method's own).
        SGD: everything but the head's bias (as the official SGD code does); AdamW: matrices only, no norms (so no
        biases, norms or vectors such as TOAST's xi). A stage with its own optimiser (TOAST's pre-tuning, AdamW)
        asks with its kind."""
        if (optimizer or self.optimizer) == "adamw":
            return param.ndim > 1 and "norm" not in param_name
        return not param_name.endswith("head.bias")

    def __repr__(self) -> str:
        return f"<method {self.name}>"


@dataclass
class DataContext:
    """Where and how a task reads its data."""

    data_root: Path | None
    cache_dir: Path
    image_size: int = DEFAULT_IMAGE_SIZE
    settings: dict[str, Any] = field(default_factory=dict)  # e.g. {"preprocess": "vpt"}
    #: input normalisation, resolved by the engine from ``data.normalize`` (default: the backbone's own config)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class Task(abc.ABC):
    """A downstream task: its splits, classes, transforms, metric and suite group.

    The hooks below (``backbone_args``, ``build_model``, ``objective``, ``evaluate``, ``collate``, ``input_size``)
    are what the engine asks a task while it trains one trial. ``build_model``, ``objective``, ``evaluate`` and
    ``collate`` return None by default: the engine then does what its ``kind`` does (:mod:`harness.kinds`);
    override one to replace it for this task.

    ``version`` is part of every trial spec, as for :class:`Method`: bump it when a change alters what a trial on
    the task computes (its splits, transforms, labels or metric), so its earlier records become stale."""

    #: "classification" (this class) or "segmentation" (:class:`SegmentationTask`)
    kind: str = "classification"
    name: str = ""
    #: the version of what this task computes; records carry it as ``task_version``
    version: int = 1
    family: str = ""  # the suite family that defines it: demo, vtab, fgvc, ...
    group: str = ""  # e.g. VTAB's natural / specialized / structured
    #: the short name papers print (VTAB's "Clevr-Count", FGVC's "CUB"): tables, figures and reports show it;
    #: commands, flags and records keep ``name``. Empty: ``name`` is shown. Not part of what a trial computes
    #: (changing it bumps no ``version``)
    display_name: str = ""
    #: whether the task reads data files (under ``data.root`` / ``--data-root``); False for a task that makes its
    #: own data (the demo's generated images), for which a ``--data-root`` is ignored, and said to be
    reads_data: bool = True
    num_classes: int = 0
    splits: tuple[str, ...] = ()
    metric: str = "top1"
    higher_is_better: bool = True
    #: whether the training transforms are deterministic (no random crops, flips or other augmentation): a
    #: method's frozen computation may then be cached (:mod:`harness.features`); False refuses the cache
    deterministic_train: bool = False
    #: keys of a suite's ``data:`` section this task reads besides the engine's (root, roots, image_size,
    #: normalize), e.g. VTAB's ``preprocess``; suite files are validated against them
    data_keys: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """What tables, figures and reports print for this task: its ``display_name``, else its ``name``."""
        return self.display_name or self.name

    @abc.abstractmethod
    def dataset(self, split: str, ctx: DataContext, train: bool) -> "torch.utils.data.Dataset":
        """Items are ``(image tensor, int label)`` with the task's transforms applied (train-time ones if
        ``train``)."""

    def fingerprint(self, split: str, ctx: DataContext) -> str:
        """A short hash of what defines the split's content (its list file, or its generator's settings)."""
        return ""

    def expected_size(self, split: str) -> int | None:
        """How many images ``split`` holds, when known without the data (planning: ``harness run --dry-run``'s
        compute estimate); None when unknown."""
        return None

    def check(self, ctx: DataContext, deep: bool = False) -> list[str]:
        """Problems with the data on disk, one message each; empty when clean. ``deep`` also decodes images."""
        return []

    # -- what the engine asks while it trains a trial on this task (defaults: classification) --------------------
    def backbone_args(self, ctx: DataContext) -> dict[str, Any]:
        """Extra ``timm.create_model`` arguments the task needs (a segmentation task: position embeddings resized
        to the input)."""
        return {}

    def build_model(self, method: Method, backbone: "nn.Module", ctx: BuildContext) -> "nn.Module | None":
        """The method's model for this task. None: the kind's (classification: ``method.build``, logits per image;
        segmentation: ``method.build_segmentation`` or the engine's segmentation model)."""
        return None

    def objective(self, train: dict[str, Any], ctx: DataContext) -> Callable | None:
        """The loss ``objective(model, images, targets) -> (loss, logs)`` for the suite's ``train`` section. None:
        the kind's (classification: cross-entropy with ``train.label_smoothing``)."""
        return None

    def evaluate(self, model: "nn.Module", loader: Any, device: str, ctx: DataContext,
                 amp: bool = True) -> dict[str, Any] | None:
        """The metric over a whole split: ``{"eval": value}`` plus any details worth keeping in the record. None:
        the kind's (classification: ``metric`` of the arg-max predictions)."""
        return None

    def collate(self, train: bool) -> Callable | None:
        """The data loader's ``collate_fn``. None: the kind's (classification: torch's default stacking)."""
        return None

    def input_size(self, ctx: DataContext) -> tuple[int, int]:
        """(height, width) of a training input (for cost accounting)."""
        return (ctx.image_size, ctx.image_size)

    # -- the decoded-input cache (harness/decoded.py) ---------------------------------------------------------------
    def decoded_dataset(self, split: str, ctx: DataContext, train: bool) -> "torch.utils.data.Dataset | None":
        """Items ``(uint8 3 x H x W tensor at the input size, int label)``: the split's inputs before scaling and
        normalisation, where :meth:`dataset` gives exactly ``(x / 255 - mean) / std`` of them in float32 with
        :meth:`input_normalization`'s statistics. The engine caches them decoded, memory-mapped, and normalises
        on the device; it caches a training split only when :attr:`deterministic_train`. None (default): the task's
        inputs are not cached decoded."""
        return None

    def input_normalization(self, ctx: DataContext) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel that :meth:`dataset` normalises with (default: the context's, ``data.normalize``)."""
        return tuple(ctx.mean), tuple(ctx.std)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class SegmentationTask(Task):
    """Semantic segmentation: items are ``(image tensor 3 x H x W, label map int64 H x W)`` with ``ignore_index``
    (255) on pixels that count for nothing; the metric is mIoU (percent) from a confusion matrix accumulated over
    the whole split, with per-class IoU kept in the record.

    A subclass sets ``num_classes``, ``class_names``, ``crop_size`` and ``scale`` (its training pipeline's
    defaults) and implements :meth:`dataset` (and :meth:`check`). Trials train on random crops
    (``crop_size``); evaluation runs on whole images (resized to ``scale``), one at a time, either as one forward
    (``eval_mode: whole``) or as overlapping crop-size windows (``slide``).

    Options a suite can give under ``data:`` (all part of the trial spec; resolved by :meth:`options`):

    * ``crop_size`` (int or [h, w]), ``scale`` ([long side, short side]), ``ratio_range`` ([low, high]);
    * ``eval_mode`` (``whole`` | ``slide``), ``slide_stride`` (int or [h, w]; default two thirds of the crop);
    * ``decoder_channels`` (UPerNet, default 512), ``aux_channels`` (FCN, default 256), ``aux_weight`` (0.4).
    """

    kind = "segmentation"
    metric = "miou"
    ignore_index: int = 255
    class_names: tuple[str, ...] = ()
    #: the training crop (h, w) and the base scale (long side, short side) images are rescaled to (x 0.5-2.0)
    crop_size: tuple[int, int] = (512, 512)
    scale: tuple[int, int] = (2048, 512)
    data_keys = ("crop_size", "scale", "ratio_range", "eval_mode", "slide_stride", "decoder_channels",
                 "aux_channels", "aux_weight", "deep_sample")

    def options(self, ctx: DataContext) -> dict[str, Any]:
        """This task's segmentation options: the suite's ``data:`` values (``ctx.settings``) over the task's
        defaults, checked and resolved (pairs, the slide stride)."""
        s = ctx.settings

        def pair(key: str, default: tuple[int, int]) -> tuple[int, int]:
            value = s.get(key, default)
            value = (value, value) if isinstance(value, (int, float)) else tuple(value)
            if len(value) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in value):
                raise HarnessError(f"data.{key}: expected a positive number or [a, b], got {s.get(key)!r}")
            return int(value[0]), int(value[1])

        crop = pair("crop_size", self.crop_size)
        mode = str(s.get("eval_mode", "whole"))
        if mode not in ("whole", "slide"):
            raise HarnessError(f"data.eval_mode: expected whole or slide, got {mode!r}")
        low, high = (float(v) for v in s.get("ratio_range", (0.5, 2.0)))
        return {"crop_size": crop, "scale": pair("scale", self.scale), "ratio_range": (low, high),
                "eval_mode": mode, "slide_stride": pair("slide_stride", (crop[0] * 2 // 3, crop[1] * 2 // 3)),
                "decoder_channels": int(s.get("decoder_channels", 512)),
                "aux_channels": int(s.get("aux_channels", 256)), "aux_weight": float(s.get("aux_weight", 0.4))}

    def backbone_args(self, ctx: DataContext) -> dict[str, Any]:
        return {"dynamic_img_size": True}  # timm resizes the position embedding to each input's grid (bicubic)

    def input_size(self, ctx: DataContext) -> tuple[int, int]:
        return self.options(ctx)["crop_size"]


#: built-in methods and tasks are indexed in their packages; installed packages add theirs through these entry-point
#: groups (docs/plugins.md)
METHOD_ENTRY_POINTS = "harness.methods"
TASK_ENTRY_POINTS = "harness.tasks"
METHODS: Registry[Method] = Registry("method", "methods:INDEX", group=METHOD_ENTRY_POINTS)
TASKS: Registry[Task] = Registry("task", "tasks:INDEX", group=TASK_ENTRY_POINTS)
#: named artifacts (backbone weights, pre-tuned checkpoints) that can be made or found on demand:
#: name -> function(ArtifactRequest) -> Path. Referenced from sweeps as ``artifact:<name>``. A provider that is a
#: stage of its own (TOAST's pre-tuning) sets a ``version`` attribute on the function (default 1; bump it when the
#: stage's result changes, and put it in the artifact's cache key): the trial specs of every method that ``needs``
#: the artifact carry it under ``artifact_versions``, so bumping it makes those records stale.
ARTIFACTS: Registry[Callable[..., Path]] = Registry("artifact", "methods:ARTIFACTS", "tasks:ARTIFACTS")


@dataclass
class ArtifactRequest:
    """What an artifact provider gets. In a trial (``make=False``) the provider returns the artifact's path,
    making it first only where the suite allows (e.g. the demo's ``pretune.auto``), else raising a HarnessError
    that names the command that makes it. ``harness pretune`` asks with ``make=True``: a provider that is a
    stage (TOAST's pre-tuning) then runs it now (again with ``force``), writing ``output`` when given."""

    name: str
    suite: str
    cache_dir: Path
    backbone: dict[str, Any]
    #: the method asking, and the suite sections it declared in ``suite_sections`` (e.g. ``{"pretune": {...}}``)
    method: str | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    #: the data settings trials use (image_size, normalisation), so a stage sees the same inputs as tuning
    data: DataContext | None = None
    #: the overrides of the run asking (to print a command that makes the same artifact)
    overrides: dict[str, Any] = field(default_factory=dict)
    data_root: Path | None = None
    make: bool = False
    force: bool = False
    output: Path | None = None
    progress: bool = True
    #: ``harness pretune --devices N``: this process's place among the N ranks making the artifact together
    #: (:class:`harness.distributed.World`: ``rank``, ``size``, ``main``, ``barrier()``, ``broadcast_object()``,
    #: ``describe()``; pass it to ``fit(world=...)`` and ``shard_loader``); None: one process. Only rank 0 writes.
    world: Any = None
