"""``harness attention``: CLS attention maps from kept trial weights or fresh models, TOAST's Fig. 4 panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.attention import attention_maps, cls_attention, load_image
from harness.backbone import build_backbone
from methods.common_model import BackboneClassifier
from methods.toast_model import TopDownViT
from conftest import TINY_BACKBONE, TINY_PRETUNE


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_cls_attention_is_timm_attention_row_of_the_cls_token():
    torch.manual_seed(0)
    model = BackboneClassifier(build_backbone(TINY_BACKBONE), 5).eval()
    last = model.backbone.blocks[-1]
    last.attn.fused_attn = False  # timm's explicit path, whose softmax output passes through attn_drop
    seen = []
    last.attn.attn_drop.register_forward_hook(lambda mod, args, out: seen.append(out))
    maps = attention_maps(model, images())["last layer"]
    expected = seen[-1][:, :, 0, 1:].mean(dim=1).reshape(-1, 4, 4)
    torch.testing.assert_close(maps, expected)
    assert maps.shape == (2, 4, 4) and bool((maps >= 0).all()) and bool((maps.sum(dim=(1, 2)) <= 1 + 1e-6).all())


@pytest.mark.parametrize("feedback,token_selection,panels", [
    ("full", True, ["first pass", "token selection (cos with ξ)", "second pass"]),
    ("full", False, ["first pass", "second pass"]),
    ("early", True, ["first pass (block 1/2)", "token selection (cos with ξ)", "second pass"]),
])
def test_toast_gives_first_pass_selection_and_second_pass_panels(feedback, token_selection, panels):
    torch.manual_seed(0)
    model = TopDownViT(build_backbone(TINY_BACKBONE), 5, feedback=feedback, token_selection=token_selection).eval()
    maps = attention_maps(model, images())
    assert list(maps) == panels
    for name, amap in maps.items():
        assert amap.shape == (2, 4, 4), name
        assert bool((amap >= 0).all()) and bool((amap <= 1).all()), name
    x = images()
    with torch.no_grad():
        bottom_up = cls_attention(model.backbone.blocks[-1], _last_block_input(model.backbone, x), (4, 4))
    if feedback == "full":  # the first pass is the plain backbone
        torch.testing.assert_close(maps["first pass"], bottom_up)


def test_the_read_out_is_library_code_plugins_reach_through_the_api():
    import harness.api
    import harness.attention
    import harness.commands.attention as command

    assert harness.api.cls_attention is harness.attention.cls_attention
    assert not hasattr(command, "cls_attention") and not hasattr(command, "attention_maps")


def test_an_image_file_gets_the_trials_size_and_normalisation(tmp_path):
    from PIL import Image

    from harness.api import DataContext, TASKS

    Image.fromarray(np.full((20, 30, 3), 255, dtype=np.uint8)).save(tmp_path / "white.png")
    data = DataContext(data_root=None, cache_dir=tmp_path, image_size=32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25))
    tensor, shown, described = load_image(TASKS.get("demo-position"), data, tmp_path / "white.png")
    assert tensor.shape == (1, 3, 32, 32) and shown.shape == (32, 32, 3) and described.endswith("white.png")
    torch.testing.assert_close(tensor[0, :, 5, 7], torch.tensor([0.9 / 0.5, 0.8 / 0.5, 0.7 / 0.25]))


def _last_block_input(vit, x):
    seen = []
    handle = vit.blocks[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    vit(x)
    handle.remove()
    return seen[-1]


def _png(path: Path) -> Path:
    from PIL import Image

    from tasks.demo import gen_position

    pixels, _ = gen_position(1, seed=99)
    Image.fromarray(pixels[0]).save(path)
    return path


def test_attention_command_uses_kept_weights_or_says_fresh(make_suite, capsys, tmp_path):
    from PIL import Image

    from harness.cli import main

    suite = make_suite("attn", methods=["linear", "toast"], tasks=["demo-position"], pretune=TINY_PRETUNE,
                       grids={"linear": {"lr": [1.0], "weight_decay": [0.0]},
                              "toast": {"lr": [0.25], "weight_decay": [0.0]}},
                       protocol={"seeds": [42]}, train={"epochs": 1})
    assert main(["run", "--suite", str(suite), "--no-progress", "--no-table", "--keep-weights"]) == 0
    kept = sorted((tmp_path / "results").rglob("final-*.weights.pt"))
    assert len(kept) == 2
    capsys.readouterr()

    output = tmp_path / "fig.png"
    code = main(["attention", "--suite", str(suite), "--task", "demo-position", "--methods", "linear,toast,toast-late",
                 "--image", str(_png(tmp_path / "img.png")), "--output", str(output)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "linear: linear trained (seed 42" in out and "toast: toast trained (seed 42" in out
    assert "toast-late: toast-late fresh model (no kept weights)" in out
    with Image.open(output) as figure:
        width, height = figure.size
        assert width > 600 and height > 600  # 3 rows x 4 columns of panels
        assert np.asarray(figure.convert("L")).std() > 10  # not a blank canvas

    toast_weights = next(p for p in kept if "/toast/" in str(p))
    code = main(["attention", "--suite", str(suite), "--task", "demo-position", "--methods", "toast",
                 "--trial-weights", str(toast_weights), "--index", "3", "--output", str(tmp_path / "one.png")])
    assert code == 0 and (tmp_path / "one.png").is_file()
    code = main(["attention", "--suite", str(suite), "--task", "demo-position", "--methods", "linear,toast",
                 "--trial-weights", str(toast_weights), "--output", str(tmp_path / "bad.png")])
    assert code == 2 and "1 files for 2 methods" in capsys.readouterr().err
