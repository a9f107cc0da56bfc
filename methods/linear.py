"""Linear probe: the backbone is frozen; only a linear head on the CLS token trains."""

from __future__ import annotations

from harness.api import BuildContext, Method
from methods.common import freeze


class LinearProbe(Method):
    family = "head-only"
    group = "headline"
    description = "frozen backbone, trainable linear head on the CLS token"
    optimizer = "sgd"
    warmup_epochs = 10
    # docs/protocol.md §5.5 (VPT tune_vtab.py / tune_fgvc.py)
    grid = {"lr": [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05], "weight_decay": [0.01, 0.001, 0.0001, 0.0]}
    defaults = {"frozen_eval": True}
    hparam_keys = ("drop_path",)
    #: head(backbone(x)) with the backbone frozen: trained on cached pooled features where the task allows
    frozen_features = "pooled"

    def build(self, backbone, num_classes: int, ctx: BuildContext):
        from methods.common_model import BackboneClassifier  # torch, only where a model is built

        freeze(backbone)
        return BackboneClassifier(backbone, num_classes, frozen_eval=bool(ctx.hparams.get("frozen_eval", True)))
