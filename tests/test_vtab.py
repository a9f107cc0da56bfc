"""VTAB-1k tasks (tasks/vtab.py) and suite (sweeps/vtab.yaml): registry, layout, preprocessing, fingerprints, and
the protocol end to end on a tiny tree in the image-folder export layout."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.api import TASKS, DataContext
from harness.cli import main
from harness.errors import HarnessError
from harness.sweep import load_suite
from tasks import INDEX

#: a handful of images per split: far from VTAB's 800/200/1000, so runs set data.strict_counts=false
SIZES = {"train800": 6, "val200": 4, "train800val200": 10, "test": 6}
TINY_ARGS = [
    "--backbone", "vit_tiny_patch16_224", "--weights", "none",
    "--set", "backbone.model_args={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "--set", "data.image_size=32", "--set", "data.strict_counts=false", "--set", "train.num_workers=0",
    "--set", "train.batch_size=4", "--set", "train.eval_batch_size=64", "--set", "train.warmup_epochs=0",
    "--epochs", "1",
]


def write_jpeg(path: Path, label: int, index: int, size: tuple[int, int] = (20, 14)) -> None:
    """A real JPEG whose colour depends on the label (so a model could learn it), with some per-image noise."""
    rng = np.random.default_rng(label * 1000 + index)
    base = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 31 + 160) % 256], np.float32)
    pixels = np.clip(base + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)


def make_vtab_tree(root: Path, folders: list[str] | tuple[str, ...] = ("dtd", "dsprites_loc"),
                   sizes: dict[str, int] | None = None, classes: int = 2) -> Path:
    """``<root>/<folder>/{train800,val200,train800val200,test}.txt`` and ``images/<split>/NNNNNN.jpg``, exactly
    as NOAH's exporter writes them (one space, label last)."""
    for folder in folders:
        task = root / folder
        for split, n in (sizes or SIZES).items():
            lines = []
            for i in range(n):
                rel = f"images/{split}/{i:06d}.jpg"
                write_jpeg(task / rel, i % classes, i)
                lines.append(f"{rel} {i % classes}")
            (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def ctx_for(root: Path | None, **settings) -> DataContext:
    """A data context for the tiny trees: counts relaxed unless a test says otherwise."""
    settings.setdefault("strict_counts", False)
    return DataContext(data_root=root, cache_dir=root or Path("."), image_size=32, settings=settings)


# ---------------------------------------------------------------------------------------------------- registry
def test_nineteen_tasks_with_classes_and_groups():
    names = [n for n in TASKS.names() if n.startswith("vtab-")]
    assert len(names) == 19
    assert {n for n, module in INDEX.items() if module == "tasks.vtab"} == set(names)
    expected = {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
                "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
                "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
                "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9}
    groups: dict[str, int] = {}
    for folder, classes in expected.items():
        task = TASKS.get(f"vtab-{folder}")
        assert (task.folder, task.num_classes, task.family) == (folder, classes, "vtab")
        assert task.splits == ("train800", "val200", "train800val200", "test")
        groups[task.group] = groups.get(task.group, 0) + 1
    assert groups == {"natural": 7, "specialized": 4, "structured": 8}


def test_suite_file_encodes_the_protocol():
    suite = load_suite("vtab")
    assert len(suite.tasks) == 19
    paper = suite.raw["task_lists"]["vtab-paper"]
    assert len(paper) == 18 and "vtab-resisc45" not in paper and set(paper) < set(suite.tasks)
    assert suite.protocol["search"] == {"train": "train800", "eval": "val200", "seed": 42}
    assert suite.protocol["final"] == {"train": "train800val200", "eval": "test"}
    assert suite.seeds == [42, 44, 82, 100, 800]
    assert suite.train["epochs"] == 100 and suite.train["batch_size"] == 32
    assert suite.train["lr_scaling"] == "batch/256"
    assert suite.backbone == {"name": "deit_base_patch16_224.fb_in1k", "weights": "timm"}  # paper A.1
    wd = [0.01, 0.001, 0.0001, 0.0]
    assert suite.grid_for("toast") == {"lr": [1.0, 0.5, 0.25, 0.1, 0.05, 0.025, 0.01], "weight_decay": wd}
    assert suite.grid_for("linear")["lr"] == [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05]
    assert suite.grid_for("finetune")["lr"] == [0.001, 0.0001, 0.0005, 0.005]
    assert suite.grid_for("vpt-deep")["lr"] == [5, 2.5, 1, 50, 25, 10, 0.5, 0.25, 0.1, 0.05]
    assert suite.data["preprocess"] == "vpt" and suite.data["image_size"] == 224
    assert suite.data["normalize"] == "backbone"


# ---------------------------------------------------------------------------------------------------- data
def test_dataset_reads_the_export_layout(tmp_path):
    root = make_vtab_tree(tmp_path / "vtab-1k", ["dtd"])
    task = TASKS.get("vtab-dtd")
    ctx = ctx_for(root)
    assert task.check(ctx) == []
    default = DataContext(data_root=root, cache_dir=tmp_path, image_size=32)
    assert len(task.check(default)) == 3  # counts are strict by default: 6 != 800, 4 != 200, 10 != 1000
    data = task.dataset("train800", ctx, train=True)
    assert len(data) == 6
    image, label = data[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    # no augmentation: train and eval give the same tensor
    assert torch.equal(data[1][0], task.dataset("train800", ctx, train=False)[1][0])


@pytest.mark.parametrize("variant", ["vpt", "noah", "noah-inception", "ssf"])
def test_preprocess_variants(tmp_path, variant):
    root = make_vtab_tree(tmp_path, ["dtd"], sizes={"train800": 2, "val200": 1, "train800val200": 3, "test": 1})
    image, _ = TASKS.get("vtab-dtd").dataset("test", ctx_for(root, preprocess=variant), train=False)[0]
    assert image.shape == (3, 32, 32)
    if variant == "noah-inception":
        assert image.min() >= -1.0 and image.max() <= 1.0


def test_unknown_preprocess_is_a_clear_error(tmp_path):
    root = make_vtab_tree(tmp_path, ["dtd"])
    ctx = ctx_for(root, preprocess="tf")
    assert TASKS.get("vtab-dtd").check(ctx) == [
        "vtab-dtd: data.preprocess: unknown variant 'tf' (expected one of vpt, noah, noah-inception, ssf)"]
    with pytest.raises(HarnessError, match="unknown variant 'tf'"):
        TASKS.get("vtab-dtd").dataset("test", ctx, train=False)


def test_fingerprint_is_the_sha256_of_the_list_file(tmp_path):
    root = make_vtab_tree(tmp_path, ["dtd"])
    expected = hashlib.sha256((root / "dtd" / "val200.txt").read_bytes()).hexdigest()[:16]
    assert TASKS.get("vtab-dtd").fingerprint("val200", ctx_for(root)) == expected


def test_task_folder_under_vtab_1k_or_on_its_own(tmp_path):
    make_vtab_tree(tmp_path / "data" / "vtab-1k", ["dtd"])
    task = TASKS.get("vtab-dtd")
    assert task.root(ctx_for(tmp_path / "data")) == tmp_path / "data" / "vtab-1k" / "dtd"
    make_vtab_tree(tmp_path / "elsewhere", ["dtd"])
    ctx = ctx_for(None, roots={"vtab-dtd": str(tmp_path / "elsewhere" / "dtd")})
    assert task.root(ctx) == tmp_path / "elsewhere" / "dtd" and task.check(ctx) == []


# ---------------------------------------------------------------------------------------------------- end to end
def _records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.rglob("*.json"))]


def test_protocol_end_to_end_and_table(tmp_path, capsys):
    root = make_vtab_tree(tmp_path / "vtab-1k")
    args = ["--suite", "vtab", "--tasks", "vtab-dtd,vtab-dsprites_loc", "--methods", "linear",
            "--data-root", str(root), "--seeds", "2", "--grid-points", "2", *TINY_ARGS]
    assert main(["run", *args, "--no-progress", "--no-table"]) == 0
    records = _records(tmp_path / "results")
    assert len(records) == 2 * (2 + 2)  # per task: 2 search points + 2 final seeds
    assert all(r["status"] == "ok" for r in records)
    for record in records:
        spec = record["spec"]
        folder = spec["task"].removeprefix("vtab-")
        split_files = {s: root / folder / f"{s}.txt" for s in (spec["train_split"], spec["eval_split"])}
        assert record["data_fingerprint"] == {
            s: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for s, f in split_files.items()}
        expected_splits = {"search": ("train800", "val200"), "final": ("train800val200", "test")}
        assert (spec["train_split"], spec["eval_split"]) == expected_splits[spec["stage"]]
        assert record["weights_fingerprint"] is None  # --weights none
    finals = [r for r in records if r["spec"]["stage"] == "final"]
    assert sorted(r["spec"]["seed"] for r in finals) == [42, 42, 44, 44]

    capsys.readouterr()
    assert main(["table", *args]) == 0
    table = capsys.readouterr().out
    assert "| DTD " in table and "| dSpr-Loc " in table and "linear" in table  # the paper's short names
    row = next(line for line in table.splitlines() if "linear" in line)
    assert "–" not in row  # both cells filled

    assert main(["run", *args, "--no-progress", "--no-table"]) == 0  # rerunning is resuming: nothing left
    assert "nothing to run" in capsys.readouterr().out


def test_dry_run_plans_the_paper_list(tmp_path, capsys):
    folders = [n.removeprefix("vtab-") for n in load_suite("vtab").tasks]
    root = make_vtab_tree(tmp_path, folders, sizes={"train800": 1, "val200": 1, "train800val200": 1, "test": 1})
    code = main(["run", "--suite", "vtab", "--tasks", "vtab-paper", "--methods", "linear,finetune",
                 "--data-root", str(root), "--set", "data.strict_counts=false", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 methods x 18 tasks = 36 cells" in out and "vtab-resisc45" not in out
    # linear: 10 lr x 4 wd = 40 search trials, then 5 final seeds
    assert any(line.split()[:3] == ["linear/vtab-cifar", "40", "5"] for line in out.splitlines())


def test_an_undecodable_image_stops_the_run_with_its_list_line(tmp_path, capsys):
    root = make_vtab_tree(tmp_path / "vtab-1k", ["dtd"])
    (root / "dtd" / "images" / "train800" / "000002.jpg").write_bytes(b"\xff\xd8 broken")
    code = main(["run", "--suite", "vtab", "--tasks", "vtab-dtd", "--methods", "linear", "--data-root", str(root),
                 "--seeds", "1", "--grid-points", "1", "--no-progress", "--no-table", *TINY_ARGS])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("harness: error: ")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0]  # one message, last (after the cache's size)
    assert errors[0].startswith(f"harness: error: {root}/dtd/train800.txt:3: cannot decode "
                                f"{root}/dtd/images/train800/000002.jpg: ")
    assert not list((Path(os.environ["HARNESS_CACHE_DIR"]) / "features").glob(".*.tmp"))  # no half-built cache left
