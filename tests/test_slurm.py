"""``--executor slurm`` on a real SLURM (``.ci/slurm_cluster.sh start``: one node, 2 CPUs, slurmdbd accounting).

Skipped, with the reason, when no slurmctld answers ``scontrol ping``. Each test submits through the CLI exactly as a
user would and polls the queue and the records; every job it submitted is cancelled at teardown. The cluster's
KillWait is 5 s (a cancelled or requeued job runs on for up to 5 s) and a requeued job waits cred_expire+1 = 31 s
before it starts again (.ci/SLURM_NOTES.md); the slow suites below make a trial outlast the 5 s by a wide margin.
"""

from __future__ import annotations

import collections
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.plan import final_specs, plan_cells, search_specs
from harness.sweep import load_suite


def _cluster_down() -> str | None:
    if not shutil.which("scontrol") or not shutil.which("sbatch"):
        return "SLURM client tools not installed (start the CI cluster: sudo .ci/slurm_cluster.sh start)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "`scontrol ping` timed out: no slurmctld answers"
    if "UP" not in ping.stdout:
        return f"no slurmctld answers `scontrol ping` ({(ping.stdout + ping.stderr).strip() or ping.returncode})"
    return None


DOWN = _cluster_down()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(DOWN is not None, reason=DOWN or "")]

#: 1-CPU jobs (torch then uses one thread: two jobs share the 2-CPU node without oversubscribing it);
#: code_check warn: others may edit this working tree while a test's job is queued
JOBS = {"slurm": {"time": 5, "cpus": 1}, "executor": {"code_check": "warn"}}
SMOKE = ["--grid-points", "1", "--seeds", "1", "--no-progress"]


@pytest.fixture(scope="module")
def slow(session_cache, tmp_path_factory) -> dict:
    """Suite changes for trials that outlast SLURM's 5 s KillWait with a margin: small-batch fine-tunes of the tiny
    ViT, checkpointed every epoch, with as many epochs as take ~12 s here (one thread, as in the jobs; at least 40,
    so a loaded machine stays safe too)."""
    import torch

    from conftest import TINY_SUITE
    from harness.train import TrialEnv, run_trial

    path = tmp_path_factory.mktemp("calibrate") / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_SUITE, "train": {**TINY_SUITE["train"], "epochs": 4, "batch_size": 10}}))
    spec = search_specs(load_suite(str(path), grid_points=1), plan_cells(["finetune"], ["demo-digits"])[0])[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = run_trial(spec, TrialEnv(cache_dir=session_cache, device="cpu", progress=False))
    finally:
        torch.set_num_threads(threads)
    per_epoch = 1.2 * record["cost"]["train_seconds"] / 4  # + evaluation
    epochs = min(150, max(40, math.ceil(12 / max(per_epoch, 1e-3))))
    return {"methods": ["finetune"], "train": {"epochs": epochs, "batch_size": 10}}


@pytest.fixture
def harness(tmp_path, capsys):
    """``harness(*argv)`` runs the CLI with ``--results`` set; returns (exit code, stdout). At teardown every job
    the test submitted is cancelled."""
    results = tmp_path / "results"

    def run(*argv: str) -> tuple[int, str]:
        code = main([*argv, "--results", str(results)])
        return code, capsys.readouterr().out

    run.results = results  # type: ignore[attr-defined]
    yield run
    ids = [e["job_id"] for ledger in results.rglob("submissions.jsonl") for e in _entries(ledger)]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def _entries(ledger: Path) -> list[dict]:
    return [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []


def ledger(results: Path) -> list[dict]:
    return _entries(results / "tiny" / "_jobs" / "submissions.jsonl")


def in_queue(ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, check=True).stdout
    states = dict(line.split("|", 1) for line in out.split())
    return {j: states[j] for j in ids if j in states}


def wait(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_gone(ids: list[str], timeout: float) -> None:
    wait(lambda: not in_queue(ids), timeout, f"jobs {ids} to leave the queue (now {in_queue(ids)})")


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in results.rglob("*.json")]


def done_counts(results: Path) -> collections.Counter:
    """How many times each trial finished, over all job logs: a trial that ran twice counts 2."""
    counts: collections.Counter = collections.Counter()
    for log in results.rglob("*_log.out"):
        counts.update(re.findall(r"\] done \S+ \w+ ([0-9a-f]{16}) ", log.read_text()))
    return counts


def trial_ids(suite: Path, method: str, task: str) -> tuple[str, str]:
    """(search, final) trial ids of a smoke cell: one grid point, so the final trial's hyperparameters are known."""
    loaded = load_suite(str(suite), grid_points=1, seeds=1)
    cell = plan_cells([method], [task])[0]
    [search] = search_specs(loaded, cell)
    [final] = final_specs(loaded, cell, search.hparams)
    return search.id, final.id


def assert_complete_once(results: Path, n_trials: int) -> list[dict]:
    """No lost records (all planned trials are ok) and no duplicated ones (each trial ran to the end once)."""
    recs = records(results)
    assert len(recs) == n_trials and {r["status"] for r in recs} == {"ok"}, [(r["id"], r["status"]) for r in recs]
    assert done_counts(results) == {r["id"]: 1 for r in recs}
    return recs


def test_grid_completes_and_the_table_shows_it(make_suite, harness):
    suite = str(make_suite(**JOBS))
    select = ["--suite", suite, "--tasks", "demo-digits", *SMOKE]
    code, out = harness("run", *select, "--executor", "slurm")
    assert code == 0 and "submitted 2 cell(s) as SLURM job" in out and "logs: " in out
    ids = [e["job_id"] for e in ledger(harness.results)]
    assert len(ids) == 2 and all(re.fullmatch(r"\d+_[01]", j) for j in ids)  # one array, one element per cell

    wait_gone(ids, 120)
    recs = assert_complete_once(harness.results, 4)
    assert {r["provenance"]["slurm"]["SLURM_ARRAY_JOB_ID"] for r in recs} == {ids[0].split("_")[0]}
    code, out = harness("table", "--suite", suite, "--tasks", "demo-digits", "--grid-points", "1", "--seeds", "1")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert code == 0 and {"linear", "finetune"} <= set(rows) and re.search(r"\d+\.\d", rows["linear"])
    code, out = harness("status", *select[:-1])
    assert "2 cells: 4 done" in out and out.count("COMPLETED") == 2
    code, out = harness("run", *select, "--executor", "slurm")
    assert "all 4 trials are done; nothing to run" in out and len(ledger(harness.results)) == 2


def test_a_cell_cancelled_mid_trial_resumes_when_resubmitted(make_suite, harness, slow):
    suite = make_suite(**JOBS, **slow)
    select = ["--suite", str(suite), "--tasks", "demo-digits", *SMOKE, "--executor", "slurm"]
    assert harness("run", *select)[0] == 0
    [job] = [e["job_id"] for e in ledger(harness.results)]
    search_ckpt = trial_ids(suite, "finetune", "demo-digits")[0] + ".ckpt.pt"
    ckpt = harness.results / "tiny" / "_jobs" / "checkpoints" / search_ckpt
    wait(ckpt.exists, 120, "the first epoch checkpoint of the search trial", every=0.2)

    subprocess.run(["scancel", job], check=True)
    wait_gone([job], 30)
    assert ckpt.exists() and not records(harness.results), "the cancelled job should have died mid-trial"

    code, out = harness("run", *select)
    assert code == 0 and "submitted 1 cell(s)" in out  # the cancelled job is not alive: its cell goes again
    [_, again] = [e["job_id"] for e in ledger(harness.results)]
    wait_gone([again], 150)
    recs = assert_complete_once(harness.results, 2)
    search = next(r for r in recs if r["spec"]["stage"] == "search")
    epochs = search["spec"]["train"]["epochs"]
    assert [c["epoch"] for c in search["curve"]] == list(range(1, epochs + 1))  # resumed: no gap, no repeat
    log = Path(ledger(harness.results)[-1]["stdout"]).read_text()
    assert f"resuming finetune/demo-digits search {search['id']}" in log and not ckpt.exists()


def test_requeued_cells_resume_scontrol_requeue_and_the_timeout_signal(make_suite, harness, slow):
    """Element 0 is requeued from outside (`scontrol requeue`: killed, rerun from its submission pickle) during its
    final trial; element 1 gets USR2, SLURM's pre-timeout signal (submitit calls checkpoint() and requeues it)."""
    suite = make_suite(**JOBS, **slow)
    select = ["--suite", str(suite), "--tasks", "demo-digits,demo-position", *SMOKE, "--executor", "slurm"]
    assert harness("run", *select)[0] == 0
    first, second = (e["job_id"] for e in ledger(harness.results))
    ckpts = harness.results / "tiny" / "_jobs" / "checkpoints"

    wait((ckpts / f"{trial_ids(suite, 'finetune', 'demo-position')[0]}.ckpt.pt").exists, 120,
         "element 1's first epoch checkpoint", every=0.2)
    subprocess.run(["scancel", "--signal=USR2", second], check=True)
    final = trial_ids(suite, "finetune", "demo-digits")[1]
    wait((ckpts / f"{final}.ckpt.pt").exists, 120, "element 0's final trial checkpoint", every=0.2)
    subprocess.run(["scontrol", "requeue", first], check=True)

    wait(lambda: not in_queue([first, second]), 200, "both requeued jobs to finish", every=1)
    assert_complete_once(harness.results, 4)
    log0, log1 = (Path(e["stdout"]).read_text() for e in ledger(harness.results))
    assert "(restart 1)" in log0 and "1 trials ran, 1 already recorded" in log0
    assert f"resuming finetune/demo-digits final {final}" in log0
    assert "checkpoint: requeued" in log1 and "resuming finetune/demo-position search" in log1
    code, out = harness("status", "--suite", str(suite), "--tasks", "demo-digits,demo-position", "--grid-points", "1",
                        "--seeds", "1")
    assert "2 cells: 4 done" in out


def test_status_reports_a_failing_cell_with_its_log(make_suite, harness):
    select = ["--suite", str(make_suite(**JOBS)), "--methods", "linear", "--tasks", "demo-digits",
              "--set", "backbone.model_args.img_size=48", "--grid-points", "1", "--seeds", "1"]
    assert harness("run", *select, "--executor", "slurm", "--no-progress")[0] == 0
    wait_gone([e["job_id"] for e in ledger(harness.results)], 120)
    code, out = harness("status", *select)
    row = next(line for line in out.splitlines() if line.startswith("linear/demo-digits"))
    assert code == 0 and row.split()[1] == "failed" and "FAILED" in row
    log = Path(re.search(r"log (\S+_log\.err)", out).group(1))
    assert log.is_file() and "Input height (32) doesn't match model (48)" in out


def test_a_second_run_does_not_submit_queued_cells_again(make_suite, harness):
    select = ["--suite", str(make_suite(**JOBS)), "--tasks", "demo-digits", *SMOKE, "--executor", "slurm",
              "--sbatch", "hold=true"]
    assert harness("run", *select)[0] == 0
    ids = [e["job_id"] for e in ledger(harness.results)]
    assert set(wait(lambda: in_queue(ids), 10, "the held jobs in squeue").values()) == {"PENDING"}

    code, out = harness("run", *select)
    assert code == 0 and "2 cell(s) already queued or running" in out and "nothing to submit" in out
    assert len(ledger(harness.results)) == 2 and len(in_queue(ids)) == 2
    code, out = harness("status", "--suite", select[1], "--tasks", "demo-digits", "--grid-points", "1", "--seeds", "1")
    assert "cells by state: 2 pending" in out and out.count("PENDING") == 2

    subprocess.run(["scancel", *ids], check=True)
    wait_gone(ids, 30)
    code, out = harness("run", *select)  # cancelled cells are not alive any more: submitted again
    assert code == 0 and "submitted 2 cell(s)" in out and len(ledger(harness.results)) == 4


def test_a_cell_whose_search_all_diverged_is_no_result_and_not_resubmitted(make_suite, harness):
    select = ["--suite", str(make_suite(**JOBS)), "--methods", "linear", "--tasks", "demo-digits",
              "--set", "grids.linear.lr=[1.0e+38]", "--grid-points", "1", "--seeds", "1"]
    assert harness("run", *select, "--executor", "slurm", "--no-progress")[0] == 0
    [job] = [e["job_id"] for e in ledger(harness.results)]
    wait_gone([job], 120)
    [record] = records(harness.results)
    assert record["status"] == "diverged"
    log = Path(ledger(harness.results)[0]["stdout"]).read_text()
    assert "1 trials ran, 0 already recorded; no search trial finished (all diverged)" in log

    code, out = harness("status", *select)
    row = next(line for line in out.splitlines() if line.startswith("linear/demo-digits"))
    assert code == 0 and row.split()[1:3] == ["no", "result"] and row.split()[-1] == "COMPLETED"
    assert "no result: linear/demo-digits: no search trial finished (all diverged)" in out
    code, out = harness("run", *select, "--executor", "slurm", "--no-progress")
    assert code == 1 and "(not submitted)" in out and "nothing to submit" in out and len(ledger(harness.results)) == 1
