"""Cost accounting: parameter counts, forward FLOPs (attention on the CPU included), peak memory, the cost fields
of a trial record, the table's cost columns and ``harness ls methods --backbone``."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import TINY_BACKBONE
from torch import nn

from harness.api import METHODS, Method
from harness.cost import PeakMemory, forward_flops, method_cost, parameter_counts
from harness.backbone import build_backbone


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(48, 8)
        self.extra = nn.Linear(8, 8, bias=False)
        self.tied = nn.Linear(8, 8, bias=False)
        self.tied.weight = self.extra.weight  # shared: counted once
        self.head = nn.Linear(8, 3)
        self.body.requires_grad_(False)

    def forward(self, x):
        return self.head(self.tied(self.extra(self.body(x.flatten(1)))))


def test_parameter_counts_split_head_and_count_shared_tensors_once() -> None:
    model = _Toy()
    assert parameter_counts(model) == {"trainable": 64, "head": 27, "total": 48 * 8 + 8 + 64 + 27}
    model.head.requires_grad_(False)  # the head is the head whether or not it trains
    assert parameter_counts(model)["head"] == 27


def test_forward_flops_per_image() -> None:
    # 2 FLOPs per multiply-add, at batch 1: 2 * (48*8 + 8*8 + 8*8 + 8*3)
    assert forward_flops(_Toy(), image_size=4) == 2 * (48 * 8 + 8 * 8 + 8 * 8 + 8 * 3)


def test_forward_flops_count_attention_on_the_cpu() -> None:
    """torch's counter only knows SDPA's CUDA kernels; the CPU kernel must count the same as the unfused matmuls."""
    torch.manual_seed(0)
    fused = build_backbone(TINY_BACKBONE)
    unfused = build_backbone(TINY_BACKBONE)
    for block in unfused.blocks:
        block.attn.fused_attn = False
    assert fused.blocks[0].attn.fused_attn
    tokens, dim, depth, patches = 17, 32, 2, 16  # 32x32 image, patch 8, CLS + 16 patches
    patch_embed = 2 * patches * (3 * 8 * 8) * dim
    linears = 2 * tokens * dim * (3 * dim + dim + 4 * dim + 4 * dim)  # qkv, proj, fc1, fc2
    attention = 2 * (2 * tokens * tokens * dim)  # q @ k^T and attn @ v
    expected = patch_embed + depth * (linears + attention)
    assert forward_flops(unfused, 32) == expected
    assert forward_flops(fused, 32) == expected


def test_forward_flops_with_parameter_views_into_submodules() -> None:
    """A trainable parameter expanded under no_grad and passed into a submodule (VPT's prompts into its dropout)
    breaks the counter's module tracker; the count falls back to a forward with autograd on."""

    class Prompted(nn.Module):
        def __init__(self):
            super().__init__()
            self.prompt = nn.Parameter(torch.ones(1, 4))
            self.drop = nn.Dropout(0.1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.drop(self.prompt.expand(x.shape[0], -1)))

    assert forward_flops(Prompted(), 8) == 2 * 4 * 2


def test_peak_memory_on_cpu_is_the_peak_of_the_steps_own_tensors() -> None:
    """Two tracked steps of a 1024x1024 linear layer on a batch of 256 with SGD momentum: the peak holds the weight,
    its gradient and momentum (3 x 4 MiB) and at least one 1 MiB activation; an untracked third step changes nothing, and
    a 256 MiB tensor allocated outside the steps is not the trial's."""
    torch.manual_seed(0)
    model = nn.Linear(1024, 1024)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(256, 1024)
    unrelated = torch.ones(64, 1024, 1024)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    with PeakMemory("cpu") as memory:
        for _ in range(PeakMemory.TRACKED_STEPS + 1):
            with memory.step(model, optimizer):
                step()
    result = memory.result()
    weights = 1024 * 1025 * 4
    assert result["peak_memory_kind"] == "cpu_tensor_peak" and memory.tracked == PeakMemory.TRACKED_STEPS
    activation = 256 * 1024 * 4
    assert 3 * weights + activation <= result["peak_memory_bytes"] < 3 * weights + 4 * activation
    del unrelated


def test_a_trial_record_carries_its_cost_and_the_table_shows_it(make_suite, tmp_path) -> None:
    from harness.plan import Cell, final_specs, fixed_hparams
    from harness.store import Store
    from harness.sweep import load_suite
    from harness.table import build_table
    from harness.train import TrialEnv, run_trial

    # the fixed protocol (as FGVC): the table counts this final without a search before it
    suite = load_suite(str(make_suite(
        methods=["lora"], grids=None, fixed={"lora": {"*": {"lr": 0.5, "weight_decay": 0.0}}},
        protocol={"kind": "fixed", "final": {"train": "train800val200", "eval": "test"}, "seeds": [42]})))
    cell = Cell("lora", "demo-digits")
    spec = final_specs(suite, cell, fixed_hparams(suite, cell))[0]
    record = run_trial(spec, TrialEnv(cache_dir=tmp_path / "cache", progress=False))
    assert record["status"] == "ok", record.get("error")
    params, cost = record["params"], record["cost"]
    assert params == {"trainable": 2 * 4 * (32 + 96), "head": 33 * 10, "total": params["total"]}
    assert params["total"] > params["trainable"] + params["head"]
    assert cost["forward_flops"] > 0 and cost["train_images_per_s"] > 0 and cost["train_seconds"] > 0
    assert cost["peak_memory_kind"] == "cpu_tensor_peak" and cost["peak_memory_bytes"] > params["total"] * 4
    assert record["wall_time_s"] >= cost["train_seconds"]

    store = Store(tmp_path / "results")
    store.write(record)
    text = build_table(suite, store, tasks=["demo-digits"], extra=("params", "flops", "throughput", "memory"))
    header, _, row = text.splitlines()[:3]
    for column in ("# params (M)", "GFLOPs/img", "train img/s", "peak mem (MB)"):
        assert column in header
    assert "lora" in row and "0.001" in row  # 1,024 trainable parameters without the head, in M
    assert "# params (M)" in build_table(suite, store, tasks=["demo-digits"]).splitlines()[0]


def test_ls_methods_prints_counts_and_explains_failures(monkeypatch, capsys) -> None:
    from harness.commands import ls

    class Broken(Method):
        name = "broken-for-test"

        def build(self, backbone, num_classes, ctx):
            raise RuntimeError("no such thing")

    monkeypatch.setitem(METHODS._entries, "broken-for-test", Broken())
    args = argparse.Namespace(what="methods", pattern="[lb]*", backbone="vit_base_patch16_224", num_classes=100,
                              task=None, image_size=None, set=["prompt_length=100"], no_flops=False)
    assert ls.main(args) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in
            ("linear", "lora", "broken-for-test")}
    assert "0.147" in rows["lora"] and "0.077" in rows["lora"] and "35.18" in rows["lora"]
    assert "0.000" in rows["linear"] and "85.88" in rows["linear"] and "35.13" in rows["linear"]
    assert "cannot build: RuntimeError: no such thing" in rows["broken-for-test"]


def test_method_cost_falls_back_to_the_cpu() -> None:
    """A method that cannot build on the meta device is built for real on the CPU."""

    class NeedsRealTensors(Method):
        name = "real-only"
        defaults = {}

        def build(self, backbone, num_classes, ctx):
            assert ctx.random_init
            if next(backbone.parameters()).is_meta:
                raise RuntimeError("meta tensors hold no data")  # what a data-dependent init hits
            from methods.common_model import BackboneClassifier

            return BackboneClassifier(backbone, num_classes)

    cost = method_cost(NeedsRealTensors(), TINY_BACKBONE, 10)
    assert cost["device"] == "cpu" and cost["head"] == 330 and cost["flops"] > 0


@pytest.mark.parametrize("bad", ["no_such_backbone"])
def test_ls_methods_rejects_an_unknown_backbone(bad: str) -> None:
    from harness.commands import ls
    from harness.errors import HarnessError

    args = argparse.Namespace(what="methods", pattern="*", backbone=bad, num_classes=100, task=None,
                              image_size=None, set=[], no_flops=True)
    with pytest.raises(HarnessError, match="unknown timm backbone"):
        ls.main(args)


FRESH_TRIAL = """
import json, sys
import torch
from harness.plan import Cell, final_specs, fixed_hparams
from harness.sweep import load_suite
from harness.train import TrialEnv, run_trial
torch.set_num_threads(1)
suite = load_suite(sys.argv[1])
cell = Cell(sys.argv[2], "demo-digits")
spec = final_specs(suite, cell, fixed_hparams(suite, cell))[0]
record = run_trial(spec, TrialEnv(cache_dir=sys.argv[3], progress=False))
print(json.dumps({"cost": record["cost"], "curve": record["curve"], "execution": record["provenance"]["execution"]}))
"""


def test_cpu_peak_memory_is_the_same_in_a_fresh_process_and_after_other_trials(make_suite, session_cache,
                                                                                 monkeypatch):
    """The nightly compares peak memory between a baseline and tonight, whose trials may run in one process or each
    in a fresh job: the same finetune trial measured in a fresh process and here after two other trials must give
    the same figure (regress's memory rule: within its floor and --cost-tol). Tracking the steps' tensors must not
    change what the trial computes: the curve is the untracked run's, bit for bit."""
    import json
    import subprocess
    import sys

    from harness import cost
    from harness.plan import Cell, final_specs, fixed_hparams
    from harness.cost_context import MEMORY_FLOOR
    from harness.regress import COST_TOL
    from harness.sweep import load_suite
    from harness.train import TrialEnv, run_trial

    fixed = {m: {"*": {"lr": 0.1, "weight_decay": 0.0}} for m in ("finetune", "lora", "linear")}
    path = str(make_suite(methods=["finetune", "lora", "linear"], grids=None, fixed=fixed,
                          protocol={"kind": "fixed", "final": {"train": "train800val200", "eval": "test"},
                                    "seeds": [42]}))
    suite = load_suite(path)
    env = TrialEnv(cache_dir=session_cache, progress=False)

    def trial(method: str) -> dict:
        cell = Cell(method, "demo-digits")
        return run_trial(final_specs(suite, cell, fixed_hparams(suite, cell))[0], env)

    trial("lora"), trial("linear")
    shared = trial("finetune")
    fresh = json.loads(subprocess.run([sys.executable, "-c", FRESH_TRIAL, path, "finetune", str(session_cache)],
                                      capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    assert shared["provenance"]["execution"]["shared_process"] and not fresh["execution"]["shared_process"]
    ours, theirs = shared["cost"]["peak_memory_bytes"], fresh["cost"]["peak_memory_bytes"]
    assert shared["cost"]["peak_memory_kind"] == fresh["cost"]["peak_memory_kind"] == "cpu_tensor_peak"
    assert ours > 0 and abs(ours - theirs) <= min(MEMORY_FLOOR, COST_TOL * theirs), (ours, theirs)
    monkeypatch.setattr(cost.PeakMemory, "TRACKED_STEPS", 0)
    untracked = trial("finetune")
    assert untracked["cost"]["peak_memory_bytes"] == 0 and untracked["curve"] == shared["curve"] == fresh["curve"]
