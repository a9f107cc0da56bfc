"""TOAST's model on a ConvNet: top-down attention steering around a frozen timm ConvNeXt (paper §4.4 "TOAST is
adaptable to Convnets", Table 5; docs/protocol.md §3.12; the official ``convnext_top_down.py``).

The model wraps timm's ``ConvNeXt`` and reuses its stem, stages (downsampling layer + blocks) and head norm; nothing
of the ConvNeXt is copied. Official stage ``i`` (``downsample_layers[i]`` then ``stages[i]``) is timm's ``stem`` +
``stages[0]`` for ``i = 0`` (timm's first stage has no downsampling) and ``stages[i]`` for ``i > 0``. A forward pass:

1. first pass of the frozen backbone -> the last stage's map ``x`` (B x C x H x W, before the head);
2. feature selection: the cosine of every position's *normalised* features (the final LayerNorm, timm's
   ``head.norm``) with the prompt ``xi`` (length C), clamped to [0, 1], scales the *unnormed* map; then the channel
   transform ``P`` (C x C, identity init);
3. feedback, from the last stage down: decoder ``i`` is a bias-free transposed convolution (``linear``: width[i] ->
   width[i-1], kernel = stride = 2; decoder 0: width[0] -> 3 image channels, kernel = stride = 4) passing the signal
   on, and a bias-free 1x1 convolution (``linear2``) emitting stage ``i``'s top-down signal;
4. second pass in which signal ``i`` is **added to stage i's input** (signal 0 to the image itself). Output: the
   second pass's global average pool through the final LayerNorm -> the task head.

The variational loss (asked for by pre-tuning) reconstructs each stage's (second-pass) input from its output through
the decoder's transposed convolution, MSE with detached targets, summed over the four stages (unweighted: the
official file weighs it 0.01, the suite's ``pretune.var_loss_weight``). Parameter names are the official ones
(``prompt``, ``top_down_transform``, ``decoders.<i>.linear/linear2.weight``), so :func:`methods.toast_model.
train_top_down` and :mod:`methods.toast_checkpoint` treat it as the ViT model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from methods.common import frozen_backbone, make_head
from methods.toast_model import TopDownOutput

#: official ConvNeXt (facebookresearch/ConvNeXt) backbone key -> timm's, by prefix (block parts renamed below)
OFFICIAL_PREFIXES = (("downsample_layers.0.", "stem."), ("norm.", "head.norm."))
OFFICIAL_BLOCK_PARTS = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2", "norm": "norm"}


def is_convnext(backbone: nn.Module) -> bool:
    from timm.models.convnext import ConvNeXt

    return isinstance(backbone, ConvNeXt)


def check_backbone(backbone: nn.Module) -> None:
    """TOAST on a ConvNet runs timm's ConvNeXt stages with a signal added to their input: refuse anything else."""
    if not is_convnext(backbone):
        raise HarnessError("TOAST's convolutional top-down module needs a timm ConvNeXt, got "
                           f"{type(backbone).__name__}")
    if len(backbone.stages) != 4 or not isinstance(backbone.stem[0], nn.Conv2d):
        raise HarnessError("TOAST's convolutional top-down module needs timm's 4-stage ConvNeXt with a patchify stem")
    if not isinstance(backbone.norm_pre, nn.Identity):
        raise HarnessError("TOAST's convolutional top-down module needs a ConvNeXt whose head norm comes after the "
                           "pooling (head_norm_first=False), as the official ConvNeXt")


class ConvDecodeBlock(nn.Module):
    """One feedback layer: ``linear`` (transposed conv) passes the signal down, ``linear2`` (1x1 conv) emits it."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.linear = nn.ConvTranspose2d(in_chans, out_chans, stride, stride, bias=False)  # PyTorch's default init
        self.linear2 = nn.Conv2d(out_chans, out_chans, kernel_size=1, bias=False)
        nn.init.trunc_normal_(self.linear2.weight, std=0.02)  # the official _init_weights reaches Conv2d only


class TopDownConvNeXt(nn.Module):
    """A frozen timm ConvNeXt with TOAST's feature selection, convolutional feedback path and second pass."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, token_selection: bool = True,
                 frozen_eval: bool = True):
        super().__init__()
        check_backbone(backbone)
        self.backbone = backbone
        self.token_selection = token_selection
        self.frozen_modules = frozen_backbone(frozen_eval)
        self.checkpoint_settings: dict[str, Any] = {}
        self.feedback_kind = "full"
        self.v_bias_twice = False  # no attention here; :func:`methods.toast_checkpoint.load_top_down` sets it
        in_chans = backbone.stem[0].in_channels
        widths = [int(stage.blocks[-1].mlp.fc2.out_channels if isinstance(stage.blocks[-1].mlp.fc2, nn.Conv2d)
                      else stage.blocks[-1].mlp.fc2.out_features) for stage in backbone.stages]
        self.widths = widths
        stem_stride = backbone.stem[0].stride[0]
        self.decoders = nn.ModuleList([ConvDecodeBlock(widths[0], in_chans, stem_stride)] + [
            ConvDecodeBlock(widths[i], widths[i - 1], _stride(backbone.stages[i])) for i in range(1, 4)])
        self.prompt = nn.Parameter(torch.randn(widths[-1]))
        self.top_down_transform = nn.Parameter(torch.eye(widths[-1]))
        self.head = make_head(backbone.num_features, num_classes)

    @property
    def feedback_layers(self) -> range:
        return range(4)

    # -- the four steps ----------------------------------------------------------------------------------------
    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Official stage ``i`` (its downsampling layer and blocks) as timm's modules."""
        if i == 0:
            x = self.backbone.stem(x)
        return self.backbone.stages[i](x)

    def first_pass(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = self.stage(i, x)
        return x

    def select(self, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cosine of the normalised map with xi per position, clamped, scales the unnormed map; then ``@ P``."""
        similarity = None
        if self.token_selection:
            normed = self.backbone.head.norm(top)  # timm's LayerNorm2d: per position over channels
            similarity = (F.normalize(normed, dim=1) * F.normalize(self.prompt, dim=0)[None, :, None, None]).sum(1)
            top = top * similarity.clamp(0, 1).unsqueeze(1)
            similarity = similarity.clamp(0, 1).flatten(1)
        selected = (top.permute(0, 2, 3, 1) @ self.top_down_transform).permute(0, 3, 1, 2)
        return selected, similarity

    def feedback(self, selected: torch.Tensor) -> dict[int, torch.Tensor]:
        td: dict[int, torch.Tensor] = {}
        z = selected
        for i in reversed(self.feedback_layers):
            z = self.decoders[i].linear(z)
            td[i] = self.decoders[i].linear2(z)
        return td

    def second_pass(self, image: torch.Tensor, td: dict[int, torch.Tensor],
                    var_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, terms = image, []
        for i in range(4):
            out = self.stage(i, x + td[i] if i in td else x)
            if var_loss:
                terms.append(F.mse_loss(self.decoders[i].linear(out.detach()), x.detach()))
            x = out
        return x, (torch.stack(terms).sum() if terms else None)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool through the final LayerNorm (timm's head without its classifier)."""
        return self.backbone.forward_head(x, pre_logits=True)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward_detailed(self, x: torch.Tensor, var_loss: bool = False, taps: bool = False) -> TopDownOutput:
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(grad):
            top = self.first_pass(x)
        return self.after_first_pass(x, top, var_loss)

    def after_first_pass(self, image: torch.Tensor, top: torch.Tensor, var_loss: bool = False) -> TopDownOutput:
        selected, similarity = self.select(top)
        out, var = self.second_pass(image, self.feedback(selected), var_loss)
        return TopDownOutput(self.pool(out), self.pool(top), similarity, var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_detailed(x).features)

    # the frozen-computation cache (ToastMethod.frozen_features): the second pass starts from the image itself
    def frozen_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return x, self.first_pass(x)

    def from_frozen(self, image: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        return self.head(self.after_first_pass(image, top).features)


    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``harness attention``'s panels, each B x h x w at the last stage's grid: the selection map (cosine of each
        position with xi, clamped; a ConvNet has no attention to show) when token selection is on."""
        with torch.no_grad():
            top = self.first_pass(x)
            _, similarity = self.select(top)
        if similarity is None:
            raise HarnessError("this TOAST model has no token selection: there is no map to show")
        return {"token selection (cos with ξ)": similarity.reshape(-1, *top.shape[-2:])}


def _stride(stage: nn.Module) -> int:
    down = stage.downsample
    conv = next((m for m in down.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise HarnessError("TOAST's convolutional top-down module: a ConvNeXt stage after the first has no "
                           "downsampling convolution")
    return int(conv.stride[0])


def official_backbone_key(key: str) -> str:
    """An official ConvNeXt key (``downsample_layers.i``, ``stages.i.j``, ``norm``) as timm's ConvNeXt names it."""
    for old, new in OFFICIAL_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    parts = key.split(".")
    if parts[0] == "downsample_layers" and len(parts) > 2:  # i >= 1: LayerNorm (0), conv (1)
        return ".".join(["stages", parts[1], "downsample", *parts[2:]])
    if parts[0] == "stages" and len(parts) > 3 and parts[2].isdigit():
        part = OFFICIAL_BLOCK_PARTS.get(parts[3], parts[3])
        return ".".join(["stages", parts[1], "blocks", parts[2], part, *parts[4:]])
    return key


def official_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official ConvNeXt top-down state dict with its backbone keys under timm's names (the top-down keys,
    ``prompt``, ``top_down_transform`` and ``decoders.*``, are the same in both); the official classifier ``head.*``
    stays as it is (it is ignored). Keys already in timm's names pass unchanged."""
    if not any(k.startswith("downsample_layers.") for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        if key.startswith(("prompt", "top_down_transform", "decoders.", "head.")):
            out[key] = value
            continue
        out[official_backbone_key(key)] = value  # layer scale is ``gamma`` in both
    return out
