"""Task metrics, by name: each takes the argmax predictions and labels of a whole split."""

from __future__ import annotations

from collections.abc import Callable

import torch


def top1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Top-1 accuracy in percent."""
    if labels.numel() == 0:
        return float("nan")
    return float((predictions == labels).float().mean().item() * 100.0)


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], float]] = {"top1": top1}
