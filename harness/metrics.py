"""Task metrics, by name: each takes the argmax predictions and labels of a whole split.

Segmentation's mIoU comes from a confusion matrix accumulated over the split (:func:`confusion_matrix`, summed
image by image), never from a mean of per-image IoUs: IoU_c = TP_c / (TP_c + FP_c + FN_c), pixels labelled
``ignore_index`` count for nothing, and a class with no pixel in either the labels or the predictions has no IoU
(it is left out of the mean, as mmsegmentation's nanmean does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: the label of pixels that count for nothing (VOC's object borders, Cityscapes' unused ids)
IGNORE_INDEX = 255


def top1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Top-1 accuracy in percent."""
    if labels.numel() == 0:
        return float("nan")
    return float((predictions == labels).float().mean().item() * 100.0)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """C x C counts (int64): row = true class, column = predicted class, over the pixels whose label is a class
    (``ignore_index`` and any other value outside [0, C) are skipped)."""
    labels = labels.reshape(-1).long()
    predictions = predictions.reshape(-1).long()
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    # skipped pixels are counted in one extra bin that is dropped: unlike a boolean index or bincount, nothing
    # here waits for a GPU to learn a size, so a split's matrices accumulate on the device
    cells = num_classes * num_classes
    index = torch.where(valid, labels * num_classes + predictions, cells)
    counts = torch.zeros(cells + 1, dtype=torch.int64, device=index.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:cells].reshape(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> list[float | None]:
    """IoU in percent per class from a confusion matrix; None for a class absent from labels and predictions."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return [float(t / u * 100.0) if u > 0 else None for t, u in zip(tp.tolist(), union.tolist())]


def mean_iou(confusion: torch.Tensor) -> float:
    """The mean of the defined per-class IoUs (percent); nan when no class is defined."""
    values = [v for v in iou_per_class(confusion) if v is not None]
    return sum(values) / len(values) if values else float("nan")


def miou(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """mIoU in percent of label maps (any shape), ``IGNORE_INDEX`` ignored."""
    return mean_iou(confusion_matrix(predictions, labels, num_classes))


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], float]] = {"top1": top1, "miou": miou}
