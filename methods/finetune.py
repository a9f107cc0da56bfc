"""Full fine-tuning: every backbone weight and the head train, with AdamW as the official VPT code does."""

from __future__ import annotations

from harness.api import METHODS, BuildContext, Method
from methods.common import BackboneClassifier


@METHODS.register("finetune")
class FullFinetune(Method):
    name = "finetune"
    family = "full"
    description = "all backbone weights and the head train (AdamW)"
    optimizer = "adamw"
    warmup_epochs = 5
    # PROTOCOL.md §3.2 (VPT and TOAST tune_vtab.py)
    grid = {"lr": [0.001, 0.0001, 0.0005, 0.005], "weight_decay": [0.01, 0.001, 0.0001, 0.0]}

    def build(self, backbone, num_classes: int, ctx: BuildContext):
        for p in backbone.parameters():
            p.requires_grad_(True)
        return BackboneClassifier(backbone, num_classes, frozen_eval=False)
