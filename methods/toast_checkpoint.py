"""Reading and loading TOAST's top-down checkpoints (docs/protocol.md §3.6, §6.1).

Checkpoints (:func:`read_checkpoint`): the harness's own pre-tuned files (``{"model": ..., "harness": metadata}``),
the official pre-tuned ones (DeiT/AbSViT style ``{"model": ..., "args": argparse.Namespace, ...}`` or a plain state
dict) and the official trainer's per-task files (``{"model_state_dict": ...}`` with ``enc.`` and ``head.last_layer.``
prefixes; tuned on one downstream task and, in TOAST's final runs, saved at the best *test* epoch).
They are read with ``torch.load(weights_only=True)``; the only class allowed besides tensors and plain containers is
``argparse.Namespace`` (what the official files pickle). Anything else is refused with the type's name, never loaded
with ``weights_only=False``: a pickle from anywhere can run code.

A checkpoint brings the settings its weights were trained with (``v_bias_twice``: True for official files, the
recorded value for the harness's own); :func:`load_top_down` applies them and refuses a trial that contradicts them.
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
from torch import nn

from harness.errors import HarnessError
from methods.toast_model import TOP_DOWN_KEYS, TopDownViT


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
    # head.* is the file's task or pre-tuning head, except a backbone's own head keys (ConvNeXt's final norm)
    in_backbone = set(model.backbone.state_dict())
    ignored = sorted(k for k in state if k.startswith("head.") and k not in in_backbone)
    rest = {k: v for k, v in state.items() if not k.startswith(TOP_DOWN_KEYS) and k not in ignored}
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
