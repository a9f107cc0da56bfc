"""Bottleneck adapters on a frozen timm ViT: ``adapter`` (sequential, after the MLP) and ``adaptformer``
(parallel to the MLP). docs/protocol.md §4.5.

* ``adapter``: Houlsby et al. (ICML 2019)'s module, down-projection, GELU, up-projection and a residual, applied to
  the output of each block's MLP (once per block, after the feed-forward sub-layer: Pfeiffer et al.'s placement,
  which the VPT paper's and NOAH's "Adapter" baselines use). Near-identity init (normal, std 1e-2, truncated at two
  std; zero biases). Bottleneck 8: NOAH's VTAB-1k setting, 156,768 parameters on ViT-B/16 ("0.16M" in its table).
* ``adaptformer``: Chen et al. (NeurIPS 2022): the same bottleneck (ReLU) reads the MLP's input (the normalised
  tokens) and its output, scaled by s = 0.1, is added to the MLP's. Bottleneck 64, dropout 0.1 on the hidden
  activation, ``lora``-style init (down kaiming-uniform, up and biases zero) as the official code's defaults.

The adapters are children of each block's ``mlp`` (``blocks.N.mlp.adapter``) applied by a forward hook: timm's
model is not copied and its weights keep their keys. Only the adapters and the head train; the backbone runs in eval
mode while training except the adapters' own dropout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.api import BuildContext, Method
from harness.errors import HarnessError
from methods.peft_methods import PETL_GRID

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class _Adapter(Method):
    family = "adapter"
    backbones = ("vit",)  # after the MLP of a ViT block
    group = "petl"
    optimizer = "adamw"
    warmup_epochs = 10
    grid = PETL_GRID
    hparam_keys = ("drop_path",)
    parallel: bool = False
    #: the adapters' activation and init (class-level: they define the method, see the module docstring)
    act: str = "gelu"
    init: str = "houlsby"

    def build(self, backbone: nn.Module, num_classes: int, ctx: BuildContext) -> nn.Module:
        from methods.common import BackboneClassifier, freeze
        from methods.petl_layers import add_adapters

        hp: dict[str, Any] = {**self.defaults, **ctx.hparams}
        if int(hp["bottleneck"]) < 1:
            raise HarnessError(f"{self.name}: bottleneck must be >= 1, got {hp['bottleneck']}")
        freeze(backbone)
        try:
            add_adapters(backbone, int(hp["bottleneck"]), parallel=self.parallel, act=self.act,
                         dropout=float(hp["dropout"]), scale=float(hp["scale"]), init=self.init)
        except ValueError as err:
            raise HarnessError(f"{self.name}: {err}") from None
        model = BackboneClassifier(backbone, num_classes, frozen_eval=bool(hp["frozen_eval"]))
        model.trains_in_frozen = ("adapter_dropout",)
        return model


class Adapter(_Adapter):
    description = "frozen ViT; bottleneck adapter (8, GELU) after every block's MLP, Houlsby-style + linear head"
    defaults = {"bottleneck": 8, "dropout": 0.0, "scale": 1.0, "frozen_eval": True}


class AdaptFormer(_Adapter):
    description = "frozen ViT; AdaptFormer's parallel bottleneck (64, ReLU, s=0.1) beside every block's MLP + head"
    parallel = True
    act = "relu"
    init = "lora"
    defaults = {"bottleneck": 64, "dropout": 0.1, "scale": 0.1, "frozen_eval": True}
