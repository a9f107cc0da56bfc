"""List-file tasks: the machinery VTAB-1k (``tasks/vtab.py``) and FGVC (``tasks/fgvc.py``) share.

A list-file task reads each split from one file of (image path, integer label) entries under the task's folder.
:class:`ListTask` finds the folder (``data.root``/``--data-root``, or ``data.roots[<task>]``), checks the split
files and the images they list (``harness data check``; docs/protocol.md §7.5, §8.1), builds the dataset and
fingerprints a split by its list file. A family subclasses it with its layout: how a split file is named and
parsed, the expected sizes, how raw labels map to contiguous ids, and the transforms.

Data settings read here (the suite's ``data:`` section, or ``--set data.KEY=VALUE``; declared in
``ListTask.data_keys``):

* ``strict_counts``: true (default). False turns split-size and class-count mismatches into notes, for
  subsets and tests; malformed lines, bad labels, absent images and duplicates are always problems.
* ``deep_sample``: images decoded per split by a deep check (default 100; 0 decodes all)
"""

from __future__ import annotations

import abc
import hashlib
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.api import DataContext, Task
from harness.errors import HarnessError

#: at most this many messages of one kind per split file; the rest are summed up in one more message
MAX_PER_KIND = 5
DEFAULT_DEEP_SAMPLE = 100


@dataclass(frozen=True)
class Entry:
    """One listed image: its path as written in the split file, its label as written, and where it was listed."""

    path: str
    label: int
    line: int  # 1-based line in the split file; 0 when not known


@dataclass
class SplitReport:
    """What one split file holds and what is wrong with it."""

    split: str
    file: Path
    found: bool = False
    entries: list[Entry] = field(default_factory=list)
    expected: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        if not self.found:
            status = "missing"
        elif self.problems:
            status = f"{len(self.problems)} problem(s)"
        else:
            status = f"ok, {len(self.notes)} note(s)" if self.notes else "ok"
        return {"split": self.split, "file": self.file.name, "entries": len(self.entries) if self.found else "-",
                "expected": self.expected if self.expected is not None else "any", "status": status}


@dataclass
class DataReport:
    """A task's data on disk: its folder, one report per split, and task-level problems and notes.

    ``harness data check`` prints ``rows``; ``problems`` is exactly what :meth:`ListTask.check` returns."""

    task: str
    root: Path | None
    splits: list[SplitReport] = field(default_factory=list)
    task_problems: list[str] = field(default_factory=list)
    task_notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return self.task_problems + [p for s in self.splits for p in s.problems]

    @property
    def notes(self) -> list[str]:
        return self.task_notes + [n for s in self.splits for n in s.notes]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [s.row() for s in self.splits]


def capped(messages: list[str], total: int, summary: str) -> list[str]:
    """The first MAX_PER_KIND messages, plus one line saying how many more there were."""
    if total > MAX_PER_KIND:
        return messages[:MAX_PER_KIND] + [summary.format(n=total - MAX_PER_KIND)]
    return messages


def read_image(path: Path):
    """Decode an image fully (PIL is lazy) and convert it to RGB."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


class ImageListDataset:
    """``(image tensor, label)`` items from a list of (image path, label); decoding errors name the list line."""

    def __init__(self, items: list[tuple[Path, int, str]], transform: Callable) -> None:
        self.items = items  # (absolute image path, contiguous label, "file:line" where it was listed)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label, where = self.items[index]
        try:
            image = read_image(path)
        except (OSError, ValueError, SyntaxError) as err:
            raise HarnessError(f"{where}: cannot decode {path}: {err}") from None
        return self.transform(image), label


class ListTask(Task):
    """A task whose splits are list files (one per split) of image paths and integer labels, under one folder.

    Subclasses say where the folder and images are, how a split file is named and parsed, the expected split
    sizes and how raw labels map to contiguous ids; this class does the checks, the dataset and the fingerprint.
    """

    folder: str = ""  # the folder under the data root
    layout_hint: str = ""  # what the folder should hold, for "folder not found" messages
    #: the ``data:`` keys read here (``inspect``); a family adds its own (VTAB's ``preprocess``)
    data_keys: tuple[str, ...] = ("strict_counts", "deep_sample")

    # -- subclass hooks -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def split_file(self, root: Path, split: str) -> Path:
        """The list file of a split."""

    def image_dir(self, root: Path) -> Path:
        """The folder the listed image paths are relative to."""
        return root

    @abc.abstractmethod
    def parse(self, path: Path) -> tuple[list[Entry], list[str]]:
        """Entries of a split file and its format problems (malformed lines, duplicates)."""

    def expected_count(self, split: str) -> int | None:
        return None

    def expected_size(self, split: str) -> int | None:
        return self.expected_count(split)

    def entry_problems(self, report: SplitReport) -> list[str]:
        """Per-entry label checks (labels outside [0, num_classes) and the like)."""
        return []

    def task_checks(self, report: DataReport, strict: bool) -> None:
        """Checks across splits (e.g. FGVC's class count over the union of splits)."""

    def label_map(self, ctx: DataContext) -> dict[int, int] | None:
        """Raw label -> contiguous id, or None when the raw labels already are the ids."""
        return None

    @abc.abstractmethod
    def transform(self, ctx: DataContext, train: bool) -> Callable:
        """The image transform of a split (train-time augmentation when ``train``). It normalises with
        ``ctx.mean``/``ctx.std``, which the engine resolves from ``data.normalize`` (docs/protocol.md §2.2)."""

    # -- where the data is ----------------------------------------------------------------------------------------
    def root(self, ctx: DataContext) -> Path | None:
        """This task's folder: ``data.roots[<task>]`` if set, else ``<data root>/<folder>`` (or
        ``<data root>/vtab-1k/<folder>`` when only that exists)."""
        roots = ctx.settings.get("roots") or {}
        if not isinstance(roots, dict):
            raise HarnessError(f"data.roots: expected a mapping of task name -> folder, got {roots!r}")
        if roots.get(self.name):
            return Path(os.path.expanduser(str(roots[self.name])))
        if ctx.data_root is None:
            return None
        base = Path(os.path.expanduser(str(ctx.data_root)))
        direct = base / self.folder
        if not direct.exists():
            for parent in self.alternative_parents():
                if (base / parent / self.folder).is_dir():
                    return base / parent / self.folder
        return direct

    def alternative_parents(self) -> tuple[str, ...]:
        return ()

    def _prefix(self) -> str:
        return f"{self.name}: "

    # -- checks -------------------------------------------------------------------------------------------------
    def inspect(self, ctx: DataContext, deep: bool = False) -> DataReport:
        """Everything ``harness data check`` reports for this task (``check`` returns its problems)."""
        root = self.root(ctx)
        report = DataReport(task=self.name, root=root)
        p = self._prefix()
        strict = ctx.settings.get("strict_counts", True)
        if not isinstance(strict, bool):
            report.task_problems.append(f"{p}data.strict_counts: expected true or false, got {strict!r}")
            return report
        setting_problem = self.settings_problem(ctx)
        if setting_problem:
            report.task_problems.append(p + setting_problem)
        if root is None:
            report.task_problems.append(
                f"{p}no data root: pass --data-root PATH (the folder that holds {self.folder}/), "
                f"or set data.root or data.roots.{self.name} in the suite")
            return report
        if not root.is_dir():
            report.task_problems.append(f"{p}folder not found: {root} (expected {self.layout_hint})")
            return report
        image_dir = self.image_dir(root)
        for split in self.splits:
            path = self.split_file(root, split)
            sr = SplitReport(split=split, file=path, expected=self.expected_count(split))
            report.splits.append(sr)
            if not path.is_file():
                sr.problems.append(f"{p}{path}: split file not found")
                continue
            sr.found = True
            sr.entries, problems = self.parse(path)
            sr.problems += [p + m for m in problems]
            if not sr.entries and not problems:
                sr.problems.append(f"{p}{path}: no entries")
            elif sr.expected is not None and len(sr.entries) != sr.expected:
                message = f"{p}{path}: {len(sr.entries)} entries, expected {sr.expected}"
                (sr.problems if strict else sr.notes).append(message)
            sr.problems += [p + m for m in self.entry_problems(sr)]
            present = self._absent_images(sr, image_dir)
            if deep:
                self._decode_sample(sr, image_dir, present, ctx)
        self.task_checks(report, strict)
        return report

    def settings_problem(self, ctx: DataContext) -> str | None:
        return None

    def check(self, ctx: DataContext, deep: bool = False) -> list[str]:
        return self.inspect(ctx, deep).problems

    def _absent_images(self, sr: SplitReport, image_dir: Path) -> list[Entry]:
        """Report listed images that are not on disk (one directory listing per folder, not one stat per image,
        so the check stays cheap on network file systems); return the entries that are present."""
        p = self._prefix()
        by_dir: dict[Path, list[Entry]] = defaultdict(list)
        for entry in sr.entries:
            by_dir[(image_dir / entry.path).parent].append(entry)
        present: list[Entry] = []
        absent: list[Entry] = []
        folders: list[str] = []
        for folder, entries in by_dir.items():
            try:
                names = set(os.listdir(folder))
            except FileNotFoundError:
                folders.append(f"{p}{sr.file}:{entries[0].line}: folder not found: {folder} "
                               f"({len(entries)} listed image(s) are in it)")
                continue
            except OSError as err:  # not a folder, no permission, ...
                folders.append(f"{p}{sr.file}:{entries[0].line}: cannot list {folder}: {err.strerror or err}")
                continue
            for entry in entries:
                (present if Path(entry.path).name in names else absent).append(entry)
        sr.problems += capped(folders, len(folders), f"{p}{sr.file}: {{n}} more image folders not found")
        absent.sort(key=lambda e: e.line)
        messages = [f"{p}{sr.file}:{e.line}: image not found: {image_dir / e.path}" for e in absent[:MAX_PER_KIND]]
        sr.problems += capped(messages, len(absent), f"{p}{sr.file}: {{n}} more listed images not found")
        return present

    def _decode_sample(self, sr: SplitReport, image_dir: Path, present: list[Entry], ctx: DataContext) -> None:
        p = self._prefix()
        size = int(ctx.settings.get("deep_sample", DEFAULT_DEEP_SAMPLE))
        sample = present if size <= 0 or size >= len(present) else random.Random(0).sample(present, size)
        failed = []
        for entry in sorted(sample, key=lambda e: e.line):
            try:
                read_image(image_dir / entry.path)
            except Exception as err:  # noqa: BLE001 - any decoder failure is the finding
                failed.append(f"{p}{sr.file}:{entry.line}: cannot decode {image_dir / entry.path}: {err}")
        sr.problems += capped(failed, len(failed), f"{p}{sr.file}: {{n}} more sampled images cannot be decoded")

    # -- data ---------------------------------------------------------------------------------------------------
    def entries(self, split: str, ctx: DataContext) -> tuple[Path, Path, list[Entry]]:
        """(split file, image folder, entries) of a split; raises HarnessError if the file cannot be used."""
        if split not in self.splits:
            raise HarnessError(f"task {self.name} has no split '{split}' (splits: {', '.join(self.splits)})")
        root = self.root(ctx)
        if root is None or not root.is_dir():
            problems = self.inspect(ctx).problems
            raise HarnessError(problems[0] if problems else f"{self.name}: data folder not found")
        path = self.split_file(root, split)
        if not path.is_file():
            raise HarnessError(f"{self._prefix()}{path}: split file not found")
        entries, problems = self.parse(path)
        if problems:
            raise HarnessError(self._prefix() + problems[0])
        return path, self.image_dir(root), entries

    def dataset(self, split: str, ctx: DataContext, train: bool):
        return ImageListDataset(self.items(split, ctx), self.transform(ctx, train))

    def decoded_transform(self, ctx: DataContext, train: bool) -> Callable | None:
        """The split's transform up to the uint8 3 x H x W tensor that :meth:`transform` then scales by 1/255 and
        normalises with :meth:`input_normalization` (the decoded-input cache's items); None: no such split."""
        return None

    def decoded_dataset(self, split: str, ctx: DataContext, train: bool):
        transform = self.decoded_transform(ctx, train)
        return None if transform is None else ImageListDataset(self.items(split, ctx), transform)

    def items(self, split: str, ctx: DataContext) -> list[tuple[Path, int, str]]:
        """(image path, label, where it is listed) of each entry of ``split``."""
        problem = self.settings_problem(ctx)
        if problem:
            raise HarnessError(self._prefix() + problem)
        path, image_dir, entries = self.entries(split, ctx)
        mapping = self.label_map(ctx)
        items = []
        for entry in entries:
            label = mapping[entry.label] if mapping is not None else entry.label
            if not 0 <= label < self.num_classes:
                raise HarnessError(f"{self._prefix()}{path}:{entry.line}: label {entry.label} outside "
                                   f"[0, {self.num_classes})")
            items.append((image_dir / entry.path, label, f"{path}:{entry.line}"))
        return items

    def fingerprint(self, split: str, ctx: DataContext) -> str:
        """sha256 (first 16 hex digits) of the split file's bytes: the list defines the split's content."""
        root = self.root(ctx)
        path = self.split_file(root, split) if root is not None else None
        if path is None or not path.is_file():
            return ""
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
