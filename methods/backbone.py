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
        return timm.create_model(name, pretrained=True, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
    except RuntimeError as err:  # load_state_dict(strict=True) lists missing/unexpected keys
        text = str(err)
        if "Missing key" in text or "Unexpected key" in text or "size mismatch" in text:
            raise HarnessError(f"weights {weights} do not fit backbone '{name}': {_shorten(text)}") from None
        raise


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
