"""Segmentation (tasks/segmentation.py, harness/segmentation.py, sweeps/seg.yaml): the VOC 2012 and Cityscapes
layouts, the Cityscapes id mapping, mIoU from a confusion matrix, the data checks, and fine-tune, VPT, LoRA and
TOAST trained a few iterations end to end to `harness table --suite seg` on tiny trees in the real layouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.api import TASKS, DataContext
from harness.cli import main
from harness.metrics import confusion_matrix, iou_per_class, mean_iou, miou
from harness.segmentation import build_segmentation

#: a tiny ViT (4 blocks, so the features are blocks 0-3), tiny crops and heads: a few seconds per trial
TINY_ARGS = [
    "--backbone", "vit_tiny_patch16_224", "--weights", "none",
    "--set", "backbone.model_args={img_size: 32, patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2}",
    "--set", "data.crop_size=32", "--set", "data.scale=[64, 32]", "--set", "data.decoder_channels=16",
    "--set", "data.aux_channels=8", "--set", "train.iters=2", "--set", "train.batch_size=2",
    "--set", "train.warmup_iters=1", "--set", "train.num_workers=0", "--set", "train.eval_batch_size=2",
]
VOC_IDS = {"train": ["2007_000032", "2007_000039", "2007_000063", "2007_000068"], "val": ["2007_000121", "2007_000129"]}
CITIES = {"train": [("aachen", "000000_000019"), ("aachen", "000001_000019"), ("bochum", "000000_000313"),
                    ("bochum", "000000_001097")],
          "val": [("frankfurt", "000000_000294"), ("lindau", "000000_000019")]}


def voc_palette() -> list[int]:
    """VOC's colour map (bit-interleaved), 256 x RGB."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def image_and_labels(index: int, values: list[int], size=(40, 30)) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and a label map: background values[0], a rectangle of values[1], its border values[2]."""
    w, h = size
    labels = np.full((h, w), values[0], np.uint8)
    top, left = 5 + index % 4, 8 + index % 5
    labels[top - 1:top + 16, left - 1:left + 21] = values[2]
    labels[top:top + 15, left:left + 20] = values[1]
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[...] = (30, 90, 40)
    rgb[labels == values[1]] = (200, 40 + 10 * index, 60)
    return rgb, labels


def make_voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    for split, ids in VOC_IDS.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, name in enumerate(ids):
            rgb, labels = image_and_labels(i, [0, (15, 1, 12)[i % 3], 255])
            Image.fromarray(rgb).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            mask = Image.fromarray(labels, mode="P")
            mask.putpalette(voc_palette())
            mask.save(voc / "SegmentationClass" / f"{name}.png")
    return voc


def make_cityscapes(root: Path) -> Path:
    city = root / "cityscapes"
    for split, items in CITIES.items():
        for i, (town, number) in enumerate(items):
            rgb, labels = image_and_labels(i, [7, (26, 24)[i % 2], 0], size=(48, 24))
            labels[:3] = 23  # sky
            stem = f"{town}_{number}"
            image_dir, gt_dir = city / "leftImg8bit" / split / town, city / "gtFine" / split / town
            image_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(image_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(labels, mode="L").save(gt_dir / f"{stem}_gtFine_labelIds.png")
    return city


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg-data")
    make_voc(root)
    make_cityscapes(root)
    return root


def ctx_for(root: Path, **settings) -> DataContext:
    return DataContext(data_root=root, cache_dir=root, image_size=32,
                       settings={"crop_size": 32, "scale": [64, 32], **settings})


# ---------------------------------------------------------------------------------------------------- metric
def test_miou_against_a_confusion_matrix_worked_by_hand():
    # 3 classes; label 255 is ignored wherever it is
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    # rows = truth, columns = prediction:  class 0: (0,0) (0,1) (1,3) -> 0,1,0 ; class 1: 1,1 ; class 2: 2,0
    expected = torch.tensor([[2, 1, 0],
                             [0, 2, 0],
                             [1, 0, 1]])
    cm = confusion_matrix(preds, labels, 3)
    assert torch.equal(cm, expected)
    # IoU_c = TP / (TP + FP + FN): 0: 2/(2+1+1) = 0.5 ; 1: 2/(2+1+0) = 2/3 ; 2: 1/(1+0+1) = 0.5
    assert iou_per_class(cm) == pytest.approx([50.0, 200 / 3, 50.0])
    assert mean_iou(cm) == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert miou(preds, labels, 3) == pytest.approx((50 + 200 / 3 + 50) / 3)
    # accumulated over a split, not averaged per image: two halves summed give the same matrix
    halves = confusion_matrix(preds[0], labels[0], 3) + confusion_matrix(preds[1], labels[1], 3)
    assert torch.equal(halves, expected)
    # a class absent from labels and predictions has no IoU and is left out of the mean
    cm4 = confusion_matrix(preds, labels, 4)
    assert iou_per_class(cm4)[3] is None and mean_iou(cm4) == pytest.approx(mean_iou(cm))


def test_cityscapes_label_ids_map_to_the_19_train_ids():
    from tasks.segmentation import CITYSCAPES_TRAIN_IDS, to_train_ids

    ids = np.array([[7, 26, 0], [8, 33, 255], [24, 23, 34], [1, 6, 31]], np.uint8)
    assert to_train_ids(ids).tolist() == [[0, 13, 255], [1, 18, 255], [11, 10, 255], [255, 255, 16]]
    assert sorted(CITYSCAPES_TRAIN_IDS.values()) == list(range(19))
    task = TASKS.get("seg-cityscapes")
    assert (task.num_classes, task.class_names[0], task.class_names[13]) == (19, "road", "car")


# ---------------------------------------------------------------------------------------------------- data
def test_tasks_read_the_real_layouts(tree):
    voc, city = TASKS.get("seg-voc"), TASKS.get("seg-cityscapes")
    assert (voc.kind, voc.metric, voc.num_classes, voc.ignore_index) == ("segmentation", "miou", 21, 255)
    ctx = ctx_for(tree)
    assert voc.check(ctx, deep=True) == [] and city.check(ctx, deep=True) == []
    assert voc.root(ctx) == tree / "VOCdevkit" / "VOC2012" and city.root(ctx) == tree / "cityscapes"

    image, labels = voc.dataset("val", ctx, train=False)[0]
    assert image.shape == (3, 32, 43) and labels.shape == (30, 40)  # rescaled to fit 64x32; labels as on disk
    assert set(labels.unique().tolist()) == {0, 15, 255}  # the palette index, not a colour
    image, labels = voc.dataset("train", ctx, train=True)[1]
    assert image.shape == (3, 32, 32) and labels.shape == (32, 32) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1, 255}

    _, labels = city.dataset("val", ctx, train=False)[0]
    assert labels.shape == (24, 48) and set(labels.unique().tolist()) == {0, 10, 13, 255}  # road, sky, car, void
    assert len(city.dataset("train", ctx, train=True)) == 4
    assert voc.fingerprint("train", ctx) and voc.fingerprint("train", ctx) != voc.fingerprint("val", ctx)


def _check(tmp_path, capsys, tasks: str, deep: bool = False) -> tuple[int, str]:
    args = ["data", "check", "--suite", "seg", "--data-root", str(tmp_path), "--tasks", tasks,
            "--set", "data.crop_size=32"]
    code = main(args + (["--deep"] if deep else []))
    return code, capsys.readouterr().out


def test_data_check_names_each_defect(tmp_path, capsys):
    voc, city = make_voc(tmp_path), make_cityscapes(tmp_path)
    assert _check(tmp_path, capsys, "seg-voc,seg-cityscapes", deep=True)[0] == 0

    # a missing mask
    (voc / "SegmentationClass" / "2007_000039.png").unlink()
    # a mask whose size differs from its image
    Image.new("P", (20, 10)).save(voc / "SegmentationClass" / "2007_000063.png")
    # a palette PNG saved as RGB (its colours read as labels)
    Image.open(voc / "SegmentationClass" / "2007_000121.png").convert("RGB").save(
        voc / "SegmentationClass" / "2007_000121.png")
    # label values outside the class set
    labels = np.zeros((30, 40), np.uint8)
    labels[:5, :5] = 21
    labels[5:9, :5] = 40
    Image.fromarray(labels, mode="L").save(voc / "SegmentationClass" / "2007_000129.png")

    code, out = _check(tmp_path, capsys, "seg-voc", deep=False)
    listing = voc / "ImageSets" / "Segmentation"
    assert code == 1
    assert (f"{listing}/train.txt:2: missing mask {voc}/SegmentationClass/2007_000039.png for image "
            f"{voc}/JPEGImages/2007_000039.jpg") in out
    assert (f"{listing}/train.txt:3: mask {voc}/SegmentationClass/2007_000063.png is 20x10 but its image "
            f"{voc}/JPEGImages/2007_000063.jpg is 40x30 (width x height)") in out
    assert f"{listing}/val.txt:1: mask {voc}/SegmentationClass/2007_000121.png is a RGB image" in out
    assert "palette ('P') PNGs whose palette index is the class id" in out
    assert "outside the class set" not in out  # values are read with --deep
    code, out = _check(tmp_path, capsys, "seg-voc", deep=True)
    assert (f"{listing}/val.txt:2: mask {voc}/SegmentationClass/2007_000129.png has label values outside the "
            "class set (0-20 and 255): 21, 40") in out

    # Cityscapes: a missing labelIds mask, a colour rendering in its place, an id above 33
    gt = city / "gtFine" / "train"
    (gt / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").unlink()
    Image.new("RGBA", (48, 24)).save(gt / "aachen" / "aachen_000001_000019_gtFine_labelIds.png")
    Image.fromarray(np.full((24, 48), 40, np.uint8), mode="L").save(
        gt / "bochum" / "bochum_000000_000313_gtFine_labelIds.png")
    code, out = _check(tmp_path, capsys, "seg-cityscapes", deep=True)
    assert code == 1
    assert f"missing mask {gt}/aachen/aachen_000000_000019_gtFine_labelIds.png" in out
    assert "is a RGBA image" in out and "not the colour rendering <name>_gtFine_color.png" in out
    assert "has label values outside the class set (Cityscapes label ids 0-33): 40" in out


def test_a_missing_dataset_names_the_layout(tmp_path, capsys):
    code, out = _check(tmp_path, capsys, "seg-voc")
    assert code == 1
    assert f"seg-voc: folder {tmp_path}/VOCdevkit/VOC2012 not found (expected VOCdevkit/VOC2012/ with " in out


# ---------------------------------------------------------------------------------------------------- model
def test_features_drop_prompt_tokens_and_resize_position_embeddings():
    """VPT-deep's model in the segmentation wrapper: the maps have the crop's grid (not the backbone's 4x4)."""
    import timm

    from harness.api import METHODS, BuildContext

    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                                 embed_dim=32, depth=4, num_heads=2, dynamic_img_size=True)
    task = TASKS.get("seg-voc")
    ctx = BuildContext(hparams={"prompt_length": 3, "prompt_dropout": 0.0}, suite="t", cache_dir=Path("."),
                       task=task, data=ctx_for(Path("."), decoder_channels=16, aux_channels=8))
    model = build_segmentation(METHODS.get("vpt-deep"), task, backbone, ctx)
    model.eval()
    maps = model.feature_maps(torch.zeros(2, 3, 48, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 6, 8)] * 4
    assert model(torch.zeros(1, 3, 40, 56)).shape == (1, 21, 40, 56)  # padded to the patch grid, cropped back
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"encoder.prompt_embeddings", "encoder.deep_prompt_embeddings", "head.decode",
                         "head.auxiliary"}
    # the method's declared frozen backbone stays in eval mode inside the segmentation model too
    from harness.loop import train_mode

    train_mode(model)
    assert model.head.training and model.encoder.prompt_dropout.training
    assert not any(m.training for m in model.encoder.backbone.modules())


# ---------------------------------------------------------------------------------------------------- end to end
def _tiny_toast_checkpoint(path: Path, dim: int = 32, depth: int = 4) -> Path:
    """A top-down module in the official key layout (a plain state dict), for the tiny ViT."""
    generator = torch.Generator().manual_seed(0)
    state = {"prompt": torch.randn(dim, generator=generator), "top_down_transform": torch.eye(dim)}
    for layer in range(depth):
        for name in ("linear", "linear2"):
            state[f"decoders.{layer}.{name}.weight"] = torch.randn(dim, dim, generator=generator) * 0.02
    torch.save(state, path)
    return path


def test_four_methods_end_to_end_to_the_table(tree, tmp_path, capsys):
    checkpoint = _tiny_toast_checkpoint(tmp_path / "toast.pth")
    args = ["--suite", "seg", "--data-root", str(tree), "--methods", "finetune,vpt-deep,lora,toast", *TINY_ARGS,
            "--set", "settings.vpt-deep.prompt_length=2", "--set", f"pretune.checkpoint={checkpoint}"]
    assert main(["run", *args, "--no-progress", "--no-table"]) == 0
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "results").rglob("*.json"))]
    assert len(records) == 4 * 2
    for record in records:
        assert record["status"] == "ok", record.get("error")
        metrics = record["metrics"]
        assert metrics["metric"] == "miou" and metrics["eval_split"] == "val"
        assert 0.0 <= metrics["eval"] <= 100.0
        ious = metrics["per_class_iou"]
        assert len(ious) == (21 if record["spec"]["task"] == "seg-voc" else 19)
        defined = [v for v in ious.values() if v is not None]
        assert metrics["eval"] == pytest.approx(sum(defined) / len(defined), abs=1e-3)
        assert record["curve"][-1]["steps"] == 2 and record["params"]["head"] > 0
    by_method = {r["spec"]["method"]: r for r in records if r["spec"]["task"] == "seg-voc"}
    assert by_method["finetune"]["params"]["trainable"] > by_method["lora"]["params"]["trainable"] > 0
    assert by_method["toast"]["checkpoint_settings"]["origin"] == "official"

    capsys.readouterr()
    assert main(["table", *args]) == 0
    table = capsys.readouterr().out
    assert "| VOC " in table and "| Cityscapes " in table  # the tasks' display names
    for method in ("finetune", "vpt-deep", "lora", "toast"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} "))
        assert "–" not in row


def test_the_run_header_names_each_task_crop_not_the_classification_size(tree, capsys):
    code = main(["run", "--suite", "seg", "--data-root", str(tree), "--methods", "finetune", "--dry-run",
                 "--no-progress"])
    assert code == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("backbone "))
    assert "inputs seg-voc 512x512, seg-cityscapes 512x1024," in header


def test_toast_segmentation_feeds_back_from_the_middle_block_by_default(tmp_path):
    import timm

    from harness.api import METHODS, BuildContext

    checkpoint = _tiny_toast_checkpoint(tmp_path / "toast.pth")

    def build(hparams):
        backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                     patch_size=8, embed_dim=32, depth=4, num_heads=2, dynamic_img_size=True)
        task = TASKS.get("seg-voc")
        ctx = BuildContext(hparams=hparams, suite="t", cache_dir=tmp_path, task=task,
                           data=ctx_for(tmp_path, decoder_channels=16, aux_channels=8),
                           resolve_artifact=lambda name: checkpoint)
        return METHODS.get("toast").build_segmentation(backbone, task, ctx)

    early, full = build({}).eval(), build({"seg_feedback": "full"}).eval()
    assert (early.encoder.source, early.encoder.target, sorted(early.encoder.decoders)) == (2, 0, ["0", "1"])
    assert (full.encoder.source, full.encoder.target, len(full.encoder.decoders)) == (4, 0, 4)
    out = early(torch.zeros(1, 3, 32, 48))
    assert out.shape == (1, 21, 32, 48) and math.isfinite(float(out.detach().sum()))


# ---------------------------------------------------------------------------------------------------- recipe
def test_suite_file_encodes_the_protocol():
    from harness.sweep import load_suite

    suite = load_suite("seg")
    assert suite.tasks == ["seg-voc", "seg-cityscapes"]
    assert suite.methods == ["finetune", "vpt-deep", "lora", "toast"]
    train = suite.train
    assert train["iters"] == {"seg-voc": 20000, "seg-cityscapes": 40000} and train["batch_size"] == 16
    assert (train["optimizer"], train["schedule"], train["poly_power"], train["warmup_iters"]) == ("adamw", "poly",
                                                                                                  1.0, 1500)
    assert train["no_decay"] == ["pos_embed", "cls_token", "norm"] and train["warmup_ratio"] == 1e-6
    assert suite.protocol["kind"] == "fixed" and suite.protocol["final"] == {"train": "train", "eval": "val"}
    for method in suite.methods:
        for task in suite.tasks:
            assert suite.fixed_for(method, task) == {"lr": 6e-5, "weight_decay": 0.01}
    assert suite.settings_for("vpt-deep", "seg-voc") == {"prompt_length": 50, "prompt_dropout": 0.0}
    voc, city = TASKS.get("seg-voc"), TASKS.get("seg-cityscapes")
    assert (voc.crop_size, voc.scale, city.crop_size, city.scale) == ((512, 512), (2048, 512), (512, 1024),
                                                                      (2048, 1024))


@pytest.mark.parametrize("sets, message", [
    ({"train.iters": 0}, "train.iters: expected an integer > 0"),
    ({"train.iters": {"seg-vocc": 3}}, "train.iters.seg-vocc: unknown task; did you mean: seg-voc?"),
    ({"settings.toast.seg_feedback": "middle"}, "expected one of full, early, late, got 'middle'"),
])
def test_bad_settings_are_refused(sets, message):
    from harness.errors import HarnessError
    from harness.sweep import load_suite

    with pytest.raises(HarnessError, match=message.replace("?", r"\?")):
        load_suite("seg", sets=sets)


def test_poly_schedule_with_linear_warmup():
    from harness.loop import warmup_poly

    assert warmup_poly(0, 10, 100) == pytest.approx(1e-6)
    assert warmup_poly(5, 10, 100) == pytest.approx((1 - 0.5 * (1 - 1e-6)) * 0.95)
    assert warmup_poly(10, 10, 100) == pytest.approx(0.9)
    assert warmup_poly(100, 10, 100) == 0.0


def test_no_decay_on_position_embedding_cls_token_and_norms():
    import timm

    from harness.api import METHODS, BuildContext
    from harness.train import make_optimizer

    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                                 embed_dim=32, depth=2, num_heads=2, dynamic_img_size=True)
    task = TASKS.get("seg-voc")
    ctx = BuildContext(hparams={}, suite="t", cache_dir=Path("."), task=task,
                       data=ctx_for(Path("."), decoder_channels=16, aux_channels=8))
    method = METHODS.get("finetune")
    model = build_segmentation(method, task, backbone, ctx)
    optimizer = make_optimizer(method, model, 6e-5, {"weight_decay": 0.01},
                               {"optimizer": "adamw", "no_decay": ["pos_embed", "cls_token", "norm"]})
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, exempt = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.01
    assert {"encoder.backbone.pos_embed", "encoder.backbone.cls_token", "encoder.backbone.norm.weight",
            "encoder.backbone.blocks.0.norm1.bias"} <= set(exempt)
    assert "encoder.backbone.blocks.0.attn.qkv.bias" in decayed and "head.decode.classifier.1.weight" in decayed


def test_an_iteration_budget_stops_mid_pass_and_evaluates_once():
    from harness.loop import fit

    model = torch.nn.Linear(3, 2)
    data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.tensor([0, 1] * 5))
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # 3 batches per pass
    evaluated = []
    result = fit(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), epochs=3, per_step=True,
                 evaluate=lambda m: evaluated.append(1) or {"eval": 1.0}, max_steps=7, evaluate_every=3,
                 amp=False)
    assert [e["steps"] for e in result.history] == [3, 6, 7] and len(evaluated) == 1
    assert "eval" in result.history[-1] and "eval" not in result.history[0]
