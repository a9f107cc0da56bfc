"""Data-parallel trials (harness/distributed.py, harness/launch.py; docs/protocol.md §5.7), on CPU processes with
gloo, as CI runs them.

Tolerance of "the same trial on 1 and 2 processes": a deterministic trial (no dropout, drop-path or random
augmentation: the tiny fine-tune below) draws the same global batches and takes the same steps; only the order of
float additions differs (each rank sums its slice, then the all-reduce adds the ranks), ~1e-7 relative per step.
Over a few epochs that stays far below 1e-4 relative on the loss (measured: 2e-7 after 2 epochs), and the metric
moves only if an image sits on an arg-max tie, so it must agree to within one image (0.5 points here).

The default tests stay short (process start-up dominates: ~5 s per rank on a busy 2-core machine); the kill/resume,
segmentation, pre-tuning and demo-suite checks run with ``pytest -m slow``; the SLURM job with ``-m slurm``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.distributed import (GlooSyncBatchNorm, PeerLost, RankBatches, World, peer_loss, rank_slice,
                                 shard_loader)

LOSS_RTOL = 1e-4
METRIC_ATOL = 0.5
#: a deterministic fine-tune (fixed protocol: one trial) whose batch 99 does not divide by 2 ranks (49 + 50), and
#: whose last batch of 800 % 99 = 8 images is cut 4 + 4
AGREE = {"protocol": {"kind": "fixed", "final": {"train": "train800", "eval": "val200"}, "seeds": [42]},
         "fixed": {"finetune": {"*": {"lr": 0.001, "weight_decay": 0.0}}},
         "train": {"epochs": 2, "batch_size": 99, "eval_batch_size": 500, "lr_scaling": "none", "warmup_epochs": 0}}


@pytest.fixture(autouse=True)
def _short_timeouts(monkeypatch):
    monkeypatch.setenv("HARNESS_DIST_TIMEOUT_S", "120")  # a bug must fail the test, not hang it for 30 min


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.rglob("*.json")) if "_jobs" not in p.parts]


def curve(record: dict) -> list[tuple[float, float | None]]:
    return [(entry["train_loss"], entry.get("eval")) for entry in record["curve"]]


def assert_curves_agree(one: dict, two: dict) -> None:
    assert len(one["curve"]) == len(two["curve"])
    for (loss1, eval1), (loss2, eval2) in zip(curve(one), curve(two)):
        assert loss2 == pytest.approx(loss1, rel=LOSS_RTOL)
        assert (eval1 is None) == (eval2 is None)
        if eval1 is not None:
            assert abs(eval2 - eval1) <= METRIC_ATOL


# ------------------------------------------------------------------------------------------------ the pieces
@pytest.mark.parametrize("n, batch, size", [(1000, 99, 2), (1000, 100, 2), (10, 4, 3), (7, 7, 2)])
def test_the_ranks_slices_make_up_the_one_process_batches(n, batch, size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    one = list(torch.utils.data.BatchSampler(order, batch, drop_last=False))
    per_rank = [list(RankBatches(order, batch, False, rank, size)) for rank in range(size)]
    assert all(len(batches) == len(one) for batches in per_rank)  # every rank steps as often
    for i, global_batch in enumerate(one):
        parts = [batches[i] for batches in per_rank]
        assert sum(parts, []) == global_batch  # the same images, in order: contiguous slices
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_evaluation_scores_every_image_exactly_once():
    n, batch, size = 1001, 64, 3
    loader = torch.utils.data.DataLoader(list(range(n)), batch_size=batch, shuffle=False)
    seen = []
    for rank in range(size):
        for items in shard_loader(loader, World(rank=rank, size=size), train=False):
            seen += items.tolist()
    assert sorted(seen) == list(range(n))
    assert [len(rank_slice(10, r, 4)) for r in range(4)] == [2, 3, 2, 3]


def test_gloo_sync_batchnorm_is_batchnorm_over_the_global_batch(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.BatchNorm2d(4)
        synced = GlooSyncBatchNorm(4)
        synced.load_state_dict(plain.state_dict())
        x = torch.randn(3, 4, 5, 5, requires_grad=True)
        y = x.detach().clone().requires_grad_(True)
        (plain(x) ** 2).sum().backward()
        (synced(y) ** 2).sum().backward()
        assert torch.allclose(x.grad, y.grad, atol=1e-5)
        assert torch.allclose(plain.running_var, synced.running_var, atol=1e-6)
        assert torch.allclose(plain.weight.grad, synced.weight.grad, atol=1e-5)
    finally:
        dist.destroy_process_group()


class FakeStore:
    """The group's key-value store, as far as failure notes use it."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def check(self, keys: list[str]) -> bool:
        return all(key in self.data for key in keys)

    def get(self, key: str) -> bytes:
        return self.data[key]


def test_the_failed_record_names_the_rank_that_failed_and_why():
    store = FakeStore()
    rank0, rank1, rank2 = (World(rank=r, size=3, _store=store) for r in range(3))
    rank1.note_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))  # its own error
    rank2.note_failure(PeerLost("rank 2: a collective failed (Connection closed by peer)"))  # a bystander
    found = rank0.failure(PeerLost("rank 0: a collective failed (Connection reset by peer)"))
    assert found["failed_rank"] == 1 and found["why"].startswith("rank 1 failed: RuntimeError: CUDA out of memory")
    assert found["silent_ranks"] == []


def test_a_rank_that_left_no_word_is_named_as_such(monkeypatch):
    monkeypatch.setattr("harness.distributed.NOTE_WAIT_S", 0.2)
    found = World(rank=0, size=2, _store=FakeStore()).failure(RuntimeError("[gloo] Connection closed by peer"))
    assert found["failed_rank"] == 1 and found["silent_ranks"] == [1]
    assert "rank 1 ended without reporting an error" in found["why"]
    assert peer_loss(RuntimeError("Connection reset by peer")) and not peer_loss(ValueError("bad shape"))


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("extra, message", [
    (["--devices", "100000"], "--devices 100000: no GPU here"),
    (["--devices", "2", "--nodes", "2"], "several nodes need SLURM"),
    (["--devices", "2", "--set", "train.batch_size=1"], "train.batch_size 1 is smaller than the 2 processes"),
    (["--devices", "2", "--executor", "local"], "not local"),
    (["--devices", "0"], "--devices: expected 1 or more"),
])
def test_what_cannot_run_is_refused_before_any_trial(make_suite, capsys, extra, message):
    code = main(["run", "--suite", str(make_suite(**AGREE)), "--methods", "finetune", "--tasks", "demo-digits",
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(Path(os.environ["HARNESS_RESULTS"]).rglob("*.json"))


# --------------------------------------------------------------------------------------------- end to end
def test_two_processes_train_the_one_process_trial(make_suite, tmp_path, capsys):
    suite = str(make_suite(**AGREE))
    args = ["run", "--suite", suite, "--methods", "finetune", "--tasks", "demo-digits", "--no-progress", "--no-table"]
    assert main([*args, "--results", str(tmp_path / "one")]) == 0
    assert main([*args, "--results", str(tmp_path / "two"), "--devices", "2"]) == 0, capsys.readouterr().err
    [one], [two] = records(tmp_path / "one"), records(tmp_path / "two")  # exactly one record each
    assert one["id"] == two["id"]  # the trial's identity does not depend on N
    assert one["distributed"] == {"world_size": 1}
    dist = two["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo" and dist["source"] == "launch"
    assert dist["rank_batch"] == [49, 50] and [r["rank"] for r in dist["ranks"]] == [0, 1]
    assert two["status"] == "ok" and len(two["curve"]) == 2
    assert_curves_agree(one, two)
    assert two["curve"][-1]["train_loss"] < two["curve"][0]["train_loss"]  # it learns: the agreement means something
    assert not list((tmp_path / "two").rglob("*.ckpt.pt"))  # the epoch checkpoint is gone once the record is there


# ---------------------------------------------------------------------------------------------------- slow
def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _rank_pid(launcher: int, rank: int) -> int:
    for pid in _children(launcher):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            pass
    raise AssertionError(f"no rank {rank} under {launcher}")


@pytest.mark.slow
def test_a_killed_rank_fails_the_trial_cleanly_and_a_rerun_resumes(make_suite, tmp_path):
    suite = str(make_suite(**{**AGREE, "train": {**AGREE["train"], "epochs": 4}}))
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "harness.cli", "run", "--suite", suite, "--methods", "finetune", "--tasks",
           "demo-digits", "--no-progress", "--no-table", "--devices", "2", "--results", str(results)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(results.rglob("*.ckpt.pt")):  # epoch 1 is checkpointed
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "rank 1 ended without reporting an error" in err and "Traceback" not in err
    [failed] = records(results)
    assert failed["status"] == "failed" and failed["error"]["rank"] == 1
    assert failed["distributed"]["failed_rank"] == 1 and failed["distributed"]["silent_ranks"] == [1]
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    [done] = records(results)
    assert done["status"] == "ok" and done["resumed_from_epoch"] >= 1 and len(done["curve"]) == 4


@pytest.mark.slow
def test_the_demo_command_on_two_processes_agrees_with_one(tmp_path, capsys):
    """The issue's command (smoke-sized): the demo suite's finetune on demo-digits."""
    args = ["run", "--suite", "demo", "--methods", "finetune", "--tasks", "demo-digits", "--epochs", "2", "--seeds",
            "1", "--grid-points", "1", "--no-progress", "--no-table"]
    assert main([*args, "--results", str(tmp_path / "one")]) == 0
    assert main([*args, "--results", str(tmp_path / "two"), "--devices", "2"]) == 0, capsys.readouterr().err
    ones = {r["id"]: r for r in records(tmp_path / "one")}
    twos = {r["id"]: r for r in records(tmp_path / "two")}
    assert ones.keys() == twos.keys() and len(twos) == 2
    for trial, two in twos.items():
        assert two["distributed"]["world_size"] == 2
        assert_curves_agree(ones[trial], two)


@pytest.mark.slow
def test_the_frozen_computation_cache_is_built_once_and_read_by_both_ranks(make_suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))  # empty: the two ranks build it
    suite = str(make_suite(**{**AGREE, "fixed": {"linear": {"*": {"lr": 0.1, "weight_decay": 0.0}}}}))
    args = ["run", "--suite", suite, "--methods", "linear", "--tasks", "demo-digits", "--no-progress", "--no-table"]
    assert main([*args, "--results", str(tmp_path / "two"), "--devices", "2"]) == 0, capsys.readouterr().err
    built = sorted(p.name for p in (tmp_path / "cache" / "features").glob("*.json"))
    assert len(built) == 2  # the train and the test split, once each
    assert main([*args, "--results", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "cache" / "features").glob("*.json")) == built  # read, not rebuilt
    [one], [two] = records(tmp_path / "one"), records(tmp_path / "two")
    assert one["feature_cache"] == two["feature_cache"] == "used"
    assert_curves_agree(one, two)


@pytest.mark.slow
def test_a_segmentation_trial_on_two_processes(tmp_path, capsys):
    from test_segmentation import TINY_ARGS, make_voc

    root = tmp_path / "data"
    root.mkdir()
    make_voc(root)
    code = main(["run", "--suite", "seg", "--data-root", str(root), "--tasks", "seg-voc", "--methods", "finetune",
                 *TINY_ARGS, "--set", "train.iters=3", "--no-progress", "--no-table", "--devices", "2"])
    assert code == 0, capsys.readouterr().err
    [record] = records(Path(os.environ["HARNESS_RESULTS"]))
    assert record["status"] == "ok" and record["distributed"]["world_size"] == 2
    assert record["distributed"]["rank_batch"] == [1, 1] and record["curve"][-1]["steps"] == 3
    assert len(record["metrics"]["per_class_iou"]) == 21


@pytest.mark.slow
def test_pretuning_on_two_processes_matches_one(make_suite, tmp_path):
    from conftest import TINY_PRETUNE

    suite = str(make_suite(methods=["toast"], pretune=dict(TINY_PRETUNE)))
    metas = []
    for devices in (1, 2):
        out = tmp_path / f"pretuned{devices}.pt"
        assert main(["pretune", "--suite", suite, "--method", "toast", "--output", str(out), "--no-progress",
                     "--devices", str(devices)]) == 0
        metas.append(json.loads(out.with_suffix(".json").read_text()))
    one, two = metas
    assert "distributed" not in one and two["distributed"]["world_size"] == 2
    for a, b in zip(one["epochs"], two["epochs"]):
        for key in ("ce", "var", "acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4)


# --------------------------------------------------------------------------------------------------- SLURM
def _slurm_down() -> str | None:
    from test_slurm import DOWN

    return DOWN


@pytest.mark.slurm
def test_a_two_task_slurm_job_runs_one_trial_on_two_processes(make_suite, tmp_path, capsys):
    down = _slurm_down()
    if down:
        pytest.skip(down)
    from test_slurm import wait

    suite = str(make_suite(**AGREE, slurm={"time": 5, "cpus": 1}, executor={"code_check": "warn"}))
    results = tmp_path / "results"
    code = main(["run", "--suite", suite, "--methods", "finetune", "--tasks", "demo-digits", "--no-progress",
                 "--executor", "slurm", "--devices", "2", "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 0 and "2 task(s) x 1 node(s) per trial" in out, out
    job = out.split("as SLURM job ")[1].split()[0]
    try:
        [record] = wait(lambda: records(results), 150, "the job's record", every=1.0)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert record["status"] == "ok", record.get("error")
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["source"] == "slurm"
    logs = sorted((results / "tiny" / "_jobs" / "slurm").rglob("*_log.out"))
    assert len(logs) == 2  # one log per task (rank); only rank 0 reports the trial
    assert sum(log.read_text().count("] done ") for log in logs) == 1


@pytest.mark.slow
@pytest.mark.slurm
def test_a_requeued_two_task_job_resumes_on_every_rank_from_the_epoch_checkpoint(make_suite, tmp_path, capsys):
    """`scontrol requeue` kills both tasks mid-trial; the job starts again from its pickle and both ranks load the
    epoch checkpoint rank 0 wrote (the requeued job waits cred_expire + 1 = 31 s on the CI cluster)."""
    down = _slurm_down()
    if down:
        pytest.skip(down)
    from test_slurm import wait

    epochs = 30
    suite = str(make_suite(protocol=AGREE["protocol"], fixed=AGREE["fixed"],
                           train={**AGREE["train"], "epochs": epochs, "batch_size": 10},
                           slurm={"time": 5, "cpus": 1}, executor={"code_check": "warn"}))
    results = tmp_path / "results"
    assert main(["run", "--suite", suite, "--methods", "finetune", "--tasks", "demo-digits", "--no-progress",
                 "--executor", "slurm", "--devices", "2", "--results", str(results)]) == 0
    job = capsys.readouterr().out.split("as SLURM job ")[1].split()[0]
    checkpoints = results / "tiny" / "_jobs" / "checkpoints"
    try:
        wait(lambda: list(checkpoints.glob("*.ckpt.pt")), 180, "the first epoch checkpoint", every=0.2)
        subprocess.run(["scontrol", "requeue", job], check=True)
        [record] = wait(lambda: records(results), 400, "the requeued job's record", every=1.0)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert record["status"] == "ok" and record["distributed"]["world_size"] == 2
    assert record["resumed_from_epoch"] >= 1
    assert [c["epoch"] for c in record["curve"]] == list(range(1, epochs + 1))  # no gap, no repeat
    text = "".join(log.read_text() for log in (results / "tiny" / "_jobs" / "slurm").rglob("*_0_log.out"))
    assert "(restart 1)" in text and "resuming finetune/demo-digits final" in text
