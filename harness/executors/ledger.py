"""The jobs folder and its ledger of what was submitted.

Bookkeeping lives under ``<results>/<suite>/_jobs/``: ``submissions.jsonl`` (one line per submitted cell: cell,
its token (:func:`harness.plan.cell_token`), job id, executor, log and result paths, overrides, code identity), the
submitit folders ``slurm/<job id>/`` and ``local/<run>/<pid>/``, and ``checkpoints/``. The ledger only says which
job ran a cell last; records and the queue (:mod:`harness.executors.queue`) say what happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.files import file_lock
from harness.plan import Cell, cell_token
from harness.store import Store
from harness.sweep import Suite

if TYPE_CHECKING:  # pragma: no cover
    import submitit

JOBS_DIR = "_jobs"
LEDGER = "submissions.jsonl"  # not .json: the store scans *.json for records


def jobs_dir(store: Store, suite: Suite) -> Path:
    """``<results>/<suite>/_jobs``, absolute."""
    return store.root.resolve() / suite.name / JOBS_DIR


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
    """The ledger line for one submitted cell."""
    return {"cell": cell.key, "token": cell_token(suite, cell), "job_id": str(job.job_id), "executor": executor,
            "submitted_at": datetime.now(timezone.utc).isoformat(), "submitted_ts": time.time(),
            "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
            "result": str(job.paths.result_pickle), "overrides": suite.overrides, "code": code}


def drop_template_dir(folder: Path) -> None:
    """submitit leaves an empty literal ``%j`` folder (its temporary pickles pass through it): remove it."""
    with contextlib.suppress(OSError):
        (folder / "%j").rmdir()
