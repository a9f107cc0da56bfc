"""What a task's data looks like to a model: the DataContext of a suite or trial (where the data lives, image size,
the input normalisation and the task family's data settings), and the artifact resolver every consumer shares.

Normalisation (``data.normalize``; docs/protocol.md): ``backbone`` (default) takes mean/std from the backbone's own
timm pretrained config, so a checkpoint trained on 0.5/0.5 inputs is fed 0.5/0.5; ``imagenet`` and ``inception``
force those statistics, for replicating a paper that did otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import ARTIFACTS, DEFAULT_IMAGE_SIZE, ArtifactRequest, DataContext

if TYPE_CHECKING:  # pragma: no cover
    from harness.sweep import Suite

#: keys of ``data:`` that say where data lives, not what a trial computes (kept out of trial specs)
LOCATION_KEYS = ("root", "roots")


def data_identity(data: dict[str, Any]) -> dict[str, Any]:
    """A ``data:`` section (or a DataContext's ``settings``) without where the data lives (:data:`LOCATION_KEYS`):
    the part that belongs to a trial's (or an artifact's) identity. The one home of that rule; plug-ins reach it
    as ``harness.api.data_identity``."""
    return {k: v for k, v in data.items() if k not in LOCATION_KEYS}


def data_context(data: dict[str, Any], backbone: dict[str, Any], cache_dir: Path,
                 data_root: Path | None = None) -> DataContext:
    """The DataContext for a suite's ``data:`` settings (``roots`` may be among them) on ``backbone``."""
    from harness.backbone import input_normalization

    settings = {k: v for k, v in data.items() if k != "root"}
    image_size = int(settings.pop("image_size", DEFAULT_IMAGE_SIZE))
    mean, std, _source = input_normalization(backbone, str(settings.get("normalize", "backbone")))
    return DataContext(data_root=data_root, cache_dir=Path(cache_dir), image_size=image_size, settings=settings,
                       mean=tuple(mean), std=tuple(std))


def suite_data_context(suite: "Suite", cache_dir: Path) -> DataContext:
    """The data as the suite's trials see it (before any trial runs: data checks, pre-tuning, attention maps)."""
    return data_context(suite.data, suite.backbone, cache_dir, suite.data_root)


def artifact_resolver(*, suite: str, backbone: dict[str, Any], cache_dir: Path, method: str | None = None,
                      sections: dict[str, Any] | None = None, data: DataContext | None = None,
                      overrides: dict[str, Any] | None = None, data_root: Path | None = None,
                      **request: Any) -> Callable[[str], Path]:
    """``resolve(name) -> Path`` for ``artifact:<name>`` weights and a method's ``needs``: each provider gets the
    same request (the method, its suite sections, the data as trials see it), so a stage makes what a trial
    would look for. Extra keyword arguments (make, force, output, progress) go into the request."""

    def resolve(name: str) -> Path:
        provider = ARTIFACTS.get(name)
        found = provider(ArtifactRequest(name=name, suite=suite, cache_dir=Path(cache_dir), backbone=backbone,
                                         method=method, sections=dict(sections or {}), data=data,
                                         overrides=dict(overrides or {}), data_root=data_root, **request))
        return Path(os.path.expanduser(str(found)))

    return resolve


def check_backbone_spec(backbone: dict[str, Any]) -> None:
    """Refuse, before any trial, a backbone name timm does not know and a weights file that is not there."""
    import timm

    from harness.backbone import resolve_weights
    from harness.errors import UnknownNameError

    name = backbone["name"]
    if not timm.is_model(name):
        raise UnknownNameError("timm backbone", name, timm.list_models())
    weights = str(backbone.get("weights") or "")
    if not weights.startswith("artifact:"):
        resolve_weights(backbone, None)  # a missing local file is a HarnessError naming it
