"""Cost accounting: parameter counts, forward FLOPs per image, peak memory, and a method's cost on a reference
backbone built without weights (``harness ls methods --backbone ...``).

Conventions (every record's ``params`` and ``cost``):

* ``params.trainable``: parameters with ``requires_grad`` outside the task head; ``params.head``: the head's
  (``model.head``); ``params.total``: every parameter of the model, shared tensors once. The paper's "# Params"
  corresponds to trainable + head (its linear probe is "0.2M", an FGVC-sized head).
* ``cost.forward_flops``: one forward pass on one image at the suite's image size, eval mode, counted by
  ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs); ViT-B/16 at 224 is 35.1 GFLOPs.
* ``cost.peak_memory_bytes``: CUDA max allocated during training on a GPU; on the CPU, the peak of the trial's own
  tensors over its first optimiser steps (``peak_memory_kind`` says which; :class:`PeakMemory`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from harness.api import DEFAULT_IMAGE_SIZE


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


def forward_flops(model: nn.Module, image_size: int | tuple[int, int],
                  device: str | torch.device = "cpu") -> int | None:
    """FLOPs of one forward pass on one image (torch.utils.flop_counter; a multiply-add counts as 2); the image is
    ``image_size`` square, or (height, width)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = torch.zeros(1, 3, height, width, device=device)
    try:
        # no_grad first (cheap); with autograd on as the fallback, because the counter's module tracker fails on a
        # no_grad view of a trainable parameter passed into a submodule (VPT's prompts into its dropout). Only
        # the forward pass is counted either way.
        for grad_mode in (torch.no_grad, torch.enable_grad):
            try:
                with grad_mode(), FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
                    model(x)
                return int(counter.get_total_flops())
            except Exception:  # noqa: BLE001 - an op the counter cannot trace must not fail the trial
                continue
        return None
    finally:
        from harness.loop import train_mode

        train_mode(model, was_training)


def _extra_flop_formulas() -> dict[Any, Any]:
    """Formulas torch's FLOP counter lacks. It knows SDPA's CUDA kernels only; on the CPU, attention runs as
    ``_scaled_dot_product_flash_attention_for_cpu`` and would count as 0 (1.4 of ViT-B/16's 35.1 GFLOPs)."""
    from torch.utils import flop_counter as fc

    formulas: dict[Any, Any] = {}
    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is not None:
        def sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query, key, value)

        formulas[forward] = sdpa_cpu
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if backward is not None:
        def sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)

        formulas[backward] = sdpa_cpu_backward
    return formulas


def reference_image_size(backbone: nn.Module, default: int = DEFAULT_IMAGE_SIZE) -> int:
    """The input size a timm backbone was built for (``patch_embed.img_size``, else its pretrained config)."""
    size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if size is None:
        size = (getattr(backbone, "pretrained_cfg", None) or {}).get("input_size", (3, default, default))[1:]
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size or default)


def method_cost(method: Any, backbone_spec: dict[str, Any], num_classes: int, hparams: dict[str, Any] | None = None,
                image_size: int | None = None, flops: bool = True) -> dict[str, Any]:
    """Parameter counts (and forward FLOPs per image) of ``method`` built on a backbone with random weights.

    The model is built for counting only (``BuildContext(random_init=True)``: no checkpoint is resolved, nothing is
    downloaded). It is built on the ``meta`` device first (no memory, no init time: ViT-B counts in well under a
    second); a method or backbone that cannot build or run there is built again on the CPU. Returns
    ``{"trainable", "head", "total", "flops", "device"}`` (``flops`` None when not asked for or not countable).
    """
    from harness.api import BuildContext
    from harness.store import default_cache_dir
    from harness.backbone import build_backbone

    spec = dict(backbone_spec)
    spec["weights"] = None
    hp = {**method.defaults, **(hparams or {})}

    def build() -> nn.Module:
        backbone = build_backbone(spec)
        ctx = BuildContext(hparams=hp, suite="", cache_dir=Path(default_cache_dir()), random_init=True)
        return method.build(backbone, num_classes, ctx)

    last_error: Exception | None = None
    for device in ("meta", "cpu"):
        try:
            with torch.device("meta") if device == "meta" else nullcontext():
                model = build()
            counts: dict[str, Any] = dict(parameter_counts(model))
            counts["flops"] = None
            if flops:
                size = image_size or _model_image_size(model)
                counts["flops"] = forward_flops(model, size, device)
                if counts["flops"] is None and device == "meta":
                    raise RuntimeError("forward pass not traceable on the meta device")
            counts["device"] = device
            return counts
        except Exception as err:  # noqa: BLE001 - try the CPU, then report the CPU's error
            last_error = err
    assert last_error is not None
    raise last_error


def _model_image_size(model: nn.Module) -> int:
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return reference_image_size(backbone)
    for module in model.modules():
        if hasattr(module, "patch_embed"):
            return reference_image_size(module)
    return DEFAULT_IMAGE_SIZE


class PeakMemory:
    """Peak memory of training, measured so that it does not depend on what the process ran before:

    * CUDA: the caching allocator's maximum allocated bytes over the training loop (exact);
    * CPU: the peak of the trial's own tensors (parameters, gradients, optimiser state, activations and
      temporaries) over its first ``TRACKED_STEPS`` optimiser steps (:class:`TensorPeak`); later steps repeat the same
      allocations. The process's
      resident memory, which records before 2026-12 held (``cpu_rss_delta``), grows with whatever ran earlier in the
      process and is not measured any more.

    The loop wraps each optimiser step in :meth:`step`; only the first ones are tracked, so a trial pays the
    dispatch mode's overhead twice.
    """

    #: optimiser steps tracked on the CPU: the first (optimiser state is created in it) and one in steady state
    TRACKED_STEPS = 2

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.peak = 0
        self.tracked = 0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def step(self, model: nn.Module, optimizer: Any) -> Any:
        """A context around one optimiser step: tracked while fewer than ``TRACKED_STEPS`` were (CPU only)."""
        if self.cuda or self.tracked >= self.TRACKED_STEPS:
            return nullcontext()
        self.tracked += 1
        return self._tracked_step(model, optimizer)

    @contextmanager
    def _tracked_step(self, model: nn.Module, optimizer: Any) -> Iterator[None]:
        tracker = TensorPeak()
        tracker.add_existing(model, optimizer)
        with tracker:
            yield
        self.peak = max(self.peak, tracker.peak)

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated(self.device)

    def result(self) -> dict[str, Any]:
        kind = "cuda_max_allocated" if self.cuda else "cpu_tensor_peak"
        return {"peak_memory_bytes": int(self.peak), "peak_memory_kind": kind}


class TensorPeak(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while the mode is on: the storages that exist when it starts
    (:meth:`add_existing`: a model's parameters, gradients and buffers, an optimiser's state) plus every storage an
    op creates inside it, each counted until it is freed. The CPU has no allocator statistics like CUDA's; torch's
    own ``MemTracker`` does this per module but cannot track a model with frozen parameters (it hooks every
    parameter's gradient). Views share their base's storage and count once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def add(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        weakref.finalize(storage, self._free, size)
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, size: int) -> None:
        self.live -= size

    def add_existing(self, model: nn.Module, optimizer: Any = None) -> None:
        for tensor in [*model.parameters(), *model.buffers()]:
            self.add(tensor)
            if tensor.grad is not None:
                self.add(tensor.grad)
        for state in (getattr(optimizer, "state", None) or {}).values():
            for value in state.values():
                self.add(value)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            self.add(leaf)
        return out


#: dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s of known GPUs, by a substring of
#: ``torch.cuda.get_device_name`` (first match wins; the datasheets' "with sparsity" figures halved): NVIDIA's H100
#: and H200 datasheets give 1,979 TFLOPS bf16 with sparsity for the SXM boards (989 dense), 1,513 for the H100 PCIe
#: (756), 1,671 for the NVL boards (835); the A100 datasheet 312 dense. Unknown devices have no peak ("–").
DENSE_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("GH200", 989.0), ("A100", 312.0),
)


def dense_bf16_peak_tflops(device_name: str | None) -> float | None:
    """The device's dense bf16 peak (TFLOP/s) from :data:`DENSE_BF16_PEAK_TFLOPS`, or None when not known."""
    for key, peak in DENSE_BF16_PEAK_TFLOPS:
        if device_name and key in device_name:
            return peak
    return None


def training_tflops(forward_flops: float | None, images_per_s: float | None) -> float | None:
    """Achieved training compute in TFLOP/s, counted as 3 x the forward FLOPs per image (forward + a backward of
    twice the forward, the usual convention; a method that trains little backpropagates less, so for it this is
    the compute a full fine-tune would need for the same images)."""
    if not forward_flops or not images_per_s:
        return None
    return 3.0 * forward_flops * images_per_s / 1e12
