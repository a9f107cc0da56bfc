"""``--executor local``: cells as submitit jobs in worker processes on this machine, ``workers`` at a time; waits
for them. Each job is the same :class:`~harness.executors.job.CellJob` SLURM runs (code check, epoch checkpoints,
resume), logged under ``<results>/<suite>/_jobs/local/<run>/<pid>/`` and in the ledger, so ``harness status`` shows
local jobs like SLURM ones. A killed ``harness run`` (SIGTERM, Ctrl-C) takes its running jobs along.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import submitit

from harness.executors import EXIT_COMPLETE, EXIT_UNFINISHED, unfinished
from harness.executors.code import code_identity
from harness.executors.job import cells_to_run, make_job
from harness.executors.ledger import Ledger, drop_template_dir, jobs_dir, ledger_entry
from harness.executors.queue import log_tail, result_outcome
from harness.executors.settings import settings_from
from harness.plan import Cell, cell_state
from harness.store import Store
from harness.sweep import Suite
from harness.train import TrialEnv

#: a local job's time limit when neither the suite nor --time sets one: a week
LOCAL_TIME_MIN = 7 * 24 * 60


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _kill_tree(pid: int) -> None:
    """SIGKILL a local job's controller and its task processes (the task ignores SIGTERM, as on SLURM)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    for target in [*children, pid]:
        with contextlib.suppress(OSError):
            os.kill(target, signal.SIGKILL)


def run_local(suite: Suite, cells: list[Cell], store: Store, env: TrialEnv, args: argparse.Namespace,
              total_pending: int | None = None) -> int:
    """Run the cells that have trials to run as local jobs, ``workers`` at a time, and wait for them. Returns 0
    when every cell is complete afterwards, else 1 (a job failed, or a cell could not finish)."""
    from tqdm.auto import tqdm

    settings = settings_from(suite, args)
    cpus = os.cpu_count() or 1
    workers = settings.workers or max(1, cpus // 2)
    threads = max(1, cpus // workers)
    folder = jobs_dir(store, suite)
    run_folder = folder / "local" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    executor = submitit.AutoExecutor(folder=run_folder / "%j", cluster="local")
    executor.update_parameters(timeout_min=settings.time or LOCAL_TIME_MIN)
    ledger, code = Ledger(folder), code_identity()
    todo = cells_to_run(suite, cells, store)
    print(f"running {len(todo)} cell(s) in {min(workers, len(todo))} local process(es), {threads} thread(s) each; "
          f"logs: {run_folder}/<pid>/")
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not env.progress, dynamic_ncols=True)
    running: dict[str, tuple[Cell, submitit.Job]] = {}
    failures: list[str] = []
    queue = list(todo)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a killed `harness run` takes its jobs along
    try:
        while queue or running:
            while queue and len(running) < workers:
                cell = queue.pop(0)
                job = executor.submit(make_job(suite, cell, store, env, settings, folder, code, threads))
                ledger.append([ledger_entry(suite, cell, job, "local", code)])
                running[str(job.job_id)] = (cell, job)
            time.sleep(0.5)
            for jid, (cell, job) in list(running.items()):
                if not job.done():
                    continue
                del running[jid]
                bar.update(1)
                if result_outcome({"result": str(job.paths.result_pickle)}) != "COMPLETED":
                    tail = log_tail(job.paths.stderr, 1)
                    failures.append(f"failed: {cell.key}: {tail[0] if tail else 'no result'} "
                                    f"(log: {job.paths.stderr})")
    except KeyboardInterrupt:
        for _, job in running.values():
            _kill_tree(int(job.job_id))
        failures.append("stopped the running local jobs")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        drop_template_dir(run_folder)
        for line in failures:
            print(line)
    verdicts = [line for cell in cells if (line := unfinished(cell_state(suite, cell, store, stale=False)))]
    for line in verdicts:
        print(line)
    return EXIT_UNFINISHED if failures or verdicts else EXIT_COMPLETE
