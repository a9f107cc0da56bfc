"""Cost accounting: parameter counts, forward FLOPs per image, peak memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters without the task head, the head's, and the model's total (shared tensors once)."""
    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    seen: set[int] = set()
    trainable = head_params = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in head_ids:
            head_params += p.numel()
        elif p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "head": head_params, "total": total}


def forward_flops(model: nn.Module, image_size: int, device: str | torch.device = "cpu") -> int | None:
    """FLOPs of one forward pass on one image (torch.utils.flop_counter; a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, 3, image_size, image_size, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        return int(counter.get_total_flops())
    except Exception:  # an op the counter cannot trace must not fail the trial
        return None
    finally:
        model.train(was_training)


class PeakMemory:
    """Peak memory during training: CUDA max allocated on a GPU, growth of the process RSS on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.base = 0
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self._rss()
        return self

    def sample(self) -> None:
        if not self.cuda:
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.sample()

    @staticmethod
    def _rss() -> int:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:  # pragma: no cover
            return 0

    def result(self) -> dict[str, Any]:
        kind = "cuda_max_allocated" if self.cuda else "cpu_rss_delta"
        value = self.peak if self.cuda else max(0, self.peak - self.base)
        return {"peak_memory_bytes": int(value), "peak_memory_kind": kind}
