"""Pre-tuning at scale (issue 19 §2): the cached file list of an ImageNet-style folder (methods/image_folder.py) and
``harness pretune --executor slurm`` (the slurm-marked test submits to the local cluster; skipped when it is down)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from methods.image_folder import CachedImageFolder, listing_path


def _tree(root: Path, classes: dict[str, list[str]]) -> Path:
    """Empty 'image' files (listing never opens them), plus files ImageFolder skips and a nested sub-folder."""
    for name, files in classes.items():
        for rel in files:
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / name / rel).write_bytes(b"")
    return root


TREE = {"n02": ["b.JPEG", "a.png", "notes.txt", "sub/c.jpg"], "n01": ["z.jpeg", "y.JPG"], "n10": ["x.webp"]}


def _same(cached, reference) -> None:
    assert cached.classes == reference.classes and cached.class_to_idx == reference.class_to_idx
    assert cached.samples == reference.samples and cached.targets == reference.targets


def test_the_cached_listing_is_imagefolders_and_a_second_build_walks_nothing(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import ImageFolder

    root = _tree(tmp_path / "train", TREE)
    cache = tmp_path / "cache"
    first = CachedImageFolder(str(root), cache_dir=cache)
    _same(first, ImageFolder(str(root)))
    out = capsys.readouterr().out
    assert re.search(r"listed 6 images in 3 classes in [\d.]+ s; cached at .*image-folders", out), out
    assert listing_path(cache, root).is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("the folder was listed again")

    monkeypatch.setattr(os, "scandir", refuse)
    monkeypatch.setattr(os, "walk", refuse)
    monkeypatch.setattr(os, "listdir", refuse)
    second = CachedImageFolder(str(root), cache_dir=cache)  # another rank, a resume
    _same(second, first)
    assert capsys.readouterr().out == ""
    monkeypatch.undo()
    # the same folder through a symlink: one cache entry (keyed by the resolved path), paths as given
    link = tmp_path / "link"
    link.symlink_to(root)
    _same(CachedImageFolder(str(link), cache_dir=cache), ImageFolder(str(link)))
    assert capsys.readouterr().out == "" and len(list((cache / "image-folders").glob("*.json"))) == 1


def test_a_new_class_or_image_lists_the_folder_again(tmp_path, capsys):
    from torchvision.datasets import ImageFolder

    root = _tree(tmp_path / "train", TREE)
    cache = tmp_path / "cache"
    CachedImageFolder(str(root), cache_dir=cache)
    capsys.readouterr()
    stamp = os.stat(root).st_mtime_ns
    _tree(root, {"n05": ["q.png"]})
    os.utime(root, ns=(stamp + 10**9, stamp + 10**9))  # coarse-mtime file systems: make the change visible
    again = CachedImageFolder(str(root), cache_dir=cache)
    _same(again, ImageFolder(str(root)))
    assert "listed 7 images in 4 classes" in capsys.readouterr().out and again.class_to_idx["n05"] == 2

    folder = root / "n01"
    stamp = os.stat(folder).st_mtime_ns
    (folder / "w.png").write_bytes(b"")
    os.utime(folder, ns=(stamp + 10**9, stamp + 10**9))
    _same(CachedImageFolder(str(root), cache_dir=cache), ImageFolder(str(root)))
    assert "listed 8 images in 4 classes" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- --executor
def test_the_command_refuses_an_unknown_executor_and_a_missing_folder_before_submitting(make_suite, capsys):
    from conftest import TINY_PRETUNE
    from harness.cli import main

    suite = str(make_suite("stagechecks", methods=["toast"], pretune={**TINY_PRETUNE, "auto": False}))
    assert main(["pretune", "--suite", suite, "--executor", "slrum"]) == 2
    assert "unknown executor 'slrum'; did you mean: slurm?" in capsys.readouterr().err
    code = main(["pretune", "--suite", suite, "--executor", "slurm", "--set", "pretune.image_folder=/nowhere/train"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pretune.image_folder /nowhere/train is not a folder" in err, err


@pytest.mark.slurm
def test_a_pretune_submitted_to_slurm_is_found_by_a_later_run(make_suite, capsys):
    """One command submits the stage; the job writes where an inline pre-tune would, so a run (no auto) finds it."""
    from test_slurm import DOWN

    if DOWN:
        pytest.skip(DOWN)
    from conftest import TINY_PRETUNE
    from harness.cli import main

    fixed = {"protocol": {"kind": "fixed", "final": {"train": "train800val200", "eval": "test"}, "seeds": [42]},
             "fixed": {"toast": {"*": {"lr": 0.1, "weight_decay": 0.0}}}, "grids": None}
    suite = str(make_suite("slurmstage", methods=["toast"], tasks=["demo-digits"],
                           pretune={**TINY_PRETUNE, "auto": False, "seed": 31}, slurm={"time": 5, "cpus": 1},
                           executor={"code_check": "warn"}, **fixed))
    code = main(["pretune", "--suite", suite, "--executor", "slurm", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    job = re.search(r"as SLURM job (\d+)", out).group(1)
    try:
        made = Path(re.search(r"toast: toast-pretuned -> (\S+)", out).group(1))
        assert not made.exists()  # the job makes it; the log it writes is read below
        deadline = time.monotonic() + 35
        while time.monotonic() < deadline and subprocess.run(
                ["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
            time.sleep(0.5)
        log = next(Path(re.search(r"logs: (\S+)/", out).group(1)).glob("*_log.out"), None)
        assert made.is_file(), log.read_text() if log else "no log"
        assert "pre-tuned toast's top-down module" in log.read_text()
        stamp = made.stat().st_mtime_ns
        code = main(["run", "--suite", suite, "--no-progress", "--no-table"])
        out = capsys.readouterr().out
        assert code == 0 and "pre-tuned toast" not in out and made.stat().st_mtime_ns == stamp, out
        code = main(["pretune", "--suite", suite, "--executor", "slurm"])  # made: nothing to submit
        assert code == 0 and f"toast: toast-pretuned -> {made} (--force to redo); nothing submitted" in \
            capsys.readouterr().out
    finally:
        subprocess.run(["scancel", job], capture_output=True)


def test_a_per_image_progress_bar_shows_images_per_second_and_the_time_left(capsys):
    """Pre-tuning's bar (``fit(progress_images=True)``): images over the whole run, with a rate and an ETA."""
    import torch

    from harness.api import fit

    model = torch.nn.Linear(3, 2)
    data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    fit(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, amp=False, progress="pre-tuning",
        progress_images=True)
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"20(\.0)?/20(\.0)? \[[\d:]+<[\d:]+, +[\d.]+k?img/s, epoch=2/2", bar), bar


def test_pretuning_on_an_image_folder_reads_the_cached_listing(tmp_path, capsys):
    """``pretune_dataset`` builds the cached folder (under the DataContext's cache dir): the same dataset as
    torchvision's, listed once, its images loaded and transformed as before."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from conftest import TINY_BACKBONE
    from harness.api import DataContext, build_backbone
    from methods.toast_pretune import DEFAULTS, pretune_dataset

    root = tmp_path / "train"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (60 * i, 90, 30)).save(root / name / f"{i}.png")
    data = DataContext(data_root=None, cache_dir=tmp_path / "cache", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg = {**DEFAULTS, "image_folder": str(root)}
    backbone = build_backbone(TINY_BACKBONE)
    dataset, classes, fingerprint = pretune_dataset(cfg, data, backbone)
    assert isinstance(dataset, CachedImageFolder) and classes == 2 and fingerprint == f"imagefolder:{root}:4"
    assert dataset.samples == ImageFolder(str(root)).samples and dataset[3][0].shape == (3, 32, 32)
    assert "listed 4 images in 2 classes" in capsys.readouterr().out
    pretune_dataset(cfg, data, backbone)  # a resume, another rank: read, not listed
    assert "listed" not in capsys.readouterr().out
