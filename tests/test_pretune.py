"""``harness pretune`` (generic: a method's declared stage) and TOAST's pre-tuning through the one loop: resume from
its checkpoint, divergence, the command's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.api import DataContext
from harness.errors import HarnessError
from methods.toast_checkpoint import read_checkpoint
from methods.toast_pretune import DEFAULTS, resume_path, run_pretune
from conftest import TINY_BACKBONE, TINY_PRETUNE

#: 2 epochs of 4 steps (the 1,000 upstream validation images in batches of 250), the lr moving every step
TWO_EPOCHS = {**DEFAULTS, **TINY_PRETUNE, "epochs": 2, "warmup_epochs": 1, "cooldown_epochs": 0, "lr": 2e-3}


def _data(cache: Path) -> DataContext:
    return DataContext(data_root=None, cache_dir=cache, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


class Preempted(RuntimeError):
    """Stands in for a SLURM preemption or Ctrl-C right after a checkpoint was written."""


def test_an_interrupted_pretuning_resumes_from_its_checkpoint(monkeypatch, tmp_path, session_cache):
    import harness.loop

    straight = tmp_path / "straight.pt"
    meta = run_pretune(TINY_BACKBONE, TWO_EPOCHS, "toast", straight, data=_data(session_cache), progress=False)
    assert "resumed_from_epoch" not in meta and [e["epoch"] for e in meta["epochs"]] == [1, 2]

    real_save = harness.loop._save_checkpoint
    saved: list[int] = []

    def save_then_die(path, epoch, *args, **kwargs):
        real_save(path, epoch, *args, **kwargs)
        saved.append(epoch)
        raise Preempted(f"killed after epoch {epoch}")

    resumed = tmp_path / "resumed.pt"
    monkeypatch.setattr(harness.loop, "_save_checkpoint", save_then_die)
    with pytest.raises(Preempted):
        run_pretune(TINY_BACKBONE, TWO_EPOCHS, "toast", resumed, data=_data(session_cache), progress=False)
    assert saved == [1] and resume_path(resumed).is_file() and not resumed.exists()
    monkeypatch.setattr(harness.loop, "_save_checkpoint", real_save)

    meta2 = run_pretune(TINY_BACKBONE, TWO_EPOCHS, "toast", resumed, data=_data(session_cache), progress=False)
    assert meta2["resumed_from_epoch"] == 1
    assert meta2["epochs"] == meta["epochs"]  # epoch 1 from the checkpoint's history, epoch 2 trained now
    assert not resume_path(resumed).exists() and not Path(f"{resumed}.ckpt.json").exists()  # gone once finished
    one, two = read_checkpoint(straight).state, read_checkpoint(resumed).state
    assert set(one) == set(two)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(one["top_down_transform"], torch.eye(32))  # it did train


def test_a_checkpoint_of_other_settings_is_not_resumed(monkeypatch, tmp_path, session_cache, capsys):
    import harness.loop

    output = tmp_path / "stage.pt"
    real_save = harness.loop._save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Preempted("killed")

    monkeypatch.setattr(harness.loop, "_save_checkpoint", save_then_die)
    with pytest.raises(Preempted):
        run_pretune(TINY_BACKBONE, TWO_EPOCHS, "toast", output, data=_data(session_cache), progress=False)
    monkeypatch.setattr(harness.loop, "_save_checkpoint", real_save)
    other = {**TWO_EPOCHS, "lr": 1e-3}
    meta = run_pretune(TINY_BACKBONE, other, "toast", output, data=_data(session_cache), progress=False)
    assert "resumed_from_epoch" not in meta and meta["pretune"]["lr"] == 1e-3
    assert f"discarding {resume_path(output)}" in capsys.readouterr().out


def test_a_diverging_pretuning_is_an_error_and_writes_nothing(tmp_path, session_cache):
    cfg = {**DEFAULTS, **TINY_PRETUNE, "lr": 1e30, "var_loss_weight": 0.0}
    output = tmp_path / "nan.pt"
    with pytest.raises(HarnessError, match=r"pre-tuning diverged in epoch 1 .*lower pretune.lr \(now 1e\+30\)"):
        run_pretune(TINY_BACKBONE, cfg, "toast", output, data=_data(session_cache), progress=False)
    assert not output.exists() and not resume_path(output).exists() and not Path(f"{output}.ckpt.json").exists()


# ---------------------------------------------------------------------------------------------------- the command
def _run(args: list[str], capsys) -> tuple[int, str, str]:
    from harness.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_refuses_a_method_without_a_stage(make_suite, capsys):
    suite = make_suite("nostage", methods=["linear", "toast"], pretune={**TINY_PRETUNE, "auto": False})
    code, _, err = _run(["pretune", "--suite", str(suite), "--method", "linear"], capsys)
    assert code == 2 and "method linear has no stage to prepare" in err and "that do: toast" in err, err
    suite = make_suite("nostages", methods=["linear", "finetune"])
    code, _, err = _run(["pretune", "--suite", str(suite)], capsys)
    assert code == 2 and "no method of suite 'nostages' (linear, finetune) has a stage to prepare" in err, err


def test_the_command_refuses_one_output_for_several_artifacts(make_suite, capsys, tmp_path):
    suite = make_suite("twostages", methods=["toast", "toast-late"], pretune={**TINY_PRETUNE, "auto": False})
    code, _, err = _run(["pretune", "--suite", str(suite), "--output", str(tmp_path / "x.pt")], capsys)
    assert code == 2 and "--output names one file, but 2 artifacts" in err, err
    code, _, err = _run(["pretune", "--suite", str(suite), "--force"], capsys)
    assert code == 2 and "--force with several methods (toast, toast-late)" in err, err
    assert not (tmp_path / "x.pt").exists()


def test_methods_sharing_an_architecture_share_the_stage(make_suite, capsys, tmp_path):
    suite = make_suite("sharedstage", methods=["linear", "toast", "toast-notoken"],
                       pretune={**TINY_PRETUNE, "auto": False, "seed": 7})
    code, out, err = _run(["pretune", "--suite", str(suite), "--no-progress"], capsys)
    assert code == 0, err
    made = [line.split(" -> ")[1] for line in out.splitlines() if " -> " in line]
    assert len(made) == 2 and made[0] == made[1], out  # toast made it, toast-notoken found it
    assert out.count("pre-tuned toast's top-down module") == 1 and f"already pre-tuned: {made[0]}" in out
    meta = json.loads(Path(made[0]).with_suffix(".json").read_text())
    assert meta["method"] == "toast" and meta["inputs"]["image_size"] == 32


def test_a_run_that_misses_its_pretuned_module_names_the_settings_that_find_it(make_suite, capsys):
    """Pre-tuned with `--set pretune.seed=22` while the suite says 21: a run without the setting does not find it
    and its error names the module and the `--set` that would; a run given the same setting finds it."""
    fixed = {"protocol": {"kind": "fixed", "final": {"train": "train800val200", "eval": "test"}, "seeds": [42]},
             "fixed": {"toast": {"*": {"lr": 0.1, "weight_decay": 0.0}}}, "grids": None}
    suite = str(make_suite("elsewhere", methods=["toast"], tasks=["demo-digits"],
                           pretune={**TINY_PRETUNE, "auto": False, "seed": 21}, **fixed))
    code, out, err = _run(["pretune", "--suite", suite, "--set", "pretune.seed=22", "--no-progress"], capsys)
    assert code == 0, err
    made = next(line.split(" -> ")[1] for line in out.splitlines() if " -> " in line)
    code, _, err = _run(["run", "--suite", suite, "--no-progress"], capsys)
    assert code == 2 and f"{made} (pre-tuned by toast; add `--set pretune.seed=22` to find it)" in err, err
    code, _, err = _run(["run", "--suite", suite, "--no-progress", "--set", "pretune.seed=22"], capsys)
    assert code == 0, err
