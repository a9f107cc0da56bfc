"""FGVC tasks (tasks/fgvc.py) and suites (sweeps/fgvc.yaml, sweeps/fgvc-search.yaml): VPT's JSON-split layout,
labels remapped over the union of splits, the transforms, and both protocols end to end on tiny trees."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from harness.api import TASKS, DataContext
from harness.cli import main
from harness.sweep import load_suite
from tasks import INDEX
from test_vtab import TINY_ARGS, write_jpeg

#: task -> (folder, image folder, how a key looks): the images sit at <folder>/<image folder>/<key>
LAYOUT = {
    "fgvc-cub": ("CUB_200_2011", "images", lambda c, i: f"{c + 1:03d}.Bird_{c}/Bird_{c}_{i:04d}.jpg"),
    "fgvc-nabirds": ("nabirds", "images", lambda c, i: f"{c:04d}/{i:032x}.jpg"),
    "fgvc-flowers": ("OxfordFlower", "", lambda c, i: f"jpg/image_{c:03d}{i:03d}.jpg"),
    "fgvc-dogs": ("Stanford-dogs", "Images", lambda c, i: f"n02{c:06d}-breed_{c}/n02{c:06d}_{i}.jpg"),
    "fgvc-cars": ("Stanford-cars", "", lambda c, i: f"car_ims/{c:03d}{i:03d}.jpg"),
}
PER_SPLIT = {"train": 3, "val": 1, "test": 2}


def make_fgvc_tree(root: Path, tasks: tuple[str, ...] = ("fgvc-flowers", "fgvc-dogs"),
                   class_ids: tuple[int, ...] = (0, 1, 2), per_split: dict[str, int] | None = None,
                   indent: int | None = None) -> Path:
    """Dataset folders with ``{train,val,test}.json`` ({key: class id}, as VPT's split files) and real JPEGs under
    each dataset's image root. ``indent`` writes one entry per line (VPT's files are one line)."""
    for name in tasks:
        folder, images, key = LAYOUT[name]
        base = root / folder
        index = 0
        for split, n in (per_split or PER_SPLIT).items():
            mapping = {}
            for c in class_ids:
                for _ in range(n):
                    rel = key(c, index)
                    write_jpeg((base / images / rel) if images else base / rel, c % 7, index, size=(24, 18))
                    mapping[rel] = c
                    index += 1
            (base / f"{split}.json").write_text(json.dumps(mapping, indent=indent))
    return root


def ctx_for(root: Path | None, size: int = 32, **settings) -> DataContext:
    settings.setdefault("strict_counts", False)
    return DataContext(data_root=root, cache_dir=root or Path("."), image_size=size, settings=settings)


def test_five_datasets_registered():
    expected = {"fgvc-cub": ("CUB_200_2011", "images", 200), "fgvc-nabirds": ("nabirds", "images", 555),
                "fgvc-flowers": ("OxfordFlower", "", 102), "fgvc-dogs": ("Stanford-dogs", "Images", 120),
                "fgvc-cars": ("Stanford-cars", "", 196)}
    assert {n for n, m in INDEX.items() if m == "tasks.fgvc"} == set(expected)
    for name, (folder, images, classes) in expected.items():
        task = TASKS.get(name)
        assert (task.folder, task.images, task.num_classes, task.splits) == (folder, images, classes,
                                                                             ("train", "val", "test"))


@pytest.mark.parametrize("name", list(LAYOUT))
def test_each_dataset_reads_its_image_root(tmp_path, name):
    root = make_fgvc_tree(tmp_path, (name,), per_split={"train": 1, "val": 1, "test": 1})
    task = TASKS.get(name)
    assert task.check(ctx_for(root)) == []
    image, label = task.dataset("test", ctx_for(root), train=False)[2]
    assert image.shape == (3, 32, 32) and label == 2


def test_labels_are_remapped_over_the_union_of_splits(tmp_path):
    """NABirds-style ids (not contiguous); a class missing from val keeps its id there."""
    root = make_fgvc_tree(tmp_path, ("fgvc-nabirds",), class_ids=(295, 313, 999))
    val = json.loads((root / "nabirds" / "val.json").read_text())
    (root / "nabirds" / "val.json").write_text(json.dumps({k: v for k, v in val.items() if v != 295}))
    task = TASKS.get("fgvc-nabirds")
    train = task.dataset("train", ctx_for(root), train=False)
    val = task.dataset("val", ctx_for(root), train=False)
    assert sorted({item[1] for item in train.items}) == [0, 1, 2]
    assert sorted({item[1] for item in val.items}) == [1, 2]  # 313 -> 1, 999 -> 2, as in train


def test_transforms_follow_vpt(tmp_path):
    root = make_fgvc_tree(tmp_path, ("fgvc-flowers",))
    task = TASKS.get("fgvc-flowers")
    train_tf, eval_tf = task.transform(ctx_for(root, 224), True), task.transform(ctx_for(root, 224), False)
    assert [type(t).__name__ for t in train_tf.transforms] == [
        "Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert [type(t).__name__ for t in eval_tf.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert train_tf.transforms[0].size == 256 and eval_tf.transforms[1].size == (224, 224)
    assert tuple(eval_tf.transforms[-1].mean) == (0.485, 0.456, 0.406)
    data = task.dataset("train", ctx_for(root), train=True)
    torch.manual_seed(0)
    a = data[0][0]
    torch.manual_seed(1)
    b = data[0][0]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)  # random crop / flip
    evaluation = task.dataset("train", ctx_for(root), train=False)
    assert torch.equal(evaluation[0][0], evaluation[0][0])


def test_fingerprint_is_the_sha256_of_the_json(tmp_path):
    root = make_fgvc_tree(tmp_path, ("fgvc-dogs",))
    expected = hashlib.sha256((root / "Stanford-dogs" / "test.json").read_bytes()).hexdigest()[:16]
    assert TASKS.get("fgvc-dogs").fingerprint("test", ctx_for(root)) == expected


def test_one_dataset_root_on_its_own(tmp_path):
    make_fgvc_tree(tmp_path / "scratch", ("fgvc-cub",))
    ctx = ctx_for(tmp_path / "nowhere", roots={"fgvc-cub": str(tmp_path / "scratch" / "CUB_200_2011")})
    assert TASKS.get("fgvc-cub").check(ctx) == []


def test_suite_files_encode_the_recipes():
    suite = load_suite("fgvc")
    assert suite.tasks == ["fgvc-cub", "fgvc-nabirds", "fgvc-flowers", "fgvc-dogs", "fgvc-cars"]
    assert suite.protocol["kind"] == "fixed" and suite.protocol["final"] == {"train": "train", "eval": "test"}
    assert suite.train["batch_size"] == 32 and suite.train["lr_scaling"] == "none" and suite.train["epochs"] == 100
    toast_lr = {"fgvc-cub": 0.03, "fgvc-nabirds": 0.01, "fgvc-flowers": 0.01, "fgvc-dogs": 0.02, "fgvc-cars": 0.02}
    wd = {"fgvc-cub": 5e-4, "fgvc-nabirds": 0.01, "fgvc-flowers": 1e-4, "fgvc-dogs": 1e-4, "fgvc-cars": 1e-4}
    for task in suite.tasks:
        for method in ("toast", "toast-lite"):
            assert suite.fixed_for(method, task) == {"lr": toast_lr[task], "weight_decay": wd[task]}
        for method in ("lora", "vpt-deep"):
            assert suite.fixed_for(method, task) == {"lr": 0.01, "weight_decay": wd[task]}
        assert suite.fixed_for("finetune", task) == {"lr": 0.003, "weight_decay": wd[task]}
    search = load_suite("fgvc-search")
    assert search.protocol["search"]["train"] == "train" and search.protocol["search"]["eval"] == "val"
    assert search.protocol["final"] == {"train": "train", "eval": "test"}
    assert 0.05 not in search.grid_for("vpt-deep")["lr"]
    for s in (suite, search):  # docs/protocol.md §2.1, §2.2, §6.2
        assert s.backbone == {"name": "deit_base_patch16_224.fb_in1k", "weights": "timm"}
        assert s.data["normalize"] == "backbone"
        assert s.seeds == [42, 44, 82, 100, 800]


def _records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.rglob("*.json"))]


def test_fixed_recipe_end_to_end_and_table(tmp_path, capsys):
    root = make_fgvc_tree(tmp_path / "fgvc")
    args = ["--suite", "fgvc", "--tasks", "fgvc-flowers,fgvc-dogs", "--methods", "finetune",
            "--data-root", str(root), "--seeds", "1", *TINY_ARGS]  # --seeds 1: one run, as the official configs
    assert main(["run", *args, "--no-progress", "--no-table"]) == 0
    records = _records(tmp_path / "results")
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    for record in records:
        spec = record["spec"]
        assert (spec["stage"], spec["train_split"], spec["eval_split"], spec["seed"]) == ("final", "train", "test", 42)
        assert spec["hparams"]["lr"] == 0.003 and spec["hparams"]["weight_decay"] == 0.0001
        folder = LAYOUT[spec["task"]][0]
        assert record["data_fingerprint"]["test"] == hashlib.sha256(
            (root / folder / "test.json").read_bytes()).hexdigest()[:16]
    capsys.readouterr()
    assert main(["table", *args]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "finetune" in line)
    assert "–" not in row


def test_val_search_end_to_end(tmp_path, capsys):
    root = make_fgvc_tree(tmp_path / "fgvc", ("fgvc-cub",))
    args = ["--suite", "fgvc-search", "--tasks", "fgvc-cub", "--methods", "linear", "--data-root", str(root),
            "--grid-points", "2", "--seeds", "2", *TINY_ARGS]
    assert main(["run", *args, "--no-progress", "--no-table"]) == 0
    records = _records(tmp_path / "results")
    stages = sorted((r["spec"]["stage"], r["spec"]["train_split"], r["spec"]["eval_split"]) for r in records)
    assert stages == [("final", "train", "test")] * 2 + [("search", "train", "val")] * 2
    search = [r for r in records if r["spec"]["stage"] == "search"]
    finals = [r for r in records if r["spec"]["stage"] == "final"]
    # the finals retrain the search winner: best val metric, ties to the smaller lr, then to the earlier grid point
    # (docs/protocol.md §6.1); the first two points of linear's grid are lr 50 with weight decay 0.01, 0.001
    wd_order = load_suite("fgvc-search").grid_for("linear")["weight_decay"]
    winner = min(search, key=lambda r: (-r["metrics"]["eval"], r["spec"]["hparams"]["lr"],
                                        wd_order.index(r["spec"]["hparams"]["weight_decay"])))
    point = {k: winner["spec"]["hparams"][k] for k in ("lr", "weight_decay")}
    assert [{k: r["spec"]["hparams"][k] for k in point} for r in finals] == [point, point]
    assert sorted(r["spec"]["seed"] for r in finals) == [42, 44]
    # the table's cell is the mean of the two final records' last-epoch test metric
    capsys.readouterr()
    assert main(["table", *args, "--format", "csv"]) == 0
    row = next(r for r in csv.DictReader(io.StringIO(capsys.readouterr().out)) if r.get("method") == "linear")
    assert int(row["fgvc-cub_n"]) == 2
    assert float(row["fgvc-cub"]) == pytest.approx(sum(r["metrics"]["eval"] for r in finals) / 2, abs=1e-4)
