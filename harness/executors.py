"""Executors decide where cells run. ``inline`` runs them in this process, one after another; ``local`` (worker
processes) and ``slurm`` (job arrays, submit and return) live in :mod:`harness.slurm`.

Every executor runs whole cells through :func:`harness.runner.run_cell`, so each trial lands as its own record and
a restarted cell resumes at its first missing trial. An executor is a function
``(suite, cells, store, env, args) -> int`` (an exit code) registered in ``EXECUTORS``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from harness.plan import Cell
from harness.runner import run_cell
from harness.store import Store
from harness.sweep import Suite
from harness.train import TrialEnv, run_trial

Executor = Callable[[Suite, list[Cell], Store, TrialEnv, argparse.Namespace], int]


def run_inline(suite: Suite, cells: list[Cell], store: Store, env: TrialEnv, args: argparse.Namespace,
               total_pending: int | None = None) -> int:
    from tqdm.auto import tqdm

    bar = tqdm(total=total_pending, desc="trials", unit="trial", disable=not env.progress, dynamic_ncols=True)
    failures: list[str] = []

    def run(spec: dict[str, Any]) -> dict[str, Any]:
        bar.set_description(f"{spec['method']}/{spec['task']} {spec['stage']}")
        record = run_trial(spec, env)
        bar.update(1)
        if record["status"] == "failed":
            failures.append(f"{spec['method']}/{spec['task']} {spec['stage']} {record['id']}: "
                            f"{record['error']['type']}: {record['error']['message']}")
        elif record["status"] == "diverged":
            bar.write(f"diverged: {spec['method']}/{spec['task']} lr={spec['hparams'].get('lr')} "
                      f"wd={spec['hparams'].get('weight_decay')} (recorded; selection skips it)")
        return record

    for cell in cells:
        outcome = run_cell(suite, cell, store, run)
        if outcome.note:
            bar.write(f"{cell.key}: {outcome.note}")
    bar.close()
    for line in failures:
        print(f"failed: {line}")
    return 1 if failures else 0


def run_local(*args: Any, **kwargs: Any) -> int:
    from harness.slurm import run_local as run  # submitit is imported only when used

    return run(*args, **kwargs)


def run_slurm(*args: Any, **kwargs: Any) -> int:
    from harness.slurm import run_slurm as run

    return run(*args, **kwargs)


#: an executor that only submits (and returns before the trials ran) says so; `harness run` then prints no table
run_slurm.returns_before_done = True  # type: ignore[attr-defined]

EXECUTORS: dict[str, Executor] = {"inline": run_inline, "local": run_local, "slurm": run_slurm}
