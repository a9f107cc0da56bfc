"""A method's cost on a backbone (parameter counts, forward FLOPs), kept on disk once computed.

Counting builds the model (torch, timm, peft: seconds of imports before a count of well under a second), so the
answer is written to ``<cache dir>/costs/<method>-v<version>-<key>.json`` the first time and read from there after:
``harness ls methods --backbone ...`` then imports no torch. The key is everything the count depends on: the method's
name and ``version`` (a change to what it builds bumps it), the backbone spec (name, model args), the class count,
the hyperparameters, the image size, whether FLOPs were counted and the timm version. This module imports neither
torch nor :mod:`harness.cost`, which it calls only on a miss. (Tables need no count: each record carries its own.)
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.files import atomic_write_json


def cost_key(method: Any, backbone_spec: dict[str, Any], num_classes: int, hparams: dict[str, Any] | None,
             image_size: int | tuple[int, int] | None, flops: bool) -> dict[str, Any]:
    try:
        timm = metadata.version("timm")
    except metadata.PackageNotFoundError:  # pragma: no cover - timm is a dependency
        timm = None
    return {"method": method.name, "method_version": int(method.version),
            "backbone": {"name": backbone_spec.get("name"), "model_args": backbone_spec.get("model_args") or {}},
            "num_classes": int(num_classes), "hparams": {**method.defaults, **(hparams or {})},
            "image_size": image_size, "flops": bool(flops), "timm": timm}


def cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / "costs" / f"{key['method']}-v{key['method_version']}-{digest}.json"


def cached_cost(cache_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cost stored under ``key``, or None (never computed, or unreadable)."""
    path = cache_path(cache_dir, key)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored.get("cost") if isinstance(stored, dict) and stored.get("key") == json.loads(
        json.dumps(key, default=str)) else None


def method_cost_cached(method: Any, backbone_spec: dict[str, Any], num_classes: int, cache_dir: Path,
                       hparams: dict[str, Any] | None = None, image_size: int | None = None,
                       flops: bool = True) -> dict[str, Any]:
    """:func:`harness.cost.method_cost`, read from the cache when it was computed before, else computed (importing
    torch) and stored. A folder that cannot be written only loses the saving."""
    key = cost_key(method, backbone_spec, num_classes, hparams, image_size, flops)
    found = cached_cost(cache_dir, key)
    if found is not None:
        return found
    from harness.cost import method_cost

    counts = method_cost(method, backbone_spec, num_classes, hparams=hparams, image_size=image_size, flops=flops)
    try:
        atomic_write_json(cache_path(cache_dir, key), {"key": key, "cost": counts})
    except OSError:
        pass
    return counts
