"""Runs: a night (or any dated rerun) of a suite in a store of its own, so that the same specs train again.

A trial's id is the hash of its spec, and the code version is not in the spec, so in the normal results folder a
rerun of the same specs is a no-op. ``--run-id ID`` gives a run its own store root::

    <results>/_runs/<run id>/run.json                                  what ran: suite(s), commit, time, command
    <results>/_runs/<run id>/<suite>/<method>/<task>/<stage>-<id>.json  the run's records, as in any store
    <results>/_runs/<run id>/<suite>/_jobs/                              its ledger, job logs, checkpoints

Inside a run, rerunning with the same id resumes (the same specs land in the same files); a new id trains
everything again, and every past run stays where it is, readable by ``harness table/status/regress --run-id``.
``--run-id auto`` names a run by the UTC time it started (``2026-11-30T0300Z``); ``latest`` (when reading) is the
most recent run of the suite. The normal store's scan skips ``_runs``, so runs never mix into normal tables.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.files import atomic_write_json, file_lock
from harness.store import Store

RUNS_DIR = "_runs"
RUN_FILE = "run.json"
#: ``--run-id auto``: the UTC minute the run started
AUTO_FORMAT = "%Y-%m-%dT%H%MZ"
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
#: words that are not run ids: ``auto`` (make one), ``latest`` (the most recent)
RESERVED = ("auto", "latest")


def runs_root(results: Path) -> Path:
    return Path(results) / RUNS_DIR


def new_run_id(now: datetime | None = None) -> str:
    """A run id from the UTC time, e.g. ``2026-11-30T0300Z``."""
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime(AUTO_FORMAT)


def check_run_id(run_id: str) -> str:
    """A run id is a folder name: letters, digits and ``._+-``, starting with a letter or digit."""
    if run_id in RESERVED or not RUN_ID.fullmatch(run_id or ""):
        raise HarnessError(f"--run-id: '{run_id}' is not a run id (letters, digits and . _ + -, e.g. 2026-11-30T0300Z;"
                           " 'auto' makes one from the time, 'latest' reads the most recent run)")
    return run_id


def parse_time(text: str) -> datetime:
    """A date or ISO time (``2026-11-01``, ``2026-11-01T03:00``, ``2026-11-30T0300Z``), as UTC."""
    value = text.strip()
    for fmt in (AUTO_FORMAT, "%Y-%m-%d"):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HarnessError(f"not a date: '{text}' (expected e.g. 2026-11-01 or 2026-11-01T03:00)") from None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


@dataclass
class Run:
    """One run: its folder and what ``run.json`` says about it."""

    run_id: str
    folder: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        return Store(self.folder)

    @property
    def time(self) -> datetime:
        """When the run started (``run.json``'s ``created``; else the id's time; else the folder's mtime)."""
        for text in (self.info.get("created"), self.run_id):
            if text:
                try:
                    return parse_time(str(text))
                except HarnessError:
                    pass
        return datetime.fromtimestamp(self.folder.stat().st_mtime, timezone.utc)

    @property
    def suites(self) -> list[str]:
        return list(self.info.get("suites") or [])

    @property
    def git(self) -> dict[str, Any]:
        """The commit and dirty flag the run started with."""
        return dict(self.info.get("git") or {})

    def summary(self) -> dict[str, Any]:
        """What a report says about a run."""
        return {"run_id": self.run_id, "time": self.time.isoformat(), "git": self.git, "folder": str(self.folder)}


def run_folder(results: Path, run_id: str) -> Path:
    return runs_root(results) / check_run_id(run_id)


def read_run(folder: Path) -> Run:
    info: dict[str, Any] = {}
    path = folder / RUN_FILE
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
            info = loaded if isinstance(loaded, dict) else {}
        except (OSError, json.JSONDecodeError):
            info = {}
    return Run(folder.name, folder, info)


def start_run(results: Path, run_id: str, suite: str, command: list[str] | None = None,
              executor: str | None = None) -> Run:
    """Open (or resume) run ``run_id`` (``auto``: a new id from the time) for ``suite``: create its folder and
    write or update its ``run.json`` (created once; every start appends an invocation with its commit)."""
    from harness.provenance import git_state

    run_id = new_run_id() if run_id == "auto" else check_run_id(run_id)
    folder = runs_root(results) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    git = dict(git_state())
    argv = list(command if command is not None else sys.argv)
    with file_lock(folder / ".run.lock"):
        info = read_run(folder).info
        info.setdefault("run_id", run_id)
        info.setdefault("created", now)
        info.setdefault("git", git)
        info["suites"] = list(dict.fromkeys([*(info.get("suites") or []), suite]))
        info.setdefault("invocations", []).append({"time": now, "suite": suite, "git": git, "executor": executor,
                                                   "command": shlex.join(argv)})
        atomic_write_json(folder / RUN_FILE, info)
    return Run(run_id, folder, info)


def list_runs(results: Path, suite: str | None = None) -> list[Run]:
    """The runs under ``<results>/_runs`` (of one suite if given: named in run.json, or with its folder), oldest
    first."""
    root = runs_root(results)
    if not root.is_dir():
        return []
    runs = []
    for folder in root.iterdir():
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        run = read_run(folder)
        if suite is None or suite in run.suites or (folder / suite).is_dir():
            runs.append(run)
    return sorted(runs, key=lambda r: (r.time, r.run_id))


def latest_run(results: Path, suite: str) -> Run | None:
    runs = list_runs(results, suite)
    return runs[-1] if runs else None


def runs_since(results: Path, suite: str, since: datetime) -> list[Run]:
    """The runs of ``suite`` that started at or after ``since``, oldest first."""
    return [run for run in list_runs(results, suite) if run.time >= since]


def open_run(results: Path, run_id: str, suite: str) -> Run:
    """An existing run of ``suite`` by id, or ``latest``; a clear error (exit 2) when there is none."""
    if run_id == "latest":
        run = latest_run(results, suite)
        if run is None:
            raise HarnessError(f"no runs of suite '{suite}' under {runs_root(results)} (start one with "
                               f"`harness run --suite {suite} --run-id auto`)")
        return run
    folder = run_folder(results, run_id)
    if not folder.is_dir():
        known = [r.run_id for r in list_runs(results, suite)]
        from harness.errors import did_you_mean

        raise HarnessError(f"no run '{run_id}' under {runs_root(results)}{did_you_mean(run_id, known)}"
                           + (f" (runs of {suite}: {', '.join(known[-5:])})" if known else ""))
    return read_run(folder)
