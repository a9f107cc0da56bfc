"""Backbone construction: timm models by name, with weights from a local file, timm's own source, or an artifact.

A backbone spec (from a sweep's ``backbone:`` section or ``--backbone``/``--weights``) is a dict::

    name: vit_base_patch16_224        # any timm model name
    model_args: {drop_path_rate: 0.1} # passed to timm.create_model
    weights: null | timm | /path/to/file.{pth,safetensors,npz} | artifact:<name>

Local files go through timm's own loader (``pretrained_cfg_overlay=dict(file=...)``), the same path real
ImageNet weights take, so the demo's self-trained backbone exercises it too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.errors import HarnessError


#: timm model module -> backbone family (:attr:`harness.api.Method.backbones`); other modules are their own family
FAMILY_OF_MODULE = {"vision_transformer": "vit", "deit": "vit", "vision_transformer_hybrid": "vit-hybrid"}


def backbone_family(name: str) -> str:
    """The family of a timm model name (its architecture's module: ``vit`` for ViT and DeiT, ``convnext``, ...),
    from timm's registry without building the model."""
    import timm

    arch = str(name).split(".", 1)[0]
    if not timm.is_model(arch):
        return arch.split("_", 1)[0]
    module = timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
    return FAMILY_OF_MODULE.get(module, module)


def unsupported_backbone(method: Any, spec: dict[str, Any]) -> str | None:
    """One line saying that ``method`` (a :class:`harness.api.Method`) cannot run on the backbone ``spec``, or None
    when it can (its ``backbones`` is empty or names the backbone's family)."""
    supported = tuple(getattr(method, "backbones", ()) or ())
    if not supported:
        return None
    family = backbone_family(spec["name"])
    if family in supported:
        return None
    return (f"method {method.name} cannot run on backbone {spec['name']} ({family}): it supports "
            f"{', '.join(supported)} backbones only")


def resolve_weights(spec: dict[str, Any], resolve_artifact: Callable[[str], Path] | None) -> str | Path | None:
    """The weights entry as None, "timm", or an existing local path."""
    weights = spec.get("weights")
    if weights in (None, "", "none", "random"):
        return None
    if weights == "timm":
        return "timm"
    if isinstance(weights, str) and weights.startswith("artifact:"):
        if resolve_artifact is None:
            raise HarnessError(f"backbone weights '{weights}' need an artifact resolver")
        return resolve_artifact(weights.split(":", 1)[1])
    path = Path(os.path.expanduser(str(weights)))
    if not path.is_file():
        raise HarnessError(
            f"backbone weights file not found: {path} (expected a local .pth/.safetensors/.npz file, "
            "'timm' for timm's own download, or artifact:<name>)"
        )
    return path


def build_backbone(spec: dict[str, Any], resolve_artifact: Callable[[str], Path] | None = None):
    """A timm model with its classifier removed (``num_classes=0``): ``model(x)`` gives pooled features."""
    import timm

    name = spec["name"]
    if not timm.is_model(name):
        from harness.errors import UnknownNameError

        raise UnknownNameError("timm backbone", name, timm.list_models())
    weights = resolve_weights(spec, resolve_artifact)
    kwargs = dict(spec.get("model_args") or {})
    kwargs["num_classes"] = 0
    if weights is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights == "timm":
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except OSError as err:  # the hub's "not found / offline" errors are OSErrors
            raise HarnessError(f"cannot get timm's pretrained weights for '{name}' ({type(err).__name__}: "
                               f"{_shorten(str(err), 300)}); without network, pass --weights PATH") from None
    state = None if str(weights).endswith((".npz", ".npy")) else _read_state_dict(weights)
    try:
        # custom_load says whether timm hands the file to the model's own loader (JAX .npz for a ViT); a name's
        # default config may set it (augreg weights come as .npz), which timm < 1.0.31 applies to a .pth file too
        overlay = dict(file=str(weights), custom_load=str(weights).endswith(".npz"))
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as err:  # load_state_dict lists size mismatches (and missing/unexpected keys if strict)
        text = str(err)
        if "Missing key" in text or "Unexpected key" in text or "size mismatch" in text:
            raise HarnessError(f"weights {weights} do not fit backbone '{name}': {_shorten(text)}") from None
        raise
    if state is not None:
        _check_keys(model, state, name, weights)
    return model


def _read_state_dict(path: Path) -> dict[str, Any]:
    """The file's state dict as timm reads it (safetensors or torch; 'state_dict'/'model' nesting unwrapped)."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds for a file that is not a checkpoint
        raise HarnessError(f"cannot read backbone weights {path} ({type(err).__name__}: {_shorten(str(err), 300)}); "
                           "expected a .pth/.safetensors state dict") from None
    if not isinstance(state, dict):
        raise HarnessError(f"cannot read backbone weights {path}: expected a state dict, got {type(state).__name__}")
    return state


def _check_keys(model, state: dict[str, Any], name: str, path: Path) -> None:
    """timm loads local weights non-strictly when the classifier is dropped (``num_classes=0``), so a file with
    the wrong keys would silently leave random weights. Compare the keys the way timm loads them (after the model
    family's own checkpoint filter), ignoring the pretrained classifier."""
    import sys

    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(dict(state), model)
        except Exception:  # noqa: BLE001 - a filter that fails on odd keys: compare the raw keys instead
            pass
    classifiers = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    expected = set(model.state_dict())
    given = {k for k in state if not any(k.startswith(c + ".") for c in classifiers) or k in expected}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = [f"{len(keys)} {kind} key(s): {_list(keys)}" for kind, keys in
                 (("missing", missing), ("unexpected", unexpected)) if keys]
        raise HarnessError(f"weights {path} do not fit backbone '{name}': {'; '.join(parts)}")


def _list(keys: list[str], limit: int = 10) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _shorten(text: str, limit: int = 1500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


_FINGERPRINTS: dict[tuple[str, float, int], str] = {}


def file_fingerprint(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of a file, memoised by path, mtime and size."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime, stat.st_size)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return _FINGERPRINTS[key]


NORMALIZE_MODES = ("backbone", "imagenet", "inception")


def input_normalization(spec: dict[str, Any], mode: str = "backbone") -> tuple[tuple, tuple, str]:
    """(mean, std, where they come from) for a backbone spec under ``data.normalize`` (docs/protocol.md §2.2).

    ``backbone`` reads the statistics the checkpoint was trained with from timm's pretrained config of the model
    name (and tag), without building the model or downloading anything: ``vit_base_patch16_224.augreg_in1k`` was
    trained on 0.5/0.5 inputs, DeiT on ImageNet's. ``imagenet`` and ``inception`` force those statistics."""
    from harness.api import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD

    if mode == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD, "imagenet (data.normalize)"
    if mode == "inception":
        return INCEPTION_MEAN, INCEPTION_STD, "inception (data.normalize)"
    if mode != "backbone":
        raise HarnessError(f"data.normalize: expected one of {', '.join(NORMALIZE_MODES)}, got {mode!r}")
    from timm.models import get_pretrained_cfg

    name = str(spec["name"])
    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name or tag is reported where the backbone is built
        cfg = None
    if cfg is None or not getattr(cfg, "mean", None):
        return IMAGENET_MEAN, IMAGENET_STD, f"imagenet (timm has no pretrained config for {name})"
    return tuple(cfg.mean), tuple(cfg.std), f"backbone ({name}'s timm config)"
