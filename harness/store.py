"""The results store: one JSON record per finished trial, written atomically, validated when read.

Layout: ``<results>/<suite>/<method>/<task>/<stage>-<trial id>.json``. A record is valid when it parses, has the
required fields, a known status, and its id equals the hash of its spec. Anything else is reported as a problem
and never counted; the trial runs again and its new record replaces the bad one. A run's records (``--run-id``, a
nightly) live in a store of their own, ``<results>/_runs/<run id>/`` (:mod:`harness.runs`), which a scan of
``<results>`` skips, so they never mix into the normal tables.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.files import atomic_write_json
from harness.plan import STATE_OF_STATUS, Cell, TrialSpec, trial_id

if TYPE_CHECKING:  # pragma: no cover
    from harness.sweep import Suite

RECORD_SCHEMA = 1
#: each cell folder's index of its records' settings (:meth:`Store.settings_index`); a dot file, so no scan reads it
INDEX_NAME = ".settings-index"  # not *.json: scripts that glob records do not pick it up
INDEX_SCHEMA = 1
#: the spec fields that are a suite's settings (the keys of :meth:`harness.sweep.Suite.spec_base`, sorted): what
#: the settings index is keyed by when a record is written (tests/test_read_path.py checks they agree)
SETTINGS_FIELDS = ("backbone", "data", "overrides", "protocol", "suite", "train")
STATUSES = tuple(STATE_OF_STATUS)
REQUIRED_FIELDS = ("schema", "id", "spec", "status", "metrics", "curve", "params", "provenance")


def default_results_dir() -> Path:
    return Path(os.environ.get("HARNESS_RESULTS", "results"))


def default_cache_dir() -> Path:
    env = os.environ.get("HARNESS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "harness"


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
    _dirs: dict[tuple[str, str, str], Path] = field(default_factory=dict, repr=False, compare=False)

    def path_for(self, spec: TrialSpec) -> Path:
        return self.cell_dir(spec.suite, spec.cell) / f"{spec.stage}-{spec.id}.json"

    def cell_dir(self, suite: str, cell: Cell) -> Path:
        key = (suite, cell.method, cell.task)
        folder = self._dirs.get(key)
        if folder is None:  # made once per cell: a suite's table asks for thousands of record paths
            folder = self._dirs[key] = self.root / suite / cell.method / cell.task
        return folder

    def _check(self, path: Path, expected: TrialSpec | None = None) -> dict[str, Any] | None:
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
        # the id is the hash of the spec: a record that holds exactly the spec it was read for (``expected``, whose
        # id is known) is not hashed again
        known = expected is not None and record["id"] == expected.id and record["spec"] == expected.to_dict()
        if not known and record["id"] != trial_id(record["spec"]):
            self._problem(path, "record id does not match its spec (edited or truncated); the trial will run again")
            return None
        if record["status"] == "ok" and not isinstance(record["metrics"].get("eval"), (int, float)):
            self._problem(path, "ok record without an eval metric; the trial will run again")
            return None
        return record

    def _problem(self, path: Path, reason: str) -> None:
        if not any(p.path == path for p in self.problems):
            self.problems.append(Problem(path, reason))

    def read(self, spec: TrialSpec) -> dict[str, Any] | None:
        """The valid record for a spec, or None (missing, or reported as a problem)."""
        path = self.path_for(spec)
        return self._check(path, spec) if path.exists() else None

    def write(self, record: dict[str, Any]) -> Path:
        spec = record["spec"] if isinstance(record["spec"], TrialSpec) else TrialSpec.from_dict(record["spec"])
        record = dict(record, schema=RECORD_SCHEMA, id=spec.id, spec=spec.to_dict())
        path = self.path_for(spec)
        atomic_write_json(path, record)
        self._note_in_index(path, record["spec"])
        return path

    def _note_in_index(self, path: Path, spec: dict[str, Any]) -> None:
        """Add a record just written to its folder's settings index (:meth:`settings_index`), so the first
        ``status`` after a run of thousands of trials does not parse them all. Best effort: when two writers race,
        or the index is of other keys, a reader finds the entry missing or stale and reads that record again."""
        index_path = path.parent / INDEX_NAME
        try:
            cached = json.loads(index_path.read_text()) if index_path.exists() else {}
            if cached.get("schema") != INDEX_SCHEMA or cached.get("keys") != list(SETTINGS_FIELDS):
                cached = {"schema": INDEX_SCHEMA, "keys": list(SETTINGS_FIELDS), "files": {}}
            stat = path.stat()
            cached["files"][path.name] = {"size": stat.st_size, "mtime": stat.st_mtime_ns, "problem": None,
                                          "key": settings_key(spec, dict.fromkeys(SETTINGS_FIELDS)),
                                          "stage": spec.get("stage")}
            atomic_write_json(index_path, cached)
        except (OSError, ValueError, AttributeError, TypeError):  # the record is written; the index is a cache
            pass

    def scan(self, suite: str | None = None) -> list[dict[str, Any]]:
        """Every valid record under the results folder (of one suite if given); problems are collected."""
        base = self.root / suite if suite else self.root
        return [record for _, record in self._records_under(base)]

    def _records_under(self, base: Path) -> list[tuple[Path, dict[str, Any]]]:
        if not base.is_dir():
            return []
        found = []
        for path in sorted(base.rglob("*.json")):
            parts = path.relative_to(base).parts
            if path.name.startswith(".") or "_jobs" in parts or "_runs" in parts or path.name == "run.json":
                continue
            record = self._check(path)
            if record is not None:
                found.append((path, record))
        return found

    def unplanned(self, suite: "Suite", cell: Cell, planned_ids: set[str]) -> list[tuple[Path, dict[str, Any]]]:
        """Records (path, record) of a cell made with the suite's current settings that its plan no longer has
        (an edited grid, an earlier winner's finals, an older method or task version): stale, never counted.
        Records of other settings (a smoke run's overrides, an earlier backbone) are not stale: they belong to
        another plan. Which records have which settings comes from the folder's index (:meth:`settings_index`), so
        only the candidates are read in full."""
        base = suite.spec_base()
        current = settings_key(base, base)
        found = []
        folder = self.cell_dir(suite.name, cell)
        for name, entry in self.settings_index(folder, base).items():
            if entry["key"] != current or record_id_of(name) in planned_ids:
                continue
            path = folder / name
            record = self._check(path)
            if record is not None and record["id"] not in planned_ids and same_settings(record["spec"], base):
                found.append((path, record))
        return found

    def other_settings(self, suite: "Suite") -> list[dict[str, Any]]:
        """The distinct suite-level settings of this suite's final records that differ from the current ones
        (e.g. a smoke run's overrides), most records first: each ``{"overrides": ..., "records": n, ...}``. Counted
        from the cell folders' indexes (:meth:`settings_index`); one record per group is read for its settings."""
        base = suite.spec_base()
        current = settings_key(base, base)
        groups: dict[str, dict[str, Any]] = {}
        folder = self.root / suite.name
        cells = sorted(p for p in folder.glob("*/*") if p.is_dir()) if folder.is_dir() else []
        for cell_dir in cells:
            for name, entry in self.settings_index(cell_dir, base).items():
                if entry["key"] in (None, current) or entry["stage"] != "final":
                    continue
                group = groups.get(entry["key"])
                if group is None:
                    spec = (self._check(cell_dir / name) or {}).get("spec")
                    if spec is None:
                        continue
                    group = groups[entry["key"]] = {
                        "overrides": spec.get("overrides") or {}, "records": 0,
                        "differs": sorted(k for k in base if spec.get(k) != base[k])}
                group["records"] += 1
        return sorted(groups.values(), key=lambda e: -e["records"])

    def settings_index(self, folder: Path, base: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Every record file of one cell folder, by file name -> ``{"key": its settings' key (:func:`settings_key`, None when the
        record is not valid), "stage": its stage}``, for the suite-level settings named by ``base``'s keys.

        Status and the table's hints ask, per cell, which records have which settings; over thousands of records
        of other settings (a season of smoke runs) parsing every file each time cost seconds. The answers are kept
        in the folder's :data:`INDEX_NAME`, by file name, size and modification time: a file that is new or changed
        is read again, an index of other ``base`` keys is rebuilt, and an invalid record's problem is reported
        again each time (never cached as fine). A folder that cannot be written keeps working without the index."""
        if not folder.is_dir():
            return {}
        keys = sorted(base)
        index_path = folder / INDEX_NAME
        try:
            cached = json.loads(index_path.read_text())
            if cached.get("schema") != INDEX_SCHEMA or cached.get("keys") != keys:
                cached = {}
        except (OSError, ValueError, AttributeError):
            cached = {}
        old = cached.get("files") or {}
        files: dict[str, dict[str, Any]] = {}
        changed = False
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.name.endswith(".json") or entry.name.startswith(".") or not entry.is_file():
                continue
            stat = entry.stat()
            known = old.get(entry.name)
            if known is not None and known.get("size") == stat.st_size and known.get("mtime") == stat.st_mtime_ns:
                if known.get("problem"):
                    self._problem(folder / entry.name, known["problem"])
            else:
                before = len(self.problems)
                record = self._check(folder / entry.name)
                problem = self.problems[-1].reason if record is None and len(self.problems) > before else None
                known = {"size": stat.st_size, "mtime": stat.st_mtime_ns, "problem": problem,
                         "key": settings_key(record["spec"], base) if record is not None else None,
                         "stage": record["spec"].get("stage") if record is not None else None}
                changed = True
            files[entry.name] = known
        if changed or len(files) != len(old):
            try:
                atomic_write_json(index_path, {"schema": INDEX_SCHEMA, "keys": keys, "files": files})
            except OSError:  # a read-only results folder: the next reader parses the records again
                pass
        return files


def record_id_of(name: str) -> str:
    """The trial id in a record's file name (``<stage>-<id>.json``)."""
    return name.removesuffix(".json").rpartition("-")[2]


def settings_key(spec: dict[str, Any], base: dict[str, Any]) -> str:
    """A short hash of a spec's suite-level settings (the fields named by ``base``'s keys): two specs have the same
    key exactly when :func:`same_settings` holds between them (up to hash collisions)."""
    text = json.dumps({k: spec.get(k) for k in sorted(base)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def same_settings(spec: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether a record's spec has the suite-level settings ``base`` (backbone, budget, protocol, data, overrides)."""
    return all(spec.get(k) == v for k, v in base.items())
