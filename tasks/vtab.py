"""VTAB-1k in the image-folder export layout, and the list-file machinery FGVC (``tasks/fgvc.py``) shares.

The layout is the one NOAH's ``get_vtab1k.py`` writes and SSF, V-PETL Bench, Convpass and most PETL code read
(PROTOCOL.md §4(b))::

    <data root>/<folder>/
        train800.txt  val200.txt  train800val200.txt  test.txt     lines: images/<split>/000000.jpg <label>
        images/{train800,val200,train800val200,test}/000000.jpg ...

``<data root>`` is the ``vtab-1k/`` folder (``--data-root`` or the suite's ``data.root``; a root that holds a
``vtab-1k/`` folder also works). One task's folder can live elsewhere: ``data.roots: {vtab-dtd: /path/to/dtd}``.

Tasks are named ``vtab-<folder>`` (``vtab-cifar``, ``vtab-dsprites_loc``, ...), in the groups natural / specialized /
structured. Preprocessing follows VPT/TOAST (PROTOCOL.md §3.3): resize to image_size x image_size (bilinear, aspect
not kept), ImageNet mean/std, no augmentation. ``data.preprocess`` picks another repo's variant (see PREPROCESS).

Data settings read here (the suite's ``data:`` section, or ``--set data.KEY=VALUE``):

* ``preprocess``: vpt (default) | noah | noah-inception | ssf
* ``roots``: task name -> that task's own folder (overrides ``<root>/<folder>``)
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

from harness.api import TASKS, DataContext, Task
from harness.errors import HarnessError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: at most this many messages of one kind per split file; the rest are summed up in one more message
MAX_PER_KIND = 5
DEFAULT_DEEP_SAMPLE = 100


# ------------------------------------------------------------------------------------------- shared machinery
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
        """The image transform of a split (train-time augmentation when ``train``)."""

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
        return ImageListDataset(items, self.transform(ctx, train))

    def fingerprint(self, split: str, ctx: DataContext) -> str:
        """sha256 (first 16 hex digits) of the split file's bytes: the list defines the split's content."""
        root = self.root(ctx)
        path = self.split_file(root, split) if root is not None else None
        if path is None or not path.is_file():
            return ""
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- VTAB-1k
#: folder -> (classes, group), in VTAB's usual table order (PROTOCOL.md §4(b))
VTAB_TASKS: dict[str, tuple[int, str]] = {
    "cifar": (100, "natural"),
    "caltech101": (102, "natural"),
    "dtd": (47, "natural"),
    "oxford_flowers102": (102, "natural"),
    "oxford_iiit_pet": (37, "natural"),
    "svhn": (10, "natural"),
    "sun397": (397, "natural"),
    "patch_camelyon": (2, "specialized"),
    "eurosat": (10, "specialized"),
    "resisc45": (45, "specialized"),
    "diabetic_retinopathy": (5, "specialized"),
    "clevr_count": (8, "structured"),
    "clevr_dist": (6, "structured"),
    "dmlab": (6, "structured"),
    "kitti": (4, "structured"),
    "dsprites_loc": (16, "structured"),
    "dsprites_ori": (16, "structured"),
    "smallnorb_azi": (18, "structured"),
    "smallnorb_ele": (9, "structured"),
}
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
VTAB_COUNTS: dict[str, int | None] = {"train800": 800, "val200": 200, "train800val200": 1000, "test": None}

#: preprocessing variants: name -> (resize, interpolation, centre crop, mean, std). ``resize`` "square" resizes
#: to size x size (aspect not kept), "short" resizes the short side to size.
PREPROCESS: dict[str, tuple[str, str, bool, tuple[float, ...], tuple[float, ...]]] = {
    # VPT/TOAST: tf.image.resize to 224x224 (bilinear), ImageNet mean/std, no augmentation (PROTOCOL.md §3.3.4)
    "vpt": ("square", "bilinear", False, IMAGENET_MEAN, IMAGENET_STD),
    # NOAH: Resize((224, 224), bicubic) then CenterCrop(224) (a no-op), ImageNet mean/std
    "noah": ("square", "bicubic", True, IMAGENET_MEAN, IMAGENET_STD),
    # NOAH with --inception: mean/std 0.5
    "noah-inception": ("square", "bicubic", True, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # SSF --direct-resize as PROTOCOL.md §3.3.5 states it: short side to 224, then CenterCrop(224)
    "ssf": ("short", "bilinear", True, IMAGENET_MEAN, IMAGENET_STD),
}


class VtabTask(ListTask):
    """One VTAB-1k task read from the image-folder export."""

    family = "vtab"
    splits = VTAB_SPLITS

    def __init__(self, folder: str, num_classes: int, group: str) -> None:
        self.folder, self.num_classes, self.group = folder, num_classes, group
        self.name = f"vtab-{folder}"
        self.layout_hint = (f"the VTAB-1k export layout: {folder}/{{train800,val200,train800val200,test}}.txt "
                            f"and {folder}/images/<split>/")

    def split_file(self, root: Path, split: str) -> Path:
        return root / f"{split}.txt"

    def alternative_parents(self) -> tuple[str, ...]:
        return ("vtab-1k",)

    def expected_count(self, split: str) -> int | None:
        return VTAB_COUNTS[split]

    def parse(self, path: Path) -> tuple[list[Entry], list[str]]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            return [], [f"{path}: not a text file ({err.reason} at byte {err.start})"]
        entries: list[Entry] = []
        malformed: list[str] = []
        duplicates: list[str] = []
        n_malformed = n_duplicates = 0
        first_line: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not _is_int(parts[1]):
                n_malformed += 1
                shown = line if len(line) <= 120 else line[:117] + "..."
                malformed.append(f"{path}:{number}: malformed line {shown!r} "
                                 "(expected '<image path> <integer label>', e.g. 'images/train800/000000.jpg 3')")
                continue
            if parts[0] in first_line:
                n_duplicates += 1
                first = first_line[parts[0]]
                duplicates.append(f"{path}:{number}: duplicate entry '{parts[0]}' (first at line {first})")
                continue
            first_line[parts[0]] = number
            entries.append(Entry(parts[0], int(parts[1]), number))
        problems = capped(malformed, n_malformed, f"{path}: {{n}} more malformed lines")
        problems += capped(duplicates, n_duplicates, f"{path}: {{n}} more duplicate entries")
        return entries, problems

    def entry_problems(self, report: SplitReport) -> list[str]:
        bad = [e for e in report.entries if not 0 <= e.label < self.num_classes]
        messages = [f"{report.file}:{e.line}: label {e.label} outside [0, {self.num_classes})"
                    for e in bad[:MAX_PER_KIND]]
        return capped(messages, len(bad), f"{report.file}: {{n}} more labels outside [0, {self.num_classes})")

    def settings_problem(self, ctx: DataContext) -> str | None:
        name = ctx.settings.get("preprocess", "vpt")
        if name not in PREPROCESS:
            return f"data.preprocess: unknown variant {name!r} (expected one of {', '.join(PREPROCESS)})"
        return None

    def transform(self, ctx: DataContext, train: bool) -> Callable:
        """The same transform for train and eval: VTAB uses no augmentation."""
        from torchvision import transforms as T

        resize, interpolation, crop, mean, std = PREPROCESS[ctx.settings.get("preprocess", "vpt")]
        size = ctx.image_size
        mode = getattr(T.InterpolationMode, interpolation.upper())
        steps = [T.Resize((size, size) if resize == "square" else size, interpolation=mode)]
        if crop:
            steps.append(T.CenterCrop(size))
        steps += [T.ToTensor(), T.Normalize(mean, std)]
        return T.Compose(steps)


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit() and text[:1] != "+"


for _folder, (_classes, _group) in VTAB_TASKS.items():
    TASKS.add(f"vtab-{_folder}", VtabTask(_folder, _classes, _group))
