"""BitFit (Ben Zaken, Ravfogel and Goldberg, ACL 2022): only the backbone's bias terms and the task head train.

"All bias terms": every additive bias of the frozen backbone, i.e. each Linear's and convolution's bias and each
LayerNorm's beta (in a ViT: the patch embedding, qkv, attention projection, both MLP layers, both block norms and
the final norm). On ViT-B/16 that is 102,912 parameters, the "0.10M" of BitFit's VTAB-1k rows in the NOAH and SSF
papers (docs/protocol.md §4.5). The backbone otherwise stays frozen, in eval mode while training (``frozen_eval``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.api import BuildContext, Method
from methods.peft_methods import PETL_GRID

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def is_bias(name: str) -> bool:
    """A bias term by its parameter name (``...bias``; LayerNorm's beta is ``bias`` in torch)."""
    return name.rsplit(".", 1)[-1] == "bias"


class BitFit(Method):
    family = "bias"
    group = "petl"
    description = "frozen backbone except every bias term (linear, conv and LayerNorm biases) + linear head"
    optimizer = "adamw"
    warmup_epochs = 10
    grid = PETL_GRID
    defaults = {"frozen_eval": True}
    hparam_keys = ("drop_path",)

    def build(self, backbone: nn.Module, num_classes: int, ctx: BuildContext) -> nn.Module:
        from methods.common import BackboneClassifier

        for name, p in backbone.named_parameters():
            p.requires_grad_(is_bias(name))
        return BackboneClassifier(backbone, num_classes, frozen_eval=bool(ctx.hparams.get("frozen_eval", True)))
