"""An ImageNet-style folder (``<root>/<class>/<image>``) whose file list is cached on disk.

torchvision's ``ImageFolder`` lists every file when it is built: on ImageNet-1k's 1.28 M training images that takes
minutes on a network file system, and a pre-tuning builds the dataset in every process (each data-parallel rank,
each resume after a preemption). :class:`CachedImageFolder` is that same dataset (the same ``classes``,
``class_to_idx`` and ``samples`` in the same order: it lists with torchvision's own functions) whose listing is
built once and kept under ``<cache dir>/image-folders/<sha256 of the resolved root>.json``.

The cached listing is used while the root folder and every class folder keep the modification time they had when it
was made (one ``stat`` per class folder, none per file): adding or removing a class, or a file directly in a class
folder, makes the next construction list the folder again. A change deeper down (a file in a sub-folder of a class
folder) does not touch the class folder's time, so it goes unnoticed; delete the cache file after such a change.
The listing is built under a file lock and written atomically (temp file + rename), so parallel ranks build it once
and never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, DatasetFolder

from harness.api import file_lock

#: the cache file's format: bump when what it holds changes (older files are then listed again)
LISTING_VERSION = 1


def listing_path(cache_dir: Path, root: str | Path) -> Path:
    """Where the listing of the folder ``root`` is cached: keyed by its resolved path."""
    resolved = str(Path(os.path.expanduser(str(root))).resolve())
    return Path(cache_dir) / "image-folders" / f"{hashlib.sha256(resolved.encode()).hexdigest()[:16]}.json"


def _mtimes(directory: str, classes: list[str]) -> tuple[int, list[int]] | None:
    """(root's, each class folder's) modification times in ns; None when one of them is gone."""
    try:
        return (os.stat(directory).st_mtime_ns,
                [os.stat(os.path.join(directory, name)).st_mtime_ns for name in classes])
    except OSError:
        return None


class CachedImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder(root, transform)`` with its listing cached under ``cache_dir`` (see the
    module docstring). Only the default image extensions and no ``is_valid_file`` (what the listing is keyed by)."""

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None, *, cache_dir: Path,
                 target_transform: Callable[[Any], Any] | None = None) -> None:
        self._cache_file = listing_path(cache_dir, root)
        self._listing: dict[str, Any] | None = None
        super().__init__(str(root), transform=transform, target_transform=target_transform)

    # DatasetFolder.__init__ asks these two; both answer from one listing (read or built once)
    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        listing = self._get_listing(str(directory))
        return list(listing["classes"]), {name: i for i, name in enumerate(listing["classes"])}

    def make_dataset(self, directory: str | Path, class_to_idx: dict[str, int],  # type: ignore[override]
                     extensions: tuple[str, ...] | None = None, is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        if is_valid_file is not None or tuple(extensions or ()) != tuple(IMG_EXTENSIONS):
            return DatasetFolder.make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        directory = str(directory)
        listing = self._get_listing(directory)
        folders = [os.path.join(directory, name) for name in listing["classes"]]
        samples: list[tuple[str, int]] = []
        for index, joined in listing["samples"]:
            folder = folders[index]
            samples.extend((folder + suffix, index) for suffix in joined.split("\0"))
        return samples

    def _get_listing(self, directory: str) -> dict[str, Any]:
        if self._listing is None:
            self._listing = self._read(directory)
            if self._listing is None:
                with file_lock(self._cache_file.with_suffix(".lock")):
                    self._listing = self._read(directory) or self._build(directory)
        return self._listing

    def _read(self, directory: str) -> dict[str, Any] | None:
        """The cached listing when it is there, of this format and folder, and no folder's time changed."""
        try:
            listing = json.loads(self._cache_file.read_text())
        except (OSError, ValueError):
            return None
        if (not isinstance(listing, dict) or listing.get("version") != LISTING_VERSION
                or listing.get("root") != str(Path(directory).resolve())):
            return None
        if _mtimes(directory, listing["classes"]) != (listing["root_mtime_ns"], listing["class_mtimes_ns"]):
            return None
        return listing

    def _build(self, directory: str) -> dict[str, Any]:
        """List the folder with torchvision's own functions (so the dataset is ImageFolder's) and cache it."""
        t0 = time.perf_counter()
        before = os.stat(directory).st_mtime_ns
        classes, class_to_idx = DatasetFolder.find_classes(self, directory)
        stamps = _mtimes(directory, classes)  # taken before the walk: a change during it makes the next one list again
        samples = DatasetFolder.make_dataset(directory, class_to_idx, IMG_EXTENSIONS, None, False)
        folders = [os.path.join(directory, name) for name in classes]
        # runs of consecutive samples of one class, their paths after the class folder joined by NUL (no file name
        # holds one): ImageNet's 1.28 M paths parse as 1,000 strings, not 1.28 M JSON lists
        runs: list[list[Any]] = []
        for path, index in samples:
            if not runs or runs[-1][0] != index:
                runs.append([index, []])
            runs[-1][1].append(path[len(folders[index]):])
        listing = {"version": LISTING_VERSION, "root": str(Path(directory).resolve()), "classes": classes,
                   "root_mtime_ns": before if stamps is None else stamps[0],
                   "class_mtimes_ns": [] if stamps is None else stamps[1],
                   "samples": [[index, "\0".join(suffixes)] for index, suffixes in runs]}
        self._cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._cache_file.parent, prefix=f".{self._cache_file.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(listing, fh, separators=(",", ":"))
            os.replace(tmp, self._cache_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        print(f"listed {len(samples)} images in {len(classes)} classes in {time.perf_counter() - t0:.1f} s; "
              f"cached at {self._cache_file}", flush=True)
        return listing
