"""Every registered method, timm-style: one parametrized test over ``METHODS.names()`` on a tiny ViT, so methods
added later (TOAST variants, ...) are covered without touching this file. Then VPT's and LoRA's own mechanics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BACKBONE
from torch import nn

from harness.api import METHODS, TASKS, BuildContext, Task
from harness.cost import forward_flops, parameter_counts
from harness.errors import HarnessError
from harness.train import trainable_state
from harness.backbone import build_backbone
from harness.loop import train_mode

NUM_CLASSES = 5
IMAGE_SIZE = TINY_BACKBONE["model_args"]["img_size"]


def build(name: str, seed: int = 0, backbone: dict[str, Any] | None = None, task: str = "demo-digits",
          **hparams: Any) -> tuple[Any, nn.Module]:
    """Method ``name`` on a tiny random ViT, with its defaults for ``task``. Methods that need artifacts (a
    pre-tuned checkpoint) build with ``random_init=True``, the interface's count-only mode, since a test must not
    pre-tune."""
    method = METHODS.get(name)
    torch.manual_seed(seed)
    hp = {**method.defaults_for(TASKS.get(task)), "lr": 0.1, "weight_decay": 0.0, **hparams}
    ctx = BuildContext(hparams=hp, suite="test", cache_dir=Path("/nonexistent-cache"), random_init=bool(method.needs))
    return method, method.build(build_backbone(backbone or TINY_BACKBONE), NUM_CLASSES, ctx)


def _batch(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_trains_exactly_its_trainable_parameters(name: str) -> None:
    method, model = build(name)

    # the interface: a head module that trains, something trainable, less than everything (but for full tuning)
    assert isinstance(getattr(model, "head", None), nn.Module), f"{name}: model has no `head` module"
    assert all(p.requires_grad for p in model.head.parameters()), f"{name}: the head must train"
    counts = parameter_counts(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == counts["trainable"] + counts["head"]
    assert n_trainable > 0
    if method.family == "full":
        assert n_trainable == counts["total"]
    else:
        assert n_trainable < counts["total"], f"{name}: everything trains, but family is {method.family!r}"
    assert (forward_flops(model, IMAGE_SIZE) or 0) > 0, f"{name}: forward FLOPs not countable"

    # SGD steps update every trainable parameter and leave every frozen tensor (parameters and buffers)
    # bit-identical. Two steps, not one: LoRA's B starts at zero (loralib and peft alike), so A's first gradient is
    # exactly 0. "Updated" is checked on the gradient (nonzero at some step): a value check alone fails on updates
    # below float32 resolution (TOAST-Lite's lowest decoder LoRA A gets ~1e-9 at step 2 on this tiny random ViT).
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    got_gradient: set[str] = set()
    train_mode(model)
    for step in range(2):
        images, labels = _batch(step)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        got_gradient |= {n for n, p in params.items() if p.grad is not None and torch.count_nonzero(p.grad) > 0}
        optimizer.step()
    model.eval()  # switching modes must not touch weights (loralib merges LoRA into W on eval(); peft must not)
    train_mode(model)
    after = model.state_dict()
    assert set(trainable) <= set(after), f"{name}: trainable parameters missing from state_dict"
    no_gradient = sorted(k for k in trainable if k in params and k not in got_gradient)
    assert not no_gradient, f"{name}: trainable but never reached by the loss's gradient: {no_gradient}"
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed, f"{name}: two SGD steps changed nothing"
    moved = sorted(changed - trainable)
    assert not moved, f"{name}: frozen tensors changed: {moved}"

    # state_dict round-trips into a fresh build (other seed); the trainable state alone (what checkpoints and
    # --keep-weights save) restores the model onto a fresh build with the same frozen weights
    _, fresh = build(name, seed=1)
    fresh.load_state_dict(model.state_dict())
    images, _ = _batch(7)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(fresh(images), expected, rtol=0, atol=0)
        _, same_frozen = build(name, seed=0)
        result = same_frozen.load_state_dict(trainable_state(model), strict=False)
        assert not result.unexpected_keys
        assert set(result.missing_keys).isdisjoint(trainable)
        torch.testing.assert_close(same_frozen.eval()(images), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------ VPT
def _record_blocks(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    handles = []
    for block in model.backbone.blocks:
        handles.append(block.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().clone())))
        handles.append(block.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone())))
    return inputs, outputs, handles


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_vpt_deep_replaces_prompts_before_every_block(reg_tokens: int) -> None:
    """Hooks on the block inputs: before block i >= 1 the prompt slots hold the learned prompts of layer i (not the
    previous block's prompt outputs); prefix tokens (CLS, registers) and patches are carried over untouched."""
    spec = {**TINY_BACKBONE, "model_args": {**TINY_BACKBONE["model_args"], "depth": 3, "reg_tokens": reg_tokens}}
    _, model = build("vpt-deep", backbone=spec, prompt_length=3)
    n, p = 1 + reg_tokens, 3
    assert model.num_prefix_tokens == n
    assert model.deep_prompt_embeddings.shape == (2, p, 32)
    inputs, outputs, handles = _record_blocks(model)
    images, _ = _batch()
    model.eval()  # no prompt dropout: the inserted prompts are exactly the parameters
    with torch.no_grad():
        logits = model(images)
    for h in handles:
        h.remove()

    assert len(inputs) == 3 and inputs[0].shape[1] == n + p + 16  # 32x32 image, patch 8: 16 patches
    torch.testing.assert_close(inputs[0][:, n:n + p], model.prompt_embeddings.expand(8, -1, -1), rtol=0, atol=0)
    for i in (1, 2):
        learned = model.deep_prompt_embeddings[i - 1].expand(8, -1, -1)
        torch.testing.assert_close(inputs[i][:, n:n + p], learned, rtol=0, atol=0)
        assert not torch.allclose(outputs[i - 1][:, n:n + p], learned)  # so the replacement is visible
        torch.testing.assert_close(inputs[i][:, :n], outputs[i - 1][:, :n], rtol=0, atol=0)
        torch.testing.assert_close(inputs[i][:, n + p:], outputs[i - 1][:, n + p:], rtol=0, atol=0)
    # the head reads the CLS token after the final norm
    with torch.no_grad():
        expected = model.head(model.backbone.norm(outputs[-1])[:, 0])
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_vpt_shallow_inserts_prompts_once_and_vpt_init() -> None:
    _, model = build("vpt-shallow", prompt_length=4)
    assert not hasattr(model, "deep_prompt_embeddings")
    inputs, outputs, handles = _record_blocks(model)
    model.eval()
    with torch.no_grad():
        model(_batch()[0])
    for h in handles:
        h.remove()
    torch.testing.assert_close(inputs[0][:, 1:5], model.prompt_embeddings.expand(8, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(inputs[1], outputs[0], rtol=0, atol=0)  # carried over, not replaced

    # init: uniform in +-sqrt(6 / (3 * patch * patch + d)) with the backbone's patch size (8 here, d = 32)
    bound = math.sqrt(6 / (3 * 8 * 8 + 32))
    _, deep = build("vpt-deep", prompt_length=50)
    values = torch.cat([deep.prompt_embeddings.flatten(), deep.deep_prompt_embeddings.flatten()])
    assert values.abs().max() <= bound and values.abs().max() > 0.95 * bound

    # the frozen backbone stays in eval mode while training; the prompt dropout trains (0.1 deep, 0 shallow)
    train_mode(deep)
    assert not any(m.training for m in deep.backbone.modules()) and deep.prompt_dropout.training
    assert deep.prompt_dropout.p == 0.1 and model.prompt_dropout.p == 0.0


class _FakeTask(Task):
    """A task known only by name and family (VPT's prompt-length defaults read nothing else)."""

    def __init__(self, name: str, family: str):
        self.name, self.family = name, family

    def dataset(self, split, ctx, train):
        raise AssertionError("prompt-length defaults must not read data")


@pytest.mark.parametrize("task_name,family,expected", [
    ("vtab-cifar", "vtab", 10), ("vtab-clevr_dist", "vtab", 200), ("vtab-smallnorb_azi", "vtab", 200),
    ("vtab-oxford_flowers102", "vtab", 1), ("vtab-sun397", "vtab", 5), ("vtab-something_new", "vtab", 10),
    ("fgvc-cub", "fgvc", 100), ("demo-digits", "demo", 10),
])
def test_vpt_prompt_length_defaults(task_name: str, family: str, expected: int) -> None:
    for name in ("vpt-deep", "vpt-shallow"):
        assert METHODS.get(name).defaults_for(_FakeTask(task_name, family))["prompt_length"] == expected


def test_every_registered_vtab_task_has_its_prompt_length() -> None:
    from methods.vpt import vtab_folder

    vtab = [n for n in TASKS.names() if n.startswith("vtab")]
    if not vtab:
        pytest.skip("no VTAB task registered in this checkout")
    assert [n for n in vtab if vtab_folder(n) is None] == []


def test_vpt_prompt_length_from_the_sweep() -> None:
    from harness.plan import grid_points
    from harness.sweep import load_suite

    suite = load_suite("demo")
    points = grid_points(METHODS.get("vpt-deep"), TASKS.get("demo-digits"), suite)
    from_sweep = suite.settings_for("vpt-deep", "demo-digits")["prompt_length"]
    assert from_sweep != METHODS.get("vpt-deep").defaults_for(TASKS.get("demo-digits"))["prompt_length"]
    dropout = suite.settings_for("vpt-deep", "demo-digits")["prompt_dropout"]
    assert dropout != METHODS.get("vpt-deep").defaults_for(TASKS.get("demo-digits"))["prompt_dropout"]
    assert points and all(p["prompt_length"] == from_sweep and p["prompt_dropout"] == dropout for p in points)
    assert {(p["lr"], p["weight_decay"]) for p in points} == {
        (lr, wd) for lr in suite.grid_for("vpt-deep")["lr"] for wd in suite.grid_for("vpt-deep")["weight_decay"]}
    vpt = METHODS.get("vpt-deep")
    assert vpt.optimizer == "sgd" and len(vpt.grid["lr"]) == 10 and vpt.grid["weight_decay"] == [0.01, 0.001,
                                                                                                  0.0001, 0.0]


# ----------------------------------------------------------------------------------------------------------- LoRA
def test_lora_default_is_the_toast_baseline() -> None:
    from peft.tuners.lora import LoraLayer

    _, model = build("lora")
    layers = {n: m for n, m in model.backbone.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]  # the fused qkv of every block, only
    for layer in layers.values():
        assert layer.r["default"] == 4 and layer.scaling["default"] == 0.25  # loralib: alpha 1 / r 4
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    assert parameter_counts(model)["trainable"] == 2 * 4 * (32 + 96)


def test_lora_settings_and_errors() -> None:
    from peft.tuners.lora import LoraLayer

    _, model = build("lora", rank=2, alpha=2, target_modules="qkv, proj")  # a comma string, as from --set
    layers = {n: m for n, m in model.backbone.named_modules() if isinstance(m, LoraLayer)}
    # peft matches on the name's last component: "proj" is attn.proj and also patch_embed.proj (a Conv2d)
    assert set(layers) == {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv",
                           "blocks.1.attn.proj"}
    assert all(m.r["default"] == 2 and m.scaling["default"] == 1.0 for m in layers.values())
    with pytest.raises(HarnessError, match="target"):
        build("lora", target_modules=["no_such_layer"])
    with pytest.raises(HarnessError, match="empty"):
        build("lora", target_modules="")


@pytest.mark.parametrize(("choice", "weight_decay", "expected"), [
    ("paper", 0.001, (torch.optim.AdamW, 0.001)),
    ("paper", 0.0, (torch.optim.AdamW, 0.0)),
    ("official", 0.001, (torch.optim.AdamW, 0.01)),  # the official AdamW forces 0.01 whenever decay > 0
    ("official", 0.0, (torch.optim.SGD, 0.0)),  # ... and falls back to SGD (momentum 0.9) when it is 0
])
def test_finetune_optimizer_setting(choice: str, weight_decay: float, expected: tuple[type, float]) -> None:
    from harness.train import make_optimizer

    hparams = {"lr": 0.01, "weight_decay": weight_decay, "optimizer": choice}
    method, model = build("finetune", **hparams)
    optimizer = make_optimizer(method, model, 0.01, hparams)
    kind, decay = expected
    assert type(optimizer) is kind
    decayed = optimizer.param_groups[0]
    assert decayed["weight_decay"] == decay
    assert all(p.ndim > 1 for p in decayed["params"])  # biases and norms never decay
    if kind is torch.optim.SGD:
        assert decayed["momentum"] == 0.9


def test_finetune_optimizer_typo_is_refused_before_anything_runs(make_suite) -> None:
    from harness.sweep import load_suite

    path = make_suite(settings={"finetune": {"optimizer": "oficial"}})
    with pytest.raises(HarnessError, match=r"settings\.finetune\.optimizer: expected one of paper, official, got "
                                           r"'oficial'"):
        load_suite(str(path))
    assert load_suite(str(make_suite(settings={"finetune": {"optimizer": "official"}}))).methods


def test_method_files_import_each_other_one_way():
    """No import cycle among methods/ (TOAST's methods use its pre-tuning stage; the stage never imports them)."""
    from test_imports import imported_modules, reachable, sources

    graph = {f"methods.{p.stem}": {m for _, m in imported_modules(p) if m.startswith("methods.")}
             for p in sources("methods") if p.stem != "__init__"}
    assert not [m for m in graph if m in reachable(graph, m)], "import cycle among methods/"
    assert "methods.toast" not in reachable(graph, "methods.toast_pretune")
