"""Input normalisation (docs/protocol.md §2.2, §7.4, §8.3): the engine resolves ``data.normalize`` into the
DataContext's mean/std (by default the backbone's own timm pretrained config), and the VTAB and FGVC transforms
normalise with exactly those statistics; only the ``noah-inception`` preset pins its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.api import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, TASKS, DataContext
from harness.backbone import build_backbone, input_normalization
from harness.cli import main
from harness.errors import HarnessError
from harness.inputs import data_context, suite_data_context
from harness.sweep import load_suite
from test_fgvc import make_fgvc_tree
from test_vtab import make_vtab_tree, write_jpeg

#: a timm tag whose pretrained config says mean/std 0.5 (built here with random weights; nothing downloads)
HALF = {"name": "vit_tiny_patch16_224.augreg_in21k", "weights": None}
DEIT = {"name": "deit_base_patch16_224.fb_in1k", "weights": "timm"}
#: statistics no preset or mode has, so a transform that ignored the context would show
ODD_MEAN, ODD_STD = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)


def close(a, b) -> bool:
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float))


# ---------------------------------------------------------------------------------------------------- the engine
def test_backbone_mode_reads_the_checkpoints_own_statistics(tmp_path):
    ctx = data_context({}, HALF, tmp_path)  # no data.normalize: the default is "backbone"
    assert close(ctx.mean, (0.5, 0.5, 0.5)) and close(ctx.std, (0.5, 0.5, 0.5))
    # the same numbers timm attaches to the model it builds for that tag
    model = build_backbone(HALF)
    assert close(model.pretrained_cfg["mean"], ctx.mean) and close(model.pretrained_cfg["std"], ctx.std)
    deit = data_context({}, DEIT, tmp_path)
    assert close(deit.mean, IMAGENET_MEAN) and close(deit.std, IMAGENET_STD)


@pytest.mark.parametrize(("backbone", "mode", "mean", "std"), [
    (HALF, "imagenet", IMAGENET_MEAN, IMAGENET_STD),
    (DEIT, "inception", INCEPTION_MEAN, INCEPTION_STD),
])
def test_imagenet_and_inception_force_their_statistics(tmp_path, backbone, mode, mean, std):
    ctx = data_context({"normalize": mode, "image_size": 32}, backbone, tmp_path)
    assert close(ctx.mean, mean) and close(ctx.std, std)
    assert ctx.settings["normalize"] == mode and ctx.image_size == 32


def test_the_paper_suites_feed_deit_its_imagenet_statistics(tmp_path):
    for name in ("vtab", "fgvc", "fgvc-search"):
        suite = load_suite(name)
        assert suite.backbone["name"] == "deit_base_patch16_224.fb_in1k" and suite.data["normalize"] == "backbone"
        ctx = suite_data_context(suite, tmp_path)
        assert close(ctx.mean, IMAGENET_MEAN) and close(ctx.std, IMAGENET_STD), name


def test_an_unknown_mode_is_refused(tmp_path, capsys):
    with pytest.raises(HarnessError, match=r"data.normalize: expected one of backbone, imagenet, inception, "
                                           r"got 'imagenette'"):
        data_context({"normalize": "imagenette"}, HALF, tmp_path)
    root = make_vtab_tree(tmp_path / "vtab-1k", ["dtd"], sizes={"train800": 1, "val200": 1, "train800val200": 1,
                                                                 "test": 1})
    code = main(["run", "--suite", "vtab", "--tasks", "vtab-dtd", "--methods", "linear", "--data-root", str(root),
                 "--set", "data.strict_counts=false", "--set", "data.normalize=imagenette", "--dry-run"])
    assert code == 2
    assert "data.normalize: expected one of backbone, imagenet, inception" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- the tasks
def raw_pixels(path: Path) -> torch.Tensor:
    """The decoded image as a 3 x H x W tensor in [0, 1], without torchvision."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def normalised(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize(("preset", "pinned"), [("vpt", False), ("noah", False), ("ssf", False),
                                                ("noah-inception", True)])
def test_vtab_items_use_the_context_statistics(tmp_path, preset, pinned):
    """A 32x32 image at image size 32: every preset's resize and crop leave it as it is, so the item is exactly the
    raw pixels normalised, with the context's statistics, or with 0.5/0.5 under noah-inception whatever the
    context says."""
    root = make_vtab_tree(tmp_path, ["dtd"], sizes={"train800": 1, "val200": 1, "train800val200": 1, "test": 1})
    image = root / "dtd" / "images" / "test" / "000000.jpg"
    write_jpeg(image, 0, 0, size=(32, 32))
    ctx = DataContext(data_root=root, cache_dir=tmp_path, image_size=32, mean=ODD_MEAN, std=ODD_STD,
                      settings={"strict_counts": False, "preprocess": preset})
    item, _ = TASKS.get("vtab-dtd").dataset("test", ctx, train=False)[0]
    mean, std = (INCEPTION_MEAN, INCEPTION_STD) if pinned else (ODD_MEAN, ODD_STD)
    torch.testing.assert_close(item, normalised(raw_pixels(image), mean, std), atol=1e-5, rtol=0)


def test_fgvc_items_use_the_context_statistics(tmp_path):
    """Eval: resize the short side to 32*256/224 = 36, centre crop 32. A 36x36 image is not resized, and the crop
    keeps rows and columns 2..33."""
    root = make_fgvc_tree(tmp_path, ("fgvc-flowers",), per_split={"train": 1, "val": 1, "test": 1})
    task = TASKS.get("fgvc-flowers")
    ctx = DataContext(data_root=root, cache_dir=tmp_path, image_size=32, mean=ODD_MEAN, std=ODD_STD,
                      settings={"strict_counts": False})
    data = task.dataset("test", ctx, train=False)
    path, _, _ = data.items[0]
    write_jpeg(path, 0, 0, size=(36, 36))
    item, _ = data[0]
    expected = normalised(raw_pixels(path)[:, 2:34, 2:34], ODD_MEAN, ODD_STD)
    torch.testing.assert_close(item, expected, atol=1e-5, rtol=0)
    # training items (random crop, flip) are normalised with the same statistics
    assert close(task.transform(ctx, True).transforms[-1].mean, ODD_MEAN)
    assert close(task.transform(ctx, True).transforms[-1].std, ODD_STD)
