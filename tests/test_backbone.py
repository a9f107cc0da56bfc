"""Backbone weights (harness/backbone.py): local files through timm's loader, clear errors for a missing or
unreadable file and for wrong keys, and the weight file's fingerprint in every record."""

from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch

from harness.cli import main
from harness.errors import HarnessError
from harness.backbone import build_backbone, file_fingerprint
from test_vtab import TINY_ARGS, make_vtab_tree

ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
NAME = "vit_tiny_patch16_224"


def spec(weights) -> dict:
    return {"name": NAME, "model_args": ARGS, "weights": str(weights)}


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    """A full checkpoint, classifier included (it is dropped: backbones are built with num_classes=0)."""
    torch.manual_seed(0)
    return timm.create_model(NAME, num_classes=10, **ARGS).state_dict()


def test_local_pth_and_safetensors_load(tmp_path, state):
    from safetensors.torch import save_file

    torch.save({"model": state}, tmp_path / "nested.pth")  # DeiT-style nesting is unwrapped
    save_file(state, tmp_path / "w.safetensors")
    for path in (tmp_path / "nested.pth", tmp_path / "w.safetensors"):
        model = build_backbone(spec(path))
        assert torch.equal(model.pos_embed, state["pos_embed"])
        assert torch.equal(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])


def test_missing_file(tmp_path):
    with pytest.raises(HarnessError) as err:
        build_backbone(spec(tmp_path / "absent.pth"))
    assert str(err.value) == (f"backbone weights file not found: {tmp_path / 'absent.pth'} (expected a local "
                              ".pth/.safetensors/.npz file, 'timm' for timm's own download, or artifact:<name>)")


def test_wrong_keys_are_listed(tmp_path, state):
    bad = {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}
    bad["decoders.0.linear.weight"] = torch.zeros(32, 32)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(HarnessError) as err:
        build_backbone(spec(tmp_path / "bad.pth"))
    assert str(err.value) == (f"weights {tmp_path / 'bad.pth'} do not fit backbone '{NAME}': 1 missing key(s): "
                              "blocks.0.attn.qkv.weight; 1 unexpected key(s): decoders.0.linear.weight")


def test_a_file_of_other_keys_never_loads_silently(tmp_path):
    torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(3)}, tmp_path / "other.pth")
    with pytest.raises(HarnessError, match=r"30 missing key\(s\): .*, \.\.\. \(20 more\); 3 unexpected key\(s\): "
                                           r"layer0.weight, layer1.weight, layer2.weight$"):
        build_backbone(spec(tmp_path / "other.pth"))


def test_wrong_shapes(tmp_path):
    torch.save(timm.create_model(NAME, num_classes=0, **dict(ARGS, embed_dim=64)).state_dict(), tmp_path / "w.pth")
    with pytest.raises(HarnessError, match=r"do not fit backbone 'vit_tiny_patch16_224': .*size mismatch for "
                                           r"cls_token"):
        build_backbone(spec(tmp_path / "w.pth"))


def test_unreadable_file(tmp_path):
    (tmp_path / "w.pth").write_text("not a checkpoint")
    with pytest.raises(HarnessError, match=rf"^cannot read backbone weights {tmp_path / 'w.pth'} \(.*\); expected a "
                                           r"\.pth/\.safetensors state dict$"):
        build_backbone(spec(tmp_path / "w.pth"))


def test_timm_weights_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HarnessError, match=r"^cannot get timm's pretrained weights for 'vit_tiny_patch16_224' .*"
                                           r"without network, pass --weights PATH$"):
        build_backbone({"name": NAME, "model_args": ARGS, "weights": "timm"})


def test_cli_errors_and_record_fingerprint(tmp_path, capsys, state):
    root = make_vtab_tree(tmp_path / "vtab-1k", ["dtd"])
    path = tmp_path / "backbone.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, path)
    base = ["run", "--suite", "vtab", "--tasks", "vtab-dtd", "--methods", "linear", "--data-root", str(root),
            "--seeds", "1", "--grid-points", "1", "--no-progress", "--no-table", *TINY_ARGS]
    weights_at = base.index("--weights") + 1

    missing = list(base)
    missing[weights_at] = str(tmp_path / "absent.pth")
    assert main(missing) == 2
    assert f"harness: error: backbone weights file not found: {tmp_path / 'absent.pth'}" in capsys.readouterr().err

    good = list(base)
    good[weights_at] = str(path)
    assert main(good) == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert file_fingerprint(path) == expected
    assert {r["weights_fingerprint"] for r in records} == {expected}
    assert {r["spec"]["backbone"]["weights"] for r in records} == {str(path)}
