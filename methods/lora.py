"""LoRA (Hu et al. 2021) through peft on a frozen timm backbone, as the TOAST paper's baseline
(docs/protocol.md §4.2).

Default: one rank-4 adapter on the fused ``attn.qkv`` Linear of every block (the TOAST repo replaces each ``qkv``
with ``loralib.Linear(d, 3d, r=4)``), with ``lora_alpha=1`` so that peft's scaling alpha/r = 0.25 equals loralib's
default (``lora_alpha=1``, r=4). peft's default init matches loralib: A kaiming-uniform(a=sqrt(5)), B zeros; no
dropout, no bias. ``rank``, ``alpha``, ``target_modules`` (peft names: a list, or a comma string) and ``dropout``
are hyperparameters a suite may override. Only the adapters and the task head train.

The adapters stay separate from the frozen weights (peft never merges them implicitly), so the frozen ``qkv``
weights are bit-identical after training; the backbone is kept in eval mode while training (no drop-path in the
frozen weights, as for linear and VPT) except for the adapters' own dropout, and ``frozen_eval: false`` gives the
TOAST repo's behaviour (drop-path stays on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.api import BuildContext, Method
from harness.errors import HarnessError
from methods.common import freeze

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def _target_modules(value: Any) -> list[str]:
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    else:
        names = [str(v) for v in value]
    if not names:
        raise HarnessError("lora: target_modules is empty (expected peft module names, e.g. [qkv] or qkv,proj)")
    return names


class LoRA(Method):
    family = "lora"
    group = "headline"
    description = "frozen backbone; peft LoRA (rank 4, scaling 0.25) on every block's fused qkv + linear head"
    optimizer = "sgd"
    warmup_epochs = 10
    # docs/protocol.md §5.5 (TOAST tune_vtab.py --grid-search-type lora)
    grid = {"lr": [1.0, 0.5, 0.25, 0.1, 0.05, 0.025, 0.01], "weight_decay": [0.01, 0.001, 0.0001, 0.0]}
    defaults = {"rank": 4, "alpha": 1.0, "target_modules": ["qkv"], "dropout": 0.0, "frozen_eval": True}
    hparam_keys = ("drop_path",)

    def build(self, backbone: nn.Module, num_classes: int, ctx: BuildContext) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model  # lazy: peft pulls in transformers (seconds)

        from methods.lora_model import LoRAClassifier  # torch, only where a model is built

        hp = {**self.defaults, **ctx.hparams}
        targets = _target_modules(hp["target_modules"])
        config = LoraConfig(r=int(hp["rank"]), lora_alpha=float(hp["alpha"]), target_modules=targets,
                            lora_dropout=float(hp["dropout"]), bias="none")
        freeze(backbone)
        try:
            backbone = inject_adapter_in_model(config, backbone)
        except ValueError as err:  # peft: "Target modules {...} not found in the base model"
            raise HarnessError(f"lora: cannot put adapters on {targets} of {type(backbone).__name__}: {err}") from None
        # inject_adapter_in_model does not freeze the base model: make sure exactly the adapters train
        for pname, p in backbone.named_parameters():
            p.requires_grad_("lora_" in pname)
        return LoRAClassifier(backbone, num_classes, frozen_eval=bool(hp["frozen_eval"]))
