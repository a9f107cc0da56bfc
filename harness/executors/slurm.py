"""``--executor slurm``: submit every cell that has trials to run and no live job as SLURM job arrays (chunked to
the cluster's ``MaxArraySize``), record them in the ledger, and return without waiting. ``harness status`` and
``harness table`` follow up from the records and the queue.

A second ``harness run`` never submits a cell whose latest job is still queued or running (the ledger is read and
the queue asked under one lock); cancelled, failed and timed-out cells go again. Cells that can never finish (every
search trial diverged) are not submitted; they are named and make the exit code 1.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

import submitit

from harness.errors import HarnessError
from harness.executors import EXIT_COMPLETE, EXIT_UNFINISHED
from harness.executors.code import code_identity
from harness.executors.job import make_job
from harness.executors.ledger import Ledger, drop_template_dir, jobs_dir, ledger_entry
from harness.executors.queue import job_views, max_array_size
from harness.executors.settings import JobSettings, settings_from
from harness.plan import Cell, cell_state, cell_token
from harness.store import Store
from harness.sweep import Suite
from harness.train import TrialEnv

T = TypeVar("T")


def chunks(items: list[T], size: int) -> list[list[T]]:
    """``items`` in consecutive pieces of at most ``size``."""
    return [items[i:i + size] for i in range(0, len(items), size)]


@contextmanager
def sbatch_refusal() -> Iterator[None]:
    """A submission sbatch refuses becomes one line: the last line sbatch printed (no traceback)."""
    try:
        yield
    except submitit.core.utils.FailedJobError as err:
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        raise HarnessError(f"sbatch refused the job: {lines[-1] if lines else err}") from None


def slurm_executor(folder: Path, suite: Suite, settings: JobSettings) -> submitit.AutoExecutor:
    """A submitit SLURM executor with the job settings (logs under ``folder/slurm/<job id>``): one task on one node,
    or for data-parallel trials ``devices`` tasks per node on ``nodes`` nodes, each task one rank (and one GPU when
    the jobs have GPUs: ``gpus_per_node`` = ``devices``)."""
    executor = submitit.AutoExecutor(folder=folder / "slurm" / "%j", cluster="slurm",
                                     slurm_max_num_timeout=settings.max_timeouts)
    parallel = settings.devices * settings.nodes > 1
    gpus = (settings.devices if settings.gpus else None) if parallel else (settings.gpus or None)
    params: dict[str, Any] = {
        "name": f"harness-{suite.name}", "timeout_min": settings.time_min, "nodes": settings.nodes,
        "tasks_per_node": settings.devices,
        "cpus_per_task": settings.cpus, "mem_gb": settings.mem_gb, "gpus_per_node": gpus,
        "slurm_partition": settings.partition, "slurm_account": settings.account, "slurm_qos": settings.qos,
        "slurm_array_parallelism": settings.array_parallelism, "slurm_signal_delay_s": settings.signal_delay(),
        "slurm_additional_parameters": settings.sbatch or None, "slurm_setup": settings.setup or None,
    }
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def run_slurm(suite: Suite, cells: list[Cell], store: Store, env: TrialEnv, args: argparse.Namespace,
              total_pending: int | None = None) -> int:
    """Submit every cell with trials to run that has no live job, as job arrays; return without waiting. Returns 0
    once submitted (or when nothing needed submitting), 1 when a selected cell can never finish (a dead end)."""
    settings = settings_from(suite, args)
    settings.signal_delay()  # refuse a time limit too short for the pre-timeout signal before anything else
    folder = jobs_dir(store, suite)
    ledger = Ledger(folder)
    states = {cell: cell_state(suite, cell, store, stale=False) for cell in cells}
    dead = [state for state in states.values() if state.dead_end]
    for state in dead:
        print(f"no result: {state.cell.key}: {state.blocked} (not submitted)")
    todo = [cell for cell, state in states.items() if state.to_run()]
    with ledger.locked():
        views = job_views(list(ledger.latest().values()), finished=False)
        queued = [(c, views[t]) for c in todo if (t := cell_token(suite, c)) in views and views[t].alive]
        submit = [c for c in todo if c not in {q for q, _ in queued}]
        if queued:
            print(f"{len(queued)} cell(s) already queued or running, not submitted again: "
                  + ", ".join(f"{c.key} ({v.job_id} {v.state})" for c, v in queued[:10])
                  + (" ..." if len(queued) > 10 else ""))
        if not submit:
            print("nothing to submit")
            return EXIT_UNFINISHED if dead else EXIT_COMPLETE
        limit = max_array_size()  # also: is SLURM there at all (one clear line if not)
        executor = slurm_executor(folder, suite, settings)
        code = code_identity()
        for part in chunks(submit, limit):
            with sbatch_refusal():
                jobs = executor.submit_array([make_job(suite, c, store, env, settings, folder, code) for c in part])
            ledger.append([ledger_entry(suite, c, j, "slurm", code) for c, j in zip(part, jobs)])
            drop_template_dir(folder / "slurm")
            array_id = str(jobs[0].job_id).split("_")[0]
            print(f"submitted {len(jobs)} cell(s) as SLURM job {array_id}"
                  + (f" (array of {len(jobs)}, at most {min(len(jobs), settings.array_parallelism)} at once)"
                     if len(jobs) > 1 else ""))
            for cell, job in list(zip(part, jobs))[:20]:
                print(f"  {job.job_id:>12}  {cell.key}")
            if len(jobs) > 20:
                print(f"  ... and {len(jobs) - 20} more (see {ledger.path})")
    parallel = settings.devices * settings.nodes > 1
    where = ", ".join(filter(None, [f"partition {settings.partition}" if settings.partition else None,
                                    f"{settings.time_min} min",
                                    f"{settings.devices} task(s) x {settings.nodes} node(s) per trial "
                                    f"({settings.devices * settings.nodes} ranks)" if parallel else None,
                                    (f"{settings.devices} GPU(s) per node" if parallel else
                                     f"{settings.gpus} GPU(s)") if settings.gpus else None,
                                    f"{settings.cpus} CPU(s)" if settings.cpus else None]))
    print(f"resources per job: {where}; code {str(code.get('commit'))[:12]}"
          f"{' (dirty)' if code.get('dirty') else ''}, check on start: {settings.code_check}")
    print(f"logs: {folder / 'slurm'}/<job id>/")
    print(f"follow with: {status_hint(args)}")
    return EXIT_UNFINISHED if dead else EXIT_COMPLETE


def array_ids(entries: list[dict[str, Any]]) -> list[str]:
    """The distinct SLURM job ids (an array's id, not ``<id>_<index>``) of ledger entries, in order."""
    return list(dict.fromkeys(str(e["job_id"]).split("_")[0] for e in entries if e.get("executor") == "slurm"))


def live_jobs(folder: Path, suite: Suite, cells: list[Cell]) -> list[dict[str, Any]]:
    """The ledger entries of the given cells whose latest job is still queued or running."""
    latest = Ledger(folder).latest()
    tokens = {cell_token(suite, cell) for cell in cells}
    entries = [entry for token, entry in latest.items() if token in tokens]
    views = job_views(entries, finished=False)
    return [entry for entry in entries if (view := views.get(entry["token"])) is not None and view.alive]


def submit_after(fn: Any, folder: Path, name: str, settings: JobSettings, after: list[str],
                 time_min: int = 30) -> str:
    """Submit ``fn`` (a picklable callable) as one small job (1 CPU, no GPU; the settings' partition, account,
    qos and setup lines) that SLURM starts once every job in ``after`` has ended, whatever its outcome
    (``--dependency=afterany:<id>:...``; an array id waits for all its elements). Returns the job id."""
    executor = submitit.AutoExecutor(folder=folder / "slurm" / "%j", cluster="slurm")
    params: dict[str, Any] = {
        "name": name, "timeout_min": time_min, "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1,
        "slurm_partition": settings.partition, "slurm_account": settings.account, "slurm_qos": settings.qos,
        "slurm_setup": settings.setup or None,
        "slurm_additional_parameters": {"dependency": "afterany:" + ":".join(after)} if after else None,
    }
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    with sbatch_refusal():
        job = executor.submit(fn)
    drop_template_dir(folder / "slurm")
    return str(job.job_id)


def status_hint(args: argparse.Namespace) -> str:
    """The `harness status` command that selects the same trials as this run."""
    parts = ["harness status", f"--suite {args.suite}"]
    for flag in ("methods", "tasks", "results", "run_id", "epochs", "seeds", "grid_points", "backbone", "weights"):
        value = getattr(args, flag, None)
        if value is not None:
            parts.append(f"--{flag.replace('_', '-')} {value}")
    parts += [f"--set '{item}'" for item in getattr(args, "set", None) or []]
    return " ".join(parts)
