"""The backbone + head model shared by methods (the linear probe, full fine-tuning). It imports torch: method modules
import it where they build a model (:meth:`harness.api.Method.build`), never at their top (:mod:`methods.common`)."""

from __future__ import annotations

import torch
from torch import nn

from methods.common import feature_dim, frozen_backbone, make_head


class BackboneClassifier(nn.Module):
    """``head(backbone(x))``, where the timm backbone has no classifier and returns its pooled features (for a ViT,
    the CLS token after the final norm). ``frozen_eval``: see :func:`methods.common.frozen_backbone` (False for full
    fine-tuning, whose backbone trains)."""

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
