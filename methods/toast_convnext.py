"""TOAST on ConvNeXt (paper §4.4 "TOAST is adaptable to Convnets", Table 5; docs/protocol.md §3.12): what
:class:`methods.toast.ToastMethod` asks when its backbone is a timm ConvNeXt. The model is
:class:`methods.toast_convnext_model.TopDownConvNeXt` (imported where a model is built: this module stays free of
torch, so the method's declarations are read without it).

Supported: ``toast`` and the variants that keep its architecture (``toast-nopretune``, ``toast-notoken``,
``toast-nochannel``). The early/late feedback spans and TOAST-Lite's LoRA on linear feedback layers are defined
for the ViT only; those methods declare ``backbones = ("vit",)`` and are refused before the first trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.errors import HarnessError


def is_convnext(backbone: Any) -> bool:
    """Whether ``backbone`` is a timm ConvNeXt (the convolutional top-down module applies)."""
    from methods.toast_convnext_model import is_convnext as check

    return check(backbone)


def make_convnext_model(method: Any, backbone: Any, num_classes: int, hp: dict[str, Any]):
    """The convolutional top-down model for ``method`` (a :class:`methods.toast.ToastMethod`)."""
    from methods.toast_convnext_model import TopDownConvNeXt

    if method.backbones and "convnext" not in method.backbones:  # e.g. toast-lite, when built outside a run
        raise HarnessError(f"method {method.name} cannot run on a ConvNeXt backbone: it supports "
                           f"{', '.join(method.backbones)} backbones only")
    if method.feedback != "full":
        raise HarnessError(f"{method.name}: feedback '{method.feedback}' is defined for ViT backbones only; on a "
                           "ConvNeXt TOAST feeds back from the last stage into all four (toast)")
    return TopDownConvNeXt(backbone, num_classes, token_selection=method.token_selection,
                           frozen_eval=bool(hp["frozen_eval"]))


def read_convnext_checkpoint(path: str | Path):
    """A top-down checkpoint for the ConvNeXt module, its official backbone keys (``downsample_layers.i``,
    ``stages.i.j.dwconv/pwconv1/pwconv2``) renamed to timm's (:func:`methods.toast_convnext_model.official_to_timm`)
    so that ``pretuned_backbone: check|load`` compares and loads them. The top-down keys need no map."""
    from methods.toast_checkpoint import read_checkpoint
    from methods.toast_convnext_model import official_to_timm

    checkpoint = read_checkpoint(path)
    checkpoint.state = official_to_timm(checkpoint.state)
    return checkpoint
