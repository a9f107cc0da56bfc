"""Semantic segmentation: PASCAL VOC 2012 and Cityscapes in the layouts their downloads unpack to
(docs/protocol.md §9). Under one data root (``--data-root`` or the suite's ``data.root``)::

    VOCdevkit/VOC2012/                        (task seg-voc; also VOC2012/ or the root itself)
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png            palette PNGs: the palette index is the class (0-20), 255 = ignore
        ImageSets/Segmentation/{train,val}.txt    one <id> per line (1,464 train / 1,449 val)
    cityscapes/                               (task seg-cityscapes; also the root itself)
        leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
        gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png    8-bit label ids, mapped to the 19 train ids

One dataset's folder can live elsewhere: ``data.roots: {seg-voc: /path/to/VOC2012}``.

Cityscapes' ``labelIds`` are mapped to the 19 evaluation classes (``CITYSCAPES_TRAIN_IDS``, cityscapesScripts'
``trainId``); every other id becomes 255 and is ignored. VOC's palette index is the label itself (255 on object
borders is ignored).

Training pipeline (mmsegmentation 0.x's, which AbSViT's segmentation code uses): rescale so the image fits
``scale`` x a random ratio in ``ratio_range`` (0.5-2.0), keeping its aspect ratio; random crop ``crop_size``
(re-drawn up to 10 times while one class covers more than 75% of it); horizontal flip (p 0.5); photometric
distortion (brightness, contrast, saturation, hue, each with p 0.5); normalise; pad to the crop (label 255).
Evaluation: the image rescaled to fit ``scale`` (no randomness), its label map at the original size.

``harness data check`` reports: a missing folder or split file, listed images that are absent, missing masks, a mask
whose size differs from its image, a mask that is not a single-channel label image (a VOC palette PNG saved as RGB,
a Cityscapes ``_color.png``), and, with ``--deep``, label values outside the class set and images that do not
decode (on a sample of ``--sample`` pairs per split; 0: all).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.api import TASKS, DataContext, SegmentationTask
from harness.errors import HarnessError

IGNORE = 255
#: problems of one kind shown per split before "... and N more"
MAX_SHOWN = 10

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
#: Cityscapes label id -> train id (cityscapesScripts ``labels.py``); every other id -> 255
CITYSCAPES_TRAIN_IDS: dict[int, int] = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
#: the label ids a gtFine ``labelIds`` PNG may hold (0 unlabeled ... 33 bicycle)
CITYSCAPES_LABEL_IDS = range(0, 34)


def cityscapes_lookup() -> np.ndarray:
    """A 256-entry table: label id -> train id (255 for ids that are not evaluated)."""
    table = np.full(256, IGNORE, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    return cityscapes_lookup()[label_ids]


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path
    where: str  # where it was listed ("<split file>:<line>" or the image path), for messages


# ---------------------------------------------------------------------------------------------------- transforms
def _rescale(image, mask, scale: tuple[int, int], ratio: float):
    """mmcv's keep-ratio rescale: the largest size whose long side fits scale[0]*ratio and short side
    scale[1]*ratio (image bilinear, mask nearest)."""
    from PIL import Image

    w, h = image.size
    long_edge, short_edge = max(scale) * ratio, min(scale) * ratio
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    size = (max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5)))
    image = image.resize(size, Image.BILINEAR)
    return image, (mask.resize(size, Image.NEAREST) if mask is not None else None)


def _random_crop(image: np.ndarray, mask: np.ndarray, crop: tuple[int, int], cat_max_ratio: float = 0.75):
    """mmseg's RandomCrop: redraw (up to 10 times) while one class covers more than ``cat_max_ratio`` of the
    labelled pixels of the crop."""
    ch, cw = crop
    h, w = mask.shape

    def draw():
        y = np.random.randint(0, max(h - ch, 0) + 1)
        x = np.random.randint(0, max(w - cw, 0) + 1)
        return y, x

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            labels, counts = np.unique(mask[y:y + ch, x:x + cw], return_counts=True)
            counts = counts[labels != IGNORE]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return image[y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw]


def _photometric(image: np.ndarray) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 RGB: brightness +-32, contrast x0.5-1.5 (before or after the
    colour steps), saturation x0.5-1.5, hue +-18 (OpenCV's 180-step hue), each with probability 0.5."""
    from PIL import Image

    def convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    rand = np.random
    if rand.randint(2):
        image = convert(image, beta=rand.uniform(-32, 32))
    contrast_first = rand.randint(2)
    if contrast_first and rand.randint(2):
        image = convert(image, alpha=rand.uniform(0.5, 1.5))
    saturate, shift = rand.randint(2), rand.randint(2)
    if saturate or shift:
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        if saturate:
            hsv[..., 1] = convert(hsv[..., 1], alpha=rand.uniform(0.5, 1.5))
        if shift:
            delta = rand.randint(-18, 19) * 256 / 180  # PIL's hue has 256 steps
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(delta))) % 256).astype(np.uint8)
        image = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and rand.randint(2):
        image = convert(image, alpha=rand.uniform(0.5, 1.5))
    return image


def _to_tensor(image: np.ndarray, mean, std):
    import torch

    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class SegmentationDataset:
    """``(image tensor 3 x H x W, label map int64 H x W)``; train-time items are random crops of ``crop_size``."""

    def __init__(self, task: "SegTask", pairs: list[Pair], ctx: DataContext, train: bool):
        self.task, self.pairs, self.train = task, pairs, train
        self.options = task.options(ctx)
        self.mean, self.std = ctx.mean, ctx.std

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image

        pair = self.pairs[index]
        image = _open(pair.image, pair.where, "image").convert("RGB")
        labels = self.task.read_labels(pair)
        s = self.options
        if not self.train:
            image, _ = _rescale(image, None, s["scale"], 1.0)
            return _to_tensor(np.asarray(image), self.mean, self.std), torch.from_numpy(labels.astype(np.int64))
        low, high = s["ratio_range"]
        image, mask = _rescale(image, Image.fromarray(labels), s["scale"], np.random.uniform(low, high))
        image, labels = _random_crop(np.asarray(image), np.asarray(mask), s["crop_size"])
        if np.random.rand() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        x = _to_tensor(_photometric(np.ascontiguousarray(image)), self.mean, self.std)
        y = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
        ch, cw = s["crop_size"]
        pad_h, pad_w = ch - x.shape[1], cw - x.shape[2]
        if pad_h > 0 or pad_w > 0:  # an image smaller than the crop: pad (image 0, label ignored)
            x = torch.nn.functional.pad(x, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=0.0)
            y = torch.nn.functional.pad(y, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=IGNORE)
        return x, y


def _open(path: Path, where: str, what: str):
    from PIL import Image

    try:
        return Image.open(path)
    except FileNotFoundError:
        raise HarnessError(f"{where}: {what} {path} not found") from None
    except Exception as err:  # noqa: BLE001 - PIL raises several kinds for a file that is not an image
        raise HarnessError(f"{where}: cannot read {what} {path}: {type(err).__name__}: {err}") from None


# ---------------------------------------------------------------------------------------------------- tasks
class SegTask(SegmentationTask):
    """What VOC and Cityscapes share: finding the folder, checking it, the dataset."""

    family = "segmentation"
    group = "segmentation"
    splits = ("train", "val")
    #: folders under the data root where the dataset may be, first match wins ("" = the root itself)
    candidates: tuple[str, ...] = ()
    #: the layout, for messages
    layout_hint: str = ""
    #: mask modes read as label images, and what a mask in another mode probably is
    mask_modes: tuple[str, ...] = ("L", "P")
    wrong_mode_hint: str = ""
    #: label values a mask may hold
    label_values: frozenset[int] = frozenset()
    #: the official splits' image counts, for planning only (`harness run --dry-run`'s estimate)
    planning_sizes: dict[str, int] = {}

    def expected_size(self, split: str) -> int | None:
        return self.planning_sizes.get(split)

    # -- where -------------------------------------------------------------------------------------------------
    def root(self, ctx: DataContext) -> Path:
        roots = ctx.settings.get("roots") or {}
        if roots.get(self.name):
            return Path(str(roots[self.name])).expanduser()
        if ctx.data_root is None:
            raise HarnessError(f"{self.name}: no data root: pass --data-root (the folder holding {self.layout_hint})")
        base = Path(ctx.data_root).expanduser()
        for sub in self.candidates:
            if self.looks_like(base / sub if sub else base):
                return base / sub if sub else base
        return base / self.candidates[0]

    @abc.abstractmethod
    def looks_like(self, folder: Path) -> bool:
        """Whether ``folder`` holds this dataset's layout (used to pick among ``candidates``)."""

    # -- what --------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def pairs(self, root: Path, split: str) -> tuple[list[Pair], list[str]]:
        """(image/mask pairs of a split, problems that stop reading it)."""

    def to_labels(self, mask: np.ndarray) -> np.ndarray:
        return mask

    def read_labels(self, pair: Pair) -> np.ndarray:
        """The train-id label map of a pair, or a HarnessError saying what is wrong with its mask."""
        image = _open(pair.image, pair.where, "image")
        mask = _open(pair.mask, pair.where, "mask")
        problem = self.header_problem(pair, image, mask)
        if problem:
            raise HarnessError(problem)
        return self.to_labels(np.asarray(mask))

    def header_problem(self, pair: Pair, image, mask) -> str | None:
        """Mode and size, from the PNG/JPEG headers alone."""
        if mask.mode not in self.mask_modes:
            return (f"{pair.where}: mask {pair.mask} is a {mask.mode} image, expected a single-channel label image "
                    f"(mode {' or '.join(self.mask_modes)}): {self.wrong_mode_hint}")
        if mask.size != image.size:
            return (f"{pair.where}: mask {pair.mask} is {mask.size[0]}x{mask.size[1]} but its image {pair.image} is "
                    f"{image.size[0]}x{image.size[1]} (width x height); a mask must match its image pixel for pixel")
        return None

    def values_problem(self, pair: Pair, mask) -> str | None:
        values = set(np.unique(np.asarray(mask)).tolist())
        outside = sorted(values - self.label_values)
        if outside:
            shown = ", ".join(map(str, outside[:MAX_SHOWN])) + (", ..." if len(outside) > MAX_SHOWN else "")
            return (f"{pair.where}: mask {pair.mask} has label values outside the class set "
                    f"({self.describe_values()}): {shown}")
        return None

    @abc.abstractmethod
    def describe_values(self) -> str:
        """The allowed label values, for messages (e.g. "0-20 and 255")."""

    # -- the interface -----------------------------------------------------------------------------------------
    def dataset(self, split: str, ctx: DataContext, train: bool) -> SegmentationDataset:
        if split not in self.splits:
            raise HarnessError(f"{self.name}: unknown split '{split}' (expected one of {', '.join(self.splits)})")
        root = self.root(ctx)
        if not root.is_dir():
            raise HarnessError(f"{self.name}: folder {root} not found (expected {self.layout_hint})")
        pairs, problems = self.pairs(root, split)
        if problems:
            raise HarnessError(problems[0])
        if not pairs:
            raise HarnessError(f"{self.name}: split '{split}' under {root} has no images (expected {self.layout_hint})")
        return SegmentationDataset(self, pairs, ctx, train)

    def fingerprint(self, split: str, ctx: DataContext) -> str:
        """sha256 of the split's list of (image, mask) paths relative to the dataset folder."""
        root = self.root(ctx)
        if not root.is_dir():
            return ""
        pairs, _ = self.pairs(root, split)
        text = "\n".join(f"{p.image.relative_to(root)} {p.mask.relative_to(root)}" for p in pairs)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def check(self, ctx: DataContext, deep: bool = False) -> list[str]:
        """Problems with the data on disk: folder, split files, images, masks (existence, size, mode); with
        ``deep`` also the label values and image decoding on a sample (``data.deep_sample``; 0: all)."""
        try:
            root = self.root(ctx)
        except HarnessError as err:
            return [str(err)]
        if not root.is_dir():
            return [f"{self.name}: folder {root} not found (expected {self.layout_hint})"]
        problems: list[str] = []
        sample = int(ctx.settings.get("deep_sample", 100))
        for split in self.splits:
            pairs, stop = self.pairs(root, split)
            if stop:
                problems += stop
                continue
            if not pairs:
                problems.append(f"{self.name}: split '{split}' under {root} has no images "
                                f"(expected {self.layout_hint})")
                continue
            found: dict[str, list[str]] = {}

            def add(kind: str, message: str) -> None:
                found.setdefault(kind, []).append(message)

            present, decoded = [], 0
            for pair in pairs:
                if not pair.image.is_file():
                    add("image", f"{pair.where}: image {pair.image} not found")
                elif not pair.mask.is_file():
                    add("mask", f"{pair.where}: missing mask {pair.mask} for image {pair.image}")
                else:
                    present.append(pair)
            for pair in present:
                try:
                    image, mask = _open(pair.image, pair.where, "image"), _open(pair.mask, pair.where, "mask")
                except HarnessError as err:
                    add("decode", str(err))
                    continue
                problem = self.header_problem(pair, image, mask)
                if problem:
                    add("header", problem)
                elif deep and (sample == 0 or decoded < sample):
                    decoded += 1
                    try:
                        image.load()
                        mask.load()
                    except Exception as err:  # noqa: BLE001 - a truncated or corrupt file
                        add("decode", f"{pair.where}: cannot decode {pair.image} or {pair.mask}: "
                                      f"{type(err).__name__}: {err}")
                        continue
                    problem = self.values_problem(pair, mask)
                    if problem:
                        add("values", problem)
            for messages in found.values():
                problems += messages[:MAX_SHOWN]
                if len(messages) > MAX_SHOWN:
                    problems.append(f"{self.name} {split}: ... and {len(messages) - MAX_SHOWN} more like the above")
        return problems


class VocTask(SegTask):
    name = "seg-voc"
    display_name = "VOC"
    num_classes = 21
    planning_sizes = {"train": 1464, "val": 1449}  # VOC2012 segmentation (without the SBD augmentation)
    class_names = VOC_CLASSES
    crop_size = (512, 512)
    scale = (2048, 512)
    candidates = ("VOCdevkit/VOC2012", "VOC2012", "")
    layout_hint = ("VOCdevkit/VOC2012/ with JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNGs) and "
                   "ImageSets/Segmentation/{train,val}.txt")
    mask_modes = ("P", "L")
    wrong_mode_hint = ("VOC's SegmentationClass masks are palette ('P') PNGs whose palette index is the class id; "
                       "this one was saved with its colours (e.g. read with .convert('RGB') and written back), so "
                       "its pixels are colours, not classes. Use the PNGs from the VOC2012 archive, or map the "
                       "VOC colour palette back to indices and save as mode 'P' or 'L'")
    label_values = frozenset([*range(21), IGNORE])

    def looks_like(self, folder: Path) -> bool:
        return (folder / "JPEGImages").is_dir() or (folder / "ImageSets" / "Segmentation").is_dir()

    def describe_values(self) -> str:
        return "0-20 and 255"

    def pairs(self, root: Path, split: str) -> tuple[list[Pair], list[str]]:
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            return [], [f"{self.name}: split file {listing} not found (expected {self.layout_hint})"]
        pairs, problems = [], []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            name = line.strip()
            if not name:
                continue
            if len(name.split()) != 1:
                problems.append(f"{listing}:{number}: malformed line {line!r} (expected one image id, e.g. "
                                "2007_000032)")
                continue
            pairs.append(Pair(root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png",
                              f"{listing}:{number}"))
        return pairs, problems[:MAX_SHOWN]


class CityscapesTask(SegTask):
    name = "seg-cityscapes"
    display_name = "Cityscapes"
    num_classes = 19
    planning_sizes = {"train": 2975, "val": 500}
    class_names = CITYSCAPES_CLASSES
    crop_size = (512, 1024)
    scale = (2048, 1024)
    candidates = ("cityscapes", "")
    layout_hint = ("cityscapes/ with leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and "
                   "gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png")
    mask_modes = ("L", "P")
    wrong_mode_hint = ("expected gtFine's <name>_gtFine_labelIds.png (8-bit label ids), not the colour rendering "
                       "<name>_gtFine_color.png or another RGB export")
    label_values = frozenset(CITYSCAPES_LABEL_IDS)

    def looks_like(self, folder: Path) -> bool:
        return (folder / "leftImg8bit").is_dir()

    def describe_values(self) -> str:
        return "Cityscapes label ids 0-33"

    def to_labels(self, mask: np.ndarray) -> np.ndarray:
        return to_train_ids(mask)

    def pairs(self, root: Path, split: str) -> tuple[list[Pair], list[str]]:
        images = root / "leftImg8bit" / split
        if not images.is_dir():
            return [], [f"{self.name}: folder {images} not found (expected {self.layout_hint})"]
        pairs = []
        for image in sorted(images.glob("*/*_leftImg8bit.png")):
            stem = image.name[: -len("_leftImg8bit.png")]
            mask = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
            pairs.append(Pair(image, mask, str(image)))
        return pairs, []


for _task in (VocTask(), CityscapesTask()):
    TASKS.add(_task.name, _task)
