"""Finding ``harness bench`` records (the JSON beside each run's CSV, :func:`harness.bench.write_record`) for
``harness table --columns step``: the newest one of a backbone's architecture. Reads JSON only (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: what marks a bench record (the JSON beside the CSV) among other files
RECORD_KIND = "harness-bench"


def architecture(backbone: str) -> str:
    """A timm name without its pretrained tag: bench times random weights, so ``deit_base_patch16_224.fb_in1k``
    and ``deit_base_patch16_224`` cost the same."""
    return backbone.split(".", 1)[0]


def latest_record(folder: Path, backbone: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest bench record in ``folder`` for ``backbone``'s architecture (None: there is none)."""
    newest: tuple[Path, dict[str, Any]] | None = None
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("kind") != RECORD_KIND:
            continue
        if architecture(str(data.get("backbone") or "")) != architecture(backbone):
            continue
        if newest is None or str(data.get("created_at")) > str(newest[1].get("created_at")):
            newest = (path, data)
    return newest
