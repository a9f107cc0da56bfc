"""Issue 20's settings and bench columns: the dense bf16 peaks of known GPUs, achieved training TFLOP/s, and the
train.compile / train.fused_optimizer settings (accepted by the schema; fused only on CUDA)."""

from __future__ import annotations

import pytest


def test_known_gpus_have_a_dense_bf16_peak_and_others_none() -> None:
    from harness.cost import dense_bf16_peak_tflops, training_tflops

    assert dense_bf16_peak_tflops("NVIDIA H200") == 989.0
    assert dense_bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert dense_bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert dense_bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert dense_bf16_peak_tflops("Intel(R) Xeon(R) Processor") is None
    assert training_tflops(35.1e9, 2150) == pytest.approx(226.4, abs=0.1)  # the fine-tune figure
    assert training_tflops(None, 10.0) is None


def test_speed_settings_are_in_the_schema_and_fused_is_cuda_only(make_suite) -> None:
    from torch import nn

    from harness.api import METHODS
    from harness.sweep import load_suite
    from harness.train import make_optimizer

    suite = load_suite(str(make_suite(train={"epochs": 1, "batch_size": 100, "compile": False,
                                             "fused_optimizer": True, "decoded_cache": False})))
    assert suite.train["fused_optimizer"] is True
    model = nn.Linear(3, 2)
    optimizer = make_optimizer(METHODS.get("finetune"), model, 0.1, {"weight_decay": 0.0}, suite.train)
    assert not optimizer.defaults.get("fused")  # parameters on the CPU: not fused


def _host_reads_while(monkeypatch, run) -> int:
    """How many times the harness's code reads a tensor's value to the host (item, tolist, float, cpu) in ``run()``."""
    import sys

    import torch

    count = 0
    for name in ("item", "tolist", "__float__", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            nonlocal count
            count += "/harness/" in sys._getframe(1).f_code.co_filename  # the harness's own reads
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        run()
    finally:
        monkeypatch.undo()
    return count


def test_the_loop_reads_losses_and_predictions_once_per_epoch_not_per_batch(monkeypatch) -> None:
    """On a GPU every read of a loss or a prediction waits for the device; the training loop and the evaluation
    keep them on the device and read them once, so the reads do not grow with the number of batches, and the
    epoch's train_loss is still the image-weighted mean of the steps' losses."""
    import torch
    from torch import nn

    from harness.loop import cross_entropy, evaluate, fit

    def data(batches: int):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(batches * 5 - 2, 6, generator=g), torch.randint(0, 3, (batches * 5 - 2,), generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)

    def run_fit(batches: int, seen: list | None = None):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        ce = cross_entropy()

        def objective(m, images, labels):
            loss, logs = ce(m, images, labels)
            if seen is not None:
                seen.append((loss.detach().clone(), len(labels)))
            return loss, logs

        return fit(model, data(batches), torch.optim.SGD(model.parameters(), lr=0.1), epochs=1,
                   objective=objective, amp=False)

    assert _host_reads_while(monkeypatch, lambda: run_fit(2)) == _host_reads_while(monkeypatch, lambda: run_fit(8))
    seen: list = []
    result = run_fit(8, seen)
    assert len(seen) == 8
    expected = sum(float(loss) * n for loss, n in seen) / sum(n for _, n in seen)
    assert result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-12)

    model = nn.Linear(6, 3)
    reads = [_host_reads_while(monkeypatch, lambda b=b: evaluate(model, data(b), "cpu", "top1", 3, amp=False))
             for b in (2, 8)]
    assert reads[0] == reads[1]
