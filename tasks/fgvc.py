"""FGVC: the five fine-grained datasets in VPT's JSON-split layout (docs/protocol.md §8.1).

Each dataset folder holds ``train.json`` / ``val.json`` / ``test.json``, each a JSON object
``{"<relative image path>": <class id>, ...}`` (VPT's splits, from https://cornell.box.com/v/vptfgvcsplits), next to
the dataset's own images. Under one data root (``--data-root`` or the suite's ``data.root``)::

    CUB_200_2011/   images/<key>        (task fgvc-cub,      200 classes)
    nabirds/        images/<key>        (task fgvc-nabirds,  555 classes)
    OxfordFlower/   <key>  (jpg/...)    (task fgvc-flowers,  102 classes)
    Stanford-dogs/  Images/<key>        (task fgvc-dogs,     120 classes)
    Stanford-cars/  <key>  (car_ims/...)(task fgvc-cars,     196 classes)

One dataset's folder can live elsewhere: ``data.roots: {fgvc-cub: /path/to/CUB_200_2011}``.

Class ids are whatever the JSON says (NABirds' are not contiguous); they are mapped to 0..C-1 in sorted order over
the union of the three split files, so a class missing from one split keeps its id (the official code remaps per
split file, which is only safe when every class is in every split; docs/protocol.md §8.2).

Transforms as VPT's ``src/data/transforms.py`` (docs/protocol.md §8.3), scaled with the suite's image size S (224
gives the paper's numbers): train resize the short side to S*256/224, random crop S, horizontal flip; eval resize,
centre crop S. Mean and std are ``ctx.mean``/``ctx.std``, resolved by the engine from ``data.normalize``
(docs/protocol.md §2.2; by default the backbone's own pretrained statistics).

The list-file machinery (checks, dataset, fingerprint) is ``tasks/lists.py``. FGVC reads only its ``data:`` keys
(``strict_counts``, ``deep_sample``; ``FgvcTask.data_keys`` is inherited from ``ListTask``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from harness.api import TASKS, DataContext
from tasks.lists import MAX_PER_KIND, DataReport, Entry, ListTask, capped

FGVC_SPLITS = ("train", "val", "test")

#: task name -> (folder, image folder inside it, classes)
FGVC_TASKS: dict[str, tuple[str, str, int]] = {
    "fgvc-cub": ("CUB_200_2011", "images", 200),
    "fgvc-nabirds": ("nabirds", "images", 555),
    "fgvc-flowers": ("OxfordFlower", "", 102),
    "fgvc-dogs": ("Stanford-dogs", "Images", 120),
    "fgvc-cars": ("Stanford-cars", "", 196),
}

#: the papers' short names (VPT's and TOAST's FGVC tables): tables, figures and reports show them
FGVC_DISPLAY_NAMES: dict[str, str] = {"fgvc-cub": "CUB", "fgvc-nabirds": "NABirds", "fgvc-flowers": "Flowers",
                                      "fgvc-dogs": "Dogs", "fgvc-cars": "Cars"}

#: (train, val, test) sizes of VPT's splits as its appendix is commonly cited: for planning only (the compute
#: estimate of `harness run --dry-run`), never checked against the data (docs/protocol.md §8: unverified)
FGVC_PLANNING_SIZES: dict[str, tuple[int, int, int]] = {
    "fgvc-cub": (5394, 600, 5794), "fgvc-nabirds": (21536, 2393, 24633), "fgvc-flowers": (1020, 1020, 6149),
    "fgvc-dogs": (10800, 1200, 8580), "fgvc-cars": (7329, 815, 8041),
}


class _Pairs(list):
    """A JSON object as its (key, value) pairs in file order, so duplicate keys are seen, not silently merged."""


def _line_finder(text: str) -> Callable[[str], int]:
    """Line numbers of keys in file order: each lookup searches on from the previous key's position."""
    position = 0

    def line_of(key: str) -> int:
        nonlocal position
        for quoted in (json.dumps(key), json.dumps(key, ensure_ascii=False)):
            index = text.find(quoted, position)
            if index >= 0:
                position = index + len(quoted)
                return text.count("\n", 0, index) + 1
        return 0

    return line_of


class FgvcTask(ListTask):
    family = "fgvc"
    group = "fgvc"
    splits = FGVC_SPLITS
    deterministic_train = False  # random crops and flips

    def __init__(self, name: str, folder: str, images: str, num_classes: int) -> None:
        self.name, self.folder, self.images, self.num_classes = name, folder, images, num_classes
        self.display_name = FGVC_DISPLAY_NAMES.get(name, "")
        where = f"{folder}/{images}/<key>" if images else f"{folder}/<key>"
        self.layout_hint = f"VPT's FGVC layout: {folder}/{{train,val,test}}.json and the images at {where}"
        self._label_maps: dict[tuple, dict[int, int]] = {}

    def split_file(self, root: Path, split: str) -> Path:
        return root / f"{split}.json"

    def expected_size(self, split: str) -> int | None:
        sizes = FGVC_PLANNING_SIZES.get(self.name)
        return dict(zip(FGVC_SPLITS, sizes)).get(split) if sizes else None

    def image_dir(self, root: Path) -> Path:
        return root / self.images if self.images else root

    def parse(self, path: Path) -> tuple[list[Entry], list[str]]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            return [], [f"{path}: not a text file ({err.reason} at byte {err.start})"]
        try:
            data = json.loads(text, object_pairs_hook=_Pairs)
        except json.JSONDecodeError as err:
            return [], [f"{path}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})"]
        if not isinstance(data, _Pairs):
            return [], [f"{path}: expected a JSON object mapping image path -> class id, got {type(data).__name__}"]
        line_of = _line_finder(text)
        entries: list[Entry] = []
        malformed: list[str] = []
        duplicates: list[str] = []
        n_malformed = n_duplicates = 0
        first_line: dict[str, int] = {}
        for key, value in data:
            line = line_of(key)
            if isinstance(value, bool) or not isinstance(value, int) or not key:
                n_malformed += 1
                malformed.append(f"{path}:{line}: malformed entry {json.dumps(key)}: {json.dumps(value)} "
                                 "(expected \"<image path>\": <integer class id>)")
                continue
            if key in first_line:
                n_duplicates += 1
                duplicates.append(f"{path}:{line}: duplicate entry '{key}' (first at line {first_line[key]})")
                continue
            first_line[key] = line
            entries.append(Entry(key, value, line))
        problems = capped(malformed, n_malformed, f"{path}: {{n}} more malformed entries")
        problems += capped(duplicates, n_duplicates, f"{path}: {{n}} more duplicate entries")
        return entries, problems

    def task_checks(self, report: DataReport, strict: bool) -> None:
        """Class ids over the union of the splits: more than the dataset's classes is always wrong (labels would
        fall outside [0, classes)); fewer, or eval classes never trained on, are wrong unless counts are relaxed."""
        found = [s for s in report.splits if s.found]
        if not found:
            return
        p = self._prefix()
        union = sorted({e.label for s in found for e in s.entries})
        files = ", ".join(s.file.name for s in found)
        where = found[0].file.parent
        if len(union) > self.num_classes:
            report.task_problems.append(f"{p}{where}: {len(union)} distinct class ids in {files}, expected "
                                        f"{self.num_classes} (labels would fall outside [0, {self.num_classes}))")
        elif len(union) < self.num_classes:
            message = f"{p}{where}: {len(union)} distinct class ids in {files}, expected {self.num_classes}"
            (report.task_problems if strict else report.task_notes).append(message)
        train = next((s for s in found if s.split == "train"), None)
        if train is None:
            return
        trained = {e.label for e in train.entries}
        for sr in found:
            unseen = sorted({e.label for e in sr.entries} - trained)
            if sr is not train and unseen:
                shown = ", ".join(map(str, unseen[:MAX_PER_KIND])) + (", ..." if len(unseen) > MAX_PER_KIND else "")
                message = f"{p}{sr.file}: {len(unseen)} class id(s) not in {train.file.name}: {shown}"
                (sr.problems if strict else sr.notes).append(message)

    def label_map(self, ctx: DataContext) -> dict[int, int]:
        """Sorted class ids over the union of the split files -> 0..C-1, the same for every split."""
        root = self.root(ctx)
        files = [self.split_file(root, s) for s in self.splits]
        key = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())
        if key not in self._label_maps:
            ids: set[int] = set()
            for f in files:
                if f.is_file():
                    ids |= {e.label for e in self.parse(f)[0]}
            self._label_maps[key] = {c: i for i, c in enumerate(sorted(ids))}
        return self._label_maps[key]

    def transform(self, ctx: DataContext, train: bool) -> Callable:
        from torchvision import transforms as T

        size = ctx.image_size
        resize = int(size * 256 / 224)  # VPT: 224 -> 256, 384 -> 438, 448 -> 512
        normalize = T.Normalize(ctx.mean, ctx.std)
        if train:
            return T.Compose([T.Resize(resize), T.RandomCrop(size), T.RandomHorizontalFlip(0.5), T.ToTensor(),
                              normalize])
        return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), normalize])

    def decoded_transform(self, ctx: DataContext, train: bool) -> Callable | None:
        """The evaluation transform up to the uint8 crop (the decoded-input cache serves evaluation splits only:
        training crops and flips are random)."""
        if train:
            return None
        from torchvision import transforms as T

        size = ctx.image_size
        return T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.PILToTensor()])


for _name, (_folder, _images, _classes) in FGVC_TASKS.items():
    TASKS.add(_name, FgvcTask(_name, _folder, _images, _classes))
