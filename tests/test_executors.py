"""Executors without a cluster: the registry, ``--executor inline``'s exit code and output, ``--executor local`` end
to end through the CLI, and the SLURM executor's own logic (settings, code check, array chunking, no double
submission, dead ends) against a faked queue."""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.plan import NOT_PLANNED, Cell, TrialSpec, final_specs, plan_cells, search_specs
from harness.store import Store
from harness.sweep import load_suite
from harness.train import TrialEnv

#: tests run while others may edit the tree: a job must not refuse because a file changed under it
NO_CODE_REFUSAL = {"code_check": "warn"}
SMOKE = ["--grid-points", "1", "--seeds", "1", "--no-progress"]


def planned_ids(suite_path: Path, methods: list[str], tasks: list[str], **overrides) -> set[str]:
    """Trial ids of the cells (search specs, and finals with the single grid point's hyperparameters)."""
    suite = load_suite(str(suite_path), grid_points=1, seeds=1, **overrides)
    ids = set()
    for cell in plan_cells(methods, tasks):
        searched = search_specs(suite, cell)
        ids |= {s.id for s in searched}
        ids |= {s.id for s in final_specs(suite, cell, searched[0].hparams)}
    return ids


def done_lines(jobs_dir: Path) -> collections.Counter:
    """How many times each trial id finished, over every job log (a trial that ran twice shows up twice)."""
    counts: collections.Counter = collections.Counter()
    for log in jobs_dir.rglob("*_log.out"):
        counts.update(re.findall(r"\] done \S+ \w+ ([0-9a-f]{16}) ", log.read_text()))
    return counts


def test_local_executor_runs_the_grid_once(make_suite, tmp_path, capsys):
    suite = make_suite(executor=NO_CODE_REFUSAL)
    results = tmp_path / "results"
    argv = ["run", "--suite", str(suite), "--results", str(results), "--tasks", "demo-digits", *SMOKE]
    assert main([*argv, "--executor", "local", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "running 2 cell(s) in 2 local process(es)" in out
    assert "| linear" in out and "| finetune" in out  # the table, as after an inline run

    expected = planned_ids(suite, ["linear", "finetune"], ["demo-digits"])
    records = [json.loads(p.read_text()) for p in results.rglob("*.json")]
    assert {r["id"] for r in records} == expected and len(records) == len(expected) == 4
    assert {r["status"] for r in records} == {"ok"}
    assert done_lines(results / "tiny" / "_jobs") == {tid: 1 for tid in expected}  # each trial ran exactly once

    assert main([*argv, "--executor", "local", "--workers", "2"]) == 0
    assert "all 4 trials are done; nothing to run" in capsys.readouterr().out
    assert main(["status", "--suite", str(suite), "--results", str(results), "--tasks", "demo-digits",
                 "--grid-points", "1", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 cells: 4 done" in out and "COMPLETED" in out


def test_status_shows_a_failed_local_cell_with_its_log(make_suite, tmp_path, capsys):
    suite = make_suite(executor=NO_CODE_REFUSAL)
    results = tmp_path / "results"
    select = ["--suite", str(suite), "--results", str(results), "--methods", "linear", "--tasks", "demo-digits",
              "--set", "backbone.model_args.img_size=48", "--grid-points", "1", "--seeds", "1"]
    assert main(["run", *select, "--executor", "local", "--no-progress", "--no-table"]) == 1
    assert "failed: linear/demo-digits" in capsys.readouterr().out

    assert main(["status", *select]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("linear/demo-digits"))
    assert row.split()[1] == "failed"
    failed = out[out.index("failed: linear/demo-digits"):]
    log = re.search(r"log (\S+_log\.err)", failed).group(1)
    assert Path(log).is_file()
    assert "Input height (32) doesn't match model (48)" in failed  # the last lines of the job's error


# -- settings and code identity ------------------------------------------------------------------------------------
def _args(**flags) -> argparse.Namespace:
    defaults = dict(partition=None, account=None, qos=None, time=None, gpus=None, cpus=None, mem_gb=None,
                    array_parallelism=None, sbatch=[], setup=[], workers=None, code_check=None)
    return argparse.Namespace(**{**defaults, **flags})


def test_settings_merge_suite_then_command_line(make_suite):
    from harness.executors.settings import settings_from

    suite = load_suite(str(make_suite(slurm={"partition": "gpu", "time": 600, "gpus": 1, "setup": ["module load x"],
                                             "sbatch": {"constraint": "a100"}},
                                      executor={"checkpoint_every": 2})))
    s = settings_from(suite, _args(partition="debug", sbatch=["hold=true", "time-min=01:00:00", "exclusive"],
                                   setup=["echo hi"]))
    assert (s.partition, s.time, s.gpus, s.checkpoint_every, s.code_check) == ("debug", 600, 1, 2, "refuse")
    assert s.sbatch == {"constraint": "a100", "hold": True, "time-min": "01:00:00", "exclusive": True}
    assert s.setup == ["module load x", "echo hi"]
    assert s.signal_delay() == 90


def test_settings_errors_are_one_clear_line(make_suite):
    from harness.executors.settings import settings_from

    with pytest.raises(HarnessError, match=r"slurm\.partion: unknown key; did you mean: partition"):
        settings_from(load_suite(str(make_suite(slurm={"partion": "gpu"}))), _args())
    with pytest.raises(HarnessError, match="too short"):
        settings_from(load_suite(str(make_suite(slurm={"time": 1, "signal_delay_s": 90}))), _args()).signal_delay()
    assert settings_from(load_suite(str(make_suite())), _args(time=1)).signal_delay() == 15


def test_a_job_refuses_code_that_changed_since_submission(tmp_path, capsys):
    from harness.executors.code import check_code, code_fingerprint, code_identity

    for folder in ("harness", "methods", "tasks"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.py").write_text("a = 1\n")
    before = code_fingerprint(tmp_path)
    (tmp_path / "methods" / "x.py").write_text("a = 2\n")
    assert code_fingerprint(tmp_path) != before

    stale = {**code_identity(), "fingerprint": "0" * 16}
    with pytest.raises(HarnessError, match="code changed since submission.*refusing"):
        check_code(stale, "refuse")
    check_code(stale, "warn")
    assert "running anyway" in capsys.readouterr().err
    check_code(code_identity(), "refuse")  # unchanged code passes


# -- the SLURM executor against a faked queue ------------------------------------------------------------------------
class FakeSlurm:
    """Stands in for sbatch/squeue/sacct/scontrol: remembers submitted arrays; squeue lists them as PENDING."""

    def __init__(self, max_array: int):
        self.max_array, self.arrays, self.next_id = max_array, [], 100

    def command(self, cmd: list[str], timeout: float = 30) -> str:
        if cmd[:3] == ["scontrol", "show", "config"]:
            return f"ClusterName = x\nMaxArraySize            = {self.max_array}\n"
        if cmd[0] == "squeue":
            return "".join(f"{jid}|PENDING\n" for ids in self.arrays for jid in ids)
        return ""  # sacct: nothing finished

    def executor(self, folder, suite, settings):
        from submitit.core.utils import JobPaths

        fake = self

        class Job:
            def __init__(self, job_id: str):
                self.job_id, self.paths = job_id, JobPaths(folder / "slurm" / "%j", job_id)

        class Executor:
            def submit_array(self, fns):
                assert len(fns) <= fake.max_array
                ids = [f"{fake.next_id}_{i}" for i in range(len(fns))]
                fake.next_id += 1
                fake.arrays.append(ids)
                return [Job(j) for j in ids]

        return Executor()


@pytest.fixture
def fake_slurm(monkeypatch) -> FakeSlurm:
    """The SLURM executor and the queue queries talking to a FakeSlurm (arrays of at most 3)."""
    import harness.executors.queue as queue
    import harness.executors.slurm as slurm

    fake = FakeSlurm(max_array=3)
    monkeypatch.setattr(queue, "_command", fake.command)
    monkeypatch.setattr(slurm, "slurm_executor", fake.executor)
    return fake


def test_slurm_submission_is_chunked_and_never_doubled(make_suite, tmp_path, capsys, fake_slurm):
    from harness.executors.status import cell_reports

    fake = fake_slurm
    results = tmp_path / "results"
    argv = ["run", "--suite", str(make_suite(tasks=["demo-digits", "demo-position", "demo-count"])),
            "--results", str(results), "--executor", "slurm", *SMOKE]

    assert main(argv) == 0  # 2 methods x 3 tasks = 6 cells, arrays of at most 3
    out = capsys.readouterr().out
    assert [len(a) for a in fake.arrays] == [3, 3]
    assert "submitted 3 cell(s) as SLURM job 100" in out and "harness status --suite" in out
    assert "| linear" not in out  # submit and return: no table
    ledger = results / "tiny" / "_jobs" / "submissions.jsonl"
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(entries) == 6 and len({e["token"] for e in entries}) == 6

    assert main(argv) == 0  # all six still queued: nothing new
    out = capsys.readouterr().out
    assert "6 cell(s) already queued or running" in out and "nothing to submit" in out
    assert len(fake.arrays) == 2 and len(ledger.read_text().splitlines()) == 6

    fake.arrays = fake.arrays[:1]  # the second array left the queue (cancelled): its cells go again
    assert main(argv) == 0
    assert [len(a) for a in fake.arrays] == [3, 3] and fake.arrays[1][0].startswith("102_")

    store = Store(results)
    suite = load_suite(argv[2], grid_points=1, seeds=1)
    reports, warning = cell_reports(suite, plan_cells(["linear"], ["demo-digits"]), store)
    assert warning is None and reports[0].state == "pending" and reports[0].job.state == "PENDING"
    assert reports[0].counts == {"done": 0, "diverged": 0, "failed": 0, "pending": 2} and reports[0].stale == 0
    assert not store.scan("tiny")  # the ledger is no record
    assert Cell("linear", "demo-digits").key in ledger.read_text()


# -- the registry and the inline executor --------------------------------------------------------------------------
def test_the_registry_is_lazy_and_names_what_returns_early():
    from harness.executors import EXECUTORS

    assert list(EXECUTORS) == ["inline", "local", "slurm"]
    assert [e.returns_before_done for e in EXECUTORS.values()] == [False, False, True]
    from harness.executors.local import run_local
    from harness.executors.slurm import run_slurm

    assert EXECUTORS["local"].load() is run_local and EXECUTORS["slurm"].load() is run_slurm
    probe = ("import sys, harness.executors as e; e.EXECUTORS['inline'].load(); "
             "print(sorted(m for m in ('submitit', 'harness.executors.job') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # listing executors and running inline never import submitit


def _diverged(spec: TrialSpec, env: TrialEnv) -> dict[str, Any]:
    """What harness.train.run_trial returns for a trial whose loss went non-finite."""
    return {"id": spec.id, "spec": spec.to_dict(), "status": "diverged", "metrics": {"eval": None}, "curve": [],
            "params": {}, "provenance": {}, "wall_time_s": 0.0}


def test_inline_returns_1_for_a_dead_end_and_speaks_after_its_bar(make_suite, tmp_path, capsys, monkeypatch,
                                                                   session_cache):
    """Every search trial diverged: no winner, no finals, exit code 1; the lines come after the bar is closed."""
    import tqdm.auto

    from harness.executors import EXECUTORS

    events: list[str] = []

    class RecordingBar(tqdm.auto.tqdm):
        def write(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
            events.append("bar.write")

        def close(self) -> None:
            if not self.disable:
                events.append("close; stdout so far: " + capsys.readouterr().out)
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    monkeypatch.setattr("harness.train.run_trial", _diverged)
    suite = load_suite(str(make_suite()), grid_points=2, seeds=1)
    store = Store(tmp_path / "results")
    cell = Cell("linear", "demo-digits")
    env = TrialEnv(cache_dir=session_cache, device="cpu", progress=True)

    assert EXECUTORS["inline"](suite, [cell], store, env, argparse.Namespace(), total_pending=3) == 1
    out = capsys.readouterr().out.splitlines()
    assert events == ["close; stdout so far: "]  # nothing printed while the bar was open, nothing through it
    specs = search_specs(suite, cell)
    assert [(s.hparams["lr"], s.seed) for s in specs] == [(1.0, 42), (0.1, 42)]
    assert out == [f"diverged: linear/demo-digits search {specs[0].id} hparams={specs[0].hparams} seed=42 "
                   "(recorded; selection skips it)",
                   f"diverged: linear/demo-digits search {specs[1].id} hparams={specs[1].hparams} seed=42 "
                   "(recorded; selection skips it)",
                   "no result: linear/demo-digits: no search trial finished (all diverged); final trials not run"]
    assert EXECUTORS["inline"](suite, [cell], store, env, argparse.Namespace()) == 1  # nothing to run: still 1
    assert capsys.readouterr().out.splitlines() == out[-1:]


def test_a_dead_end_through_the_cli_status_and_slurm(make_suite, tmp_path, capsys, fake_slurm):
    """A real diverging search (lr 1e38: the loss overflows float32): `run` exits 1 and says why, `status` says
    "no result", the SLURM executor submits nothing for it and exits 1; an edited grid turns its record stale."""
    from harness.executors.status import cell_reports

    path = make_suite(grids={"linear": {"lr": [1.0e38], "weight_decay": [0.0]}})
    results = tmp_path / "results"
    select = ["--suite", str(path), "--results", str(results), "--methods", "linear", "--tasks", "demo-digits",
              "--seeds", "1"]
    assert main(["run", *select, "--no-progress", "--no-table"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^diverged: linear/demo-digits search [0-9a-f]{16} hparams=\{[^}]*'lr': 1e\+38", out, re.M)
    assert "\nno result: linear/demo-digits: no search trial finished (all diverged); final trials not run\n" in out
    [record] = [json.loads(p.read_text()) for p in results.rglob("*.json")]
    assert record["status"] == "diverged"

    assert main(["status", *select]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("linear/demo-digits"))
    assert row.split()[1:7] == ["no", "result", "0", "1", "0", "1"]  # done diverged failed pending(the final)
    assert "no result: linear/demo-digits: no search trial finished (all diverged)" in out

    assert main(["run", *select, "--executor", "slurm", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "no result: linear/demo-digits: no search trial finished (all diverged); final trials not run " \
           "(not submitted)" in out and "nothing to submit" in out
    assert fake_slurm.arrays == [] and not (results / "tiny" / "_jobs" / "submissions.jsonl").exists()

    path.write_text(path.read_text().replace("1.0e+38", "0.5"))  # the grid changes: the old record is stale
    suite = load_suite(str(path), seeds=1)
    [report], _ = cell_reports(suite, plan_cells(["linear"], ["demo-digits"]), Store(results))
    assert (report.state, report.counts, report.stale) == ("pending", {"done": 0, "diverged": 0, "failed": 0,
                                                                      "pending": 2}, 1)
    assert [(s.path.name, s.reason) for s in report.stale_records] == [(f"search-{record['id']}.json", NOT_PLANNED)]


def test_a_submission_sbatch_refuses_is_one_line_naming_sbatchs_reason():
    """Every SLURM submission (the grid's arrays, the report job, a pre-tuning stage) goes through one translation
    of submitit's FailedJobError: its last printed line, no traceback."""
    import submitit

    from harness.errors import HarnessError
    from harness.executors.slurm import sbatch_refusal

    with pytest.raises(HarnessError) as err:
        with sbatch_refusal():
            raise submitit.core.utils.FailedJobError(
                "Could not submit job\n\nsbatch: error: invalid partition specified: gpux\n")
    assert str(err.value) == "sbatch refused the job: sbatch: error: invalid partition specified: gpux"
