"""Task metrics, by name: each takes the argmax predictions and labels of a whole split."""

from __future__ import annotations

from collections.abc import Callable

import torch


def top1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Top-1 accuracy in percent."""
    if labels.numel() == 0:
        return float("nan")
    return float((predictions == labels).float().mean().item() * 100.0)


def mean_iou(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> float:
    """Mean intersection over union in percent over classes present in predictions or labels."""
    keep = labels != ignore_index
    pred, true = predictions[keep], labels[keep]
    ious = []
    for c in range(num_classes):
        union = ((pred == c) | (true == c)).sum().item()
        if union:
            ious.append(((pred == c) & (true == c)).sum().item() / union)
    return float(sum(ious) / len(ious) * 100.0) if ious else float("nan")


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], float]] = {"top1": top1, "miou": mean_iou}
