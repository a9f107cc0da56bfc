"""``harness pretune --executor slurm``: a suite's preparation stage (e.g. TOAST's pre-tuning on ImageNet) as one
SLURM job, submitted with the suite's ``slurm:``/``executor:`` settings and the job flags ``harness run`` takes.

The job runs the same ``harness pretune`` command line inline (``--executor inline``), in the submitting directory
and with the submitting cache dir, so it writes where an inline pre-tune would (the same cache key) and a later
``harness run`` finds the result. A data-parallel stage (``devices`` x ``nodes`` > 1) is one job of ``devices``
tasks per node on ``nodes`` nodes (one GPU per task when the job has GPUs); each task is one rank and reads its
rank from SLURM (:func:`harness.launch.start_or_launch`). The job is checkpointable: at SLURM's pre-timeout signal
submitit requeues it, and the stage resumes from its last epoch checkpoint. Logs go under
``<cache dir>/jobs/pretune/slurm/<job id>/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import submitit

from harness.executors.code import check_code, code_identity
from harness.executors.ledger import drop_template_dir
from harness.executors.settings import JobSettings
from harness.executors.slurm import sbatch_refusal, slurm_executor
from harness.sweep import Suite


def stage_argv(argv: list[str]) -> list[str]:
    """The job's command line: the submitted one, run inline (argparse keeps the last ``--executor``)."""
    return [*argv, "--executor", "inline"]


class StageJob(submitit.helpers.Checkpointable):
    """``harness <argv>`` in ``cwd`` with ``HARNESS_CACHE_DIR=cache_dir``, as one SLURM job (each task a rank)."""

    def __init__(self, argv: list[str], cwd: Path, cache_dir: Path, code: dict[str, Any], code_check: str):
        self.argv, self.cwd, self.cache_dir = list(argv), Path(cwd), Path(cache_dir)
        self.code, self.code_check = code, code_check

    def __call__(self) -> int:
        import torch

        from harness.cli import main

        os.chdir(self.cwd)
        os.environ["HARNESS_CACHE_DIR"] = str(self.cache_dir)
        check_code(self.code, self.code_check)
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads:  # torch's default (all visible cores) oversubscribes a node shared by several jobs
            torch.set_num_threads(threads)
        code = main(self.argv)
        if code != 0:
            raise RuntimeError(f"harness {' '.join(self.argv)} exited with status {code}")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        print("checkpoint: requeued; the stage resumes from its last epoch checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit_stage(suite: Suite, argv: list[str], settings: JobSettings, cache_dir: Path) -> tuple[str, Path]:
    """Submit ``harness <argv>`` (a ``harness pretune`` command) as one job; returns (job id, its log folder)."""
    from harness.executors.queue import max_array_size

    max_array_size()  # is SLURM there at all (one clear line if not)
    cache_dir = Path(cache_dir).resolve()
    folder = cache_dir / "jobs" / "pretune"
    executor = slurm_executor(folder, suite, settings)
    executor.update_parameters(name=f"harness-pretune-{suite.name}")
    job = StageJob(stage_argv(argv), Path.cwd(), cache_dir, code_identity(), settings.code_check)
    with sbatch_refusal():
        submitted = executor.submit(job)
    drop_template_dir(folder / "slurm")
    return str(submitted.job_id), folder / "slurm" / str(submitted.job_id)
