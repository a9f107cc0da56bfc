"""Full fine-tuning: every backbone weight and the head train, with AdamW (docs/protocol.md §4.4).

``optimizer`` picks between the paper's AdamW (``paper``, default: the configured weight decay) and the official
VPT code's optimiser (``official``: AdamW with decay forced to 0.01 whenever the configured decay is > 0, SGD with
momentum 0.9 when it is 0), which changes the numbers a grid gives.
"""

from __future__ import annotations

from typing import Any

from harness.api import BuildContext, Method
from harness.errors import HarnessError

#: the official code's AdamW ignores the configured decay and uses this one (src/solver/optimizer.py)
OFFICIAL_ADAMW_DECAY = 0.01
OPTIMIZER_CHOICES = ("paper", "official")


class FullFinetune(Method):
    family = "full"
    group = "headline"
    description = "all backbone weights and the head train (AdamW)"
    optimizer = "adamw"
    warmup_epochs = 5
    # docs/protocol.md §5.5 (VPT and TOAST tune_vtab.py)
    grid = {"lr": [0.001, 0.0001, 0.0005, 0.005], "weight_decay": [0.01, 0.001, 0.0001, 0.0]}
    hparam_keys = ("optimizer",)
    hparam_choices = {"optimizer": OPTIMIZER_CHOICES}

    def optimizer_for(self, hparams: dict[str, Any]) -> tuple[str, float]:
        choice = hparams.get("optimizer", "paper")
        weight_decay = float(hparams.get("weight_decay", 0.0))
        if choice == "paper":
            return "adamw", weight_decay
        if choice == "official":
            return ("adamw", OFFICIAL_ADAMW_DECAY) if weight_decay > 0 else ("sgd", 0.0)
        raise HarnessError(f"finetune: optimizer {choice!r} is not one of {', '.join(OPTIMIZER_CHOICES)} "
                           "(docs/protocol.md §4.4)")

    def build(self, backbone, num_classes: int, ctx: BuildContext):
        from methods.common_model import BackboneClassifier  # torch, only where a model is built

        self.optimizer_for(ctx.hparams)  # an unknown choice is refused before any step
        for p in backbone.parameters():
            p.requires_grad_(True)
        return BackboneClassifier(backbone, num_classes, frozen_eval=False)
