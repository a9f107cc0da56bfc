"""The paper's other backbones (issue 21 §1): TOAST's convolutional top-down module on a timm ConvNeXt, LoRA on the
ConvNeXt blocks' pointwise linears, the backbone-family refusal, ViT-L, and the fgvc-convnext / fgvc-vitl suites. All
on tiny random-weight configurations (nothing downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.api import METHODS, BuildContext
from harness.backbone import backbone_family, build_backbone, unsupported_backbone
from harness.commands.run import backbone_problems
from harness.errors import HarnessError
from conftest import TINY_BACKBONE, TINY_PRETUNE

#: timm's ConvNeXt (convnext_base's layout: linear pointwise layers, norm after the pooling) at toy widths, 32x32
TINY_CONVNEXT = {"name": "convnext_tiny", "model_args": {"depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32]},
                 "weights": None}
#: ViT-L/16's layout (timm's vit_large_patch16_224 name and family) shrunk to 32x32 inputs
TINY_VITL = {"name": "vit_large_patch16_224", "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                                             "depth": 2, "num_heads": 2}, "weights": None}


def backbone(spec=TINY_CONVNEXT, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(spec).eval()


def build(name: str, spec=TINY_CONVNEXT, num_classes: int = 5, **hparams):
    ctx = BuildContext(hparams=hparams, suite="test", cache_dir=Path("."), random_init=True)
    return METHODS.get(name).build(backbone(spec), num_classes, ctx)


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    from harness.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------- TOAST
def test_toast_on_convnext_has_the_official_module_and_shapes():
    from methods.toast_convnext_model import TopDownConvNeXt

    model = build("toast")
    assert isinstance(model, TopDownConvNeXt)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert shapes == {"prompt": (32,), "top_down_transform": (32, 32), "head.weight": (5, 32), "head.bias": (5,),
                      # transposed convs: in x out x k x k (kernel = stride: 4 into the image, 2 between stages)
                      "decoders.0.linear.weight": (8, 3, 4, 4), "decoders.0.linear2.weight": (3, 3, 1, 1),
                      "decoders.1.linear.weight": (16, 8, 2, 2), "decoders.1.linear2.weight": (8, 8, 1, 1),
                      "decoders.2.linear.weight": (24, 16, 2, 2), "decoders.2.linear2.weight": (16, 16, 1, 1),
                      "decoders.3.linear.weight": (32, 24, 2, 2), "decoders.3.linear2.weight": (24, 24, 1, 1)}
    out = model.forward_detailed(images(), var_loss=True)
    assert model(images()).shape == (4, 5) and out.features.shape == (4, 32)
    assert out.var_loss is not None and out.var_loss.item() > 0
    # the first pass is timm's own ConvNeXt forward (stem + stages, pooled through the head norm)
    assert torch.allclose(out.first_features, model.backbone(images()), atol=1e-6)


def test_zero_feedback_gives_the_frozen_backbone_features_exactly():
    model = build("toast")
    with torch.no_grad():
        for decoder in model.decoders:
            decoder.linear2.weight.zero_()
    assert torch.equal(model.forward_detailed(images()).features, model.backbone(images()))


def test_the_cached_first_pass_gives_the_same_logits():
    model = build("toast").eval()
    with torch.no_grad():
        assert torch.allclose(model.from_frozen(*model.frozen_forward(images())), model(images()), atol=1e-6)


def test_the_selection_map_is_the_attention_panel():
    maps = build("toast").attention_maps(torch.randn(2, 3, 64, 64))
    assert list(maps) == ["token selection (cos with ξ)"] and maps["token selection (cos with ξ)"].shape == (2, 2, 2)


def test_signal_i_is_added_to_stage_is_input():
    model = build("toast")
    inputs, outputs = {}, {}
    model.backbone.stem.register_forward_pre_hook(lambda m, a: inputs.setdefault(0, []).append(a[0]))
    model.backbone.stages[2].register_forward_pre_hook(lambda m, a: inputs.setdefault(2, []).append(a[0]))
    model.backbone.stages[1].register_forward_hook(lambda m, a, out: outputs.setdefault(1, []).append(out))
    x = images()
    with torch.no_grad():
        td = model.feedback(model.select(model.first_pass(x))[0])
        model.second_pass(x, td)
    assert torch.equal(inputs[0][-1], x + td[0])  # signal 0: onto the image, before the stem
    assert torch.equal(inputs[2][-1], outputs[1][-1] + td[2])  # signal 2: onto stage 1's output


@pytest.mark.parametrize("name", ["toast", "toast-notoken", "toast-nochannel"])
def test_gradient_reaches_exactly_the_trainable_set_and_the_backbone_stays_bit_identical(name):
    model = build(name)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoders = {n for n, _ in model.named_parameters() if n.startswith("decoders.")}
    expected = {"head.weight", "head.bias"}
    expected |= set() if name == "toast-notoken" else {"prompt"}
    expected |= set() if name == "toast-nochannel" else decoders | {"top_down_transform"}
    assert trainable == expected
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    F.cross_entropy(model(images()), torch.tensor([0, 1, 2, 3])).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if n in trainable else p.grad is None, n
    optimizer.step()
    assert all(torch.equal(frozen[k], v) for k, v in model.backbone.state_dict().items())


def test_official_convnext_checkpoint_keys_load_with_their_semantics(tmp_path):
    """An official ConvNeXt top-down file (``state_dict["model"]``, Facebook's backbone names) loads: its top-down
    tensors as they are, its backbone keys compared (``check``) or loaded (``load``) under timm's names."""
    from methods.toast_checkpoint import load_top_down
    from methods.toast_convnext import read_convnext_checkpoint
    from methods.toast_convnext_model import official_backbone_key

    source = build("toast")
    timm_to_official = {}
    for key in source.backbone.state_dict():
        parts = key.split(".")
        if parts[0] == "stem":
            official = "downsample_layers.0." + ".".join(parts[1:])
        elif parts[0] == "head":
            official = "norm." + parts[-1]
        elif parts[2] == "downsample":
            official = ".".join(["downsample_layers", parts[1], *parts[3:]])
        else:
            block = {"conv_dw": "dwconv", "mlp": "pwconv1" if parts[-2] == "fc1" else "pwconv2"}.get(parts[4], parts[4])
            official = ".".join(["stages", parts[1], parts[3], block, *parts[5 + (parts[4] == "mlp"):]])
        assert official_backbone_key(official) == key
        timm_to_official[key] = official
    state = {timm_to_official[k]: v for k, v in source.backbone.state_dict().items()}
    state.update({k: v for k, v in source.state_dict().items() if k.startswith(("prompt", "top_down", "decoders."))})
    state["head.weight"] = torch.zeros(1000, 32)  # the official ImageNet classifier: ignored
    path = tmp_path / "convnext_top_down_base.pth"
    torch.save({"model": state}, path)

    target = build("toast")  # same backbone seed: `check` passes
    report = load_top_down(target, read_convnext_checkpoint(path), "check")
    assert torch.equal(target.decoders[3].linear.weight, source.decoders[3].linear.weight)
    assert torch.equal(target.prompt, source.prompt) and "match" in report.backbone
    other = build("toast")
    with torch.no_grad():
        other.backbone.stages[1].blocks[0].mlp.fc1.weight.add_(1.0)
    with pytest.raises(HarnessError, match="pre-tuned on other backbone weights"):
        load_top_down(other, read_convnext_checkpoint(path), "check")
    load_top_down(other, read_convnext_checkpoint(path), "load")
    assert torch.equal(other.backbone.stages[1].blocks[0].mlp.fc1.weight,
                       source.backbone.stages[1].blocks[0].mlp.fc1.weight)
    # the official final norm (`norm`) is the backbone's head.norm: compared too, the classifier is not
    with torch.no_grad():
        other.backbone.head.norm.weight.add_(1.0)
    with pytest.raises(HarnessError, match="head.norm.weight"):
        load_top_down(other, read_convnext_checkpoint(path), "check")


# ---------------------------------------------------------------------------------------------------- LoRA, family
def test_lora_on_convnext_trains_only_the_pointwise_adapters():
    model = build("lora", target_modules=["mlp.fc1", "mlp.fc2"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".mlp.fc" in n for n in trainable - {"head.weight", "head.bias"})
    assert {"head.weight", "head.bias"} <= trainable
    assert sum(".lora_A" in n for n in trainable) == 2 * 5  # fc1 and fc2 of the 5 blocks
    model.train()
    F.cross_entropy(model(images()), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_backbone_families_and_what_each_method_supports():
    assert backbone_family("convnext_base.fb_in1k") == "convnext"
    assert backbone_family("vit_large_patch16_224.orig_in21k") == backbone_family("deit_base_patch16_224") == "vit"
    spec = {"name": "convnext_base.fb_in1k"}
    line = unsupported_backbone(METHODS.get("vpt-deep"), spec)
    assert line == ("method vpt-deep cannot run on backbone convnext_base.fb_in1k (convnext): it supports vit "
                    "backbones only")
    for name in ("toast-lite", "toast-early", "toast-late", "vpt-shallow"):
        assert unsupported_backbone(METHODS.get(name), spec) is not None, name
    for name in ("finetune", "lora", "linear", "toast", "toast-nopretune", "toast-notoken", "toast-nochannel"):
        assert unsupported_backbone(METHODS.get(name), spec) is None, name
        assert unsupported_backbone(METHODS.get(name), {"name": "vit_large_patch16_224"}) is None, name


@pytest.mark.parametrize("name", ["toast-lite", "toast-early"])
def test_a_vit_only_toast_variant_built_on_convnext_is_one_clear_error(name):
    with pytest.raises(HarnessError, match=f"method {name} cannot run on a ConvNeXt backbone: it supports vit"):
        build(name)


def test_vpt_on_convnext_is_refused_before_any_trial(make_suite, capsys, monkeypatch):
    import harness.train

    def no_trial(*args, **kwargs):
        raise AssertionError("a trial started")

    monkeypatch.setattr(harness.train, "run_trial", no_trial, raising=False)
    suite = make_suite("cnvpt", methods=["vpt-deep"], tasks=["demo-digits"], backbone=TINY_CONVNEXT,
                       grids={"vpt-deep": {"lr": [0.1], "weight_decay": [0.0]}})
    code, out, err = _run(["run", "--suite", str(suite), "--no-progress"], capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "method vpt-deep cannot run on backbone convnext_tiny (convnext)" in lines[0], err
    assert "Traceback" not in err and not list(Path(suite.parent / "results").rglob("*.json"))


# ---------------------------------------------------------------------------------------------------- suites
PAPER_CELLS = {f"{m}/{t}" for m in ("finetune", "lora", "toast")
               for t in ("fgvc-cub", "fgvc-nabirds", "fgvc-flowers", "fgvc-dogs", "fgvc-cars")}


@pytest.mark.parametrize("name", ["fgvc-convnext", "fgvc-vitl"])
def test_paper_suites_plan_the_papers_cells(name):
    from harness.plan import plan_cells, select_names
    from harness.sweep import load_suite

    suite = load_suite(name)  # validated whole against the schema
    cells = plan_cells(*select_names(suite, None, None))
    assert {f"{c.method}/{c.task}" for c in cells} == PAPER_CELLS
    assert not backbone_problems(suite, cells)


def test_the_convnext_suite_dry_runs_on_no_data(capsys):
    """TOAST's cells only (the estimate counts each method's FLOPs on the real backbone, ~1.5 s a method); the whole
    suite's dry run is the slow test below."""
    code, out, err = _run(["run", "--suite", "fgvc-convnext", "--dry-run", "--methods", "toast"], capsys)
    assert code == 0, err
    assert "toast/fgvc-cars" in out and "no data root" in err


def test_a_dry_run_warns_about_a_refused_method_and_estimates_the_others(make_suite, capsys):
    suite = make_suite("cndry", methods=["vpt-deep", "linear"], tasks=["demo-digits"], backbone=TINY_CONVNEXT,
                       grids={"vpt-deep": {"lr": [0.1], "weight_decay": [0.0]}})
    code, out, err = _run(["run", "--suite", str(suite), "--dry-run"], capsys)
    assert code == 0, err
    assert "warning: method vpt-deep cannot run on backbone convnext_tiny (convnext)" in err
    assert "linear " in out.split("estimated compute")[-1] and "vpt-deep " not in out.split("estimated compute")[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fgvc-convnext", "fgvc-vitl"])
def test_paper_suites_dry_run_every_cell(name, capsys):
    code, out, err = _run(["run", "--suite", name, "--dry-run", "--no-progress"], capsys)
    assert code == 0, err
    assert all(cell in out for cell in PAPER_CELLS)


def test_the_vitl_suite_validates_with_its_backbone_and_recipe():
    from harness.sweep import load_suite

    suite = load_suite("fgvc-vitl")
    assert suite.backbone["name"] == "vit_large_patch16_224.orig_in21k"
    assert backbone_family(suite.backbone["name"]) == "vit" and suite.raw["methods"] == ["finetune", "lora", "toast"]


@pytest.mark.parametrize("suite_name", ["fgvc-convnext", "fgvc-vitl"])
def test_paper_suites_without_a_pretuned_module_name_the_command(suite_name, tmp_path):
    from harness.api import ARTIFACTS, ArtifactRequest
    from harness.inputs import suite_data_context
    from harness.sweep import load_suite

    suite = load_suite(suite_name)
    request = ArtifactRequest("toast-pretuned", suite.name, tmp_path, suite.backbone, method="toast",
                              sections={"pretune": suite.raw.get("pretune")},
                              data=suite_data_context(suite, tmp_path), overrides=suite.overrides)
    with pytest.raises(HarnessError, match=rf"run `harness pretune --suite {suite_name} --method toast`"):
        ARTIFACTS.get("toast-pretuned")(request)


def test_a_suites_backbone_picks_the_reference_rows():
    from harness.reference import SUITE_BACKBONES, load, reference_backbone

    assert set(SUITE_BACKBONES.values()) <= set(load("toast-paper")["backbone"])
    assert reference_backbone("toast-paper", "convnext_base.fb_in1k") == "convnext-b"
    assert reference_backbone("toast-paper", "vit_large_patch16_224.orig_in21k") == "vit-l16-in21k"
    assert reference_backbone("vpt-paper", "convnext_base.fb_in1k") is None  # no such rows: the source's default
    assert reference_backbone("toast-paper", "vit_small_patch16_224") is None


def test_the_convnext_table_compares_with_table_5(capsys, tmp_path):
    code, out, err = _run(["table", "--suite", "fgvc-convnext", "--reference", "toast-paper",
                           "--results", str(tmp_path)], capsys)
    assert code == 0, err
    assert "toast-paper Table 5, backbone convnext-b" in out
    toast_paper = out.split("| toast ")[1].splitlines()[1]
    assert all(v in toast_paper for v in ("90.2", "85.6", "99.2", "88.4", "85.8", "89.8")), out


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("spec", [TINY_CONVNEXT, TINY_VITL], ids=["convnext", "vit-l"])
def test_toast_pretunes_trains_and_evaluates_end_to_end(spec, make_suite, capsys):
    """The pretune machinery keyed by backbone makes a module for each backbone, and the trials load it."""
    suite = make_suite(f"e2e-{spec['name']}", methods=["toast", "lora", "finetune"], tasks=["demo-position"],
                       backbone=spec, pretune={**TINY_PRETUNE, "var_loss_weight": 0.01},
                       settings={"lora": {"target_modules": ["mlp.fc1", "mlp.fc2"]}},
                       grids={"toast": {"lr": [0.25], "weight_decay": [0.0]},
                              "lora": {"lr": [0.25], "weight_decay": [0.0]},
                              "finetune": {"lr": [0.001], "weight_decay": [0.0]}},
                       protocol={"seeds": [42]}, train={"epochs": 1})
    code, out, err = _run(["run", "--suite", str(suite), "--no-progress"], capsys)
    assert code == 0, err
    records = [json.loads(p.read_text()) for p in Path(suite.parent / "results").rglob("*.json")]
    records = [r for r in records if "spec" in r]
    assert {r["spec"]["method"] for r in records} == {"toast", "lora", "finetune"}
    assert all(r["status"] == "ok" for r in records)
    toast = [r for r in records if r["spec"]["method"] == "toast"]
    assert {r["checkpoint_settings"]["origin"] for r in toast} == {"harness"}
