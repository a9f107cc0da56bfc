"""Semantic segmentation on ViT backbones: the model every method plugs into, its loss and its evaluation
(docs/protocol.md §9).

The model (:class:`SegmentationModel`) takes the features of four evenly spaced blocks of the ViT (blocks 2, 5, 8,
11 of 12, as AbSViT's ``out_indices``), drops the CLS and prompt tokens (the patch tokens are always the last
``grid_h * grid_w`` tokens of a block's output), passes the last level through the backbone's final norm, reshapes
them to ``B x C x H/16 x W/16`` maps, and decodes them with transformers' UPerNet head (PSP pooling 1, 2, 3, 6 and
an FPN over the four levels) plus an auxiliary FCN head on the last level (loss weight 0.4, training only). Both
heads always train; the backbone side trains exactly as the method left it.

Where the features come from is the method's business (:meth:`harness.api.Method.build_segmentation`, asked by
:func:`build_segmentation`): by default :class:`BlockTaps` hooks the backbone's blocks while the method's own model
runs (full fine-tuning, linear, LoRA, VPT: its prompts sit between the CLS token and the patches); TOAST hands over
its second pass's block outputs.

This module is the engine's behaviour for the segmentation kind of task (:data:`harness.kinds.KINDS`): the model
(:func:`build_segmentation`), the loss (:func:`objective_for`), the loader's collate (:func:`collate_for`) and the
evaluation (:func:`evaluate_for`).

Nothing here names a method or a task.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.metrics import confusion_matrix, iou_per_class, mean_iou

if TYPE_CHECKING:  # pragma: no cover
    from harness.api import BuildContext, DataContext, Method, SegmentationTask
    from harness.distributed import World

#: a features function: (images, block indices) -> those blocks' token sequences (B x N x C, prefix tokens included)
Features = Callable[[torch.Tensor, "list[int]"], "list[torch.Tensor]"]


def feature_blocks(depth: int, levels: int = 4) -> list[int]:
    """Evenly spaced block indices ending at the last block: 12 blocks give AbSViT's (2, 5, 8, 11); 4 give
    (0, 1, 2, 3)."""
    return [max(0, (i + 1) * depth // levels - 1) for i in range(levels)]


class BlockTaps(nn.Module):
    """The default features: forward hooks on ``backbone.blocks[i]`` while the method's model runs its
    ``forward_features`` (or its forward when it has none; its classification head is then an Identity)."""

    def __init__(self, model: nn.Module, backbone: nn.Module, indices: list[int]):
        super().__init__()
        object.__setattr__(self, "model", model)  # not registered: the segmentation model holds it as ``encoder``
        self.indices = list(indices)
        self._blocks = [backbone.blocks[i] for i in self.indices]  # not registered: they live inside ``model``

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        taken: dict[int, torch.Tensor] = {}
        handles = [block.register_forward_hook(lambda _m, _i, out, k=k: taken.__setitem__(k, out))
                   for k, block in enumerate(self._blocks)]
        try:
            run = getattr(self.model, "forward_features", None) or self.model
            run(images)
        finally:
            for handle in handles:
                handle.remove()
        missing = [self.indices[k] for k in range(len(self._blocks)) if k not in taken]
        if missing:
            raise RuntimeError(f"segmentation: blocks {missing} never ran in {type(self.model).__name__}'s forward")
        return [taken[k] for k in range(len(self._blocks))]


def _upernet_config(num_classes: int, channels: int, aux_channels: int) -> SimpleNamespace:
    """What transformers' UperNetHead / UperNetFCNHead read from their config (mmseg's vit-upernet values)."""
    return SimpleNamespace(pool_scales=(1, 2, 3, 6), hidden_size=channels, num_labels=num_classes,
                           auxiliary_in_channels=None, auxiliary_channels=aux_channels, auxiliary_num_convs=1,
                           auxiliary_concat_input=False)


class SegmentationModel(nn.Module):
    """Block features (hooked by :class:`BlockTaps`, or a method's ``features(images, indices)``) -> 4 maps ->
    UPerNet logits at the input's resolution. ``head`` holds the decode and auxiliary heads (the task head, as a
    classifier's ``head``); ``encoder`` is the method's model. ``forward_train`` also returns the auxiliary
    logits."""

    def __init__(self, encoder: nn.Module, backbone: nn.Module, num_classes: int, *,
                 features: Features | None = None, indices: list[int] | None = None, channels: int = 512,
                 aux_channels: int = 256, aux_level: int = 3, dropout: float = 0.1):
        super().__init__()
        from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead  # lazy: ~5 s

        self.indices = list(indices or feature_blocks(len(backbone.blocks)))
        if hasattr(encoder, "head"):  # the classification head has no part in segmentation
            encoder.head = nn.Identity()
        self.encoder = encoder
        self.taps = BlockTaps(encoder, backbone, self.indices) if features is None else None
        self._features = features
        object.__setattr__(self, "_backbone", backbone)  # a reference, not a second registration
        patch = getattr(backbone.patch_embed, "patch_size", (16, 16))
        self.patch = (int(patch[0]), int(patch[-1]))
        dim = int(getattr(backbone, "embed_dim", None) or backbone.num_features)
        config = _upernet_config(num_classes, channels, aux_channels)
        decode = UperNetHead(config, [dim] * len(self.indices))
        auxiliary = UperNetFCNHead(config, [dim] * len(self.indices), in_index=aux_level)
        for head in (decode, auxiliary):  # mmseg's heads drop out (Dropout2d 0.1) before the classifier
            head.classifier = nn.Sequential(nn.Dropout2d(dropout), head.classifier)
        self.head = nn.ModuleDict({"decode": decode, "auxiliary": auxiliary})
        self.num_classes = num_classes

    @property
    def frozen_modules(self) -> tuple[str, ...]:
        """What the method's model declares frozen (:func:`harness.loop.train_mode`), under ``encoder.``."""
        return tuple(f"encoder.{name}" for name in getattr(self.encoder, "frozen_modules", ()))

    @property
    def trains_in_frozen(self) -> tuple[str, ...]:
        return tuple(getattr(self.encoder, "trains_in_frozen", ()))

    @property
    def checkpoint_settings(self) -> dict[str, Any] | None:
        """What a checkpoint the method loaded brought (TOAST's), recorded with the trial."""
        return getattr(self.encoder, "checkpoint_settings", None)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped blocks' patch tokens as ``B x C x h x w`` maps; the last level after the final norm."""
        gh, gw = images.shape[-2] // self.patch[0], images.shape[-1] // self.patch[1]
        tokens = self.taps(images) if self._features is None else self._features(images, self.indices)
        maps = []
        for level, t in enumerate(tokens):
            t = t[:, -gh * gw:]  # prefix (CLS, registers) and prompt tokens come first
            if level == len(tokens) - 1:
                t = self._backbone.norm(t)
            maps.append(t.transpose(1, 2).reshape(t.shape[0], t.shape[-1], gh, gw))
        return maps

    def _padded(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-pad right and bottom to a multiple of the patch size (whole-image evaluation of any size)."""
        h, w = images.shape[-2:]
        ph, pw = (-h) % self.patch[0], (-w) % self.patch[1]
        return F.pad(images, (0, pw, 0, ph)) if ph or pw else images

    def _logits(self, images: torch.Tensor, heads: tuple[str, ...]) -> list[torch.Tensor]:
        h, w = images.shape[-2:]
        padded = self._padded(images)
        maps = self.feature_maps(padded)
        out = []
        for name in heads:
            logits = F.interpolate(self.head[name](maps), size=padded.shape[-2:], mode="bilinear",
                                   align_corners=False)
            out.append(logits[..., :h, :w])
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._logits(images, ("decode",))[0]

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decode, auxiliary = self._logits(images, ("decode", "auxiliary"))
        return decode, auxiliary


def build_segmentation(method: "Method", task: "SegmentationTask", backbone: nn.Module,
                       ctx: "BuildContext") -> nn.Module:
    """A method's model for a segmentation task: its own :meth:`~harness.api.Method.build_segmentation` where it
    gives one, else :func:`segmentation_model` around its classification model (the default every method gets)."""
    own = method.build_segmentation(backbone, task, ctx)
    if own is not None:
        return own
    return segmentation_model(method.build(backbone, task.num_classes, ctx), backbone, task, ctx)


def segmentation_model(model: nn.Module, backbone: nn.Module, task: "SegmentationTask", ctx: "BuildContext", *,
                       features: Features | None = None, indices: list[int] | None = None) -> SegmentationModel:
    """The segmentation model around a method's ``model`` (see the module docstring); ``features`` replaces the
    default block hooks (its blocks: ``indices``, default :func:`feature_blocks`)."""
    from harness.api import DataContext

    options = task.options(ctx.data or DataContext(data_root=None, cache_dir=ctx.cache_dir))
    return SegmentationModel(model, backbone, task.num_classes, features=features, indices=indices,
                             channels=options["decoder_channels"], aux_channels=options["aux_channels"])


# ---------------------------------------------------------------------------------------------------- training
def _ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Pixel cross-entropy averaged over the labelled pixels (0, not nan, for a crop with none)."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def segmentation_objective(aux_weight: float = 0.4, ignore_index: int = 255):
    """``CE(decode) + aux_weight * CE(auxiliary)`` over the labelled pixels of the crop (mmseg's loss weights)."""

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        decode, auxiliary = model.forward_train(images)
        loss_decode = _ce(decode, labels, ignore_index)
        loss_aux = _ce(auxiliary, labels, ignore_index)
        return loss_decode + aux_weight * loss_aux, {"decode_loss": loss_decode.detach(), "aux_loss": loss_aux.detach()}

    return objective


def objective_for(task: "SegmentationTask", train: dict[str, Any], ctx: "DataContext"):
    """The segmentation kind's loss for a task: :func:`segmentation_objective` with the task's ``aux_weight``."""
    return segmentation_objective(task.options(ctx)["aux_weight"], task.ignore_index)


# ---------------------------------------------------------------------------------------------------- evaluation
def collate_for(task: "SegmentationTask", train: bool) -> Callable | None:
    """Training crops stack (torch's default); evaluation images keep their own sizes (:func:`collate_lists`)."""
    return None if train else collate_lists


def collate_lists(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Evaluation images keep their own sizes: a batch is (list of images, list of label maps)."""
    return [item[0] for item in batch], [item[1] for item in batch]


def slide_logits(model: nn.Module, image: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int],
                 num_classes: int) -> torch.Tensor:
    """mmseg's ``slide_inference``: crop-size windows every ``stride`` pixels (the last flush with the border),
    logits summed and divided by how many windows cover each pixel."""
    _, _, h, w = image.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    rows = max(h - ch + stride[0] - 1, 0) // stride[0] + 1
    cols = max(w - cw + stride[1] - 1, 0) // stride[1] + 1
    total = image.new_zeros((image.shape[0], num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride[0], h - ch), min(c * stride[1], w - cw)
            total[..., y1:y1 + ch, x1:x1 + cw] += model(image[..., y1:y1 + ch, x1:x1 + cw]).float()
            count[..., y1:y1 + ch, x1:x1 + cw] += 1
    return total / count


def evaluate_segmentation(model: nn.Module, loader, device: str, task: "SegmentationTask",
                          options: dict[str, Any], amp: bool = True, world: "World | None" = None
                          ) -> dict[str, Any]:
    """mIoU over a split: each image's logits (whole image, or sliding windows) are resized to its label map
    (bilinear), arg-maxed, and counted into one confusion matrix for the split. With several ranks (``world``)
    each counts its part of the split and the confusion matrices are summed before the mIoU."""
    from harness.loop import autocast_for

    model.eval()
    C = task.num_classes
    confusion = torch.zeros(C, C, dtype=torch.int64, device=device)  # counted on the device, read once
    with torch.inference_mode():
        for images, labels in loader:
            for image, label in zip(images, labels):
                x = image.unsqueeze(0).to(device, non_blocking=True)
                with autocast_for(device, amp):
                    if options["eval_mode"] == "slide":
                        logits = slide_logits(model, x, options["crop_size"], options["slide_stride"], C)
                    else:
                        logits = model(x)
                logits = F.interpolate(logits.float(), size=tuple(label.shape[-2:]), mode="bilinear",
                                       align_corners=False)
                confusion += confusion_matrix(logits.argmax(1), label.to(device), C, task.ignore_index)
    confusion = confusion.cpu()
    if world is not None:
        confusion = world.all_reduce_sum(confusion)
    per_class = iou_per_class(confusion)
    names = list(task.class_names) or [str(i) for i in range(C)]
    value = mean_iou(confusion)
    return {"eval": value,
            "per_class_iou": {name: (None if v is None else round(v, 4)) for name, v in zip(names, per_class)}}


def evaluate_for(task: "SegmentationTask", model: nn.Module, loader, device: str, ctx: "DataContext",
                 amp: bool = True, world: "World | None" = None) -> dict[str, Any]:
    """The segmentation kind's evaluation of a task: :func:`evaluate_segmentation` with the task's options."""
    return evaluate_segmentation(model, loader, device, task, task.options(ctx), amp, world)
