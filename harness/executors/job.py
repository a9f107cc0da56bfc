"""One grid cell as a submitit job (``--executor local`` and ``--executor slurm``), and which cells need one.

A job runs its cell through :func:`harness.runner.run_cell`: the trials run in order and each lands as its own
record, so a job that starts again (requeued, or resubmitted after a cancel) skips the recorded trials and resumes
at the first missing one. A trial in flight saves a resumable checkpoint every ``checkpoint_every`` epochs under
``<results>/<suite>/_jobs/checkpoints/<trial id>.ckpt.pt`` (:attr:`harness.train.TrialEnv.checkpoint_dir`; named by
trial id, so a resubmitted job with a new id finds it too); the checkpoint is removed when the trial's record lands.

Preemption and time limits: :class:`CellJob` is a :class:`submitit.helpers.Checkpointable`. SLURM sends USR2
``signal_delay_s`` before the time limit (and a preempting scheduler may send it too); submitit then calls
:meth:`CellJob.checkpoint` and requeues the job itself, at most ``max_timeouts`` times for time limits. A job requeued
from outside (``scontrol requeue``, or a preemption that only sends SIGTERM) restarts from its submission pickle;
that is safe because the state lives in the records and epoch checkpoints, not in the callable.

A job first checks its code (:func:`harness.executors.code.check_code`); it ends with :class:`CellFailed` when a
trial failed, so the queue and the log show the job as failed.

Data-parallel trials (``devices`` x ``nodes`` > 1): the job has that many SLURM tasks, each running this callable as
one rank (:func:`harness.distributed.start` reads its rank from SLURM); rank 0 writes the records and the epoch
checkpoints and alone writes the log lines.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import submitit

from harness.executors.code import check_code
from harness.executors.settings import JobSettings
from harness.plan import Cell, TrialSpec, cell_state
from harness.runner import run_cell
from harness.store import Store
from harness.sweep import Suite
from harness.train import TrialEnv


class CellFailed(RuntimeError):
    """Raised at the end of a job whose cell had failed trials, so SLURM and the log show the job as failed."""


def log(message: str) -> None:
    """One timestamped line on the job's stdout log (``[harness HH:MM:SS] ...``)."""
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[harness {stamp}] {message}", flush=True)


class CellJob(submitit.helpers.Checkpointable):
    """One grid cell as a checkpointable submitit job. Its state lives on disk (records, epoch checkpoints), so
    :meth:`checkpoint` requeues the callable unchanged and a restart from the original pickle is just as good."""

    def __init__(self, suite: Suite, cell: Cell, results_root: Path, env: TrialEnv, checkpoint_dir: Path,
                 checkpoint_every: int, code: dict[str, Any], code_check: str, threads: int | None = None,
                 ranks: int = 1):
        self.suite, self.cell, self.results_root = suite, cell, Path(results_root)
        self.env, self.checkpoint_dir, self.checkpoint_every = env, Path(checkpoint_dir), checkpoint_every
        self.code, self.code_check, self.threads = code, code_check, threads
        #: processes per trial (SLURM tasks of the job, each a rank of :mod:`harness.distributed`)
        self.ranks = ranks

    def __call__(self) -> dict[str, Any]:
        import torch

        from harness import distributed, train
        from harness.loop import pick_device

        job = submitit.JobEnvironment().job_id  # 123_4 for an array element
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        check_code(self.code, self.code_check)
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads:  # torch's default (all visible cores) oversubscribes a node shared by several jobs
            torch.set_num_threads(threads)
        world = distributed.SINGLE
        # each SLURM task is a rank, its rank and master from SLURM (a job pickled before this has no ``ranks``)
        if getattr(self, "ranks", 1) > 1:
            os.environ["HARNESS_SLURM_DDP"] = "1"
            world = distributed.start(pick_device())
        say = log if world.main else (lambda message: None)
        say(f"job {job} (restart {restarts}) cell {self.cell.key} of suite {self.suite.name}"
            + (f" on {world.size} ranks ({world.backend})" if world.distributed else ""))
        env = dataclasses.replace(self.env, device=world.device if world.distributed else pick_device(),
                                  progress=False, checkpoint_dir=self.checkpoint_dir,
                                  checkpoint_every=self.checkpoint_every, world=world)
        failures: list[str] = []

        def run(spec: TrialSpec) -> dict[str, Any]:
            ckpt = self.checkpoint_dir / f"{spec.id}.ckpt.pt"
            if ckpt.exists():
                say(f"resuming {spec.label()} from its epoch checkpoint {ckpt}")
            else:
                say(f"start {spec.label()}")
            record = train.run_trial(spec, env)
            value = record["metrics"].get("eval")
            say(f"done {spec.label()}: {record['status']}"
                + (f" eval={value:.4g}" if isinstance(value, float) else "") + f" ({record['wall_time_s']:.1f} s)")
            if record["status"] == "failed":
                err = record["error"]
                print(err["traceback"], file=sys.stderr, flush=True)
                failures.append(f"{spec.stage} {spec.id}: {err['type']}: {err['message']}")
            return record

        outcome = run_cell(self.suite, self.cell, Store(self.results_root), run, world)
        say(f"cell {self.cell.key}: {outcome.ran} trials ran, {outcome.skipped} already recorded"
            + (f"; {outcome.note}" if outcome.note else ""))
        if failures:
            raise CellFailed(f"{self.cell.key}: {len(failures)} trial(s) failed (recorded as failed; "
                             f"`harness run` retries them): " + "; ".join(failures))
        return {"cell": self.cell.key, "ran": outcome.ran, "skipped": outcome.skipped,
                "complete": outcome.complete, "note": outcome.note}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        log(f"checkpoint: requeued; {self.cell.key} resumes at its first missing trial, a trial in flight from its "
            "last epoch checkpoint")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def make_job(suite: Suite, cell: Cell, store: Store, env: TrialEnv, settings: JobSettings, folder: Path,
             code: dict[str, Any], threads: int | None = None) -> CellJob:
    """The job for one cell, with every path absolute (a job may start in another working directory)."""
    env = dataclasses.replace(
        env, cache_dir=Path(env.cache_dir).resolve(),
        data_root=Path(env.data_root).resolve() if env.data_root else None,
        results_root=store.root.resolve())
    return CellJob(suite, cell, store.root.resolve(), env, folder / "checkpoints", settings.checkpoint_every, code,
                   settings.code_check, threads, settings.devices * settings.nodes)


def cells_to_run(suite: Suite, cells: list[Cell], store: Store) -> list[Cell]:
    """The cells a job would do something for: their protocol state has trials to run (missing ones, and failed
    ones, which are retried). A complete cell and a dead end (every search trial diverged) get no job."""
    return [cell for cell in cells if cell_state(suite, cell, store, stale=False).to_run()]
