"""Pieces shared by methods: the classification head, freezing, what a model declares frozen, and the backbone +
head model."""

from __future__ import annotations

import math

import torch
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
    head = nn.Linear(in_features, num_classes)
    nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    return head


def feature_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "num_features", None) or backbone.embed_dim)


class BackboneClassifier(nn.Module):
    """``head(backbone(x))``, where the timm backbone has no classifier and returns its pooled features (for a ViT,
    the CLS token after the final norm). ``frozen_eval``: see :func:`frozen_backbone` (False for full fine-tuning,
    whose backbone trains)."""

    def __init__(self, backbone: nn.Module, num_classes: int, frozen_eval: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = make_head(feature_dim(backbone), num_classes)
        self.frozen_modules = frozen_backbone(frozen_eval)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    # the split the frozen-computation cache uses (harness.api.Method.frozen_features = "pooled")
    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def from_frozen(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)
