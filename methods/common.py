"""Pieces shared by methods: freezing, what a model declares frozen and the classification head. The backbone + head
model is :class:`methods.common_model.BackboneClassifier`.

This module imports no torch at its top (the head's constructor imports it when it runs), so a method module that
imports it stays importable by the commands that only read records (``harness table``, ``status``, ...: they ask a
method its grid, defaults and version, never its model). The split every method file follows: ``methods/<family>.py``
declares (the :class:`harness.api.Method` subclass), ``methods/<family>_model.py`` holds its ``nn.Module`` classes
and is imported inside ``build``; model modules never import their declaration module (one way, no cycle).
"""

from __future__ import annotations

import math
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def frozen_backbone(frozen_eval: bool) -> tuple[str, ...]:
    """A model's ``frozen_modules`` (:class:`harness.api.Method`): its frozen ``backbone`` runs in eval mode while
    the model trains (no dropout or drop-path in frozen weights, as official VPT), unless the trial sets
    ``frozen_eval: false`` (the TOAST code's choice: drop-path stays on)."""
    return ("backbone",) if frozen_eval else ()


def make_head(in_features: int, num_classes: int) -> nn.Linear:
    """The class-level head of the official VPT/TOAST code (``MLP`` with no hidden layer): kaiming-normal
    (fan_out) weight and the constant bias -log(99), which under softmax is the same as zero."""
    from torch import nn

    head = nn.Linear(in_features, num_classes)
    nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    return head


def feature_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "num_features", None) or backbone.embed_dim)


def __getattr__(name: str) -> Any:
    """``from methods.common import BackboneClassifier`` inside a ``build`` keeps working (method modules written
    before the split do so): the class is looked up in :mod:`methods.common_model` when first asked for, which
    imports torch then, never when this module is imported. New code imports it from methods.common_model."""
    if name == "BackboneClassifier":
        return getattr(importlib.import_module("methods.common_model"), name)
    raise AttributeError(f"module 'methods.common' has no attribute '{name}'")

