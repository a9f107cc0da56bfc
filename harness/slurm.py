"""Cells as submitit jobs: ``--executor local`` (worker processes on this machine, waits for them) and
``--executor slurm`` (job arrays on a SLURM cluster, submits and returns), plus the queue view that
``harness status`` merges with the records.

One job runs one grid cell through :func:`harness.runner.run_cell`: its trials run in order and each lands as its own
record, so a job that starts again (requeued, or resubmitted after a cancel) skips the recorded trials and resumes at
the first missing one. A trial in flight saves a resumable checkpoint every ``checkpoint_every`` epochs under
``<results>/<suite>/_jobs/checkpoints/`` (named by trial id, so a resubmitted job with a new id finds it too); the
checkpoint is removed when the trial's record lands.

Preemption and time limits: the job callable is a :class:`submitit.helpers.Checkpointable`. SLURM sends USR2
``signal_delay_s`` before the time limit (and a preempting scheduler may send it too); submitit then calls
:meth:`CellJob.checkpoint` and requeues the job itself, at most ``max_timeouts`` times for time limits. A job requeued
from outside (``scontrol requeue``, or a preemption that only sends SIGTERM) restarts from its submission pickle; that
is safe because the state lives in the records and epoch checkpoints, not in the callable.

Code version: the submission records the git commit and a fingerprint of the harness/methods/tasks sources; a job
compares them when it starts and, with ``code_check: refuse`` (the default), stops before running any trial when the
code changed in between (``harness status`` shows why; ``harness run`` resubmits on the current code). ``warn`` runs
anyway and says so in the log; each record's provenance still names the code that ran it.

Bookkeeping lives under ``<results>/<suite>/_jobs/``: ``submissions.jsonl`` (one line per submitted cell: cell, job
id, log paths), the submitit folders ``slurm/<job id>/`` and ``local/<run>/<pid>/``, and ``checkpoints/``. Records
and the queue (squeue, then sacct) are the truth; nothing here waits on a job's result pickle.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from harness.errors import HarnessError, did_you_mean
from harness.plan import Cell, final_specs, fixed_hparams, search_specs, select_best, trial_id
from harness.runner import cell_status, run_cell
from harness.store import Store, file_lock
from harness.sweep import REPO_ROOT, Suite

if TYPE_CHECKING:
    from harness.train import TrialEnv

JOBS_DIR = "_jobs"
LEDGER = "submissions.jsonl"  # not .json: the store scans *.json for records
CODE_DIRS = ("harness", "methods", "tasks")
DEFAULT_TIME_MIN = 240
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's own default MaxArraySize

#: keys of a suite's ``slurm:`` section, with their types
SLURM_KEYS: dict[str, type | tuple[type, ...]] = {
    "partition": str, "account": str, "qos": str, "time": int, "gpus": int, "cpus": int, "mem_gb": (int, float),
    "array_parallelism": int, "sbatch": dict, "setup": list, "signal_delay_s": int, "max_timeouts": int,
}
#: keys of a suite's ``executor:`` section (settings shared by the local and SLURM executors)
EXECUTOR_KEYS: dict[str, type | tuple[type, ...]] = {"workers": int, "checkpoint_every": int, "code_check": str}
CODE_CHECKS = ("refuse", "warn")


# -- settings -------------------------------------------------------------------------------------------------------
@dataclass
class JobSettings:
    """Resources and behaviour of local/SLURM jobs: the suite's ``slurm:``/``executor:`` sections, then flags."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | None = None  # minutes; None: DEFAULT_TIME_MIN on SLURM, a week locally
    gpus: int | None = None
    cpus: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 256
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    signal_delay_s: int | None = None
    max_timeouts: int = 3
    workers: int | None = None
    checkpoint_every: int = 1
    code_check: str = "refuse"

    @property
    def time_min(self) -> int:
        return self.time if self.time is not None else DEFAULT_TIME_MIN

    def signal_delay(self) -> int:
        """Seconds before the time limit at which SLURM sends USR2. SLURM checks limits every 30 s and signals when
        at most ``delay + 30`` s remain, so the limit must exceed that or the signal fires at once."""
        total = self.time_min * 60
        delay = self.signal_delay_s if self.signal_delay_s is not None else min(90, max(10, total // 4))
        if total <= delay + 30:
            raise HarnessError(f"--time {self.time_min} min is too short for a {delay} s pre-timeout signal "
                               f"(SLURM sends it when <= {delay + 30} s remain): raise --time or lower "
                               "slurm.signal_delay_s")
        return delay


def parse_sbatch(items: list[str]) -> dict[str, Any]:
    """``--sbatch KEY=VALUE`` items as submitit's ``slurm_additional_parameters`` (``hold`` or ``hold=true``: a bare
    flag). Values stay strings (``01:00:00`` must not become a number)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise HarnessError(f"--sbatch expects KEY=VALUE (e.g. gres=gpu:1 or hold=true), got '{item}'")
        if not sep or value.strip().lower() == "true":
            out[key] = True
        elif value.strip().lower() == "false":
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _section(suite: Suite, name: str, keys: dict[str, Any]) -> dict[str, Any]:
    section = dict(suite.raw.get(name) or {})
    for key, value in section.items():
        if key not in keys:
            raise HarnessError(f"{suite.line_of(name, key)}: {name}.{key}: unknown key{did_you_mean(key, keys)} "
                               f"(known: {', '.join(keys)})")
        kind = keys[key]
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is int):
            raise HarnessError(f"{suite.line_of(name, key)}: {name}.{key}: expected {getattr(kind, '__name__', kind)}"
                               f", got {value!r}")
    return section


def settings_from(suite: Suite, args: argparse.Namespace) -> JobSettings:
    """The suite's ``slurm:`` and ``executor:`` sections, overridden by the command line."""
    merged: dict[str, Any] = {**_section(suite, "slurm", SLURM_KEYS), **_section(suite, "executor", EXECUTOR_KEYS)}
    merged["sbatch"] = {str(k): v for k, v in (merged.get("sbatch") or {}).items()}
    merged["setup"] = [str(line) for line in merged.get("setup") or []]
    flags = {"partition": "partition", "account": "account", "qos": "qos", "time": "time", "gpus": "gpus",
             "cpus": "cpus", "mem_gb": "mem_gb", "array_parallelism": "array_parallelism", "workers": "workers",
             "code_check": "code_check"}
    for key, attr in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            merged[key] = value
    merged["sbatch"].update(parse_sbatch(getattr(args, "sbatch", None) or []))
    merged["setup"] += list(getattr(args, "setup", None) or [])
    settings = JobSettings(**{k: v for k, v in merged.items() if v is not None})
    if settings.code_check not in CODE_CHECKS:
        raise HarnessError(f"code_check: expected one of {', '.join(CODE_CHECKS)}, got '{settings.code_check}'")
    for name in ("time", "cpus", "workers", "array_parallelism", "checkpoint_every"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise HarnessError(f"{name.replace('_', '-')}: expected a positive integer, got {value}")
    return settings


# -- code identity --------------------------------------------------------------------------------------------------
def code_fingerprint(root: Path = REPO_ROOT) -> str:
    """sha256 over the harness/methods/tasks Python sources (paths and bytes): catches uncommitted edits too."""
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def code_identity() -> dict[str, Any]:
    from harness.provenance import git_state

    return {**git_state(), "fingerprint": code_fingerprint()}


def check_code(submitted: dict[str, Any], mode: str) -> None:
    """Compare the code a job was submitted with to the code it is about to run."""
    now = code_identity()
    if now["fingerprint"] == submitted.get("fingerprint"):
        return
    message = (f"the code changed since submission (submitted: commit {str(submitted.get('commit'))[:12]}"
               f"{' dirty' if submitted.get('dirty') else ''}, sources {submitted.get('fingerprint')}; now: commit "
               f"{str(now.get('commit'))[:12]}{' dirty' if now.get('dirty') else ''}, sources {now['fingerprint']})")
    if mode == "warn":
        print(f"[harness] warning: {message}; running anyway (code_check: warn)", file=sys.stderr, flush=True)
        return
    raise HarnessError(f"{message}; refusing to run (code_check: refuse). Resubmit with `harness run`, "
                       "or set executor.code_check: warn")


# -- the job --------------------------------------------------------------------------------------------------------
class CellFailed(RuntimeError):
    """Raised at the end of a job whose cell had failed trials, so SLURM and the log show the job as failed."""


class CellJob(submitit.helpers.Checkpointable):
    """One grid cell as a checkpointable submitit job. Its state lives on disk (records, epoch checkpoints), so
    :meth:`checkpoint` requeues the callable unchanged and a restart from the original pickle is just as good."""

    def __init__(self, suite: Suite, cell: Cell, results_root: Path, env: TrialEnv, checkpoint_dir: Path,
                 checkpoint_every: int, code: dict[str, Any], code_check: str, threads: int | None = None):
        self.suite, self.cell, self.results_root = suite, cell, Path(results_root)
        self.env, self.checkpoint_dir, self.checkpoint_every = env, Path(checkpoint_dir), checkpoint_every
        self.code, self.code_check, self.threads = code, code_check, threads

    def __call__(self) -> dict[str, Any]:
        import torch

        from harness.train import pick_device, run_trial

        job = submitit.JobEnvironment().job_id  # 123_4 for an array element
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        log(f"job {job} (restart {restarts}) cell {self.cell.key} of suite {self.suite.name}")
        check_code(self.code, self.code_check)
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads:  # torch's default (all visible cores) oversubscribes a node shared by several jobs
            torch.set_num_threads(threads)
        env = dataclasses.replace(self.env, device=pick_device(), progress=False,
                                  checkpoint_dir=self.checkpoint_dir, checkpoint_every=self.checkpoint_every)
        failures: list[str] = []

        def run(spec: dict[str, Any]) -> dict[str, Any]:
            tid = trial_id(spec)
            label = f"{spec['stage']} {tid} hparams={spec['hparams']} seed={spec['seed']}"
            ckpt = self.checkpoint_dir / f"{tid}.ckpt.pt"
            if ckpt.exists():
                log(f"resuming {label} from its epoch checkpoint {ckpt}")
            else:
                log(f"start {label}")
            record = run_trial(spec, env)
            value = record["metrics"].get("eval")
            log(f"done {label}: {record['status']}" + (f" eval={value:.4g}" if isinstance(value, float) else "")
                + f" ({record['wall_time_s']:.1f} s)")
            if record["status"] == "failed":
                err = record["error"]
                print(err["traceback"], file=sys.stderr, flush=True)
                failures.append(f"{spec['stage']} {tid}: {err['type']}: {err['message']}")
            return record

        outcome = run_cell(self.suite, self.cell, Store(self.results_root), run)
        log(f"cell {self.cell.key}: {outcome.ran} trials ran, {outcome.skipped} already recorded"
            + (f"; {outcome.note}" if outcome.note else ""))
        if failures:
            raise CellFailed(f"{self.cell.key}: {len(failures)} trial(s) failed (recorded as failed; "
                             f"`harness run` retries them): " + "; ".join(failures))
        return {"cell": self.cell.key, "ran": outcome.ran, "skipped": outcome.skipped, "note": outcome.note}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        log(f"checkpoint: requeued; {self.cell.key} resumes at its first missing trial, a trial in flight from its "
            "last epoch checkpoint")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[harness {stamp}] {message}", flush=True)


# -- ledger ---------------------------------------------------------------------------------------------------------
def jobs_dir(store: Store, suite: Suite) -> Path:
    return store.root.resolve() / suite.name / JOBS_DIR


def cell_token(suite: Suite, cell: Cell) -> str:
    """What a cell computes: the ids of its planned trials (the final ones without their selected hyperparameters).
    Two submissions with the same token run the same trials; a smoke run (other overrides) has another token."""
    hparams = fixed_hparams(suite, cell) if suite.protocol["kind"] == "fixed" else {}
    ids = [trial_id(s) for s in search_specs(suite, cell)] + [trial_id(s) for s in final_specs(suite, cell, hparams)]
    return hashlib.sha256(json.dumps([cell.key, ids]).encode()).hexdigest()[:16]


class Ledger:
    """``submissions.jsonl``: one line per submitted cell, appended under a lock."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LEDGER

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held across 'ask the queue, then submit', so two `harness run`s cannot both submit a cell."""
        with file_lock(self.folder / ".submit.lock"):
            yield

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: skip it, the queue still knows the job
                continue
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last submission per cell token."""
        return {e["token"]: e for e in self.entries()}

    def append(self, entries: list[dict[str, Any]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            for entry in entries:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def ledger_entry(suite: Suite, cell: Cell, job: submitit.Job, executor: str, code: dict[str, Any]) -> dict[str, Any]:
    return {"cell": cell.key, "token": cell_token(suite, cell), "job_id": str(job.job_id), "executor": executor,
            "submitted_at": datetime.now(timezone.utc).isoformat(), "submitted_ts": time.time(),
            "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
            "result": str(job.paths.result_pickle), "overrides": suite.overrides, "code": code}


# -- the queue ------------------------------------------------------------------------------------------------------
class QueueUnavailable(HarnessError):
    pass


def _command(cmd: list[str], timeout: float = 30) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise QueueUnavailable(f"`{cmd[0]}` not found: is this a SLURM login node?") from None
    except subprocess.TimeoutExpired:
        raise QueueUnavailable(f"`{' '.join(cmd[:2])}` did not answer in {timeout:.0f} s (slurmctld down?)") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise QueueUnavailable(f"`{' '.join(cmd[:2])}` failed: {last}")
    return out.stdout


def slurm_states(job_ids: list[str], finished: bool = True) -> tuple[dict[str, str], set[str]]:
    """SLURM state per job id (``123`` or ``123_4``) and the ids still in the queue (alive): squeue first, then
    (``finished``) sacct for the others. Ids neither knows are left out."""
    if not job_ids:
        return {}, set()
    states: dict[str, str] = {}
    for line in _command(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"]).splitlines():
        jid, _, state = line.strip().partition("|")
        if jid:
            states[jid] = state
    alive = {j: states[j] for j in job_ids if j in states}
    missing = [j for j in job_ids if j not in alive] if finished else []
    ended: dict[str, str] = {}
    for start in range(0, len(missing), 200):
        chunk = missing[start:start + 200]
        try:
            text = _command(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(chunk)])
        except QueueUnavailable:  # no accounting: finished jobs are just unknown
            break
        for line in text.splitlines():
            jid, _, state = line.strip().partition("|")
            if jid in chunk:
                ended[jid] = state.split()[0] if state else "UNKNOWN"
    return {**ended, **alive}, set(alive)


def _pid_alive(pid: str) -> bool:
    try:
        return b"submitit" in Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def _result_outcome(entry: dict[str, Any]) -> str | None:
    """'COMPLETED' or 'FAILED' from a job's result pickle when it is there and newer than the submission (job ids
    restart on a reinstalled cluster); None otherwise. Read once, never waited for."""
    path = Path(entry.get("result", ""))
    try:
        if path.stat().st_mtime < entry.get("submitted_ts", 0):
            return None
        with open(path, "rb") as fh:
            kind = pickle.load(fh)[0]
    except Exception:  # noqa: BLE001 - missing, partial or foreign pickle: no information
        return None
    return "COMPLETED" if kind == "success" else "FAILED"


@dataclass
class JobView:
    entry: dict[str, Any]
    state: str  # SLURM's word (RUNNING, PENDING, FAILED, ...), or LOCAL-RUNNING / UNKNOWN
    alive: bool

    @property
    def job_id(self) -> str:
        return self.entry["job_id"]

    @property
    def running(self) -> bool:
        return self.state in ("RUNNING", "COMPLETING", "CONFIGURING", "LOCAL-RUNNING")

    @property
    def ended(self) -> bool:
        return not self.alive and self.state in ENDED_STATES


#: job states that mean the job is over (SLURM's, plus ENDED: a local process gone without a result)
ENDED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "REVOKED", "ENDED")


def job_views(entries: list[dict[str, Any]], finished: bool = True) -> dict[str, JobView]:
    """Queue state of ledger entries, by token (``finished=False``: only whether they are alive, no sacct). Raises
    QueueUnavailable when SLURM entries exist and squeue fails."""
    slurm_ids = [e["job_id"] for e in entries if e["executor"] == "slurm"]
    states, alive = slurm_states(slurm_ids, finished)
    views: dict[str, JobView] = {}
    for e in entries:
        outcome = (lambda: _result_outcome(e)) if finished else (lambda: None)
        if e["executor"] == "slurm":
            state = states.get(e["job_id"]) or outcome() or "UNKNOWN"
            views[e["token"]] = JobView(e, state, e["job_id"] in alive)
        else:
            running = _pid_alive(e["job_id"])
            state = "LOCAL-RUNNING" if running else (outcome() or "ENDED")
            views[e["token"]] = JobView(e, state, running)
    return views


def log_tail(path: str | Path, lines: int = 6) -> list[str]:
    """The last non-empty lines of a log file (it may be large: read only its end)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    found = [line for line in text.splitlines() if line.strip()]
    # from the last exception line on ("harness.slurm.CellFailed: ...", "ValueError: ..."), else the plain tail
    errors = [i for i, line in enumerate(found) if _EXCEPTION_LINE.match(line)]
    return found[errors[-1]:][:lines] if errors else found[-lines:]


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Failed|Interrupt|Exit)\b\S*: ")


# -- status ---------------------------------------------------------------------------------------------------------
@dataclass
class CellReport:
    cell: Cell
    state: str  # done / running / pending / failed
    counts: dict[str, int]
    job: JobView | None = None
    reason: str = ""
    details: list[str] = field(default_factory=list)


def _failed_records(suite: Suite, cell: Cell, store: Store) -> list[dict[str, Any]]:
    from harness.api import TASKS

    records = [store.read(s) for s in search_specs(suite, cell)]
    if suite.protocol["kind"] == "fixed":
        hparams: dict[str, Any] | None = fixed_hparams(suite, cell)
    else:
        best = select_best([r for r in records if r], TASKS.get(cell.task).higher_is_better) if all(records) else None
        hparams = best["spec"]["hparams"] if best else None
    if hparams is not None:
        records += [store.read(s) for s in final_specs(suite, cell, hparams)]
    return [r for r in records if r is not None and r["status"] == "failed"]


def cell_reports(suite: Suite, cells: list[Cell], store: Store) -> tuple[list[CellReport], str | None]:
    """Per cell: records merged with its latest submitted job. Returns the reports and a warning when the queue
    could not be asked (states then come from records and logs alone)."""
    entries = list(Ledger(jobs_dir(store, suite)).latest().values())
    warning = None
    try:
        views = job_views(entries)
    except QueueUnavailable as err:
        warning = f"queue state unknown ({err}); showing records only"
        views = {}
    reports = []
    for cell in cells:
        counts = cell_status(suite, cell, store)
        job = views.get(cell_token(suite, cell)) if entries else None
        report = CellReport(cell, "pending", counts, job)
        if counts["pending"] == 0 and counts["failed"] == 0:
            report.state = "done"
        elif job is not None and (job.alive or job.state not in (*ENDED_STATES, "UNKNOWN")):
            report.state = "running" if job.running else "pending"
        elif counts["failed"] or (job is not None and job.ended):
            report.state = "failed"
            if job is not None and job.state == "COMPLETED":  # it ran but left trials missing: its output says why
                report.reason = (f"job {job.job_id} COMPLETED with {counts['pending']} trial(s) missing: log "
                                 f"{job.entry['stdout']}")
                report.details = log_tail(job.entry["stdout"], 2)
            elif job is not None:
                report.reason = f"job {job.job_id} {job.state}: log {job.entry['stderr']}"
                report.details = log_tail(job.entry["stderr"])
            elif failed := _failed_records(suite, cell, store):
                err = failed[0]["error"]
                report.reason = f"{len(failed)} failed trial(s), e.g. {err['type']}: {err['message']}"
        reports.append(report)
    return reports, warning


# -- executors ------------------------------------------------------------------------------------------------------
def _cells_to_run(suite: Suite, cells: list[Cell], store: Store) -> list[Cell]:
    todo = []
    for cell in cells:
        counts = cell_status(suite, cell, store)
        if counts["pending"] or counts["failed"]:
            todo.append(cell)
    return todo


def _job(suite: Suite, cell: Cell, store: Store, env: TrialEnv, settings: JobSettings, folder: Path,
         code: dict[str, Any], threads: int | None = None) -> CellJob:
    env = dataclasses.replace(
        env, cache_dir=Path(env.cache_dir).resolve(),
        data_root=Path(env.data_root).resolve() if env.data_root else None,
        results_root=store.root.resolve())
    return CellJob(suite, cell, store.root.resolve(), env, folder / "checkpoints", settings.checkpoint_every, code,
                   settings.code_check, threads)


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it); 1 when arrays are disabled."""
    text = _command(["scontrol", "show", "config"])
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.M)
    return max(1, int(found.group(1))) if found else DEFAULT_MAX_ARRAY_SIZE


def _drop_template_dir(folder: Path) -> None:
    """submitit leaves an empty literal ``%j`` folder (its temporary pickles pass through it)."""
    with contextlib.suppress(OSError):
        (folder / "%j").rmdir()


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def slurm_executor(folder: Path, suite: Suite, settings: JobSettings) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "slurm" / "%j", cluster="slurm",
                                     slurm_max_num_timeout=settings.max_timeouts)
    params: dict[str, Any] = {
        "name": f"harness-{suite.name}", "timeout_min": settings.time_min, "nodes": 1, "tasks_per_node": 1,
        "cpus_per_task": settings.cpus, "mem_gb": settings.mem_gb, "gpus_per_node": settings.gpus or None,
        "slurm_partition": settings.partition, "slurm_account": settings.account, "slurm_qos": settings.qos,
        "slurm_array_parallelism": settings.array_parallelism, "slurm_signal_delay_s": settings.signal_delay(),
        "slurm_additional_parameters": settings.sbatch or None, "slurm_setup": settings.setup or None,
    }
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def run_slurm(suite: Suite, cells: list[Cell], store: Store, env: TrialEnv, args: argparse.Namespace,
              total_pending: int | None = None) -> int:
    """Submit every cell with missing trials that has no live job, as job arrays; return without waiting."""
    settings = settings_from(suite, args)
    settings.signal_delay()  # refuse a time limit too short for the pre-timeout signal before anything else
    folder = jobs_dir(store, suite)
    ledger = Ledger(folder)
    todo = _cells_to_run(suite, cells, store)
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
            return 0
        limit = max_array_size()  # also: is SLURM there at all (one clear line if not)
        executor = slurm_executor(folder, suite, settings)
        code = code_identity()
        for part in chunks(submit, limit):
            try:
                jobs = executor.submit_array([_job(suite, c, store, env, settings, folder, code) for c in part])
            except submitit.core.utils.FailedJobError as err:
                lines = [ln for ln in str(err).splitlines() if ln.strip()]
                raise HarnessError(f"sbatch refused the job: {lines[-1] if lines else err}") from None
            ledger.append([ledger_entry(suite, c, j, "slurm", code) for c, j in zip(part, jobs)])
            _drop_template_dir(folder / "slurm")
            array_id = str(jobs[0].job_id).split("_")[0]
            print(f"submitted {len(jobs)} cell(s) as SLURM job {array_id}"
                  + (f" (array of {len(jobs)}, at most {min(len(jobs), settings.array_parallelism)} at once)"
                     if len(jobs) > 1 else ""))
            for cell, job in list(zip(part, jobs))[:20]:
                print(f"  {job.job_id:>12}  {cell.key}")
            if len(jobs) > 20:
                print(f"  ... and {len(jobs) - 20} more (see {ledger.path})")
    where = ", ".join(filter(None, [f"partition {settings.partition}" if settings.partition else None,
                                    f"{settings.time_min} min", f"{settings.gpus} GPU(s)" if settings.gpus else None,
                                    f"{settings.cpus} CPU(s)" if settings.cpus else None]))
    print(f"resources per job: {where}; code {str(code.get('commit'))[:12]}"
          f"{' (dirty)' if code.get('dirty') else ''}, check on start: {settings.code_check}")
    print(f"logs: {folder / 'slurm'}/<job id>/")
    print(f"follow with: {status_hint(args)}")
    return 0


def status_hint(args: argparse.Namespace) -> str:
    """The `harness status` command that selects the same trials as this run."""
    parts = ["harness status", f"--suite {args.suite}"]
    for flag in ("methods", "tasks", "results", "epochs", "seeds", "grid_points", "backbone", "weights"):
        value = getattr(args, flag, None)
        if value is not None:
            parts.append(f"--{flag.replace('_', '-')} {value}")
    parts += [f"--set '{item}'" for item in getattr(args, "set", None) or []]
    return " ".join(parts)


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
    """Run cells as submitit local jobs, ``workers`` at a time, and wait for them."""
    from tqdm.auto import tqdm

    settings = settings_from(suite, args)
    cpus = os.cpu_count() or 1
    workers = settings.workers or max(1, cpus // 2)
    threads = max(1, cpus // workers)
    folder = jobs_dir(store, suite)
    run_folder = folder / "local" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    executor = submitit.AutoExecutor(folder=run_folder / "%j", cluster="local")
    executor.update_parameters(timeout_min=settings.time or 7 * 24 * 60)
    ledger, code = Ledger(folder), code_identity()
    todo = _cells_to_run(suite, cells, store)
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
                job = executor.submit(_job(suite, cell, store, env, settings, folder, code, threads))
                ledger.append([ledger_entry(suite, cell, job, "local", code)])
                running[str(job.job_id)] = (cell, job)
            time.sleep(0.5)
            for jid, (cell, job) in list(running.items()):
                if not job.done():
                    continue
                del running[jid]
                bar.update(1)
                outcome = _result_outcome({"result": str(job.paths.result_pickle)})
                if outcome != "COMPLETED":
                    tail = log_tail(job.paths.stderr, 1)
                    failures.append(f"{cell.key}: {tail[0] if tail else 'no result'} (log: {job.paths.stderr})")
                    bar.write(f"failed: {failures[-1]}")
    except KeyboardInterrupt:
        for _, job in running.values():
            _kill_tree(int(job.job_id))
        bar.write("stopped the running local jobs")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        _drop_template_dir(run_folder)
    return 1 if failures else 0
