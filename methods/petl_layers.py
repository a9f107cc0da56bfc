"""The torch half of the PETL baselines (docs/protocol.md §4.5): the classifier around a peft model, the bottleneck
adapter (Houlsby-style after the MLP, or AdaptFormer's parallel branch) and SSF's scale-and-shift, each attached to
timm's own modules, never to a copy of the model.

The method declarations (``methods/peft_methods.py``, ``bitfit.py``, ``adapter.py``, ``ssf.py``) import this module
only inside ``build``, so listing methods never imports torch.

Attaching: an adapter or an SSF pair is registered as a child (or parameters) of the timm module it follows, and a
forward hook applies it to that module's output. The timm model's code, state-dict keys of its weights and
pre-trained loading are untouched; the added tensors get keys of their own (``blocks.0.mlp.adapter.down.weight``,
``blocks.0.attn.qkv.ssf_scale``). The hooks are module-level functions that read the module they are called with,
so a deep copy of the model carries working hooks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.common import feature_dim, frozen_backbone, make_head


class PeftClassifier(nn.Module):
    """``head(backbone(x))``, the backbone a peft model. With ``frozen_eval`` the backbone runs in eval mode while
    training, except the modules named in ``trains_in_frozen`` (:meth:`methods.peft_methods.PeftMethod
    .trains_in_frozen`: the adapters' own dropout)."""

    def __init__(self, backbone: nn.Module, num_classes: int, frozen_eval: bool, trains_in_frozen: tuple[str, ...]):
        super().__init__()
        self.backbone = backbone
        self.head = make_head(feature_dim(backbone), num_classes)
        self.frozen_modules = frozen_backbone(frozen_eval)
        self.trains_in_frozen = trains_in_frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# ------------------------------------------------------------------------------------------------ bottleneck adapter
class Bottleneck(nn.Module):
    """``scale * up(dropout(act(down(x))))``: the bottleneck adapter's branch (the residual is added by the hook).

    ``init="houlsby"``: both projections from a zero-mean normal with std 1e-2 truncated at two std, biases zero
    (Houlsby et al. 2019: near-identity). ``init="lora"``: ``down`` kaiming-uniform(a=sqrt(5)), ``up`` and biases
    zero (AdaptFormer's ``ffn_adapter_init_option="lora"``), so the branch starts at exactly zero."""

    def __init__(self, dim: int, bottleneck: int, act: str = "gelu", dropout: float = 0.0, scale: float = 1.0,
                 init: str = "houlsby"):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.adapter_dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = float(scale)
        if init == "houlsby":
            for layer in (self.down, self.up):
                nn.init.trunc_normal_(layer.weight, std=1e-2, a=-2e-2, b=2e-2)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.adapter_dropout(self.act(self.down(x))))


def _after_mlp(mlp: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Sequential (Houlsby): the adapter transforms the MLP's output, with its own residual."""
    return out + mlp.adapter(out)


def _beside_mlp(mlp: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Parallel (AdaptFormer): the adapter reads the MLP's input (the block's normalised tokens) and its scaled
    output is added to the MLP's."""
    return out + mlp.adapter(args[0])


def add_adapters(backbone: nn.Module, bottleneck: int, parallel: bool, act: str, dropout: float, scale: float,
                 init: str) -> int:
    """One :class:`Bottleneck` on every block's ``mlp`` of a timm ViT; returns how many."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or not all(hasattr(b, "mlp") for b in blocks):
        raise ValueError(f"{type(backbone).__name__} has no ViT blocks with an `mlp` to put adapters after")
    dim = feature_dim(backbone)
    for block in blocks:
        block.mlp.adapter = Bottleneck(dim, bottleneck, act=act, dropout=dropout, scale=scale, init=init)
        block.mlp.register_forward_hook(_beside_mlp if parallel else _after_mlp)
    return len(blocks)


# ---------------------------------------------------------------------------------------------------------------- SSF
#: the operations SSF follows: every linear layer, layer norm (timm's LayerNorm2d is one) and convolution
SSF_TYPES = (nn.Linear, nn.LayerNorm, nn.Conv2d)


def _ssf_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    scale, shift = getattr(module, "ssf_scale", None), getattr(module, "ssf_shift", None)
    if scale is None:  # merged (merge_ssf): the weights already hold it
        return out
    if out.ndim == 4 and out.shape[-1] != scale.shape[0]:  # channels first (a convolution, LayerNorm2d)
        return out * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return out * scale + shift


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return int(module.normalized_shape[-1])


def add_ssf(backbone: nn.Module) -> list[str]:
    """A scale (init N(1, 0.02)) and shift (N(0, 0.02)) after every :data:`SSF_TYPES` module of the backbone, as
    SSF's ``init_ssf_scale_shift``; returns the names of the modules that got one."""
    names = []
    for name, module in backbone.named_modules():
        if isinstance(module, SSF_TYPES):
            dim = _out_features(module)
            module.ssf_scale = nn.Parameter(torch.empty(dim, device=_device(module)))
            module.ssf_shift = nn.Parameter(torch.empty(dim, device=_device(module)))
            nn.init.normal_(module.ssf_scale, mean=1.0, std=0.02)
            nn.init.normal_(module.ssf_shift, std=0.02)
            module.register_forward_hook(_ssf_hook)
            names.append(name)
    return names


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def merge_ssf(model: nn.Module) -> nn.Module:
    """Fold every SSF pair into the weights it follows, in place (``y * s + t`` of ``W x + b`` is ``(s W) x +
    (s b + t)``; for a layer norm, its affine weight and bias): the model then computes the same function at the
    backbone's own cost, as SSF deploys it. Copy the model first to keep the trainable form."""
    for module in model.modules():
        scale = getattr(module, "ssf_scale", None)
        if scale is None:
            continue
        shift = module.ssf_shift
        if module.weight is None:  # a norm without its own affine: SSF's pair becomes it
            module.weight = nn.Parameter(torch.ones_like(scale))
        shape = (-1,) + (1,) * (module.weight.ndim - 1)
        module.weight.mul_(scale.view(shape))
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(shift))
        module.bias.mul_(scale).add_(shift)
        del module.ssf_scale, module.ssf_shift
    return model
