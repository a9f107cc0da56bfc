"""VTAB-1k in the image-folder export layout (docs/protocol.md §7).

The layout is the one NOAH's ``get_vtab1k.py`` writes and SSF, V-PETL Bench, Convpass and most PETL code read
(docs/protocol.md §7.5)::

    <data root>/<folder>/
        train800.txt  val200.txt  train800val200.txt  test.txt     lines: images/<split>/000000.jpg <label>
        images/{train800,val200,train800val200,test}/000000.jpg ...

``<data root>`` is the ``vtab-1k/`` folder (``--data-root`` or the suite's ``data.root``; a root that holds a
``vtab-1k/`` folder also works). One task's folder can live elsewhere: ``data.roots: {vtab-dtd: /path/to/dtd}``.
The checks, the dataset and the fingerprint are the list-file machinery of ``tasks/lists.py``.

Tasks are named ``vtab-<folder>`` (``vtab-cifar``, ``vtab-dsprites_loc``, ...), in the groups natural / specialized /
structured (docs/protocol.md §7.1). Preprocessing follows VPT/TOAST (docs/protocol.md §7.4): resize to
image_size x image_size (bilinear, aspect not kept), no augmentation. ``data.preprocess`` picks another repo's resize
and crop (see PREPROCESS).

Mean and std are not the preset's: every preset normalises with ``ctx.mean``/``ctx.std``, which the engine resolves
from ``data.normalize`` (docs/protocol.md §2.2; by default the backbone's own pretrained statistics). The one
exception is ``noah-inception``, which by definition is NOAH's ``--inception`` option and pins mean/std 0.5
(``harness.api.INCEPTION_MEAN``/``INCEPTION_STD``) whatever ``data.normalize`` says.

Data settings read here (the suite's ``data:`` section, or ``--set data.KEY=VALUE``), declared in
``VtabTask.data_keys``:

* ``preprocess``: vpt (default) | noah | noah-inception | ssf
* ``strict_counts``, ``deep_sample``: the list-file checks (``tasks/lists.py``)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from harness.api import INCEPTION_MEAN, INCEPTION_STD, TASKS, DataContext
from tasks.lists import MAX_PER_KIND, Entry, ListTask, SplitReport, capped

# ------------------------------------------------------------------------------------------- VTAB-1k
#: folder -> (classes, group), in VTAB's usual table order (docs/protocol.md §7.1)
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
#: the short names of the VTAB-1k table in the VPT and TOAST papers, by folder (tables, figures and reports show them)
VTAB_DISPLAY_NAMES: dict[str, str] = {
    "cifar": "Cifar", "caltech101": "Caltech101", "dtd": "DTD", "oxford_flowers102": "Flowers102",
    "oxford_iiit_pet": "Pets", "svhn": "SVHN", "sun397": "Sun397", "patch_camelyon": "Camelyon", "eurosat": "EuroSAT",
    "resisc45": "Resisc45", "diabetic_retinopathy": "Retinopathy", "clevr_count": "Clevr-Count",
    "clevr_dist": "Clevr-Dist", "dmlab": "DMLab", "kitti": "KITTI", "dsprites_loc": "dSpr-Loc",
    "dsprites_ori": "dSpr-Ori", "smallnorb_azi": "sNORB-Azim", "smallnorb_ele": "sNORB-Elev",
}
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
VTAB_COUNTS: dict[str, int | None] = {"train800": 800, "val200": 200, "train800val200": 1000, "test": None}
#: the full test splits' sizes as task_adaptation's TFDS splits give them: for planning only (the compute estimate
#: of `harness run --dry-run`), never checked against the data (unverified here)
VTAB_TEST_SIZES: dict[str, int] = {
    "cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
    "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
    "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150,
}

#: preprocessing variants: name -> (resize, interpolation, centre crop, pinned (mean, std) or None). ``resize``
#: "square" resizes to size x size (aspect not kept), "short" resizes the short side to size. None: the statistics
#: come from ``ctx.mean``/``ctx.std`` (``data.normalize``; docs/protocol.md §2.2, §7.4).
PREPROCESS: dict[str, tuple[str, str, bool, tuple[tuple[float, ...], tuple[float, ...]] | None]] = {
    # VPT/TOAST: tf.image.resize to 224x224 (bilinear), no augmentation (docs/protocol.md §7.3, §7.4)
    "vpt": ("square", "bilinear", False, None),
    # NOAH: Resize((224, 224), bicubic) then CenterCrop(224) (a no-op)
    "noah": ("square", "bicubic", True, None),
    # NOAH with --inception: the same resize, mean/std 0.5 by definition of the option
    "noah-inception": ("square", "bicubic", True, (INCEPTION_MEAN, INCEPTION_STD)),
    # SSF --direct-resize (docs/protocol.md §7.4): short side to 224, then CenterCrop(224)
    "ssf": ("short", "bilinear", True, None),
}


class VtabTask(ListTask):
    """One VTAB-1k task read from the image-folder export."""

    family = "vtab"
    splits = VTAB_SPLITS
    deterministic_train = True  # no augmentation: the same transform for train and eval
    data_keys = (*ListTask.data_keys, "preprocess")

    def __init__(self, folder: str, num_classes: int, group: str) -> None:
        self.folder, self.num_classes, self.group = folder, num_classes, group
        self.name = f"vtab-{folder}"
        self.display_name = VTAB_DISPLAY_NAMES[folder]
        self.layout_hint = (f"the VTAB-1k export layout: {folder}/{{train800,val200,train800val200,test}}.txt "
                            f"and {folder}/images/<split>/")

    def split_file(self, root: Path, split: str) -> Path:
        return root / f"{split}.txt"

    def alternative_parents(self) -> tuple[str, ...]:
        return ("vtab-1k",)

    def expected_count(self, split: str) -> int | None:
        return VTAB_COUNTS[split]

    def expected_size(self, split: str) -> int | None:
        return VTAB_COUNTS[split] if split != "test" else VTAB_TEST_SIZES.get(self.folder)

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
        """The same transform for train and eval: VTAB uses no augmentation (docs/protocol.md §7.3)."""
        from torchvision import transforms as T

        return T.Compose([*self._geometry(ctx), T.ToTensor(), T.Normalize(*self.input_normalization(ctx))])

    def decoded_transform(self, ctx: DataContext, train: bool) -> Callable:
        """:meth:`transform` up to the resized uint8 image (the decoded-input cache's items)."""
        from torchvision import transforms as T

        return T.Compose([*self._geometry(ctx), T.PILToTensor()])

    def input_normalization(self, ctx: DataContext) -> tuple[tuple[float, ...], tuple[float, ...]]:
        pinned = PREPROCESS[ctx.settings.get("preprocess", "vpt")][3]
        return pinned if pinned is not None else (tuple(ctx.mean), tuple(ctx.std))

    def _geometry(self, ctx: DataContext) -> list[Callable]:
        from torchvision import transforms as T

        resize, interpolation, crop, _pinned = PREPROCESS[ctx.settings.get("preprocess", "vpt")]
        size = ctx.image_size
        mode = getattr(T.InterpolationMode, interpolation.upper())
        steps = [T.Resize((size, size) if resize == "square" else size, interpolation=mode)]
        if crop:
            steps.append(T.CenterCrop(size))
        return steps


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit() and text[:1] != "+"


for _folder, (_classes, _group) in VTAB_TASKS.items():
    TASKS.add(f"vtab-{_folder}", VtabTask(_folder, _classes, _group))
