"""TOAST: top-down attention steering around a frozen timm ViT (paper §3, §4.5, §4.6, §5; docs/protocol.md §3).

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

Variants (class attributes, not hyperparameters: they define the method):

* ``feedback="early"`` (paper §5 "early feedback"): the first pass stops after the middle block; its raw output is
  selected and fed back into the blocks below it; the second pass runs the whole backbone. ~1.5x backbone FLOPs.
* ``feedback="late"``: the first pass runs whole; feedback from the top goes only into the upper half, so the lower
  half's output is computed once and shared by both passes. ~1.5x backbone FLOPs.
  (The compiled official variants name these the other way round: their ``early`` .pyc is ``feedback_to=6,
  feedback_from=12``, i.e. the paper's "late"; their ``hollow`` is the paper's "early". We follow the paper.)
* ablations (Table 8): ``toast-nopretune`` (random top-down module), ``toast-notoken`` (no token selection, so xi is
  unused and frozen), ``toast-nochannel`` (P and the feedback path frozen; xi and the head train).

Settings (hyperparameters with defaults; a sweep may override them):

* ``train_P`` (default True, the paper: "P ... task-specific parameters"; the official ``toast`` mode leaves P frozen
  because its name matches none of ``decoders``/``prompt``/``head``);
* ``v_bias_twice`` (the paper's ``W_V (X + X_td)`` is False; the official code computes ``qkv(td)`` with its bias, so
  b_v is added twice: True matches it). Default: what the loaded checkpoint was made with — True for an official TOAST
  file (its module was trained with the doubled bias; the two forwards differ by ~30% in logits), the recorded
  setting for the harness's own pre-tuned files, False without a checkpoint. An explicit value that contradicts the
  checkpoint is refused. The value applied is on the model as ``checkpoint_settings`` (recorded with the trial);
* ``frozen_eval`` (default True: the frozen backbone runs in eval mode, no drop-path; the official code leaves
  drop-path 0.1 on: set False);
* ``pretuned_backbone`` (optional, default ``check``): what to do with backbone keys inside a pre-tuned checkpoint
  (official ones carry their backbone): ``check`` refuses a file pre-tuned on other backbone weights, ``load`` uses
  the checkpoint's backbone weights, ``ignore`` skips them.

Checkpoints (:func:`read_checkpoint`): the harness's own pre-tuned files (``{"model": ..., "harness": metadata}``),
the official pre-tuned ones (DeiT/AbSViT style ``{"model": ..., "args": argparse.Namespace, ...}`` or a plain state
dict) and the official trainer's per-task files (``{"model_state_dict": ...}`` with ``enc.`` and ``head.last_layer.``
prefixes; tuned on one downstream task and, in TOAST's final runs, saved at the best *test* epoch: docs/protocol.md
§3.6, §6.1).
They are read with ``torch.load(weights_only=True)``; the only class allowed besides tensors and plain containers is
``argparse.Namespace`` (what the official files pickle). Anything else is refused with the type's name, never loaded
with ``weights_only=False``: a pickle from anywhere can run code.

Pre-tuning (:mod:`methods.toast_pretune`) produces the ``toast-pretuned`` artifact these methods need.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.api import BuildContext, Method
from harness.errors import HarnessError
from methods.common import freeze, frozen_backbone, make_head

#: docs/protocol.md §5.5: TOAST's ``tune_vtab.py --grid-search-type topdown``
TOAST_GRID = {"lr": [1.0, 0.5, 0.25, 0.1, 0.05, 0.025, 0.01], "weight_decay": [0.01, 0.001, 0.0001, 0.0]}
#: the top-down module's parameter names, as in the official checkpoints
TOP_DOWN_KEYS = ("prompt", "top_down_transform", "decoders.")
FEEDBACK_KINDS = ("full", "early", "late")


# ---------------------------------------------------------------------------------------------------- the model
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
        raise ValueError(f"unknown feedback kind {kind!r} (expected one of {', '.join(FEEDBACK_KINDS)})")
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
        #: the settings a loaded checkpoint brought (see :func:`load_top_down`); empty when none was loaded
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


# ---------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class LoadReport:
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    ignored: list[str]
    backbone: str  # what happened to backbone keys in the file
    origin: str = "harness"  # a key of ORIGINS
    settings: dict[str, Any] = field(default_factory=dict)  # what the model now uses (v_bias_twice)

    def summary(self) -> str:
        applied = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        parts = [f"{len(self.loaded)} top-down tensors loaded from {ORIGINS.get(self.origin, self.origin)}"
                 + (f" ({applied})" if applied else "")]
        if self.unexpected:
            parts.append(f"unexpected (not used): {_short(self.unexpected)}")
        if self.ignored:
            parts.append(f"ignored: {_short(self.ignored)}")
        parts.append(self.backbone)
        return "; ".join(parts)


def _short(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


#: classes official checkpoints pickle besides tensors and plain containers (DeiT/AbSViT save their ``args``)
SAFE_CHECKPOINT_TYPES: tuple[type, ...] = (argparse.Namespace,)
#: where a checkpoint comes from (``Checkpoint.origin``)
ORIGINS = {
    "harness": "a pre-tuned file written by `harness pretune`",
    "official": "an official TOAST checkpoint (no harness metadata)",
    "official-task": "an official TOAST per-task checkpoint (model_state_dict: tuned on a downstream task)",
}
#: settings a checkpoint's weights only make sense with, and their value in official files: the official code adds
#: the V bias twice (``qkv(td)`` with its bias; docs/protocol.md §3.6)
OFFICIAL_SETTINGS: dict[str, Any] = {"v_bias_twice": True}


@dataclass
class Checkpoint:
    """A top-down checkpoint as read from disk: tensors under our key names, and what the file says about itself."""

    path: Path
    state: dict[str, torch.Tensor]
    origin: str  # a key of ORIGINS
    #: the harness's metadata (``{}`` for official files)
    meta: dict[str, Any] = field(default_factory=dict)
    #: the settings the weights were made with (v_bias_twice), which a model loading them must use
    settings: dict[str, Any] = field(default_factory=dict)
    #: for official per-task files: the epoch they were saved at (TOAST's final runs: the best *test* epoch)
    epoch: int | None = None

    @property
    def described(self) -> str:
        return ORIGINS[self.origin]


def _load_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, allowing exactly :data:`SAFE_CHECKPOINT_TYPES` besides tensors and
    plain containers. A file that pickles anything else is refused with the type's name (torch's unpickler names the
    global it stopped at); there is no fallback to ``weights_only=False``."""
    try:
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_TYPES)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        allowed = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in SAFE_CHECKPOINT_TYPES)
        if found:
            raise HarnessError(
                f"refusing to load TOAST checkpoint {path}: it pickles {found.group(1)}, which is not a tensor, a "
                f"plain container or {allowed} (the only class official checkpoints carry); unpickling it could run "
                "code. If you trust the file, re-save just its state dict (torch.save(state_dict, new_path)) and "
                "point the suite at that") from None
        detail = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        raise HarnessError(f"cannot read TOAST checkpoint {path}: "
                           f"{detail.group(1) if detail else text.splitlines()[0] if text else type(err).__name__} "
                           "(expected a torch file with a state dict)") from None
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds for a file that is not a checkpoint
        raise HarnessError(f"cannot read TOAST checkpoint {path}: {type(err).__name__}: {err} "
                           "(expected a torch file with a state dict)") from None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a top-down checkpoint: ours (``{"model", "harness"}``), an official pre-tuned one (``model`` or
    ``state_dict`` nesting, or a plain state dict) or an official per-task file (``model_state_dict`` with the
    encoder under ``enc.`` and the task head under ``head.last_layer.``). ``module.`` and ``enc.`` prefixes are
    dropped, so keys read as our model's (``prompt``, ``top_down_transform``, ``decoders.<l>...``, backbone keys,
    ``head.*``). A file with no top-down keys is an error listing the keys it has."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"TOAST checkpoint not found: {path}")
    raw = _load_file(path)
    if not isinstance(raw, dict):
        raise HarnessError(f"TOAST checkpoint {path}: expected a dict (a state dict or one holding 'model', "
                           f"'state_dict' or 'model_state_dict'), got {type(raw).__name__}")
    top_level = list(raw)
    meta = raw.get("harness") if isinstance(raw.get("harness"), dict) else {}
    origin, epoch = ("harness" if meta else "official"), None
    nested = raw
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(raw.get(key), dict):
            nested = raw[key]
            if key == "model_state_dict" and not meta:
                origin = "official-task"
                epoch = int(raw["epoch"]) if isinstance(raw.get("epoch"), int) else None
            break
    state = {}
    for key, value in nested.items():
        if isinstance(value, torch.Tensor):
            key = key.removeprefix("module.")
            state[key.removeprefix("enc.")] = value
    if not any(k.startswith(TOP_DOWN_KEYS) for k in state):
        inner = f"; its tensors: {_short(state)}" if state else "; it holds no tensors at that level"
        raise HarnessError(
            f"TOAST checkpoint {path} has no top-down keys (prompt, top_down_transform, decoders.<l>.linear/"
            f"linear2.weight, optionally under enc. or module.): its top-level keys are {_short(top_level)}{inner}")
    if origin == "harness":
        settings = meta.get("settings") or {}
        if "v_bias_twice" not in settings:
            raise HarnessError(f"TOAST checkpoint {path}: its harness metadata records no settings.v_bias_twice, so "
                               "the forward pass it was trained with is unknown; pre-tune it again with "
                               "`harness pretune ... --force`")
        settings = {"v_bias_twice": bool(settings["v_bias_twice"])}
    else:
        settings = dict(OFFICIAL_SETTINGS)
    return Checkpoint(path, state, origin, meta, settings, epoch)


def applied_settings(checkpoint: Checkpoint, hparams: dict[str, Any], method: str = "toast") -> dict[str, Any]:
    """The settings a model loading ``checkpoint`` must use: the checkpoint's, unless the trial set one explicitly
    (not None) to the same value. An explicit contradicting value is refused: the weights were trained for the other
    forward pass."""
    applied: dict[str, Any] = {}
    for key, value in checkpoint.settings.items():
        explicit = hparams.get(key)
        if explicit is not None and bool(explicit) != bool(value):
            remedy = (f"set pretune.{key}: {str(bool(explicit)).lower()} and pre-tune again"
                      if checkpoint.origin == "harness" else
                      "use a checkpoint made with that setting")
            raise HarnessError(
                f"method {method} sets {key}: {str(bool(explicit)).lower()}, but its checkpoint {checkpoint.path} "
                f"({checkpoint.described}) was made with {key}={value}: remove the setting from the suite's "
                f"grids/settings for {method} (the checkpoint's value is then used), or {remedy}")
        applied[key] = value
    return applied


def load_top_down(model: TopDownViT, source: str | Path | Checkpoint, backbone_keys: str = "check",
                  hparams: dict[str, Any] | None = None, method: str = "toast") -> LoadReport:
    """Load the top-down module (xi, P, decoders) from a checkpoint into ``model``, with the settings it was made
    with.

    ``model.v_bias_twice`` is set to the checkpoint's (True for official files); ``hparams`` are the trial's
    hyperparameters, where an explicit (not None) contradicting value is refused (:func:`applied_settings`). What was
    applied is left on the model as ``checkpoint_settings`` (with the file's origin, path and fingerprint), which the
    engine records with the trial.

    ``backbone_keys`` says what to do with the backbone's timm keys when the file has them (official checkpoints
    do): ``check`` (default) refuses a file pre-tuned on different backbone weights, ``load`` loads them into the
    backbone, ``ignore`` skips them. ``head.*`` (the pre-tuning or task head) is always ignored. Missing top-down keys
    or wrong shapes are an error naming them; unexpected ones (e.g. decoders a feedback variant does not have) are
    reported.
    """
    from harness.api import file_fingerprint

    if backbone_keys not in ("check", "load", "ignore"):
        raise HarnessError(f"pretuned_backbone: expected check, load or ignore, got {backbone_keys!r}")
    checkpoint = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    path, state = checkpoint.path, checkpoint.state
    settings = applied_settings(checkpoint, hparams or {}, method)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(TOP_DOWN_KEYS)}
    given = {k: v for k, v in state.items() if k.startswith(TOP_DOWN_KEYS)}
    missing = sorted(set(own) - set(given))
    if missing:
        raise HarnessError(f"TOAST checkpoint {path}: missing keys {_short(missing)} (it has {_short(given)})")
    update: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        value = given[key]
        if value.numel() == target.numel() and key == "prompt":
            value = value.reshape(target.shape)  # official xi may be stored as 1 x 1 x d
        if value.shape != target.shape:
            raise HarnessError(f"TOAST checkpoint {path}: {key} has shape {tuple(value.shape)}, the model expects "
                               f"{tuple(target.shape)} (pre-tuned for another backbone width?)")
        update[key] = value
    model.load_state_dict(update, strict=False)
    unexpected = sorted(set(given) - set(own))
    ignored = sorted(k for k in state if k.startswith("head."))
    rest = {k: v for k, v in state.items() if not k.startswith(TOP_DOWN_KEYS) and not k.startswith("head.")}
    backbone_note = _backbone_keys(model.backbone, rest, backbone_keys, path, unexpected)
    model.v_bias_twice = bool(settings["v_bias_twice"])
    model.checkpoint_settings = {**settings, "origin": checkpoint.origin, "checkpoint": str(path),
                                 "sha256": file_fingerprint(path)}
    if checkpoint.epoch is not None:
        model.checkpoint_settings["epoch"] = checkpoint.epoch
    if checkpoint.origin == "official-task":
        saved = f" (saved at epoch {checkpoint.epoch})" if checkpoint.epoch is not None else ""
        warnings.warn(f"{path} is an official per-task TOAST checkpoint{saved}: its top-down module was tuned on a "
                      "downstream task, and TOAST's final runs save the best *test* epoch (save_best_test), so "
                      "trials starting from it are not a clean protocol; prefer a pre-tuned module", stacklevel=2)
    return LoadReport(sorted(update), [], unexpected, ignored, backbone_note, checkpoint.origin, settings)


def _backbone_keys(backbone: nn.Module, rest: dict[str, torch.Tensor], mode: str, path, unexpected: list) -> str:
    if not rest:
        return "no backbone keys in the file"
    if mode == "ignore":
        return f"{len(rest)} backbone keys ignored"
    own = backbone.state_dict()
    unexpected += sorted(k for k in rest if k not in own)
    common = [k for k in rest if k in own]
    if mode == "load":
        bad = [k for k in common if rest[k].shape != own[k].shape]
        if bad:
            raise HarnessError(f"TOAST checkpoint {path}: backbone keys with other shapes: {_short(bad)}")
        backbone.load_state_dict({k: rest[k] for k in common}, strict=False)
        return f"{len(common)} backbone tensors loaded from the checkpoint"
    differ = [k for k in common if rest[k].shape != own[k].shape or not torch.equal(rest[k].to(own[k].dtype), own[k])]
    if differ:
        raise HarnessError(
            f"TOAST checkpoint {path} was pre-tuned on other backbone weights ({len(differ)} of {len(common)} tensors "
            f"differ, e.g. {_short(differ, 3)}); use the backbone it was made for, or set the method setting "
            "pretuned_backbone: load (use the checkpoint's backbone) or ignore")
    return f"{len(common)} backbone tensors match the suite's backbone"


def top_down_state(model: TopDownViT) -> dict[str, torch.Tensor]:
    """The top-down module's tensors under the official key names (what a pre-tuned checkpoint holds)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(TOP_DOWN_KEYS)}


# ---------------------------------------------------------------------------------------------------- LoRA
def add_feedback_lora(model: TopDownViT, rank: int = 4, alpha: float = 1.0) -> None:
    """TOAST-Lite: peft LoRA on every feedback linear (``linear`` and ``linear2``), bias-free, dropout 0, scaling
    ``alpha / rank`` (loralib's defaults alpha=1, r=4 give 0.25); A kaiming-uniform, B zeros as in loralib."""
    from peft import LoraConfig, inject_adapter_in_model  # lazy: peft imports transformers (~5 s)

    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=["linear", "linear2"])
    inject_adapter_in_model(config, model.decoders)


# ---------------------------------------------------------------------------------------------------- methods
class ToastMethod(Method):
    """TOAST (paper §3.2): frozen backbone; xi, P (setting), the feedback path and the head train."""

    family = "top-down"
    description = "top-down attention steering: xi, P and the feedback path train (pre-tuned init)"
    optimizer = "sgd"
    warmup_epochs = 10
    grid = TOAST_GRID
    #: v_bias_twice None: the checkpoint's setting (official files: True), False without one; see the module doc
    defaults = {"train_P": True, "v_bias_twice": None, "frozen_eval": True}
    #: ``seg_feedback``: the feedback span on segmentation tasks (default :attr:`seg_feedback`)
    hparam_keys = ("pretuned_backbone", "drop_path", "seg_feedback")
    hparam_choices = {"seg_feedback": FEEDBACK_KINDS}
    needs = ("toast-pretuned",)
    suite_sections = ("pretune",)
    #: the first pass is cached where the task allows (harness/features.py); its content depends on the feedback
    #: span only, so every variant with the same span shares one cache
    frozen_features = "first-pass"

    def section_keys(self, section: str) -> dict[str, Any]:
        from methods.toast_pretune import DEFAULTS

        return dict(DEFAULTS) if section == "pretune" else {}
    #: the architecture (what pre-tuning must match) and what trains
    feedback = "full"
    token_selection = True
    pretuned = True
    train_feedback = True
    #: the feedback span on segmentation tasks: from the middle block (paper §4.4 and §5: "feedback from the middle
    #: layer instead of the last layer gives better performance"); ``seg_feedback: full`` selects the regular one
    seg_feedback = "early"

    def make_model(self, backbone: nn.Module, num_classes: int, hparams: dict[str, Any],
                   feedback: str | None = None) -> TopDownViT:
        hp = {**self.defaults, **hparams}
        freeze(backbone)
        return TopDownViT(backbone, num_classes, feedback=feedback or self.feedback,
                          token_selection=self.token_selection, v_bias_twice=bool(hp["v_bias_twice"]),
                          frozen_eval=bool(hp["frozen_eval"]))

    def build(self, backbone, num_classes: int, ctx: BuildContext) -> TopDownViT:
        """The model; with a pre-tuned module loaded (and its settings applied: ``model.checkpoint_settings``) unless
        the method starts from a random one or the build is for inspection only."""
        return self._build(backbone, num_classes, ctx)

    def _build(self, backbone, num_classes: int, ctx: BuildContext, feedback: str | None = None) -> TopDownViT:
        model = self.make_model(backbone, num_classes, ctx.hparams, feedback)
        if self.pretuned and not ctx.random_init:
            path = ctx.resolve_artifact("toast-pretuned")
            report = load_top_down(model, path, str(ctx.hparams.get("pretuned_backbone", "check")),
                                   hparams=ctx.hparams, method=self.name or "toast")
            # a narrower span than the module was pre-tuned for uses the decoders of its own layers only
            if report.unexpected and (feedback or self.feedback) == self.feedback:
                warnings.warn(f"{path}: {report.summary()}", stacklevel=2)
        self.set_trainable(model, {**self.defaults, **ctx.hparams})
        return model

    def build_segmentation(self, backbone: nn.Module, task, ctx: BuildContext) -> nn.Module:
        """The engine's segmentation model on the second pass's block outputs, with feedback from the middle block
        by default (``seg_feedback``; docs/protocol.md §9.4). The pre-tuned module's decoders of the fed-back
        layers are loaded; what trains is what :meth:`set_trainable` says, plus the decode heads."""
        from harness.api import segmentation_model

        kind = str(ctx.hparams.get("seg_feedback") or self.seg_feedback)
        if kind not in FEEDBACK_KINDS:
            raise HarnessError(f"{self.name}: seg_feedback {kind!r} is not one of {', '.join(FEEDBACK_KINDS)}")
        model = self._build(backbone, task.num_classes, ctx, feedback=kind)
        return segmentation_model(model, backbone, task, ctx, features=model.block_outputs)

    def set_trainable(self, model: TopDownViT, hp: dict[str, Any]) -> None:
        freeze(model)
        model.prompt.requires_grad_(self.token_selection)
        model.top_down_transform.requires_grad_(self.train_feedback and bool(hp["train_P"]))
        for p in model.decoders.parameters():
            p.requires_grad_(self.train_feedback)
        for p in model.head.parameters():
            p.requires_grad_(True)


class ToastLite(ToastMethod):
    """TOAST-Lite (paper §4.5, docs/protocol.md §3.9): rank-4 LoRA on every feedback linear; the pre-tuned feedback
    weights stay frozen; xi, P and the head train."""

    description = "TOAST with rank-4 LoRA (peft) on the feedback path; xi, P and the head train"
    defaults = {**ToastMethod.defaults, "lora_rank": 4, "lora_alpha": 1.0}

    def set_trainable(self, model: TopDownViT, hp: dict[str, Any]) -> None:
        add_feedback_lora(model, int(hp["lora_rank"]), float(hp["lora_alpha"]))
        freeze(model)
        model.prompt.requires_grad_(True)
        model.top_down_transform.requires_grad_(bool(hp["train_P"]))
        for name, p in model.decoders.named_parameters():
            p.requires_grad_("lora_" in name)
        for p in model.head.parameters():
            p.requires_grad_(True)


class ToastEarly(ToastMethod):
    description = "TOAST with early feedback: the first pass stops at the middle block (~1.5x backbone FLOPs)"
    feedback = "early"
    seg_feedback = "early"
    frozen_features = "first-pass-early"  # the first pass stops at the middle block


class ToastLate(ToastMethod):
    description = "TOAST with late feedback into the upper half only; the lower half is shared (~1.5x FLOPs)"
    feedback = "late"
    seg_feedback = "late"
    frozen_features = "first-pass-late"  # shared: the lower half's output, computed once for both passes


class ToastNoPretune(ToastMethod):
    description = "ablation (Table 8): TOAST from a randomly initialised top-down module"
    needs = ()
    suite_sections = ()
    pretuned = False


class ToastNoToken(ToastMethod):
    description = "ablation (Table 8): TOAST without token selection (xi unused)"
    token_selection = False


class ToastNoChannel(ToastMethod):
    description = "ablation (Table 8): P and the feedback path frozen; xi and the head train"
    train_feedback = False


def pretune_architecture(method: Method) -> dict[str, Any]:
    """What a pre-tuned checkpoint must match: the feedback span (token selection on or off shares one module)."""
    return {"feedback": getattr(method, "feedback", "full")}
