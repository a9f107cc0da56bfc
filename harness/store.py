"""The results store: one JSON record per finished trial, written atomically, validated when read.

Layout: ``<results>/<suite>/<method>/<task>/<stage>-<trial id>.json``. A record is valid when it parses, has the
required fields, a known status, and its id equals the hash of its spec. Anything else is reported as a problem
and never counted; the trial runs again and its new record replaces the bad one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.plan import trial_id

RECORD_SCHEMA = 1
STATUSES = ("ok", "diverged", "failed")
#: statuses that mean "this trial is done; do not run it again". A failed trial (an exception) is retried.
FINISHED = ("ok", "diverged")
REQUIRED_FIELDS = ("schema", "id", "spec", "status", "metrics", "curve", "params", "provenance")


def default_results_dir() -> Path:
    return Path(os.environ.get("HARNESS_RESULTS", "results"))


def default_cache_dir() -> Path:
    env = os.environ.get("HARNESS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "harness"


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over ``path``: readers see the old file
    or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path``, so parallel jobs wait for one producer (of a cached artifact, of
    a submission) instead of all doing the same work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class Problem:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Store:
    root: Path
    problems: list[Problem] = field(default_factory=list)

    def path_for(self, spec: dict[str, Any]) -> Path:
        return self.root / spec["suite"] / spec["method"] / spec["task"] / f"{spec['stage']}-{trial_id(spec)}.json"

    def _check(self, path: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            self._problem(path, f"unreadable record ({err.__class__.__name__}: {err}); the trial will run again")
            return None
        if not isinstance(record, dict) or any(k not in record for k in REQUIRED_FIELDS):
            missing = [k for k in REQUIRED_FIELDS if not isinstance(record, dict) or k not in record]
            self._problem(path, f"partial record, missing {', '.join(missing)}; the trial will run again")
            return None
        if record["status"] not in STATUSES:
            self._problem(path, f"unknown status {record['status']!r}; the trial will run again")
            return None
        if record["id"] != trial_id(record["spec"]):
            self._problem(path, "record id does not match its spec (edited or truncated); the trial will run again")
            return None
        if record["status"] == "ok" and not isinstance(record["metrics"].get("eval"), (int, float)):
            self._problem(path, "ok record without an eval metric; the trial will run again")
            return None
        return record

    def _problem(self, path: Path, reason: str) -> None:
        if not any(p.path == path for p in self.problems):
            self.problems.append(Problem(path, reason))

    def read(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The valid record for a spec, or None (missing, or reported as a problem)."""
        path = self.path_for(spec)
        return self._check(path) if path.exists() else None

    def finished(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        record = self.read(spec)
        return record if record is not None and record["status"] in FINISHED else None

    def write(self, record: dict[str, Any]) -> Path:
        record = dict(record, schema=RECORD_SCHEMA, id=trial_id(record["spec"]))
        path = self.path_for(record["spec"])
        atomic_write_json(path, record)
        return path

    def scan(self, suite: str | None = None) -> list[dict[str, Any]]:
        """Every valid record under the results folder (of one suite if given); problems are collected."""
        base = self.root / suite if suite else self.root
        if not base.is_dir():
            return []
        records = []
        for path in sorted(base.rglob("*.json")):
            if path.name.startswith("."):
                continue
            record = self._check(path)
            if record is not None:
                records.append(record)
        return records
