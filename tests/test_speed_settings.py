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
