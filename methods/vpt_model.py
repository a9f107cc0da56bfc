"""VPT's model (:mod:`methods.vpt`, where the design is described): a frozen timm ViT with prompt tokens and a linear
head. It imports torch, so :mod:`methods.vpt` imports it only where it builds a model."""

from __future__ import annotations

import math

import torch
from torch import nn

from harness.errors import HarnessError
from methods.common import feature_dim, frozen_backbone, make_head


def prompt_init_bound(patch_size: tuple[int, int], dim: int) -> float:
    """VPT's "xavier uniform" bound sqrt(6 / (3 * patch_h * patch_w + d))."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))


class PromptedViT(nn.Module):
    """A frozen timm ViT with VPT prompts and a linear head on the final-norm CLS token."""

    def __init__(self, backbone: nn.Module, num_classes: int, prompt_length: int, deep: bool,
                 dropout: float = 0.0, frozen_eval: bool = True):
        super().__init__()
        missing = [a for a in ("patch_embed", "_pos_embed", "blocks", "norm") if not hasattr(backbone, a)]
        if missing:
            raise HarnessError(f"VPT needs a timm VisionTransformer-style backbone; {type(backbone).__name__} "
                               f"has no {', '.join(missing)}")
        if getattr(backbone, "cls_token", None) is None:
            raise HarnessError(f"VPT pools the CLS token, but backbone {type(backbone).__name__} has no class token")
        if int(prompt_length) < 1:
            raise HarnessError(f"VPT prompt_length must be >= 1, got {prompt_length}")
        self.backbone = backbone
        self.prompt_length = int(prompt_length)
        self.deep = bool(deep)
        self.frozen_modules = frozen_backbone(bool(frozen_eval))
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))
        dim = feature_dim(backbone)
        patch = tuple(getattr(backbone.patch_embed, "patch_size", (16, 16)))
        bound = prompt_init_bound((int(patch[0]), int(patch[-1])), dim)
        self.prompt_embeddings = nn.Parameter(torch.empty(1, self.prompt_length, dim))
        nn.init.uniform_(self.prompt_embeddings, -bound, bound)
        if self.deep:
            depth = len(backbone.blocks)
            self.deep_prompt_embeddings = nn.Parameter(torch.empty(max(0, depth - 1), self.prompt_length, dim))
            nn.init.uniform_(self.deep_prompt_embeddings, -bound, bound)
        self.prompt_dropout = nn.Dropout(float(dropout))
        self.head = make_head(dim, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """timm's own embedding steps (patches, CLS/register tokens, position embedding, pre-norm)."""
        bb = self.backbone
        x = bb.patch_embed(images)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x) if hasattr(bb, "patch_drop") else x
        return bb.norm_pre(x) if hasattr(bb, "norm_pre") else x

    def _with_prompts(self, x: torch.Tensor, prompts: torch.Tensor, replace: bool) -> torch.Tensor:
        n, p = self.num_prefix_tokens, self.prompt_length
        prompts = self.prompt_dropout(prompts.expand(x.shape[0], -1, -1))
        rest = x[:, n + p:] if replace else x[:, n:]
        return torch.cat([x[:, :n], prompts, rest], dim=1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: ``[prefix, prompts, patches]``."""
        x = self._with_prompts(self.embed(images), self.prompt_embeddings, replace=False)
        for i, block in enumerate(self.backbone.blocks):
            if self.deep and i > 0:
                x = self._with_prompts(x, self.deep_prompt_embeddings[i - 1 : i], replace=True)
            x = block(x)
        return self.backbone.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cls = self.forward_features(images)[:, 0]
        fc_norm = getattr(self.backbone, "fc_norm", None)
        return self.head(fc_norm(cls) if fc_norm is not None else cls)
