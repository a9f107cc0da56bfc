"""TOAST and TOAST-Lite: the top-down model's math, trainable sets, pre-tuning, checkpoints, cost, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.api import METHODS, BuildContext
from harness.errors import HarnessError
from harness.backbone import build_backbone
from harness.loop import train_mode
from methods.toast_checkpoint import load_top_down, read_checkpoint, top_down_state
from methods.toast_model import TopDownViT
from conftest import TINY_BACKBONE, TINY_PRETUNE

TOAST_METHODS = ["toast", "toast-lite", "toast-early", "toast-late", "toast-nopretune", "toast-notoken",
                 "toast-nochannel"]
#: depth 4, so that the middle block (2) splits early/late feedback into non-empty halves
DEEP = {**TINY_BACKBONE, "model_args": {**TINY_BACKBONE["model_args"], "depth": 4}}



def backbone(spec=DEEP, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(spec).eval()


def build(name: str, spec=DEEP, num_classes: int = 5, **hparams):
    ctx = BuildContext(hparams=hparams, suite="test", cache_dir=Path("."), random_init=True)
    return METHODS.get(name).build(backbone(spec), num_classes, ctx)


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("feedback", ["full", "early", "late"])
def test_zero_feedback_gives_the_frozen_backbone_features_exactly(feedback):
    bb = backbone()
    model = TopDownViT(bb, 5, feedback=feedback).eval()
    with torch.no_grad():
        for decoder in model.decoders.values():
            decoder.linear2.weight.zero_()  # every top-down signal is exactly zero
        x = images()
        assert torch.equal(model.forward_detailed(x).features, bb(x))
        assert not torch.equal(TopDownViT(backbone(), 5, feedback=feedback).eval().forward_detailed(x).features,
                               bb(x))  # a non-zero feedback does change them


def test_top_down_signal_reaches_v_only_and_keeps_the_fused_attention(monkeypatch):
    model = TopDownViT(backbone(), 5).eval()
    depth, dim = model.depth, model.backbone.embed_dim
    qkv_out: list[torch.Tensor] = []
    for blk in model.backbone.blocks:
        assert blk.attn.fused_attn
        blk.attn.qkv.register_forward_hook(lambda mod, args, out: qkv_out.append(out.detach()))
    sdpa_calls: list[tuple[torch.Tensor, ...]] = []
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        sdpa_calls.append((q.detach(), k.detach(), v.detach()))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    x = images()
    with torch.no_grad():
        _, top = model.first_pass(x)
        td = model.feedback(model.select(top)[0])
        qkv_out.clear(), sdpa_calls.clear()
        model.forward_detailed(x)
    assert len(qkv_out) == len(sdpa_calls) == 2 * depth  # both passes go through F.scaled_dot_product_attention

    def heads(t: torch.Tensor) -> torch.Tensor:  # B x N x d -> B x H x N x hd, as timm splits qkv
        attn = model.backbone.blocks[0].attn
        return t.reshape(t.shape[0], t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)

    for l in range(depth):
        q, k, v = sdpa_calls[depth + l]
        fused = qkv_out[depth + l]
        assert torch.equal(q, heads(fused[..., :dim])) and torch.equal(k, heads(fused[..., dim:2 * dim]))
        w_v = model.backbone.blocks[l].attn.qkv.weight[2 * dim:]
        torch.testing.assert_close(v, heads(fused[..., 2 * dim:] + td[l] @ w_v.T))
        assert not torch.equal(v, heads(fused[..., 2 * dim:]))
    # block 0 sees the same input in both passes: Q and K are identical, V is not
    assert torch.equal(sdpa_calls[0][0], sdpa_calls[depth][0]) and torch.equal(sdpa_calls[0][1], sdpa_calls[depth][1])
    assert not torch.equal(sdpa_calls[0][2], sdpa_calls[depth][2])


def test_v_bias_twice_adds_the_v_bias_once_more():
    model = TopDownViT(backbone(), 5, v_bias_twice=True).eval()
    with torch.no_grad():
        for blk in model.backbone.blocks:
            blk.attn.qkv.bias.normal_()  # timm initialises it to zero
        for decoder in model.decoders.values():
            decoder.linear2.weight.zero_()
        x = images()
        assert not torch.equal(model.forward_detailed(x).features, model.backbone(x))  # b_v even with td = 0


# ---------------------------------------------------------------------------------------------------- training
def expected_trainable(name: str, depth: int = 4, train_P: bool = True) -> set[str]:
    middle = depth // 2
    layers = {"toast-early": range(0, middle), "toast-late": range(middle, depth)}.get(name, range(depth))
    head = {"head.weight", "head.bias"}
    if name == "toast-nochannel":
        return head | {"prompt"}
    if name == "toast-lite":
        lora = {f"decoders.{l}.{lin}.lora_{ab}" for l in layers for lin in ("linear", "linear2") for ab in "AB"}
        return head | lora | {"prompt"} | ({"top_down_transform"} if train_P else set())
    decoders = {f"decoders.{l}.{lin}.weight" for l in layers for lin in ("linear", "linear2")}
    prompt = set() if name == "toast-notoken" else {"prompt"}
    return head | decoders | prompt | ({"top_down_transform"} if train_P else set())


@pytest.mark.parametrize("name", TOAST_METHODS)
def test_gradient_reaches_exactly_the_trainable_set(name):
    model = build(name)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(name)
    F.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None, n
            # LoRA's A gets exactly zero gradient while B is still zero (peft/loralib init)
            assert ".lora_A" not in n or p.grad.abs().sum() == 0, n
            assert ".lora_A" in n or p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_train_p_false_freezes_p_as_the_official_code():
    model = build("toast", train_P=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable("toast", train_P=False)


def test_frozen_eval_setting_controls_drop_path():
    spec = {**DEEP, "model_args": {**DEEP["model_args"], "drop_path_rate": 0.5}}
    assert not train_mode(build("toast", spec)).backbone.training
    assert train_mode(build("toast", spec, frozen_eval=False)).backbone.training


def test_variational_loss_decreases_during_pretuning():
    from methods.toast_pretune import DEFAULTS
    from methods.toast_pretune_train import pretune_model

    model = TopDownViT(backbone(), 4)
    x, y = images(32, seed=3), torch.arange(32) % 4
    cfg = {**DEFAULTS, "epochs": 8, "lr": 1e-2, "warmup_epochs": 0, "cooldown_epochs": 0}  # 8 steps, weight 0.03
    history = pretune_model(model, [(x, y)], cfg, progress=False).history  # one step per epoch
    var = [h["var"] for h in history]
    assert all(b < a for a, b in zip(var[:4], var[1:5])) and var[-1] < 0.9 * var[0], var
    assert all(not p.requires_grad for p in model.backbone.parameters())


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_official_checkpoint_keys_round_trip(tmp_path):
    source = TopDownViT(backbone(seed=0), 5, v_bias_twice=True)  # official files: the V bias added twice
    with torch.no_grad():
        source.top_down_transform.add_(0.01 * torch.randn_like(source.top_down_transform))
        for blk in source.backbone.blocks:
            blk.attn.qkv.bias.normal_()  # timm initialises it to zero, where the doubled bias changes nothing
    official = {**source.backbone.state_dict(), **top_down_state(source), "head.weight": torch.zeros(1000, 32)}
    official["prompt"] = official["prompt"].reshape(1, 1, -1)  # stored with a different shape, same numel
    assert {"prompt", "top_down_transform", "decoders.0.linear.weight", "decoders.3.linear2.weight"} <= set(official)
    wrapped, plain = tmp_path / "toast_wrapped.pth", tmp_path / "toast_plain.pth"
    torch.save({"model": official, "epoch": 30}, wrapped)
    torch.save(official, plain)
    x = images()
    for path in (wrapped, plain):
        target = TopDownViT(source.backbone, 5)
        target.head.load_state_dict(source.head.state_dict())
        report = load_top_down(target, path)
        assert report.ignored == ["head.weight"] and "match" in report.backbone and report.origin == "official"
        with torch.no_grad():
            assert torch.equal(target.eval()(x), source.eval()(x))


def _bias_backbone(seed: int = 0):
    """A backbone whose qkv biases are not zero, so adding b_v once or twice gives different features."""
    bb = backbone(seed=seed)
    with torch.no_grad():
        for blk in bb.blocks:
            blk.attn.qkv.bias.normal_(generator=torch.Generator().manual_seed(5))
    return bb


def _build_from(path: Path, name: str = "toast", num_classes: int = 5, **hparams):
    """``name``'s model built as a trial builds it, with ``path`` as its pre-tuned checkpoint."""
    method = METHODS.get(name)
    hp = {**method.defaults, **hparams}  # as the plan merges them: v_bias_twice None unless set
    ctx = BuildContext(hparams=hp, suite="test", cache_dir=Path("."), resolve_artifact=lambda artifact: path)
    torch.manual_seed(0)
    return method.build(_bias_backbone(), num_classes, ctx)


def test_an_official_checkpoint_brings_the_doubled_v_bias(tmp_path):
    source = TopDownViT(_bias_backbone(), 5, v_bias_twice=True)
    official = tmp_path / "official.pth"
    torch.save({"model": {**source.backbone.state_dict(), **top_down_state(source)}, "epoch": 29}, official)
    model = _build_from(official)
    assert model.v_bias_twice is True
    assert model.checkpoint_settings["v_bias_twice"] is True and model.checkpoint_settings["origin"] == "official"
    assert model.checkpoint_settings["checkpoint"] == str(official)
    model.head.load_state_dict(source.head.state_dict())
    x = images()
    with torch.no_grad():
        logits = model.eval()(x)
        torch.testing.assert_close(logits, source.eval()(x))
        source.v_bias_twice = False  # what the old default computed with these weights
        assert (logits - source(x)).abs().max() > 1e-3
    assert _build_from(official, v_bias_twice=True).v_bias_twice is True  # an explicit agreeing value is fine
    with pytest.raises(HarnessError, match=r"sets v_bias_twice: false, but its checkpoint .*official.pth \(an "
                                           r"official TOAST checkpoint .*\) was made with v_bias_twice=True"):
        _build_from(official, v_bias_twice=False)


def test_a_harness_checkpoint_brings_its_recorded_settings(tmp_path):
    source = TopDownViT(_bias_backbone(), 5, v_bias_twice=True)
    ours = tmp_path / "ours.pt"
    meta = {"format": "toast-pretuned", "settings": {"v_bias_twice": True, "train_P": True}}
    torch.save({"model": top_down_state(source), "harness": meta}, ours)
    model = _build_from(ours)
    assert model.v_bias_twice is True and model.checkpoint_settings["origin"] == "harness"
    with pytest.raises(HarnessError, match=r"set pretune.v_bias_twice: false and pre-tune again"):
        _build_from(ours, v_bias_twice=False)
    torch.save({"model": top_down_state(source), "harness": {"format": "toast-pretuned"}}, ours)
    with pytest.raises(HarnessError, match="records no settings.v_bias_twice"):
        _build_from(ours)


def test_no_checkpoint_means_the_papers_single_v_bias():
    assert build("toast-nopretune").v_bias_twice is False
    assert build("toast-nopretune", v_bias_twice=True).v_bias_twice is True
    assert build("toast-nopretune").checkpoint_settings == {}


def test_official_per_task_files_are_read(tmp_path):
    """The official trainer saves {'epoch', 'model_state_dict', 'optimizer_state_dict'} with the encoder under enc.
    and the task head under head.last_layer. (at the best test epoch in TOAST's final runs)."""
    source = TopDownViT(_bias_backbone(), 5, v_bias_twice=True)
    with torch.no_grad():
        source.prompt.mul_(3.0)
    encoder = {**source.backbone.state_dict(), **top_down_state(source)}
    state = {**{f"enc.{k}": v for k, v in encoder.items()},
             "head.last_layer.weight": torch.zeros(7, 32), "head.last_layer.bias": torch.zeros(7)}
    path = tmp_path / "model_ckpt_epoch37.pth"
    torch.save({"epoch": 37, "model_state_dict": state,
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.origin == "official-task" and checkpoint.epoch == 37
    assert torch.equal(checkpoint.state["prompt"], source.prompt.detach())
    with pytest.warns(UserWarning, match="per-task TOAST checkpoint .*epoch 37.*best \\*test\\* epoch"):
        model = _build_from(path)
    assert torch.equal(model.prompt.detach(), source.prompt.detach())
    assert model.v_bias_twice is True and model.checkpoint_settings["epoch"] == 37
    with pytest.warns(UserWarning, match="per-task"):
        report = load_top_down(TopDownViT(_bias_backbone(), 5), path)
    assert report.ignored == ["head.last_layer.bias", "head.last_layer.weight"] and "match" in report.backbone


def test_checkpoint_problems_are_named(tmp_path):
    source = TopDownViT(backbone(seed=0), 5)
    state = top_down_state(source)
    broken = tmp_path / "broken.pth"
    torch.save({"model": {k: v for k, v in state.items() if k != "decoders.2.linear.weight"}}, broken)
    with pytest.raises(HarnessError, match="missing keys decoders.2.linear.weight"):
        load_top_down(TopDownViT(backbone(), 5), broken)
    late = TopDownViT(backbone(), 5, feedback="late")  # has decoders 2..3 only: 0..1 are reported, not loaded
    full = tmp_path / "full.pth"
    torch.save(state, full)
    assert load_top_down(late, full).unexpected == [f"decoders.{l}.{n}.weight" for l in (0, 1)
                                                    for n in ("linear", "linear2")]
    other = tmp_path / "other_backbone.pth"
    torch.save({**backbone(seed=7).state_dict(), **state}, other)
    with pytest.raises(HarnessError, match="pre-tuned on other backbone weights"):
        load_top_down(TopDownViT(backbone(seed=0), 5), other)
    loaded = TopDownViT(backbone(seed=0), 5)
    load_top_down(loaded, other, backbone_keys="load")
    assert torch.equal(loaded.backbone.pos_embed, backbone(seed=7).pos_embed)
    torch.save({"model_state_dict": {f"enc.{k}": v for k, v in backbone().state_dict().items()}, "epoch": 3},
               tmp_path / "vit.pth")
    with pytest.raises(HarnessError, match=r"no top-down keys .*top-level keys are epoch, model_state_dict; its "
                                           r"tensors: blocks.0.attn.proj.bias"):
        read_checkpoint(tmp_path / "vit.pth")


class _NotAllowed(dict):
    """A dict subclass: harmless here, but torch's safe unpickler allows only the classes it was told about."""


class _RunsCode:
    """Unpickling this calls os.makedirs: what an untrusted pickle can do once weights_only=False is used."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        import os

        return os.makedirs, (self.target,)


def test_checkpoints_load_safely_allowing_only_the_official_namespace(tmp_path):
    import argparse
    import functools

    state = top_down_state(TopDownViT(backbone(), 5))
    official = tmp_path / "deit_style.pth"
    torch.save({"model": state, "epoch": 29, "args": argparse.Namespace(lr=5e-4, model="vit_topdown_base_patch16_224",
                                                                         input_size=224, var_loss=0.1)}, official)
    assert set(read_checkpoint(official).state) == set(state)  # the official files' pickled args are allowed

    marker = tmp_path / "code-ran"
    cases = {"_NotAllowed": {"model": _NotAllowed(state)},
             "functools.partial": {"model": state, "hook": functools.partial(print, "hi")},
             "makedirs": {"model": state, "payload": _RunsCode(str(marker))}}
    for type_name, content in cases.items():
        path = tmp_path / f"{type_name}.pth"
        torch.save(content, path)
        with pytest.raises(HarnessError, match=rf"refusing to load TOAST checkpoint .*: it pickles \S*{type_name}"):
            read_checkpoint(path)
    assert not marker.exists()  # the payload never ran
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(HarnessError, match="cannot read TOAST checkpoint .*notes.pth"):
        read_checkpoint(tmp_path / "notes.pth")


# ---------------------------------------------------------------------------------------------------- cost
VIT_B = {"name": "vit_base_patch16_224", "weights": None}


def meta_model(name: str, spec=VIT_B, num_classes: int = 100):
    """A method built on the meta device: parameter counts and FLOPs without memory or init time."""
    from methods.common_model import BackboneClassifier

    with torch.device("meta"):
        bb = build_backbone(spec)
        if name == "backbone":
            return BackboneClassifier(bb, num_classes)
        ctx = BuildContext(hparams={}, suite="test", cache_dir=Path("."), random_init=True)
        return METHODS.get(name).build(bb, num_classes, ctx)


def test_parameter_counts_on_vit_b_match_the_paper():
    """Paper Table 9/11: TOAST 14M, TOAST-Lite 0.9M tuned parameters (with the head). ViT-B/16, 100 classes.
    Ours: TOAST 14.82M (24 feedback matrices 14.16M + P 0.59M + xi + head 0.08M; with the official frozen P,
    14.23M); TOAST-Lite 0.81M (LoRA 0.15M + P + xi + head; an FGVC-sized 200-class head gives 0.89M).
    Tolerance: 10% for TOAST, 15% for TOAST-Lite (the paper rounds and its heads have 100-555 classes)."""
    from harness.cost import parameter_counts

    counts = {m: parameter_counts(meta_model(m)) for m in ("toast", "toast-lite")}
    d = 768
    assert counts["toast"]["trainable"] == 24 * d * d + d * d + d == 14_746_368  # decoders, P, xi
    assert counts["toast-lite"]["trainable"] == 24 * 4 * 2 * d + d * d + d == 738_048  # LoRA A+B, P, xi
    tuned = {m: c["trainable"] + c["head"] for m, c in counts.items()}
    assert tuned["toast"] == pytest.approx(14e6, rel=0.10)
    assert tuned["toast-lite"] == pytest.approx(0.9e6, rel=0.15)
    assert counts["toast"]["head"] == 768 * 100 + 100


def test_early_and_late_feedback_cost_about_1_5x_the_backbone_instead_of_2x():
    """Paper Table 10 counts backbone passes: TOAST 2x, early/late 1.5x. Exactly so in block evaluations (counted
    with hooks). Total FLOPs (torch.utils.flop_counter, ViT-B/16 at 224) add the feedback path (2 d x d per token and
    layer) and the V injection (1 d x d): TOAST 2.24x, early/late 1.62x the backbone. Tolerance: TOAST within
    [2.0, 2.35], early/late within [1.5, 1.75], early/late vs TOAST within 0.05 of the paper's 0.75."""
    from harness.cost import forward_flops

    flops = {m: forward_flops(meta_model(m), 224, "meta") for m in ("backbone", "toast", "toast-early", "toast-late")}
    ratio = {m: flops[m] / flops["backbone"] for m in flops}
    assert 2.0 <= ratio["toast"] <= 2.35, ratio
    for variant in ("toast-early", "toast-late"):
        assert 1.5 <= ratio[variant] <= 1.75, ratio
        assert flops[variant] < flops["toast"]
        assert ratio[variant] / ratio["toast"] == pytest.approx(0.75, abs=0.05)

    for name, passes in (("toast", 2.0), ("toast-early", 1.5), ("toast-late", 1.5)):
        model = build(name).eval()
        calls = []
        for blk in model.backbone.blocks:
            blk.mlp.register_forward_hook(lambda *args: calls.append(1))
        with torch.no_grad():
            model(images(1))
        assert len(calls) / model.depth == passes


# ---------------------------------------------------------------------------------------------------- CLI
def _run(args: list[str], capsys) -> tuple[int, str, str]:
    from harness.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_checkpoint_names_the_pretune_command(make_suite, capsys, tmp_path):
    # a section of its own (seed), so no checkpoint made by another test in this session can satisfy it
    suite = make_suite("nopretuned", methods=["toast"], tasks=["demo-digits"],
                       pretune={**TINY_PRETUNE, "auto": False, "seed": 12345})
    code, _, err = _run(["run", "--suite", str(suite), "--no-progress", "--grid-points", "1"], capsys)
    assert code == 2
    assert f"run `harness pretune --suite nopretuned --method toast`" in err, err
    suite = make_suite("nosection", methods=["toast"], tasks=["demo-digits"])
    code, _, err = _run(["run", "--suite", str(suite), "--no-progress", "--grid-points", "1"], capsys)
    assert code == 2 and "has no pretune section" in err and "`harness pretune --suite nosection --method toast`" in err
    missing = tmp_path / "nowhere.pt"
    suite = make_suite("badckpt", methods=["toast-late"], tasks=["demo-digits"],
                       pretune={**TINY_PRETUNE, "auto": False, "checkpoint": str(missing)})
    code, _, err = _run(["run", "--suite", str(suite), "--no-progress", "--grid-points", "1"], capsys)
    assert code == 2
    assert f"`harness pretune --suite badckpt --method toast-late --output {missing}`" in err, err


def test_demo_end_to_end_pretunes_once_then_runs_the_protocol(make_suite, capsys, session_cache):
    from harness.backbone import file_fingerprint

    suite = make_suite("toastdemo", methods=["toast"], tasks=["demo-position"], pretune=TINY_PRETUNE,
                       grids={"toast": {"lr": [0.25], "weight_decay": [0.0]}},
                       protocol={"seeds": [42]}, train={"epochs": 2})
    code, out, err = _run(["run", "--suite", str(suite), "--no-progress"], capsys)
    assert code == 0, err
    records = [json.loads(p.read_text()) for p in Path(suite.parent / "results").rglob("*.json")]
    loaded = {r.get("checkpoint_settings", {}).get("sha256") for r in records}
    # the session cache may hold other tests' modules: this run's is the one its trials loaded
    made = [p for p in sorted((session_cache / "artifacts").glob("toast-pretuned-*.pt")) if file_fingerprint(p) in loaded]
    assert made, "the auto pre-tuning left no checkpoint in the cache"
    meta = json.loads(made[0].with_suffix(".json").read_text())
    assert meta["data"]["task"] == "demo-upstream" and meta["provenance"]["git"] is not None
    assert meta["settings"]["v_bias_twice"] is False
    state = read_checkpoint(made[0]).state
    assert "top_down_transform" in state and "decoders.1.linear2.weight" in state
    assert {r["spec"]["stage"] for r in records} == {"search", "final"}
    assert all(r["status"] == "ok" and r["spec"]["sections"]["pretune"]["task"] == "demo-upstream" for r in records)
    # every trial loaded the cached module and recorded the settings it brought
    assert {(r["checkpoint_settings"]["origin"], r["checkpoint_settings"]["v_bias_twice"],
             r["checkpoint_settings"]["sha256"]) for r in records} == {("harness", False, file_fingerprint(made[0]))}
    final = next(r for r in records if r["spec"]["stage"] == "final")
    assert f"{final['metrics']['eval']:.1f}" in out.split("demo-position")[-1], out  # the table shows the result
    # the command makes the same file the trials look up, so it has nothing to do now
    code, out, _ = _run(["pretune", "--suite", str(suite), "--no-progress"], capsys)
    assert code == 0 and f"already pre-tuned: {made[0]}" in out


def test_pretune_command_writes_a_checkpoint_with_provenance(make_suite, capsys, tmp_path, session_cache):
    from harness.inputs import suite_data_context
    from harness.sweep import load_suite

    suite = make_suite("toastcmd", pretune={**TINY_PRETUNE, "auto": False})
    output = tmp_path / "pretuned.pt"
    code, out, err = _run(["pretune", "--suite", str(suite), "--method", "toast", "--output", str(output),
                           "--no-progress", "--set", "pretune.var_loss_weight=0.1"], capsys)
    assert code == 0, err
    assert f"use it with: pretune.checkpoint: {output}" in out and f"toast: toast-pretuned -> {output}" in out
    meta = json.loads(output.with_suffix(".json").read_text())
    assert meta["pretune"]["var_loss_weight"] == 0.1 and meta["data"]["images"] == 1000
    data = suite_data_context(load_suite(str(suite)), session_cache)
    assert meta["inputs"]["mean"] == list(data.mean) and meta["inputs"]["std"] == list(data.std)
    assert [e["epoch"] for e in meta["epochs"]] == [1] and meta["epochs"][0]["var"] > 0
    model = TopDownViT(build_backbone(TINY_BACKBONE), 5)
    assert len(load_top_down(model, output).loaded) == 2 + 2 * 2  # prompt, P, 2 layers x 2 linears
    assert not Path(str(output) + ".ckpt.pt").exists()  # the resumable state is gone once the stage finished


def test_pretune_reads_an_imagenet_style_image_folder(make_suite, capsys, tmp_path):
    from PIL import Image

    for label in ("n01440764", "n01443537"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(4):
            pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / label / f"{i}.JPEG")
    suite = make_suite("toastfolder", pretune={"image_folder": str(tmp_path / "train"), "epochs": 1,
                                               "batch_size": 4, "warmup_epochs": 0, "cooldown_epochs": 0})
    output = tmp_path / "folder.pt"
    code, _, err = _run(["pretune", "--suite", str(suite), "--method", "toast", "--output", str(output),
                         "--no-progress"], capsys)
    assert code == 0, err
    meta = json.loads(output.with_suffix(".json").read_text())
    assert meta["data"]["images"] == 8 and meta["data"]["classes"] == 2


def test_image_folder_pretuning_normalises_as_the_trials_do(tmp_path):
    """The transform takes mean/std from the request's DataContext (the trials' normalisation), not from timm's
    pretrained config of the backbone."""
    from PIL import Image
    from torchvision import transforms

    from harness.api import DataContext
    from methods.toast_pretune import DEFAULTS, pretune_dataset

    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(tmp_path / "train" / "a" / "0.JPEG")
    data = DataContext(data_root=None, cache_dir=tmp_path, image_size=32, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    cfg = {**DEFAULTS, "image_folder": str(tmp_path / "train")}
    dataset, classes, _ = pretune_dataset(cfg, data, build_backbone(TINY_BACKBONE))
    normalize = [t for t in dataset.transform.transforms if isinstance(t, transforms.Normalize)]
    assert classes == 1 and len(normalize) == 1
    torch.testing.assert_close(torch.as_tensor(normalize[0].mean, dtype=torch.float64),
                               torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    torch.testing.assert_close(torch.as_tensor(normalize[0].std, dtype=torch.float64),
                               torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64))
    image, _ = dataset[0]  # an all-black image: (0 - mean) / std per channel
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([-0.1 / 0.4, -0.2 / 0.5, -0.3 / 0.6]))


def test_task_pretuning_reads_its_data_with_the_requests_context(monkeypatch, tmp_path):
    from harness.api import DataContext
    from methods import toast_pretune

    seen: list[DataContext] = []

    class Upstream:
        name, num_classes, splits = "upstream", 3, ("train",)

        def dataset(self, split, ctx, train):
            seen.append(ctx)
            return [(torch.zeros(3, 32, 32), 0)]

        def fingerprint(self, split, ctx):
            return f"{split}:{ctx.mean}"

    monkeypatch.setattr(toast_pretune, "TASKS", type("Tasks", (), {"get": staticmethod(lambda name: Upstream())}))
    data = DataContext(data_root=tmp_path, cache_dir=tmp_path, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                       settings={"preprocess": "vpt"})
    _, classes, fingerprint = toast_pretune.pretune_dataset({**toast_pretune.DEFAULTS, "task": "upstream"}, data,
                                                            build_backbone(TINY_BACKBONE))
    assert seen == [data] and classes == 3 and fingerprint == "train:(0.5, 0.5, 0.5)"


@pytest.mark.parametrize("suite_name", ["vtab", "fgvc", "fgvc-search"])
def test_real_suites_without_a_pretuned_module_name_the_command(suite_name, tmp_path):
    from harness.api import ARTIFACTS, METHODS, ArtifactRequest
    from harness.inputs import suite_data_context
    from harness.sweep import load_suite

    suite = load_suite(suite_name)
    request = ArtifactRequest("toast-pretuned", suite.name, tmp_path, suite.backbone, method="toast",
                              sections={s: suite.raw.get(s) for s in METHODS.get("toast").suite_sections},
                              data=suite_data_context(suite, tmp_path), overrides=suite.overrides)
    with pytest.raises(HarnessError, match=rf"pretune.image_folder .* run `harness pretune --suite {suite_name} "
                                           "--method toast`"):
        ARTIFACTS.get("toast-pretuned")(request)


def test_merged_feedback_lora_is_peft_lora_in_value_and_gradient():
    """TOAST-Lite's merged LoRA (W + s B A once per call) computes what peft's per-token LoRA computes, and gives A
    and B the same gradients, to float rounding."""
    from peft import LoraConfig, inject_adapter_in_model

    from methods.toast_model import LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.linear = torch.nn.Linear(48, 48, bias=False)
    merged = LoRALinear(base.linear, rank=4, alpha=1.0)
    with torch.no_grad():
        merged.lora_B.normal_()  # a trained B: zero would hide the update
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=1.0, lora_dropout=0.0, target_modules=["linear"]), base)
    per_token = base.linear
    with torch.no_grad():
        per_token.lora_A.default.weight.copy_(merged.lora_A)
        per_token.lora_B.default.weight.copy_(merged.lora_B)
    x = torch.randn(3, 17, 48)
    x_merged, x_peft = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_merged, y_peft = merged(x_merged), per_token(x_peft)
    torch.testing.assert_close(y_merged, y_peft, rtol=1e-5, atol=1e-5)
    (y_merged ** 2).sum().backward()
    (y_peft ** 2).sum().backward()
    torch.testing.assert_close(merged.lora_A.grad, per_token.lora_A.default.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged.lora_B.grad, per_token.lora_B.default.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_merged.grad, x_peft.grad, rtol=1e-4, atol=1e-4)
    assert merged.weight.grad is None and merged.scaling == 0.25


def test_the_low_rank_gradients_are_the_merged_weights_gradients():
    """A and B get their gradients through the rank (never a d x d weight gradient): in float64 they equal the
    numerical gradients of x (W + s B A)^T, for x, W (were it trained), A and B."""
    from methods.toast_model import _LowRankUpdateLinear

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _LowRankUpdateLinear.apply(*t, 0.25), (x, weight, lora_a, lora_b))
