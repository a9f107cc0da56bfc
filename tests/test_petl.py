"""The PETL baselines (issue 21 §2; docs/protocol.md §4.5): what each trains, exactly, on a tiny random ViT and on
ViT-B/16 against the published counts; then each written method's own mechanics (adapter placement, SSF's merge,
AdaLoRA's budget driven by the trial's steps).

Every registered method, these included, also goes through ``tests/test_methods.py``'s parametrized test: two SGD
steps change its trainable parameters and nothing else bit-for-bit, and its state dict round-trips into a fresh
build."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE
from records import FIXED
from test_methods import _batch, build

from harness.api import METHODS
from harness.cost import method_cost

D, DEPTH, HIDDEN, QKV = 32, 2, 128, 96  # the tiny ViT: embed 32, 2 blocks, MLP 4x, fused qkv 3d


def _trainable(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters outside the head, by name with the wrapper prefixes dropped, and their sizes."""
    names = {}
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("head."):
            name = name.removeprefix("backbone.").removeprefix("base_model.model.").replace(".default", "")
            names[name] = p.numel()
    return names


def _per_block(names: list[str]) -> set[str]:
    return {f"blocks.{i}.{n}" for i in range(DEPTH) for n in names}


#: method -> (the trainable set outside the head, its size): counted from the architecture, not from the code
EXPECTED = {
    # LoRA A (r x d), B (3d x r) and DoRA's magnitude (3d) on the fused qkv, rank 4
    "dora": (_per_block(["attn.qkv.lora_A.weight", "attn.qkv.lora_B.weight",
                         "attn.qkv.lora_magnitude_vector.weight"]), DEPTH * (4 * D + QKV * 4 + QKV)),
    # one vector on qkv's output (3d) and one on fc2's input (the MLP's hidden activations)
    "ia3": (_per_block(["attn.qkv.ia3_l", "mlp.fc2.ia3_l"]), DEPTH * (QKV + HIDDEN)),
    # b (out) and d (r = 256) per adapted layer; the random A, B are frozen buffers
    "vera": (_per_block(["attn.qkv.vera_lambda_b", "attn.qkv.vera_lambda_d"]), DEPTH * (QKV + 256)),
    # two rank-16 factorisations, 2 r (in + out) per layer
    "loha": (_per_block([f"attn.qkv.hada_w{i}_{ab}" for i in (1, 2) for ab in "ab"]), DEPTH * 2 * 16 * (D + QKV)),
    # 96 x 32 = (8 x 4) kron (12 x 8): rank 16 covers the second factor, so both are full
    "lokr": (_per_block(["attn.qkv.lokr_w1", "attn.qkv.lokr_w2"]), DEPTH * (8 * 4 + 12 * 8)),
    # one 32 x 32 block (in = 32) per layer: its 32 * 31 / 2 skew-symmetric entries, on qkv and attn.proj
    "oft": (_per_block(["attn.qkv.oft_R.weight", "attn.proj.oft_R.weight"]), DEPTH * 2 * (32 * 31 // 2)),
    # P (r x in), Q (out x r), E (r) at init_r 12 on qkv, proj, fc1, fc2
    "adalora": (_per_block([f"{m}.lora_{x}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
                            for x in "ABE"]),
                DEPTH * 12 * ((D + QKV + 1) + (D + D + 1) + (D + HIDDEN + 1) + (HIDDEN + D + 1))),
    # every bias: qkv, proj, fc1, fc2, norm1, norm2 per block; the patch embedding's and the final norm's
    "bitfit": (_per_block([f"{m}.bias" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1",
                                                   "norm2")]) | {"patch_embed.proj.bias", "norm.bias"},
               DEPTH * (QKV + D + HIDDEN + D + D + D) + D + D),
    # bottleneck 8: down (d x 8 + 8), up (8 x d + d)
    "adapter": (_per_block([f"mlp.adapter.{p}.{w}" for p in ("down", "up") for w in ("weight", "bias")]),
                DEPTH * (D * 8 + 8 + 8 * D + D)),
    "adaptformer": (_per_block([f"mlp.adapter.{p}.{w}" for p in ("down", "up") for w in ("weight", "bias")]),
                    DEPTH * (D * 64 + 64 + 64 * D + D)),
    # a scale and a shift after each linear, norm and the patch convolution
    "ssf": (_per_block([f"{m}.ssf_{s}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2")
                        for s in ("scale", "shift")])
            | {f"{m}.ssf_{s}" for m in ("patch_embed.proj", "norm") for s in ("scale", "shift")},
            DEPTH * 2 * (QKV + D + HIDDEN + D + D + D) + 2 * D + 2 * D),
}


def test_the_issue_lists_every_baseline_and_ls_groups_them():
    from harness.commands.ls import list_methods

    assert set(EXPECTED) <= set(METHODS.names())
    listing = list_methods("*").splitlines()
    rows = [line.split() for line in listing[2:]]
    petl = [row[0] for row in rows if row[1:3] == ["PETL", "baseline"]]
    assert set(EXPECTED) <= set(petl)
    assert {row[1] for row in rows[:6]} == {"headline"}  # the paper's six first, then the groups in order
    assert all(METHODS.static(n).get("group") for n in METHODS.names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_trains_exactly_its_parameters(name: str) -> None:
    _, model = build(name)
    names, count = EXPECTED[name]
    trainable = _trainable(model)
    assert set(trainable) == names
    assert sum(trainable.values()) == count
    assert all(p.requires_grad for p in model.head.parameters())


#: ViT-B/16 (d 768, 12 blocks), trainable outside the head: the architecture's count, and the published figure
#: (M, as printed: NOAH's and SSF's VTAB-1k tables) where one exists for the same placement
VIT_B = {
    "bitfit": (12 * (2304 + 768 + 3072 + 768 + 768 + 768) + 768 + 768, 0.10),
    "adapter": (12 * (768 * 8 + 8 + 8 * 768 + 768), 0.16),
    "ssf": (12 * 2 * (2304 + 768 + 3072 + 768 + 768 + 768) + 2 * 768 + 2 * 768, None),
    "dora": (12 * (4 * 768 + 2304 * 4 + 2304), None),
    "ia3": (12 * (2304 + 3072), None),
    "vera": (12 * (256 + 2304), None),
}


@pytest.mark.parametrize("name", sorted(VIT_B))
def test_counts_on_vit_b(name: str) -> None:
    exact, published = VIT_B[name]
    cost = method_cost(METHODS.get(name), {"name": "vit_base_patch16_224", "weights": None}, 100, flops=False)
    assert cost["trainable"] == exact
    if published is not None:
        assert round(cost["trainable"] / 1e6, 2) == published
    # AdaptFormer at NOAH's VTAB bottleneck (8) is NOAH's "0.16M" too
    if name == "adapter":
        at8 = method_cost(METHODS.get("adaptformer"), {"name": "vit_base_patch16_224", "weights": None}, 100,
                          hparams={"bottleneck": 8}, flops=False)
        assert at8["trainable"] == exact


def test_adapters_sit_after_or_beside_the_mlp() -> None:
    """Sequential: block MLP output y becomes y + up(gelu(down(y))); parallel: the MLP's input x feeds the branch,
    scaled by 0.1, added to the MLP's output."""
    images, _ = _batch()
    for name, parallel in (("adapter", False), ("adaptformer", True)):
        _, model = build(name)
        model.eval()
        mlp = model.backbone.blocks[0].mlp
        with torch.no_grad():
            torch.nn.init.normal_(mlp.adapter.up.weight)  # a non-zero branch, so its placement shows
            seen = {}
            handle = mlp.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
            handle2 = mlp.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
            model(images)
            handle.remove(), handle2.remove()
            x = seen["x"]
            plain = mlp.fc2(mlp.norm(mlp.act(mlp.fc1(x))))  # timm's Mlp without the adapter
            a = mlp.adapter
            if parallel:
                expected = plain + 0.1 * a.up(torch.relu(a.down(x)))
            else:
                expected = plain + a.up(torch.nn.functional.gelu(a.down(plain)))
        torch.testing.assert_close(seen["out"], expected)
        assert a.scale == (0.1 if parallel else 1.0)


def test_ssf_merges_into_the_weights() -> None:
    from methods.petl_layers import merge_ssf

    _, model = build("ssf")
    with torch.no_grad():  # trained-looking values
        for name, p in model.named_parameters():
            if "ssf_" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    images, _ = _batch()
    merged = merge_ssf(copy.deepcopy(model))
    assert not [n for n, _ in merged.named_parameters() if "ssf_" in n]
    assert sum(p.numel() for p in merged.backbone.parameters()) == sum(
        p.numel() for n, p in model.backbone.named_parameters() if "ssf_" not in n)
    with torch.no_grad():
        torch.testing.assert_close(merged(images), model(images), rtol=1e-4, atol=1e-4)


def test_adalora_budget_follows_the_trials_steps() -> None:
    """The rank budget is pruned from init_r 12 to target_r 8 per matrix on average within the steps the trial
    takes: after them, 8 x (8 matrices) singular values remain."""
    from harness.api import BuildContext

    method = METHODS.get("adalora")
    torch.manual_seed(0)
    from harness.backbone import build_backbone

    hp = {**method.defaults, "lr": 0.01, "weight_decay": 0.0, "deltaT": 1}
    ctx = BuildContext(hparams=hp, suite="test", cache_dir=Path("/nonexistent"), train_steps=20)
    model = method.build(build_backbone(TINY_BACKBONE), 5, ctx)
    config = model.backbone.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal) == (20, 2, 6)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for step in range(20):
        images, labels = _batch(step)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        model.after_optimizer_step(step)
    kept = sum(int(torch.count_nonzero(p)) for n, p in model.named_parameters() if "lora_E" in n)
    assert kept == 8 * DEPTH * 4


def test_adalora_refuses_a_schedule_without_a_budget_phase() -> None:
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="tinit_frac 0.6 \\+ tfinal_frac 0.5"):
        build("adalora", tinit_frac=0.6, tfinal_frac=0.5)


def test_a_trial_gives_adalora_its_step_count(fixed_suite, tmp_path, monkeypatch) -> None:
    """End to end: a one-epoch final trial on demo-digits (train800val200: 1,000 images, batch 100: 10 steps) builds
    AdaLoRA's schedule from the trial's own length, and the loop runs the rank allocation after every step."""
    from peft.tuners.adalora import AdaLoraModel

    from harness.cli import main
    from methods import peft_methods

    suite = fixed_suite(methods=["adalora"], tasks=["demo-digits"],
                        fixed={"adalora": {"*": {"lr": 0.01, "weight_decay": 0.0}}},
                        protocol={**FIXED["protocol"], "seeds": [42]})
    seen: dict[str, list] = {"steps": [], "allocated": []}
    config, allocate = peft_methods.AdaLoRA.config, AdaLoraModel.update_and_allocate

    def spy_config(self, hp, ctx):
        seen["steps"].append(ctx.train_steps)
        return config(self, hp, ctx)

    def spy_allocate(self, global_step):
        seen["allocated"].append(global_step)
        return allocate(self, global_step)

    monkeypatch.setattr(peft_methods.AdaLoRA, "config", spy_config)
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy_allocate)
    assert main(["run", "--suite", suite, "--no-progress", "--no-table"]) == 0
    assert seen == {"steps": [10], "allocated": list(range(10))}
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")]
    assert [r["status"] for r in records if "spec" in r] == ["ok"]


def test_declarations_load_without_torch() -> None:
    """The read-side commands load method declarations without torch (issue 23): the baselines' modules import
    torch and peft only inside ``build``."""
    import subprocess
    import sys

    code = ("import sys; from harness.api import METHODS; "
            f"[METHODS.get(n).grid for n in {sorted(EXPECTED)!r}]; print('torch' in sys.modules, 'peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_lycoris_module_dropout_acts_in_the_eval_mode_backbone() -> None:
    """LoHa's module dropout asks its own layer's mode, so with it set the adapted layer trains inside the otherwise
    eval-mode backbone; without it nothing of the backbone does."""
    from harness.loop import train_mode

    for dropout, expected in ((0.1, True), (0.0, False)):
        _, model = build("loha", module_dropout=dropout)
        train_mode(model)
        blocks = model.backbone.base_model.model.blocks
        assert blocks[0].attn.qkv.training is expected
        assert not blocks[0].attn.proj.training and not blocks[0].mlp.training
