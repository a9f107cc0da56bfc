"""TOAST's model: top-down attention steering around a frozen timm ViT (paper §3; docs/protocol.md §3).

The model wraps timm's ``VisionTransformer`` and reuses its patch embedding, position embedding, blocks and final
norm; nothing of the ViT is copied. A forward pass has four steps:

1. first pass of the frozen backbone (under ``no_grad`` when no backbone weight trains) -> tokens ``x_L`` after the
   final norm;
2. feature selection: ``cos = normalize(x_L) . normalize(xi)`` clamped to [0, 1] scales each token, then the channel
   transform ``P`` (d x d, identity init): ``x_s = (x_L * cos) @ P``;
3. feedback path, from the top layer down: ``z = linear_l(z); td_l = linear2_l(z)`` (bias-free d x d matrices);
4. second pass in which block ``l``'s attention adds ``W_v td_l`` to V only (Q, K and the softmax untouched),
   still through ``F.scaled_dot_product_attention``. Output: the second pass's pooled token (CLS after the final
   norm for a standard ViT) -> the task head.

The feedback span (:func:`feedback_span`) gives the paper's early and late feedback variants (:mod:`methods.toast`).
:func:`train_top_down` is the one rule of which top-down parameters train, for tuning and pre-tuning alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from methods.common import freeze, frozen_backbone, make_head

#: the top-down module's parameter names, as in the official checkpoints
TOP_DOWN_KEYS = ("prompt", "top_down_transform", "decoders.")


class DecodeBlock(nn.Module):
    """One feedback layer: ``linear`` passes the signal down, ``linear2`` emits this layer's top-down signal."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        self.linear2 = nn.Linear(dim, dim, bias=False)
        for layer in (self.linear, self.linear2):  # timm ViT's _init_weights, which the official encoder applies
            nn.init.trunc_normal_(layer.weight, std=0.02)


def feedback_span(kind: str, depth: int) -> tuple[int, int]:
    """(source, target): the first pass runs blocks ``[0, source)`` and feeds back from their output; blocks
    ``[target, source)`` get a top-down signal; blocks below ``target`` are shared by both passes."""
    middle = depth // 2
    spans = {"full": (depth, 0), "early": (middle, 0), "late": (depth, middle)}
    if kind not in spans:
        raise ValueError(f"unknown feedback kind {kind!r} (expected one of {', '.join(spans)})")
    return spans[kind]


def check_backbone(backbone: nn.Module) -> None:
    """TOAST re-runs timm's ViT blocks with a top-down input: refuse anything else with a clear message."""
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        raise HarnessError(f"TOAST needs a timm VisionTransformer backbone, got {type(backbone).__name__}")
    for i, blk in enumerate(backbone.blocks):
        if type(blk) is not Block or not isinstance(blk.attn, Attention):
            raise HarnessError(f"TOAST needs timm's standard pre-norm Block/Attention; block {i} is "
                               f"{type(blk).__name__} with {type(blk.attn).__name__}")


def top_down_attention(attn: nn.Module, x: torch.Tensor, td: torch.Tensor, v_bias_twice: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` with ``W_v td`` added to V only (Q and K come from ``x`` alone).

    ``x`` is the block's ``norm1`` output; ``td`` is not normalised (as in the official code). Only the V rows of the
    frozen fused qkv weight are applied to ``td``, with the V bias only when ``v_bias_twice`` (the official code's
    ``qkv(td)`` adds it a second time). Keeps the fused ``scaled_dot_product_attention`` path.
    """
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    D = getattr(attn, "attn_dim", H * hd)  # older timm 1.0.x has no attn_dim, norm or gate
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = attn.qkv.bias
    v_td = F.linear(td, attn.qkv.weight[2 * D:], bias[2 * D:] if (v_bias_twice and bias is not None) else None)
    v = v + v_td.reshape(B, N, H, hd).transpose(1, 2)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(B, N, D)
    if getattr(attn, "norm", None) is not None:
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def top_down_block(blk: nn.Module, x: torch.Tensor, td: torch.Tensor | None,
                   v_bias_twice: bool = False) -> torch.Tensor:
    """timm ``Block.forward`` whose attention receives a top-down signal (plain ``blk(x)`` when ``td`` is None)."""
    if td is None:
        return blk(x)
    x = x + blk.drop_path1(blk.ls1(top_down_attention(blk.attn, blk.norm1(x), td, v_bias_twice)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


@dataclass
class TopDownOutput:
    """Everything one forward computes; ``features`` feed the head."""

    features: torch.Tensor  # pooled second-pass features
    first_features: torch.Tensor | None  # pooled first-pass features (None when the first pass stops midway)
    similarity: torch.Tensor | None  # B x N clamped cosine of every token with xi (None without token selection)
    var_loss: torch.Tensor | None  # the unweighted variational loss (sum over feedback layers) when asked for
    block_inputs: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # ("first"|"second", l) -> tokens


class TopDownViT(nn.Module):
    """A frozen timm ViT with TOAST's feature selection, feedback path and top-down second pass.

    Parameter names match the official checkpoints: ``prompt`` (xi), ``top_down_transform`` (P) and
    ``decoders.{l}.linear/linear2.weight`` with ``l`` the block index; the backbone's keys live under ``backbone.``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, feedback: str = "full",
                 token_selection: bool = True, v_bias_twice: bool = False, frozen_eval: bool = True):
        super().__init__()
        check_backbone(backbone)
        self.backbone = backbone
        self.depth = len(backbone.blocks)
        self.feedback_kind = feedback
        self.source, self.target = feedback_span(feedback, self.depth)
        self.token_selection = token_selection
        self.v_bias_twice = v_bias_twice
        self.frozen_modules = frozen_backbone(frozen_eval)
        #: the settings a loaded checkpoint brought (see :func:`methods.toast_checkpoint.load_top_down`); empty when none was loaded
        self.checkpoint_settings: dict[str, Any] = {}
        dim = backbone.embed_dim
        self.prompt = nn.Parameter(torch.randn(dim))
        self.top_down_transform = nn.Parameter(torch.eye(dim))
        self.decoders = nn.ModuleDict({str(l): DecodeBlock(dim) for l in self.feedback_layers})
        self.head = make_head(backbone.num_features, num_classes)

    @property
    def feedback_layers(self) -> range:
        return range(self.target, self.source)

    # -- the four steps ----------------------------------------------------------------------------------------
    def first_pass(self, x: torch.Tensor, taps: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(shared, top): the input of block ``target`` (reused by the second pass) and the tokens fed back (after
        the final norm when the pass runs the whole backbone, the raw block output for early feedback)."""
        bb = self.backbone
        h = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        shared = h
        for l in range(self.source):
            if taps is not None:
                taps[("first", l)] = h
            h = bb.blocks[l](h)
            if l + 1 == self.target:
                shared = h
        top = bb.norm(h) if self.source == self.depth else h
        return shared, top

    def select(self, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token selection by cosine with xi (clamped to [0, 1]; no temperature, no softmax), then ``@ P``."""
        similarity = None
        if self.token_selection:
            similarity = (F.normalize(top, dim=-1) @ F.normalize(self.prompt, dim=-1)).clamp(0, 1)
            top = top * similarity.unsqueeze(-1)
        return top @ self.top_down_transform, similarity

    def feedback(self, selected: torch.Tensor) -> dict[int, torch.Tensor]:
        """Top-down signals per block, from the top feedback layer down (docs/protocol.md §3.4)."""
        td: dict[int, torch.Tensor] = {}
        z = selected
        for l in reversed(self.feedback_layers):
            decoder = self.decoders[str(l)]
            z = decoder.linear(z)
            td[l] = decoder.linear2(z)
        return td

    def second_pass(self, shared: torch.Tensor, td: dict[int, torch.Tensor], var_loss: bool = False,
                    taps: dict | None = None, outs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blocks ``[target, depth)`` with their top-down signals, then the final norm. With ``var_loss``, also
        the variational loss: per feedback layer, ``MSE(linear_l(out_l.detach()), in_l.detach())``, summed.
        ``outs`` collects each block's raw output."""
        h, terms = shared, []
        for l in range(self.target, self.depth):
            if taps is not None:
                taps[("second", l)] = h
            out = top_down_block(self.backbone.blocks[l], h, td.get(l), self.v_bias_twice)
            if outs is not None:
                outs[l] = out
            if var_loss and l in td:
                terms.append(F.mse_loss(self.decoders[str(l)].linear(out.detach()), h.detach()))
            h = out
        return self.backbone.norm(h), (torch.stack(terms).sum() if terms else None)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward_detailed(self, x: torch.Tensor, var_loss: bool = False, taps: bool = False) -> TopDownOutput:
        block_inputs: dict | None = {} if taps else None
        # nothing trainable precedes the selection when the backbone is frozen: no graph for the first pass
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(grad):
            shared, top = self.first_pass(x, block_inputs)
        return self.after_first_pass(shared, top, var_loss, block_inputs)

    def after_first_pass(self, shared: torch.Tensor, top: torch.Tensor, var_loss: bool = False,
                         block_inputs: dict | None = None) -> TopDownOutput:
        """Steps 2-4 on the first pass's ``(shared, top)``."""
        selected, similarity = self.select(top)
        tokens, var = self.second_pass(shared, self.feedback(selected), var_loss, block_inputs)
        pool = self.backbone.forward_head
        first = pool(top, pre_logits=True) if self.source == self.depth else None
        return TopDownOutput(pool(tokens, pre_logits=True), first, similarity, var, block_inputs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_detailed(x).features)

    # the split the frozen-computation cache uses (ToastMethod.frozen_features): the first pass is a function of
    # the image and the frozen backbone alone; what follows it trains
    def frozen_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shared, top) of :meth:`first_pass`: the second pass's input (block ``target``'s: the patch tokens, or
        the shared lower half's output for late feedback) and the tokens fed back."""
        with torch.no_grad():
            return self.first_pass(x)

    def from_frozen(self, shared: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        return self.head(self.after_first_pass(shared, top).features)

    def block_outputs(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """The second pass's raw outputs of blocks ``indices`` (tokens, before the final norm), for a dense head
        (segmentation). Blocks below the feedback span are shared by both passes, so theirs come from the first."""
        taps: dict = {}
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(grad):
            shared, top = self.first_pass(x, taps)
        selected, _ = self.select(top)
        outs: dict[int, torch.Tensor] = {}
        self.second_pass(shared, self.feedback(selected), outs=outs)
        return [outs[l] if l in outs else taps[("first", l + 1)] for l in indices]

    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Paper Fig. 4 panels, each B x grid_h x grid_w: the first pass's last-layer CLS attention (head average),
        the token-similarity map (cosine with xi, clamped), the second pass's last-layer CLS attention."""
        from harness.api import cls_attention

        bb = self.backbone
        grid = tuple(bb.patch_embed.grid_size)
        with torch.no_grad():
            out = self.forward_detailed(x, taps=True)
            last_first = self.source - 1
            maps = {}
            name = "first pass" if self.source == self.depth else f"first pass (block {last_first + 1}/{self.depth})"
            maps[name] = cls_attention(bb.blocks[last_first], out.block_inputs[("first", last_first)], grid)
            if out.similarity is not None:
                patches = grid[0] * grid[1]
                maps["token selection (cos with ξ)"] = out.similarity[:, -patches:].reshape(-1, *grid)
            maps["second pass"] = cls_attention(bb.blocks[-1], out.block_inputs[("second", self.depth - 1)], grid)
        return maps


# ---------------------------------------------------------------------------------------------------- what trains
def train_top_down(model: TopDownViT, *, prompt: bool = True, transform: bool = True,
                   feedback: bool = True) -> list[tuple[str, nn.Parameter]]:
    """Freeze ``model``, then let train: xi (``prompt``), P (``transform``), the feedback path (``feedback``: its
    LoRA adapters where it carries them, TOAST-Lite, else its weights) and the head. Returns the trainable
    parameters with their names, in the order xi, feedback path, head, P (the pre-tuning's optimiser order)."""
    freeze(model)
    lora = [(n, p) for n, p in model.decoders.named_parameters() if "lora_" in n]
    chosen = [("prompt", model.prompt)] if prompt else []
    if feedback:
        chosen += [(f"decoders.{n}", p) for n, p in (lora or model.decoders.named_parameters())]
    chosen += [(f"head.{n}", p) for n, p in model.head.named_parameters()]
    if transform:
        chosen.append(("top_down_transform", model.top_down_transform))
    for _, p in chosen:
        p.requires_grad_(True)
    return chosen


# ---------------------------------------------------------------------------------------------------- LoRA
class _LowRankUpdateLinear(torch.autograd.Function):
    """``y = x (W + s B A)^T`` with the gradients of A and B computed through the rank, not through a d x d
    weight gradient: ``dB = s dy^T (x A^T)``, ``dA = s (dy B)^T x`` (tokens x d x r multiply-adds each) instead of
    ``dW' = dy^T x`` (tokens x d x d) followed by its projection; ``dx = dy (W + s B A)`` as for any linear. The
    same gradients as autograd through the merged weight, to float rounding (tests/test_toast.py)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        merged = weight + scaling * (lora_b @ lora_a)
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(x, merged)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, merged, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        tokens, grad_tokens = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_a = grad_b = None
        if need_x:
            grad_x = (grad_out @ merged.to(grad_out.dtype)).to(x.dtype)
        if need_w:  # only if the frozen weight was made trainable
            grad_w = (grad_tokens.t() @ tokens.to(grad_tokens.dtype)).to(merged.dtype)
        if need_b:
            low = tokens @ lora_a.t().to(tokens.dtype)  # tokens x r
            grad_b = (ctx.scaling * (grad_tokens.t() @ low.to(grad_tokens.dtype))).to(lora_b.dtype)
        if need_a:
            low_grad = grad_tokens @ lora_b.to(grad_tokens.dtype)  # tokens x r
            grad_a = (ctx.scaling * (low_grad.t() @ tokens.to(low_grad.dtype))).to(lora_a.dtype)
        return grad_x, grad_w, grad_a, grad_b, None


class LoRALinear(nn.Linear):
    """A frozen bias-free linear plus a trainable low-rank update, as loralib's ``lora.Linear`` in the official
    TOAST-Lite: ``y = x W^T + scaling * x A^T B^T`` with ``weight`` (the pre-tuned W), ``lora_A`` (r x in) and
    ``lora_B`` (out x r) named as there. Computed merged: ``W + scaling * B A`` is formed once per call (out x r x in
    multiply-adds) and applied as one linear, instead of two thin matmuls per token as peft and loralib do while
    training, and A's and B's gradients are computed through the rank (:class:`_LowRankUpdateLinear`), so a step
    never forms the d x d weight gradient a trained linear (TOAST's) needs: the same function and gradients as
    peft's LoRA (to float rounding; tests/test_toast.py), for less than a plain trained linear costs."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=False, device=base.weight.device,
                         dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
        self.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)  # loralib's (and peft's) init: A random, B zero
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
            return _LowRankUpdateLinear.apply(x, self.weight, self.lora_A, self.lora_B, self.scaling)
        return F.linear(x, self.weight + self.scaling * (self.lora_B @ self.lora_A))


def add_feedback_lora(model: TopDownViT, rank: int = 4, alpha: float = 1.0) -> None:
    """TOAST-Lite: LoRA on every feedback linear (``linear`` and ``linear2``), dropout 0, scaling ``alpha / rank``
    (loralib's defaults alpha=1, r=4 give 0.25), computed merged (:class:`LoRALinear`)."""
    for block in model.decoders.values():
        for name in ("linear", "linear2"):
            setattr(block, name, LoRALinear(getattr(block, name), int(rank), float(alpha)))
