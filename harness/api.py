"""The plug-in interface: what a method and a task declare, and the registries they register into.

A method file (``methods/<family>.py``) subclasses :class:`Method` and registers an instance; a task file
(``tasks/<suite family>.py``) does the same with :class:`Task`. The engine only talks to these interfaces.
Heavy imports (torch, timm, peft) belong inside the functions of plug-ins, or at least not in this file, so that
listing names stays fast.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass
class BuildContext:
    """What a method may ask the engine for while it builds a model."""

    hparams: dict[str, Any]
    suite: str
    cache_dir: Path
    device: str = "cpu"
    #: True when the model is built only to be inspected (parameter counts, FLOPs): a method must then not
    #: resolve artifacts such as pre-tuned checkpoints, and builds with its random initialisation instead
    random_init: bool = False
    resolve_artifact: Callable[[str], Path] = lambda name: (_ for _ in ()).throw(KeyError(name))  # noqa: E731


class Method(abc.ABC):
    """A transfer-learning method.

    Subclasses set the class attributes and implement :meth:`build`. Which parameters train is whatever
    ``build`` leaves with ``requires_grad=True``; the training loop optimises exactly those.
    """

    name: str = ""
    family: str = ""
    description: str = ""
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adamw" (betas 0.9/0.999, eps 1e-6)
    warmup_epochs: int = 10  # the official code's per-method warmup (PROTOCOL.md §3.1)
    #: default search grid: axes are lists (base learning rate and weight decay at least)
    grid: dict[str, list] = {}
    #: fixed hyperparameters with their defaults (e.g. VPT's prompt length); a sweep may override them
    defaults: dict[str, Any] = {}
    #: artifacts the method needs resolved before it can build (e.g. a pre-tuned top-down checkpoint)
    needs: tuple[str, ...] = ()
    #: top-level suite sections this method reads (e.g. TOAST's ``pretune``); they are copied into its trial
    #: specs, so changing them changes its trial ids and nobody else's
    suite_sections: tuple[str, ...] = ()

    def defaults_for(self, task: "Task") -> dict[str, Any]:
        """Fixed hyperparameters for one task (override for per-task defaults such as VPT's prompt length)."""
        return dict(self.defaults)

    @abc.abstractmethod
    def build(self, backbone: "nn.Module", num_classes: int, ctx: BuildContext) -> "nn.Module":
        """Return the model to train: ``forward(images) -> logits``, with a ``head`` attribute (the task head)."""

    def decays(self, param_name: str, param: "torch.nn.Parameter") -> bool:
        """Whether weight decay applies to a trainable parameter. Default: everything but the head's bias (as the
        official SGD code does); AdamW methods exclude biases and norms."""
        if self.optimizer == "adamw":
            return param.ndim > 1 and "norm" not in param_name
        return not param_name.endswith("head.bias")

    def __repr__(self) -> str:
        return f"<method {self.name}>"


@dataclass
class DataContext:
    """Where and how a task reads its data."""

    data_root: Path | None
    cache_dir: Path
    image_size: int
    settings: dict[str, Any] = field(default_factory=dict)  # e.g. {"preprocess": "vtab"}


class Task(abc.ABC):
    """A downstream task: its splits, classes, transforms, metric and suite group."""

    name: str = ""
    family: str = ""  # the suite family that defines it: demo, vtab, fgvc, ...
    group: str = ""  # e.g. VTAB's natural / specialized / structured
    num_classes: int = 0
    splits: tuple[str, ...] = ()
    metric: str = "top1"
    higher_is_better: bool = True

    @abc.abstractmethod
    def dataset(self, split: str, ctx: DataContext, train: bool) -> "torch.utils.data.Dataset":
        """Items are ``(image tensor, int label)`` with the task's transforms applied (train-time ones if
        ``train``)."""

    def fingerprint(self, split: str, ctx: DataContext) -> str:
        """A short hash of what defines the split's content (its list file, or its generator's settings)."""
        return ""

    def check(self, ctx: DataContext, deep: bool = False) -> list[str]:
        """Problems with the data on disk, one message each; empty when clean. ``deep`` also decodes images."""
        return []

    def __repr__(self) -> str:
        return f"<task {self.name}>"


METHODS: Registry[Method] = Registry("method", "methods:INDEX")
TASKS: Registry[Task] = Registry("task", "tasks:INDEX")
#: named artifacts (backbone weights, pre-tuned checkpoints) that can be made or found on demand:
#: name -> function(ArtifactRequest) -> Path. Referenced from sweeps as ``artifact:<name>``.
ARTIFACTS: Registry[Callable[..., Path]] = Registry("artifact", "methods:ARTIFACTS", "tasks:ARTIFACTS")


@dataclass
class ArtifactRequest:
    """What an artifact provider gets: where caches live, the suite asking, its backbone spec, and the trial
    spec that needs the artifact (or None outside a trial, e.g. ``harness pretune``)."""

    name: str
    suite: str
    cache_dir: Path
    backbone: dict[str, Any]
    spec: dict[str, Any] | None = None
    data_root: Path | None = None
