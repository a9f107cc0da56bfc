"""LoRA's model (:mod:`methods.lora`): the backbone carrying peft's adapters, and the task head. It imports torch, so
:mod:`methods.lora` imports it only where it builds a model."""

from __future__ import annotations

from torch import nn

from methods.common import feature_dim, frozen_backbone, make_head


class LoRAClassifier(nn.Module):
    """``head(backbone(x))`` where ``backbone`` carries peft LoRA adapters. With ``frozen_eval`` the backbone runs
    in eval mode while training, except the adapters' own dropout."""

    #: the adapters' dropout trains inside the frozen backbone (harness.loop.train_mode)
    trains_in_frozen = ("lora_dropout",)

    def __init__(self, backbone: nn.Module, num_classes: int, frozen_eval: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = make_head(feature_dim(backbone), num_classes)
        self.frozen_modules = frozen_backbone(frozen_eval)

    def forward(self, x):
        return self.head(self.backbone(x))
