"""SSF, Scaling and Shifting your Features (Lian et al., NeurIPS 2022; dongzelian/SSF). docs/protocol.md §4.5.

After every operation of the frozen backbone (each linear layer: qkv, the attention projection, fc1, fc2; each
LayerNorm; the patch-embedding convolution) a learned per-channel scale and shift, ``y * s + t``, initialised as the
official ``init_ssf_scale_shift``: s ~ N(1, 0.02), t ~ N(0, 0.02). On ViT-B/16 that is 205,824 parameters besides
the head. Only these and the head train; the backbone runs in eval mode while training.

Being linear after a linear operation, SSF folds into the weights for inference
(:func:`methods.petl_layers.merge_ssf`), so a deployed model costs what the backbone does; the harness trains and
evaluates the unmerged form, which computes the same function (``tests/test_petl.py`` checks they agree).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.api import BuildContext, Method
from methods.peft_methods import PETL_GRID

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class SSF(Method):
    family = "scale-shift"
    group = "petl"
    description = "frozen backbone; learned scale and shift after every linear, norm and conv (mergeable) + head"
    optimizer = "adamw"
    warmup_epochs = 10
    grid = PETL_GRID
    defaults = {"frozen_eval": True}
    hparam_keys = ("drop_path",)

    def build(self, backbone: nn.Module, num_classes: int, ctx: BuildContext) -> nn.Module:
        from methods.common import BackboneClassifier, freeze
        from methods.petl_layers import add_ssf

        freeze(backbone)
        add_ssf(backbone)
        return BackboneClassifier(backbone, num_classes, frozen_eval=bool(ctx.hparams.get("frozen_eval", True)))
